//! The Hyper-V "hypervisor" that a guest sees, as pure state machines: the CPUID leaves, the
//! synthetic MSRs, the hypercall page and hypercall dispatch, and SynIC message and event
//! delivery. Nothing here touches KVM; the vCPU loop drives it:
//!
//! * user-space MSR exits for 0x40000000..=0x400001FF go to [`Partition::msr_read`] and
//!   [`Partition::msr_write`];
//! * a 1-byte `OUT` to [`HYPERCALL_PORT`] (issued by the hypercall page) goes to
//!   [`Partition::hypercall`] with RCX/RDX/R8, and the returned value goes into RAX;
//! * a 4-byte `OUT` to [`HYPERCALL_PORT`] is a fast HvSignalEvent whose data is the connection
//!   id (see [`HYPERCALL_CODE`]); the VMM lets KVM ring the channel's doorbell for it;
//! * every [`Interrupt`] returned is injected as a fixed, edge-triggered interrupt with that
//!   vector on that VP (for example with `KVM_SIGNAL_MSI`).
//!
//! [`Partition`] is `Send + Sync` and meant to be shared behind an `Arc`. Partition-wide MSRs
//! sit behind one mutex that only cold paths take; each VP's SynIC sits behind its own mutex,
//! taken by that vCPU's thread and by whoever posts messages or signals events to it.
//!
//! Guest input is hostile: every malformed MSR value or hypercall input gets the #GP or
//! hypercall status that Hyper-V defines, and never a panic or an unbounded allocation.
#![forbid(unsafe_code)]

pub mod cpuid;
mod hypercall;
mod msr;
mod save;
mod synic;
pub mod time;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use guestmem::GuestMemory;
use hvdef::hv::{self, HV_MESSAGE_PAYLOAD_SIZE};

pub use cpuid::{hv_leaves, patch_supported_cpuid, CpuidConfig, CpuidEntry};
pub use hvdef::hv::HvStatus;
pub use hypercall::{
    HypercallAction, HypercallOutcome, HypercallRegs, PostMessageRequest, SignalEventRequest,
};
pub use msr::{CrashReport, MsrAction, MsrError, CRASH_MESSAGE_MAX};
pub use save::{RestoreError, SavedMessage, SavedState, SavedVp};
pub use synic::{Delivery, EventDelivery, SynicError, MESSAGE_QUEUE_DEPTH};
pub use time::{ManualTime, TimeSource};

/// The I/O port that the hypercall page's `OUT imm8` writes to.
///
/// Ports 0x50..=0x5F have no assignment on the PC/AT, PIIX or ICH chipsets (0x40..0x43 is the
/// PIT, 0x60/0x64 the keyboard controller, 0x70/0x71 the RTC, 0x80 the POST/delay port,
/// 0x92 fast A20, 0xB2 the SMI command port, 0xE9 the Bochs/QEMU debug console). Linux never
/// touches 0x57. Only the hypercall page uses it; the VMM must route it nowhere else.
pub const HYPERCALL_PORT: u8 = 0x57;

/// The control word (RCX) of the call the hypercall page signals without a user-space exit:
/// HvSignalEvent (0x005D) with the fast bit (16), no reps, no variable header.
pub const FAST_SIGNAL_EVENT_CONTROL: u32 = 0x0001_005D;

/// Offset in [`HYPERCALL_CODE`] of `out HYPERCALL_PORT, eax`, the 4-byte write whose data is
/// the connection id of a fast HvSignalEvent with flag number 0.
pub const FAST_SIGNAL_OUT_OFFSET: usize = 24;

/// Length of that `out imm8, eax`.
pub const FAST_SIGNAL_OUT_LEN: usize = 2;

/// Offset in [`HYPERCALL_CODE`] of the `ret` behind `xor eax, eax`: where the host resumes the
/// guest when it completes a fast signal in user space, so the guest returns the status the
/// host put in RAX.
pub const FAST_SIGNAL_RESUME_OFFSET: usize = 28;

/// Offset in [`HYPERCALL_CODE`] of the general path, `out HYPERCALL_PORT, al; ret`.
pub const GENERAL_OUT_OFFSET: usize = 29;

