//! Hostile VHDX files: truncated, bad checksums, overlapping regions, absurd counts and sizes,
//! bad BAT entries, hostile logs, missing parents, parent loops, random corruption. Each is a
//! clear `Error::Corrupt` naming the structure (or, where a backup copy exists, a successful
//! open), never a panic.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use vhdx::vhdx::format::{self, Header, ParentLocator, RegionEntry};
use vhdx::vhdx::{log, Vhdx, VhdxBuilder};
use vhdx::{Disk, Error};

const MIB: u64 = 1 << 20;

fn rw(p: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap()
}

fn make(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let d = VhdxBuilder::new(8 * MIB)
        .block_size(1 << 20)
        .create(&p)
        .unwrap();
    d.write_at(&vec![0x5c; 2 * MIB as usize], MIB).unwrap();
    d.write_at(&vec![0x6d; 4096], 6 * MIB).unwrap();
    d.close().unwrap();
    p
}

#[track_caller]
fn expect_corrupt(p: &Path, want_structure: &str, want_text: &str) {
    for ro in [true, false] {
        match Vhdx::open(p, ro) {
            Err(Error::Corrupt {
                structure, problem, ..
            }) => {
                assert_eq!(structure, want_structure, "problem: {problem}");
                assert!(
                    problem.contains(want_text),
                    "{structure}: {problem:?} lacks {want_text:?}"
                );
                // The message is printable.
                let _ = format!(
                    "{}",
                    Error::Corrupt {
                        path: p.into(),
                        structure,
                        offset: 0,
                        problem
                    }
                );
            }
            Err(e) => panic!("expected Corrupt({want_structure}), got {e}"),
            Ok(_) => panic!("expected Corrupt({want_structure}), opened fine"),
        }
    }
}

fn headers(p: &Path) -> Vec<Header> {
    let f = rw(p);
    format::HEADER_OFFSETS
        .iter()
        .map(|&o| {
            let mut b = vec![0u8; 4096];
            f.read_exact_at(&mut b, o).unwrap();
            Header::parse(&b).unwrap()
        })
        .collect()
}

fn patch_headers(p: &Path, f: impl Fn(&mut Header)) {
    let file = rw(p);
    for (i, mut h) in headers(p).into_iter().enumerate() {
        f(&mut h);
        file.write_all_at(&h.serialize(), format::HEADER_OFFSETS[i])
            .unwrap();
    }
}

fn regions(p: &Path) -> Vec<RegionEntry> {
    let mut b = vec![0u8; 65536];
    rw(p)
        .read_exact_at(&mut b, format::REGION_TABLE_OFFSETS[0])
        .unwrap();
    format::parse_region_table(&b).unwrap()
}

fn write_regions(p: &Path, tables: [bool; 2], e: &[RegionEntry]) {
    let b = format::serialize_region_table(e);
    for (i, &w) in tables.iter().enumerate() {
        if w {
            rw(p)
                .write_all_at(&b, format::REGION_TABLE_OFFSETS[i])
                .unwrap();
        }
    }
}

fn region(p: &Path, g: Uuid) -> RegionEntry {
    *regions(p).iter().find(|r| r.guid == g).unwrap()
}

/// Patches the raw metadata table (no checksum protects it).
fn patch_metadata(p: &Path, f: impl Fn(&mut Vec<u8>)) {
    let off = region(p, format::METADATA_REGION).file_offset;
    let file = rw(p);
    let mut b = vec![0u8; MIB as usize];
    file.read_exact_at(&mut b, off).unwrap();
    f(&mut b);
    file.write_all_at(&b, off).unwrap();
}

/// Offset, inside the metadata region, of an item's data.
fn item_offset(meta: &[u8], id: Uuid) -> usize {
    format::parse_metadata_table(meta)
        .unwrap()
        .iter()
        .find(|e| e.item_id == id)
        .unwrap()
        .offset as usize
}

fn set_bat(p: &Path, index: u64, value: u64) {
    let off = region(p, format::BAT_REGION).file_offset;
    rw(p)
        .write_all_at(&value.to_le_bytes(), off + index * 8)
        .unwrap();
}

