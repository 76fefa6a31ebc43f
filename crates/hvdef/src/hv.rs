//! Hyper-V Top-Level Functional Specification (TLFS) definitions for x86-64 guests: CPUID
//! leaves and feature bits, synthetic MSR numbers and fields, hypercall codes, statuses and the
//! control word, and the SynIC message, event-flags and reference-TSC page layouts.
//!
//! Constants only, plus a few `const fn` field accessors. Every wire struct has its size
//! asserted at compile time against the size the guest expects.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of a hypervisor page (x86-64).
pub const HV_PAGE_SIZE: u64 = 4096;
/// Shift from a page number to an address.
pub const HV_PAGE_SHIFT: u32 = 12;

// ------------------------------------------------------------------------------------------
// CPUID
// ------------------------------------------------------------------------------------------

/// Standard leaf 1: ECX bit 31 tells the guest a hypervisor is present.
pub const CPUID_FEATURES: u32 = 0x0000_0001;
/// CPUID.1:ECX bit 31.
pub const CPUID_1_ECX_HYPERVISOR_PRESENT: u32 = 1 << 31;
/// Extended leaf 0x80000007 (advanced power management); EDX bit 8 is invariant TSC.
pub const CPUID_EXT_POWER_MANAGEMENT: u32 = 0x8000_0007;
/// CPUID.80000007H:EDX bit 8.
pub const CPUID_80000007_EDX_INVARIANT_TSC: u32 = 1 << 8;

/// First leaf of the hypervisor CPUID range.
pub const CPUID_HV_RANGE_START: u32 = 0x4000_0000;
/// Last leaf of the hypervisor CPUID range that guests scan for signatures.
pub const CPUID_HV_RANGE_END: u32 = 0x4000_FFFF;
/// Step at which guests (Linux's KVM probe) scan for hypervisor signature leaves.
pub const CPUID_HV_SIGNATURE_STEP: u32 = 0x100;

/// Max hypervisor leaf in EAX and the vendor signature in EBX/ECX/EDX.
pub const CPUID_HV_VENDOR_AND_MAX_FUNCTION: u32 = 0x4000_0000;
/// Interface signature in EAX ("Hv#1").
pub const CPUID_HV_INTERFACE: u32 = 0x4000_0001;
/// Hypervisor build and version.
pub const CPUID_HV_VERSION: u32 = 0x4000_0002;
/// Partition privileges (EAX low, EBX high), ECX power, EDX misc features.
pub const CPUID_HV_FEATURES: u32 = 0x4000_0003;
/// Enlightenment hints (EAX), spin-wait count (EBX).
pub const CPUID_HV_ENLIGHTENMENT_INFO: u32 = 0x4000_0004;
/// Implementation limits: max VPs (EAX), max LPs (EBX).
pub const CPUID_HV_IMPLEMENTATION_LIMITS: u32 = 0x4000_0005;

/// "Micr" as the little-endian EBX of leaf 0x40000000.
pub const CPUID_HV_VENDOR_EBX: u32 = u32::from_le_bytes(*b"Micr");
/// "osof" as the little-endian ECX of leaf 0x40000000.
pub const CPUID_HV_VENDOR_ECX: u32 = u32::from_le_bytes(*b"osof");
/// "t Hv" as the little-endian EDX of leaf 0x40000000.
pub const CPUID_HV_VENDOR_EDX: u32 = u32::from_le_bytes(*b"t Hv");
/// "Hv#1" as the little-endian EAX of leaf 0x40000001.
pub const CPUID_HV_INTERFACE_SIGNATURE: u32 = u32::from_le_bytes(*b"Hv#1");

