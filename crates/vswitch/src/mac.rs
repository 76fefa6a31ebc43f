//! Stable MAC addresses for VM NICs in Hyper-V's range, 00:15:5D:xx:xx:xx.

/// Hyper-V's organizationally unique identifier (Microsoft's, used for VM NICs).
pub const HYPERV_OUI: [u8; 3] = [0x00, 0x15, 0x5d];

/// The MAC address of NIC `nic_index` of the VM `vm_name`: Hyper-V's OUI and 24 bits of a
/// 64-bit FNV-1a hash of the name, a zero byte and the index (little-endian). The same name
/// and index always give the same address, on any host and in any release; different NICs
/// may collide (24 bits), so a VM with a clash should be given an explicit MAC.
pub fn stable_mac(vm_name: &str, nic_index: u32) -> [u8; 6] {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let index = nic_index.to_le_bytes();
    let bytes = vm_name.as_bytes().iter().chain(&[0u8]).chain(&index);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    // Fold the whole hash into the 24 bits used, so every input byte counts.
    let folded = (h ^ (h >> 24) ^ (h >> 48)) as u32;
    let [a, b, c, _] = folded.to_le_bytes();
    [HYPERV_OUI[0], HYPERV_OUI[1], HYPERV_OUI[2], a, b, c]
}

/// The MAC address of a switch's bridge (except an External one's, which is its adapter's):
/// in the same range, from the switch name and an index no VM NIC has, so the host's
/// interface on the switch (and its IPv6 link-local address) stays the same across reboots.
pub fn switch_mac(switch: &str) -> [u8; 6] {
    stable_mac(switch, u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn stable_and_in_range() {
        assert_eq!(stable_mac("web1", 0), stable_mac("web1", 0));
        assert_eq!(&stable_mac("web1", 0)[..3], &HYPERV_OUI);
        assert_ne!(stable_mac("web1", 0), stable_mac("web1", 1));
        assert_ne!(stable_mac("web1", 0), stable_mac("web2", 0));
        // Unicast and globally administered, as Hyper-V's are.
        assert_eq!(stable_mac("x", 7)[0] & 0x03, 0);
    }

    #[test]
    fn pinned_value() {
        // Computed independently (FNV-1a 64 of b"vm\0\0\0\0\0", folded): a change here
        // changes every VM's MAC address.
        assert_eq!(stable_mac("vm", 0), [0x00, 0x15, 0x5d, 0x69, 0x98, 0x63]);
    }

    #[test]
    fn few_collisions() {
        let macs: HashSet<[u8; 6]> = (0..1000)
            .map(|i| stable_mac(&format!("vm{i}"), 0))
            .collect();
        assert!(macs.len() >= 995, "{} distinct of 1000", macs.len());
    }
}
