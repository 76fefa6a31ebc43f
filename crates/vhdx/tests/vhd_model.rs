//! Model test: random write / unmap / flush / resize / reopen / snapshot / compact sequences on
//! fixed, dynamic and differencing VHDs (chains up to 4 files deep), checked against an
//! in-memory model after every step.

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vhdx::vhd::{DiskType, Vhd, VhdCreateOptions, VhdOpenOptions};
use vhdx::Disk;

const S: usize = 512;

/// One file of the chain: its size and the sectors it holds.
struct Layer {
    size: u64,
    data: Vec<u8>,
    present: Vec<bool>,
}

struct Model {
    layers: Vec<Layer>, // base first
    base_type: DiskType,
}

impl Model {
    fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        for (k, sec) in (off / S as u64..(off + len) / S as u64).enumerate() {
            let dst = &mut out[k * S..(k + 1) * S];
            for l in self.layers.iter().rev() {
                if sec * S as u64 >= l.size {
                    break; // past this layer's end: zeros (parents are not consulted)
                }
                if l.present[sec as usize] {
                    dst.copy_from_slice(&l.data[sec as usize * S..(sec as usize + 1) * S]);
                    break;
                }
            }
        }
        out
    }
    fn top(&mut self) -> &mut Layer {
        self.layers.last_mut().unwrap()
    }
    fn write(&mut self, off: u64, b: &[u8]) {
        let t = self.top();
        for (k, c) in b.chunks(S).enumerate() {
            let sec = off as usize / S + k;
            t.data[sec * S..(sec + 1) * S].copy_from_slice(c);
            t.present[sec] = true;
        }
    }
    fn unmap(&mut self, off: u64, len: u64) {
        let diff = self.layers.len() > 1;
        let t = self.top();
        for sec in off as usize / S..(off + len) as usize / S {
            if diff {
                t.present[sec] = false; // reads the parent again
            } else {
                t.data[sec * S..(sec + 1) * S].fill(0);
            }
        }
    }
    fn resize(&mut self, size: u64) {
        let diff = self.layers.len() > 1;
        let t = self.top();
        let old = t.size;
        if size < old {
            for sec in size as usize / S..old as usize / S {
                if diff {
                    t.present[sec] = false;
                } else {
                    t.data[sec * S..(sec + 1) * S].fill(0);
                }
            }
        }
        t.size = size;
    }
}

const MAX: u64 = 12 << 20;

/// Random-looking data, cheap in unoptimized builds: one random sector, tiled, with a random
/// tag and the sector index in each sector's first 16 bytes.
fn pattern(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut sector = [0u8; S];
    rng.fill(&mut sector[..]);
    let tag: u64 = rng.random();
    let mut b = vec![0u8; len];
    for (i, c) in b.chunks_mut(S).enumerate() {
        c.copy_from_slice(&sector);
        c[..8].copy_from_slice(&tag.to_le_bytes());
        c[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    }
    b
}

fn new_layer(size: u64, present: bool) -> Layer {
    Layer {
        size,
        data: vec![0; MAX as usize],
        present: vec![present; MAX as usize / S],
    }
}

fn open_rw(p: &Path) -> Vhd {
    Vhd::open(p, &VhdOpenOptions::default()).unwrap()
}

fn verify(d: &Vhd, m: &Model, ctx: &str) {
    assert_eq!(d.size(), m.layers.last().unwrap().size, "{ctx}: size");
    let size = d.size();
    let mut b = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20);
        d.read_at(&mut b[..n as usize], off).unwrap();
        let want = m.read(off, n);
        if b[..n as usize] != want[..] {
            let i = b.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!("{ctx}: data differs at byte {}", off + i as u64);
        }
        off += n;
    }
}

