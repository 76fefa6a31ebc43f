//! Fuzzes opening and reading VHDX files. The input is a list of 5-byte mutations (u32 offset,
//! value) applied to a valid template image whose first 4 MiB hold every metadata structure,
//! so the fuzzer spends its time in the parsers instead of rediscovering the format.
//! Input byte 0 selects: bit 0 the template with a pending log (copied while a write session
//! was open, so every open replays it) or the clean one; bit 1 recomputing the header and
//! region-table checksums after mutating (so mutations get past the CRCs); bit 2 a read-write
//! open (replay into the file, then writes, close, reopen).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vhdx::vhdx::format;
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

fn templates() -> &'static (Vec<u8>, Vec<u8>) {
    static T: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
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
        d.unmap(1 << 20, 4096).unwrap();
        d.flush().unwrap();
        // The session is open: the log GUID is set and the log holds the BAT updates.
        let dirty = std::fs::read(&p).unwrap();
        d.close().unwrap();
        (std::fs::read(&p).unwrap(), dirty)
    })
}

fn fix_crcs(img: &mut [u8]) {
    for off in format::HEADER_OFFSETS {
        let o = off as usize;
        let h = &mut img[o..o + format::HEADER_SIZE];
        format::put32(h, 4, 0);
        let c = format::crc32c(h);
        format::put32(h, 4, c);
    }
    for off in format::REGION_TABLE_OFFSETS {
        let o = off as usize;
        let r = &mut img[o..o + format::REGION_TABLE_SIZE];
        format::put32(r, 4, 0);
        let c = format::crc32c(r);
        format::put32(r, 4, c);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, muts)) = data.split_first() else {
        return;
    };
    let (clean, dirty) = templates();
    let mut img = if mode & 1 == 1 {
        dirty.clone()
    } else {
        clean.clone()
    };
    for rec in muts.chunks_exact(5) {
        let off = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize;
        // Mostly the metadata area (first 4 MiB: headers, log, metadata, BAT).
        let at = if off & 0x8000_0000 != 0 {
            off % img.len()
        } else {
            off % (4 << 20).min(img.len())
        };
        img[at] = rec[4];
    }
    if mode & 2 == 2 {
        fix_crcs(&mut img);
    }
    let read_write = mode & 4 == 4;
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
