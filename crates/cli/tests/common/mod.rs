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

/// Counts in memory (at 0x50000) and prints each count on COM1 as 8 hex digits and a newline,
/// a few hundred a second on an idle host. First it enables the hypercall page (guest OS id, then the
/// hypercall MSR at page 0x40), and before each count it reads the hypercall MSR back: if it
/// ever differs (its Hyper-V state was lost), it prints `X` and halts.
#[allow(dead_code)]
pub const COUNT: &[u8] = &[
    0xb9, 0x00, 0x00, 0x00, 0x40, // mov ecx, HV_X64_MSR_GUEST_OS_ID
    0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
    0xba, 0x00, 0x00, 0x00, 0x81, // mov edx, 0x81000000
    0x0f, 0x30, // wrmsr
    0xb9, 0x01, 0x00, 0x00, 0x40, // mov ecx, HV_X64_MSR_HYPERCALL
    0xb8, 0x01, 0x00, 0x04, 0x00, // mov eax, 0x40001 (page 0x40, enabled)
    0x31, 0xd2, // xor edx, edx
    0x0f, 0x30, // wrmsr
    // top:
    0xb9, 0x01, 0x00, 0x00, 0x40, // mov ecx, HV_X64_MSR_HYPERCALL
    0x0f, 0x32, // rdmsr
    0x3d, 0x01, 0x00, 0x04, 0x00, // cmp eax, 0x40001
    0x75, 0x3d, // jne bad
    0xff, 0x04, 0x25, 0x00, 0x00, 0x05, 0x00, // inc dword [0x50000]
    0x8b, 0x1c, 0x25, 0x00, 0x00, 0x05, 0x00, // mov ebx, [0x50000]
    0xb9, 0x08, 0x00, 0x00, 0x00, // mov ecx, 8
    // digit:
    0xc1, 0xc3, 0x04, // rol ebx, 4
    0x89, 0xd8, // mov eax, ebx
    0x83, 0xe0, 0x0f, // and eax, 0xf
    0x83, 0xf8, 0x0a, // cmp eax, 10
    0x72, 0x03, // jb +3
    0x83, 0xc0, 0x27, // add eax, 'a' - '0' - 10
    0x83, 0xc0, 0x30, // add eax, '0'
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xee, // out dx, al
    0xff, 0xc9, // dec ecx
    0x75, 0xe4, // jnz digit
    0xb0, 0x0a, // mov al, '\n'
    0xee, // out dx, al
    0xbe, 0x00, 0x40, 0x00, 0x00, // mov esi, 0x4000 (a delay)
    0xff, 0xce, // dec esi
    0x75, 0xfc, // jnz back
    0xeb, 0xb5, // jmp top
    // bad:
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, 0x58, // mov al, 'X'
    0xee, // out dx, al
    0xf4, // hlt
    0xeb, 0xfd, // jmp hlt
];

/// Checks that `text` is [`COUNT`]'s output from 1 on, with no gap and no restart; returns the
/// last count.
#[allow(dead_code)]
pub fn assert_counts_on(text: &str) -> u32 {
    assert!(
        !text.contains('X'),
        "the guest lost its hypercall MSR: {text}"
    );
    let mut expected = 1u32;
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let n = u32::from_str_radix(line, 16)
            .unwrap_or_else(|_| panic!("not a count: {line:?} in\n{text}"));
        assert_eq!(n, expected, "the count jumped or restarted:\n{text}");
        expected += 1;
    }
    expected - 1
}
