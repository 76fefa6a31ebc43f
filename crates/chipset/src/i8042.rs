//! Just enough of the i8042 keyboard controller for the guest to reset the machine with the
//! pulse-reset command (0xFE), which Linux uses as one of its reboot methods.

use crate::PowerRequest;

pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;

const CMD_READ_CONFIG: u8 = 0x20;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_PULSE_RESET: u8 = 0xfe;
const STATUS_OUTPUT_FULL: u8 = 0x01;

/// The controller: no keyboard or mouse attached.
#[derive(Default)]
pub struct I8042 {
    pub(crate) output: Option<u8>,
}

impl I8042 {
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0);
        data[0] = if port == COMMAND_PORT {
            if self.output.is_some() {
                STATUS_OUTPUT_FULL
            } else {
                0
            }
        } else {
            self.output.take().unwrap_or(0)
        };
    }

    pub fn write(&mut self, port: u16, data: &[u8]) -> Option<PowerRequest> {
        if port != COMMAND_PORT {
            return None;
        }
        match data[0] {
            CMD_PULSE_RESET => return Some(PowerRequest::Reset),
            CMD_READ_CONFIG => self.output = Some(0),
            CMD_SELF_TEST => self.output = Some(0x55),
            _ => {}
        }
        None
    }
}
