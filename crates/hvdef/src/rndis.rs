//! Remote NDIS as the synthetic NIC carries it inside NVSP SEND_RNDIS_PACKET messages:
//! message types and statuses, the control requests and completions, the data packet with its
//! per-packet information (checksum, LSO, VLAN, hash, fragment id), the OIDs Linux's
//! `hv_netvsc` queries and sets, and the NDIS objects behind them (offload capabilities and
//! parameters, RSS). Offsets inside messages count from the field after `msg_len` (the
//! request id, or the data packet header). Sizes are asserted at compile time.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `ndis_msg_type`.
pub mod msg {
    pub const PACKET: u32 = 0x1;
    pub const INIT: u32 = 0x2;
    pub const HALT: u32 = 0x3;
    pub const QUERY: u32 = 0x4;
    pub const SET: u32 = 0x5;
    pub const RESET: u32 = 0x6;
    pub const INDICATE_STATUS: u32 = 0x7;
    pub const KEEPALIVE: u32 = 0x8;
    /// Or-ed into a request's type for its completion.
    pub const COMPLETION: u32 = 0x8000_0000;
    pub const INIT_COMPLETE: u32 = INIT | COMPLETION;
    pub const QUERY_COMPLETE: u32 = QUERY | COMPLETION;
    pub const SET_COMPLETE: u32 = SET | COMPLETION;
    pub const RESET_COMPLETE: u32 = RESET | COMPLETION;
    pub const KEEPALIVE_COMPLETE: u32 = KEEPALIVE | COMPLETION;
}

/// NDIS status codes.
pub mod status {
    pub const SUCCESS: u32 = 0;
    pub const FAILURE: u32 = 0xC000_0001;
    pub const NOT_SUPPORTED: u32 = 0xC000_00BB;
    pub const INVALID_LENGTH: u32 = 0xC001_0014;
    pub const INVALID_DATA: u32 = 0xC001_0015;
    pub const MEDIA_CONNECT: u32 = 0x4001_000B;
    pub const MEDIA_DISCONNECT: u32 = 0x4001_000C;
}

pub const MAJOR_VERSION: u32 = 1;
pub const MINOR_VERSION: u32 = 0;
/// `dev_flags`: a connectionless (Ethernet) device.
pub const DF_CONNECTIONLESS: u32 = 1;
/// NdisMedium802_3.
pub const MEDIUM_802_3: u32 = 0;
/// NdisMediaStateConnected / Disconnected (OID_GEN_MEDIA_CONNECT_STATUS).
pub const MEDIA_STATE_CONNECTED: u32 = 0;
pub const MEDIA_STATE_DISCONNECTED: u32 = 1;

