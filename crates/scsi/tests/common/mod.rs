#![allow(dead_code)]

use scsi::{Completion, Data, InitiatorId, LogicalUnit, ScsiStatus, SenseKey};

pub const I0: InitiatorId = InitiatorId(0);

/// Runs a data-in command; returns the completion and the bytes transferred.
pub fn run_in(unit: &dyn LogicalUnit, cdb: &[u8], len: usize) -> (Completion, Vec<u8>) {
    run_in_as(unit, I0, cdb, len)
}

pub fn run_in_as(
    unit: &dyn LogicalUnit,
    who: InitiatorId,
    cdb: &[u8],
    len: usize,
) -> (Completion, Vec<u8>) {
    let mut buf = vec![0xEE; len];
    let c = unit.execute(who, cdb, Data::In(&mut buf));
    assert!(c.transferred <= len);
    assert!(buf[c.transferred..].iter().all(|&b| b == 0xEE));
    buf.truncate(c.transferred);
    (c, buf)
}

pub fn run_out(unit: &dyn LogicalUnit, cdb: &[u8], data: &[u8]) -> Completion {
    unit.execute(I0, cdb, Data::Out(data))
}

pub fn run_out_as(unit: &dyn LogicalUnit, who: InitiatorId, cdb: &[u8], data: &[u8]) -> Completion {
    unit.execute(who, cdb, Data::Out(data))
}

pub fn run(unit: &dyn LogicalUnit, cdb: &[u8]) -> Completion {
    unit.execute(I0, cdb, Data::None)
}

pub fn good(c: &Completion) {
    assert_eq!(c.status, ScsiStatus::Good, "{c:?}");
    assert!(c.sense.is_none());
}

pub fn sense(c: &Completion, key: SenseKey, asc: u8, ascq: u8) {
    assert_eq!(c.status, ScsiStatus::CheckCondition, "{c:?}");
    let s = c.sense.expect("sense");
    assert_eq!((s.key, s.asc, s.ascq), (key, asc, ascq), "{c:?}");
    let f = c.sense_data().unwrap();
    assert_eq!(f[0] & 0x7F, 0x70);
    assert_eq!(f[2], key as u8);
    assert_eq!((f[12], f[13]), (asc, ascq));
    assert_eq!(c.transferred, 0);
}

pub fn cdb10(op: u8, flags: u8, lba: u32, len: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

pub fn cdb16(op: u8, flags: u8, lba: u64, len: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&len.to_be_bytes());
    c
}

pub fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
    let a = alloc.to_be_bytes();
    [0x12, u8::from(evpd), page, a[0], a[1], 0]
}
