//! The partition and vCPU plumbing over KVM: opening `/dev/kvm` with errors a user can act on,
//! creating the VM with its in-kernel interrupt controllers and PIT, and mapping guest RAM.
//!
//! This is one of the two crates allowed `unsafe` (memory slots point KVM at host memory).
//! Everything above it uses the safe `kvm-ioctls` types this crate hands out.

pub mod state;

use guestmem::GuestMemory;
pub use kvm_bindings;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
pub use kvm_ioctls;
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd};
use vmm_sys_util::eventfd::EventFd;

/// Errors from setting up a partition.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm does not exist: this host has no KVM (enable virtualization in the firmware and load kvm-intel or kvm-amd)")]
    NoKvm,
    #[error("permission denied opening /dev/kvm: run as root or add your user to the 'kvm' group")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("cannot duplicate an eventfd: {0}")]
    Dup(#[source] std::io::Error),
    #[error("KVM {op} failed: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Ioctl { op, source }
}

/// Environment variable naming a KVM device other than `/dev/kvm` (for tests).
pub const KVM_DEVICE_ENV: &str = "VIRIDIAN_KVM_DEVICE";

/// Opens `/dev/kvm` (or the device [`KVM_DEVICE_ENV`] names), turning the common failures into
/// messages that say what to do.
pub fn open_kvm() -> Result<Kvm> {
    let path = std::env::var(KVM_DEVICE_ENV).unwrap_or_else(|_| "/dev/kvm".into());
    let path = std::ffi::CString::new(path).map_err(|_| Error::NoKvm)?;
    Kvm::new_with_path(&path).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => Error::NoKvm,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::KvmOpen(e),
    })
}