/// OIDs.
pub mod oid {
    pub const GEN_SUPPORTED_LIST: u32 = 0x0001_0101;
    pub const GEN_HARDWARE_STATUS: u32 = 0x0001_0102;
    pub const GEN_MEDIA_SUPPORTED: u32 = 0x0001_0103;
    pub const GEN_MEDIA_IN_USE: u32 = 0x0001_0104;
    pub const GEN_MAXIMUM_LOOKAHEAD: u32 = 0x0001_0105;
    pub const GEN_MAXIMUM_FRAME_SIZE: u32 = 0x0001_0106;
    pub const GEN_LINK_SPEED: u32 = 0x0001_0107;
    pub const GEN_TRANSMIT_BLOCK_SIZE: u32 = 0x0001_010A;
    pub const GEN_RECEIVE_BLOCK_SIZE: u32 = 0x0001_010B;
    pub const GEN_VENDOR_ID: u32 = 0x0001_010C;
    pub const GEN_VENDOR_DESCRIPTION: u32 = 0x0001_010D;
    pub const GEN_CURRENT_PACKET_FILTER: u32 = 0x0001_010E;
    pub const GEN_CURRENT_LOOKAHEAD: u32 = 0x0001_010F;
    pub const GEN_DRIVER_VERSION: u32 = 0x0001_0110;
    pub const GEN_MAXIMUM_TOTAL_SIZE: u32 = 0x0001_0111;
    pub const GEN_MAC_OPTIONS: u32 = 0x0001_0113;
    pub const GEN_MEDIA_CONNECT_STATUS: u32 = 0x0001_0114;
    pub const GEN_MAXIMUM_SEND_PACKETS: u32 = 0x0001_0115;
    pub const GEN_VENDOR_DRIVER_VERSION: u32 = 0x0001_0116;
    pub const GEN_NETWORK_LAYER_ADDRESSES: u32 = 0x0001_0118;
    pub const GEN_RECEIVE_SCALE_CAPABILITIES: u32 = 0x0001_0203;
    pub const GEN_RECEIVE_SCALE_PARAMETERS: u32 = 0x0001_0204;
    pub const GEN_RNDIS_CONFIG_PARAMETER: u32 = 0x0001_021B;
    pub const GEN_FRIENDLY_NAME: u32 = 0x0002_0216;
    pub const GEN_XMIT_OK: u32 = 0x0002_0101;
    pub const GEN_RCV_OK: u32 = 0x0002_0102;
    pub const GEN_XMIT_ERROR: u32 = 0x0002_0103;
    pub const GEN_RCV_ERROR: u32 = 0x0002_0104;
    pub const GEN_RCV_NO_BUFFER: u32 = 0x0002_0105;
    pub const ETH_PERMANENT_ADDRESS: u32 = 0x0101_0101;
    pub const ETH_CURRENT_ADDRESS: u32 = 0x0101_0102;
    pub const ETH_MULTICAST_LIST: u32 = 0x0101_0103;
    pub const ETH_MAXIMUM_LIST_SIZE: u32 = 0x0101_0104;
    pub const OFFLOAD_ENCAPSULATION: u32 = 0x0101_010A;
    pub const TCP_OFFLOAD_CURRENT_CONFIG: u32 = 0xFC01_020B;
    pub const TCP_OFFLOAD_PARAMETERS: u32 = 0xFC01_020C;
    pub const TCP_OFFLOAD_HARDWARE_CAPABILITIES: u32 = 0xFC01_020D;
}

/// OID_GEN_CURRENT_PACKET_FILTER bits.
pub mod filter {
    pub const DIRECTED: u32 = 0x1;
    pub const MULTICAST: u32 = 0x2;
    pub const ALL_MULTICAST: u32 = 0x4;
    pub const BROADCAST: u32 = 0x8;
    pub const PROMISCUOUS: u32 = 0x20;
}

/// Per-packet information types.
pub mod ppi {
    pub const TCPIP_CHECKSUM: u32 = 0;
    pub const TCP_LARGESEND: u32 = 2;
    pub const IEEE_8021Q: u32 = 6;
    pub const HASH_VALUE: u32 = 8;
    /// With the internal bit: the fragment id of a packet split over several sections.
    pub const PKTINFO_ID: u32 = 1;
    /// `rndis_per_packet_info.type` bit 31: an RNDIS-internal type.
    pub const INTERNAL: u32 = 1 << 31;
}

/// `rndis_pktinfo_id.flag` bits.
pub mod pktinfo {
    pub const VERSION_1: u8 = 1;
    pub const SUBALLOC: u8 = 1 << 0;
    pub const FIRST_FRAGMENT: u8 = 1 << 1;
    pub const LAST_FRAGMENT: u8 = 1 << 2;
}

/// `ndis_tcp_ip_checksum_info` transmit bits (guest to host).
pub mod tx_csum {
    pub const IS_IPV4: u32 = 1 << 0;
    pub const IS_IPV6: u32 = 1 << 1;
    pub const TCP: u32 = 1 << 2;
    pub const UDP: u32 = 1 << 3;
    pub const IP_HEADER: u32 = 1 << 4;
    pub const TCP_HEADER_OFFSET_SHIFT: u32 = 16;
    pub const TCP_HEADER_OFFSET_MASK: u32 = 0x3ff;
}

/// `ndis_tcp_ip_checksum_info` receive bits (host to guest).
pub mod rx_csum {
    pub const TCP_FAILED: u32 = 1 << 0;
    pub const UDP_FAILED: u32 = 1 << 1;
    pub const IP_FAILED: u32 = 1 << 2;
    pub const TCP_SUCCEEDED: u32 = 1 << 3;
    pub const UDP_SUCCEEDED: u32 = 1 << 4;
    pub const IP_SUCCEEDED: u32 = 1 << 5;
}

