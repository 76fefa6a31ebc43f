//! Integration-service (hv_utils) message layouts: the pipe header, the IC message header,
//! version negotiation, shutdown, heartbeat, time synchronization and key-value pair exchange
//! (KVP, [`kvp`]).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Pipe header type of a data message.
pub const PIPE_TYPE_DATA: u32 = 1;

/// IC message types.
pub mod msgtype {
    pub const NEGOTIATE: u16 = 0;
    pub const HEARTBEAT: u16 = 1;
    pub const KVP_EXCHANGE: u16 = 2;
    pub const SHUTDOWN: u16 = 3;
    pub const TIMESYNC: u16 = 4;
    pub const VSS: u16 = 5;
    pub const FCOPY: u16 = 7;
}

/// icmsg_hdr flags.
pub mod flags {
    pub const TRANSACTION: u8 = 1;
    pub const REQUEST: u8 = 2;
    pub const RESPONSE: u8 = 4;
}

/// IC status: success (HRESULT S_OK).
pub const STATUS_OK: u32 = 0;
/// IC status: generic failure (HRESULT E_FAIL).
pub const STATUS_FAIL: u32 = 0x8000_4005;

/// Most versions of each kind Linux accepts in a NEGOTIATE message.
pub const MAX_VERSION_COUNT: u16 = 100;

/// Pipe header preceding the IC message.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct PipeHeader {
    pub pipe_type: u32,
    /// Bytes following this header.
    pub size: u32,
}

/// IC message header (`icmsg_hdr`).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct IcMessageHeader {
    pub framework_version: IcVersion,
    pub msgtype: u16,
    pub message_version: IcVersion,
    pub msgsize: u16,
    pub status: u32,
    pub transaction_id: u8,
    pub flags: u8,
    pub reserved: [u8; 2],
}

/// Offset of the message body in a packet payload (pipe header + IC header).
pub const IC_BODY_OFFSET: usize = size_of::<PipeHeader>() + size_of::<IcMessageHeader>();

/// A (major, minor) version pair.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C, packed)]
pub struct IcVersion {
    pub major: u16,
    pub minor: u16,
}

impl IcVersion {
    pub const fn new(major: u16, minor: u16) -> Self {
        Self { major, minor }
    }
}

/// Framework 1.0 (WS2008).
pub const FRAMEWORK_1_0: IcVersion = IcVersion::new(1, 0);
/// Framework 3.0.
pub const FRAMEWORK_3_0: IcVersion = IcVersion::new(3, 0);

/// NEGOTIATE body: followed by `framework_count + message_count` [`IcVersion`]s, frameworks
/// first.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct NegotiateHeader {
    pub framework_count: u16,
    pub message_count: u16,
    pub reserved: u32,
}

/// Size of the shutdown reason text.
pub const SHUTDOWN_MESSAGE_SIZE: usize = 2048;

/// Shutdown request body.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct ShutdownMessage {
    pub reason_code: u32,
    pub timeout_seconds: u32,
    pub flags: u32,
    pub message: [u8; SHUTDOWN_MESSAGE_SIZE],
}

/// Shutdown flags.
pub mod shutdown_flags {
    pub const FORCE: u32 = 1;
    pub const POWER_OFF: u32 = 0;
    pub const RESTART: u32 = 2;
    pub const HIBERNATE: u32 = 4;
}

/// Heartbeat body: the guest answers with `seq_num + 1`.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct HeartbeatMessage {
    pub seq_num: u64,
    pub reserved: [u32; 8],
}

/// Timesync body for message versions 3.0 and older.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct TimesyncMessage {
    /// Host time, 100 ns units since 1601-01-01 UTC.
    pub parent_time: u64,
    pub child_time: u64,
    pub round_trip_time: u64,
    pub flags: u8,
}

/// Timesync body for message version 4.0.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C, packed)]
pub struct TimesyncRefMessage {
    /// Host time, 100 ns units since 1601-01-01 UTC.
    pub parent_time: u64,
    /// The guest's reference counter (TIME_REF_COUNT) when `parent_time` was sampled.
    pub vm_reference_time: u64,
    pub flags: u8,
    pub leap_flags: i8,
    pub stratum: i8,
    pub reserved: [u8; 3],
}

