//! The Hyper-V CPUID leaves, and patching of the host's supported CPUID list so that the guest
//! sees Hyper-V and no KVM signature.

use hvdef::hv::{self, hints, misc_features, privilege_high, privilege_low};

/// One CPUID entry, in the shape of `kvm_cpuid_entry2` (the KVM layer converts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// KVM_CPUID_FLAG_* bits (bit 0: the index is significant).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// What the Hyper-V leaves advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidConfig {
    /// Number of virtual processors (reported as max VPs and max LPs).
    pub vp_count: u32,
    /// Offer the TSC_INVARIANT_CONTROL MSR (privilege bit 15) and CPUID 0x80000007 EDX bit 8.
    pub invariant_tsc: bool,
    /// Offer the APIC access MSRs (EOI, ICR, TPR) and the VP assist page's lazy EOI (privilege
    /// bit 4, hint bit 3). The host's KVM must serve those three MSRs itself and take a
    /// paravirtual-EOI address for the assist page (see the `vmm` crate).
    pub apic_assist: bool,
}

/// Highest Hyper-V leaf we report. 0x40000005 is the minimum Linux accepts; higher values make
/// 6.x kernels read the nested-features leaf 0x4000000A.
pub const MAX_HV_LEAF: u32 = hv::CPUID_HV_IMPLEMENTATION_LIMITS;

/// Reported hypervisor version (leaf 0x40000002): build 20348, version 10.0 (the numbers of
/// Windows Server 2022; Linux only prints them).
pub const HV_BUILD: u32 = 20348;
/// Major version in bits 16..31, minor in 0..15.
pub const HV_VERSION: u32 = 10 << 16;

/// Privileges, low word: TIME_REF_COUNT, SynIC, HYPERCALL, VP_INDEX, REFERENCE_TSC and the
/// frequency MSRs (0xA66), plus TSC_INVARIANT_CONTROL (0x8000) and the APIC access MSRs (0x10)
/// when offered. No synthetic timers (bit 3), since we do not implement them.
pub const fn privileges_low(config: &CpuidConfig) -> u32 {
    let mut base = privilege_low::ACCESS_PARTITION_REFERENCE_COUNTER
        | privilege_low::ACCESS_SYNIC_MSRS
        | privilege_low::ACCESS_HYPERCALL_MSRS
        | privilege_low::ACCESS_VP_INDEX
        | privilege_low::ACCESS_PARTITION_REFERENCE_TSC
        | privilege_low::ACCESS_FREQUENCY_MSRS;
    if config.invariant_tsc {
        base |= privilege_low::ACCESS_TSC_INVARIANT_CONTROLS;
    }
    if config.apic_assist {
        base |= privilege_low::ACCESS_APIC_MSRS;
    }
    base
}

/// Privileges, high word: PostMessages and SignalEvents only (0x30).
pub const PRIVILEGES_HIGH: u32 = privilege_high::POST_MESSAGES | privilege_high::SIGNAL_EVENTS;
/// Misc features: frequency MSRs and guest crash MSRs.
pub const MISC_FEATURES: u32 = misc_features::FREQUENCY_MSRS | misc_features::GUEST_CRASH_MSRS;
/// Hints: "deprecating AutoEOI" (KVM cannot do AutoEOI, so the guest must EOI itself), plus
/// "use the APIC MSRs" when the APIC assist is offered: only then does Linux EOI through the VP
/// assist page, skipping the EOI (and its exit) when the host says none is needed.
pub const fn hints(config: &CpuidConfig) -> u32 {
    if config.apic_assist {
        hints::DEPRECATING_AEOI | hints::APIC_MSRS
    } else {
        hints::DEPRECATING_AEOI
    }
}
/// Spin-wait notification count: never notify.
pub const SPIN_WAIT_NEVER: u32 = 0xFFFF_FFFF;

/// The Hyper-V leaves 0x40000000..=0x40000005.
pub fn hv_leaves(config: &CpuidConfig) -> [CpuidEntry; 6] {
    let leaf = |function, eax, ebx, ecx, edx| CpuidEntry {
        function,
        index: 0,
        flags: 0,
        eax,
        ebx,
        ecx,
        edx,
    };
    [
        leaf(
            hv::CPUID_HV_VENDOR_AND_MAX_FUNCTION,
            MAX_HV_LEAF,
            hv::CPUID_HV_VENDOR_EBX,
            hv::CPUID_HV_VENDOR_ECX,
            hv::CPUID_HV_VENDOR_EDX,
        ),
        leaf(
            hv::CPUID_HV_INTERFACE,
            hv::CPUID_HV_INTERFACE_SIGNATURE,
            0,
            0,
            0,
        ),
        leaf(hv::CPUID_HV_VERSION, HV_BUILD, HV_VERSION, 0, 0),
        leaf(
            hv::CPUID_HV_FEATURES,
            privileges_low(config),
            PRIVILEGES_HIGH,
            0,
            MISC_FEATURES,
        ),
        leaf(
            hv::CPUID_HV_ENLIGHTENMENT_INFO,
            hints(config),
            SPIN_WAIT_NEVER,
            0,
            0,
        ),
        leaf(
            hv::CPUID_HV_IMPLEMENTATION_LIMITS,
            config.vp_count,
            config.vp_count,
            0,
            0,
        ),
    ]
}