/// Partition privilege bits, low word (CPUID 0x40000003 EAX).
pub mod privilege_low {
    /// HV_X64_MSR_VP_RUNTIME.
    pub const ACCESS_VP_RUNTIME: u32 = 1 << 0;
    /// HV_X64_MSR_TIME_REF_COUNT.
    pub const ACCESS_PARTITION_REFERENCE_COUNTER: u32 = 1 << 1;
    /// SynIC MSRs (SCONTROL, SVERSION, SIEFP, SIMP, EOM, SINT0..15).
    pub const ACCESS_SYNIC_MSRS: u32 = 1 << 2;
    /// Synthetic timer MSRs.
    pub const ACCESS_SYNTHETIC_TIMER_MSRS: u32 = 1 << 3;
    /// EOI/ICR/TPR MSRs and the VP assist page.
    pub const ACCESS_APIC_MSRS: u32 = 1 << 4;
    /// GUEST_OS_ID and HYPERCALL MSRs.
    pub const ACCESS_HYPERCALL_MSRS: u32 = 1 << 5;
    /// VP_INDEX MSR.
    pub const ACCESS_VP_INDEX: u32 = 1 << 6;
    /// RESET MSR.
    pub const ACCESS_RESET_MSR: u32 = 1 << 7;
    /// Statistics MSRs.
    pub const ACCESS_STATS_MSR: u32 = 1 << 8;
    /// REFERENCE_TSC MSR.
    pub const ACCESS_PARTITION_REFERENCE_TSC: u32 = 1 << 9;
    /// GUEST_IDLE MSR.
    pub const ACCESS_GUEST_IDLE_MSR: u32 = 1 << 10;
    /// TSC_FREQUENCY and APIC_FREQUENCY MSRs.
    pub const ACCESS_FREQUENCY_MSRS: u32 = 1 << 11;
    /// Synthetic debug MSRs.
    pub const ACCESS_DEBUG_MSRS: u32 = 1 << 12;
    /// Reenlightenment controls.
    pub const ACCESS_REENLIGHTENMENT_CONTROLS: u32 = 1 << 13;
    /// TSC_INVARIANT_CONTROL MSR.
    pub const ACCESS_TSC_INVARIANT_CONTROLS: u32 = 1 << 15;
}

/// Partition privilege bits, high word (CPUID 0x40000003 EBX).
pub mod privilege_high {
    /// Root-partition only. Never offer.
    pub const CREATE_PARTITIONS: u32 = 1 << 0;
    /// Makes Linux call HvGetPartitionId (and BUG() if it fails). Never offer.
    pub const ACCESS_PARTITION_ID: u32 = 1 << 1;
    /// HvPostMessage.
    pub const POST_MESSAGES: u32 = 1 << 4;
    /// HvSignalEvent.
    pub const SIGNAL_EVENTS: u32 = 1 << 5;
    /// Makes Linux believe it is the root partition. Never offer.
    pub const CPU_MANAGEMENT: u32 = 1 << 12;
    /// Extended hypercalls (0x8001...). Never offer.
    pub const ENABLE_EXTENDED_HYPERCALLS: u32 = 1 << 20;
    /// Isolated (confidential) partition. Never offer.
    pub const ISOLATION: u32 = 1 << 22;
}

/// Miscellaneous feature bits (CPUID 0x40000003 EDX).
pub mod misc_features {
    /// XMM registers carry fast hypercall input. Not offered.
    pub const XMM_HYPERCALL_INPUT: u32 = 1 << 4;
    /// GUEST_IDLE MSR available.
    pub const GUEST_IDLE: u32 = 1 << 5;
    /// TSC_FREQUENCY/APIC_FREQUENCY MSRs available (with privilege bit 11).
    pub const FREQUENCY_MSRS: u32 = 1 << 8;
    /// Guest crash MSRs (P0..P4, CTL) available.
    pub const GUEST_CRASH_MSRS: u32 = 1 << 10;
    /// XMM registers carry fast hypercall output. Not offered.
    pub const XMM_HYPERCALL_OUTPUT: u32 = 1 << 15;
    /// Synthetic timers in direct mode. Not offered.
    pub const DIRECT_SYNTHETIC_TIMERS: u32 = 1 << 19;
}

