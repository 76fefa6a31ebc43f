//! Tiny guests for `viridian run` tests: bzImage files whose 64-bit entry point runs a few
//! hand-assembled instructions.

use std::path::PathBuf;

/// mov dx, 0x604; mov ax, SLP_TYP(5) | SLP_EN; out dx, ax: ACPI S5 power-off.
#[allow(dead_code)]
pub const POWER_OFF: &[u8] = &[
    0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef, 0xeb, 0xfe,
];
/// mov dx, 0xcf9; mov al, 6; out dx, al: reset through the reset control register.
#[allow(dead_code)]
pub const RESET: &[u8] = &[0x66, 0xba, 0xf9, 0x0c, 0xb0, 0x06, 0xee, 0xeb, 0xfe];
/// ud2 with no usable IDT: #UD, #GP, #DF, then a triple fault.
#[allow(dead_code)]
pub const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];
/// Echoes COM1: polls LSR for data, reads a byte and writes it back; after a `q`, powers off.
#[allow(dead_code)]
pub const ECHO: &[u8] = &[
    0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (LSR)
    0xec, // in al, dx
    0xa8, 0x01, // test al, 1 (data ready)
    0x74, 0xf7, // jz back to the start
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8 (RBR/THR)
    0xec, // in al, dx
    0xee, // out dx, al
    0x3c, b'q', // cmp al, 'q'
    0x75, 0xed, // jne back to the start
    // power off, as POWER_OFF
    0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef, 0xeb, 0xfe,
];
/// jmp $
#[allow(dead_code)]
pub const SPIN: &[u8] = &[0xeb, 0xfe];

/// Writes a bzImage whose 64-bit entry point runs `code`, and returns its path.
pub fn tiny_kernel(name: &str, code: &[u8]) -> PathBuf {
    let setup = 5 * 512;
    let mut img = vec![0u8; setup + 0x200 + code.len()];
    img[0x1f1] = 4;
    img[0x201] = 0x6a;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1;
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    img[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[setup + 0x200..].copy_from_slice(code);
    let dir = std::env::temp_dir().join(format!("viridian-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, img).unwrap();
    path
}

/// Whether /dev/kvm can be opened; prints why not.
#[allow(dead_code)]
pub fn kvm_usable() -> bool {
    match std::fs::File::open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm: {e}");
            false
        }
    }
}
