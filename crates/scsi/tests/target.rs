mod common;

use std::sync::Arc;

use common::*;
use scsi::{
    Completion, Data, DiskConfig, InitiatorId, MemoryMedium, ScsiDisk, ScsiDvd, SenseKey, Target,
};

fn target() -> Target {
    let t = Target::new();
    let disk = ScsiDisk::new(
        Arc::new(MemoryMedium::new(1 << 20, 512, 512)),
        DiskConfig::default(),
    )
    .unwrap();
    t.insert(0, Arc::new(disk));
    t.insert(2, Arc::new(ScsiDvd::new(None, [3; 16])));
    let disk = ScsiDisk::new(
        Arc::new(MemoryMedium::new(1 << 20, 4096, 4096)),
        DiskConfig::default(),
    )
    .unwrap();
    t.insert(5, Arc::new(disk));
    t
}

fn exec_in(t: &Target, lun: u8, cdb: &[u8], len: usize) -> (Completion, Vec<u8>) {
    let mut buf = vec![0xEE; len];
    let c = t.execute(lun, InitiatorId(0), cdb, Data::In(&mut buf));
    assert!(buf[c.transferred..].iter().all(|&b| b == 0xEE));
    buf.truncate(c.transferred);
    (c, buf)
}

const REPORT_LUNS: [u8; 12] = [0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];

#[test]
fn report_luns_lists_every_lun_from_any_lun() {
    let t = target();
    for lun in [0, 7] {
        let (c, b) = exec_in(&t, lun, &REPORT_LUNS, 256);
        good(&c);
        assert_eq!(
            b,
            [
                0, 0, 0, 24, 0, 0, 0, 0, //
                0, 0, 0, 0, 0, 0, 0, 0, //
                0, 2, 0, 0, 0, 0, 0, 0, //
                0, 5, 0, 0, 0, 0, 0, 0,
            ]
        );
    }
    // The header alone says how long the list is.
    let mut cdb = REPORT_LUNS;
    cdb[8] = 0;
    cdb[9] = 8;
    assert_eq!(exec_in(&t, 0, &cdb, 256).1, [0, 0, 0, 24, 0, 0, 0, 0]);
    // Well-known LUNs only: none; a reserved SELECT REPORT value: refused.
    cdb[2] = 1;
    assert_eq!(exec_in(&t, 0, &cdb, 256).1, [0, 0, 0, 0, 0, 0, 0, 0]);
    cdb[2] = 0x55;
    sense(
        &exec_in(&t, 0, &cdb, 256).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    t.remove(2);
    assert_eq!(t.luns(), [0, 5]);
    assert_eq!(exec_in(&t, 0, &REPORT_LUNS, 256).1[..4], [0, 0, 0, 16]);
}

#[test]
fn absent_luns() {
    let t = target();
    let (c, b) = exec_in(&t, 1, &inquiry(false, 0, 96), 96);
    good(&c);
    assert_eq!(b.len(), 36);
    assert_eq!(b[0], 0x7F);
    assert!(b[8..].iter().all(|&x| x == 0));
    sense(
        &exec_in(&t, 1, &[0; 6], 0).0,
        SenseKey::IllegalRequest,
        0x25,
        0,
    );
    sense(
        &exec_in(&t, 1, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512).0,
        SenseKey::IllegalRequest,
        0x25,
        0,
    );
    // Even an undecodable CDB gets LOGICAL UNIT NOT SUPPORTED.
    sense(
        &exec_in(&t, 1, &[0xC7], 0).0,
        SenseKey::IllegalRequest,
        0x25,
        0,
    );
    let (c, s) = exec_in(&t, 1, &[0x03, 0, 0, 0, 18, 0], 18);
    good(&c);
    assert_eq!((s[0], s[2], s[12]), (0x70, 0x05, 0x25));
}

#[test]
fn present_luns_dispatch() {
    let t = target();
    let (_, b) = exec_in(&t, 2, &inquiry(false, 0, 36), 36);
    assert_eq!(b[0], 0x05);
    let (_, b) = exec_in(&t, 5, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(b, [0, 0, 0, 255, 0, 0, 0x10, 0]);
    sense(&exec_in(&t, 2, &[0; 6], 0).0, SenseKey::NotReady, 0x3A, 0);
    sense(
        &exec_in(&t, 0, &[0xC7], 0).0,
        SenseKey::IllegalRequest,
        0x20,
        0,
    );
    assert!(t.get(0).is_some() && t.get(1).is_none());
}