/// `ndis_tcp_lso_info` (LSO v2 transmit).
pub mod lso {
    pub const MSS_MASK: u32 = 0xf_ffff;
    pub const TCP_HEADER_OFFSET_SHIFT: u32 = 20;
    pub const TCP_HEADER_OFFSET_MASK: u32 = 0x3ff;
    /// Bit 30: LSO v2.
    pub const TYPE_V2: u32 = 1 << 30;
    /// Bit 31: IPv6.
    pub const IPV6: u32 = 1 << 31;
}

/// NDIS object types.
pub mod object {
    pub const DEFAULT: u8 = 0x80;
    pub const RSS_CAPABILITIES: u8 = 0x88;
    pub const RSS_PARAMETERS: u8 = 0x89;
    pub const OFFLOAD: u8 = 0xA7;
}

/// NDIS_OFFLOAD sizes by revision: 6.0 (revision 1), 6.1 (2), 6.30 (3).
pub const OFFLOAD_SIZE_6_0: u16 = 112;
pub const OFFLOAD_SIZE_6_1: u16 = 144;
pub const OFFLOAD_SIZE_6_30: u16 = 156;
/// NDIS_OFFLOAD_PARAMETERS as NVSP 4 and older guests send it (no UDP or RSC fields).
pub const OFFLOAD_PARAMETERS_SIZE_V4: u16 = 22;

/// Offload capability bits.
pub mod caps {
    pub const ENCAP_8023: u32 = 0x0002;
    pub const TXCSUM_IP4OPT: u32 = 0x001;
    pub const TXCSUM_TCP4OPT: u32 = 0x004;
    pub const TXCSUM_TCP4: u32 = 0x010;
    pub const TXCSUM_UDP4: u32 = 0x040;
    pub const TXCSUM_IP4: u32 = 0x100;
    pub const TXCSUM_IP6EXT: u32 = 0x001;
    pub const TXCSUM_TCP6OPT: u32 = 0x004;
    pub const TXCSUM_TCP6: u32 = 0x010;
    pub const TXCSUM_UDP6: u32 = 0x040;
    pub const LSOV2_IP6EXT: u32 = 0x001;
    pub const LSOV2_TCP6OPT: u32 = 0x004;
}

/// NDIS_OFFLOAD_PARAMETERS checksum values.
pub mod offload_param {
    pub const NO_CHANGE: u8 = 0;
    pub const TX_RX_DISABLED: u8 = 1;
    pub const TX_ENABLED_RX_DISABLED: u8 = 2;
    pub const RX_ENABLED_TX_DISABLED: u8 = 3;
    pub const TX_RX_ENABLED: u8 = 4;
    pub const LSOV2_DISABLED: u8 = 1;
    pub const LSOV2_ENABLED: u8 = 2;
}

/// RSS parameter flags.
pub mod rss_flag {
    pub const DISABLE_RSS: u16 = 0x0010;
}

