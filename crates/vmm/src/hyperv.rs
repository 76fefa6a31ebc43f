//! Wiring of the Hyper-V enlightenments (`hv1`) into the KVM vCPUs: CPUID, the synthetic MSR
//! trap, the hypercall port, interrupt injection, and the VMBus device in the DSDT.

use crate::vmbus_host::VmbusHost;
use acpi_tables::{aml, Aml};
use kvm::kvm_bindings::{kvm_cpuid_entry2, CpuId};
use kvm::kvm_ioctls::VcpuFd;
use std::sync::Arc;
use std::time::Instant;

/// The guest TSC, derived from the host's monotonic clock. The vCPUs' TSCs are set to 0 when
/// the VM is built and run at `tsc_hz`, so this matches them to within the build time; the guest
/// reads its clock from the TSC page (exact), and TIME_REF_COUNT only as a fallback.
pub struct KvmTime {
    start: Instant,
    tsc_hz: u64,
}

impl KvmTime {
    pub fn new(tsc_hz: u64) -> Self {
        Self {
            start: Instant::now(),
            tsc_hz,
        }
    }
}

impl hv1::TimeSource for KvmTime {
    fn guest_tsc(&self) -> u64 {
        let ns = self.start.elapsed().as_nanos();
        (ns * u128::from(self.tsc_hz) / 1_000_000_000) as u64
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

/// Injects the interrupts hv1 asks for (VP index = APIC ID here).
pub fn inject(partition: &kvm::Partition, interrupts: &[hv1::Interrupt]) {
    for i in interrupts {
        if let Err(e) = partition.signal_msi(i.vp, i.vector) {
            tracing::warn!("cannot inject vector {:#x} into VP {}: {e}", i.vector, i.vp);
        }
    }
}

/// What the vCPU loop must do after a hypercall.
pub enum HypercallResult {
    /// Done; RAX is set.
    Done,
    /// HvPostMessage for the VMBus server.
    PostMessage(hv1::PostMessageRequest),
    /// HvSignalEvent for a device doorbell.
    SignalEvent(hv1::SignalEventRequest),
}

/// Handles an `OUT` to the hypercall port: reads RCX/RDX/R8, dispatches, and writes RAX with
/// the status (the caller may overwrite it for post/signal results). RIP is left alone, so KVM
/// steps past the OUT.
pub fn hypercall(
    hv: &hv1::Partition,
    vcpu: &VcpuFd,
    vp: u32,
) -> Result<HypercallResult, kvm::kvm_ioctls::Error> {
    let mut regs = vcpu.get_regs()?;
    let Some(outcome) = hv.hypercall(
        vp,
        hv1::HypercallRegs {
            rcx: regs.rcx,
            rdx: regs.rdx,
            r8: regs.r8,
        },
    ) else {
        // Hypercalls are disabled: an ordinary write to an unclaimed port.
        return Ok(HypercallResult::Done);
    };
    regs.rax = outcome.rax();
    vcpu.set_regs(&regs)?;
    Ok(match outcome.action {
        None => HypercallResult::Done,
        Some(hv1::HypercallAction::PostMessage(m)) => HypercallResult::PostMessage(m),
        Some(hv1::HypercallAction::SignalEvent(e)) => HypercallResult::SignalEvent(e),
    })
}

/// Overwrites RAX with a hypercall status decided after dispatch (e.g. by the VMBus server).
pub fn set_hypercall_status(
    vcpu: &VcpuFd,
    status: hv1::HvStatus,
) -> Result<(), kvm::kvm_ioctls::Error> {
    let mut regs = vcpu.get_regs()?;
    regs.rax = u64::from(status.0);
    vcpu.set_regs(&regs)
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

/// The Hyper-V side of a vCPU's exits: synthetic MSRs and hypercalls, with VMBus behind them.
#[derive(Clone)]
pub struct HvExits {
    pub hv: Hv,
    pub partition: Arc<kvm::Partition>,
    pub vmbus: Arc<VmbusHost>,
}

impl HvExits {
    /// RDMSR of a trapped MSR; `None` means inject #GP.
    pub fn rdmsr(&self, vp: u32, msr: u32) -> Option<u64> {
        self.hv.msr_read(vp, msr).ok()
    }

    /// WRMSR of a trapped MSR; `false` means inject #GP.
    pub fn wrmsr(&self, vp: u32, msr: u32, value: u64) -> bool {
        match self.hv.msr_write(vp, msr, value) {
            Ok(None) => true,
            Ok(Some(hv1::MsrAction::Interrupts(list))) => {
                inject(&self.partition, &list);
                true
            }
            Ok(Some(hv1::MsrAction::GuestCrash(report))) => {
                log_crash(&report);
                true
            }
            Err(_) => false,
        }
    }

    /// The `OUT` to [`hv1::HYPERCALL_PORT`]: dispatches the hypercall and sets RAX.
    pub fn hypercall(&self, vcpu: &VcpuFd, vp: u32) -> Result<(), kvm::kvm_ioctls::Error> {
        match hypercall(&self.hv, vcpu, vp)? {
            HypercallResult::Done => Ok(()),
            HypercallResult::PostMessage(m) => {
                set_hypercall_status(vcpu, self.vmbus.post_message(&m))
            }
            HypercallResult::SignalEvent(e) => {
                set_hypercall_status(vcpu, self.vmbus.signal_event(&e))
            }
        }
    }
}
