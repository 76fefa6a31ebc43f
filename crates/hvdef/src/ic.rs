//! Integration-service (hv_utils) message layouts: the pipe header, the IC message header,
//! version negotiation, shutdown, heartbeat and time synchronization.

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
