//! VMBus channel-management messages (posted on SynIC SINT 2) and ring-buffer packet layouts.
//!
//! Every structure is packed and little-endian, exactly as the guest lays it out; message
//! offsets include the 8-byte [`MessageHeader`]. Sizes are asserted at compile time.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Connection id of the channel-management message port for protocol versions below 5.0
/// (and the id the host hands back in VERSION_RESPONSE for later messages).
pub const MESSAGE_CONNECTION_ID: u32 = 1;
/// Legacy event connection id (pre-Win8 interrupt page signalling).
pub const EVENT_CONNECTION_ID: u32 = 2;
/// Monitor-page connection id.
pub const MONITOR_CONNECTION_ID: u32 = 3;
/// Connection id of INITIATE_CONTACT for protocol versions 5.0 and later.
pub const MESSAGE_CONNECTION_ID_4: u32 = 4;
/// SINT on which VMBus messages and channel events are delivered.
pub const MESSAGE_SINT: u8 = 2;
/// SynIC message type the host uses for every VMBus message.
pub const SYNIC_MESSAGE_TYPE_VMBUS: u32 = 1;
/// Largest SynIC message payload.
pub const MAX_MESSAGE_SIZE: usize = 240;
/// Highest valid relid (2048 event flag bits in a SINT region, bit 0 reserved).
pub const MAX_RELID: u32 = 2047;
/// First GPADL handle Linux allocates.
pub const FIRST_GPADL_HANDLE: u32 = 0xE1E10;
/// Page size of GPADL PFNs and ring pages.
pub const PAGE_SIZE: usize = 4096;

/// NTSTATUS used as a generic failure in creation/open status fields.
pub const STATUS_UNSUCCESSFUL: u32 = 0xC000_0001;
/// NTSTATUS: invalid parameter.
pub const STATUS_INVALID_PARAMETER: u32 = 0xC000_000D;

/// Protocol versions: (major << 16) | minor.
pub mod version {
    /// Windows Server 2008.
    pub const WS2008: u32 = 0x0000_000D;
    /// Windows 7.
    pub const WIN7: u32 = 0x0001_0001;
    /// Windows 8 (2.4): first version using the SIEF for channel events.
    pub const WIN8: u32 = 0x0002_0004;
    /// Windows 8.1 (3.0).
    pub const WIN8_1: u32 = 0x0003_0000;
    /// Windows 10 (4.0).
    pub const WIN10: u32 = 0x0004_0000;
    /// Windows 10 RS3 (4.1).
    pub const WIN10_V4_1: u32 = 0x0004_0001;
    /// 5.0: INITIATE_CONTACT on connection 4 with msg_sint.
    pub const WIN10_V5: u32 = 0x0005_0000;
    /// 5.1.
    pub const WIN10_V5_1: u32 = 0x0005_0001;
    /// 5.2.
    pub const WIN10_V5_2: u32 = 0x0005_0002;
    /// 5.3: MODIFYCHANNEL_RESPONSE.
    pub const WIN10_V5_3: u32 = 0x0005_0003;
    /// 6.0 (confidential VMBus, longer VERSION_RESPONSE).
    pub const V6_0: u32 = 0x0006_0000;
}

/// Channel message types (the first u32 of every message).
pub mod msgtype {
    pub const OFFER_CHANNEL: u32 = 1;
    pub const RESCIND_CHANNEL_OFFER: u32 = 2;
    pub const REQUEST_OFFERS: u32 = 3;
    pub const ALL_OFFERS_DELIVERED: u32 = 4;
    pub const OPEN_CHANNEL: u32 = 5;
    pub const OPEN_CHANNEL_RESULT: u32 = 6;
    pub const CLOSE_CHANNEL: u32 = 7;
    pub const GPADL_HEADER: u32 = 8;
    pub const GPADL_BODY: u32 = 9;
    pub const GPADL_CREATED: u32 = 10;
    pub const GPADL_TEARDOWN: u32 = 11;
    pub const GPADL_TORNDOWN: u32 = 12;
    pub const RELID_RELEASED: u32 = 13;
    pub const INITIATE_CONTACT: u32 = 14;
    pub const VERSION_RESPONSE: u32 = 15;
    pub const UNLOAD: u32 = 16;
    pub const UNLOAD_RESPONSE: u32 = 17;
    pub const TL_CONNECT_REQUEST: u32 = 21;
    pub const MODIFY_CHANNEL: u32 = 22;
    pub const TL_CONNECT_RESULT: u32 = 23;
    pub const MODIFY_CHANNEL_RESPONSE: u32 = 24;
}