/// Enlightenment hint bits (CPUID 0x40000004 EAX).
pub mod hints {
    /// Use hypercalls for remote TLB flushes.
    pub const REMOTE_TLB_FLUSH: u32 = 1 << 2;
    /// Use the EOI/ICR/TPR MSRs.
    pub const APIC_MSRS: u32 = 1 << 3;
    /// Deprecating AutoEOI: the guest EOIs SINT interrupts itself.
    pub const DEPRECATING_AEOI: u32 = 1 << 9;
    /// Use synthetic cluster IPI hypercalls.
    pub const CLUSTER_IPI: u32 = 1 << 10;
    /// Use extended processor masks.
    pub const EX_PROCESSOR_MASKS: u32 = 1 << 11;
    /// Nested hypervisor.
    pub const NESTED: u32 = 1 << 12;
}

// ------------------------------------------------------------------------------------------
// Synthetic MSRs
// ------------------------------------------------------------------------------------------

/// First synthetic MSR.
pub const MSR_RANGE_START: u32 = 0x4000_0000;
/// Last synthetic MSR that the host traps (inclusive).
pub const MSR_RANGE_END: u32 = 0x4000_01FF;

pub const MSR_GUEST_OS_ID: u32 = 0x4000_0000;
pub const MSR_HYPERCALL: u32 = 0x4000_0001;
pub const MSR_VP_INDEX: u32 = 0x4000_0002;
pub const MSR_RESET: u32 = 0x4000_0003;
pub const MSR_VP_RUNTIME: u32 = 0x4000_0010;
pub const MSR_TIME_REF_COUNT: u32 = 0x4000_0020;
pub const MSR_REFERENCE_TSC: u32 = 0x4000_0021;
pub const MSR_TSC_FREQUENCY: u32 = 0x4000_0022;
pub const MSR_APIC_FREQUENCY: u32 = 0x4000_0023;
pub const MSR_EOI: u32 = 0x4000_0070;
pub const MSR_ICR: u32 = 0x4000_0071;
pub const MSR_TPR: u32 = 0x4000_0072;
pub const MSR_VP_ASSIST_PAGE: u32 = 0x4000_0073;
pub const MSR_SCONTROL: u32 = 0x4000_0080;
pub const MSR_SVERSION: u32 = 0x4000_0081;
pub const MSR_SIEFP: u32 = 0x4000_0082;
pub const MSR_SIMP: u32 = 0x4000_0083;
pub const MSR_EOM: u32 = 0x4000_0084;
/// SINTn is `MSR_SINT0 + n`, n in 0..16.
pub const MSR_SINT0: u32 = 0x4000_0090;
pub const MSR_SINT15: u32 = 0x4000_009F;
pub const MSR_STIMER0_CONFIG: u32 = 0x4000_00B0;
pub const MSR_GUEST_IDLE: u32 = 0x4000_00F0;
/// CRASH_Pn is `MSR_CRASH_P0 + n`, n in 0..5.
pub const MSR_CRASH_P0: u32 = 0x4000_0100;
pub const MSR_CRASH_P1: u32 = 0x4000_0101;
pub const MSR_CRASH_P2: u32 = 0x4000_0102;
pub const MSR_CRASH_P3: u32 = 0x4000_0103;
pub const MSR_CRASH_P4: u32 = 0x4000_0104;
pub const MSR_CRASH_CTL: u32 = 0x4000_0105;
pub const MSR_REENLIGHTENMENT_CONTROL: u32 = 0x4000_0106;
pub const MSR_TSC_EMULATION_CONTROL: u32 = 0x4000_0107;
pub const MSR_TSC_EMULATION_STATUS: u32 = 0x4000_0108;
pub const MSR_TSC_INVARIANT_CONTROL: u32 = 0x4000_0118;

