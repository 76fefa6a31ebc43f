//! Fuzzes opening and reading VHDX files. The input is a list of 5-byte mutations (u32 offset,
//! value) applied to a valid template image (a dynamic disk with data, whose first 4 MiB hold
//! every metadata structure), so the fuzzer spends its time in the parsers instead of
//! rediscovering the format. The last input byte chooses read-only or read-write (which
//! replays logs into the file and then writes).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vhdx::vhdx::{Vhdx, VhdxBuilder};
use vhdx::Disk;

fn scratch_dir() -> std::path::PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("vhdx-fuzz-{}", std::process::id()))
}

fn template() -> &'static Vec<u8> {
    static T: OnceLock<Vec<u8>> = OnceLock::new();
    T.get_or_init(|| {
        let dir = scratch_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("template.vhdx");
        let _ = std::fs::remove_file(&p);
        let d = VhdxBuilder::new(6 << 20)
            .block_size(1 << 20)
            .create(&p)
            .unwrap();
        d.write_at(&vec![0x5a; 1 << 20], 1 << 20).unwrap();
        d.write_at(&vec![0xa5; 4096], 5 << 20).unwrap();
        // Leave the log populated with the session's entries.
        d.flush().unwrap();
        d.close().unwrap();
        std::fs::read(&p).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let t = template();
    let mut img = t.clone();
    for rec in data.chunks_exact(5) {
        let off = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize;
        // Bias towards the metadata area (first 4 MiB + BAT/metadata), wrap over the file.
        let at = if off & 0x8000_0000 != 0 {
            off % img.len()
        } else {
            off % (4 << 20).min(img.len())
        };
        img[at] = rec[4];
    }
    let read_write = data.len() % 5 == 1 && data.last().is_some_and(|b| b & 1 == 1);
    let p = scratch_dir().join("case.vhdx");
    std::fs::write(&p, &img).unwrap();
    if let Ok(d) = Vhdx::open(&p, !read_write) {
        let _ = d.info();
        let size = d.size().min(16 << 20);
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            let _ = d.read_at(&mut buf[..n], pos);
            pos += n as u64;
        }
        if read_write {
            let _ = d.write_at(&[7u8; 4096], 0);
            let _ = d.unmap(1 << 20, 1 << 20);
            let _ = d.flush();
            let _ = d.close();
            let _ = Vhdx::open(&p, true);
        }
    }
});
