//! Log replay: a crafted file with a pending log (a BAT update mapping a new block, and a zero
//! descriptor) is replayed in memory for read-only opens (file untouched), into the file for
//! read-write opens, and qemu-img's own replay (`check -r all`) agrees with ours.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use uuid::Uuid;
use vhdx::vhdx::format::{self, Header};
use vhdx::vhdx::{log, Vhdx, VhdxBuilder};
use vhdx::{Disk, Error};

const MIB: u64 = 1 << 20;

fn read_all(d: &dyn Disk) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    d.read_at(&mut v, 0).unwrap();
    v
}

fn current_header(f: &std::fs::File) -> (usize, Header) {
    let mut hs = Vec::new();
    for off in format::HEADER_OFFSETS {
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, off).unwrap();
        hs.push(Header::parse(&b).ok());
    }
    match (&hs[0], &hs[1]) {
        (Some(a), Some(b)) if b.sequence_number > a.sequence_number => (1, b.clone()),
        (Some(a), _) => (0, a.clone()),
        (None, Some(b)) => (1, b.clone()),
        _ => panic!("no header"),
    }
}

fn bat_offset(f: &std::fs::File) -> u64 {
    let mut b = vec![0u8; 65536];
    f.read_exact_at(&mut b, format::REGION_TABLE_OFFSETS[0])
        .unwrap();
    format::parse_region_table(&b)
        .unwrap()
        .iter()
        .find(|r| r.guid == format::BAT_REGION)
        .unwrap()
        .file_offset
}

struct Crafted {
    expected: Vec<u8>,
}

/// Builds the pending-log file. With `torn_second`, the second entry's checksum is broken, so
/// only the first entry (the BAT update) is replayed.
fn craft(path: &Path, torn_second: bool, flushed_past_end: bool) -> Crafted {
    let size = 16 * MIB;
    let d = VhdxBuilder::new(size)
        .block_size(1 << 20)
        .create(path)
        .unwrap();
    d.write_at(&vec![0xaa; MIB as usize], 0).unwrap();
    d.close().unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let bat = bat_offset(&f);
    let mut sector = vec![0u8; 4096];
    f.read_exact_at(&mut sector, bat).unwrap();
    let x = format::bat_offset(format::le64(&sector, 0));
    assert_ne!(x, 0);
    // New block B at the 1 MiB-aligned end of the file, not yet in the BAT.
    let y = f.metadata().unwrap().len().div_ceil(MIB) * MIB;
    f.write_all_at(&vec![0xbb; MIB as usize], y).unwrap();
    format::put64(
        &mut sector,
        5 * 8,
        format::bat_entry(format::PAYLOAD_FULLY_PRESENT, y),
    );
    let (slot, mut h) = current_header(&f);
    let g = Uuid::new_v4();
    let file_len = f.metadata().unwrap().len();
    let flushed = if flushed_past_end {
        file_len + 10 * MIB
    } else {
        file_len
    };
    // Some stale garbage from an older log GUID first.
    let stale = log::build_entry(&Uuid::new_v4(), 99, 0, 0, 0, &[(bat, vec![0xff; 4096])]);
    f.write_all_at(&stale, h.log_offset).unwrap();
    // Entry 1 at log offset 8 KiB: the BAT sector. Entry 2 right after: zero 4 KiB of block 0.
    let e1_off = 8192u64;
    let e1 = log::build_entry(&g, 10, e1_off as u32, flushed, file_len, &[(bat, sector)]);
    let e2_off = e1_off + e1.len() as u64;
    let mut e2 = log::build_zero_entry(&g, 11, e1_off as u32, flushed, file_len, &[(x, 4096)]);
    if torn_second {
        e2[100] ^= 0x40;
    }
    f.write_all_at(&e1, h.log_offset + e1_off).unwrap();
    f.write_all_at(&e2, h.log_offset + e2_off).unwrap();
    h.log_guid = g;
    h.sequence_number += 1;
    f.write_all_at(&h.serialize(), format::HEADER_OFFSETS[1 - slot])
        .unwrap();
    f.sync_all().unwrap();

    let mut expected = vec![0u8; size as usize];
    expected[..MIB as usize].fill(0xaa);
    if !torn_second {
        expected[..4096].fill(0);
    }
    expected[5 * MIB as usize..6 * MIB as usize].fill(0xbb);
    Crafted { expected }
}