/// The code written at the start of the hypercall page (the rest is `int3`):
///
/// ```text
///  0  f3 0f 1e fa            endbr64               keeps IBT-enabled kernels from disabling IBT
///  4  48 81 f9 5d 00 01 00   cmp rcx, 0x1005d      fast HvSignalEvent?
/// 11  75 10                  jne 29
/// 13  48 89 d0               mov rax, rdx
/// 16  48 c1 e8 20            shr rax, 32           flag number and reserved bits zero?
/// 20  75 07                  jne 29
/// 22  89 d0                  mov eax, edx          the connection id
/// 24  e7 57                  out 0x57, eax         KVM ioeventfd (datamatch = connection id)
/// 26  31 c0                  xor eax, eax          HV_STATUS_SUCCESS
/// 28  c3                     ret
/// 29  e6 57                  out 0x57, al          every other call: a user-space exit
/// 31  c3                     ret
/// ```
///
/// The 4-byte `OUT` at 24 is what a channel's ioeventfd matches (port, length 4, connection
/// id), so a guest-to-host VMBus signal rings the channel's doorbell inside KVM. Where no
/// ioeventfd matches, the write exits to user space, which signals through the port table,
/// puts the status in RAX and resumes at 28 ([`FAST_SIGNAL_RESUME_OFFSET`]). The 1-byte `OUT` at 29 is
/// the general hypercall exit: the host reads RCX/RDX/R8 and writes RAX. Both are `OUT`s (not
/// `IN`s) so that completing the exit does not overwrite RAX. Only RAX and the flags change,
/// which every hypercall clobbers anyway.
pub const HYPERCALL_CODE: [u8; 32] = [
    0xF3,
    0x0F,
    0x1E,
    0xFA, // endbr64
    0x48,
    0x81,
    0xF9,
    0x5D,
    0x00,
    0x01,
    0x00, // cmp rcx, FAST_SIGNAL_EVENT_CONTROL
    0x75,
    0x10, // jne GENERAL_OUT_OFFSET
    0x48,
    0x89,
    0xD0, // mov rax, rdx
    0x48,
    0xC1,
    0xE8,
    0x20, // shr rax, 32
    0x75,
    0x07, // jne GENERAL_OUT_OFFSET
    0x89,
    0xD0, // mov eax, edx
    0xE7,
    HYPERCALL_PORT, // out HYPERCALL_PORT, eax
    0x31,
    0xC0, // xor eax, eax
    0xC3, // ret
    0xE6,
    HYPERCALL_PORT, // out HYPERCALL_PORT, al
    0xC3,           // ret
];

/// LAPIC timer frequency reported by APIC_FREQUENCY: KVM's default APIC bus cycle is 1 ns.
pub const APIC_FREQUENCY_HZ: u64 = 1_000_000_000;

/// Largest partition we accept.
pub const MAX_VPS: u32 = 1024;

/// A fixed interrupt to inject: `vector` on the VP with index `vp`. The KVM layer maps the VP
/// index to an APIC ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interrupt {
    pub vp: u32,
    pub vector: u8,
}

/// A SynIC message payload: up to 240 bytes, stored inline (no allocation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MessagePayload {
    len: u8,
    data: [u8; HV_MESSAGE_PAYLOAD_SIZE],
}

impl MessagePayload {
    /// `None` if `bytes` is longer than 240.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > HV_MESSAGE_PAYLOAD_SIZE {
            return None;
        }
        let mut data = [0; HV_MESSAGE_PAYLOAD_SIZE];
        data[..bytes.len()].copy_from_slice(bytes);
        Some(Self {
            len: bytes.len() as u8,
            data,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.data[..self.len as usize]
    }
}

impl std::fmt::Debug for MessagePayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessagePayload({:02x?})", self.as_slice())
    }
}

/// Partition configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionConfig {
    /// Number of VPs; VP indexes are 0..vp_count.
    pub vp_count: u32,
    /// Whether the CPUID offers TSC_INVARIANT_CONTROL (see [`cpuid::CpuidConfig`]).
    pub invariant_tsc: bool,
    /// Whether the CPUID offers the APIC assist (see [`cpuid::CpuidConfig`]). With it, enabling
    /// a VP assist page asks the caller to turn on lazy EOI ([`MsrAction::LazyEoi`]).
    pub apic_assist: bool,
}

