//! vCPU configuration: CPUID from KVM's supported set with the topology set per vCPU, MSR
//! defaults, LAPIC LINT pins, and the boot CPU's 64-bit entry state.

use crate::boot::{self, BootEntry};
use crate::layout;
use kvm::kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm::kvm_ioctls::{Kvm, VcpuFd};

type VcpuResult<T> = std::result::Result<T, (&'static str, kvm::kvm_ioctls::Error)>;

/// Model-specific registers given to every vCPU at reset.
mod msr {
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// KVM's supported CPUID set, fetched once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> VcpuResult<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| ("KVM_GET_SUPPORTED_CPUID", e))
}

/// Number of bits needed to hold IDs 0..count-1.
fn id_bits(count: u32) -> u32 {
    count.next_power_of_two().trailing_zeros()
}

/// CPUID.1:ECX.VMX (Intel VT-x).
const CPUID_1_ECX_VMX: u32 = 1 << 5;
/// CPUID.8000_0001h:ECX.SVM (AMD-V).
const CPUID_80000001_ECX_SVM: u32 = 1 << 2;
/// CPUID.8000_0001h:ECX.CmpLegacy.
const CPUID_80000001_ECX_CMP_LEGACY: u32 = 1 << 1;
/// The SVM feature leaf (revision, ASIDs, nested paging and the other SVM features).
const CPUID_SVM_FEATURES: u32 = 0x8000_000a;

/// Adjusts a copy of the supported CPUID for vCPU `index` of `count`: APIC IDs, logical
/// processor counts and topology leaves, and the hypervisor-present bit. Nested
/// virtualization is hidden (VMX, SVM and the SVM leaf cleared), as Hyper-V hides it by
/// default: KVM then also refuses the guest's EFER.SVME and VMXON.
pub fn cpuid_for_vcpu(base: &CpuId, index: u32, count: u32) -> CpuId {
    let mut cpuid = base.clone();
    let bits = id_bits(count);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | (count.min(255) << 16);
                e.ecx |= 1 << 31; // hypervisor present
                e.ecx &= !CPUID_1_ECX_VMX;
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the count field is valid
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; each cache shared by one core, the last
                // level (level 3) by all.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            0xb | 0x1f => {
                // Level 0: SMT (one thread per core). Level 1: cores.
                e.edx = index;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0x8000_0001 => {
                e.ecx &= !CPUID_80000001_ECX_SVM;
                if count > 1 {
                    e.ecx |= CPUID_80000001_ECX_CMP_LEGACY;
                }
            }
            CPUID_SVM_FEATURES => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_0008 => e.ecx = (e.ecx & !0xf0ff) | (bits << 12) | (count - 1),
            0x8000_001e => {
                e.eax = index;
                e.ebx = index & 0xff; // one thread per core, core id = APIC id
                e.ecx = 0;
            }
            _ => {}
        }
    }
    cpuid
}

