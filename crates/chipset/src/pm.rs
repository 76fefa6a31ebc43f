//! ACPI fixed-hardware PM1a event and control registers (the FADT points at them). The guest
//! powers off by writing SLP_TYP = S5 with SLP_EN to PM1a_CNT.

use crate::{fill_le, read_le, PowerRequest};

/// PM1a_EVT_BLK: status (2 bytes) then enable (2 bytes).
pub const PM1A_EVT: u16 = 0x600;
pub const PM1_EVT_LEN: u8 = 4;
/// PM1a_CNT_BLK (2 bytes).
pub const PM1A_CNT: u16 = 0x604;
pub const PM1_CNT_LEN: u8 = 2;
pub const PM1A_CNT_END: u16 = PM1A_CNT + PM1_CNT_LEN as u16 - 1;
/// The SLP_TYP value the DSDT's `\_S5` package names.
pub const SLP_TYP_S5: u8 = 5;
pub const SLP_EN: u16 = 1 << 13;
const SCI_EN: u16 = 1;

#[derive(Default)]
pub struct AcpiPm {
    pub(crate) status: u16,
    pub(crate) enable: u16,
    pub(crate) control: u16,
}

impl AcpiPm {
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        // Registers are byte addressable; build the 6-byte block and slice it.
        let mut block = [0u8; 6];
        block[0..2].copy_from_slice(&self.status.to_le_bytes());
        block[2..4].copy_from_slice(&self.enable.to_le_bytes());
        block[4..6].copy_from_slice(&(self.control | SCI_EN).to_le_bytes());
        let start = usize::from(port - PM1A_EVT);
        let mut value = [0u8; 4];
        for (i, v) in value.iter_mut().enumerate().take(data.len()) {
            *v = block.get(start + i).copied().unwrap_or(0xff);
        }
        fill_le(data, u32::from_le_bytes(value));
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<PowerRequest> {
        let value = read_le(data);
        match (port, data.len()) {
            // Write one to clear.
            (PM1A_EVT, 2) | (PM1A_EVT, 4) => {
                self.status &= !(value as u16);
                if data.len() == 4 {
                    self.enable = (value >> 16) as u16;
                }
            }
            (p, 2) if p == PM1A_EVT + 2 => self.enable = value as u16,
            (PM1A_CNT, 2) => {
                let v = value as u16;
                self.control = v & !SLP_EN;
                let slp_typ = ((v >> 10) & 7) as u8;
                if v & SLP_EN != 0 && slp_typ == SLP_TYP_S5 {
                    return Some(PowerRequest::PowerOff);
                }
            }
            _ => {
                static LOG: support::RateLimit = support::RateLimit::guest();
                support::limited!(LOG, debug, port, ?data, "unsupported PM1 register access");
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sci_is_enabled_and_other_sleep_states_are_ignored() {
        let mut pm = AcpiPm::default();
        let mut d = [0u8; 2];
        pm.read(PM1A_CNT, &mut d);
        assert_eq!(u16::from_le_bytes(d) & SCI_EN, SCI_EN);
        // S3 is not supported: nothing happens.
        let s3 = (3u16 << 10) | SLP_EN;
        assert_eq!(pm.write(PM1A_CNT, &s3.to_le_bytes()), None);
        pm.write(PM1A_EVT + 2, &0x0100u16.to_le_bytes());
        pm.read(PM1A_EVT + 2, &mut d);
        assert_eq!(u16::from_le_bytes(d), 0x0100);
    }
}
