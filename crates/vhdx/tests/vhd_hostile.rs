//! Hostile VHD files: truncated, bad checksums, absurd sizes and counts, overlapping or
//! out-of-file blocks, parent loops, and random corruption. Each must give a clear error naming
//! the structure and offset (or read consistently), never a panic or a huge allocation.

use std::path::Path;

use rand::{Rng, SeedableRng};
use vhdx::vhd::format::{checksum, DynHeader, Footer};
use vhdx::vhd::{DiskType, Vhd, VhdCreateOptions, VhdOpenOptions};
use vhdx::{Disk, Error};

fn ro() -> VhdOpenOptions {
    VhdOpenOptions {
        read_only: true,
        no_parent: false,
    }
}

fn make(dir: &Path, name: &str, ty: DiskType) -> (std::path::PathBuf, Vec<u8>) {
    let p = dir.join(name);
    let d = Vhd::create(
        &p,
        &VhdCreateOptions {
            disk_type: ty,
            size: 8 << 20,
            block_size: 1 << 20,
            parent: None,
        },
    )
    .unwrap();
    d.write_at(&[0xab; 8192], 1 << 20).unwrap();
    d.write_at(&[0xcd; 4096], 5 << 20).unwrap();
    d.flush().unwrap();
    drop(d);
    let bytes = std::fs::read(&p).unwrap();
    (p, bytes)
}

/// Opens, and expects a Corrupt error naming `structure`.
fn expect_corrupt(p: &Path, structure: &str) -> String {
    match Vhd::open(p, &ro()) {
        Err(Error::Corrupt {
            structure: s,
            ref problem,
            offset,
            ..
        }) => {
            assert_eq!(s, structure, "wrong structure: {problem} at {offset:#x}");
            let msg = Vhd::open(p, &ro()).err().unwrap().to_string();
            assert!(
                msg.contains(p.to_str().unwrap()) && msg.contains("offset"),
                "{msg}"
            );
            msg
        }
        Err(e) => panic!("expected Corrupt({structure}), got {e}"),
        Ok(_) => panic!("expected Corrupt({structure}), opened fine"),
    }
}

