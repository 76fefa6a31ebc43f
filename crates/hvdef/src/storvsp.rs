//! The storage VSP protocol (storvsc/storvsp) on the SCSI channel
//! ([`crate::vmbus::guid::SCSI`]): the 64-byte `vstor_packet` every request and completion
//! carries, its operations, and the SRB status values. Layouts follow what Linux's
//! `drivers/scsi/storvsc_drv.c` sends and expects (protocol 5.1 and later, where the request
//! always has the Windows 8 extension and a 20-byte sense area). Sizes are asserted at
//! compile time.

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

pub use crate::vmbus::guid::SCSI as INTERFACE;

/// `vstor_packet.operation`.
pub mod operation {
    pub const COMPLETE_IO: u32 = 1;
    pub const REMOVE_DEVICE: u32 = 2;
    pub const EXECUTE_SRB: u32 = 3;
    pub const RESET_LUN: u32 = 4;
    pub const RESET_ADAPTER: u32 = 5;
    pub const RESET_BUS: u32 = 6;
    pub const BEGIN_INITIALIZATION: u32 = 7;
    pub const END_INITIALIZATION: u32 = 8;
    pub const QUERY_PROTOCOL_VERSION: u32 = 9;
    pub const QUERY_PROPERTIES: u32 = 10;
    pub const ENUMERATE_BUS: u32 = 11;
    pub const FCHBA_DATA: u32 = 12;
    pub const CREATE_SUB_CHANNELS: u32 = 13;
}

/// `vstor_packet.flags`: the sender wants a completion.
pub const REQUEST_COMPLETION_FLAG: u32 = 1;

/// Protocol versions, `major << 8 | minor`.
pub mod version {
    /// Windows 7 (4.2): a shorter request without the Windows 8 extension. Linux no longer
    /// proposes it.
    pub const WIN7: u16 = 0x0402;
    /// Windows 8 (5.1).
    pub const WIN8: u16 = 0x0501;
    /// Windows 8.1 (6.0).
    pub const WIN8_1: u16 = 0x0600;
    /// Windows 10 (6.2).
    pub const WIN10: u16 = 0x0602;
}

/// NT status values in `vstor_packet.status`.
pub mod status {
    pub const SUCCESS: u32 = 0;
    /// STATUS_REVISION_MISMATCH: a protocol version the host does not speak.
    pub const REVISION_MISMATCH: u32 = 0xC000_0059;
    /// STATUS_INVALID_PARAMETER.
    pub const INVALID_PARAMETER: u32 = 0xC000_000D;
    /// STATUS_INVALID_DEVICE_STATE: a request out of order (I/O before END_INIT, ...).
    pub const INVALID_DEVICE_STATE: u32 = 0xC000_0184;
    /// STATUS_NOT_SUPPORTED.
    pub const NOT_SUPPORTED: u32 = 0xC000_00BB;
}

/// `vmscsi_request.srb_status` values (the Windows SRB_STATUS_* codes Linux interprets).
pub mod srb_status {
    pub const PENDING: u8 = 0x00;
    pub const SUCCESS: u8 = 0x01;
    pub const ABORTED: u8 = 0x02;
    pub const ERROR: u8 = 0x04;
    pub const INVALID_REQUEST: u8 = 0x06;
    pub const NO_DEVICE: u8 = 0x08;
    pub const TIMEOUT: u8 = 0x09;
    pub const SELECTION_TIMEOUT: u8 = 0x0A;
    pub const BUS_RESET: u8 = 0x0E;
    pub const DATA_OVERRUN: u8 = 0x12;
    pub const INVALID_LUN: u8 = 0x20;
    pub const INVALID_TARGET_ID: u8 = 0x22;
    /// Or-ed into the status: the sense area holds valid sense data.
    pub const AUTOSENSE_VALID: u8 = 0x80;
}

/// `vmscsi_request.data_in`.
pub mod data_in {
    pub const WRITE: u8 = 0;
    pub const READ: u8 = 1;
    pub const UNKNOWN: u8 = 2;
}

/// Channel property flag: the host supports subchannels (CREATE_SUB_CHANNELS).
pub const CHANNEL_SUPPORTS_MULTI_CHANNEL: u32 = 1;

/// Bytes of the CDB area (`STORVSC_MAX_CMD_LEN`).
pub const CDB_LEN: usize = 16;
/// Bytes of the sense area on protocol 5.1 and later (`STORVSC_SENSE_BUFFER_SIZE`).
pub const SENSE_LEN: usize = 0x14;
/// Bytes of the sense area on protocols before Windows 8.
pub const PRE_WIN8_SENSE_LEN: usize = 0x12;
/// The CDB/sense union (`STORVSC_MAX_BUF_LEN_WITH_PADDING`).
pub const CDB_SENSE_AREA: usize = 0x14;
/// `vmscsi_request.length` as Linux sets it: the size of [`ScsiRequest`].
pub const SCSI_REQUEST_LEN: u16 = 0x34;