fn get_bat(p: &Path, index: u64) -> u64 {
    let off = region(p, format::BAT_REGION).file_offset;
    let mut b = [0u8; 8];
    rw(p).read_exact_at(&mut b, off + index * 8).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn not_vhdx_and_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.vhdx");
    std::fs::write(&empty, b"").unwrap();
    expect_corrupt(&empty, "file identifier", "past the end");
    let junk = dir.path().join("junk.vhdx");
    std::fs::write(&junk, vec![0x41u8; 2 << 20]).unwrap();
    expect_corrupt(&junk, "file identifier", "not a VHDX");
    let good = make(dir.path(), "good.vhdx");
    let len = std::fs::metadata(&good).unwrap().len();
    for cut in [
        8,
        4096,
        70_000,
        200_000,
        300_000,
        MIB + 5,
        3 * MIB,
        len - MIB,
    ] {
        let p = dir.path().join(format!("cut{cut}.vhdx"));
        std::fs::copy(&good, &p).unwrap();
        rw(&p).set_len(cut).unwrap();
        match Vhdx::open(&p, true) {
            Err(Error::Corrupt { .. }) => {}
            other => panic!("cut at {cut}: expected Corrupt, got {other:?}"),
        }
    }
}

#[test]
fn headers_checksums_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let p = make(dir.path(), "h.vhdx");
    // One header damaged: the other is used.
    rw(&p)
        .write_all_at(&[0xff], format::HEADER_OFFSETS[0] + 200)
        .unwrap();
    Vhdx::open(&p, true).unwrap();
    // Both damaged.
    rw(&p)
        .write_all_at(&[0xff], format::HEADER_OFFSETS[1] + 200)
        .unwrap();
    expect_corrupt(&p, "header", "checksum mismatch");

    let p = make(dir.path(), "h2.vhdx");
    patch_headers(&p, |h| h.log_offset = MIB + 4096);
    expect_corrupt(&p, "header", "log offset");
    let p = make(dir.path(), "h3.vhdx");
    patch_headers(&p, |h| h.version = 2);
    expect_corrupt(&p, "header", "version");
    let p = make(dir.path(), "h4.vhdx");
    patch_headers(&p, |h| h.log_length = u32::MAX / (1 << 20) * (1 << 20));
    expect_corrupt(&p, "region table", "log");
    // Sequence number at the maximum: opening works, a write session cannot overflow it.
    let p = make(dir.path(), "h5.vhdx");
    patch_headers(&p, |h| h.sequence_number = u64::MAX);
    let d = Vhdx::open(&p, false).unwrap();
    match d.write_at(&[1u8; 512], 0) {
        Err(Error::Corrupt { problem, .. }) => assert!(problem.contains("overflow")),
        other => panic!("expected overflow error, got {other:?}"),
    }
}