fn in_hv_range(function: u32) -> bool {
    (hv::CPUID_HV_RANGE_START..=hv::CPUID_HV_RANGE_END).contains(&function)
}

/// Patches the host's supported CPUID list (e.g. from `KVM_GET_SUPPORTED_CPUID`) for a Hyper-V
/// guest:
///
/// * removes every entry in 0x40000000..=0x4000FFFF, which covers each base (in 0x100 steps)
///   where a guest looks for a KVM (or any other) hypervisor signature;
/// * sets CPUID.1:ECX bit 31 (hypervisor present), adding leaf 1 if it is missing;
/// * inserts the Hyper-V leaves from [`hv_leaves`];
/// * with `invariant_tsc`, sets CPUID.80000007H:EDX bit 8, adding the leaf if it is missing and
///   raising the max extended leaf (0x80000000 EAX) to cover it. Without it the host's value
///   is left as it is.
///
/// Entries keep their original order; the Hyper-V leaves go where the first removed entry
/// was, or at the end.
pub fn patch_supported_cpuid(entries: &mut Vec<CpuidEntry>, config: &CpuidConfig) {
    let insert_at = entries
        .iter()
        .position(|e| in_hv_range(e.function))
        .unwrap_or(entries.len());
    entries.retain(|e| !in_hv_range(e.function));
    let insert_at = insert_at.min(entries.len());
    entries.splice(insert_at..insert_at, hv_leaves(config));

    match entries
        .iter_mut()
        .find(|e| e.function == hv::CPUID_FEATURES && e.index == 0)
    {
        Some(e) => e.ecx |= hv::CPUID_1_ECX_HYPERVISOR_PRESENT,
        None => entries.push(CpuidEntry {
            function: hv::CPUID_FEATURES,
            ecx: hv::CPUID_1_ECX_HYPERVISOR_PRESENT,
            ..Default::default()
        }),
    }

    if config.invariant_tsc {
        match entries
            .iter_mut()
            .find(|e| e.function == hv::CPUID_EXT_POWER_MANAGEMENT)
        {
            Some(e) => e.edx |= hv::CPUID_80000007_EDX_INVARIANT_TSC,
            None => {
                entries.push(CpuidEntry {
                    function: hv::CPUID_EXT_POWER_MANAGEMENT,
                    edx: hv::CPUID_80000007_EDX_INVARIANT_TSC,
                    ..Default::default()
                });
                match entries.iter_mut().find(|e| e.function == 0x8000_0000) {
                    Some(e) => e.eax = e.eax.max(hv::CPUID_EXT_POWER_MANAGEMENT),
                    None => entries.push(CpuidEntry {
                        function: 0x8000_0000,
                        eax: hv::CPUID_EXT_POWER_MANAGEMENT,
                        ..Default::default()
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM_EBX: u32 = u32::from_le_bytes(*b"KVMK");
    const KVM_ECX: u32 = u32::from_le_bytes(*b"VMKV");
    const KVM_EDX: u32 = u32::from_le_bytes(*b"M\0\0\0");

    fn e(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index: 0,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    /// A list shaped like KVM_GET_SUPPORTED_CPUID's, with the KVM leaves at 0x40000000 and a
    /// second KVM signature at 0x40000100 (as QEMU does with hv-* flags).
    fn kvm_like() -> Vec<CpuidEntry> {
        vec![
            e(0, 0xD, 0x756E_6547, 0x6C65_746E, 0x4965_6E69),
            e(1, 0x806F8, 0, 0x7FFA_3203, 0x178B_FBFF),
            e(0x4000_0000, 0x4000_0001, KVM_EBX, KVM_ECX, KVM_EDX),
            e(0x4000_0001, 0x0100_7AFB, 0, 0, 0),
            e(0x4000_0100, 0x4000_0101, KVM_EBX, KVM_ECX, KVM_EDX),
            e(0x4000_0101, 0x7AFB, 0, 0, 0),
            e(0x4000_FF00, 0x4000_FF00, KVM_EBX, KVM_ECX, KVM_EDX),
            e(0x8000_0000, 0x8000_0008, 0, 0, 0),
            e(0x8000_0007, 0, 0, 0, 0),
            e(0x8000_0008, 0x3030, 0, 0, 0),
        ]
    }

    fn find(entries: &[CpuidEntry], f: u32) -> CpuidEntry {
        *entries.iter().find(|x| x.function == f).unwrap()
    }

    #[test]
    fn leaves_match_the_brief() {
        let l = hv_leaves(&CpuidConfig {
            vp_count: 4,
            invariant_tsc: true,
            apic_assist: false,
        });
        assert_eq!(l[0].function, 0x4000_0000);
        assert_eq!(l[0].eax, 0x4000_0005);
        let mut sig = [0u8; 12];
        sig[0..4].copy_from_slice(&l[0].ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&l[0].ecx.to_le_bytes());
        sig[8..12].copy_from_slice(&l[0].edx.to_le_bytes());
        assert_eq!(&sig, b"Microsoft Hv");
        assert_eq!(l[1].eax.to_le_bytes(), *b"Hv#1");
        assert_eq!(l[3].eax, 0x8A66);
        assert_eq!(l[3].ebx, 0x30);
        assert_eq!(l[3].edx, 0x500);
        assert_eq!(l[4].eax, 0x200);
        assert_eq!(l[4].ebx, 0xFFFF_FFFF);
        assert_eq!((l[5].eax, l[5].ebx), (4, 4));
        let no_inv = hv_leaves(&CpuidConfig {
            vp_count: 1,
            invariant_tsc: false,
            apic_assist: false,
        });
        assert_eq!(no_inv[3].eax, 0xA66);
        // The APIC assist: privilege bit 4 (APIC MSRs) and hint bit 3 (use them), together.
        let assist = hv_leaves(&CpuidConfig {
            vp_count: 1,
            invariant_tsc: false,
            apic_assist: true,
        });
        assert_eq!(assist[3].eax, 0xA76);
        assert_eq!(assist[4].eax, 0x208);
        // Never the privileges that send Linux down root/partition-id/extended paths.
        assert_eq!(
            l[3].ebx & (1 << 0 | 1 << 1 | 1 << 12 | 1 << 20 | 1 << 22),
            0
        );
    }

    #[test]
    fn patch_removes_every_kvm_signature_and_inserts_hyperv() {
        let config = CpuidConfig {
            vp_count: 2,
            invariant_tsc: true,
            apic_assist: false,
        };
        let mut entries = kvm_like();
        patch_supported_cpuid(&mut entries, &config);

        // No KVM signature anywhere, at any base.
        for x in &entries {
            assert!(
                !(x.ebx == KVM_EBX && x.ecx == KVM_ECX),
                "KVM signature left at {:#x}",
                x.function
            );
        }
        let hv: Vec<_> = entries
            .iter()
            .filter(|x| (0x4000_0000..=0x4000_FFFF).contains(&x.function))
            .map(|x| x.function)
            .collect();
        assert_eq!(hv, (0x4000_0000..=0x4000_0005).collect::<Vec<_>>());
        assert_eq!(find(&entries, 0x4000_0000).ebx, hv::CPUID_HV_VENDOR_EBX);
        assert_eq!(find(&entries, 0x4000_0005).eax, 2);
        assert_ne!(find(&entries, 1).ecx & (1 << 31), 0);
        // Other leaves are kept untouched.
        assert_eq!(find(&entries, 1).ecx & !(1 << 31), 0x7FFA_3203);
        assert_eq!(find(&entries, 0x8000_0008).eax, 0x3030);
        assert_ne!(find(&entries, 0x8000_0007).edx & (1 << 8), 0);
        // The Hyper-V block sits where the KVM block was.
        assert_eq!(entries[2].function, 0x4000_0000);
        // Patching twice is idempotent.
        let once = entries.clone();
        patch_supported_cpuid(&mut entries, &config);
        assert_eq!(entries, once);
    }

    #[test]
    fn patch_without_invariant_tsc_leaves_0x80000007_alone() {
        let mut entries = kvm_like();
        entries.iter_mut().for_each(|x| {
            if x.function == 0x8000_0007 {
                x.edx = 0x100;
            }
        });
        patch_supported_cpuid(
            &mut entries,
            &CpuidConfig {
                vp_count: 1,
                invariant_tsc: false,
                apic_assist: false,
            },
        );
        assert_eq!(find(&entries, 0x8000_0007).edx, 0x100);
        assert_eq!(find(&entries, 0x4000_0003).eax, 0xA66);
    }

    #[test]
    fn patch_adds_missing_leaves() {
        let mut entries = vec![e(0, 1, 0, 0, 0), e(0x8000_0000, 0x8000_0001, 0, 0, 0)];
        patch_supported_cpuid(
            &mut entries,
            &CpuidConfig {
                vp_count: 1,
                invariant_tsc: true,
                apic_assist: false,
            },
        );
        assert_eq!(find(&entries, 1).ecx, 1 << 31);
        assert_eq!(find(&entries, 0x8000_0007).edx, 1 << 8);
        assert_eq!(find(&entries, 0x8000_0000).eax, 0x8000_0007);
        assert_eq!(find(&entries, 0x4000_0000).eax, 0x4000_0005);
    }
}
