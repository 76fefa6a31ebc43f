//! PCI configuration mechanism #1 with an empty bus (every read is all ones, so probing ends
//! at once), and the reset control register at 0xCF9 that shares the port range.

use crate::{fill_le, PowerRequest};

pub const ADDRESS_PORT: u16 = 0xcf8;
pub const RESET_PORT: u16 = 0xcf9;
pub const DATA_PORT_END: u16 = 0xcff;

/// Reset control: bit 2 starts the reset (bit 1 selects a hard reset; both reset the VM).
const RESET_CPU: u8 = 0x04;

#[derive(Default)]
pub struct PciConfig {
    address: u32,
}

impl PciConfig {
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        if port == ADDRESS_PORT && data.len() == 4 {
            fill_le(data, self.address);
        } else {
            data.fill(0xff);
        }
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<PowerRequest> {
        match (port, data.len()) {
            (ADDRESS_PORT, 4) => self.address = crate::read_le(data),
            (RESET_PORT, 1) if data[0] & RESET_CPU != 0 => return Some(PowerRequest::Reset),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_bus_reads_all_ones() {
        let mut p = PciConfig::default();
        p.write(ADDRESS_PORT, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        p.read(ADDRESS_PORT, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
        p.read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(p.write(RESET_PORT, &[0x02]), None);
    }
}