/// Timesync flags.
pub mod timesync_flags {
    /// Set the guest clock now.
    pub const SYNC: u8 = 1;
    /// A periodic sample.
    pub const SAMPLE: u8 = 2;
}

/// 100 ns intervals between 1601-01-01 and 1970-01-01.
pub const EPOCH_DELTA_100NS: u64 = 116_444_736_000_000_000;

/// Key-value pair exchange (Linux `drivers/hv/hv_kvp.c`, `include/uapi/linux/hyperv.h`).
///
/// Every request is one `KVP_EXCHANGE` IC message. GET, SET, DELETE and ENUMERATE carry a
/// [`KvpMessage`] (2580 bytes: the 4-byte [`KvpHeader`] and a body big enough for
/// [`KvpEnumerate`]); GET_IP_INFO and SET_IP_INFO carry a [`KvpIpMessage`] (7428 bytes). The
/// guest answers in place, in the same buffer, with the IC status set. Keys and values are
/// UTF-16LE with byte lengths that include the NUL terminator.
pub mod kvp {
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

    /// Message version 3.0 (Windows 7).
    pub const VERSION_3_0: super::IcVersion = super::IcVersion::new(3, 0);
    /// Message version 4.0 (Windows 8): the newest Linux accepts; adds GET/SET_IP_INFO.
    pub const VERSION_4_0: super::IcVersion = super::IcVersion::new(4, 0);
    /// Message version 5.0 (binary IP info). Linux does not accept it.
    pub const VERSION_5_0: super::IcVersion = super::IcVersion::new(5, 0);

    /// Largest key, in bytes, including the NUL terminator (256 UTF-16 units).
    pub const MAX_KEY_SIZE: usize = 512;
    /// Largest value, in bytes, including the NUL terminator (1024 UTF-16 units).
    pub const MAX_VALUE_SIZE: usize = 2048;
    /// Adapter id field of [`KvpIpAddrValue`], UTF-16 units.
    pub const MAX_ADAPTER_ID_SIZE: usize = 128;
    /// Address, subnet and DNS fields of [`KvpIpAddrValue`], UTF-16 units.
    pub const MAX_IP_ADDR_SIZE: usize = 1024;
    /// Gateway field of [`KvpIpAddrValue`], UTF-16 units.
    pub const MAX_GATEWAY_SIZE: usize = 512;

    /// Operations (`enum hv_kvp_exchg_op`).
    pub mod op {
        pub const GET: u8 = 0;
        pub const SET: u8 = 1;
        pub const DELETE: u8 = 2;
        pub const ENUMERATE: u8 = 3;
        pub const GET_IP_INFO: u8 = 4;
        pub const SET_IP_INFO: u8 = 5;
    }

    /// Pools (`enum hv_kvp_exchg_pool`). The Linux daemon keeps pool `n` in
    /// `/var/lib/hyperv/.kvp_pool_n`, except [`AUTO`](pool::AUTO), which it generates.
    pub mod pool {
        /// Items the host pushes to the guest.
        pub const EXTERNAL: u8 = 0;
        /// Items guest software publishes to the host.
        pub const GUEST: u8 = 1;
        /// Items the guest generates (FQDN, OS name and version, addresses).
        pub const AUTO: u8 = 2;
        pub const AUTO_EXTERNAL: u8 = 3;
        pub const AUTO_INTERNAL: u8 = 4;
        /// Number of pools.
        pub const COUNT: u8 = 5;
    }

    /// Value types (registry types; Linux's REG_U64 is 8, Windows' REG_QWORD 11).
    pub mod value_type {
        pub const REG_SZ: u32 = 1;
        pub const REG_EXPAND_SZ: u32 = 2;
        pub const REG_DWORD: u32 = 4;
        pub const REG_U64_LINUX: u32 = 8;
        pub const REG_QWORD: u32 = 11;
    }

    /// IC status values the Linux driver and daemon answer with.
    pub mod status {
        pub const S_OK: u32 = 0;
        /// The kernel's answer when the daemon is not there, timed out (30 s) or failed.
        pub const E_FAIL: u32 = 0x8000_4005;
        /// "No more items" (end of an enumeration), or the daemon's failure for SET, GET
        /// and DELETE.
        pub const S_CONT: u32 = 0x8007_0103;
        pub const NOT_SUPPORTED: u32 = 0x8007_0032;
        pub const INVALID_ARG: u32 = 0x8007_0057;
        pub const GUID_NOT_FOUND: u32 = 0x8004_1002;
    }

