//! Model test: seeded random write / unmap / flush / reopen / resize / discard / compact
//! sequences on fixed, dynamic and differencing VHDX files (chains of a base and three
//! children), checked against an in-memory model; plus concurrent writers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vhdx::vhdx::{ShrinkPolicy, Vhdx, VhdxBuilder};
use vhdx::Disk;

const MIB: u64 = 1 << 20;

/// A scratch directory, on tmpfs when there is one: the model test makes thousands of
/// flushes, which cost ~10 ms each on a disk and nothing on tmpfs (the code paths are the same).
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

fn read_all(d: &dyn Disk) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    for (i, c) in v.chunks_mut(3 * MIB as usize + 4096).enumerate() {
        d.read_at(c, i as u64 * (3 * MIB + 4096)).unwrap();
    }
    v
}

fn check(d: &dyn Disk, model: &[u8], what: &str) {
    let v = read_all(d);
    assert_eq!(v.len(), model.len(), "{what}: size");
    if v != model {
        let first = v.iter().zip(model).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: first difference at byte {first:#x} (got {:#x}, model {:#x})",
            v[first], model[first]
        );
    }
}

fn qemu_check(p: &Path) {
    if let Ok(o) = std::process::Command::new("qemu-img")
        .args(["check", "-f", "vhdx", p.to_str().unwrap()])
        .output()
    {
        assert!(
            o.status.success(),
            "qemu-img check {}: {}{}",
            p.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

struct Cfg {
    seed: u64,
    lss: u32,
    block: u32,
    fixed: bool,
    child_block: u32,
}

fn random_range(rng: &mut StdRng, size: u64, lss: u64, max: u64) -> (u64, u64) {
    let sectors = size / lss;
    let off = rng.random_range(0..sectors) * lss;
    let len = (rng.random_range(1..=max / lss) * lss).min(size - off);
    (off, len)
}

fn run_ops(
    rng: &mut StdRng,
    path: &Path,
    mut d: Vhdx,
    model: &mut Vec<u8>,
    n: usize,
    allow_resize: bool,
) -> Vhdx {
    let lss = u64::from(d.logical_sector_size());
    let bs = u64::from(d.block_size());
    for step in 0..n {
        let size = d.size();
        let what = format!("{} step {step}", path.display());
        match rng.random_range(0..100) {
            0..55 => {
                let (off, len) = random_range(rng, size, lss, 3 * bs);
                let mut data = vec![0u8; len as usize];
                if rng.random_bool(0.5) {
                    // Cheap pseudo-random bytes (chacha is slow in debug builds).
                    let mut x: u64 = rng.random::<u64>() | 1;
                    for c in data.chunks_mut(8) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
                    }
                } else {
                    data.fill(rng.random());
                }
                d.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            55..72 => {
                let (off, len) = random_range(rng, size, lss, 4 * bs);
                d.unmap(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            72..78 => d.flush().unwrap(),
            78..86 => {
                d.close().unwrap();
                d = Vhdx::open(path, false).unwrap();
                check(&d, model, &format!("{what} after reopen"));
            }
            86..90 => {
                // Bad requests fail cleanly.
                assert!(d.write_at(&[0u8; 512], size).is_err());
                assert!(d.read_at(&mut [0u8; 8], 0).is_err() || lss == 8);
                let mut b = vec![0u8; lss as usize];
                assert!(d.read_at(&mut b, size - lss + lss).is_err());
            }
            90..94 if allow_resize => {
                let new = if rng.random_bool(0.7) {
                    size + rng.random_range(1..=3 * bs / lss) * lss
                } else {
                    (size - rng.random_range(1..=(size / 4) / lss) * lss).max(lss)
                };
                if new > size {
                    d.resize(new, ShrinkPolicy::KeepData).unwrap();
                    model.resize(new as usize, 0);
                } else {
                    let tail_zero = model[new as usize..].iter().all(|&b| b == 0);
                    match d.resize(new, ShrinkPolicy::KeepData) {
                        Ok(()) => {
                            assert!(tail_zero, "{what}: shrink dropped data");
                            model.truncate(new as usize);
                        }
                        Err(_) => {
                            assert!(!tail_zero, "{what}: shrink of zeros refused");
                            d.resize(new, ShrinkPolicy::DropData).unwrap();
                            model.truncate(new as usize);
                        }
                    }
                }
                check(&d, model, &format!("{what} after resize to {new}"));
            }
            94..97 => {
                let r = d.reclaimable_blocks().unwrap();
                let blocks: Vec<u64> = r.iter().map(|x| x.0).collect();
                match d.discard_blocks(&blocks) {
                    Ok(()) => {}
                    Err(vhdx::Error::Invalid(_)) => {} // fixed disks
                    Err(e) => panic!("{what}: discard: {e}"),
                }
                check(&d, model, &format!("{what} after discard"));
            }
            _ => {
                if d.kind() != vhdx::vhdx::VhdxKind::Fixed || rng.random_bool(0.3) {
                    let s = d.compact().unwrap();
                    assert!(s.new_file_size <= s.old_file_size);
                    check(&d, model, &format!("{what} after compact"));
                }
            }
        }
    }
    check(&d, model, &format!("{} end", path.display()));
    d
}

fn model_run(cfg: Cfg) {
    let dir = scratch();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let lss = u64::from(cfg.lss);
    let size = 9 * MIB + 7 * lss;
    let base = dir.path().join("base.vhdx");
    let d = VhdxBuilder::new(size)
        .logical_sector_size(cfg.lss)
        .block_size(cfg.block)
        .fixed(cfg.fixed)
        .create(&base)
        .unwrap();
    let mut model = vec![0u8; size as usize];
    let d = run_ops(&mut rng, &base, d, &mut model, 80, true);
    d.close().unwrap();
    if cfg.lss == 512 {
        qemu_check(&base);
    }
    let mut snapshots: Vec<(PathBuf, Vec<u8>)> = vec![(base.clone(), model.clone())];
    let mut top = base;
    for depth in 1..=3 {
        let child = dir.path().join(format!("child{depth}.vhdx"));
        let d = VhdxBuilder::differencing(&top)
            .block_size(cfg.child_block)
            .create(&child)
            .unwrap();
        check(&d, &model, "fresh child");
        let d = run_ops(&mut rng, &child, d, &mut model, 60, false);
        d.close().unwrap();
        snapshots.push((child.clone(), model.clone()));
        top = child;
    }
    // Every layer still reads its own snapshot (parents never change).
    for (p, m) in &snapshots {
        let d = Vhdx::open(p, true).unwrap();
        check(&d, m, &format!("{} reopened read-only", p.display()));
    }
}

#[test]
fn model_512_dynamic() {
    model_run(Cfg {
        seed: 1,
        lss: 512,
        block: 1 << 20,
        fixed: false,
        child_block: 1 << 20,
    });
}

#[test]
fn model_512_fixed_2m() {
    model_run(Cfg {
        seed: 2,
        lss: 512,
        block: 2 << 20,
        fixed: true,
        child_block: 4 << 20,
    });
}

#[test]
fn model_4096_dynamic() {
    model_run(Cfg {
        seed: 3,
        lss: 4096,
        block: 1 << 20,
        fixed: false,
        child_block: 2 << 20,
    });
}

#[test]
fn model_more_seeds() {
    for seed in 10..13 {
        model_run(Cfg {
            seed,
            lss: if seed % 2 == 0 { 512 } else { 4096 },
            block: 1 << 20,
            fixed: seed % 3 == 0,
            child_block: 1 << 20,
        });
    }
}

#[test]
fn concurrent_writers_allocate_and_mark_bitmaps() {
    let dir = scratch();
    let base = dir.path().join("base.vhdx");
    let size = 16 * MIB;
    let d = VhdxBuilder::new(size)
        .block_size(1 << 20)
        .create(&base)
        .unwrap();
    d.write_at(&vec![0x77; size as usize], 0).unwrap();
    d.close().unwrap();
    for path in ["dyn.vhdx", "diff.vhdx"] {
        let p = dir.path().join(path);
        let d = if path == "dyn.vhdx" {
            VhdxBuilder::new(size).block_size(1 << 20).create(&p)
        } else {
            VhdxBuilder::differencing(&base)
                .block_size(1 << 20)
                .create(&p)
        }
        .unwrap();
        let d = Arc::new(d);
        // 4 threads, interleaved 4 KiB stripes: every block is allocated by a race.
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    let mut off = u64::from(t) * 4096;
                    while off < size {
                        if (off / 4096) % 3 != 2 {
                            d.write_at(&[t + 1; 4096], off).unwrap();
                        }
                        off += 4 * 4096;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let background = if path == "dyn.vhdx" { 0 } else { 0x77 };
        let mut model = vec![background; size as usize];
        for s in 0..size / 4096 {
            if s % 3 != 2 {
                let t = (s % 4) as u8;
                model[(s * 4096) as usize..((s + 1) * 4096) as usize].fill(t + 1);
            }
        }
        check(&*d, &model, path);
        let d = Arc::into_inner(d).unwrap();
        d.close().unwrap();
        let d = Vhdx::open(&p, true).unwrap();
        check(&d, &model, &format!("{path} reopened"));
        // Every block allocated exactly once.
        assert_eq!(d.info().unwrap().allocated_blocks, 16);
        let file_len = std::fs::metadata(&p).unwrap().len();
        assert!(
            file_len < 16 * MIB + 16 * MIB,
            "leaked blocks: file is {file_len}"
        );
    }
}

#[test]
fn huge_sparse_disk() {
    // 64 TiB with 32 MiB blocks: a 16 MiB BAT, nothing else allocated.
    let dir = scratch();
    let p = dir.path().join("huge.vhdx");
    let size = 64u64 << 40;
    let d = VhdxBuilder::new(size)
        .block_size(32 << 20)
        .create(&p)
        .unwrap();
    assert_eq!(d.size(), size);
    d.write_at(&[0xe1; 4096], size - 4096).unwrap();
    d.write_at(&[0xe2; 512], 1 << 40).unwrap();
    d.close().unwrap();
    let d = Vhdx::open(&p, true).unwrap();
    let mut b = vec![0u8; 8192];
    d.read_at(&mut b, size - 8192).unwrap();
    assert!(b[..4096].iter().all(|&x| x == 0) && b[4096..].iter().all(|&x| x == 0xe1));
    d.read_at(&mut b[..1024], 1 << 40).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0xe2) && b[512..1024].iter().all(|&x| x == 0));
    assert!(d.read_at(&mut b[..512], size).is_err());
    assert_eq!(d.info().unwrap().allocated_blocks, 2);
    // Past 64 TiB is refused.
    assert!(VhdxBuilder::new(size + 512)
        .create(dir.path().join("toobig.vhdx"))
        .is_err());
}

#[test]
fn unmap_gives_space_back_and_fixed_is_preallocated() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let used = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let p = dir.path().join("dyn.vhdx");
    let d = VhdxBuilder::new(64 * MIB)
        .block_size(1 << 20)
        .create(&p)
        .unwrap();
    d.write_at(&vec![0x42; 32 * MIB as usize], 0).unwrap();
    d.flush().unwrap();
    let full = used(&p);
    assert!(full >= 32 * MIB, "{full}");
    // Whole blocks and a partial range inside an allocated block.
    d.unmap(0, 16 * MIB).unwrap();
    d.unmap(20 * MIB + 512, MIB - 1024).unwrap();
    d.flush().unwrap();
    let after = used(&p);
    assert!(after <= full - 16 * MIB, "{full} -> {after}");
    let mut v = vec![1u8; 32 * MIB as usize];
    d.read_at(&mut v, 0).unwrap();
    assert!(v[..16 * MIB as usize].iter().all(|&b| b == 0));
    assert!(v[16 * MIB as usize..20 * MIB as usize + 512]
        .iter()
        .all(|&b| b == 0x42));
    assert!(v[20 * MIB as usize + 512..21 * MIB as usize - 512]
        .iter()
        .all(|&b| b == 0));
    assert!(v[21 * MIB as usize - 512..].iter().all(|&b| b == 0x42));
    d.close().unwrap();

    let f = dir.path().join("fixed.vhdx");
    let d = VhdxBuilder::new(48 * MIB)
        .fixed(true)
        .block_size(1 << 20)
        .create(&f)
        .unwrap();
    assert!(used(&f) >= 48 * MIB, "fixed disk not preallocated");
    d.unmap(0, 8 * MIB).unwrap();
    d.close().unwrap();
    assert!(used(&f) >= 48 * MIB, "fixed disk lost its allocation");
}

#[test]
fn moved_chain_and_set_parent() {
    let dir = scratch();
    let a = dir.path().join("a");
    std::fs::create_dir(&a).unwrap();
    let base = a.join("base.vhdx");
    let d = VhdxBuilder::new(4 * MIB)
        .block_size(1 << 20)
        .create(&base)
        .unwrap();
    d.write_at(&vec![0x10; 4 * MIB as usize], 0).unwrap();
    d.close().unwrap();
    let sub = a.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let child = sub.join("child.vhdx");
    let d = VhdxBuilder::differencing(&base).create(&child).unwrap();
    d.write_at(&[0x20; 512], 512).unwrap();
    d.close().unwrap();
    let info = Vhdx::open(&child, true).unwrap().info().unwrap();
    assert!(info
        .parent_locator
        .iter()
        .any(|(k, v)| k == "relative_path" && v == "..\\base.vhdx"));
    let mut model = vec![0x10; 4 * MIB as usize];
    model[512..1024].fill(0x20);
    // Move the whole tree: the relative path still resolves.
    let b = dir.path().join("b");
    std::fs::rename(&a, &b).unwrap();
    let child = b.join("sub/child.vhdx");
    check(&Vhdx::open(&child, true).unwrap(), &model, "moved chain");
    // Move only the parent: the child cannot find it...
    let elsewhere = dir.path().join("moved-base.vhdx");
    std::fs::rename(b.join("base.vhdx"), &elsewhere).unwrap();
    assert!(matches!(
        Vhdx::open(&child, true),
        Err(vhdx::Error::Corrupt {
            structure: "parent locator",
            ..
        })
    ));
    // ...but opens without it for inspection, and set_parent repairs it.
    let orphan = Vhdx::open_without_parent(&child).unwrap();
    assert!(orphan.read_at(&mut [0u8; 512], 4096).is_err());
    let mut s = [0u8; 512];
    orphan.read_at(&mut s, 512).unwrap();
    assert_eq!(s, [0x20; 512]);
    drop(orphan);
    vhdx::vhdx::set_parent(&child, &elsewhere, false).unwrap();
    check(
        &Vhdx::open(&child, true).unwrap(),
        &model,
        "after set_parent",
    );
    // A different disk as parent is refused unless forced; a loop is always refused.
    let other = dir.path().join("other.vhdx");
    VhdxBuilder::new(4 * MIB)
        .create(&other)
        .unwrap()
        .close()
        .unwrap();
    assert!(vhdx::vhdx::set_parent(&child, &other, false).is_err());
    let grandchild = dir.path().join("gc.vhdx");
    VhdxBuilder::differencing(&child)
        .create(&grandchild)
        .unwrap()
        .close()
        .unwrap();
    assert!(vhdx::vhdx::set_parent(&child, &grandchild, true).is_err());
    vhdx::vhdx::set_parent(&child, &other, true).unwrap();
    let mut m2 = vec![0u8; 4 * MIB as usize];
    m2[512..1024].fill(0x20);
    check(&Vhdx::open(&child, true).unwrap(), &m2, "forced new parent");
}

#[test]
fn merge_child_into_parent() {
    let dir = scratch();
    let base = dir.path().join("base.vhdx");
    let d = VhdxBuilder::new(8 * MIB)
        .block_size(1 << 20)
        .create(&base)
        .unwrap();
    d.write_at(&vec![0x31; 8 * MIB as usize], 0).unwrap();
    d.close().unwrap();
    let child = dir.path().join("child.vhdx");
    let d = VhdxBuilder::differencing(&base)
        .block_size(1 << 20)
        .create(&child)
        .unwrap();
    let mut model = vec![0x31; 8 * MIB as usize];
    d.write_at(&[0x42; 1536], 4096).unwrap();
    model[4096..4096 + 1536].fill(0x42);
    d.write_at(&vec![0x43; MIB as usize], 2 * MIB).unwrap();
    model[2 * MIB as usize..3 * MIB as usize].fill(0x43);
    d.unmap(5 * MIB, MIB).unwrap();
    model[5 * MIB as usize..6 * MIB as usize].fill(0);
    check(&d, &model, "child before merge");
    d.close().unwrap();
    let p = vhdx::vhdx::merge_into_parent(&child).unwrap();
    assert_eq!(p, base);
    check(
        &Vhdx::open(&base, true).unwrap(),
        &model,
        "parent after merge",
    );
    // The child is now stale (the parent's DataWriteGuid changed).
    assert!(Vhdx::open(&child, true).is_err());
}

#[test]
fn locks_keep_writers_exclusive() {
    let dir = scratch();
    let base = dir.path().join("base.vhdx");
    VhdxBuilder::new(4 * MIB)
        .create(&base)
        .unwrap()
        .close()
        .unwrap();
    let w = Vhdx::open(&base, false).unwrap();
    // A second writer is refused; a reader for inspection is allowed.
    assert!(matches!(
        Vhdx::open(&base, false),
        Err(vhdx::Error::Io { .. })
    ));
    Vhdx::open(&base, true).unwrap();
    // A child cannot be created over (or opened on) a parent that is open for writing.
    let child = dir.path().join("child.vhdx");
    assert!(VhdxBuilder::differencing(&base).create(&child).is_err());
    drop(w);
    VhdxBuilder::differencing(&base)
        .create(&child)
        .unwrap()
        .close()
        .unwrap();
    let c = Vhdx::open(&child, false).unwrap();
    // While the child is open, its parent cannot be opened for writing.
    assert!(Vhdx::open(&base, false).is_err());
    drop(c);
    Vhdx::open(&base, false).unwrap();
}

#[test]
fn deep_chain_opens_up_to_the_limit() {
    use vhdx::vhdx::MAX_CHAIN_DEPTH;
    let dir = scratch();
    let mut top = dir.path().join("l0.vhdx");
    let d = VhdxBuilder::new(2 * MIB)
        .block_size(1 << 20)
        .create(&top)
        .unwrap();
    d.write_at(&[1u8; 512], 0).unwrap();
    d.close().unwrap();
    // Each layer writes its own sector; the top sees all of them.
    for i in 1..MAX_CHAIN_DEPTH {
        let p = dir.path().join(format!("l{i}.vhdx"));
        let d = VhdxBuilder::differencing(&top)
            .block_size(1 << 20)
            .create(&p)
            .unwrap();
        d.write_at(&[(i + 1) as u8; 512], i as u64 * 512).unwrap();
        d.close().unwrap();
        top = p;
    }
    let d = Vhdx::open(&top, true).unwrap();
    let mut v = vec![0u8; MAX_CHAIN_DEPTH * 512];
    d.read_at(&mut v, 0).unwrap();
    for i in 0..MAX_CHAIN_DEPTH {
        assert!(
            v[i * 512..(i + 1) * 512]
                .iter()
                .all(|&b| b == (i + 1) as u8),
            "layer {i}"
        );
    }
    drop(d);
    // One more layer is refused with a clear error.
    let p = dir.path().join("too-deep.vhdx");
    match VhdxBuilder::differencing(&top).create(&p) {
        Err(vhdx::Error::Corrupt { problem, .. }) => assert!(problem.contains("deeper")),
        other => panic!("expected a depth error, got {other:?}"),
    }
}
