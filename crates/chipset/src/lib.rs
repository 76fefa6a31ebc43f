//! PC chipset devices behind port I/O: the COM1 16550 UART, CMOS/RTC, the i8042 reset line,
//! PCI configuration ports that report "no devices", the port 0xCF9 reset control register and
//! the ACPI PM1 registers that carry S5 power-off.
//!
//! Sans-I/O: [`Chipset::pio_write`] returns a [`PowerRequest`] when the guest asks to power off or
//! reset; the caller decides what that means for the VM.
#![forbid(unsafe_code)]

pub mod cmos;
pub mod i8042;
pub mod pci;
pub mod pm;
mod save;
pub mod serial;

pub use save::{SavedChipset, SavedCmos, SavedPm, SavedSerial};

use std::sync::Mutex;
use support::lock;

/// A guest request to change the machine's power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    /// ACPI S5 through PM1a_CNT.
    PowerOff,
    /// i8042 pulse-reset command or port 0xCF9.
    Reset,
}

/// Why a saved chipset state cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreError(pub String);

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RestoreError {}

/// Ports the chipset claims, for documentation and tests.
pub const COM1: u16 = 0x3f8;

/// The legacy devices of the virtual machine, addressed by I/O port. Each device has its own
/// lock, so vCPUs touching different devices never wait for each other (the console and the
/// RTC, for example), and no lock spans the whole chipset.
pub struct Chipset {
    pub serial: Mutex<serial::Serial>,
    pub cmos: Mutex<cmos::Cmos>,
    pub i8042: Mutex<i8042::I8042>,
    pub pci: Mutex<pci::PciConfig>,
    pub pm: Mutex<pm::AcpiPm>,
}

static UNCLAIMED_LOG: support::RateLimit = support::RateLimit::guest();

impl Chipset {
    pub fn new(serial: serial::Serial, cmos: cmos::Cmos) -> Self {
        Self {
            serial: Mutex::new(serial),
            cmos: Mutex::new(cmos),
            i8042: Mutex::default(),
            pci: Mutex::default(),
            pm: Mutex::default(),
        }
    }

    /// Handles a guest `in` from `port`, filling `data` (1, 2 or 4 bytes).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            COM1..=0x3ff if data.len() == 1 => data[0] = lock(&self.serial).read(port - COM1),
            cmos::INDEX_PORT | cmos::DATA_PORT => lock(&self.cmos).read(port, data),
            i8042::DATA_PORT | i8042::COMMAND_PORT => lock(&self.i8042).read(port, data),
            pci::ADDRESS_PORT..=pci::DATA_PORT_END => lock(&self.pci).read(port, data),
            pm::PM1A_EVT..=pm::PM1A_CNT_END => lock(&self.pm).read(port, data),
            _ => {
                data.fill(0xff);
                support::limited!(
                    UNCLAIMED_LOG,
                    debug,
                    port,
                    len = data.len(),
                    "read from unclaimed I/O port"
                );
            }
        }
    }

    /// Handles a guest `out` of `data` to `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<PowerRequest> {
        match port {
            COM1..=0x3ff if data.len() == 1 => {
                lock(&self.serial).write(port - COM1, data[0]);
                None
            }
            cmos::INDEX_PORT | cmos::DATA_PORT => {
                lock(&self.cmos).write(port, data);
                None
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT => lock(&self.i8042).write(port, data),
            pci::ADDRESS_PORT..=pci::DATA_PORT_END => lock(&self.pci).write(port, data),
            pm::PM1A_EVT..=pm::PM1A_CNT_END => lock(&self.pm).write(port, data),
            // POST diagnostic codes.
            0x80 => None,
            _ => {
                support::limited!(
                    UNCLAIMED_LOG,
                    debug,
                    port,
                    ?data,
                    "write to unclaimed I/O port"
                );
                None
            }
        }
    }
}

/// Little-endian bytes of `value` truncated to `data.len()` (port reads of 1, 2 or 4 bytes).
fn fill_le(data: &mut [u8], value: u32) {
    let bytes = value.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&bytes[..n]);
}

/// The little-endian value of up to 4 bytes of port data.
fn read_le(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chipset() -> Chipset {
        let serial = serial::Serial::new(Box::new(std::io::sink())).unwrap();
        Chipset::new(serial, cmos::Cmos::new(0, 0))
    }

    #[test]
    fn unclaimed_ports_read_all_ones() {
        let c = chipset();
        let mut data = [0u8; 2];
        c.pio_read(0x1234, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(c.pio_write(0x1234, &[1]), None);
    }

    #[test]
    fn power_requests_are_routed() {
        let c = chipset();
        assert_eq!(
            c.pio_write(i8042::COMMAND_PORT, &[0xfe]),
            Some(PowerRequest::Reset)
        );
        assert_eq!(
            c.pio_write(pci::RESET_PORT, &[0x06]),
            Some(PowerRequest::Reset)
        );
        let s5 = (u16::from(pm::SLP_TYP_S5) << 10) | pm::SLP_EN;
        assert_eq!(
            c.pio_write(pm::PM1A_CNT, &s5.to_le_bytes()),
            Some(PowerRequest::PowerOff)
        );
    }
}