/// Number of synthetic interrupt sources per VP.
pub const SINT_COUNT: usize = 16;
/// Number of guest crash parameter MSRs (P0..P4).
pub const CRASH_PARAM_COUNT: usize = 5;

/// HYPERCALL MSR: bit 0 enables the hypercall page.
pub const HYPERCALL_ENABLE: u64 = 1 << 0;
/// HYPERCALL MSR: bit 1 locks the MSR against further writes.
pub const HYPERCALL_LOCKED: u64 = 1 << 1;

/// Enable bit of the overlay-page MSRs (REFERENCE_TSC, SIMP, SIEFP, VP_ASSIST_PAGE).
pub const OVERLAY_ENABLE: u64 = 1 << 0;
/// GPA bits of the overlay-page MSRs (GPFN in bits 12..63).
pub const OVERLAY_GPA_MASK: u64 = !(HV_PAGE_SIZE - 1);

/// SCONTROL bit 0: SynIC enable.
pub const SCONTROL_ENABLE: u64 = 1 << 0;
/// SVERSION value.
pub const SYNIC_VERSION: u64 = 1;

/// SINT register: vector in bits 0..7.
pub const SINT_VECTOR_MASK: u64 = 0xFF;
/// SINT register: bit 16 masked.
pub const SINT_MASKED: u64 = 1 << 16;
/// SINT register: bit 17 AutoEOI.
pub const SINT_AUTO_EOI: u64 = 1 << 17;
/// SINT register: bit 18 polling (no interrupts).
pub const SINT_POLLING: u64 = 1 << 18;
/// SINT register: bit 19 as-intercept.
pub const SINT_AS_INTERCEPT: u64 = 1 << 19;
/// SINT register: bit 20 proxy.
pub const SINT_PROXY: u64 = 1 << 20;
/// SINT register reset value: masked, vector 0.
pub const SINT_RESET: u64 = SINT_MASKED;
/// Lowest valid SINT vector; vectors 0..15 are architectural exceptions.
pub const SINT_MIN_VECTOR: u8 = 16;

/// CRASH_CTL bit 63: notify the host of a guest crash (P0..P4 hold the parameters).
pub const CRASH_CTL_NOTIFY: u64 = 1 << 63;
/// CRASH_CTL bit 62: P3 holds the GPA and P4 the size of a crash message.
pub const CRASH_CTL_NOTIFY_MSG: u64 = 1 << 62;

/// TSC_INVARIANT_CONTROL bit 0: expose invariant TSC.
pub const TSC_INVARIANT_EXPOSE: u64 = 1 << 0;

// ------------------------------------------------------------------------------------------
// Hypercalls
// ------------------------------------------------------------------------------------------

/// Hypercall call codes (control bits 0..15).
pub mod call {
    pub const FLUSH_VIRTUAL_ADDRESS_SPACE: u16 = 0x0002;
    pub const FLUSH_VIRTUAL_ADDRESS_LIST: u16 = 0x0003;
    pub const NOTIFY_LONG_SPIN_WAIT: u16 = 0x0008;
    pub const SEND_SYNTHETIC_CLUSTER_IPI: u16 = 0x000B;
    pub const FLUSH_VIRTUAL_ADDRESS_SPACE_EX: u16 = 0x0013;
    pub const FLUSH_VIRTUAL_ADDRESS_LIST_EX: u16 = 0x0014;
    pub const SEND_SYNTHETIC_CLUSTER_IPI_EX: u16 = 0x0015;
    pub const GET_PARTITION_ID: u16 = 0x0046;
    pub const GET_VP_REGISTERS: u16 = 0x0050;
    pub const SET_VP_REGISTERS: u16 = 0x0051;
    pub const POST_MESSAGE: u16 = 0x005C;
    pub const SIGNAL_EVENT: u16 = 0x005D;
    pub const EXT_QUERY_CAPABILITIES: u16 = 0x8001;
}

/// A hypercall status (RAX bits 0..15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct HvStatus(pub u16);