/// A GUID in Windows byte order: `data1..data3` little-endian, `data4` as written.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C, packed)]
pub struct Guid {
    pub data1: u32,
    pub data2: u16,
    pub data3: u16,
    pub data4: [u8; 8],
}

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Guid = Guid::new(0, 0, 0, [0; 8]);

    /// Builds a GUID from its canonical fields.
    pub const fn new(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Self {
        Self {
            data1,
            data2,
            data3,
            data4,
        }
    }

    /// Builds a GUID from the 128-bit value of its canonical text form
    /// (`0x0e0b6031_5213_4934_818b_38d90ced39db` for `0e0b6031-5213-4934-818b-38d90ced39db`).
    pub const fn from_u128(v: u128) -> Self {
        let d4 = (v as u64).to_be_bytes();
        Self::new((v >> 96) as u32, (v >> 80) as u16, (v >> 64) as u16, d4)
    }
}

impl core::fmt::Debug for Guid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(self, f)
    }
}

impl core::fmt::Display for Guid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (d1, d2, d3, d4) = (self.data1, self.data2, self.data3, self.data4);
        write!(
            f,
            "{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6], d4[7]
        )
    }
}

/// Device class GUIDs (OFFERCHANNEL `interface_type`).
pub mod guid {
    use super::Guid;
    pub const SCSI: Guid = Guid::from_u128(0xba6163d9_04a1_4d29_b605_72e2ffb1dc7f);
    pub const IDE: Guid = Guid::from_u128(0x32412632_86cb_44a2_9b5c_50d1417354f5);
    pub const NETWORK: Guid = Guid::from_u128(0xf8615163_df3e_46c5_913f_f2d2f965ed0e);
    pub const SHUTDOWN_IC: Guid = Guid::from_u128(0x0e0b6031_5213_4934_818b_38d90ced39db);
    pub const TIMESYNC_IC: Guid = Guid::from_u128(0x9527e630_d0ae_497b_adce_e80ab0175caf);
    pub const HEARTBEAT_IC: Guid = Guid::from_u128(0x57164f39_9115_4e78_ab55_382f3bd5422d);
    pub const KVP_IC: Guid = Guid::from_u128(0xa9a0f4e7_5a45_4d96_b827_8a841e8c03e6);
    pub const VSS_IC: Guid = Guid::from_u128(0x35fa2e29_ea23_4236_96ae_3a6ebacba440);
    pub const DYNAMIC_MEMORY: Guid = Guid::from_u128(0x525074dc_8985_46e2_8057_a307dc18a502);
}

/// Header of every channel message.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct MessageHeader {
    pub msgtype: u32,
    pub padding: u32,
}

impl MessageHeader {
    pub const fn new(msgtype: u32) -> Self {
        Self {
            msgtype,
            padding: 0,
        }
    }
}

/// INITIATE_CONTACT (14), guest to host.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct InitiateContact {
    pub header: MessageHeader,
    pub version_requested: u32,
    /// VP index that host replies go to.
    pub target_vcpu: u32,
    /// Below 5.0: GPA of the interrupt page. From 5.0: byte 0 = msg_sint, byte 1 = msg_vtl,
    /// bytes 4..8 = feature flags (6.0).
    pub interrupt_page_or_sint: u64,
    pub monitor_page1: u64,
    pub monitor_page2: u64,
}

impl InitiateContact {
    /// The SINT the guest wants messages on (versions 5.0 and later).
    pub fn msg_sint(&self) -> u8 {
        let v = self.interrupt_page_or_sint;
        v as u8
    }
}

/// VERSION_RESPONSE (15), host to guest.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct VersionResponse {
    pub header: MessageHeader,
    pub version_supported: u8,
    pub connection_state: u8,
    pub padding: u16,
    pub msg_conn_id: u32,
}

/// User-defined area of an offer (pipe mode and the like).
pub const OFFER_USER_DEFINED_SIZE: usize = 120;

