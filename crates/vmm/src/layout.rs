//! Guest physical memory layout (x86 PC conventions).
//!
//! ```text
//! 0x0000_0500  GDT                  0x0000_7000  zero page (boot_params)
//! 0x0000_9000  PML4, PDPT, PDs      0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)      0x000e_0000  ACPI tables (reserved)
//! 0x0010_0000  kernel, then RAM     top of low RAM: initrd
//! 0xc000_0000  PCI hole: IOAPIC at 0xfec0_0000, LAPIC at 0xfee0_0000
//! 0x1_0000_0000  RAM above 4 GiB when memory exceeds the hole start
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const ZERO_PAGE: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: u64 = 0x1_0000;
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_START: u64 = 0xe_0000;
pub const HIGH_MEM: u64 = 0x10_0000;
pub const PCI_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 1 << 32;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// Smallest guest the loader accepts.
pub const MIN_MEMORY: u64 = 32 << 20;

/// The RAM ranges `(gpa, len)` for `size` bytes of guest memory, split around the PCI hole.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= PCI_HOLE_START {
        vec![(0, size)]
    } else {
        vec![(0, PCI_HOLE_START), (FOUR_GIB, size - PCI_HOLE_START)]
    }
}

/// E820 memory types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The e820 map the guest sees: RAM minus the EBDA and BIOS area, which hold firmware tables.
pub fn e820_map(size: u64) -> Vec<(u64, u64, u32)> {
    let ranges = ram_ranges(size);
    let low_end = ranges[0].1;
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (ACPI_START, HIGH_MEM - ACPI_START, E820_RESERVED),
        (HIGH_MEM, low_end - HIGH_MEM, E820_RAM),
    ];
    if let Some(&(gpa, len)) = ranges.get(1) {
        map.push((gpa, len, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_memory_skips_the_pci_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, PCI_HOLE_START), (FOUR_GIB, 1 << 30)]);
        let e = e820_map(4 << 30);
        assert_eq!(e.last(), Some(&(FOUR_GIB, 1 << 30, E820_RAM)));
        let ram: u64 = e.iter().filter(|x| x.2 == E820_RAM).map(|x| x.1).sum();
        assert_eq!(ram, (4 << 30) - (HIGH_MEM - EBDA_START));
    }
}