    /// Address family bits of [`KvpIpAddrValue::addr_family`].
    pub mod addr_family {
        pub const NONE: u8 = 0;
        pub const IPV4: u8 = 1;
        pub const IPV6: u8 = 2;
    }

    /// `struct hv_kvp_hdr`.
    #[derive(
        Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
    )]
    #[repr(C, packed)]
    pub struct KvpHeader {
        pub operation: u8,
        pub pool: u8,
        pub pad: u16,
    }

    /// `struct hv_kvp_exchg_msg_value`: the body of GET and SET, and of an ENUMERATE answer.
    #[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C, packed)]
    pub struct KvpValue {
        pub value_type: u32,
        /// Bytes of `key` in use, including the UTF-16 NUL.
        pub key_size: u32,
        /// Bytes of `value` in use (strings: including the UTF-16 NUL).
        pub value_size: u32,
        pub key: [u8; MAX_KEY_SIZE],
        pub value: [u8; MAX_VALUE_SIZE],
    }

    /// `struct hv_kvp_msg_enumerate`.
    #[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C, packed)]
    pub struct KvpEnumerate {
        pub index: u32,
        pub value: KvpValue,
    }

    /// `struct hv_kvp_msg_delete`.
    #[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C, packed)]
    pub struct KvpDelete {
        pub key_size: u32,
        pub key: [u8; MAX_KEY_SIZE],
    }

    /// Body size of [`KvpMessage`]: the largest of GET/SET/DELETE/ENUMERATE.
    pub const KVP_BODY_SIZE: usize = size_of::<KvpEnumerate>();

    /// A GET, SET, DELETE or ENUMERATE message (header + body, zero-padded).
    #[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C, packed)]
    pub struct KvpMessage {
        pub header: KvpHeader,
        pub body: [u8; KVP_BODY_SIZE],
    }

    /// `struct hv_kvp_ipaddr_value`: strings are UTF-16LE, NUL-terminated unless they fill
    /// the field; lists are separated by `;`.
    #[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C, packed)]
    pub struct KvpIpAddrValue {
        /// The adapter's MAC address as the guest's sysfs shows it, upper case
        /// ("00:15:5D:00:00:01").
        pub adapter_id: [u8; 2 * MAX_ADAPTER_ID_SIZE],
        pub addr_family: u8,
        pub dhcp_enabled: u8,
        pub ip_addr: [u8; 2 * MAX_IP_ADDR_SIZE],
        pub sub_net: [u8; 2 * MAX_IP_ADDR_SIZE],
        pub gate_way: [u8; 2 * MAX_GATEWAY_SIZE],
        pub dns_addr: [u8; 2 * MAX_IP_ADDR_SIZE],
    }

    /// `struct hv_kvp_ip_msg`: GET_IP_INFO and SET_IP_INFO (no padding after the pool).
    #[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
    #[repr(C, packed)]
    pub struct KvpIpMessage {
        pub operation: u8,
        pub pool: u8,
        pub value: KvpIpAddrValue,
    }

    const _: () = {
        assert!(size_of::<KvpHeader>() == 4);
        assert!(size_of::<KvpValue>() == 2572);
        assert!(size_of::<KvpEnumerate>() == 2576);
        assert!(size_of::<KvpDelete>() == 516);
        assert!(size_of::<KvpMessage>() == 2580);
        assert!(size_of::<KvpIpAddrValue>() == 7426);
        assert!(size_of::<KvpIpMessage>() == 7428);
    };
}

const _: () = {
    assert!(size_of::<PipeHeader>() == 8);
    assert!(size_of::<IcMessageHeader>() == 20);
    assert!(IC_BODY_OFFSET == 28);
    assert!(size_of::<IcVersion>() == 4);
    assert!(size_of::<NegotiateHeader>() == 8);
    assert!(size_of::<ShutdownMessage>() == 2060);
    assert!(size_of::<HeartbeatMessage>() == 40);
    assert!(size_of::<TimesyncMessage>() == 25);
    assert!(size_of::<TimesyncRefMessage>() == 22);
};
