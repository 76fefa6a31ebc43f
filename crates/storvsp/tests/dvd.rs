//! A DVD drive on the controller, driven as Linux's `sr` driver does through storvsc: the
//! probe and open commands, 2048-byte reads of an ISO file, refused writes, a medium changed by
//! the host (UNIT ATTENTION 28h on the next command) and ejected by the guest (START STOP UNIT
//! with LoEj), and the ISO shared with other readers.

mod common;

use common::*;
use hvdef::storvsp::{self as sp, ScsiRequest};
use std::path::{Path, PathBuf};
use storvsp::{DiskSpec, DriveKind};

/// An ISO-sized file of `blocks` 2048-byte blocks, each block's bytes derived from `seed`.
fn iso(dir: &Path, name: &str, blocks: usize, seed: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pattern(seed, blocks * 2048)).unwrap();
    p
}

fn sense(s: &ScsiRequest) -> (u8, u8, u8) {
    let b = s.cdb_or_sense;
    (b[2] & 0xf, b[12], b[13])
}

const CHECK: (u8, u8) = (sp::srb_status::ERROR | sp::srb_status::AUTOSENSE_VALID, 2);

fn read_blocks(g: &mut Guest, id: u64, lba: u32, blocks: u16) -> (ScsiRequest, Vec<u8>) {
    let mut cdb = [0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    let len = u32::from(blocks) * 2048;
    let s = g.srb(id, 2, &cdb, sp::data_in::READ, len, 0);
    (s, g.read_guest(0, len as usize))
}

fn tur(g: &mut Guest, id: u64) -> ScsiRequest {
    g.srb(id, 2, &[0, 0, 0, 0, 0, 0], sp::data_in::UNKNOWN, 0, 0)
}

fn start_stop(g: &mut Guest, id: u64, byte4: u8) -> ScsiRequest {
    g.srb(
        id,
        2,
        &[0x1b, 0, 0, 0, byte4, 0],
        sp::data_in::UNKNOWN,
        0,
        0,
    )
}

fn prevent(g: &mut Guest, id: u64, on: bool) -> ScsiRequest {
    g.srb(
        id,
        2,
        &[0x1e, 0, 0, 0, u8::from(on), 0],
        sp::data_in::UNKNOWN,
        0,
        0,
    )
}

#[test]
fn everything_sr_sends_is_answered_and_reads_come_from_the_iso() {
    let dir = tempfile::tempdir().unwrap();
    let path = iso(dir.path(), "disc.iso", 300, 1);
    let mut r = rig(vec![], 0);
    r.dev
        .add_dvd(2, Some(DiskSpec::open_iso(&path).unwrap()))
        .unwrap();
    let mut g = r.open(0, 32);
    g.handshake(&[0x0602]);
    let read = sp::data_in::READ;
    // INQUIRY: CD/DVD (type 5), removable.
    let s = g.srb(1, 2, &[0x12, 0, 0, 0, 96, 0], read, 96, 0);
    assert_eq!(s.srb_status, 1);
    assert_eq!(g.read_guest(0, 2), [5, 0x80]);
    assert_eq!(tur(&mut g, 2).srb_status, 1);
    // READ CAPACITY(10): last LBA, 2048-byte blocks.
    let s = g.srb(3, 2, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], read, 8, 0);
    assert_eq!(s.srb_status, 1);
    assert_eq!(g.read_guest(0, 8), [0, 0, 0x01, 0x2b, 0, 0, 0x08, 0]);
    // MODE SENSE(10), page 2Ah (sr's get_capabilities).
    let s = g.srb(4, 2, &[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 128, 0], read, 128, 0);
    assert_eq!(s.srb_status, 1);
    let b = g.read_guest(0, 40);
    let page = 8 + usize::from(u16::from_be_bytes([b[6], b[7]]));
    assert_eq!(b[page] & 0x3f, 0x2a, "{b:x?}");
    // GET CONFIGURATION: current profile DVD-ROM.
    let s = g.srb(5, 2, &[0x46, 0, 0, 0, 0, 0, 0, 0, 64, 0], read, 64, 0);
    assert_eq!(s.srb_status, 1);
    assert_eq!(g.read_guest(0, 8)[6..8], [0x00, 0x10]);
    // GET EVENT STATUS NOTIFICATION, polled, media class (sr_get_events).
    let s = g.srb(6, 2, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], read, 8, 0);
    assert_eq!((s.srb_status, { s.data_transfer_length }), (1, 8));
    assert_eq!(g.read_guest(0, 8)[2..6], [0x04, 0x10, 0, 0x02]);
    // READ TOC (format 0 and the multisession form) and READ DISC INFORMATION.
    let s = g.srb(7, 2, &[0x43, 0, 0, 0, 0, 0, 0, 0, 20, 0], read, 20, 0);
    assert_eq!(s.srb_status, 1);
    let toc = g.read_guest(0, 20);
    assert_eq!((toc[2], toc[3], toc[14]), (1, 1, 0xAA));
    assert_eq!(toc[16..20], 300u32.to_be_bytes());
    let s = g.srb(8, 2, &[0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0x40], read, 12, 0);
    assert_eq!(s.srb_status, 1);
    let s = g.srb(9, 2, &[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0], read, 34, 0);
    assert_eq!((s.srb_status, { s.data_transfer_length }), (1, 34));
    // PREVENT ALLOW MEDIUM REMOVAL both ways.
    assert_eq!(prevent(&mut g, 10, true).srb_status, 1);
    assert_eq!(prevent(&mut g, 11, false).srb_status, 1);
    // READ(10) in 2048-byte blocks, at the start and the end, straight from the file.
    let want = std::fs::read(&path).unwrap();
    let (s, data) = read_blocks(&mut g, 12, 0, 16);
    assert_eq!((s.srb_status, { s.data_transfer_length }), (1, 16 * 2048));
    assert!(data == want[..16 * 2048]);
    let (s, data) = read_blocks(&mut g, 13, 290, 10);
    assert_eq!(s.srb_status, 1);
    assert!(data == want[290 * 2048..]);
    // Past the end: ILLEGAL REQUEST, LBA OUT OF RANGE.
    let (s, _) = read_blocks(&mut g, 14, 299, 2);
    assert_eq!((s.srb_status, s.scsi_status), CHECK);
    assert_eq!(sense(&s), (5, 0x21, 0));
    // Writes: DATA PROTECT, and the file is untouched.
    let s = g.write10(15, 2, 0, &[0xAB; 2048], 0, false);
    assert_eq!((s.srb_status, s.scsi_status), CHECK);
    assert_eq!(sense(&s).0, 7);
    assert!(std::fs::read(&path).unwrap() == want);
    let d = &r.dev.drives()[0];
    assert_eq!((d.lun, d.kind, d.read_only), (2, DriveKind::Dvd, true));
    assert_eq!((d.size, d.format.as_deref()), (300 * 2048, Some("ISO")));
    r.host.stop();
}

