//! ACPI tables: RSDP, XSDT, FADT (with PM1 registers so S5 power-off works, and the 0xCF9 reset
//! register), FACS, MADT (every vCPU's LAPIC and the IOAPIC; Linux's SMP bring-up on kernels
//! without MP-table support depends on it), and a DSDT that devices extend.

use crate::layout;
use acpi_tables::{
    aml,
    facs::FACS,
    fadt::{FADTBuilder, Flags},
    madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT},
    rsdp::Rsdp,
    sdt::Sdt,
    xsdt::XSDT,
    Aml,
};
use chipset::pm;
use guestmem::GuestMemory;

pub const OEM_ID: [u8; 6] = *b"VRDIAN";
const OEM_TABLE_ID: [u8; 8] = *b"VIRIDIAN";

/// FADT IA-PC boot architecture flag: no VGA hardware.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// The SCI interrupt (IRQ 9, as on PCs).
const SCI_IRQ: u16 = 9;

/// Builds every table for `vcpus` processors, with `dsdt_devices` appended to the DSDT, writes
/// them at [`layout::ACPI_START`], and returns the RSDP's guest address.
pub fn write_tables(
    mem: &GuestMemory,
    vcpus: u32,
    dsdt_devices: &[&dyn Aml],
) -> guestmem::Result<u64> {
    let mut tables = TableWriter::new(layout::ACPI_START);
    let rsdp_addr = tables.reserve(Rsdp::len(), 16);
    let xsdt_addr = tables.reserve(36 + 8 * 2, 16);

    let dsdt = bytes(&dsdt(dsdt_devices));
    let dsdt_addr = tables.place(mem, &dsdt, 16)?;
    let facs_addr = tables.place(mem, &bytes(&FACS::new()), 64)?;
    let fadt_addr = tables.place(mem, &bytes(&fadt(dsdt_addr, facs_addr)), 16)?;
    let madt_addr = tables.place(mem, &bytes(&madt(vcpus)), 16)?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    mem.write(xsdt_addr, &bytes(&xsdt))?;
    mem.write(rsdp_addr, &bytes(&Rsdp::new(OEM_ID, xsdt_addr)))?;
    Ok(rsdp_addr)
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

struct TableWriter {
    next: u64,
}

impl TableWriter {
    fn new(start: u64) -> Self {
        Self { next: start }
    }

    fn reserve(&mut self, len: usize, align: u64) -> u64 {
        let at = self.next.next_multiple_of(align);
        self.next = at + len as u64;
        at
    }

    fn place(&mut self, mem: &GuestMemory, data: &[u8], align: u64) -> guestmem::Result<u64> {
        let at = self.reserve(data.len(), align);
        assert!(
            self.next <= layout::HIGH_MEM,
            "ACPI tables overflow the BIOS area"
        );
        mem.write(at, data)?;
        Ok(at)
    }
}

fn fadt(dsdt: u64, facs: u64) -> impl Aml {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_32(dsdt as u32)
        .firmware_ctrl_32(facs as u32)
        .flag(Flags::Wbinvd)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.sci_int = SCI_IRQ.into();
    f.pm1a_evt_blk = u32::from(pm::PM1A_EVT).into();
    f.pm1_evt_len = pm::PM1_EVT_LEN;
    f.pm1a_cnt_blk = u32::from(pm::PM1A_CNT).into();
    f.pm1_cnt_len = pm::PM1_CNT_LEN;
    f.century = chipset::cmos::CENTURY;
    f.iapc_boot_arch = IAPC_VGA_NOT_PRESENT.into();
    f.reset_reg = acpi_tables::gas::GAS::new(
        acpi_tables::gas::AddressSpace::SystemIo,
        8,
        0,
        acpi_tables::gas::AccessSize::ByteAccess,
        u64::from(chipset::pci::RESET_PORT),
    );
    f.reset_value = 0x06;
    f.finalize()
}

fn madt(vcpus: u32) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        1,
        LocalInterruptController::Address(layout::LAPIC_ADDR),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    // The IOAPIC gets the first ID after the processors'.
    madt.add_structure(IoApic::new(vcpus as u8, layout::IOAPIC_ADDR, 0));
    madt
}

fn dsdt(devices: &[&dyn Aml]) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, 1);
    // \_S5: SLP_TYPa/SLP_TYPb for soft-off, matched by the PM1a_CNT handler.
    let s5 = aml::Package::new(vec![&pm::SLP_TYP_S5, &pm::SLP_TYP_S5, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut dsdt);
    let sb = aml::Scope::new("\\_SB_".into(), devices.to_vec());
    sb.to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    dsdt
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let len = mem.read_obj::<u32>(addr + 4).unwrap() as usize;
        let mut t = vec![0u8; len];
        mem.read(addr, &mut t).unwrap();
        t
    }

    #[test]
    fn tables_link_up_with_valid_checksums() {
        let mem = GuestMemory::new(&[(0, 1 << 20)]).unwrap();
        let rsdp = write_tables(&mem, 3, &[]).unwrap();
        assert_eq!(rsdp, layout::ACPI_START);
        let mut r = [0u8; 36];
        mem.read(rsdp, &mut r).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt = table_at(&mem, u64::from_le_bytes(r[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let entries: Vec<u64> = xsdt[36..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let fadt = table_at(&mem, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert!(checksum_ok(&fadt));
        // PM1a_CNT_BLK at offset 64.
        assert_eq!(
            u32::from_le_bytes(fadt[64..68].try_into().unwrap()),
            u32::from(pm::PM1A_CNT)
        );
        let dsdt = table_at(
            &mem,
            u32::from_le_bytes(fadt[40..44].try_into().unwrap()) as u64,
        );
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        let madt = table_at(&mem, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        // Three local APIC entries (type 0), one IOAPIC (type 1).
        let mut types = vec![];
        let mut at = 44;
        while at < madt.len() {
            types.push(madt[at]);
            at += madt[at + 1] as usize;
        }
        assert_eq!(types, vec![0, 0, 0, 1]);
    }
}