fn fix_footer(b: &mut [u8], at: usize) {
    let sum = checksum(&b[at..at + 512], 64);
    b[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
}

fn fix_header(b: &mut [u8]) {
    let sum = checksum(&b[512..1536], 36);
    b[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
}

/// Sets a footer field in both copies and fixes both checksums.
fn patch_footer(b: &mut [u8], off: usize, val: &[u8]) {
    let end = b.len() - 512;
    for at in [0, end] {
        b[at + off..at + off + val.len()].copy_from_slice(val);
        fix_footer(b, at);
    }
}

fn patch_header(b: &mut [u8], off: usize, val: &[u8]) {
    b[512 + off..512 + off + val.len()].copy_from_slice(val);
    fix_header(b);
}

#[test]
fn truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let (p, bytes) = make(dir.path(), "t.vhd", DiskType::Dynamic);
    let q = dir.path().join("cut.vhd");
    for len in [
        0,
        1,
        100,
        511,
        512,
        1000,
        1536,
        2000,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        std::fs::write(&q, &bytes[..len]).unwrap();
        match Vhd::open(&q, &ro()) {
            Err(Error::Corrupt { .. }) => {}
            Err(e) => panic!("len {len}: {e}"),
            // Cut inside the data: the footer copy at offset 0 is used; reads stay in bounds.
            Ok(d) => {
                // (A file one byte short still has a 511-byte footer, which old tools wrote.)
                if len == bytes.len() / 2 {
                    assert!(!d.warnings().is_empty(), "len {len}: no warning");
                }
                let mut buf = vec![0u8; 8 << 20];
                let _ = d.read_at(&mut buf, 0);
            }
        }
    }
    let _ = p;
}

#[test]
fn bad_checksums_and_cookies() {
    let dir = tempfile::tempdir().unwrap();
    let (p, good) = make(dir.path(), "c.vhd", DiskType::Dynamic);
    // Both footers bad.
    let mut b = good.clone();
    let end = b.len() - 512;
    b[end + 30] ^= 1;
    b[30] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let msg = expect_corrupt(&p, "footer");
    assert!(msg.contains("checksum"), "{msg}");
    // Only the end footer bad: the copy at 0 is used, with a warning and a check problem.
    let mut b = good.clone();
    b[end + 30] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let d = Vhd::open(&p, &ro()).unwrap();
    assert_eq!(d.warnings().len(), 1);
    assert!(!d.check().is_empty());
    drop(d);
    // Opened read-write, the end footer is repaired.
    drop(Vhd::open(&p, &VhdOpenOptions::default()).unwrap());
    let d = Vhd::open(&p, &ro()).unwrap();
    assert!(d.warnings().is_empty(), "{:?}", d.warnings());
    let mut buf = [0u8; 8192];
    d.read_at(&mut buf, 1 << 20).unwrap();
    assert_eq!(buf, [0xab; 8192]);
    drop(d);
    // Dynamic header checksum and cookie.
    let mut b = good.clone();
    b[512 + 40] ^= 1;
    std::fs::write(&p, &b).unwrap();
    expect_corrupt(&p, "dynamic header");
    let mut b = good.clone();
    b[512] = b'X';
    fix_header(&mut b);
    std::fs::write(&p, &b).unwrap();
    expect_corrupt(&p, "dynamic header");
    // Unknown disk type / version.
    let mut b = good.clone();
    patch_footer(&mut b, 60, &9u32.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    expect_corrupt(&p, "footer");
    let mut b = good.clone();
    patch_footer(&mut b, 12, &0x0002_0000u32.to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    expect_corrupt(&p, "footer");
}

#[test]
fn absurd_sizes_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (p, good) = make(dir.path(), "a.vhd", DiskType::Dynamic);
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Patch)> = vec![
        (
            "footer",
            Box::new(|b| patch_footer(b, 48, &u64::MAX.to_be_bytes())),
        ),
        (
            "footer",
            Box::new(|b| patch_footer(b, 48, &1001u64.to_be_bytes())),
        ),
        // 2 TiB virtual size with 512-byte blocks would need a 16 GiB BAT.
        (
            "dynamic header",
            Box::new(|b| patch_footer(b, 48, &(2u64 << 40).to_be_bytes())),
        ),
        (
            "BAT",
            Box::new(|b| {
                patch_footer(b, 48, &((2u64 << 40) - (1 << 20)).to_be_bytes());
                patch_header(b, 28, &u32::MAX.to_be_bytes());
                patch_header(b, 32, &512u32.to_be_bytes());
            }),
        ),
        (
            "dynamic header",
            Box::new(|b| patch_header(b, 32, &0u32.to_be_bytes())),
        ),
        (
            "dynamic header",
            Box::new(|b| patch_header(b, 32, &3000u32.to_be_bytes())),
        ),
        (
            "dynamic header",
            Box::new(|b| patch_header(b, 32, &(1u32 << 31).to_be_bytes())),
        ),
        (
            "dynamic header",
            Box::new(|b| patch_header(b, 28, &1u32.to_be_bytes())),
        ),
        (
            "BAT",
            Box::new(|b| patch_header(b, 16, &u64::MAX.to_be_bytes())),
        ),
        (
            "BAT",
            Box::new(|b| patch_header(b, 16, &(1u64 << 50).to_be_bytes())),
        ),
        (
            "footer",
            Box::new(|b| patch_footer(b, 16, &(1u64 << 40).to_be_bytes())),
        ),
        (
            "footer",
            Box::new(|b| patch_footer(b, 16, &7u64.to_be_bytes())),
        ),
    ];
    for (i, (structure, f)) in cases.iter().enumerate() {
        let mut b = good.clone();
        f(&mut b);
        std::fs::write(&p, &b).unwrap();
        let t = std::time::Instant::now();
        let msg = expect_corrupt(&p, structure);
        assert!(t.elapsed().as_secs() < 2, "case {i} slow: {msg}");
    }
}

#[test]
fn bad_bat_entries() {
    let dir = tempfile::tempdir().unwrap();
    let (p, good) = make(dir.path(), "b.vhd", DiskType::Dynamic);
    let h = DynHeader::parse(good[512..1536].try_into().unwrap()).unwrap();
    let to = h.table_offset as usize;
    let e1 = u32::from_be_bytes(good[to + 4..to + 8].try_into().unwrap());
    let e5 = u32::from_be_bytes(good[to + 20..to + 24].try_into().unwrap());
    assert!(e1 != u32::MAX && e5 != u32::MAX);
    let cases: [(usize, u32, &str); 5] = [
        (0, u32::MAX - 1, "past"), // beyond the end of the file
        (0, e1, "overlap"),        // two blocks at the same place
        (2, e1 + 1, "overlap"),    // partially overlapping
        (0, 0, "overlap"),         // on the footer copy
        (0, 1, "overlap"),         // on the header
    ];
    for (idx, val, what) in cases {
        let mut b = good.clone();
        b[to + 4 * idx..to + 4 * idx + 4].copy_from_slice(&val.to_be_bytes());
        std::fs::write(&p, &b).unwrap();
        let msg = expect_corrupt(&p, "BAT");
        assert!(msg.contains(what), "{msg}");
    }
    let _ = e5;
}

#[test]
fn parent_problems() {
    let dir = tempfile::tempdir().unwrap();
    let (x, _) = make(dir.path(), "x.vhd", DiskType::Dynamic);
    let y = dir.path().join("y.vhd");
    let z = dir.path().join("z.vhd");
    let diff = |p: &Path, parent: &Path| {
        Vhd::create(
            p,
            &VhdCreateOptions {
                disk_type: DiskType::Differencing,
                parent: Some(parent.to_path_buf()),
                ..Default::default()
            },
        )
        .unwrap()
    };
    drop(diff(&y, &x));
    drop(diff(&z, &y));
    // Loop: y's parent becomes z (whose parent is y).
    let mut yy = Vhd::open(
        &y,
        &VhdOpenOptions {
            read_only: false,
            no_parent: true,
        },
    )
    .unwrap();
    yy.set_parent(&z, true).unwrap();
    drop(yy);
    let msg = expect_corrupt(&y, "parent locator");
    assert!(msg.contains("loop"), "{msg}");
    expect_corrupt(&z, "parent locator");
    // Self-parent.
    let mut zz = Vhd::open(
        &z,
        &VhdOpenOptions {
            read_only: false,
            no_parent: true,
        },
    )
    .unwrap();
    zz.set_parent(&x, true).unwrap();
    drop(zz);
    let w = dir.path().join("w.vhd");
    drop(diff(&w, &x));
    let mut b = std::fs::read(&w).unwrap();
    // Absurd locator length and offset.
    let h = DynHeader::parse(b[512..1536].try_into().unwrap()).unwrap();
    assert!(h.locators[0].data_length > 0);
    patch_header(&mut b, 576 + 8, &u32::MAX.to_be_bytes());
    std::fs::write(&w, &b).unwrap();
    expect_corrupt(&w, "parent locator");
    patch_header(&mut b, 576 + 8, &16u32.to_be_bytes());
    patch_header(&mut b, 576 + 16, &(u64::MAX - 4).to_be_bytes());
    std::fs::write(&w, &b).unwrap();
    expect_corrupt(&w, "parent locator");
    // Parent id mismatch.
    let mut b = std::fs::read(&z).unwrap();
    patch_header(&mut b, 40, &[7u8; 16]);
    std::fs::write(&z, &b).unwrap();
    let msg = expect_corrupt(&z, "dynamic header");
    assert!(msg.contains("unique id"), "{msg}");
    // Parent missing.
    let v = dir.path().join("v.vhd");
    drop(diff(&v, &x));
    std::fs::remove_file(&x).unwrap();
    let msg = expect_corrupt(&v, "parent locator");
    assert!(msg.contains("not found"), "{msg}");
    // Deep chains are refused beyond the limit, not followed forever (checked by the loop above).
}

#[test]
fn random_corruption_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = make(dir.path(), "base.vhd", DiskType::Dynamic);
    let child = dir.path().join("child.vhd");
    let c = Vhd::create(
        &child,
        &VhdCreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    c.write_at(&[0x11; 4096], 3 << 20).unwrap();
    drop(c);
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let p = dir.path().join("fuzz.vhd");
    let (mut opened, mut refused) = (0, 0);
    for iter in 0..1500 {
        let src = if iter % 2 == 0 { &base } else { &child };
        let mut b = std::fs::read(src).unwrap();
        let len = b.len();
        for _ in 0..rng.random_range(1..6) {
            // Corrupt metadata: footer copy, header, BAT, locators, bitmaps, or end footer.
            let at = match rng.random_range(0..3) {
                0 => rng.random_range(0..4096.min(len)),
                1 => len - 512 + rng.random_range(0..512),
                _ => rng.random_range(0..len),
            };
            b[at] = rng.random();
        }
        if rng.random_bool(0.7) {
            fix_footer(&mut b, 0);
            fix_footer(&mut b, len - 512);
            fix_header(&mut b);
        }
        if rng.random_bool(0.1) {
            b.truncate(rng.random_range(0..len));
        }
        std::fs::write(&p, &b).unwrap();
        match Vhd::open(&p, &ro()) {
            Ok(d) => {
                opened += 1;
                let _ = d.check();
                let _ = d.allocated_ranges();
                let size = d.size().min(16 << 20) / 512 * 512;
                let mut buf = vec![0u8; size as usize];
                let _ = d.read_at(&mut buf, 0);
                let _ = Footer::parse(b[..512].try_into().unwrap_or(&[0u8; 512]));
            }
            Err(Error::Corrupt { .. }) | Err(Error::Io { .. }) => refused += 1,
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
    assert!(
        opened > 100 && refused > 100,
        "opened {opened}, refused {refused}"
    );
}