#[test]
fn the_host_changes_the_medium_and_the_guest_ejects_it() {
    let dir = tempfile::tempdir().unwrap();
    let one = iso(dir.path(), "one.iso", 64, 1);
    let two = iso(dir.path(), "two.iso", 32, 2);
    let mut r = rig(vec![], 0);
    r.dev.add_dvd(2, None).unwrap();
    let mut g = r.open(0, 32);
    g.handshake(&[0x0602]);
    // Empty: NOT READY, MEDIUM NOT PRESENT.
    let s = tur(&mut g, 1);
    assert_eq!(
        ((s.srb_status, s.scsi_status), sense(&s).0, sense(&s).1),
        (CHECK, 2, 0x3a)
    );
    assert_eq!(r.dev.drives()[0].path, None);
    // The host inserts a disc (Set-VMDvdDrive): UNIT ATTENTION 28h once, then ready.
    assert!(r
        .dev
        .change_dvd(2, Some(DiskSpec::open_iso(&one).unwrap()))
        .unwrap()
        .is_none());
    let s = tur(&mut g, 2);
    assert_eq!(
        ((s.srb_status, s.scsi_status), sense(&s)),
        (CHECK, (6, 0x28, 0))
    );
    assert_eq!(tur(&mut g, 3).srb_status, 1);
    let (s, data) = read_blocks(&mut g, 4, 0, 4);
    assert_eq!(s.srb_status, 1);
    assert!(data == std::fs::read(&one).unwrap()[..4 * 2048]);
    // Replacing it: another UNIT ATTENTION, on a READ this time, then the new disc's data.
    let old = r
        .dev
        .change_dvd(2, Some(DiskSpec::open_iso(&two).unwrap()))
        .unwrap();
    assert_eq!(old.unwrap().path, one);
    let (s, _) = read_blocks(&mut g, 5, 0, 1);
    assert_eq!(
        ((s.srb_status, s.scsi_status), sense(&s)),
        (CHECK, (6, 0x28, 0))
    );
    let s = g.srb(
        6,
        2,
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sp::data_in::READ,
        8,
        0,
    );
    assert_eq!(s.srb_status, 1);
    assert_eq!(g.read_guest(0, 4), 31u32.to_be_bytes());
    assert_eq!(r.dev.drives()[0].path.as_deref(), Some(two.as_path()));
    // The guest locks the tray: its own eject is refused ...
    assert_eq!(prevent(&mut g, 7, true).srb_status, 1);
    let s = start_stop(&mut g, 8, 0x02);
    assert_eq!(
        ((s.srb_status, s.scsi_status), sense(&s).0, sense(&s).1),
        (CHECK, 5, 0x53)
    );
    assert_eq!(r.dev.drives()[0].path.as_deref(), Some(two.as_path()));
    // ... until it unlocks; then START STOP UNIT with LoEj takes the disc out, and the host's
    // list shows the drive empty.
    assert_eq!(prevent(&mut g, 9, false).srb_status, 1);
    assert_eq!(start_stop(&mut g, 10, 0x02).srb_status, 1);
    let d = &r.dev.drives()[0];
    assert_eq!(
        (d.path.as_ref(), d.format.as_ref(), d.size),
        (None, None, 0)
    );
    let s = tur(&mut g, 11);
    assert_eq!(sense(&s).1, 0x3a);
    // Loading with nothing to load is fine; the host's eject of an empty drive too.
    assert_eq!(start_stop(&mut g, 12, 0x03).srb_status, 1);
    assert!(r.dev.change_dvd(2, None).unwrap().is_none());
    // The administrator's eject ignores the guest's lock.
    r.dev
        .change_dvd(2, Some(DiskSpec::open_iso(&one).unwrap()))
        .unwrap();
    assert_eq!(tur(&mut g, 13).scsi_status, 2);
    assert_eq!(prevent(&mut g, 14, true).srb_status, 1);
    assert_eq!(r.dev.change_dvd(2, None).unwrap().unwrap().path, one);
    assert_eq!(sense(&tur(&mut g, 15)).1, 0x3a);
    // Not a DVD drive, or nothing there: refused.
    assert!(r.dev.change_dvd(3, None).is_err());
    r.host.stop();
}

#[test]
fn an_iso_is_shared_with_other_readers_and_kept_from_writers() {
    let dir = tempfile::tempdir().unwrap();
    let path = iso(dir.path(), "shared.iso", 16, 3);
    let a = DiskSpec::open_iso(&path).unwrap();
    let b = DiskSpec::open_iso(&path).expect("a second reader");
    assert!(a.medium.is_read_only() && b.medium.is_read_only());
    let e = DiskSpec::open(&path, None, false).unwrap_err().to_string();
    assert!(e.contains("shared.iso") && e.contains("in use"), "{e}");
    drop((a, b));
    DiskSpec::open(&path, Some(storvsp::ImageFormat::Raw), false).expect("writable again");
}
