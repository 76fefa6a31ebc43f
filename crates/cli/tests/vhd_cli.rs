//! End-to-end tests of `viridian vhd ...`: the built binary run on real files, results checked
//! with our reader, qemu-img (compare/check) and byte comparison.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{Rng, SeedableRng};

fn viridian(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(args)
        .output()
        .expect("run viridian")
}

fn ok(args: &[&str]) -> String {
    let o = viridian(args);
    assert!(
        o.status.success(),
        "viridian {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(args: &[&str]) -> String {
    let o = viridian(args);
    assert!(!o.status.success(), "viridian {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn get(p: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["vhd", "get", "--json", s(p)])).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu(args: &[&str]) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (install qemu-utils)");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn read_disk(p: &Path) -> Vec<u8> {
    let d = vhdx::open::open_disk(p, true).unwrap();
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

fn write_disk(p: &Path, off: u64, data: &[u8]) {
    let d = vhdx::open::open_disk(p, false).unwrap();
    d.write_at(data, off).unwrap();
    d.flush().unwrap();
}

fn random(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

#[test]
fn new_and_get_every_format() {
    let dir = tempfile::tempdir().unwrap();
    for (name, args, fmt, ty, bs) in [
        (
            "a.vhdx",
            vec!["--size", "64M"],
            "VHDX",
            "Dynamic",
            32u64 << 20,
        ),
        (
            "b.vhdx",
            vec![
                "--size",
                "64M",
                "--block-size",
                "1M",
                "--logical-sector-size",
                "4096",
            ],
            "VHDX",
            "Dynamic",
            1 << 20,
        ),
        (
            "c.vhdx",
            vec!["--size", "16M", "--fixed"],
            "VHDX",
            "Fixed",
            32 << 20,
        ),
        ("d.vhd", vec!["--size", "64M"], "VHD", "Dynamic", 2 << 20),
        ("e.vhd", vec!["--size", "64M", "--fixed"], "VHD", "Fixed", 0),
        ("f.img", vec!["--size", "64M"], "raw", "Fixed", 0),
        (
            "g.disk",
            vec!["--size", "64M", "--format", "vhd", "--block-size", "512K"],
            "VHD",
            "Dynamic",
            512 << 10,
        ),
    ] {
        let p = dir.path().join(name);
        let mut a = vec!["vhd", "new", s(&p)];
        a.extend(args.iter().copied());
        ok(&a);
        let j = get(&p);
        assert_eq!(j["VhdFormat"], fmt, "{name}");
        assert_eq!(j["VhdType"], ty, "{name}");
        assert_eq!(j["BlockSize"], bs, "{name}");
        assert_eq!(j["MinimumSize"], 0, "{name}");
        assert!(j["Size"].as_u64().unwrap() >= 16 << 20);
        ok(&["vhd", "test", s(&p)]);
    }
    let b = get(&dir.path().join("b.vhdx"));
    assert_eq!(b["LogicalSectorSize"], 4096);
    // Text output carries the same fields.
    let text = ok(&["vhd", "get", s(&dir.path().join("d.vhd"))]);
    assert!(text.contains("VhdType                 : Dynamic"), "{text}");
    // Bad requests: unknown extension, VHD with 4K sectors, existing file, bad size.
    assert!(
        fails(&["vhd", "new", s(&dir.path().join("x.foo")), "--size", "1M"]).contains("extension")
    );
    fails(&[
        "vhd",
        "new",
        s(&dir.path().join("y.vhd")),
        "--size",
        "1M",
        "--logical-sector-size",
        "4096",
    ]);
    fails(&["vhd", "new", s(&dir.path().join("a.vhdx")), "--size", "1M"]);
    fails(&["vhd", "new", s(&dir.path().join("z.vhd")), "--size", "12Q"]);
}

#[test]
fn differencing_chain_test_and_corruption() {
    let dir = tempfile::tempdir().unwrap();
    for ext in ["vhd", "vhdx"] {
        let base = dir.path().join(format!("base.{ext}"));
        let child = dir.path().join(format!("child.{ext}"));
        ok(&["vhd", "new", s(&base), "--size", "32M"]);
        write_disk(&base, 0, &random(1, 1 << 20));
        ok(&["vhd", "new", s(&child), "--parent", s(&base)]);
        let j = get(&child);
        assert_eq!(j["VhdType"], "Differencing");
        assert_eq!(j["ParentPath"], s(&std::fs::canonicalize(&base).unwrap()));
        let out = ok(&["vhd", "test", s(&base), s(&child)]);
        assert_eq!(out.matches("True").count(), 2, "{out}");
        // Damage the base's header/footer checksum: test fails for the base and the child.
        let mut bytes = std::fs::read(&base).unwrap();
        let at = if ext == "vhd" {
            bytes.len() - 512 + 70
        } else {
            64 * 1024 + 100
        };
        bytes[at] ^= 0xff;
        if ext == "vhdx" {
            // Both headers must go bad for the VHDX to be unreadable.
            bytes[128 * 1024 + 100] ^= 0xff;
        }
        std::fs::write(&base, &bytes).unwrap();
        let o = viridian(&["vhd", "test", s(&child)]);
        assert_eq!(o.status.code(), Some(1), "{ext}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(s(&base)), "{ext}: error names the file: {err}");
        assert!(
            err.contains("offset"),
            "{ext}: error names the offset: {err}"
        );
    }
}

#[test]
fn convert_between_formats_matches_data() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.img");
    let mut data = vec![0u8; 48 << 20];
    data[3 << 20..7 << 20].copy_from_slice(&random(2, 4 << 20));
    data[40 << 20..(40 << 20) + 4096].fill(0x5a);
    std::fs::write(&raw, &data).unwrap();
    let steps = [
        ("src.img", "a.vhdx", vec![]),
        ("a.vhdx", "b.vhd", vec![]),
        ("b.vhd", "c.vhd", vec!["--fixed"]),
        ("c.vhd", "d.vhdx", vec!["--fixed"]),
        ("d.vhdx", "e.vhdx", vec!["--dynamic", "--block-size", "1M"]),
        ("e.vhdx", "f.img", vec![]),
    ];
    for (from, to, extra) in steps {
        let (f, t) = (dir.path().join(from), dir.path().join(to));
        let mut a = vec!["vhd", "convert", s(&f), s(&t)];
        a.extend(extra.iter().copied());
        ok(&a);
        assert!(read_disk(&t) == data, "{from} -> {to}: data differs");
        let fmt = if to.ends_with("vhd") {
            "vpc"
        } else if to.ends_with("vhdx") {
            "vhdx"
        } else {
            "raw"
        };
        qemu(&["compare", "-q", "-f", fmt, "-F", "raw", s(&t), s(&raw)]);
        if fmt == "vhdx" {
            qemu(&["check", "-q", "-f", "vhdx", s(&t)]);
        }
    }
    // Sparse source -> dynamic destination stays small.
    let j = get(&dir.path().join("e.vhdx"));
    assert!(j["FileSize"].as_u64().unwrap() < 20 << 20, "{j}");
    assert_eq!(get(&dir.path().join("c.vhd"))["VhdType"], "Fixed");
    // A differencing chain is flattened.
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    ok(&["vhd", "convert", s(&raw), s(&base)]);
    ok(&["vhd", "new", s(&child), "--parent", s(&base)]);
    write_disk(&child, 5 << 20, &[0xee; 8192]);
    let mut want = data.clone();
    want[5 << 20..(5 << 20) + 8192].fill(0xee);
    let flat = dir.path().join("flat.vhdx");
    ok(&["vhd", "convert", s(&child), s(&flat)]);
    assert_eq!(get(&flat)["VhdType"], "Dynamic");
    assert!(read_disk(&flat) == want);
    // new --from copies a disk into a new image.
    let from = dir.path().join("from.vhd");
    ok(&["vhd", "new", s(&from), "--from", s(&child), "--size", "64M"]);
    let got = read_disk(&from);
    assert_eq!(got.len(), 64 << 20);
    assert!(got[..want.len()] == want[..] && got[want.len()..].iter().all(|&b| b == 0));
}

#[test]
fn resize_and_optimize() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["r.vhd", "r.vhdx", "f.vhd", "r.img"] {
        let p = dir.path().join(name);
        let mut a = vec!["vhd", "new", s(&p), "--size", "64M"];
        if name == "f.vhd" {
            a.push("--fixed");
        }
        ok(&a);
        let data = random(3, 3 << 20);
        write_disk(&p, 8 << 20, &data);
        ok(&["vhd", "resize", s(&p), "--size", "128M"]);
        assert_eq!(get(&p)["Size"], 128u64 << 20, "{name}");
        assert_eq!(get(&p)["MinimumSize"], 11u64 << 20, "{name}");
        let err = fails(&["vhd", "resize", s(&p), "--size", "10M"]);
        assert!(
            err.contains("minimum size") || err.contains("past the new size"),
            "{name}: {err}"
        );
        ok(&["vhd", "resize", s(&p), "--to-minimum-size"]);
        assert_eq!(get(&p)["Size"], 11u64 << 20, "{name}");
        let got = read_disk(&p);
        assert!(got[8 << 20..] == data[..], "{name}: data lost");
        ok(&["vhd", "test", s(&p)]);
        // Grown space reads zeros.
        ok(&["vhd", "resize", s(&p), "--size", "20M"]);
        let got = read_disk(&p);
        assert!(got[11 << 20..].iter().all(|&b| b == 0), "{name}");
    }
    // Optimize: zeroed blocks are returned and the file shrinks.
    for name in ["o.vhd", "o.vhdx"] {
        let p = dir.path().join(name);
        ok(&["vhd", "new", s(&p), "--size", "256M", "--block-size", "2M"]);
        write_disk(&p, 0, &random(4, 100 << 20));
        write_disk(&p, 0, &vec![0u8; 96 << 20]);
        let before = get(&p)["FileSize"].as_u64().unwrap();
        ok(&["vhd", "optimize", s(&p)]);
        let after = get(&p)["FileSize"].as_u64().unwrap();
        assert!(
            before > 100 << 20 && after < 16 << 20,
            "{name}: {before} -> {after}"
        );
        let got = read_disk(&p);
        assert!(
            got[96 << 20..100 << 20] == random(4, 100 << 20)[96 << 20..],
            "{name}"
        );
        ok(&["vhd", "test", s(&p)]);
        if name.ends_with("vhdx") {
            qemu(&["check", "-q", "-f", "vhdx", s(&p)]);
        }
    }
}

#[test]
fn merge_into_parent_and_ancestor() {
    let dir = tempfile::tempdir().unwrap();
    for ext in ["vhd", "vhdx"] {
        let p: Vec<PathBuf> = (0..4)
            .map(|i| dir.path().join(format!("l{i}.{ext}")))
            .collect();
        ok(&[
            "vhd",
            "new",
            s(&p[0]),
            "--size",
            "16M",
            "--block-size",
            "1M",
        ]);
        let mut model = vec![0u8; 16 << 20];
        for i in 0..4 {
            if i > 0 {
                ok(&["vhd", "new", s(&p[i]), "--parent", s(&p[i - 1])]);
            }
            let off = (i as u64 + 1) * (3 << 20) - 4096;
            let d = random(10 + i as u64, 1 << 20);
            write_disk(&p[i], off, &d);
            model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
        // l3 into its parent l2.
        ok(&["vhd", "merge", s(&p[3])]);
        assert!(!p[3].exists());
        assert!(read_disk(&p[2]) == model, "{ext}: merge into parent");
        // l2 into the base (through l1).
        ok(&["vhd", "merge", s(&p[2]), "--destination", s(&p[0])]);
        assert!(!p[2].exists() && !p[1].exists());
        assert!(read_disk(&p[0]) == model, "{ext}: merge into ancestor");
        ok(&["vhd", "test", s(&p[0])]);
        fails(&["vhd", "merge", s(&p[0])]);
    }
}

#[test]
fn set_parent_path_and_reset_disk_id() {
    let dir = tempfile::tempdir().unwrap();
    for ext in ["vhd", "vhdx"] {
        let base = dir.path().join(format!("base.{ext}"));
        let child = dir.path().join(format!("child.{ext}"));
        ok(&["vhd", "new", s(&base), "--size", "8M"]);
        write_disk(&base, 0, &[0x77; 4096]);
        ok(&["vhd", "new", s(&child), "--parent", s(&base)]);
        let sub = dir.path().join(format!("moved-{ext}"));
        std::fs::create_dir(&sub).unwrap();
        let moved = sub.join(format!("base.{ext}"));
        std::fs::rename(&base, &moved).unwrap();
        let o = viridian(&["vhd", "test", s(&child)]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{ext}: test passes with a missing parent"
        );
        ok(&["vhd", "set", s(&child), "--parent-path", s(&moved)]);
        ok(&["vhd", "test", s(&child)]);
        assert_eq!(&read_disk(&child)[..4096], &[0x77; 4096], "{ext}");
        let id = get(&moved)["DiskIdentifier"].clone();
        let before = read_disk(&moved);
        ok(&["vhd", "set", s(&moved), "--reset-disk-id"]);
        let new_id = get(&moved)["DiskIdentifier"].clone();
        assert_ne!(new_id, id, "{ext}");
        assert_eq!(new_id.as_str().unwrap().len(), 36, "{ext}: {new_id}");
        ok(&["vhd", "test", s(&moved)]);
        assert!(read_disk(&moved) == before, "{ext}: data changed");
        if ext == "vhdx" {
            qemu(&["check", "-q", "-f", "vhdx", s(&moved)]);
            // The id survives a reopen and a second reset gives yet another one.
            assert_eq!(get(&moved)["DiskIdentifier"], new_id);
            ok(&["vhd", "set", s(&moved), "--reset-disk-id"]);
            let third = get(&moved)["DiskIdentifier"].clone();
            assert!(third != new_id && third != id);
            qemu(&["check", "-q", "-f", "vhdx", s(&moved)]);
            // The disk's contents did not change: its DataWriteGuid, which the child links
            // to, is kept and the chain still opens.
            ok(&["vhd", "test", s(&child)]);
            assert_eq!(&read_disk(&child)[..4096], &[0x77; 4096]);
            continue;
        }
        // The child no longer matches its parent.
        let err = fails(&["vhd", "test", s(&child)]);
        assert!(err.contains("unique id"), "{err}");
        fails(&["vhd", "set", s(&child), "--parent-path", s(&moved)]);
        ok(&[
            "vhd",
            "set",
            s(&child),
            "--parent-path",
            s(&moved),
            "--ignore-id-mismatch",
        ]);
        ok(&["vhd", "test", s(&child)]);
    }
}

#[test]
fn sparse_vhdx_to_raw_skips_unallocated_blocks() {
    let dir = tempfile::tempdir().unwrap();
    // A sparse raw source; qemu-img makes a dynamic VHDX of it (its zero blocks stay
    // unallocated).
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; 256 << 20];
    data[1 << 20..3 << 20].copy_from_slice(&random(20, 2 << 20));
    data[100 << 20..(100 << 20) + 8192].copy_from_slice(&random(21, 8192));
    data[(200 << 20) + 512..(200 << 20) + 1024].fill(0x42);
    std::fs::write(&src, &data).unwrap();
    let img = dir.path().join("q.vhdx");
    qemu(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        "subformat=dynamic,block_size=1M",
        s(&src),
        s(&img),
    ]);
    // The copy reads only what the ranges name: the three allocated 1 MiB blocks and the
    // two of the first range.
    let opened = vhdx::open::open(&img, true).unwrap();
    let ranges = opened.chain_allocated_ranges().unwrap();
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    assert!(total <= 4 << 20, "{ranges:?}");
    for (o, n) in [
        (1u64 << 20, 2u64 << 20),
        (100 << 20, 8192),
        ((200 << 20) + 512, 512),
    ] {
        assert!(
            ranges.iter().any(|&(s, l)| s <= o && o + n <= s + l),
            "{o:#x}+{n:#x} not in {ranges:?}"
        );
    }
    drop(opened);
    let ours = dir.path().join("ours.img");
    let theirs = dir.path().join("theirs.img");
    ok(&["vhd", "convert", s(&img), s(&ours)]);
    qemu(&["convert", "-f", "vhdx", "-O", "raw", s(&img), s(&theirs)]);
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert!(a == b, "our conversion differs from qemu-img's");
    assert!(a == data);
    // The destination stays sparse: unallocated blocks were not written either.
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(&ours).unwrap().blocks() * 512;
    assert!(used < 16 << 20, "{used} bytes used");
    ok(&["vhd", "test", s(&img)]);
}

#[test]
fn vhdx_get_shows_fragmentation_and_minimum_size() {
    let dir = tempfile::tempdir().unwrap();
    let seq = dir.path().join("seq.vhdx");
    let rev = dir.path().join("rev.vhdx");
    for p in [&seq, &rev] {
        ok(&["vhd", "new", s(p), "--size", "64M", "--block-size", "1M"]);
    }
    for b in 0..8u64 {
        write_disk(&seq, b << 20, &[1; 4096]);
        write_disk(&rev, (7 - b) << 20, &[1; 4096]);
    }
    let j = get(&seq);
    assert_eq!(j["FragmentationPercentage"], 0, "{j}");
    assert_eq!(j["MinimumSize"], (7u64 << 20) + 4096, "{j}");
    let j = get(&rev);
    assert_eq!(j["FragmentationPercentage"], 100, "{j}");
    // A fixed disk's blocks follow each other.
    let fixed = dir.path().join("fixed.vhdx");
    ok(&["vhd", "new", s(&fixed), "--size", "16M", "--fixed"]);
    assert_eq!(get(&fixed)["FragmentationPercentage"], 0);
    // MinimumSize for a VHDX of any size: 1 TiB with data near 100 GiB.
    let big = dir.path().join("big.vhdx");
    ok(&["vhd", "new", s(&big), "--size", "1T"]);
    write_disk(&big, 100 << 30, &[9; 4096]);
    let j = get(&big);
    assert_eq!(j["MinimumSize"], (100u64 << 30) + 4096, "{j}");
    ok(&["vhd", "resize", s(&big), "--to-minimum-size"]);
    assert_eq!(get(&big)["Size"], (100u64 << 30) + 4096);
    qemu(&["check", "-q", "-f", "vhdx", s(&big)]);
}

/// Files whose content is not what their name says, or raw files that are not whole sectors:
/// `vhd test` says False with the reason, `vhd get` and `vhd convert` fail with one line naming
/// the file and the missing signature.
#[test]
fn junk_named_vhdx_or_vhd_is_refused_by_every_verb() {
    let dir = tempfile::tempdir().unwrap();
    let junk = random(7, 700);
    for (name, words) in [
        (
            "junk.vhdx",
            &["VHDX file identifier at offset 0x0", "\"vhdxfile\" missing"][..],
        ),
        (
            "junk.vhd",
            &["VHD footer at offset 0xbc", "\"conectix\" missing"][..],
        ),
        (
            "junk.img",
            &["raw image at offset 0x2bc", "512-byte sectors"][..],
        ),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, &junk).unwrap();
        let o = viridian(&["vhd", "test", s(&p)]);
        assert_eq!(o.status.code(), Some(1));
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert_eq!(stdout.trim(), format!("{}: False", p.display()));
        let stderr = String::from_utf8_lossy(&o.stderr);
        for w in words {
            assert!(stderr.contains(w), "vhd test: {stderr} lacks {w}");
        }
        let out = dir.path().join("out.vhdx");
        for args in [
            vec!["vhd", "get", s(&p)],
            vec!["vhd", "convert", s(&p), s(&out)],
        ] {
            let e = fails(&args);
            let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "{args:?}: {e}");
            assert!(lines[0].contains(s(&p)), "{args:?}: {e}");
            for w in words {
                assert!(lines[0].contains(w), "{args:?}: {e} lacks {w}");
            }
            assert!(!out.exists(), "convert left {}", out.display());
        }
    }
    // A real image under its own name still tests True.
    let good = dir.path().join("good.vhdx");
    ok(&["vhd", "new", s(&good), "--size", "8M"]);
    assert!(ok(&["vhd", "test", s(&good)]).contains("True"));
}