/// Guest physical address of the TSS that VMX needs (three pages just below the BIOS area at
/// 4 GiB, inside the PCI hole so it never overlaps RAM).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Asks the host kernel to back guest RAM with transparent huge pages. Each 4 KiB page the
/// guest touches first costs a nested-paging fault; 2 MiB pages cut those faults by 512, which
/// matters most when the host is itself a VM. Failure only costs speed, so it is not an error.
fn advise_huge_pages(region: &guestmem::Region) {
    // SAFETY: madvise(MADV_HUGEPAGE) changes no contents and no mapping permissions; the range is
    // an anonymous mapping owned by the guest memory, valid for `len` bytes.
    let rc = unsafe {
        libc::madvise(
            region.host_addr as *mut libc::c_void,
            region.len as usize,
            libc::MADV_HUGEPAGE,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "madvise(MADV_HUGEPAGE) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// An eventfd that KVM signals, without an exit to user space, when the guest writes one 4-byte
/// value to one I/O port (KVM_IOEVENTFD with datamatch). Holds its own duplicate of the
/// descriptor, so the registration and its removal name the same eventfd.
#[derive(Debug)]
pub struct PioEventFd {
    fd: EventFd,
    port: u16,
    value: u32,
}

impl PioEventFd {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The value that signals it.
    pub fn value(&self) -> u32 {
        self.value
    }
}

/// A KVM virtual machine with guest RAM mapped, the in-kernel IOAPIC/PIC/LAPICs and the PIT.
pub struct Partition {
    kvm: Kvm,
    vm: VmFd,
    memory: GuestMemory,
}

impl Partition {
    /// Creates the VM, maps every region of `memory` into it, and adds the in-kernel IOAPIC,
    /// PIC, LAPICs and PIT.
    pub fn new(kvm: Kvm, memory: GuestMemory) -> Result<Self> {
        let partition = Self::new_bare(kvm, memory)?;
        let vm = &partition.vm;
        vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(partition)
    }

    /// Creates the VM with memory but no in-kernel interrupt controllers: every HLT exits to
    /// user space. For tiny test guests.
    pub fn new_bare(kvm: Kvm, memory: GuestMemory) -> Result<Self> {
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCap(name));
            }
        }
        let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        for (slot, region) in memory.regions().iter().enumerate() {
            advise_huge_pages(region);
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.gpa,
                memory_size: region.len,
                userspace_addr: region.host_addr,
            };
            // SAFETY: the host range belongs to `memory`, an anonymous mapping that lives as long
            // as this Partition (we keep a clone), and the slots do not overlap because
            // `GuestMemory` refuses overlapping regions.
            unsafe { vm.set_user_memory_region(mem_region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        vm.set_tss_address(TSS_ADDRESS)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        Ok(Self { kvm, vm, memory })
    }

    /// The system-wide KVM handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM handle.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Whether this KVM serves Hyper-V's APIC access MSRs (EOI, ICR, TPR) on its own LAPIC
    /// when they are not trapped: it has in-kernel Hyper-V emulation (KVM_CAP_HYPERV).
    pub fn serves_hyperv_apic_msrs(&self) -> bool {
        self.kvm.check_extension(Cap::Hyperv)
    }

    /// Sends every guest access to MSRs `base..base+count` but those in `pass` to user space
    /// (as `X86Rdmsr` / `X86Wrmsr` exits), whatever the host KVM would do with them (even with
    /// `kvm.ignore_msrs=1` or in-kernel Hyper-V emulation). KVM handles the ones in `pass`.
    pub fn trap_msrs(&self, base: u32, count: u32, pass: &[u32]) -> Result<()> {
        use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
        if !self.kvm.check_extension(Cap::X86UserSpaceMsr) {
            return Err(Error::MissingCap("KVM_CAP_X86_USER_SPACE_MSR"));
        }
        if !self.kvm.check_extension(Cap::X86MsrFilter) {
            return Err(Error::MissingCap("KVM_CAP_X86_MSR_FILTER"));
        }
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
            ..Default::default()
        };
        self.vm
            .enable_cap(&cap)
            .map_err(ioctl("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
        // A clear bit denies the MSR to KVM, so it exits to us; a set bit lets KVM handle it.
        let mut bitmap = vec![0u8; count.div_ceil(8) as usize];
        for bit in pass.iter().filter_map(|&msr| msr.checked_sub(base)) {
            if bit < count {
                bitmap[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
        let range = MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base,
            msr_count: count,
            bitmap: &bitmap,
        };
        self.vm
            .set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
            .map_err(ioctl("KVM_X86_SET_MSR_FILTER"))
    }

    /// Makes a 4-byte guest write of `value` to `port` signal `eventfd` inside KVM. Fails
    /// without KVM_CAP_IOEVENTFD, or if that port and value already have an eventfd.
    pub fn add_pio_eventfd(
        &self,
        port: u16,
        value: u32,
        eventfd: BorrowedFd<'_>,
    ) -> Result<PioEventFd> {
        if !self.kvm.check_extension(Cap::Ioeventfd) {
            return Err(Error::MissingCap("KVM_CAP_IOEVENTFD"));
        }
        let owned = eventfd.try_clone_to_owned().map_err(Error::Dup)?;
        // SAFETY: `owned` is an open descriptor that nothing else owns (we just duplicated it);
        // the EventFd takes it over and closes it once. KVM refuses it if it is no eventfd.
        let fd = unsafe { EventFd::from_raw_fd(owned.into_raw_fd()) };
        self.vm
            .register_ioevent(&fd, &IoEventAddress::Pio(u64::from(port)), value)
            .map_err(ioctl("KVM_IOEVENTFD"))?;
        Ok(PioEventFd { fd, port, value })
    }

    /// Undoes [`Partition::add_pio_eventfd`]: writes of that value to that port exit to user
    /// space again.
    pub fn remove_pio_eventfd(&self, event: PioEventFd) -> Result<()> {
        self.vm
            .unregister_ioevent(
                &event.fd,
                &IoEventAddress::Pio(u64::from(event.port)),
                event.value,
            )
            .map_err(ioctl("KVM_IOEVENTFD(deassign)"))
    }

    /// Injects a fixed, edge-triggered interrupt with `vector` into the LAPIC with `apic_id`.
    pub fn signal_msi(&self, apic_id: u32, vector: u8) -> Result<()> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: 0xfee0_0000 | (apic_id << 12),
            address_hi: 0,
            data: u32::from(vector),
            ..Default::default()
        };
        self.vm
            .signal_msi(msi)
            .map(|_| ())
            .map_err(ioctl("KVM_SIGNAL_MSI"))
    }
}

/// KVM's paravirtual-EOI MSR (MSR_KVM_PV_EOI_EN): the guest address of a byte whose bit 0 KVM
/// sets when the interrupt it injects needs no EOI write, and bit 0 of the MSR to enable it.
pub const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;

/// Points the vCPU's paravirtual EOI at the byte at `gpa` (which must be 4-byte aligned and
/// guest RAM), or turns it off with `None`. Only with the in-kernel LAPIC.
pub fn set_pv_eoi(vcpu: &kvm_ioctls::VcpuFd, gpa: Option<u64>) -> Result<()> {
    let entry = kvm_bindings::kvm_msr_entry {
        index: MSR_KVM_PV_EOI_EN,
        data: gpa.map_or(0, |gpa| gpa | 1),
        ..Default::default()
    };
    let msrs =
        kvm_bindings::Msrs::from_entries(&[entry]).map_err(|_| Error::MissingCap("MSR list"))?;
    match vcpu
        .set_msrs(&msrs)
        .map_err(ioctl("KVM_SET_MSRS(PV_EOI_EN)"))?
    {
        1 => Ok(()),
        _ => Err(Error::MissingCap("MSR_KVM_PV_EOI_EN")),
    }
}
