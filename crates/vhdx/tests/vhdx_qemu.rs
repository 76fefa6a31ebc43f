//! VHDX interop with qemu-img / qemu-io in both directions: images qemu made read correctly
//! through this library; images this library made pass `qemu-img check` and read the same
//! through qemu (`qemu-img compare` against a raw file holding the expected bytes).
//! Each test prints a reason and returns when qemu-img is not installed.

use std::path::Path;
use std::process::Command;

mod common;

use common::{have_qemu, read_all, run};
use rand::{Rng, SeedableRng};
use vhdx::vhdx::{Vhdx, VhdxBuilder, VhdxKind};
use vhdx::Disk;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn qemu_check(img: &Path) {
    run("qemu-img", &["check", "-f", "vhdx", img.to_str().unwrap()]);
}

fn qemu_compare(img: &Path, expected: &[u8]) {
    let raw = img.with_extension("expected.raw");
    std::fs::write(&raw, expected).unwrap();
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "vhdx",
            "-F",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::remove_file(&raw).unwrap();
}

/// Writes `pattern` through qemu-io at byte offset `off`, `len` bytes.
fn qemu_write(img: &Path, pattern: u8, off: u64, len: u64) {
    run(
        "qemu-io",
        &[
            "-f",
            "vhdx",
            "-c",
            &format!("write -P {pattern:#x} {off} {len}"),
            img.to_str().unwrap(),
        ],
    );
}

#[test]
fn qemu_made_images_read_correctly() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("dynamic", "1M", "", 40 * MIB),
        ("dynamic", "8M", "", 100 * MIB + 512 * 3),
        ("dynamic", "32M", "", 70 * MIB),
        ("fixed", "1M", "", 20 * MIB),
        ("fixed", "2M", ",block_state_zero=off", 20 * MIB),
    ];
    for (i, (sub, bs, extra, size)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("q{i}.vhdx"));
        run(
            "qemu-img",
            &[
                "create",
                "-f",
                "vhdx",
                "-o",
                &format!("subformat={sub},block_size={bs}{extra}"),
                img.to_str().unwrap(),
                &size.to_string(),
            ],
        );
        // Empty image reads zeros.
        {
            let d = Vhdx::open(&img, true).unwrap();
            assert_eq!(d.size(), *size);
            assert!(read_all(&d).iter().all(|&b| b == 0), "case {i}");
        }
        let writes = [
            (0xab, 0, MIB),
            (0x11, 3 * MIB + 4096, 8192),
            (0x22, size - 2 * MIB, MIB + 512),
            (0x33, size / 2, 512),
        ];
        for &(p, o, l) in &writes {
            qemu_write(&img, p, o, l);
        }
        let d = Vhdx::open(&img, true).unwrap();
        let ours = read_all(&d);
        let mut expected = vec![0u8; *size as usize];
        for &(p, o, l) in &writes {
            expected[o as usize..(o + l) as usize].fill(p);
        }
        assert!(
            ours == expected,
            "case {i}: data differs from what qemu wrote"
        );
        assert!(
            ours == common::qemu_to_raw(&img, "vhdx"),
            "case {i}: differs from qemu's own read"
        );
    }
}

