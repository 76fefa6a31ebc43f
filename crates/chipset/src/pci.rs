//! PCI configuration mechanism #1 with a bus that holds only a host bridge at 00:00.0, so the
//! guest's PCI probe succeeds at once and finds nothing else; and the reset control register at
//! 0xCF9, which shares the port range.

use crate::{fill_le, read_le, PowerRequest};

pub const ADDRESS_PORT: u16 = 0xcf8;
pub const RESET_PORT: u16 = 0xcf9;
pub const DATA_PORT: u16 = 0xcfc;
pub const DATA_PORT_END: u16 = 0xcff;

/// Reset control: bit 2 starts the reset (bit 1 selects a hard reset; both reset the VM).
const RESET_CPU: u8 = 0x04;
const ENABLE: u32 = 1 << 31;

/// The host bridge's first 16 bytes of configuration space: an Intel 440FX (vendor 8086,
/// device 1237), class 06/00 (host bridge), header type 0.
const HOST_BRIDGE: [u32; 4] = [0x1237_8086, 0x0000_0000, 0x0600_0002, 0x0000_0000];

#[derive(Default)]
pub struct PciConfig {
    pub(crate) address: u32,
}

impl PciConfig {
    /// The configuration dword the address register selects, if any device answers.
    fn selected(&self) -> Option<u32> {
        let a = self.address;
        let (bus, dev, func, reg) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 7, a & 0xfc);
        if a & ENABLE == 0 || bus != 0 || dev != 0 || func != 0 {
            return None;
        }
        Some(HOST_BRIDGE.get(reg as usize / 4).copied().unwrap_or(0))
    }

    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match port {
            ADDRESS_PORT if data.len() == 4 => fill_le(data, self.address),
            DATA_PORT..=DATA_PORT_END => {
                let shift = u32::from(port - DATA_PORT) * 8;
                // Bytes past the end of the dword read as ones.
                let value = self
                    .selected()
                    .map_or(u32::MAX, |v| (v >> shift) | !(u32::MAX >> shift));
                fill_le(data, value);
            }
            _ => data.fill(0xff),
        }
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<PowerRequest> {
        match (port, data.len()) {
            (ADDRESS_PORT, 4) => self.address = read_le(data),
            (RESET_PORT, 1) if data[0] & RESET_CPU != 0 => return Some(PowerRequest::Reset),
            // The host bridge has no writable registers.
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &mut PciConfig, addr: u32, port: u16, len: usize) -> u32 {
        p.write(ADDRESS_PORT, &addr.to_le_bytes());
        let mut d = vec![0u8; len];
        p.read(port, &mut d);
        let mut b = [0u8; 4];
        b[..len].copy_from_slice(&d);
        u32::from_le_bytes(b)
    }

    #[test]
    fn only_the_host_bridge_answers() {
        let mut p = PciConfig::default();
        assert_eq!(read(&mut p, 0x8000_0000, DATA_PORT, 4), 0x1237_8086);
        assert_eq!(read(&mut p, 0x8000_0000, DATA_PORT + 2, 2), 0x1237);
        assert_eq!(read(&mut p, 0x8000_0008, DATA_PORT + 3, 1), 0x06);
        // Device 1, and the address register with the enable bit clear: nothing there.
        assert_eq!(read(&mut p, 0x8000_0800, DATA_PORT, 4), u32::MAX);
        assert_eq!(read(&mut p, 0x0000_0000, DATA_PORT, 4), u32::MAX);
        let mut d = [0u8; 4];
        p.read(ADDRESS_PORT, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        assert_eq!(p.write(RESET_PORT, &[0x02]), None);
        assert_eq!(p.write(RESET_PORT, &[0x06]), Some(PowerRequest::Reset));
    }
}
