//! Interop with qemu-img / qemu-io (`-f vpc`): files qemu made read correctly through our
//! library, files we made read correctly through qemu. Data compared byte for byte / by hash.
//! Needs qemu-utils installed.

mod common;

use common::{qemu_to_raw, read_all, run};
use rand::{Rng, SeedableRng};
use vhdx::vhd::{DiskType, Vhd, VhdCreateOptions, VhdOpenOptions};
use vhdx::Disk;

fn ro() -> VhdOpenOptions {
    VhdOpenOptions {
        read_only: true,
        no_parent: false,
    }
}

#[test]
fn qemu_made_vhds_read_correctly() {
    let dir = tempfile::tempdir().unwrap();
    for opts in [
        "subformat=dynamic",
        "subformat=fixed",
        "subformat=dynamic,force_size=on",
        "subformat=fixed,force_size=on",
    ] {
        let p = dir.path().join("q.vhd");
        let _ = std::fs::remove_file(&p);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                opts,
                p.to_str().unwrap(),
                "48M",
            ],
        );
        let ps = p.to_str().unwrap();
        for (pat, off, len) in [
            (0xab, 0, "1M"),
            (0x11, 5 << 20, "64k"),
            (0x5c, (47 << 20) - 4096 * 3, "4k"),
            (0x77, 3 << 20, "3M"),
        ] {
            let off = off.to_string();
            run(
                "qemu-io",
                &[
                    "-f",
                    "vpc",
                    "-c",
                    &format!("write -P {pat} {off} {len}"),
                    ps,
                ],
            );
        }
        let expect = qemu_to_raw(&p, "vpc");
        let d = Vhd::open(&p, &ro()).unwrap();
        assert_eq!(d.size() as usize, expect.len(), "{opts}: size");
        assert!(read_all(&d) == expect, "{opts}: data differs");
    }
}

#[test]
fn our_vhds_read_correctly_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for (ty, bs) in [
        (DiskType::Dynamic, 2 << 20),
        (DiskType::Dynamic, 512 << 10),
        (DiskType::Fixed, 0),
    ] {
        let p = dir.path().join(format!("ours-{ty:?}-{bs}.vhd"));
        let size = 40u64 << 20; // not a CHS size: qemu must trust CurrentSize
        let d = Vhd::create(
            &p,
            &VhdCreateOptions {
                disk_type: ty,
                size,
                block_size: if bs == 0 { 2 << 20 } else { bs },
                parent: None,
            },
        )
        .unwrap();
        let mut model = vec![0u8; size as usize];
        for _ in 0..60 {
            let len = rng.random_range(1..300u64) * 512;
            let off = rng.random_range(0..(size - len) / 512) * 512;
            let mut b = vec![0u8; len as usize];
            rng.fill(&mut b[..]);
            d.write_at(&b, off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&b);
        }
        d.flush().unwrap();
        drop(d);
        let got = qemu_to_raw(&p, "vpc");
        assert_eq!(got.len(), model.len(), "{ty:?}: qemu sees the wrong size");
        assert!(got == model, "{ty:?}: qemu reads different data");
        // qemu-img compare against a raw copy of the model.
        let raw = dir.path().join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        run(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "vpc",
                "-F",
                "raw",
                p.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        // qemu writes into our file, we read its writes.
        run(
            "qemu-io",
            &[
                "-f",
                "vpc",
                "-c",
                "write -P 0x3c 7M 2M",
                p.to_str().unwrap(),
            ],
        );
        model[7 << 20..9 << 20].fill(0x3c);
        let d = Vhd::open(&p, &ro()).unwrap();
        assert!(read_all(&d) == model, "{ty:?}: qemu's write not seen");
    }
}

#[test]
fn we_write_into_qemu_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.vhd");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic",
            p.to_str().unwrap(),
            "20M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "vpc",
            "-c",
            "write -P 0x42 1M 1M",
            p.to_str().unwrap(),
        ],
    );
    let d = Vhd::open(&p, &VhdOpenOptions::default()).unwrap();
    let mut model = read_all(&d);
    let b = vec![0x99u8; 3 << 20];
    d.write_at(&b, 6 << 20).unwrap();
    model[6 << 20..9 << 20].copy_from_slice(&b);
    d.write_at(&b[..4096], 1 << 20).unwrap();
    model[1 << 20..(1 << 20) + 4096].fill(0x99);
    d.flush().unwrap();
    drop(d);
    assert!(qemu_to_raw(&p, "vpc") == model);
}

#[test]
fn convert_through_qemu_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let mut data = vec![0u8; 16 << 20];
    rand::rngs::StdRng::seed_from_u64(3).fill(&mut data[(2 << 20)..(5 << 20)]);
    std::fs::write(&raw, &data).unwrap();
    let v = dir.path().join("conv.vhd");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            raw.to_str().unwrap(),
            v.to_str().unwrap(),
        ],
    );
    let d = Vhd::open(&v, &ro()).unwrap();
    assert!(read_all(&d) == data);
    // Only the non-zero blocks are allocated.
    let info = d.info();
    assert!(info.allocated_blocks <= 3, "{info:?}");
}