fn qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED (qemu part): qemu-img not installed");
    }
    ok
}

fn qemu_raw(img: &Path, repair: bool) -> Vec<u8> {
    if repair {
        let o = Command::new("qemu-img")
            .args(["check", "-r", "all", "-f", "vhdx", img.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    } else {
        let o = Command::new("qemu-img")
            .args(["check", "-f", "vhdx", img.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let raw = img.with_extension("raw");
    let o = Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(raw).unwrap()
}

#[test]
fn pending_log_replayed_in_memory_and_in_file() {
    for torn in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.vhdx");
        let c = craft(&p, torn, false);
        let before = std::fs::read(&p).unwrap();

        // Read-only: replayed in memory, file untouched.
        let d = Vhdx::open(&p, true).unwrap();
        assert!(d.info().unwrap().log_replayed);
        assert!(read_all(&d) == c.expected, "read-only replay (torn={torn})");
        drop(d);
        assert!(std::fs::read(&p).unwrap() == before, "read-only open wrote");

        // qemu's replay agrees.
        if qemu() {
            let q = dir.path().join("q.vhdx");
            std::fs::copy(&p, &q).unwrap();
            assert!(
                qemu_raw(&q, true) == c.expected,
                "qemu replay (torn={torn})"
            );
        }

        // Read-write: replayed into the file, log GUID cleared, new FileWriteGuid.
        let (_, h0) = current_header(&std::fs::File::open(&p).unwrap());
        let d = Vhdx::open(&p, false).unwrap();
        assert!(read_all(&d) == c.expected);
        let info = d.info().unwrap();
        assert_ne!(info.file_write_guid, h0.file_write_guid);
        assert_eq!(info.data_write_guid, h0.data_write_guid);
        d.close().unwrap();
        let (_, h1) = current_header(&std::fs::File::open(&p).unwrap());
        assert!(h1.log_guid.is_nil());
        let d = Vhdx::open(&p, true).unwrap();
        assert!(!d.info().unwrap().log_replayed);
        assert!(read_all(&d) == c.expected);
        drop(d);
        if qemu() {
            assert!(qemu_raw(&p, false) == c.expected, "qemu after our replay");
        }
    }
}

#[test]
fn flushed_offset_past_end_is_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.vhdx");
    craft(&p, false, true);
    for ro in [true, false] {
        match Vhdx::open(&p, ro) {
            Err(Error::Corrupt {
                structure, problem, ..
            }) => {
                assert_eq!(structure, "log");
                assert!(problem.contains("truncated"), "{problem}");
            }
            other => panic!("expected a corrupt log error, got {other:?}"),
        }
    }
}

#[test]
fn crash_after_log_write_replays_bat_update() {
    // A session that allocated blocks and was never closed leaves LogGuid set; the last entry
    // replays idempotently and the data is intact.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhdx");
    let d = VhdxBuilder::new(8 * MIB)
        .block_size(1 << 20)
        .create(&p)
        .unwrap();
    d.write_at(&vec![3u8; 8192], 2 * MIB).unwrap();
    d.write_at(&vec![4u8; 4096], 7 * MIB).unwrap();
    d.flush().unwrap();
    // Simulate a crash: copy the file while it is open (LogGuid set).
    let crashed = dir.path().join("crashed.vhdx");
    std::fs::copy(&p, &crashed).unwrap();
    drop(d);
    let (_, h) = current_header(&std::fs::File::open(&crashed).unwrap());
    assert!(!h.log_guid.is_nil(), "open session keeps the log GUID set");
    let d = Vhdx::open(&crashed, true).unwrap();
    let v = read_all(&d);
    assert!(v[2 * MIB as usize..2 * MIB as usize + 8192]
        .iter()
        .all(|&b| b == 3));
    assert!(v[7 * MIB as usize..7 * MIB as usize + 4096]
        .iter()
        .all(|&b| b == 4));
    assert_eq!(v.iter().filter(|&&b| b != 0).count(), 8192 + 4096);
    drop(d);
    if qemu() {
        assert!(qemu_raw(&crashed, true) == v);
    }
}