#[test]
fn region_tables() {
    let dir = tempfile::tempdir().unwrap();
    // Table 1 bad: table 2 is used.
    let p = make(dir.path(), "r1.vhdx");
    rw(&p)
        .write_all_at(&[0xee], format::REGION_TABLE_OFFSETS[0] + 999)
        .unwrap();
    let d = Vhdx::open(&p, true).unwrap();
    let mut b = vec![0u8; 4096];
    d.read_at(&mut b, MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0x5c));
    drop(d);
    rw(&p)
        .write_all_at(&[0xee], format::REGION_TABLE_OFFSETS[1] + 999)
        .unwrap();
    expect_corrupt(&p, "region table", "checksum");

    // Overlapping BAT and metadata regions (valid checksums).
    let p = make(dir.path(), "r2.vhdx");
    let mut e = regions(&p);
    let meta = e
        .iter()
        .find(|r| r.guid == format::METADATA_REGION)
        .unwrap()
        .file_offset;
    for r in &mut e {
        if r.guid == format::BAT_REGION {
            r.file_offset = meta;
        }
    }
    write_regions(&p, [true, true], &e);
    expect_corrupt(&p, "region table", "overlap");

    // A region over the log.
    let p = make(dir.path(), "r3.vhdx");
    let mut e = regions(&p);
    e[0].file_offset = MIB;
    write_regions(&p, [true, true], &e);
    expect_corrupt(&p, "region table", "overlap");

    // Unknown required region; unknown optional region is fine.
    let p = make(dir.path(), "r4.vhdx");
    let mut e = regions(&p);
    let end = std::fs::metadata(&p).unwrap().len().div_ceil(MIB) * MIB;
    rw(&p).set_len(end + MIB).unwrap();
    e.push(RegionEntry {
        guid: Uuid::new_v4(),
        file_offset: end,
        length: MIB as u32,
        required: false,
    });
    write_regions(&p, [true, true], &e);
    Vhdx::open(&p, true).unwrap();
    e.last_mut().unwrap().required = true;
    write_regions(&p, [true, true], &e);
    expect_corrupt(&p, "region table", "unknown required region");

    // Absurd entry count, region past the end of the file, missing BAT.
    let p = make(dir.path(), "r5.vhdx");
    let mut raw = format::serialize_region_table(&regions(&p));
    format::put32(&mut raw, 8, 100_000);
    format::put32(&mut raw, 4, 0);
    let c = format::crc32c(&raw);
    format::put32(&mut raw, 4, c);
    for o in format::REGION_TABLE_OFFSETS {
        rw(&p).write_all_at(&raw, o).unwrap();
    }
    expect_corrupt(&p, "region table", "entry count");
    let p = make(dir.path(), "r6.vhdx");
    let mut e = regions(&p);
    e[0].file_offset = 1 << 50;
    write_regions(&p, [true, true], &e);
    expect_corrupt(&p, "region table", "past the end");
    let p = make(dir.path(), "r7.vhdx");
    let e: Vec<_> = regions(&p)
        .into_iter()
        .filter(|r| r.guid != format::BAT_REGION)
        .collect();
    write_regions(&p, [true, true], &e);
    expect_corrupt(&p, "region table", "no BAT region");
}

type Patch = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn metadata_items() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Patch, &str, &str)> = vec![
        (
            "count",
            Box::new(|m| format::put16(m, 10, 60000)),
            "metadata table",
            "entry count",
        ),
        (
            "sig",
            Box::new(|m| m[0] = b'X'),
            "metadata table",
            "signature",
        ),
        (
            "block",
            Box::new(|m| {
                let o = item_offset(m, format::ITEM_FILE_PARAMETERS);
                format::put32(m, o, 3 << 20);
            }),
            "file parameters",
            "block size",
        ),
        (
            "vsize",
            Box::new(|m| {
                let o = item_offset(m, format::ITEM_VIRTUAL_DISK_SIZE);
                format::put64(m, o, 1 << 60);
            }),
            "virtual disk size",
            "64 TiB",
        ),
        (
            "lss",
            Box::new(|m| {
                let o = item_offset(m, format::ITEM_LOGICAL_SECTOR);
                format::put32(m, o, 1000);
            }),
            "logical sector size",
            "1000",
        ),
        (
            "itemoff",
            Box::new(|m| {
                // First entry's offset far outside the region.
                format::put32(m, 32 + 16, 0x7fff_0000);
            }),
            "metadata table",
            "does not fit",
        ),
        (
            "overlap",
            Box::new(|m| {
                let o = format::le32(m, 32 + 16);
                format::put32(m, 64 + 16, o);
            }),
            "metadata table",
            "overlap",
        ),
        (
            "unknown-required",
            Box::new(|m| {
                let g = Uuid::new_v4().to_bytes_le();
                m[32..48].copy_from_slice(&g);
            }),
            "metadata table",
            "unknown required item",
        ),
        (
            "has-parent-without-locator",
            Box::new(|m| {
                let o = item_offset(m, format::ITEM_FILE_PARAMETERS);
                format::put32(m, o + 4, 2);
            }),
            "metadata table",
            "without a parent locator",
        ),
    ];
    for (name, f, structure, text) in cases {
        let p = make(dir.path(), &format!("m-{name}.vhdx"));
        patch_metadata(&p, f);
        expect_corrupt(&p, structure, text);
    }
}