fn run(seed: u64, base_type: DiskType, block_size: u32, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let size = 8u64 << 20;
    let mut paths: Vec<PathBuf> = vec![dir.path().join("base.vhd")];
    let mut d = Vhd::create(
        &paths[0],
        &VhdCreateOptions {
            disk_type: base_type,
            size,
            block_size,
            parent: None,
        },
    )
    .unwrap();
    let mut m = Model {
        layers: vec![new_layer(size, true)],
        base_type,
    };
    let _ = m.base_type;
    for step in 0..steps {
        let cur = d.size();
        let ctx = format!("seed {seed} {base_type:?} bs {block_size} step {step}");
        match rng.random_range(0..100) {
            0..45 => {
                let len = rng.random_range(1..=(3 * block_size as u64 / 512).min(cur / 512)) * 512;
                let off = rng.random_range(0..=(cur - len) / 512) * 512;
                let b = pattern(&mut rng, len as usize);
                d.write_at(&b, off).unwrap();
                m.write(off, &b);
            }
            45..60 => {
                let (off, len) = if rng.random_bool(0.5) {
                    let bs = block_size as u64;
                    let blk = rng.random_range(0..cur.div_ceil(bs));
                    let n = rng.random_range(1..=2u64);
                    (blk * bs, (n * bs).min(cur - blk * bs))
                } else {
                    let len = rng.random_range(1..=(cur / 512).min(600)) * 512;
                    (rng.random_range(0..=(cur - len) / 512) * 512, len)
                };
                d.unmap(off, len).unwrap();
                m.unmap(off, len);
            }
            60..70 => d.flush().unwrap(),
            70..78 => {
                drop(d);
                d = open_rw(paths.last().unwrap());
                let problems = d.check();
                assert!(
                    problems.is_empty(),
                    "{ctx}: check after reopen: {problems:?}"
                );
            }
            78..84 => {
                let new = rng.random_range(1..=MAX / (256 << 10)) * (256 << 10)
                    - if rng.random_bool(0.3) {
                        512 * rng.random_range(1..8)
                    } else {
                        0
                    };
                d.resize(new).unwrap();
                m.resize(new);
            }
            84..90 if paths.len() < 4 => {
                // Take a snapshot: a new differencing child over the current top.
                d.flush().unwrap();
                drop(d);
                let p = dir.path().join(format!("child{}.vhd", paths.len()));
                d = Vhd::create(
                    &p,
                    &VhdCreateOptions {
                        disk_type: DiskType::Differencing,
                        size: 0,
                        block_size,
                        parent: Some(paths.last().unwrap().clone()),
                    },
                )
                .unwrap();
                let top_size = m.layers.last().unwrap().size;
                m.layers.push(new_layer(top_size, false));
                paths.push(p);
            }
            90..95 => {
                let (before, after) = d.compact(&mut |_, _| {}).unwrap();
                assert!(after <= before, "{ctx}: compact grew the file");
                let problems = d.check();
                assert!(
                    problems.is_empty(),
                    "{ctx}: check after compact: {problems:?}"
                );
            }
            _ => {
                let len = rng.random_range(1..=(cur / 512).min(4096)) * 512;
                let off = rng.random_range(0..=(cur - len) / 512) * 512;
                let mut b = vec![0u8; len as usize];
                d.read_at(&mut b, off).unwrap();
                assert!(b == m.read(off, len), "{ctx}: read {off}+{len} differs");
            }
        }
        if step % 16 == 0 {
            verify(&d, &m, &ctx);
        }
    }
    verify(&d, &m, "end");
    drop(d);
    let d = Vhd::open(
        paths.last().unwrap(),
        &VhdOpenOptions {
            read_only: true,
            no_parent: false,
        },
    )
    .unwrap();
    verify(&d, &m, "reopened at end");
    assert!(d.check().is_empty());
}

#[test]
fn model_dynamic() {
    for seed in 0..6 {
        run(
            seed,
            DiskType::Dynamic,
            [64 << 10, 512 << 10, 2 << 20][seed as usize % 3],
            250,
        );
    }
}

#[test]
fn model_fixed_base() {
    for seed in 10..14 {
        run(
            seed,
            DiskType::Fixed,
            [64 << 10, 1 << 20][seed as usize % 2],
            250,
        );
    }
}