impl PartitionConfig {
    /// The matching CPUID configuration.
    pub fn cpuid(&self) -> CpuidConfig {
        CpuidConfig {
            vp_count: self.vp_count,
            invariant_tsc: self.invariant_tsc,
            apic_assist: self.apic_assist,
        }
    }
}

/// Errors creating a [`Partition`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vp_count {0} is not in 1..={MAX_VPS}")]
    VpCount(u32),
    #[error("TSC frequency {0} Hz is below 10 MHz; the reference TSC scale would overflow")]
    TscFrequency(u64),
}

/// Partition-wide MSR state.
#[derive(Debug, Default)]
struct PartitionState {
    guest_os_id: u64,
    hypercall: u64,
    reference_tsc: u64,
    tsc_sequence: u32,
    tsc_invariant_control: u64,
    crash: [u64; hv::CRASH_PARAM_COUNT],
}

/// The Hyper-V state of one partition. Share it behind an `Arc`; every method takes `&self`.
pub struct Partition {
    config: PartitionConfig,
    mem: GuestMemory,
    time: Arc<dyn TimeSource>,
    tsc_hz: u64,
    tsc_scale: u64,
    state: Mutex<PartitionState>,
    /// Mirror of HYPERCALL bit 0, so that hypercalls do not take the partition lock. Only
    /// written with `state` locked.
    hypercalls_enabled: AtomicBool,
    vps: Box<[Mutex<synic::VpState>]>,
    log_limit: support::RateLimit,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("config", &self.config)
            .field("tsc_hz", &self.tsc_hz)
            .field("state", &*lock(&self.state))
            .finish_non_exhaustive()
    }
}

impl Partition {
    /// Creates the partition state with every MSR at its reset value.
    pub fn new(
        config: PartitionConfig,
        mem: GuestMemory,
        time: Arc<dyn TimeSource>,
    ) -> Result<Self, Error> {
        if config.vp_count == 0 || config.vp_count > MAX_VPS {
            return Err(Error::VpCount(config.vp_count));
        }
        let tsc_hz = time.tsc_frequency();
        let tsc_scale = time::reference_tsc_scale(tsc_hz).ok_or(Error::TscFrequency(tsc_hz))?;
        let vps = (0..config.vp_count)
            .map(|_| Mutex::new(synic::VpState::new()))
            .collect();
        Ok(Self {
            config,
            mem,
            time,
            tsc_hz,
            tsc_scale,
            state: Mutex::new(PartitionState::default()),
            hypercalls_enabled: AtomicBool::new(false),
            vps,
            log_limit: support::RateLimit::guest(),
        })
    }

    pub fn config(&self) -> &PartitionConfig {
        &self.config
    }

    /// Resets every MSR and the SynIC of every VP to the reset values and drops queued
    /// messages (guest reboot). Guest memory is not touched.
    pub fn reset(&self) {
        let mut s = lock(&self.state);
        *s = PartitionState::default();
        self.sync_hypercall_flag(&s);
        drop(s);
        for vp in self.vps.iter() {
            *lock(vp) = synic::VpState::new();
        }
    }

    /// Partition reference time in 100 ns units, as TIME_REF_COUNT and the TSC page report it.
    pub fn reference_time(&self) -> u64 {
        time::reference_time(self.time.guest_tsc(), self.tsc_scale, 0)
    }

    /// Whether the guest has enabled the hypercall page.
    pub fn hypercalls_enabled(&self) -> bool {
        self.hypercalls_enabled.load(Ordering::Acquire)
    }

    /// Updates the lock-free mirror of the hypercall enable bit; call with `state` locked.
    fn sync_hypercall_flag(&self, s: &PartitionState) {
        self.hypercalls_enabled
            .store(s.hypercall & hv::HYPERCALL_ENABLE != 0, Ordering::Release);
    }

    /// The value of GUEST_OS_ID.
    pub fn guest_os_id(&self) -> u64 {
        lock(&self.state).guest_os_id
    }

    fn vp(&self, vp: u32) -> Option<MutexGuard<'_, synic::VpState>> {
        self.vps.get(vp as usize).map(lock)
    }
}