#[test]
fn bat_entries() {
    let dir = tempfile::tempdir().unwrap();
    let bat_region = |p: &Path| region(p, format::BAT_REGION);
    // Block past the end of the file.
    let p = make(dir.path(), "b1.vhdx");
    set_bat(&p, 0, format::bat_entry(6, 1 << 40));
    expect_corrupt(&p, "BAT", "outside the file");
    // Two blocks at the same place.
    let p = make(dir.path(), "b2.vhdx");
    let e1 = get_bat(&p, 1);
    set_bat(&p, 0, e1);
    expect_corrupt(&p, "BAT", "overlaps");
    // A block over the BAT region itself.
    let p = make(dir.path(), "b3.vhdx");
    let bo = bat_region(&p).file_offset;
    set_bat(&p, 4, format::bat_entry(6, bo));
    expect_corrupt(&p, "BAT", "overlaps");
    // Invalid state; PARTIALLY_PRESENT in a non-differencing file.
    let p = make(dir.path(), "b4.vhdx");
    set_bat(&p, 3, 4);
    expect_corrupt(&p, "BAT", "invalid payload block state 4");
    let p = make(dir.path(), "b5.vhdx");
    let e1 = get_bat(&p, 1);
    set_bat(&p, 1, (e1 & !7) | 7);
    expect_corrupt(&p, "BAT", "invalid payload block state 7");
    // BAT region too small for the virtual size (vsize raised to 60 TiB).
    let p = make(dir.path(), "b6.vhdx");
    patch_metadata(&p, |m| {
        let o = item_offset(m, format::ITEM_VIRTUAL_DISK_SIZE);
        format::put64(m, o, 60 << 40);
    });
    expect_corrupt(&p, "BAT", "entries");
    // Both state 3 and 5 (UNMAPPED) and 2 (ZERO) read zeros.
    let p = make(dir.path(), "b7.vhdx");
    let e1 = get_bat(&p, 1);
    set_bat(&p, 1, (e1 & !7) | 3);
    set_bat(&p, 2, (get_bat(&p, 2) & !7) | 5);
    set_bat(&p, 6, 2);
    let d = Vhdx::open(&p, true).unwrap();
    let mut v = vec![1u8; 8 * MIB as usize];
    d.read_at(&mut v, 0).unwrap();
    assert!(v.iter().all(|&b| b == 0));
}

#[test]
fn hostile_logs() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(u64, &str); 3] = [
        (4096, "header area"),
        (MIB, "log itself"),
        (1 << 45, "past the end"),
    ];
    for (target, text) in cases {
        let p = make(dir.path(), &format!("l{target}.vhdx"));
        let g = Uuid::new_v4();
        let h = headers(&p)[0].clone();
        let e = log::build_entry(&g, 1, 0, 0, 0, &[(target, vec![0xcc; 4096])]);
        rw(&p).write_all_at(&e, h.log_offset).unwrap();
        patch_headers(&p, |h| h.log_guid = g);
        expect_corrupt(&p, "log", text);
    }
    // A log GUID with no valid entries: nothing to replay, data intact.
    let p = make(dir.path(), "lnone.vhdx");
    patch_headers(&p, |h| h.log_guid = Uuid::new_v4());
    for ro in [true, false] {
        let d = Vhdx::open(&p, ro).unwrap();
        let mut b = vec![0u8; 4096];
        d.read_at(&mut b, 6 * MIB).unwrap();
        assert!(b.iter().all(|&x| x == 0x6d));
    }
    assert!(headers(&p)[0].log_guid.is_nil());
}

fn set_locator(p: &Path, entries: Vec<(String, String)>) {
    let bytes = ParentLocator { entries }.serialize();
    patch_metadata(p, |m| {
        let t = format::parse_metadata_table(m).unwrap();
        let i = t
            .iter()
            .position(|e| e.item_id == format::ITEM_PARENT_LOCATOR)
            .unwrap();
        let o = t[i].offset as usize;
        m[o..o + bytes.len()].copy_from_slice(&bytes);
        format::put32(m, 32 + i * 32 + 20, bytes.len() as u32);
    });
}

