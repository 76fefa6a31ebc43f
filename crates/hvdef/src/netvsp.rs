//! The network VSP protocol (NVSP) on the synthetic NIC's channels
//! ([`crate::vmbus::guid::NETWORK`]): the messages Linux's `hv_netvsc` sends to negotiate a
//! version, hand over its receive and send buffers, ask for subchannels and carry RNDIS
//! messages (see [`crate::rndis`]). Every message starts with a `u32` type; the body follows
//! unaligned. Sizes are asserted at compile time.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub use crate::vmbus::guid::NETWORK as INTERFACE;

/// Protocol versions, as the guest puts them in INIT (min = max = the one it tries).
pub mod version {
    /// "Version 1" on the wire is 2.
    pub const V1: u32 = 2;
    pub const V2: u32 = 0x30002;
    pub const V4: u32 = 0x40000;
    pub const V5: u32 = 0x50000;
    pub const V6: u32 = 0x60000;
    pub const V61: u32 = 0x60001;
}

/// Message types (`nvsp_message_header.msg_type`).
pub mod msg {
    pub const INIT: u32 = 1;
    pub const INIT_COMPLETE: u32 = 2;
    pub const SEND_NDIS_VERSION: u32 = 100;
    pub const SEND_RECEIVE_BUFFER: u32 = 101;
    pub const SEND_RECEIVE_BUFFER_COMPLETE: u32 = 102;
    pub const REVOKE_RECEIVE_BUFFER: u32 = 103;
    pub const SEND_SEND_BUFFER: u32 = 104;
    pub const SEND_SEND_BUFFER_COMPLETE: u32 = 105;
    pub const REVOKE_SEND_BUFFER: u32 = 106;
    pub const SEND_RNDIS_PACKET: u32 = 107;
    pub const SEND_RNDIS_PACKET_COMPLETE: u32 = 108;
    pub const SEND_NDIS_CONFIG: u32 = 125;
    pub const SEND_VF_ASSOCIATION: u32 = 128;
    pub const SWITCH_DATA_PATH: u32 = 129;
    pub const OID_QUERY_EX: u32 = 131;
    pub const SUBCHANNEL: u32 = 133;
    pub const SEND_INDIRECTION_TABLE: u32 = 134;
}

/// Status values in completions.
pub mod status {
    pub const NONE: u32 = 0;
    pub const SUCCESS: u32 = 1;
    pub const FAIL: u32 = 2;
    pub const PROTOCOL_TOO_NEW: u32 = 3;
    pub const PROTOCOL_TOO_OLD: u32 = 4;
    pub const INVALID_RNDIS_PACKET: u32 = 5;
    pub const BUSY: u32 = 6;
    pub const PROTOCOL_UNSUPPORTED: u32 = 7;
}

/// The transfer-page set id Linux gives its receive buffer (and checks in every XFER_PAGES
/// packet).
pub const RECEIVE_BUFFER_ID: u16 = 0xCAFE;
/// The id of the send buffer.
pub const SEND_BUFFER_ID: u16 = 0;
/// `send_buf_section_index` meaning "not in the send buffer".
pub const NO_SECTION: u32 = 0xFFFF_FFFF;
/// `SEND_RNDIS_PACKET.channel_type`.
pub const CHANNEL_TYPE_DATA: u32 = 0;
pub const CHANNEL_TYPE_CONTROL: u32 = 1;
/// `SUBCHANNEL.op`: allocate.
pub const SUBCHANNEL_ALLOCATE: u32 = 1;
/// Bytes of `struct nvsp_message` on Linux 6.x (header plus the largest body); messages
/// the host sends are padded to it.
pub const MESSAGE_SIZE: usize = 40;
/// Smallest section size Linux accepts (`NETVSC_MTU_MIN`).
pub const MIN_SECTION_SIZE: u32 = 68;

/// `NDIS_CONFIG.capability` bits.
pub mod capability {
    pub const VMQ: u64 = 1 << 0;
    pub const CHIMNEY: u64 = 1 << 1;
    pub const SRIOV: u64 = 1 << 2;
    pub const IEEE8021Q: u64 = 1 << 3;
    pub const CORRELATION_ID: u64 = 1 << 4;
    pub const TEAMING: u64 = 1 << 5;
    pub const VSUBNETID: u64 = 1 << 6;
    pub const RSC: u64 = 1 << 7;
}

macro_rules! wire {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? } = $size:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
        #[repr(C, packed)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        const _: () = assert!(size_of::<$name>() == $size);
    };
}

wire!(
    /// `nvsp_message_header`.
    Header { msg_type: u32 } = 4
);
wire!(
    /// INIT: the version range the guest can speak.
    Init { min_version: u32, max_version: u32 } = 8
);
wire!(
    /// INIT_COMPLETE.
    InitComplete { negotiated_version: u32, max_mdl_chain_len: u32, status: u32 } = 12
);
wire!(
    /// SEND_NDIS_VERSION.
    NdisVersion { major: u32, minor: u32 } = 8
);
wire!(
    /// SEND_NDIS_CONFIG (NVSP 2 and later).
    NdisConfig { mtu: u32, reserved: u32, capabilities: u64 } = 16
);
wire!(
    /// SEND_RECEIVE_BUFFER and SEND_SEND_BUFFER.
    SendBuffer { gpadl: u32, id: u16 } = 6
);
wire!(
    /// One section of the receive buffer.
    ReceiveSection { offset: u32, sub_alloc_size: u32, num_sub_allocs: u32, end_offset: u32 } = 16
);
wire!(
    /// SEND_RECEIVE_BUFFER_COMPLETE with its one section.
    ReceiveBufferComplete { status: u32, num_sections: u32, section: ReceiveSection } = 24
);
wire!(
    /// SEND_SEND_BUFFER_COMPLETE.
    SendBufferComplete { status: u32, section_size: u32 } = 8
);
wire!(
    /// REVOKE_RECEIVE_BUFFER and REVOKE_SEND_BUFFER.
    RevokeBuffer { id: u16 } = 2
);
wire!(
    /// SEND_RNDIS_PACKET, both ways.
    RndisPacket { channel_type: u32, section_index: u32, section_size: u32 } = 12
);
wire!(
    /// SEND_RNDIS_PACKET_COMPLETE, both ways.
    RndisPacketComplete { status: u32 } = 4
);
wire!(
    /// SUBCHANNEL request.
    SubchannelRequest { op: u32, count: u32 } = 8
);
wire!(
    /// SUBCHANNEL completion: how many were allocated.
    SubchannelComplete { status: u32, count: u32 } = 8
);