/// `vmscsi_win8_extension`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct Win8Extension {
    pub reserve: u16,
    pub queue_tag: u8,
    pub queue_action: u8,
    pub srb_flags: u32,
    pub time_out_value: u32,
    pub queue_sort_key: u32,
}

/// `vmscsi_request` (the SRB) with the Windows 8 extension.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct ScsiRequest {
    pub length: u16,
    pub srb_status: u8,
    pub scsi_status: u8,
    pub port_number: u8,
    pub path_id: u8,
    pub target_id: u8,
    pub lun: u8,
    pub cdb_length: u8,
    pub sense_info_length: u8,
    pub data_in: u8,
    pub reserved: u8,
    pub data_transfer_length: u32,
    /// The CDB in a request (16 bytes used), the sense data in a completion (20 bytes).
    pub cdb_or_sense: [u8; CDB_SENSE_AREA],
    pub win8: Win8Extension,
}

/// `vmstorage_channel_properties`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct ChannelProperties {
    pub reserved: u32,
    /// Most subchannels the guest may ask for.
    pub max_channel_cnt: u16,
    pub reserved1: u16,
    /// [`CHANNEL_SUPPORTS_MULTI_CHANNEL`].
    pub flags: u32,
    /// Largest transfer of one request; Linux derives max_sectors and its scatter list
    /// size from it (0 would mean max_sectors 0).
    pub max_transfer_bytes: u32,
    pub reserved2: u64,
}

/// `vmstorage_protocol_version`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct ProtocolVersion {
    /// `major << 8 | minor`.
    pub major_minor: u16,
    /// Only meaningful to Windows; Linux sends 0.
    pub revision: u16,
}

/// Bytes of the packet's union (`buffer[0x34]`).
pub const PAYLOAD_LEN: usize = 0x34;
/// Bytes of the header before the union.
pub const HEADER_LEN: usize = 12;
/// Bytes of a whole [`VstorPacket`] as Linux 5.14+ sends it and expects it back.
pub const PACKET_LEN: usize = HEADER_LEN + PAYLOAD_LEN;

/// `vstor_packet`: the header and the raw union; view the union with
/// [`VstorPacket::srb`], [`VstorPacket::version`], ... or build it with the setters.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct VstorPacket {
    pub operation: u32,
    pub flags: u32,
    pub status: u32,
    pub payload: [u8; PAYLOAD_LEN],
}

impl Default for VstorPacket {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl VstorPacket {
    /// A packet with `operation` and a zero union.
    pub fn new(operation: u32, status: u32) -> Self {
        Self {
            operation,
            flags: 0,
            status,
            payload: [0; PAYLOAD_LEN],
        }
    }

    fn view<T: FromBytes>(&self) -> T {
        T::read_from_prefix(&self.payload)
            .map(|(t, _)| t)
            .unwrap_or_else(|_| T::new_zeroed())
    }

    fn set<T: IntoBytes + Immutable>(&mut self, v: &T) {
        let b = v.as_bytes();
        self.payload[..b.len()].copy_from_slice(b);
    }

    pub fn srb(&self) -> ScsiRequest {
        self.view()
    }

    pub fn set_srb(&mut self, v: &ScsiRequest) {
        self.set(v)
    }

    pub fn version(&self) -> ProtocolVersion {
        self.view()
    }

    pub fn set_version(&mut self, v: &ProtocolVersion) {
        self.set(v)
    }

    pub fn properties(&self) -> ChannelProperties {
        self.view()
    }

    pub fn set_properties(&mut self, v: &ChannelProperties) {
        self.set(v)
    }

    /// CREATE_SUB_CHANNELS: how many the guest asks for.
    pub fn sub_channel_count(&self) -> u16 {
        u16::from_le_bytes([self.payload[0], self.payload[1]])
    }

    pub fn set_sub_channel_count(&mut self, n: u16) {
        self.payload[..2].copy_from_slice(&n.to_le_bytes());
    }
}

const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Win8Extension>() == 16);
    assert!(size_of::<ScsiRequest>() == SCSI_REQUEST_LEN as usize);
    assert!(size_of::<ScsiRequest>() == PAYLOAD_LEN);
    assert!(size_of::<ChannelProperties>() == 24);
    assert!(size_of::<ProtocolVersion>() == 4);
    assert!(size_of::<VstorPacket>() == 64);
    assert!(PACKET_LEN == 64);
    assert!(CDB_SENSE_AREA >= CDB_LEN && CDB_SENSE_AREA >= SENSE_LEN);
    // Offsets Linux relies on (storvsc_drv.c, struct vmscsi_request).
    assert!(core::mem::offset_of!(ScsiRequest, data_transfer_length) == 12);
    assert!(core::mem::offset_of!(ScsiRequest, cdb_or_sense) == 16);
    assert!(core::mem::offset_of!(ScsiRequest, win8) == 36);
    assert!(core::mem::offset_of!(ChannelProperties, max_transfer_bytes) == 12);
    assert!(core::mem::offset_of!(VstorPacket, payload) == HEADER_LEN);
};