impl HvStatus {
    pub const SUCCESS: Self = Self(0x0000);
    pub const INVALID_HYPERCALL_CODE: Self = Self(0x0002);
    pub const INVALID_HYPERCALL_INPUT: Self = Self(0x0003);
    pub const INVALID_ALIGNMENT: Self = Self(0x0004);
    pub const INVALID_PARAMETER: Self = Self(0x0005);
    pub const ACCESS_DENIED: Self = Self(0x0006);
    pub const INVALID_PARTITION_STATE: Self = Self(0x0007);
    pub const OPERATION_DENIED: Self = Self(0x0008);
    pub const INSUFFICIENT_MEMORY: Self = Self(0x000B);
    pub const INVALID_PARTITION_ID: Self = Self(0x000D);
    pub const INVALID_VP_INDEX: Self = Self(0x000E);
    pub const NOT_FOUND: Self = Self(0x0010);
    pub const INVALID_PORT_ID: Self = Self(0x0011);
    pub const INVALID_CONNECTION_ID: Self = Self(0x0012);
    pub const INSUFFICIENT_BUFFERS: Self = Self(0x0013);
    pub const NOT_ACKNOWLEDGED: Self = Self(0x0014);
    pub const INVALID_VP_STATE: Self = Self(0x0015);
    pub const ACKNOWLEDGED: Self = Self(0x0016);
    pub const INVALID_SYNIC_STATE: Self = Self(0x0018);
    pub const OBJECT_IN_USE: Self = Self(0x0019);
    pub const NO_DATA: Self = Self(0x001B);
    pub const INACTIVE: Self = Self(0x001C);
    pub const NO_RESOURCES: Self = Self(0x001D);
    pub const FEATURE_UNAVAILABLE: Self = Self(0x001E);

    /// Whether this is `SUCCESS`.
    pub const fn is_success(self) -> bool {
        self.0 == 0
    }
}

/// Hypercall control word (RCX) field layout.
pub mod control {
    /// Bits 0..15: call code.
    pub const CODE_MASK: u64 = 0xFFFF;
    /// Bit 16: fast (register-based) calling convention.
    pub const FAST: u64 = 1 << 16;
    /// Bits 17..26: variable header size, in 8-byte units.
    pub const VARIABLE_HEADER_SHIFT: u32 = 17;
    pub const VARIABLE_HEADER_MASK: u64 = 0x3FF;
    /// Bits 27..30: reserved (must be zero).
    pub const RESERVED_27_30: u64 = 0xF << 27;
    /// Bit 31: nested (the call is for the L0 hypervisor).
    pub const NESTED: u64 = 1 << 31;
    /// Bits 32..43: rep count.
    pub const REP_COUNT_SHIFT: u32 = 32;
    pub const REP_MASK: u64 = 0xFFF;
    /// Bits 44..47: reserved (must be zero).
    pub const RESERVED_44_47: u64 = 0xF << 44;
    /// Bits 48..59: rep start index.
    pub const REP_START_SHIFT: u32 = 48;
    /// Bits 60..63: reserved (must be zero).
    pub const RESERVED_60_63: u64 = 0xF << 60;
    /// All bits that must be zero (including `NESTED`, which a non-nested hypervisor rejects).
    pub const RESERVED: u64 = RESERVED_27_30 | NESTED | RESERVED_44_47 | RESERVED_60_63;
}

/// A decoded hypercall control word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypercallControl(pub u64);

impl HypercallControl {
    pub const fn code(self) -> u16 {
        (self.0 & control::CODE_MASK) as u16
    }
    pub const fn fast(self) -> bool {
        self.0 & control::FAST != 0
    }
    /// Variable header size in 8-byte units.
    pub const fn variable_header_size(self) -> u16 {
        ((self.0 >> control::VARIABLE_HEADER_SHIFT) & control::VARIABLE_HEADER_MASK) as u16
    }
    pub const fn rep_count(self) -> u16 {
        ((self.0 >> control::REP_COUNT_SHIFT) & control::REP_MASK) as u16
    }
    pub const fn rep_start(self) -> u16 {
        ((self.0 >> control::REP_START_SHIFT) & control::REP_MASK) as u16
    }
    pub const fn reserved_bits(self) -> u64 {
        self.0 & control::RESERVED
    }
}

