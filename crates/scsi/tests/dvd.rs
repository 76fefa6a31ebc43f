mod common;

use std::sync::Arc;

use common::*;
use scsi::{Medium, MemoryMedium, ScsiDvd, SenseKey};

fn iso(blocks: usize, seed: u8) -> Arc<MemoryMedium> {
    let data: Vec<u8> = (0..blocks * 2048)
        .map(|i| (i / 2048) as u8 ^ seed)
        .collect();
    Arc::new(MemoryMedium::from_vec(data, 512, 512).read_only(true))
}

fn dvd() -> ScsiDvd {
    ScsiDvd::new(Some(iso(100, 0)), [9; 16])
}

const TUR: [u8; 6] = [0; 6];
const GESN_MEDIA: [u8; 10] = [0x4A, 0x01, 0, 0, 0x10, 0, 0, 0, 8, 0];

#[test]
fn inquiry_identifies_a_removable_dvd() {
    let d = dvd();
    let (c, b) = run_in(&d, &inquiry(false, 0, 96), 96);
    good(&c);
    assert_eq!(&b[..8], &[0x05, 0x80, 0x05, 0x02, 31, 0, 0, 0x02]);
    assert_eq!(&b[8..36], b"Msft    Virtual DVD-ROM 1.0 ");
    let (_, b) = run_in(&d, &inquiry(true, 0, 96), 96);
    assert_eq!(b, [0x05, 0, 0, 3, 0x00, 0x80, 0x83]);
    let (_, b) = run_in(&d, &inquiry(true, 0x80, 96), 96);
    assert_eq!(&b[4..8], b"0909");
    sense(
        &run_in(&d, &inquiry(true, 0xB0, 96), 96).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
}

#[test]
fn capacity_and_reads_in_2048_byte_blocks() {
    let d = dvd();
    let (c, b) = run_in(&d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    good(&c);
    assert_eq!(b, [0, 0, 0, 99, 0, 0, 0x08, 0]);
    let (c, b) = run_in(&d, &cdb10(0x28, 0, 7, 2), 4096);
    good(&c);
    assert_eq!(&b[..2048], &[7u8; 2048][..]);
    assert_eq!(&b[2048..], &[8u8; 2048][..]);
    let (c, b) = run_in(&d, &[0xA8, 0, 0, 0, 0, 99, 0, 0, 0, 1, 0, 0], 2048);
    good(&c);
    assert_eq!(b, vec![99u8; 2048]);
    sense(
        &run_in(&d, &cdb10(0x28, 0, 99, 2), 4096).0,
        SenseKey::IllegalRequest,
        0x21,
        0,
    );
    sense(
        &run_in(&d, &cdb10(0x28, 0, 0, 2), 4095).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    sense(
        &run_in(&d, &cdb10(0x28, 0, 0, 513), 513 * 2048).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    // Read-only.
    sense(
        &run_out(&d, &cdb10(0x2A, 0, 0, 1), &[0; 2048]),
        SenseKey::DataProtect,
        0x27,
        0,
    );
    // Persistent reservations are a disk thing.
    sense(
        &run_in(&d, &[0x5E, 0, 0, 0, 0, 0, 0, 0, 8, 0], 8).0,
        SenseKey::IllegalRequest,
        0x20,
        0,
    );
}

#[test]
fn medium_change_unit_attention_and_events() {
    let d = ScsiDvd::new(None, [1; 16]);
    // Empty drive.
    sense(&run(&d, &TUR), SenseKey::NotReady, 0x3A, 0);
    sense(
        &run_in(&d, &cdb10(0x28, 0, 0, 1), 2048).0,
        SenseKey::NotReady,
        0x3A,
        0,
    );
    sense(
        &run_in(&d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8).0,
        SenseKey::NotReady,
        0x3A,
        0,
    );
    let (_, s) = run_in(&d, &[0x03, 0, 0, 0, 18, 0], 18);
    assert_eq!((s[2], s[12]), (0x02, 0x3A));
    let (c, e) = run_in(&d, &GESN_MEDIA, 8);
    good(&c);
    assert_eq!(e, [0, 6, 0x04, 0x10, 0, 0x01, 0, 0]);

    // The host inserts a disc: one UNIT ATTENTION, then ready.
    d.change_medium(Some(iso(10, 0)));
    // INQUIRY and GESN neither report nor clear it.
    good(&run_in(&d, &inquiry(false, 0, 36), 36).0);
    let (_, e) = run_in(&d, &GESN_MEDIA, 8);
    assert_eq!(e, [0, 6, 0x04, 0x10, 2, 0x02, 0, 0]); // NewMedia, present
    let (_, e) = run_in(&d, &GESN_MEDIA, 8);
    assert_eq!(e[4], 0); // reported once
    let c = run(&d, &TUR);
    sense(&c, SenseKey::UnitAttention, 0x28, 0);
    good(&run(&d, &TUR));

    // Changing the disc: the UA comes back, and REQUEST SENSE can collect it.
    d.change_medium(Some(iso(20, 0)));
    let (c, s) = run_in(&d, &[0x03, 0, 0, 0, 18, 0], 18);
    good(&c);
    assert_eq!((s[2], s[12], s[13]), (0x06, 0x28, 0));
    good(&run(&d, &TUR));
    assert_eq!(run_in(&d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8).1[3], 19);

    // The host removes it.
    d.change_medium(None);
    sense(&run(&d, &TUR), SenseKey::NotReady, 0x3A, 0);
    let (_, e) = run_in(&d, &GESN_MEDIA, 8);
    assert_eq!(&e[4..6], &[3, 0x01]); // MediaRemoval, tray open

    // GESN for a class we do not have; GESN truncated to the header keeps the event.
    d.change_medium(Some(iso(1, 0)));
    let (_, e) = run_in(&d, &[0x4A, 0x01, 0, 0, 0x02, 0, 0, 0, 8, 0], 8);
    assert_eq!(e, [0, 2, 0x80, 0x10]);
    assert_eq!(
        run_in(&d, &[0x4A, 1, 0, 0, 0x10, 0, 0, 0, 4, 0], 8).1.len(),
        4
    );
    assert_eq!(run_in(&d, &GESN_MEDIA, 8).1[4], 2);
    sense(
        &run_in(&d, &[0x4A, 0, 0, 0, 0x10, 0, 0, 0, 8, 0], 8).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
}

#[test]
fn eject_honours_prevent() {
    let d = dvd();
    good(&run(&d, &[0x1E, 0, 0, 0, 1, 0]));
    assert!(d.removal_prevented());
    sense(
        &run(&d, &[0x1B, 0, 0, 0, 0x02, 0]),
        SenseKey::IllegalRequest,
        0x53,
        0x02,
    );
    assert!(d.medium().is_some());
    // MODE SENSE page 2Ah reports the lock state.
    let (_, p) = run_in(&d, &[0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 128, 0], 128);
    assert_eq!(p[8 + 6] & 0x02, 0x02);
    good(&run(&d, &[0x1E, 0, 0, 0, 0, 0]));
    good(&run(&d, &[0x1B, 0, 0, 0, 0x02, 0]));
    assert!(d.medium().is_none());
    sense(&run(&d, &TUR), SenseKey::NotReady, 0x3A, 0);
    assert_eq!(run_in(&d, &GESN_MEDIA, 8).1[4], 3);
    // Load with nothing to load is fine.
    good(&run(&d, &[0x1B, 0, 0, 0, 0x03, 0]));
}

#[test]
fn mode_sense_capabilities_page() {
    let d = dvd();
    let (c, b) = run_in(&d, &[0x5A, 0, 0x2A, 0, 0, 0, 0, 0, 128, 0], 128);
    good(&c);
    assert_eq!(&b[..8], &[0, 28, 0, 0, 0, 0, 0, 0]);
    let n = 8;
    assert_eq!(&b[n..n + 2], &[0x2A, 20]);
    assert_eq!(b[n + 2] & 0x08, 0x08); // reads DVD
    assert_eq!(b[n + 3], 0); // writes nothing
    assert_eq!(b[n + 6], 0x29); // tray, eject, lock
    assert_eq!(u16::from_be_bytes([b[n + 8], b[n + 9]]) / 176, 24);
    // Caching page belongs to disks.
    sense(
        &run_in(&d, &[0x1A, 0, 0x08, 0, 255, 0], 255).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    let (_, b) = run_in(&d, &[0x1A, 0, 0x3F, 0, 255, 0], 255);
    assert_eq!(&b[..4], &[25, 0, 0, 0]);
}

#[test]
fn get_configuration() {
    let d = dvd();
    let (c, b) = run_in(&d, &[0x46, 0, 0, 0, 0, 0, 0, 1, 0, 0], 256);
    good(&c);
    let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    assert_eq!(len + 4, b.len());
    assert_eq!(&b[6..8], &[0x00, 0x10]); // current profile DVD-ROM
                                         // Profile list feature first: DVD-ROM, current.
    assert_eq!(&b[8..16], &[0, 0, 0x03, 4, 0x00, 0x10, 0x01, 0]);
    // RT = 2: one feature, Random Readable with 2048-byte blocks.
    let (_, b) = run_in(&d, &[0x46, 2, 0, 0x10, 0, 0, 0, 0, 64, 0], 64);
    assert_eq!(b.len(), 8 + 12);
    assert_eq!(&b[8..20], &[0, 0x10, 0x01, 8, 0, 0, 0x08, 0, 0, 16, 0, 0]);
    // Truncation.
    assert_eq!(
        run_in(&d, &[0x46, 0, 0, 0, 0, 0, 0, 0, 6, 0], 64).1.len(),
        6
    );
    sense(
        &run_in(&d, &[0x46, 3, 0, 0, 0, 0, 0, 0, 6, 0], 64).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );

    // Empty drive: no current profile; RT = 1 leaves out the medium features.
    d.change_medium(None);
    let (_, b) = run_in(&d, &[0x46, 1, 0, 0, 0, 0, 0, 1, 0, 0], 256);
    assert_eq!(&b[6..8], &[0, 0]);
    assert_eq!(&b[8..16], &[0, 0, 0x03, 4, 0x00, 0x10, 0x00, 0]);
    assert!(!b.windows(2).skip(8).any(|w| w == [0x00, 0x1F]));
}

#[test]
fn read_toc_and_disc_information() {
    let d = ScsiDvd::new(Some(iso(4500, 0)), [1; 16]);
    let (c, b) = run_in(&d, &[0x43, 0, 0, 0, 0, 0, 0, 0, 100, 0], 100);
    good(&c);
    assert_eq!(
        b,
        [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x14, 0xAA, 0, 0, 0, 0x11, 0x94]
    );
    // MSF: track 1 at 00:02:00, lead-out at 4500 + 150 frames = 01:02:00.
    let (_, b) = run_in(&d, &[0x43, 0x02, 0, 0, 0, 0, 0, 0, 100, 0], 100);
    assert_eq!(&b[8..12], &[0, 0, 2, 0]);
    assert_eq!(&b[16..20], &[0, 1, 2, 0]);
    // Lead-out only.
    let (_, b) = run_in(&d, &[0x43, 0, 0, 0, 0, 0, 0xAA, 0, 100, 0], 100);
    assert_eq!(&b[..4], &[0, 10, 1, 1]);
    // Session info through the old byte-9 format field (Linux sr's multisession probe).
    let (_, b) = run_in(&d, &[0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0x40], 12);
    assert_eq!(b, [0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0]);
    sense(
        &run_in(&d, &[0x43, 0, 0, 0, 0, 0, 2, 0, 12, 0], 12).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    sense(
        &run_in(&d, &[0x43, 0, 2, 0, 0, 0, 0, 0, 12, 0], 12).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );

    let (c, b) = run_in(&d, &[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0], 64);
    good(&c);
    assert_eq!(b.len(), 34);
    assert_eq!(&b[..8], &[0, 32, 0x0E, 1, 1, 1, 1, 0x20]);
    assert_eq!(&b[16..24], &[0xFF; 8]);

    d.change_medium(None);
    sense(
        &run_in(&d, &[0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0], 12).0,
        SenseKey::NotReady,
        0x3A,
        0,
    );
    sense(
        &run_in(&d, &[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0], 64).0,
        SenseKey::NotReady,
        0x3A,
        0,
    );
}

#[test]
fn medium_reads_use_byte_offsets_not_the_medium_sector_size() {
    let m = iso(3, 0x40);
    assert_eq!(m.logical_sector_size(), 512);
    let d = ScsiDvd::new(Some(m), [0; 16]);
    let (_, b) = run_in(&d, &cdb10(0x28, 0, 2, 1), 2048);
    assert_eq!(b, vec![0x42; 2048]);
}

#[test]
fn snapshot_and_restore() {
    let d = dvd();
    good(&run(&d, &[0x1E, 0, 0, 0, 1, 0]));
    d.change_medium(Some(iso(5, 0)));
    let snap = d.snapshot();
    assert!(snap.medium_present && snap.unit_attention && snap.prevent);
    assert_eq!(snap.event, scsi::MediaEvent::NewMedia);
    let e = ScsiDvd::new(None, [9; 16]);
    e.restore(snap, Some(iso(5, 0)));
    assert_eq!(e.snapshot(), snap);
    sense(&run(&e, &TUR), SenseKey::UnitAttention, 0x28, 0);
    good(&run(&e, &TUR));
}

#[test]
fn eject_request_goes_through_the_guest_when_locked() {
    let d = dvd();
    good(&run(&d, &[0x1E, 0, 0, 0, 1, 0]));
    assert!(!d.request_eject());
    assert!(d.medium().is_some());
    assert_eq!(run_in(&d, &GESN_MEDIA, 8).1[4..6], [1, 0x02]); // EjectRequest, present
    good(&run(&d, &[0x1E, 0, 0, 0, 0, 0]));
    assert!(d.request_eject());
    assert!(d.medium().is_none());
    assert_eq!(run_in(&d, &GESN_MEDIA, 8).1[4..6], [3, 0x01]);
}