#[test]
fn our_images_pass_qemu_check_and_compare() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let cases: [(bool, u32, u64); 5] = [
        (false, 1 << 20, 33 * MIB),
        (false, 32 << 20, 130 * MIB),
        (false, 256 << 20, 300 * MIB),
        (true, 2 << 20, 17 * MIB),
        (true, 1 << 20, 8 * MIB + 4096),
    ];
    for (i, &(fixed, bs, size)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("o{i}.vhdx"));
        let d = VhdxBuilder::new(size)
            .fixed(fixed)
            .block_size(bs)
            .create(&img)
            .unwrap();
        assert_eq!(
            d.kind(),
            if fixed {
                VhdxKind::Fixed
            } else {
                VhdxKind::Dynamic
            }
        );
        let mut expected = vec![0u8; size as usize];
        for _ in 0..40 {
            let sectors = size / 512;
            let off = rng.random_range(0..sectors) * 512;
            let len = (rng.random_range(1..=4096u64) * 512).min(size - off);
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data[..]);
            d.write_at(&data, off).unwrap();
            expected[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        // An unmap too.
        let um = (size / 2) / 512 * 512;
        let ul = (3 * u64::from(bs)).min(size - um);
        d.unmap(um, ul).unwrap();
        expected[um as usize..(um + ul) as usize].fill(0);
        d.flush().unwrap();
        assert!(read_all(&d) == expected, "case {i}: our read-back");
        d.close().unwrap();
        qemu_check(&img);
        qemu_compare(&img, &expected);
        // qemu writes into our file; we read it back.
        qemu_write(&img, 0x5a, MIB, 4096);
        expected[MIB as usize..(MIB + 4096) as usize].fill(0x5a);
        let d = Vhdx::open(&img, true).unwrap();
        assert!(read_all(&d) == expected, "case {i}: after qemu's write");
    }
}

#[test]
fn our_4k_sector_image_reads_back_and_checks() {
    if !have_qemu() {
        return;
    }
    // qemu cannot do 4 KiB logical sectors; it still checks the structure.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("4k.vhdx");
    let d = VhdxBuilder::new(64 * MIB)
        .logical_sector_size(4096)
        .block_size(1 << 20)
        .create(&img)
        .unwrap();
    assert_eq!(d.logical_sector_size(), 4096);
    assert!(
        d.write_at(&[1u8; 512], 0).is_err(),
        "512-byte write on a 4K disk"
    );
    d.write_at(&[7u8; 8192], 5 * MIB - 4096).unwrap();
    d.close().unwrap();
    let d = Vhdx::open(&img, true).unwrap();
    let v = read_all(&d);
    assert!(v[(5 * MIB - 4096) as usize..(5 * MIB + 4096) as usize]
        .iter()
        .all(|&b| b == 7));
    assert_eq!(v.iter().filter(|&&b| b != 0).count(), 8192);
    drop(d);
    let out = Command::new("qemu-img")
        .args(["check", "-f", "vhdx", img.to_str().unwrap()])
        .output()
        .unwrap();
    eprintln!(
        "qemu-img check on a 4K-sector image: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn we_write_into_qemu_made_images() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (i, opts) in [
        "subformat=dynamic,block_size=1M",
        "subformat=dynamic,block_size=16M,log_size=2M",
        "subformat=fixed,block_size=2M",
    ]
    .iter()
    .enumerate()
    {
        let size = 48 * MIB;
        let img = dir.path().join(format!("w{i}.vhdx"));
        run(
            "qemu-img",
            &[
                "create",
                "-f",
                "vhdx",
                "-o",
                opts,
                img.to_str().unwrap(),
                &size.to_string(),
            ],
        );
        qemu_write(&img, 0x61, 0, 3 * MIB);
        let mut expected = vec![0u8; size as usize];
        expected[..3 * MIB as usize].fill(0x61);
        let d = Vhdx::open(&img, false).unwrap();
        for _ in 0..30 {
            let off = rng.random_range(0..size / 512) * 512;
            let len = (rng.random_range(1..=2048u64) * 512).min(size - off);
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data[..]);
            d.write_at(&data, off).unwrap();
            expected[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        d.unmap(MIB, MIB).unwrap();
        expected[MIB as usize..2 * MIB as usize].fill(0);
        d.close().unwrap();
        qemu_check(&img);
        qemu_compare(&img, &expected);
    }
}

#[test]
fn grow_moves_the_bat_and_qemu_agrees() {
    use vhdx::vhdx::ShrinkPolicy;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("grow.vhdx");
    // 1 MiB blocks: a 1 MiB BAT region covers 128 GiB; growing to 200 GiB moves the BAT.
    let mut d = VhdxBuilder::new(GIB)
        .block_size(1 << 20)
        .create(&img)
        .unwrap();
    d.write_at(&vec![0xab; MIB as usize], 5 * MIB).unwrap();
    d.resize(200 * GIB, ShrinkPolicy::KeepData).unwrap();
    assert_eq!(d.size(), 200 * GIB);
    d.write_at(&vec![0xcd; MIB as usize], 150 * GIB).unwrap();
    d.write_at(&[0xef; 4096], 200 * GIB - 4096).unwrap();
    // Shrinking over data is refused; over zeros it works.
    assert!(d.resize(100 * GIB, ShrinkPolicy::KeepData).is_err());
    d.resize(190 * GIB, ShrinkPolicy::DropData).unwrap();
    d.resize(180 * GIB, ShrinkPolicy::KeepData).unwrap();
    d.close().unwrap();
    let d = Vhdx::open(&img, true).unwrap();
    assert_eq!(d.size(), 180 * GIB);
    let mut b = vec![0u8; MIB as usize];
    d.read_at(&mut b, 5 * MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0xab));
    d.read_at(&mut b, 150 * GIB).unwrap();
    assert!(b.iter().all(|&x| x == 0xcd));
    d.read_at(&mut b, 180 * GIB - MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    drop(d);
    if !have_qemu() {
        return;
    }
    qemu_check(&img);
    let info = run(
        "qemu-img",
        &["info", "--output=json", "-f", "vhdx", img.to_str().unwrap()],
    );
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 180 * GIB)),
        "{info}"
    );
    for (pat, off) in [(0xab, 5 * MIB), (0xcd, 150 * GIB), (0, 180 * GIB - MIB)] {
        let out = run(
            "qemu-io",
            &[
                "-r",
                "-f",
                "vhdx",
                "-c",
                &format!("read -P {pat:#x} {off} {MIB}"),
                img.to_str().unwrap(),
            ],
        );
        assert!(!out.contains("failed"), "qemu-io at {off}: {out}");
    }
}

