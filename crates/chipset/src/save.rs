//! Save and restore of the chipset: COM1's registers and receive FIFO, the CMOS RAM and the
//! guest's RTC offset, the i8042's output byte, the PCI address latch and the ACPI PM
//! registers. Console input still queued in front of COM1 is the host's, and is not saved.

use crate::{Chipset, RestoreError};
use serde::{Deserialize, Serialize};
use support::lock;
use vm_superio::serial::SerialState;

/// Layout version of [`SavedChipset`].
pub const SAVED_VERSION: u32 = 1;

/// The chipset's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedChipset {
    pub version: u32,
    pub serial: SavedSerial,
    pub cmos: SavedCmos,
    pub i8042_output: Option<u8>,
    pub pci_address: u32,
    pub pm: SavedPm,
}

/// The 16550's registers, as vm-superio keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSerial {
    pub divisor_low: u8,
    pub divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub receive_fifo: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCmos {
    pub index: u8,
    pub ram: Vec<u8>,
    pub offset_secs: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPm {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
}

impl Chipset {
    /// Captures every device. Take it with the vCPUs out of the guest.
    pub fn save(&self) -> SavedChipset {
        let s = lock(&self.serial).state();
        let cmos = lock(&self.cmos);
        let pm = lock(&self.pm);
        SavedChipset {
            version: SAVED_VERSION,
            serial: SavedSerial {
                divisor_low: s.baud_divisor_low,
                divisor_high: s.baud_divisor_high,
                interrupt_enable: s.interrupt_enable,
                interrupt_identification: s.interrupt_identification,
                line_control: s.line_control,
                line_status: s.line_status,
                modem_control: s.modem_control,
                modem_status: s.modem_status,
                scratch: s.scratch,
                receive_fifo: s.in_buffer,
            },
            cmos: SavedCmos {
                index: cmos.index,
                ram: cmos.ram.to_vec(),
                offset_secs: cmos.offset_secs,
            },
            i8042_output: lock(&self.i8042).output,
            pci_address: lock(&self.pci).address,
            pm: SavedPm {
                status: pm.status,
                enable: pm.enable,
                control: pm.control,
            },
        }
    }

    /// Restores a saved chipset. Everything is checked first; on error nothing changes.
    pub fn restore(&self, saved: &SavedChipset) -> Result<(), RestoreError> {
        if saved.version != SAVED_VERSION {
            return Err(RestoreError(format!(
                "chipset state version {} is not supported (this build reads {SAVED_VERSION})",
                saved.version
            )));
        }
        let ram: [u8; 128] = saved.cmos.ram.as_slice().try_into().map_err(|_| {
            RestoreError(format!(
                "CMOS: {} bytes of RAM, not 128",
                saved.cmos.ram.len()
            ))
        })?;
        if saved.cmos.index >= 128 {
            return Err(RestoreError(format!(
                "CMOS: index {} is out of range",
                saved.cmos.index
            )));
        }
        let s = &saved.serial;
        lock(&self.serial).set_state(&SerialState {
            baud_divisor_low: s.divisor_low,
            baud_divisor_high: s.divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.receive_fifo.clone(),
        })?;
        let mut cmos = lock(&self.cmos);
        cmos.index = saved.cmos.index;
        cmos.ram = ram;
        cmos.offset_secs = saved.cmos.offset_secs;
        drop(cmos);
        lock(&self.i8042).output = saved.i8042_output;
        lock(&self.pci).address = saved.pci_address;
        let mut pm = lock(&self.pm);
        pm.status = saved.pm.status;
        pm.enable = saved.pm.enable;
        pm.control = saved.pm.control;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cmos, serial::Serial, COM1};

    fn chipset() -> Chipset {
        Chipset::new(
            Serial::new(Box::new(std::io::sink())).unwrap(),
            cmos::Cmos::new(64 << 20, 0),
        )
    }

    #[test]
    fn round_trip_keeps_registers_and_refuses_bad_state() {
        let a = chipset();
        a.pio_write(COM1 + 3, &[0x83]); // DLAB
        a.pio_write(COM1, &[0x0c]); // divisor 12
        a.pio_write(COM1 + 3, &[0x03]);
        a.pio_write(COM1 + 7, &[0x5a]); // scratch
        support::lock(&a.serial).enqueue_input(b"hi");
        a.pio_write(cmos::INDEX_PORT, &[0x40]);
        a.pio_write(cmos::DATA_PORT, &[0x99]);
        a.pio_write(0xcf8, &0x8000_0010u32.to_le_bytes());
        let saved = a.save();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SavedChipset = serde_json::from_str(&json).unwrap();

        let b = chipset();
        b.restore(&back).unwrap();
        assert_eq!(b.save(), saved);
        let mut v = [0u8];
        b.pio_read(COM1 + 7, &mut v);
        assert_eq!(v[0], 0x5a);
        b.pio_read(COM1, &mut v);
        assert_eq!(v[0], b'h', "the receive FIFO came back");
        b.pio_read(cmos::DATA_PORT, &mut v);
        assert_eq!(v[0], 0x99, "the CMOS index and RAM came back");

        let mut bad = saved.clone();
        bad.cmos.ram.pop();
        assert!(b
            .restore(&bad)
            .unwrap_err()
            .to_string()
            .contains("127 bytes"));
        let mut bad = saved.clone();
        bad.serial.receive_fifo = vec![0; 65];
        assert!(b.restore(&bad).unwrap_err().to_string().contains("FIFO"));
        let mut bad = saved;
        bad.version = 9;
        assert!(b
            .restore(&bad)
            .unwrap_err()
            .to_string()
            .contains("version 9"));
    }
}