#[test]
fn concurrent_writers_on_dynamic_and_differencing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.vhd");
    let child = dir.path().join("c.vhd");
    let opts = VhdCreateOptions {
        disk_type: DiskType::Dynamic,
        size: 16 << 20,
        block_size: 1 << 20,
        parent: None,
    };
    let b = Vhd::create(&base, &opts).unwrap();
    b.write_at(&vec![0x11; 16 << 20], 0).unwrap();
    drop(b);
    for path in [&base, &child] {
        if path == &child {
            Vhd::create(
                &child,
                &VhdCreateOptions {
                    disk_type: DiskType::Differencing,
                    parent: Some(base.clone()),
                    ..opts.clone()
                },
            )
            .unwrap();
        }
        let d = open_rw(path);
        // 4 threads interleave 4 KiB writes within the same blocks (sector-disjoint).
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let d = &d;
                s.spawn(move || {
                    for i in 0..512u64 {
                        let off = (i * 4 + t as u64) * 4096 * 2;
                        d.write_at(&[t + 0x20; 4096], off).unwrap();
                    }
                });
            }
        });
        d.flush().unwrap();
        drop(d);
        let d = open_rw(path);
        let mut buf = vec![0u8; 16 << 20];
        d.read_at(&mut buf, 0).unwrap();
        for (k, c) in buf.chunks(4096).enumerate() {
            let want = if k % 2 == 0 && k / 2 < 2048 {
                0x20 + ((k / 2) % 4) as u8
            } else {
                0x11
            };
            assert!(c.iter().all(|&x| x == want), "{path:?}: chunk {k}");
        }
    }
}

#[test]
fn set_parent_and_disk_id() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    let b = Vhd::create(
        &base,
        &VhdCreateOptions {
            size: 4 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    b.write_at(&[0xaa; 4096], 0).unwrap();
    drop(b);
    Vhd::create(
        &child,
        &VhdCreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    // Move the parent into a subdirectory: the chain breaks, set_parent repairs it.
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let moved = dir.path().join("sub/base-moved.vhd");
    std::fs::rename(&base, &moved).unwrap();
    let err = Vhd::open(&child, &VhdOpenOptions::default()).err().unwrap();
    assert!(err.to_string().contains("parent not found"), "{err}");
    let mut c = Vhd::open(
        &child,
        &VhdOpenOptions {
            read_only: false,
            no_parent: true,
        },
    )
    .unwrap();
    c.set_parent(&moved, false).unwrap();
    drop(c);
    let c = Vhd::open(&child, &VhdOpenOptions::default()).unwrap();
    let mut buf = [0u8; 4096];
    c.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0xaa; 4096]);
    assert_eq!(c.info().parent_locators[0], ".\\sub\\base-moved.vhd");
    drop(c);
    // A new disk id on the parent breaks the linkage; set_parent refuses unless told to ignore.
    let mut p = open_rw(&moved);
    p.set_unique_id(uuid::Uuid::new_v4()).unwrap();
    drop(p);
    let err = Vhd::open(&child, &VhdOpenOptions::default()).err().unwrap();
    assert!(err.to_string().contains("unique id"), "{err}");
    let mut c = Vhd::open(
        &child,
        &VhdOpenOptions {
            read_only: false,
            no_parent: true,
        },
    )
    .unwrap();
    assert!(c.set_parent(&moved, false).is_err());
    c.set_parent(&moved, true).unwrap();
    drop(c);
    assert!(Vhd::open(&child, &VhdOpenOptions::default())
        .unwrap()
        .check()
        .is_empty());
}

#[test]
fn compact_returns_space() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhd");
    let d = Vhd::create(
        &p,
        &VhdCreateOptions {
            size: 64 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let mut m = vec![0u8; 64 << 20];
    for i in 0..32u64 {
        d.write_at(&[i as u8 + 1; 4096], i * (2 << 20)).unwrap();
        m[(i * (2 << 20)) as usize..(i * (2 << 20) + 4096) as usize].fill(i as u8 + 1);
    }
    // Zero most blocks again: they become free after compaction.
    for i in (0..32u64).filter(|i| i % 4 != 0) {
        d.write_at(&[0; 4096], i * (2 << 20)).unwrap();
        m[(i * (2 << 20)) as usize..(i * (2 << 20) + 4096) as usize].fill(0);
    }
    d.flush().unwrap();
    drop(d);
    let mut d = open_rw(&p);
    let (before, after) = d.compact(&mut |_, _| {}).unwrap();
    assert!(before > 60 << 20 && after < 20 << 20, "{before} -> {after}");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), after);
    drop(d);
    let d = Vhd::open(
        &p,
        &VhdOpenOptions {
            read_only: true,
            no_parent: false,
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 64 << 20];
    d.read_at(&mut buf, 0).unwrap();
    assert!(buf == m);
    assert_eq!(d.info().allocated_blocks, 8);
    assert!(d.check().is_empty());
}