#[test]
fn optimize_qemu_fixed_image() {
    if !have_qemu() {
        return;
    }
    // qemu's default "fixed" image: preallocated, every block in ZERO state.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("qf.vhdx");
    let size = 32 * MIB;
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "subformat=fixed,block_size=1M",
            img.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    qemu_write(&img, 0x71, 3 * MIB, MIB);
    let mut expected = vec![0u8; size as usize];
    expected[3 * MIB as usize..4 * MIB as usize].fill(0x71);
    let before = std::fs::metadata(&img).unwrap().len();
    let mut d = Vhdx::open(&img, false).unwrap();
    // A block of zeros written by the guest is reclaimable too.
    d.write_at(&vec![0u8; MIB as usize], 9 * MIB).unwrap();
    let r = d.reclaimable_blocks().unwrap();
    eprintln!("reclaimable: {r:?}");
    assert!(r.iter().any(|&(b, _)| b == 9));
    assert!(!r.iter().any(|&(b, _)| b == 3));
    if d.kind() != VhdxKind::Fixed {
        d.discard_blocks(&r.iter().map(|x| x.0).collect::<Vec<_>>())
            .unwrap();
    }
    let stats = d.compact().unwrap();
    eprintln!("{stats:?}");
    assert_eq!(stats.old_file_size, before.max(stats.old_file_size));
    assert!(read_all(&d) == expected);
    d.close().unwrap();
    qemu_check(&img);
    qemu_compare(&img, &expected);
    qemu_write(&img, 0x72, 20 * MIB, MIB);
    expected[20 * MIB as usize..21 * MIB as usize].fill(0x72);
    qemu_check(&img);
    qemu_compare(&img, &expected);
    let d = Vhdx::open(&img, true).unwrap();
    assert!(read_all(&d) == expected);
}
