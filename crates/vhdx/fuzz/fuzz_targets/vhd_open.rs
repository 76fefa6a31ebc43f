//! Fuzzes opening, checking and reading legacy VHD files. The input is a list of 5-byte
//! mutations (u32 offset, value) applied to a valid template, so the fuzzer spends its time in
//! the parsers. Input byte 0 selects: bits 0-1 the template (dynamic, differencing child whose
//! parent sits next to it, fixed); bit 2 recomputing the footer and header checksums after
//! mutating; bit 3 a read-write open (writes, flush, unmap, reopen); bit 4 truncating the file
//! at the offset given by the first mutation.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vhdx::vhd::format::checksum;
use vhdx::vhd::{DiskType, Vhd, VhdCreateOptions, VhdOpenOptions};
use vhdx::Disk;

fn scratch_dir() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("vhd-fuzz-{}", std::process::id()))
}

fn templates() -> &'static [Vec<u8>; 3] {
    static T: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    T.get_or_init(|| {
        let dir = scratch_dir();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mk = |name: &str, ty, parent: Option<PathBuf>| {
            let p = dir.join(name);
            let d = Vhd::create(
                &p,
                &VhdCreateOptions {
                    disk_type: ty,
                    size: 6 << 20,
                    block_size: 512 << 10,
                    parent,
                },
            )
            .unwrap();
            d.write_at(&[0x5a; 8192], 1 << 20).unwrap();
            d.write_at(&[0xa5; 4096], (5 << 20) - 2048).unwrap();
            d.flush().unwrap();
            drop(d);
            std::fs::read(&p).unwrap()
        };
        let dynamic = mk("parent.vhd", DiskType::Dynamic, None);
        let child = mk(
            "child.vhd",
            DiskType::Differencing,
            Some(dir.join("parent.vhd")),
        );
        let fixed = mk("fixed.vhd", DiskType::Fixed, None);
        [dynamic, child, fixed]
    })
}

fn fix_checksums(b: &mut [u8]) {
    let len = b.len();
    for at in [0, len.saturating_sub(512)] {
        if len >= at + 512 && &b[at..at + 8] == b"conectix" {
            let s = checksum(&b[at..at + 512], 64);
            b[at + 64..at + 68].copy_from_slice(&s.to_be_bytes());
        }
    }
    if len >= 1536 && &b[512..520] == b"cxsparse" {
        let s = checksum(&b[512..1536], 36);
        b[512 + 36..512 + 40].copy_from_slice(&s.to_be_bytes());
    }
}

fn exercise(d: &Vhd) {
    let _ = d.check();
    let _ = d.info();
    let _ = d.allocated_ranges();
    let size = d.size().min(8 << 20) / 512 * 512;
    let mut buf = vec![0u8; size as usize];
    let _ = d.read_at(&mut buf, 0);
    let end = d.size() / 512 * 512;
    if end >= 4096 {
        let mut tail = [0u8; 4096];
        let _ = d.read_at(&mut tail, end - 4096);
    }
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let mode = data[0];
    let mut img = templates()[(mode & 3) as usize % 3].clone();
    let mut first = None;
    for m in data[1..].chunks_exact(5) {
        let off = u32::from_le_bytes([m[0], m[1], m[2], m[3]]) as usize;
        first.get_or_insert(off);
        // Concentrate on metadata: the first 8 KiB and the footer.
        let off = if off & 0x8000_0000 != 0 {
            img.len() - 512 + off % 512
        } else {
            off % img.len().min(8192)
        };
        img[off] = m[4];
    }
    if mode & 4 != 0 {
        fix_checksums(&mut img);
    }
    if mode & 16 != 0 {
        let cut = first.unwrap_or(0) % (img.len() + 1);
        img.truncate(cut);
    }
    let dir = scratch_dir();
    let p = dir.join("input.vhd");
    std::fs::write(&p, &img).unwrap();
    let rw = mode & 8 != 0;
    let opts = VhdOpenOptions {
        read_only: !rw,
        no_parent: false,
    };
    if let Ok(d) = Vhd::open(&p, &opts) {
        exercise(&d);
        if rw {
            let size = d.size() / 512 * 512;
            if size >= 8192 {
                let _ = d.write_at(&[0x42; 4096], size / 2 / 512 * 512);
                let _ = d.unmap(0, 4096);
                let _ = d.flush();
            }
            drop(d);
            if let Ok(d) = Vhd::open(&p, &opts) {
                exercise(&d);
            }
        }
    }
});