/// Hypercall result value (RAX): status in bits 0..15, reps completed in bits 32..43.
pub const fn hypercall_result(status: HvStatus, reps_completed: u16) -> u64 {
    status.0 as u64 | (((reps_completed as u64) & control::REP_MASK) << 32)
}

/// Partition ID meaning "the caller's partition".
pub const HV_PARTITION_ID_SELF: u64 = u64::MAX;
/// VP index meaning "the calling VP".
pub const HV_VP_INDEX_SELF: u32 = 0xFFFF_FFFE;

/// Register name: VSM VP status (the active VTL and enabled VTLs).
pub const HV_REGISTER_VSM_VP_STATUS: u32 = 0x000D_0003;

/// Maximum payload of a SynIC message and of HvPostMessage.
pub const HV_MESSAGE_PAYLOAD_SIZE: usize = 240;
/// Size of a SynIC message.
pub const HV_MESSAGE_SIZE: usize = 256;

/// HvPostMessage input (256 bytes, slow call).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HvPostMessageInput {
    /// Connection ID in bits 0..23; bits 24..31 reserved.
    pub connection_id: u32,
    pub reserved: u32,
    /// Message type, 1..=0x7FFFFFFF (types with bit 31 set belong to the hypervisor).
    pub message_type: u32,
    /// Bytes of `payload` in use, at most 240.
    pub payload_size: u32,
    pub payload: [u8; HV_MESSAGE_PAYLOAD_SIZE],
}
const _: () = assert!(size_of::<HvPostMessageInput>() == 256);

/// HvPostMessage connection ID bits.
pub const HV_CONNECTION_ID_MASK: u32 = 0x00FF_FFFF;
/// Highest message type a guest may post (types with bit 31 set are the hypervisor's).
pub const HV_MESSAGE_TYPE_MAX_GUEST: u32 = 0x7FFF_FFFF;

/// HvSignalEvent input: 8 bytes at the input GPA (slow) or in RDX (fast).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HvSignalEventInput {
    /// Connection ID in bits 0..23; bits 24..31 reserved.
    pub connection_id: u32,
    pub flag_number: u16,
    pub reserved: u16,
}
const _: () = assert!(size_of::<HvSignalEventInput>() == 8);

/// HvGetVpRegisters input header (followed by `rep_count` u32 register names).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HvGetVpRegistersInput {
    pub partition_id: u64,
    pub vp_index: u32,
    pub input_vtl: u8,
    pub reserved: [u8; 3],
}
const _: () = assert!(size_of::<HvGetVpRegistersInput>() == 16);

/// One HvGetVpRegisters output element: a 128-bit register value.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HvRegisterValue {
    pub low: u64,
    pub high: u64,
}
const _: () = assert!(size_of::<HvRegisterValue>() == 16);

// ------------------------------------------------------------------------------------------
// SynIC
// ------------------------------------------------------------------------------------------

/// Message type of an empty slot.
pub const HVMSG_NONE: u32 = 0;
/// Message type of a synthetic timer expiry.
pub const HVMSG_TIMER_EXPIRED: u32 = 0x8000_0010;
/// Message flags bit 0: more messages are pending; the guest must write EOM after freeing
/// the slot.
pub const HV_MESSAGE_FLAG_PENDING: u8 = 1 << 0;

/// SynIC message header (16 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct HvMessageHeader {
    /// 0 = slot empty. The host stores it last; the guest clears it to free the slot.
    pub message_type: u32,
    pub payload_size: u8,
    /// Bit 0 = msg_pending.
    pub flags: u8,
    pub reserved: u16,
    /// Sender or port ID (Linux ignores it).
    pub sender: u64,
}
const _: () = assert!(size_of::<HvMessageHeader>() == 16);