use support::lock;

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub const RAM: u64 = 0x10_0000;
    pub const TSC_HZ: u64 = 2_000_000_000;

    pub fn partition(vp_count: u32) -> (Arc<Partition>, GuestMemory, Arc<ManualTime>) {
        let mem = GuestMemory::new(&[(0, RAM)]).unwrap();
        let time = Arc::new(ManualTime::new(TSC_HZ));
        let p = Partition::new(
            PartitionConfig {
                vp_count,
                invariant_tsc: true,
                apic_assist: false,
            },
            mem.clone(),
            time.clone(),
        )
        .unwrap();
        (Arc::new(p), mem, time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_config() {
        let mem = GuestMemory::new(&[(0, 0x1000)]).unwrap();
        let t = Arc::new(ManualTime::new(1_000_000_000));
        let cfg = |vp_count| PartitionConfig {
            vp_count,
            invariant_tsc: false,
            apic_assist: false,
        };
        assert!(matches!(
            Partition::new(cfg(0), mem.clone(), t.clone()),
            Err(Error::VpCount(0))
        ));
        assert!(Partition::new(cfg(MAX_VPS + 1), mem.clone(), t.clone()).is_err());
        assert!(matches!(
            Partition::new(cfg(1), mem.clone(), Arc::new(ManualTime::new(1000))),
            Err(Error::TscFrequency(1000))
        ));
        assert!(Partition::new(cfg(MAX_VPS), mem, t).is_ok());
    }

    #[test]
    fn payload_bounds() {
        assert!(MessagePayload::new(&[0; 241]).is_none());
        let p = MessagePayload::new(&[7; 240]).unwrap();
        assert_eq!(p.as_slice().len(), 240);
        assert_eq!(MessagePayload::new(&[]).unwrap().as_slice(), &[] as &[u8]);
    }

    /// The documented layout of the hypercall page: each instruction's bytes, the jump targets
    /// computed from their displacements, and the offsets the VMM relies on.
    #[test]
    fn hypercall_code_layout() {
        let code = HYPERCALL_CODE;
        let port = HYPERCALL_PORT;
        assert_eq!(&code[0..4], &[0xF3, 0x0F, 0x1E, 0xFA], "endbr64 first");
        assert_eq!(&code[4..7], &[0x48, 0x81, 0xF9], "cmp rcx, imm32");
        let imm = u32::from_le_bytes(code[7..11].try_into().unwrap());
        assert_eq!(imm, FAST_SIGNAL_EVENT_CONTROL);
        assert_eq!(
            u64::from(imm),
            u64::from(hvdef::hv::call::SIGNAL_EVENT) | hvdef::hv::control::FAST
        );
        assert!(
            imm < 0x8000_0000,
            "the sign-extended immediate equals the control word"
        );
        // A short jump at `at` lands at at + 2 + rel8.
        let target = |at: usize| {
            assert_eq!(code[at], 0x75, "jne rel8 at {at}");
            (at as isize + 2 + code[at + 1] as i8 as isize) as usize
        };
        assert_eq!(target(11), GENERAL_OUT_OFFSET);
        assert_eq!(&code[13..16], &[0x48, 0x89, 0xD0], "mov rax, rdx");
        assert_eq!(&code[16..20], &[0x48, 0xC1, 0xE8, 0x20], "shr rax, 32");
        assert_eq!(target(20), GENERAL_OUT_OFFSET);
        assert_eq!(&code[22..24], &[0x89, 0xD0], "mov eax, edx");
        let out = FAST_SIGNAL_OUT_OFFSET;
        let after = out + FAST_SIGNAL_OUT_LEN;
        assert_eq!(&code[out..after], &[0xE7, port], "out imm8, eax");
        assert_eq!(&code[after..after + 2], &[0x31, 0xC0], "xor eax, eax");
        assert_eq!(after + 2, FAST_SIGNAL_RESUME_OFFSET, "right behind the xor");
        assert_eq!(
            code[FAST_SIGNAL_RESUME_OFFSET], 0xC3,
            "the host resumes at a ret"
        );
        assert_eq!(FAST_SIGNAL_RESUME_OFFSET + 1, GENERAL_OUT_OFFSET);
        let general = GENERAL_OUT_OFFSET;
        assert_eq!(&code[general..], &[0xE6, port, 0xC3], "out imm8, al; ret");
    }

    #[test]
    fn partition_is_shareable() {
        fn check<T: Send + Sync>() {}
        check::<Partition>();
    }
}
