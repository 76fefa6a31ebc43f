//! The direct data path: READ and WRITE on image files move data straight between the file
//! and scattered guest pages (vectored I/O), answer exactly as the bounce-buffer path does,
//! including for hostile requests, and report backend failures as MEDIUM ERROR.

mod common;

use common::*;
use hvdef::storvsp::{self as sp, ScsiRequest};
use hvdef::vmbus::packet_type;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use storvsp::{DiskSpec, ImageMedium};
use vhdx::Disk;
use vmbus::Device;
use vmbus::PagedRange;
use zerocopy::IntoBytes;

/// Sends a READ(10)/WRITE(10) of `blocks` at `lba` whose data is described by `ranges`.
fn rw_ranges(
    g: &mut Guest,
    id: u64,
    write: bool,
    lba: u32,
    blocks: u16,
    ranges: &[PagedRange],
) -> ScsiRequest {
    let mut cdb = [if write { 0x2a } else { 0x28 }, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    let dir = if write {
        sp::data_in::WRITE
    } else {
        sp::data_in::READ
    };
    let len = u32::from(blocks) * 512;
    let p = g.srb_packet(0, &cdb, dir, len);
    let h = vmbus::packet::gpa_direct_header(ranges);
    g.send(id, packet_type::DATA_USING_GPA_DIRECT, &h, p.as_bytes());
    g.completion(id).srb()
}

/// 64 KiB over 17 guest pages taken in reverse order, the first from byte 512 of its page,
/// split over two ranges: what a scatter list of a fragmented page cache looks like.
fn scattered(g: &Guest, base: usize) -> (Vec<PagedRange>, Vec<(u64, usize)>) {
    let pfns: Vec<u64> = g.pages[base..base + 17].iter().rev().copied().collect();
    let a = PagedRange {
        byte_offset: 512,
        byte_count: 8 * 4096 - 512,
        pfns: pfns[..8].to_vec(),
    };
    let b = PagedRange {
        byte_offset: 0,
        byte_count: 65536 - a.byte_count,
        pfns: pfns[8..].to_vec(),
    };
    let mut pieces = vec![(pfns[0] * 4096 + 512, 4096 - 512)];
    pieces.extend(pfns[1..8].iter().map(|&p| (p * 4096, 4096)));
    pieces.extend(pfns[8..].iter().map(|&p| (p * 4096, 4096)));
    pieces.last_mut().unwrap().1 = 512;
    (vec![a, b], pieces)
}

fn scatter(g: &Guest, pieces: &[(u64, usize)], data: &[u8]) {
    let mut at = 0;
    for &(gpa, n) in pieces {
        g.mem.write(gpa, &data[at..at + n]).unwrap();
        at += n;
    }
}

fn gather(g: &Guest, pieces: &[(u64, usize)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(gpa, n) in pieces {
        let mut v = vec![0; n];
        g.mem.read(gpa, &mut v).unwrap();
        out.extend(v);
    }
    out
}

#[test]
fn scattered_pages_reach_a_raw_file_and_a_dynamic_vhdx_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "a.img", 4 << 20);
    let vhdx = vhdx_disk(dir.path(), 64 << 20);
    let mut r = rig(vec![(0, DiskSpec::open(&raw, None, false).unwrap())], 0);
    r.dev
        .add_disk(1, DiskSpec::open(&vhdx, None, false).unwrap())
        .unwrap();
    let mut g = r.open(0, 32);
    g.handshake(&[0x0602]);
    let data = pattern(5, 65536);
    let (ranges, pieces) = scattered(&g, 0);
    assert_eq!(pieces.iter().map(|p| p.1).sum::<usize>(), 65536);
    scatter(&g, &pieces, &data);
    assert_eq!(rw_ranges(&mut g, 1, true, 24, 128, &ranges).srb_status, 1);
    let mut file = vec![0u8; 65536];
    std::fs::File::open(&raw)
        .unwrap()
        .read_exact_at(&mut file, 24 * 512)
        .unwrap();
    assert!(file == data, "the file holds the pages in list order");
    // Read back into another scattered set.
    let (ranges2, pieces2) = scattered(&g, 40);
    scatter(&g, &pieces2, &[0xEE; 65536]);
    assert_eq!(rw_ranges(&mut g, 2, false, 24, 128, &ranges2).srb_status, 1);
    assert!(gather(&g, &pieces2) == data);
    // LUN 1, a dynamic VHDX: the first write allocates the block, the second goes in place;
    // an unallocated range reads as zeros.
    for (id, lun_data) in [(3u64, pattern(6, 65536)), (4, pattern(7, 65536))] {
        scatter(&g, &pieces, &lun_data);
        let mut cdb = [0x2a, 0, 0, 0, 0, 8, 0, 0, 128, 0];
        cdb[2..6].copy_from_slice(&(3000u32).to_be_bytes());
        let p = g.srb_packet(1, &cdb, sp::data_in::WRITE, 65536);
        let h = vmbus::packet::gpa_direct_header(&ranges);
        g.send(id, packet_type::DATA_USING_GPA_DIRECT, &h, p.as_bytes());
        assert_eq!(g.completion(id).srb().srb_status, 1);
        let (s, back) = g.read10(10 + id, 1, 3000, 128, 0);
        assert_eq!(s.srb_status, 1);
        assert!(back == lun_data);
    }
    let (s, back) = g.read10(20, 1, 40000, 64, 0);
    assert_eq!(s.srb_status, 1);
    assert!(back.iter().all(|&b| b == 0));
    assert_eq!(r.dev.io_bytes(), (65536 * 3 + 32768, 65536 * 3));
    assert_eq!(r.dev.inspect()["counters"]["direct_transfers"], 7);
    r.host.stop();
    r.dev.close();
    let img = vhdx::open::open(&vhdx, true).unwrap();
    let mut v = vec![0u8; 65536];
    img.read_at(&mut v, 3000 * 512).unwrap();
    assert!(v == pattern(7, 65536));
}