/// Byte offset of the flags byte in a message slot.
pub const HV_MESSAGE_FLAGS_OFFSET: usize = 5;

/// One SynIC message slot (256 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HvMessage {
    pub header: HvMessageHeader,
    pub payload: [u8; HV_MESSAGE_PAYLOAD_SIZE],
}
const _: () = assert!(size_of::<HvMessage>() == HV_MESSAGE_SIZE);

/// The SynIC message page (SIMP): one slot per SINT.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HvMessagePage {
    pub slots: [HvMessage; SINT_COUNT],
}
const _: () = assert!(size_of::<HvMessagePage>() == HV_PAGE_SIZE as usize);

/// Bytes of event flags per SINT in the SIEF page.
pub const HV_EVENT_FLAGS_BYTES: usize = 256;
/// Event flags per SINT (2048 bits).
pub const HV_EVENT_FLAGS_COUNT: u32 = (HV_EVENT_FLAGS_BYTES * 8) as u32;

/// Event flags of one SINT: bit n is bit `n % 64` of little-endian word `n / 64`.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HvEventFlags {
    pub words: [u64; HV_EVENT_FLAGS_BYTES / 8],
}
const _: () = assert!(size_of::<HvEventFlags>() == HV_EVENT_FLAGS_BYTES);

/// The SynIC event flags page (SIEFP): one 256-byte region per SINT.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HvEventFlagsPage {
    pub sints: [HvEventFlags; SINT_COUNT],
}
const _: () = assert!(size_of::<HvEventFlagsPage>() == HV_PAGE_SIZE as usize);

// ------------------------------------------------------------------------------------------
// Reference TSC page
// ------------------------------------------------------------------------------------------

/// Reference TSC page. Reference time (100 ns units) =
/// `((tsc as u128 * tsc_scale as u128) >> 64) as u64 + tsc_offset`.
/// A `tsc_sequence` of 0 means "invalid; use the TIME_REF_COUNT MSR".
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct HvReferenceTscPage {
    pub tsc_sequence: u32,
    pub reserved1: u32,
    pub tsc_scale: u64,
    pub tsc_offset: i64,
    pub reserved2: [u64; 509],
}
const _: () = assert!(size_of::<HvReferenceTscPage>() == HV_PAGE_SIZE as usize);

/// Size of the meaningful header of the reference TSC page.
pub const HV_REFERENCE_TSC_HEADER_SIZE: usize = 24;

/// Reference time ticks per second (100 ns units).
pub const HV_REFERENCE_TIME_HZ: u64 = 10_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_tlfs_words() {
        assert_eq!(CPUID_HV_VENDOR_EBX, 0x7263_694D);
        assert_eq!(CPUID_HV_VENDOR_ECX, 0x666F_736F);
        assert_eq!(CPUID_HV_VENDOR_EDX, 0x7648_2074);
        assert_eq!(CPUID_HV_INTERFACE_SIGNATURE, 0x3123_7648);
    }

    #[test]
    fn control_word_fields() {
        let c = HypercallControl(0x0ABC_0123_0001_005D | (3 << 17));
        assert_eq!(c.code(), 0x5D);
        assert!(c.fast());
        assert_eq!(c.variable_header_size(), 3);
        assert_eq!(c.rep_count(), 0x123);
        assert_eq!(c.rep_start(), 0xABC);
        assert_eq!(c.reserved_bits(), 0);
        assert_ne!(HypercallControl(1 << 31).reserved_bits(), 0);
        assert_ne!(HypercallControl(1 << 63).reserved_bits(), 0);
        assert_eq!(
            hypercall_result(HvStatus::INVALID_PARAMETER, 7),
            0x7_0000_0005
        );
    }
}
