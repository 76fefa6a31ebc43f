//! VHDX allocation queries (`allocated_ranges`, `chain_allocated_ranges`,
//! `allocated_block_offsets`) and the log-protected disk identifier reset.

use std::path::Path;

use rand::{Rng, SeedableRng};
use uuid::Uuid;
use vhdx::vhdx::{Vhdx, VhdxBuilder};
use vhdx::{Disk, Error};

const MIB: u64 = 1 << 20;

fn random(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

fn read_all(d: &dyn Disk) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

fn covers(ranges: &[(u64, u64)], start: u64, len: u64) -> bool {
    ranges
        .iter()
        .any(|&(s, l)| s <= start && start + len <= s + l)
}

/// Ranges are ascending, disjoint, non-adjacent, non-empty and inside the disk; every
/// non-zero byte of `data` lies in one.
fn check_ranges(ranges: &[(u64, u64)], data: &[u8], what: &str) {
    for w in ranges.windows(2) {
        assert!(w[0].0 + w[0].1 < w[1].0, "{what}: {ranges:?} not merged");
    }
    for &(s, l) in ranges {
        assert!(l > 0 && s + l <= data.len() as u64, "{what}: {ranges:?}");
    }
    let mut pos = 0u64;
    for &(s, l) in ranges {
        assert!(
            data[pos as usize..s as usize].iter().all(|&b| b == 0),
            "{what}: data outside the ranges before {s:#x}"
        );
        pos = s + l;
    }
    assert!(data[pos as usize..].iter().all(|&b| b == 0), "{what}: tail");
}

#[test]
fn dynamic_ranges_cover_data_and_skip_untouched_blocks() {
    let dir = tempfile::tempdir().unwrap();
    for lss in [512u32, 4096] {
        let p = dir.path().join(format!("d{lss}.vhdx"));
        let d = VhdxBuilder::new(64 * MIB)
            .block_size(MIB as u32)
            .logical_sector_size(lss)
            .create(&p)
            .unwrap();
        assert_eq!(d.allocated_ranges().unwrap(), vec![]);
        let writes = [
            (0u64, 4096usize),
            (3 * MIB + 8192, 64 * 1024),
            (10 * MIB - 4096, 8192), // straddles two blocks
            (40 * MIB, 3 * MIB as usize),
        ];
        for (i, &(o, n)) in writes.iter().enumerate() {
            d.write_at(&random(i as u64, n), o).unwrap();
        }
        d.flush().unwrap();
        let touched: Vec<u64> = writes
            .iter()
            .flat_map(|&(o, n)| o / MIB..(o + n as u64).div_ceil(MIB))
            .collect();
        for d in [d, Vhdx::open(&p, true).unwrap()] {
            let r = d.allocated_ranges().unwrap();
            for &(o, n) in &writes {
                assert!(covers(&r, o, n as u64), "{lss}: {o:#x}+{n:#x} in {r:?}");
            }
            // Nothing outside the blocks written to.
            for &(s, l) in &r {
                for b in s / MIB..(s + l).div_ceil(MIB) {
                    assert!(touched.contains(&b), "{lss}: block {b} in {r:?}");
                }
            }
            check_ranges(&r, &read_all(&d), "dynamic");
            assert_eq!(d.chain_allocated_ranges().unwrap(), r);
            let blocks: Vec<u64> = d.allocated_block_offsets().iter().map(|x| x.0).collect();
            let mut want = touched.clone();
            want.sort();
            want.dedup();
            assert_eq!(blocks, want);
        }
    }
}

#[test]
fn fixed_disk_ranges_cover_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.vhdx");
    let d = VhdxBuilder::new(32 * MIB)
        .fixed(true)
        .block_size(MIB as u32)
        .create(&p)
        .unwrap();
    d.write_at(&random(7, 1 << 20), 5 * MIB + 4096).unwrap();
    d.flush().unwrap();
    let r = d.allocated_ranges().unwrap();
    assert!(covers(&r, 5 * MIB + 4096, MIB), "{r:?}");
    check_ranges(&r, &read_all(&d), "fixed");
    // Every block is allocated, one after another.
    let offs = d.allocated_block_offsets();
    assert_eq!(offs.len(), 32);
    assert!(offs.windows(2).all(|w| w[1].1 == w[0].1 + MIB));
}

