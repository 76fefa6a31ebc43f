//! Arbitrary sequences of guest port reads and writes (any port, 1, 2 or 4 bytes, any data)
//! against the whole chipset: UART, CMOS/RTC, i8042, PCI configuration ports, ACPI PM and
//! unclaimed ports. Panics and hangs are bugs; a read must fill exactly the bytes asked for.
#![no_main]

use chipset::{cmos::Cmos, serial::Serial, Chipset};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    In { port: u16, size: u8 },
    Out { port: u16, size: u8, value: u32 },
    /// Bias towards the ports that have devices.
    InDevice { which: u8, offset: u8, size: u8 },
    OutDevice { which: u8, offset: u8, size: u8, value: u32 },
    Input { bytes: Vec<u8> },
}

const BASES: [u16; 6] = [0x3f8, 0x70, 0x60, 0xcf8, 0x600, 0xcf9];

fn size(s: u8) -> usize {
    [1, 2, 4][usize::from(s % 3)]
}

fuzz_target!(|ops: Vec<Op>| {
    let serial = Serial::new(Box::new(std::io::sink())).expect("serial");
    let c = Chipset::new(serial, Cmos::new(256 << 20, 0));
    for op in ops.into_iter().take(4096) {
        let (port, n, write) = match op {
            Op::In { port, size: s } => (port, size(s), None),
            Op::Out { port, size: s, value } => (port, size(s), Some(value)),
            Op::InDevice { which, offset, size: s } => (
                BASES[usize::from(which) % BASES.len()].wrapping_add(u16::from(offset % 16)),
                size(s),
                None,
            ),
            Op::OutDevice { which, offset, size: s, value } => (
                BASES[usize::from(which) % BASES.len()].wrapping_add(u16::from(offset % 16)),
                size(s),
                Some(value),
            ),
            Op::Input { bytes } => {
                c.serial.lock().unwrap().enqueue_input(&bytes);
                continue;
            }
        };
        match write {
            Some(v) => {
                let _ = c.pio_write(port, &v.to_le_bytes()[..n]);
            }
            None => {
                let mut data = [0xa5u8; 4];
                c.pio_read(port, &mut data[..n]);
                assert!(data[n..].iter().all(|&b| b == 0xa5), "read past its size");
            }
        }
    }
});