#[test]
fn parents_missing_mismatched_and_looping() {
    let dir = tempfile::tempdir().unwrap();
    let base = make(dir.path(), "base.vhdx");
    let a = dir.path().join("a.vhdx");
    VhdxBuilder::differencing(&base).create(&a).unwrap();
    let b = dir.path().join("b.vhdx");
    VhdxBuilder::differencing(&a).create(&b).unwrap();
    Vhdx::open(&b, true).unwrap();

    // Loop: a's parent becomes b (with b's real DataWriteGuid), b's parent is a.
    let b_guid = Vhdx::open(&b, true).unwrap().data_write_guid();
    set_locator(
        &a,
        vec![
            ("parent_linkage".into(), format::guid_braced(&b_guid)),
            ("relative_path".into(), ".\\b.vhdx".into()),
        ],
    );
    expect_corrupt(&b, "parent locator", "loops");
    expect_corrupt(&a, "parent locator", "loops");

    // A file that is its own parent.
    let s = dir.path().join("self.vhdx");
    VhdxBuilder::differencing(&base).create(&s).unwrap();
    let g = Vhdx::open(&s, true).unwrap().data_write_guid();
    set_locator(
        &s,
        vec![
            ("parent_linkage".into(), format::guid_braced(&g)),
            ("relative_path".into(), "self.vhdx".into()),
        ],
    );
    expect_corrupt(&s, "parent locator", "loops");

    // Missing parent.
    let m = dir.path().join("m.vhdx");
    VhdxBuilder::differencing(&base).create(&m).unwrap();
    set_locator(
        &m,
        vec![
            (
                "parent_linkage".into(),
                format::guid_braced(&Uuid::new_v4()),
            ),
            ("relative_path".into(), ".\\nothere.vhdx".into()),
            ("absolute_win32_path".into(), "C:\\vms\\gone.vhdx".into()),
        ],
    );
    expect_corrupt(&m, "parent locator", "not found");

    // The parent changed after the child was made: linkage mismatch.
    let c = dir.path().join("c.vhdx");
    VhdxBuilder::differencing(&base).create(&c).unwrap();
    {
        let d = Vhdx::open(&base, false).unwrap();
        d.write_at(&[9u8; 512], 0).unwrap();
    }
    expect_corrupt(&c, "parent locator", "DataWriteGuid");

    // Missing parent_linkage.
    let n = dir.path().join("n.vhdx");
    let base2 = make(dir.path(), "base2.vhdx");
    VhdxBuilder::differencing(&base2).create(&n).unwrap();
    set_locator(&n, vec![("relative_path".into(), "base2.vhdx".into())]);
    expect_corrupt(&n, "parent locator", "parent_linkage");
}

#[test]
fn random_corruption_never_panics() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let good = make(dir.path(), "good.vhdx");
    let base = std::fs::read(&good).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let (mut opened, mut failed) = (0, 0);
    // Offsets that matter: headers, region tables, the first MiBs (log, metadata, BAT).
    let hot: Vec<(u64, u64)> = vec![
        (0, 4096),
        (64 << 10, 4096),
        (128 << 10, 4096),
        (192 << 10, 256),
        (256 << 10, 256),
        (MIB, 3 * MIB + 65536),
    ];
    let p = dir.path().join("fuzz.vhdx");
    for _ in 0..300 {
        let mut img = base.clone();
        for _ in 0..rng.random_range(1..6) {
            let (o, l) = hot[rng.random_range(0..hot.len())];
            let at = (o + rng.random_range(0..l)) as usize;
            if at < img.len() {
                img[at] = rng.random();
            }
        }
        std::fs::write(&p, &img).unwrap();
        match Vhdx::open(&p, true) {
            Ok(d) => {
                opened += 1;
                let mut v = vec![0u8; d.size().min(64 * MIB) as usize];
                let _ = d.read_at(&mut v, 0);
            }
            Err(Error::Corrupt { .. }) => failed += 1,
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
    eprintln!("random corruption: {opened} opened, {failed} rejected");
    assert!(failed > 0);
}