/// Length of the RSS hash key Linux sends.
pub const RSS_KEY_LEN: u16 = 40;

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
    /// The header of every RNDIS message.
    Header { msg_type: u32, msg_len: u32 } = 8
);
wire!(
    InitRequest {
        request_id: u32,
        major_version: u32,
        minor_version: u32,
        max_transfer_size: u32
    } = 16
);
wire!(
    InitComplete {
        request_id: u32,
        status: u32,
        major_version: u32,
        minor_version: u32,
        device_flags: u32,
        medium: u32,
        max_packets_per_message: u32,
        max_transfer_size: u32,
        packet_alignment_factor: u32,
        af_list_offset: u32,
        af_list_size: u32,
    } = 44
);
wire!(
    /// QUERY and SET requests; the information buffer is at `info_offset` from
    /// `request_id`.
    OidRequest { request_id: u32, oid: u32, info_len: u32, info_offset: u32, device_vc_handle: u32 } = 20
);
wire!(
    QueryComplete {
        request_id: u32,
        status: u32,
        info_len: u32,
        info_offset: u32
    } = 16
);
wire!(
    /// SET, KEEPALIVE completions (and HALT's request id).
    RequestComplete { request_id: u32, status: u32 } = 8
);
wire!(
    ResetComplete {
        status: u32,
        addressing_reset: u32
    } = 8
);
wire!(
    IndicateStatus {
        status: u32,
        status_len: u32,
        status_offset: u32
    } = 12
);
wire!(
    /// The data packet; offsets count from `data_offset`'s own position.
    Packet {
        data_offset: u32,
        data_len: u32,
        oob_data_offset: u32,
        oob_data_len: u32,
        num_oob_data_elements: u32,
        ppi_offset: u32,
        ppi_len: u32,
        vc_handle: u32,
        reserved: u32,
    } = 36
);
wire!(
    /// One per-packet information element; its value is at `offset` from its start.
    PerPacketInfo { size: u32, ppi_type: u32, offset: u32 } = 12
);
wire!(
    /// `rndis_pktinfo_id`.
    PktInfoId { version: u8, flag: u8, packet_id: u16 } = 4
);
wire!(
    ObjectHeader {
        object_type: u8,
        revision: u8,
        size: u16
    } = 4
);
wire!(
    /// NDIS_OFFLOAD up to revision 3 (NDIS 6.30); shorter revisions are prefixes.
    Offload {
        header: ObjectHeader,
        ip4_tx_encap: u32,
        ip4_tx_csum: u32,
        ip4_rx_encap: u32,
        ip4_rx_csum: u32,
        ip6_tx_encap: u32,
        ip6_tx_csum: u32,
        ip6_rx_encap: u32,
        ip6_rx_csum: u32,
        lsov1: [u32; 4],
        ipsecv1: [u32; 7],
        lsov2_ip4_encap: u32,
        lsov2_ip4_max_size: u32,
        lsov2_ip4_min_segments: u32,
        lsov2_ip6_encap: u32,
        lsov2_ip6_max_size: u32,
        lsov2_ip6_min_segments: u32,
        lsov2_ip6_options: u32,
        flags: u32,
        ipsecv2: [u32; 8],
        rsc_ip4: u8,
        rsc_ip6: u8,
        reserved: [u8; 2],
        encap_gre: [u32; 2],
    } = 156
);
wire!(
    /// NDIS_OFFLOAD_PARAMETERS (revision 3; NVSP 4 guests send the first 22 bytes).
    OffloadParameters {
        header: ObjectHeader,
        ip4_csum: u8,
        tcp4_csum: u8,
        udp4_csum: u8,
        tcp6_csum: u8,
        udp6_csum: u8,
        lsov1: u8,
        ipsecv1: u8,
        lsov2_ip4: u8,
        lsov2_ip6: u8,
        tcp_connection_ip4: u8,
        tcp_connection_ip6: u8,
        reserved: u8,
        flags: u32,
        ipsecv2: u8,
        ipsecv2_ip4: u8,
        rsc_ip4: u8,
        rsc_ip6: u8,
        encapsulated_packet_task_offload: u8,
        encapsulation_types: u8,
        reserved2: [u8; 2],
    } = 28
);
wire!(
    /// NDIS_RECEIVE_SCALE_CAPABILITIES as Linux reads it.
    RssCapabilities {
        header: ObjectHeader,
        capabilities: u32,
        interrupt_messages: u32,
        receive_queues: u32,
        indirection_table_entries: u16,
    } = 18
);
wire!(
    /// NDIS_RECEIVE_SCALE_PARAMETERS; offsets count from its start.
    RssParameters {
        header: ObjectHeader,
        flags: u16,
        base_cpu: u16,
        hash_info: u32,
        indirection_table_size: u16,
        reserved: u16,
        indirection_table_offset: u32,
        hash_key_size: u16,
        reserved2: u16,
        hash_key_offset: u32,
        processor_masks_offset: u32,
        processor_masks_count: u32,
        processor_masks_entry_size: u32,
    } = 40
);

/// RSS capability flags the host reports.
pub mod rss_caps {
    pub const MESSAGE_SIGNALED_INTERRUPTS: u32 = 0x0100_0000;
    pub const CLASSIFICATION_AT_DPC: u32 = 0x0400_0000;
    pub const HASH_TYPE_TCP_IPV4: u32 = 0x0000_0100;
    pub const HASH_TYPE_TCP_IPV6: u32 = 0x0000_0200;
}

/// Revision 2 of the RSS objects.
pub const RSS_REVISION_2: u8 = 2;
