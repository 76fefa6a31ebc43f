//! Decodes and executes arbitrary CDBs with arbitrary data buffers against a LUN map holding
//! a thin 512e disk, a read-only 4Kn disk, a second view of the first disk (sharing its
//! persistent reservations), and a DVD whose medium comes and goes. Panics, transfers larger
//! than the buffer, writes into the buffer past the reported transfer, and status/sense
//! mismatches are bugs.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use scsi::{
    Command, Data, DiskConfig, InitiatorId, LogicalUnit, MemoryMedium, ScsiDisk, ScsiDvd,
    ScsiStatus, SharedReservations, Target,
};

const SENTINEL: u8 = 0xEE;

#[derive(Debug, Arbitrary)]
enum Dir {
    None,
    In,
    Out,
}

/// Operation codes the targets know, so the fuzzer spends its time past the opcode check.
const KNOWN: &[u8] = &[
    0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x1A, 0x1B, 0x1E, 0x25, 0x28, 0x2A, 0x2F, 0x35, 0x42, 0x43,
    0x46, 0x4A, 0x51, 0x55, 0x5A, 0x5E, 0x5F, 0x88, 0x8A, 0x8F, 0x91, 0x93, 0x9E, 0xA0, 0xA8, 0xAA,
];

#[derive(Debug, Arbitrary)]
enum Op {
    Execute {
        lun: u8,
        initiator: u8,
        cdb: Vec<u8>,
        /// Replaces the opcode with a known one.
        known: Option<u8>,
        /// Clears the high bytes of the LBA fields so LBAs land inside the small media.
        small_lba: bool,
        dir: Dir,
        len: u16,
        fill: Vec<u8>,
    },
    HostEject,
    ChangeDvd {
        insert: bool,
    },
    FailRange {
        start: u16,
        len: u16,
    },
}

fuzz_target!(|ops: Vec<Op>| {
    let thin = Arc::new(MemoryMedium::new(64 * 1024, 512, 4096).with_unmap(true));
    let ro = Arc::new(MemoryMedium::new(64 * 1024, 4096, 4096).read_only(true));
    let iso = || Arc::new(MemoryMedium::new(32 * 2048, 512, 512).read_only(true));
    let shared = SharedReservations::new();
    let config = DiskConfig {
        max_transfer_blocks: 96,
        max_unmap_descriptors: 8,
        max_write_same_blocks: 200,
        ..DiskConfig::default()
    };
    let target = Target::new();
    target.insert(
        0,
        Arc::new(
            ScsiDisk::new(thin.clone(), config.clone())
                .unwrap()
                .with_reservations(shared.clone()),
        ),
    );
    target.insert(1, Arc::new(ScsiDisk::new(ro, config.clone()).unwrap()));
    target.insert(
        3,
        Arc::new(
            ScsiDisk::new(thin.clone(), config)
                .unwrap()
                .with_reservations(shared),
        ),
    );
    let dvd = Arc::new(ScsiDvd::new(Some(iso()), [7; 16]));
    target.insert(2, dvd.clone());

    for op in ops.into_iter().take(64) {
        match op {
            Op::Execute {
                lun,
                initiator,
                mut cdb,
                known,
                small_lba,
                dir,
                len,
                fill,
            } => {
                if let (Some(k), Some(op)) = (known, cdb.first_mut()) {
                    *op = KNOWN[usize::from(k) % KNOWN.len()];
                }
                if small_lba && cdb.len() >= 10 {
                    let first = cdb[0];
                    let zero: &[usize] = match first >> 5 {
                        1 | 2 | 5 => &[2, 3],
                        4 => &[2, 3, 4, 5, 6, 7],
                        _ => &[],
                    };
                    for &i in zero {
                        cdb[i] = 0;
                    }
                }
                // The decoder alone must not panic either.
                let _ = Command::decode(&cdb);
                let len = usize::from(len) % (80 * 1024);
                let mut buf = vec![SENTINEL; len];
                if matches!(dir, Dir::Out) {
                    for (b, f) in buf.iter_mut().zip(fill.iter().cycle()) {
                        *b = *f;
                    }
                }
                let data = match dir {
                    Dir::None => Data::None,
                    Dir::In => Data::In(&mut buf),
                    Dir::Out => Data::Out(&buf),
                };
                let c = target.execute(lun % 5, InitiatorId(u64::from(initiator % 3)), &cdb, data);
                match dir {
                    Dir::None => assert_eq!(c.transferred, 0),
                    Dir::In => {
                        assert!(c.transferred <= len);
                        assert!(buf[c.transferred..].iter().all(|&b| b == SENTINEL));
                    }
                    Dir::Out => assert!(c.transferred <= len),
                }
                match c.status {
                    ScsiStatus::Good => assert!(c.sense.is_none() && c.error.is_none()),
                    ScsiStatus::CheckCondition => {
                        assert!(c.sense.is_some());
                        assert_eq!(c.sense_data().unwrap()[0] & 0x7F, 0x70);
                    }
                    ScsiStatus::ReservationConflict => assert!(c.sense.is_none()),
                }
                if c.fua {
                    assert_eq!(c.status, ScsiStatus::Good);
                }
            }
            Op::HostEject => {
                let _ = dvd.request_eject();
            }
            Op::ChangeDvd { insert } => dvd.change_medium(insert.then(|| iso() as _)),
            Op::FailRange { start, len } => {
                let start = u64::from(start) * 2;
                thin.fail_range(start, start + u64::from(len));
            }
        }
    }
    // The DVD alone, as a LogicalUnit, answers too.
    let _ = dvd.execute(InitiatorId(0), &[0x00, 0, 0, 0, 0, 0], Data::None);
});