/// Sets CPUID, MSRs, FPU and LAPIC pins on any vCPU.
pub fn configure_vcpu(vcpu: &VcpuFd, cpuid: &CpuId) -> VcpuResult<()> {
    vcpu.set_cpuid2(cpuid).map_err(|e| ("KVM_SET_CPUID2", e))?;
    let entries = [
        (msr::IA32_SYSENTER_CS, 0),
        (msr::IA32_SYSENTER_ESP, 0),
        (msr::IA32_SYSENTER_EIP, 0),
        (msr::STAR, 0),
        (msr::CSTAR, 0),
        (msr::KERNEL_GS_BASE, 0),
        (msr::SYSCALL_MASK, 0),
        (msr::LSTAR, 0),
        (msr::IA32_TSC, 0),
        (msr::IA32_MISC_ENABLE, 1),          // fast strings
        (msr::MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs enabled, write-back default
    ];
    let list: Vec<_> = entries
        .iter()
        .map(|&(index, data)| kvm::kvm_bindings::kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&list).expect("MSR list fits a FAM wrapper");
    let set = vcpu.set_msrs(&msrs).map_err(|e| ("KVM_SET_MSRS", e))?;
    if set != list.len() {
        tracing::debug!(
            "KVM accepted {set} of {} default MSRs (stopped at {:#x})",
            list.len(),
            list[set].index
        );
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| ("KVM_SET_FPU", e))?;
    set_lint(vcpu)
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as PC firmware leaves them.
fn set_lint(vcpu: &VcpuFd) -> VcpuResult<()> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7 << 8;
    const MODE_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(|e| ("KVM_GET_LAPIC", e))?;
    let mut update = |offset: usize, mode: u32| {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | mode;
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    };
    update(LVT_LINT0, MODE_EXTINT);
    update(LVT_LINT1, MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(|e| ("KVM_SET_LAPIC", e))
}

fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let flags = (descriptor >> 40) as u16;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the boot vCPU in 64-bit mode at the kernel's entry point.
pub fn set_boot_state(vcpu: &VcpuFd, entry: BootEntry) -> VcpuResult<()> {
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;

    let mut sregs = vcpu.get_sregs().map_err(|e| ("KVM_GET_SREGS", e))?;
    let code = segment(boot::CODE_SELECTOR, boot::GDT[2]);
    let data = segment(boot::DATA_SELECTOR, boot::GDT[3]);
    let mut tss = segment(boot::TSS_SELECTOR, boot::GDT[4]);
    tss.limit = 0xfffff;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (boot::GDT.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(|e| ("KVM_SET_SREGS", e))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rsp: layout::BOOT_STACK,
        rbp: layout::BOOT_STACK,
        rsi: entry.zero_page,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| ("KVM_SET_REGS", e))
}

/// The vCPU's registers, for error reports.
/// One line: where the vCPU is (for a guest stopped from outside).
pub fn brief_registers(vcpu: &VcpuFd) -> String {
    let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "registers unavailable".into();
    };
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} cr3={:#x} cpl={}",
        r.rip,
        r.rsp,
        r.rflags,
        s.cr3,
        s.cs.selector & 3
    )
}

pub fn dump_registers(vcpu: &VcpuFd) -> String {
    let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "registers unavailable".into();
    };
    format!(
        "rip={:#018x} rsp={:#018x} rflags={:#x}\n\
         rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
         rsi={:#018x} rdi={:#018x} rbp={:#018x} r8={:#018x}\n\
         cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n\
         cs={:#x} (base {:#x}, l={}) ss={:#x} idt={:#x}/{:#x} gdt={:#x}/{:#x}",
        r.rip,
        r.rsp,
        r.rflags,
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp,
        r.r8,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer,
        s.cs.selector,
        s.cs.base,
        s.cs.l,
        s.ss.selector,
        s.idt.base,
        s.idt.limit,
        s.gdt.base,
        s.gdt.limit
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm::kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn topology_follows_the_vcpu_index() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0000_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        let c = cpuid_for_vcpu(&base, 2, 3);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 2);
        assert_eq!((s[0].ebx >> 16) & 0xff, 3);
        assert_eq!(s[0].ebx & 0xffff, 0x0800);
        assert_ne!(s[0].ecx & (1 << 31), 0);
        assert_eq!((s[1].eax, s[1].ebx, s[1].edx), (2, 3, 2));
    }

    #[test]
    fn nested_virtualization_is_hidden() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: 0xfffa_3223, // VMX (bit 5) set among others
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0001,
                ecx: 0x0000_0f7d, // SVM (bit 2) set, CmpLegacy (bit 1) clear
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_000a,
                eax: 1,
                ebx: 0x8000,
                edx: 0x1b_bcff,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        for count in [1, 2] {
            let c = cpuid_for_vcpu(&base, 0, count);
            let s = c.as_slice();
            assert_eq!(s[0].ecx & (1 << 5), 0, "VMX left visible");
            // The other leaf-1 features stay (the hypervisor bit was already set).
            assert_eq!(s[0].ecx, 0xfffa_3203);
            assert_eq!(s[1].ecx & (1 << 2), 0, "SVM left visible");
            let cmp_legacy = if count > 1 { 1 << 1 } else { 0 };
            assert_eq!(s[1].ecx, 0x0000_0f79 | cmp_legacy);
            assert_eq!((s[2].eax, s[2].ebx, s[2].ecx, s[2].edx), (0, 0, 0, 0));
        }
    }
}