#[test]
fn differencing_ranges_follow_sector_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    {
        let b = VhdxBuilder::new(16 * MIB)
            .block_size(MIB as u32)
            .create(&base)
            .unwrap();
        b.write_at(&random(1, 2 * MIB as usize), 0).unwrap();
        b.close().unwrap();
    }
    let c = VhdxBuilder::differencing(&base).create(&child).unwrap();
    // Sector-granular writes into partially present blocks, one whole block, and zeros
    // written over parent data (they hide it, so they count).
    c.write_at(&[0xaa; 512], 3 * MIB + 1024).unwrap();
    c.write_at(&[0xbb; 4096], 5 * MIB + 1536).unwrap();
    c.write_at(&random(2, MIB as usize), 8 * MIB).unwrap();
    c.write_at(&[0u8; 1024], MIB - 512).unwrap();
    // A scattered bitmap (every other sector of block 6) is reported as the whole block.
    let bs = u64::from(c.block_size());
    let scattered = 6 * bs;
    for k in 0..64u64 {
        c.write_at(&[0xcc; 512], scattered + k * 1024).unwrap();
    }
    c.flush().unwrap();
    let want = vec![
        (MIB - 512, 1024),
        (3 * MIB + 1024, 512),
        (5 * MIB + 1536, 4096),
        (8 * MIB, MIB),
        (scattered, bs),
    ];
    assert_eq!(c.allocated_ranges().unwrap(), want);
    assert_eq!(
        c.chain_allocated_ranges().unwrap(),
        vec![
            (0, 2 * MIB),
            (3 * MIB + 1024, 512),
            (5 * MIB + 1536, 4096),
            (8 * MIB, MIB),
            (scattered, bs),
        ]
    );
    c.close().unwrap();
    let c = Vhdx::open(&child, true).unwrap();
    assert_eq!(c.allocated_ranges().unwrap(), want);
    check_ranges(&c.chain_allocated_ranges().unwrap(), &read_all(&c), "chain");
    let mut blocks: Vec<u64> = want
        .iter()
        .flat_map(|&(s, l)| s / bs..(s + l).div_ceil(bs))
        .collect();
    blocks.dedup();
    let offs = c.allocated_block_offsets();
    assert_eq!(offs.iter().map(|x| x.0).collect::<Vec<_>>(), blocks);
}

#[test]
fn set_disk_id_is_logged_and_keeps_the_data_write_guid() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    let old_id = Uuid::new_v4();
    let data = random(3, 3 * MIB as usize);
    {
        let b = VhdxBuilder::new(16 * MIB)
            .disk_id(old_id)
            .create(&base)
            .unwrap();
        b.write_at(&data, MIB).unwrap();
        b.close().unwrap();
    }
    VhdxBuilder::differencing(&base)
        .create(&child)
        .unwrap()
        .close()
        .unwrap();
    let before = Vhdx::open(&base, true).unwrap().info().unwrap();
    assert_eq!(before.disk_id, old_id);
    // A read-only open refuses.
    let mut ro = Vhdx::open(&base, true).unwrap();
    assert!(matches!(
        ro.set_disk_id(Uuid::new_v4()),
        Err(Error::ReadOnly)
    ));
    drop(ro);

    let new_id = Uuid::new_v4();
    let mut b = Vhdx::open(&base, false).unwrap();
    b.set_disk_id(new_id).unwrap();
    assert_eq!(b.disk_id(), new_id);
    b.close().unwrap();
    let after = Vhdx::open(&base, true).unwrap().info().unwrap();
    assert_eq!(after.disk_id, new_id);
    assert_ne!(after.file_write_guid, before.file_write_guid);
    assert_eq!(after.data_write_guid, before.data_write_guid);
    let c = Vhdx::open(&child, true).unwrap();
    assert_eq!(&read_all(&c)[MIB as usize..4 * MIB as usize], &data[..]);
    drop(c);
    qemu_check(&base);
}

#[test]
fn set_disk_id_replays_from_the_log() {
    // The in-place write of the new id is lost (a crash before it reached the disk): the log
    // entry brings it back on the next open.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.vhdx");
    let old_id = Uuid::new_v4();
    {
        let d = VhdxBuilder::new(8 * MIB)
            .block_size(MIB as u32)
            .disk_id(old_id)
            .create(&p)
            .unwrap();
        d.write_at(&[0x5a; 8192], MIB + 4096).unwrap();
        d.close().unwrap();
    }
    let pristine = std::fs::read(&p).unwrap();
    let at: Vec<usize> = find_all(&pristine, &old_id.to_bytes_le());
    assert_eq!(at.len(), 1, "the id is stored once");
    let new_id = Uuid::new_v4();
    let mut d = Vhdx::open(&p, false).unwrap();
    d.set_disk_id(new_id).unwrap();
    // Snapshot the file as a crash would leave it: the session is still open.
    let mut crashed = std::fs::read(&p).unwrap();
    d.close().unwrap();
    crashed[at[0]..at[0] + 16].copy_from_slice(&old_id.to_bytes_le());
    for read_only in [true, false] {
        let q = dir.path().join(format!("crashed-{read_only}.vhdx"));
        std::fs::write(&q, &crashed).unwrap();
        let d = Vhdx::open(&q, read_only).unwrap();
        let i = d.info().unwrap();
        assert!(i.log_replayed, "{read_only}");
        assert_eq!(i.disk_id, new_id, "{read_only}");
        let r = d.allocated_ranges().unwrap();
        if read_only {
            // The replayed log lives in memory, not in the host file: whole blocks.
            assert_eq!(r, vec![(MIB, MIB)]);
        } else {
            assert!(covers(&r, MIB + 4096, 8192) && covers(&[(MIB, MIB)], r[0].0, r[0].1));
            assert_eq!(r.len(), 1, "{r:?}");
        }
        drop(d);
        if !read_only {
            // Replayed into the file: qemu sees the new id and no pending log.
            let bytes = std::fs::read(&q).unwrap();
            assert_eq!(&bytes[at[0]..at[0] + 16], &new_id.to_bytes_le());
            qemu_check(&q);
        }
    }
}

fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

fn qemu_check(p: &Path) {
    match std::process::Command::new("qemu-img")
        .args(["check", "-f", "vhdx", p.to_str().unwrap()])
        .output()
    {
        Ok(o) => assert!(
            o.status.success(),
            "qemu-img check {}: {}{}",
            p.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(_) => eprintln!("SKIPPED qemu-img check: qemu-img not installed"),
    }
}