/// The same requests, hostile ones included, get the same answers on the direct path as on
/// the bounce-buffer path (the same image opened as a plain medium).
#[test]
fn direct_and_bounce_paths_answer_alike() {
    let dir = tempfile::tempdir().unwrap();
    let mut answers = Vec::new();
    for direct in [true, false] {
        let raw = raw_disk(dir.path(), &format!("{direct}.img"), 1 << 20);
        let ro = raw_disk(dir.path(), &format!("{direct}-ro.img"), 1 << 20);
        let spec = |path, read_only| {
            let spec = DiskSpec::open(path, None, read_only).unwrap();
            if direct {
                spec
            } else {
                DiskSpec::from_medium(spec.medium.clone(), spec.path.clone(), "raw")
            }
        };
        let mut r = rig(vec![(0, spec(&raw, false)), (1, spec(&ro, true))], 0);
        let mut g = r.open(0, 32);
        g.handshake(&[0x0602]);
        let data = pattern(1, 8192);
        g.write_guest(0, &data);
        let w = |lba: u32, blocks: u16| {
            let mut c = [0x2a, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            c[2..6].copy_from_slice(&lba.to_be_bytes());
            c[7..9].copy_from_slice(&blocks.to_be_bytes());
            c
        };
        let rd = |lba: u32, blocks: u16| {
            let mut c = w(lba, blocks);
            c[0] = 0x28;
            c
        };
        let cases: Vec<(u8, [u8; 10], u8, u32)> = vec![
            (0, w(0, 16), sp::data_in::WRITE, 8192),
            (0, rd(0, 16), sp::data_in::READ, 8192),
            // The CDB asks for more than the buffer holds.
            (0, rd(0, 16), sp::data_in::READ, 4096),
            (0, w(0, 16), sp::data_in::WRITE, 4096),
            // A longer buffer than the CDB needs: the residual is reported.
            (0, rd(0, 4), sp::data_in::READ, 8192),
            // Past the end of the disk, and reaching exactly to it.
            (0, rd(2047, 2), sp::data_in::READ, 1024),
            (0, rd(2046, 2), sp::data_in::READ, 1024),
            // The buffer in the wrong direction, and none at all.
            (0, w(0, 16), sp::data_in::READ, 8192),
            (0, rd(0, 16), sp::data_in::WRITE, 8192),
            (0, rd(0, 1), sp::data_in::UNKNOWN, 0),
            (0, rd(0, 0), sp::data_in::READ, 512),
            // A read-only disk refuses the write, serves the read.
            (1, w(0, 16), sp::data_in::WRITE, 8192),
            (1, rd(0, 16), sp::data_in::READ, 8192),
        ];
        let mut out = Vec::new();
        for (i, (lun, cdb, dir, len)) in cases.into_iter().enumerate() {
            g.send_srb(i as u64 + 1, lun, &cdb, dir, len, 0);
            let s = g.completion(i as u64 + 1).srb();
            out.push((
                s.srb_status,
                s.scsi_status,
                s.data_transfer_length,
                s.cdb_or_sense[..s.sense_info_length as usize].to_vec(),
            ));
        }
        out.push((0, 0, 0, g.read_guest(0, 8192)));
        answers.push(out);
        let direct_transfers = r.dev.inspect()["counters"]["direct_transfers"].clone();
        assert_eq!(direct_transfers, if direct { 5 } else { 0 });
        r.host.stop();
    }
    assert_eq!(answers[0], answers[1]);
    // And the answers are the real ones: the write and read succeeded in full, the short
    // buffer and the LBA past the end did not.
    assert_eq!((answers[0][0].0, answers[0][0].2), (1, 8192));
    assert_ne!(answers[0][2].0, 1);
    assert_ne!(answers[0][5].0, 1);
    assert_eq!(answers[0][6].0, 1);
    assert_eq!(answers[0][11].3[2] & 0xf, 7, "DATA PROTECT");
}

/// A disk that fails I/O touching one byte range, behind the direct path.
struct Failing {
    inner: vhdx::raw::RawDisk,
    bad: std::ops::Range<u64>,
}

impl Failing {
    fn check(&self, offset: u64, len: u64) -> vhdx::Result<()> {
        if offset < self.bad.end && self.bad.start < offset + len {
            return Err(vhdx::Error::Io {
                path: "failing.img".into(),
                op: "read",
                source: std::io::Error::from_raw_os_error(5),
            });
        }
        Ok(())
    }
}

impl Disk for Failing {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vhdx::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> vhdx::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> vhdx::Result<()> {
        self.inner.flush()
    }
    fn unmap(&self, offset: u64, len: u64) -> vhdx::Result<()> {
        self.inner.unmap(offset, len)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn logical_sector_size(&self) -> u32 {
        512
    }
    fn physical_sector_size(&self) -> u32 {
        512
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn extent(&self, offset: u64, len: u64, write: bool) -> vhdx::Result<vhdx::Extent<'_>> {
        // Half of each request through the file, half through read_at/write_at.
        self.check(offset, len)?;
        if len > 512 {
            return Ok(vhdx::Extent::Indirect {
                len: len / 2 / 512 * 512,
            });
        }
        self.inner.extent(offset, len, write)
    }
}

#[test]
fn a_failing_direct_backend_gets_medium_error_with_the_lba() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "f.img", 1 << 20);
    let disk = Failing {
        inner: vhdx::raw::RawDisk::open(&raw, false).unwrap(),
        bad: 100 * 512..101 * 512,
    };
    let medium = ImageMedium::from_disk(Arc::new(disk), &raw, [7; 16]);
    let mut r = rig(vec![(0, DiskSpec::from_image(Arc::new(medium), "raw"))], 0);
    let mut g = r.open(0, 32);
    g.handshake(&[0x0602]);
    let (s, _) = g.read10(1, 0, 96, 8, 0);
    assert_eq!((s.srb_status, s.scsi_status), (0x84, 2));
    assert_eq!(s.cdb_or_sense[2] & 0xf, 3, "MEDIUM ERROR");
    // Information field: the LBA of the request (the failure lies within it).
    let info = u32::from_be_bytes(s.cdb_or_sense[3..7].try_into().unwrap());
    assert!((96..104).contains(&info), "LBA {info}");
    let data = pattern(2, 4096);
    assert_eq!(g.write10(2, 0, 99, &data[..1024], 0, false).scsi_status, 2);
    assert_eq!(r.dev.inspect()["counters"]["medium_errors"], 2);
    // Around the bad range both halves of the path work.
    assert_eq!(g.write10(3, 0, 0, &data, 0, false).srb_status, 1);
    let (s, back) = g.read10(4, 0, 0, 8, 0);
    assert_eq!(s.srb_status, 1);
    assert!(back == data);
    r.host.stop();
}