/// OFFERCHANNEL (1), host to guest.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct OfferChannel {
    pub header: MessageHeader,
    pub interface_type: Guid,
    pub interface_instance: Guid,
    pub reserved1: u64,
    pub reserved2: u64,
    pub chn_flags: u16,
    pub mmio_megabytes: u16,
    pub user_defined: [u8; OFFER_USER_DEFINED_SIZE],
    pub sub_channel_index: u16,
    pub reserved3: u16,
    pub child_relid: u32,
    pub monitor_id: u8,
    /// Bit 0: monitor allocated.
    pub monitor_allocated: u8,
    /// Bit 0: dedicated interrupt.
    pub is_dedicated_interrupt: u16,
    pub connection_id: u32,
}

/// Offer flag marking an hv_sock offer.
pub const OFFER_FLAG_NAMED_PIPE_MODE: u16 = 0x0010;
/// Offer flag marking an hv_sock (transport-layer) offer.
pub const OFFER_FLAG_TLNPI_PROVIDER: u16 = 0x2000;

/// RESCIND_CHANNELOFFER (2), CLOSECHANNEL (7), RELID_RELEASED (13): just a relid.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct RelidMessage {
    pub header: MessageHeader,
    pub child_relid: u32,
}

/// One range of a GPADL: `byte_count` bytes starting `byte_offset` into the first page,
/// followed on the wire by `ceil((byte_offset + byte_count) / 4096)` u64 PFNs.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct GpaRange {
    pub byte_count: u32,
    pub byte_offset: u32,
}

/// GPADL_HEADER (8), guest to host: fixed part, followed by the range list (`range_buflen`
/// bytes in total, possibly continued in GPADL_BODY messages).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct GpadlHeader {
    pub header: MessageHeader,
    pub child_relid: u32,
    pub gpadl: u32,
    pub range_buflen: u16,
    pub rangecount: u16,
}

/// Most PFNs that fit in a GPADL_HEADER with one range.
pub const GPADL_HEADER_MAX_PFNS: usize =
    (MAX_MESSAGE_SIZE - size_of::<GpadlHeader>() - size_of::<GpaRange>()) / 8;

/// GPADL_BODY (9), guest to host: fixed part, followed by u64 PFNs.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct GpadlBody {
    pub header: MessageHeader,
    pub msgnumber: u32,
    pub gpadl: u32,
}

/// Most PFNs that fit in a GPADL_BODY.
pub const GPADL_BODY_MAX_PFNS: usize = (MAX_MESSAGE_SIZE - size_of::<GpadlBody>()) / 8;

/// GPADL_CREATED (10), host to guest.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct GpadlCreated {
    pub header: MessageHeader,
    pub child_relid: u32,
    pub gpadl: u32,
    pub creation_status: u32,
}

/// GPADL_TEARDOWN (11), guest to host.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct GpadlTeardown {
    pub header: MessageHeader,
    pub child_relid: u32,
    pub gpadl: u32,
}

/// GPADL_TORNDOWN (12), host to guest.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct GpadlTorndown {
    pub header: MessageHeader,
    pub gpadl: u32,
}

/// Size of the OPENCHANNEL user data area.
pub const OPEN_USER_DATA_SIZE: usize = 120;

/// OPENCHANNEL (5), guest to host.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct OpenChannel {
    pub header: MessageHeader,
    pub child_relid: u32,
    pub openid: u32,
    pub ring_gpadl: u32,
    pub target_vp: u32,
    /// First page of the host-to-guest ring, in 4 KiB pages from the GPADL start.
    pub downstream_ring_page_offset: u32,
    pub user_data: [u8; OPEN_USER_DATA_SIZE],
}

/// OPENCHANNEL_RESULT (6), host to guest.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct OpenResult {
    pub header: MessageHeader,
    pub child_relid: u32,
    pub openid: u32,
    pub status: u32,
}

/// MODIFYCHANNEL (22), guest to host.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct ModifyChannel {
    pub header: MessageHeader,
    pub child_relid: u32,
    pub target_vp: u32,
}

/// MODIFYCHANNEL_RESPONSE (24), host to guest (protocol 5.3 and later).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct ModifyChannelResponse {
    pub header: MessageHeader,
    pub child_relid: u32,
    pub status: i32,
}

