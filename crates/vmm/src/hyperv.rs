//! Wiring of the Hyper-V enlightenments (`hv1`) into the KVM vCPUs: CPUID, the synthetic MSR
//! trap, the hypercall port, interrupt injection, and the VMBus device in the DSDT.

use crate::synic::inject;
use acpi_tables::{aml, Aml};
use kvm::kvm_bindings::{kvm_cpuid_entry2, kvm_regs, CpuId};
use kvm::kvm_ioctls::{SyncReg, VcpuFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The guest TSC, derived from the host's monotonic clock. The vCPUs' TSCs are set to 0 when
/// the VM is built and run at `tsc_hz`, so this matches them to within the build time; the guest
/// reads its clock from the TSC page (exact), and TIME_REF_COUNT only as a fallback.
pub struct KvmTime {
    start: Instant,
    tsc_hz: u64,
    /// Added to the ticks since `start`: a restored VM's TSCs continue from their saved value.
    offset: AtomicU64,
}

impl KvmTime {
    pub fn new(tsc_hz: u64) -> Self {
        Self {
            start: Instant::now(),
            tsc_hz,
            offset: AtomicU64::new(0),
        }
    }

    fn ticks(&self) -> u64 {
        let ns = self.start.elapsed().as_nanos();
        (ns * u128::from(self.tsc_hz) / 1_000_000_000) as u64
    }

    /// Makes the guest TSC read `tsc` now (the vCPUs' TSCs were set to it on restore).
    pub fn set_guest_tsc(&self, tsc: u64) {
        self.offset
            .store(tsc.wrapping_sub(self.ticks()), Ordering::Relaxed);
    }
}

impl hv1::TimeSource for KvmTime {
    fn guest_tsc(&self) -> u64 {
        self.ticks()
            .wrapping_add(self.offset.load(Ordering::Relaxed))
    }

    fn tsc_frequency(&self) -> u64 {
        self.tsc_hz
    }
}

/// KVM's supported CPUID with the KVM signature replaced by the Hyper-V leaves.
pub fn patch_cpuid(base: &CpuId, config: &hv1::CpuidConfig) -> CpuId {
    let mut entries: Vec<hv1::CpuidEntry> = base
        .as_slice()
        .iter()
        .map(|e| hv1::CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect();
    hv1::patch_supported_cpuid(&mut entries, config);
    let kvm_entries: Vec<kvm_cpuid_entry2> = entries
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    CpuId::from_entries(&kvm_entries).expect("patched CPUID fits KVM_MAX_CPUID_ENTRIES")
}

/// The DSDT devices for VMBus: `\_SB.VMOD` (ACPI0004 module device) holding `VMBS` with
/// `_HID "VMBus"` and an empty `_CRS`, which is what hv_vmbus probes for on x86.
pub struct VmbusAcpi;

impl Aml for VmbusAcpi {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let empty = aml::ResourceTemplate::new(vec![]);
        let hid = aml::Name::new("_HID".into(), &"VMBus");
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let ddn = aml::Name::new("_DDN".into(), &"VMBUS");
        let crs = aml::Name::new("_CRS".into(), &empty);
        let vmbus = aml::Device::new("VMBS".into(), vec![&hid, &uid, &ddn, &crs]);
        let module_hid = aml::Name::new("_HID".into(), &"ACPI0004");
        aml::Device::new("VMOD".into(), vec![&module_hid, &uid, &crs, &vmbus]).to_aml_bytes(sink);
    }
}

/// Logs a guest crash report (the best diagnostic of a dead guest).
pub fn log_crash(report: &hv1::CrashReport) {
    // A guest can write the crash MSRs as often as it likes; the first reports are the ones
    // that matter.
    static LOG: support::RateLimit = support::RateLimit::new(std::time::Duration::from_secs(60), 3);
    if !LOG.allow() {
        return;
    }
    tracing::error!(
        "guest crash reported through the Hyper-V crash MSRs: P0..P4 = {:#x?}",
        report.params
    );
    if let Some(msg) = &report.message {
        for line in msg.lines() {
            eprintln!("guest panic: {line}");
        }
    }
}

/// Shared handle to the enlightenment state, as the vCPU threads use it.
pub type Hv = Arc<hv1::Partition>;

/// A trapped MSR write the guest gets #GP for.
#[derive(Debug, Clone, Copy)]
pub struct MsrGp;

/// Lazy EOI to turn on at `page` (the VP assist page) or off, on VP `vp`'s vCPU.
#[derive(Debug, Clone, Copy)]
pub struct PvEoi {
    vp: u32,
    page: Option<u64>,
}

impl PvEoi {
    /// Points the in-kernel LAPIC's paravirtual EOI at the page. If KVM refuses, the guest
    /// still works: it finds apic_assist clear and writes the EOI MSR, which KVM serves.
    pub fn apply(self, vcpu: &VcpuFd) {
        // The guest may rewrite its VP assist page as often as it likes.
        static LOG: support::RateLimit = support::RateLimit::guest();
        if let Err(e) = kvm::set_pv_eoi(vcpu, self.page) {
            support::limited!(LOG, warn, "lazy EOI not enabled on VP {}: {e}", self.vp);
        }
    }
}

/// The Hyper-V side of a vCPU's exits: synthetic MSRs and hypercalls, with VMBus behind them.
#[derive(Clone)]
pub struct HvExits {
    hv: Hv,
    partition: Arc<kvm::Partition>,
    vmbus: vmbus::VmbusHost,
    sync_regs: bool,
}

impl HvExits {
    pub fn new(hv: Hv, partition: Arc<kvm::Partition>, vmbus: vmbus::VmbusHost) -> Self {
        let sync_regs = partition
            .kvm()
            .check_extension(kvm::kvm_ioctls::Cap::SyncRegs);
        Self {
            hv,
            partition,
            vmbus,
            sync_regs,
        }
    }

    /// The KVM partition.
    pub fn partition(&self) -> &kvm::Partition {
        &self.partition
    }

    /// The enlightenment state.
    pub fn hv(&self) -> &hv1::Partition {
        &self.hv
    }

    /// The VMBus host.
    pub fn vmbus(&self) -> &vmbus::VmbusHost {
        &self.vmbus
    }

    /// RDMSR of a trapped MSR; `None` means inject #GP.
    pub fn rdmsr(&self, vp: u32, msr: u32) -> Option<u64> {
        self.hv.msr_read(vp, msr).ok()
    }

    /// WRMSR of a trapped MSR on VP `vp`; `Err` means inject #GP. What it returns must be
    /// applied to the vCPU once the exit is done with (it needs the vCPU's fd).
    pub fn wrmsr(&self, vp: u32, msr: u32, value: u64) -> Result<Option<PvEoi>, MsrGp> {
        match self.hv.msr_write(vp, msr, value) {
            Ok(None) => Ok(None),
            Ok(Some(hv1::MsrAction::Interrupts(list))) => {
                inject(&self.partition, &list);
                Ok(None)
            }
            Ok(Some(hv1::MsrAction::GuestCrash(report))) => {
                log_crash(&report);
                Ok(None)
            }
            Ok(Some(hv1::MsrAction::LazyEoi(page))) => Ok(Some(PvEoi { vp, page })),
            Err(_) => Err(MsrGp),
        }
    }

    /// Makes KVM hand over the registers in `kvm_run` at every exit (KVM_CAP_SYNC_REGS), so
    /// a hypercall costs no GET/SET_REGS ioctls. Without the capability, hypercalls use them.
    pub fn prepare_vcpu(&self, vcpu: &mut VcpuFd) {
        if self.sync_regs {
            vcpu.set_sync_valid_reg(SyncReg::Register);
            vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        }
    }

    /// The 1-byte `OUT` to [`hv1::HYPERCALL_PORT`]: dispatches the hypercall and writes the
    /// result to RAX. RIP is left alone, so KVM steps past the OUT. Calls from CPL > 0 get
    /// ACCESS_DENIED (user mode may not call the hypervisor).
    pub fn hypercall(&self, vcpu: &mut VcpuFd, vp: u32) -> Result<(), kvm::kvm_ioctls::Error> {
        let (mut regs, cpl) = self.regs(vcpu)?;
        let rax = if cpl != 0 {
            hvdef::hv::hypercall_result(hv1::HvStatus::ACCESS_DENIED, 0)
        } else {
            let call = hv1::HypercallRegs {
                rcx: regs.rcx,
                rdx: regs.rdx,
                r8: regs.r8,
            };
            // None: hypercalls are disabled, so this was an ordinary write to an unused port.
            let Some(outcome) = self.hv.hypercall(vp, call) else {
                return Ok(());
            };
            self.complete(outcome)
        };
        regs.rax = rax;
        self.set_regs(vcpu, &regs)
    }

    /// The 4-byte `OUT` of `connection_id` to [`hv1::HYPERCALL_PORT`] at
    /// [`hv1::FAST_SIGNAL_OUT_OFFSET`] of the hypercall page: a fast HvSignalEvent (flag 0) that
    /// no ioeventfd took (unknown id, closed channel, or KVM without ioeventfds). Signals it as
    /// the 1-byte path would, puts the status in RAX and resumes the guest at
    /// [`hv1::FAST_SIGNAL_RESUME_OFFSET`], past the `xor eax, eax`, so the guest returns that
    /// status. KVM reports RIP at the OUT when it exits from its fast port-I/O path (it then
    /// steps over the OUT on the next KVM_RUN only if RIP is unchanged), or right after it when
    /// its instruction emulator ran the OUT; both resume at the same place. A 4-byte write to
    /// the port from anywhere else is ignored, as writes to an unused port are.
    pub fn fast_signal(
        &self,
        vcpu: &mut VcpuFd,
        vp: u32,
        connection_id: u32,
    ) -> Result<(), kvm::kvm_ioctls::Error> {
        let (mut regs, cpl) = self.regs(vcpu)?;
        let offset = regs.rip & (hvdef::hv::HV_PAGE_SIZE - 1);
        let out = hv1::FAST_SIGNAL_OUT_OFFSET as u64;
        if offset != out && offset != out + hv1::FAST_SIGNAL_OUT_LEN as u64 {
            return Ok(());
        }
        let rax = if cpl != 0 {
            hvdef::hv::hypercall_result(hv1::HvStatus::ACCESS_DENIED, 0)
        } else {
            let call = hv1::HypercallRegs {
                rcx: u64::from(hv1::FAST_SIGNAL_EVENT_CONTROL),
                rdx: u64::from(connection_id),
                r8: 0,
            };
            let Some(outcome) = self.hv.hypercall(vp, call) else {
                return Ok(());
            };
            self.complete(outcome)
        };
        regs.rax = rax;
        regs.rip = regs.rip - offset + hv1::FAST_SIGNAL_RESUME_OFFSET as u64;
        self.set_regs(vcpu, &regs)
    }

    /// RAX for a dispatched hypercall, after VMBus carried out its action.
    fn complete(&self, outcome: hv1::HypercallOutcome) -> u64 {
        match outcome.action {
            None => outcome.rax(),
            Some(hv1::HypercallAction::PostMessage(m)) => outcome.rax_with(
                self.vmbus
                    .post_message(m.connection_id, m.vp, m.payload.as_slice()),
            ),
            Some(hv1::HypercallAction::SignalEvent(e)) => {
                outcome.rax_with(self.vmbus.signal_event(e.connection_id))
            }
        }
    }

    /// The general registers and the CPL at this exit.
    fn regs(&self, vcpu: &mut VcpuFd) -> Result<(kvm_regs, u8), kvm::kvm_ioctls::Error> {
        if self.sync_regs {
            let s = vcpu.sync_regs();
            Ok((s.regs, s.sregs.cs.dpl))
        } else {
            Ok((vcpu.get_regs()?, vcpu.get_sregs()?.cs.dpl))
        }
    }

    /// Hands changed general registers back to KVM for the next KVM_RUN (which applies them
    /// before it completes the exit).
    fn set_regs(&self, vcpu: &mut VcpuFd, regs: &kvm_regs) -> Result<(), kvm::kvm_ioctls::Error> {
        if self.sync_regs {
            vcpu.sync_regs_mut().regs = *regs;
            vcpu.set_sync_dirty_reg(SyncReg::Register);
            Ok(())
        } else {
            vcpu.set_regs(regs)
        }
    }
}
