//! The KVM state of a partition and its vCPUs, for save and restore: what KVM keeps in the
//! kernel (registers, FPU/XSAVE, MSRs, the LAPIC, pending events, the PIC, IOAPIC and PIT, the
//! KVM clock). Guest RAM and the user-space devices are saved by their owners.
//!
//! The structures are KVM's own, serialized as their bytes (kvm-bindings' `serde` feature).
//! A saved state is file input: KVM validates every value it is given back and refuses what it
//! cannot take, which comes back as an error here, never a panic.

use crate::{Error, Partition, Result};
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, VcpuFd};
use serde::{Deserialize, Serialize};

/// MSRs that user space owns (the Hyper-V synthetic MSRs, trapped to the VMM and saved with
/// its enlightenment state), left out of [`VcpuState::msrs`].
pub const USER_MSRS: std::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_01ff;

/// One vCPU's KVM state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value) of every MSR KVM saves, but [`USER_MSRS`].
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: u32,
}

/// The partition's in-kernel devices and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Ioctl { op, source }
}

fn irqchip(partition: &Partition, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    partition
        .vm
        .get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl Partition {
    /// The MSRs to save: KVM's list of saved MSRs without [`USER_MSRS`].
    pub fn saved_msr_indices(&self) -> Result<Vec<u32>> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(list
            .as_slice()
            .iter()
            .copied()
            .filter(|i| !USER_MSRS.contains(i))
            .collect())
    }

    /// Captures the PIC, IOAPIC, PIT and KVM clock. The vCPUs must be out of the guest.
    pub fn save_state(&self) -> Result<VmState> {
        Ok(VmState {
            pic_master: irqchip(self, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(self, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(self, KVM_IRQCHIP_IOAPIC)?,
            pit: self.vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
            clock: self.vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
        })
    }

    /// Puts back what [`Partition::save_state`] captured. The clock continues from the saved
    /// value (the guest does not see the time it spent saved).
    pub fn restore_state(&self, state: &VmState) -> Result<()> {
        let mut chips = [state.pic_master, state.pic_slave, state.ioapic];
        for (chip, id) in chips.iter_mut().zip([
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ]) {
            chip.chip_id = id;
            chip.pad = 0;
            self.vm
                .set_irqchip(chip)
                .map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        let mut pit = state.pit;
        pit.flags &=
            kvm_bindings::KVM_PIT_FLAGS_HPET_LEGACY | kvm_bindings::KVM_PIT_FLAGS_SPEAKER_DATA_ON;
        self.vm.set_pit2(&pit).map_err(ioctl("KVM_SET_PIT2"))?;
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.vm.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))
    }
}

/// Finishes an exit the VMM has handled but KVM has not completed yet (the result of a port
/// read, registers changed through `kvm_run`): KVM_RUN with `immediate_exit` completes it and
/// returns before running a guest instruction. Call before [`save_vcpu`].
pub fn complete_pending_exit(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

/// Reads the MSRs in `indices` KVM can give; those it refuses are left out.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::MissingCap("MSR list"))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        out.extend(
            msrs.as_slice()[..read.min(chunk.len())]
                .iter()
                .map(|e| (e.index, e.data)),
        );
        // KVM stops at the first MSR it cannot read: skip that one.
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(out)
}

/// Captures a vCPU that is out of the guest (see [`complete_pending_exit`]). The multiprocessor
/// state is read first: reading it may fold pending events into the other registers.
pub fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    Ok(VcpuState {
        mp_state: vcpu.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?,
        regs: vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
        xsave: vcpu.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?,
        xcrs: vcpu.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?,
        debug_regs: vcpu.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
        msrs: read_msrs(vcpu, msr_indices)?,
        events: vcpu
            .get_vcpu_events()
            .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
        tsc_khz: vcpu.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))?,
    })
}

/// Puts a saved vCPU back, in the order KVM needs: the multiprocessor state, registers,
/// extended state, the LAPIC before the MSRs (the TSC deadline is the LAPIC timer's), and the
/// pending events last. CPUID must be set already. Returns the MSRs KVM refused.
pub fn restore_vcpu(partition: &Partition, vcpu: &VcpuFd, state: &VcpuState) -> Result<Vec<u32>> {
    if state.tsc_khz != 0 && vcpu.get_tsc_khz().ok() != Some(state.tsc_khz) {
        vcpu.set_tsc_khz(state.tsc_khz)
            .map_err(ioctl("KVM_SET_TSC_KHZ"))?;
    }
    vcpu.set_mp_state(state.mp_state)
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(ioctl("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(ioctl("KVM_SET_SREGS"))?;
    // A larger XSAVE area (AMX state the VMM asked permission for) would make KVM read past
    // the 4 KiB `kvm_xsave`; this VMM never asks, so KVM's size is the legacy one.
    let xsave2 = partition.vm.check_extension_int(Cap::Xsave2);
    if usize::try_from(xsave2).unwrap_or(0) > size_of::<kvm_xsave>() {
        return Err(Error::MissingCap(
            "an XSAVE area of at most 4 KiB (KVM_CAP_XSAVE2 reports more)",
        ));
    }
    // SAFETY: KVM reads at most size_of::<kvm_xsave>() bytes here, checked just above: the
    // partition enables no dynamically sized XSAVE features.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(ioctl("KVM_SET_LAPIC"))?;
    let refused = write_msrs(vcpu, &state.msrs)?;
    vcpu.set_vcpu_events(&state.events)
        .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
    Ok(refused)
}

/// Writes MSRs; returns the indices KVM refused (it stops at each, the rest are retried).
fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<Vec<u32>> {
    let mut refused = Vec::new();
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).map_err(|_| Error::MissingCap("MSR list"))?;
        let set = vcpu.set_msrs(&list).map_err(ioctl("KVM_SET_MSRS"))?;
        if let Some(&(index, _)) = chunk.get(set) {
            refused.push(index);
        }
        rest = &rest[(set + 1).min(rest.len())..];
    }
    Ok(refused)
}