// ---------------------------------------------------------------------------------------------
// Ring buffers.

/// Offsets of fields in a ring's 4 KiB control page.
pub mod ring {
    /// u32: byte offset into the data area where the producer writes next.
    pub const WRITE_INDEX: u64 = 0;
    /// u32: byte offset into the data area where the consumer reads next.
    pub const READ_INDEX: u64 = 4;
    /// u32: non-zero while the consumer does not want signals.
    pub const INTERRUPT_MASK: u64 = 8;
    /// u32: bytes of free space the producer is waiting for (0 = not waiting).
    pub const PENDING_SEND_SIZE: u64 = 12;
    /// u32: feature bits.
    pub const FEATURE_BITS: u64 = 64;
    /// Feature bit: the pending_send_sz protocol is supported.
    pub const FEATURE_PENDING_SEND_SIZE: u32 = 1;
    /// Size of the packet trailer (u64: starting write index << 32).
    pub const TRAILER_SIZE: usize = 8;
}

/// Ring packet types.
pub mod packet_type {
    pub const DATA_INBAND: u16 = 6;
    pub const DATA_USING_XFER_PAGES: u16 = 7;
    pub const DATA_USING_GPADL: u16 = 8;
    pub const DATA_USING_GPA_DIRECT: u16 = 9;
    pub const CANCEL_REQUEST: u16 = 0xA;
    pub const COMPLETION: u16 = 0xB;
}

/// Packet flag: the sender wants a completion.
pub const PACKET_FLAG_COMPLETION_REQUESTED: u16 = 1;

/// The 16-byte descriptor at the start of every ring packet.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct PacketDescriptor {
    pub packet_type: u16,
    /// Header length (descriptor plus type-specific header) in 8-byte units, at least 2.
    pub offset8: u16,
    /// Total packet length in 8-byte units, trailer excluded.
    pub len8: u16,
    pub flags: u16,
    pub transaction_id: u64,
}

/// GPA_DIRECT header after the descriptor: followed by `range_count` ranges, each a
/// [`GpaRange`] and its PFNs.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct GpaDirectHeader {
    pub reserved: u32,
    pub range_count: u32,
}

/// XFER_PAGES header after the descriptor: followed by `range_count` [`XferPageRange`]s.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct XferPagesHeader {
    pub xfer_pageset_id: u16,
    pub sender_owns_set: u8,
    pub reserved: u8,
    pub range_count: u32,
}

/// A range into a transfer-page set (receive buffer).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct XferPageRange {
    pub byte_count: u32,
    pub byte_offset: u32,
}

const _: () = {
    assert!(size_of::<Guid>() == 16);
    assert!(size_of::<MessageHeader>() == 8);
    assert!(size_of::<InitiateContact>() == 40);
    assert!(size_of::<VersionResponse>() == 16);
    assert!(size_of::<OfferChannel>() == 196);
    assert!(core::mem::offset_of!(OfferChannel, user_defined) == 60);
    assert!(core::mem::offset_of!(OfferChannel, sub_channel_index) == 180);
    assert!(core::mem::offset_of!(OfferChannel, child_relid) == 184);
    assert!(core::mem::offset_of!(OfferChannel, connection_id) == 192);
    assert!(size_of::<RelidMessage>() == 12);
    assert!(size_of::<GpaRange>() == 8);
    assert!(size_of::<GpadlHeader>() == 20);
    assert!(GPADL_HEADER_MAX_PFNS == 26);
    assert!(size_of::<GpadlBody>() == 16);
    assert!(GPADL_BODY_MAX_PFNS == 28);
    assert!(size_of::<GpadlCreated>() == 20);
    assert!(size_of::<GpadlTeardown>() == 16);
    assert!(size_of::<GpadlTorndown>() == 12);
    assert!(size_of::<OpenChannel>() == 148);
    assert!(size_of::<OpenResult>() == 20);
    assert!(size_of::<ModifyChannel>() == 16);
    assert!(size_of::<ModifyChannelResponse>() == 16);
    assert!(size_of::<PacketDescriptor>() == 16);
    assert!(size_of::<GpaDirectHeader>() == 8);
    assert!(size_of::<XferPagesHeader>() == 8);
    assert!(size_of::<XferPageRange>() == 8);
};
