mod common;

use std::sync::Arc;

use common::*;
use scsi::{
    Completion, Data, DiskConfig, InitiatorId, LogicalUnit, Medium, MediumError, MemoryMedium,
    ScsiDisk, ScsiStatus, SenseKey, SharedReservations,
};

const MIB: usize = 1 << 20;

fn disk(size: usize, ls: u32, ps: u32, unmap: bool, ro: bool) -> (Arc<MemoryMedium>, ScsiDisk) {
    let m = Arc::new(
        MemoryMedium::new(size, ls, ps)
            .with_unmap(unmap)
            .read_only(ro)
            .with_id([
                0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0xDE, 0xF0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xAB,
                0xCD, 0xEF,
            ]),
    );
    let d = ScsiDisk::new(m.clone(), DiskConfig::default()).unwrap();
    (m, d)
}

fn thin() -> (Arc<MemoryMedium>, ScsiDisk) {
    disk(MIB, 512, 4096, true, false)
}

/// A medium that claims to be huge and stores nothing.
struct Huge(u64);

impl Medium for Huge {
    fn read_at(&self, buf: &mut [u8], _: u64) -> Result<(), MediumError> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<(), MediumError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), MediumError> {
        Ok(())
    }
    fn unmap(&self, _: u64, _: u64) -> Result<(), MediumError> {
        Ok(())
    }
    fn size(&self) -> u64 {
        self.0
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
    fn disk_id(&self) -> [u8; 16] {
        [1; 16]
    }
}

#[test]
fn standard_inquiry_and_allocation_lengths() {
    let (_, d) = thin();
    let (c, b) = run_in(&d, &inquiry(false, 0, 255), 4096);
    good(&c);
    assert_eq!(b.len(), 36);
    assert_eq!(&b[..8], &[0x00, 0x00, 0x05, 0x02, 31, 0, 0, 0x02]);
    assert_eq!(&b[8..36], b"Msft    Virtual Disk    1.0 ");
    // Allocation length 0 transfers nothing and succeeds.
    let (c, b) = run_in(&d, &inquiry(false, 0, 0), 4096);
    good(&c);
    assert!(b.is_empty());
    // Truncation to the allocation length, and to the buffer.
    assert_eq!(run_in(&d, &inquiry(false, 0, 5), 4096).1.len(), 5);
    assert_eq!(run_in(&d, &inquiry(false, 0, 65535), 20).1.len(), 20);
    assert_eq!(run_in(&d, &inquiry(false, 0, 65535), 4096).1.len(), 36);
}

#[test]
fn vpd_pages() {
    let (_, d) = thin();
    let (c, b) = run_in(&d, &inquiry(true, 0x00, 255), 255);
    good(&c);
    assert_eq!(b, [0, 0, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]);

    let (_, b) = run_in(&d, &inquiry(true, 0x80, 255), 255);
    assert_eq!(&b[..4], &[0, 0x80, 0, 32]);
    assert_eq!(&b[4..], b"123456789ABCDEF00123456789ABCDEF");

    let (_, b) = run_in(&d, &inquiry(true, 0x83, 255), 255);
    assert_eq!(&b[4..12], &[0x01, 0x03, 0x00, 0x10, 0x60, 0x02, 0x24, 0x83]);

    let (_, b) = run_in(&d, &inquiry(true, 0xB0, 255), 255);
    assert_eq!(b.len(), 64);
    assert_eq!(&b[..4], &[0, 0xB0, 0, 0x3C]);
    assert_eq!(b[4], 0x01); // WSNZ
    assert_eq!(&b[6..8], &[0, 8]); // 8 logical blocks per physical
    assert_eq!(&b[8..12], &2048u32.to_be_bytes()); // max transfer
    assert_eq!(&b[20..24], &0x0040_0000u32.to_be_bytes()); // max unmap LBA count
    assert_eq!(&b[24..28], &256u32.to_be_bytes()); // max unmap descriptors
    assert_eq!(&b[28..32], &8u32.to_be_bytes()); // optimal unmap granularity
    assert_eq!(&b[32..36], &[0x80, 0, 0, 0]); // UGAVALID, alignment 0
    assert_eq!(&b[36..44], &0x0001_0000u64.to_be_bytes()); // max write same

    let (_, b) = run_in(&d, &inquiry(true, 0xB1, 255), 255);
    assert_eq!(&b[..6], &[0, 0xB1, 0, 0x3C, 0, 1]);

    let (_, b) = run_in(&d, &inquiry(true, 0xB2, 255), 255);
    assert_eq!(b, [0, 0xB2, 0, 4, 0, 0xC4, 0x02, 0]);

    let c = run_in(&d, &inquiry(true, 0x89, 255), 255).0;
    sense(&c, SenseKey::IllegalRequest, 0x24, 0);
}

#[test]
fn vpd_without_unmap_and_configured_max_transfer() {
    let m = Arc::new(MemoryMedium::new(MIB, 512, 512));
    let d = ScsiDisk::new(
        m,
        DiskConfig {
            max_transfer_blocks: 4096,
            ..DiskConfig::default()
        },
    )
    .unwrap();
    let (_, b) = run_in(&d, &inquiry(true, 0xB0, 255), 255);
    assert_eq!(&b[8..12], &4096u32.to_be_bytes());
    assert_eq!(&b[20..36], &[0; 16]);
    let (_, b) = run_in(&d, &inquiry(true, 0xB2, 255), 255);
    assert_eq!(b, [0, 0xB2, 0, 4, 0, 0, 0, 0]);
    // UNMAP is not offered.
    let c = run_out(&d, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 24]);
    sense(&c, SenseKey::IllegalRequest, 0x20, 0);
}

#[test]
fn read_capacity() {
    let (_, d) = thin();
    let (c, b) = run_in(&d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    good(&c);
    assert_eq!(b, [0, 0, 0x07, 0xFF, 0, 0, 0x02, 0x00]);
    let rc16 = cdb16(0x9E, 0x10, 0, 32);
    let (c, b) = run_in(&d, &rc16, 32);
    good(&c);
    assert_eq!(&b[..8], &2047u64.to_be_bytes());
    assert_eq!(&b[8..12], &512u32.to_be_bytes());
    assert_eq!(b[13], 3); // 4096-byte physical blocks
    assert_eq!(b[14], 0xC0); // LBPME, LBPRZ
    assert_eq!(&b[15..], &[0; 17]);
    // Truncated by the allocation length.
    assert_eq!(run_in(&d, &cdb16(0x9E, 0x10, 0, 12), 32).1.len(), 12);

    let (_, k4) = disk(MIB, 4096, 4096, false, false);
    let (_, b) = run_in(&k4, &rc16, 32);
    assert_eq!(&b[..8], &255u64.to_be_bytes());
    assert_eq!(&b[8..12], &4096u32.to_be_bytes());
    assert_eq!((b[13], b[14]), (0, 0));

    let huge = ScsiDisk::new(Arc::new(Huge(3 << 40)), DiskConfig::default()).unwrap();
    let (_, b) = run_in(&huge, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(b, [0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x02, 0x00]);
    let (_, b) = run_in(&huge, &rc16, 32);
    assert_eq!(&b[..8], &((3u64 << 40) / 512 - 1).to_be_bytes());
}

#[test]
fn mode_sense_pages_and_write_protect() {
    let (_, d) = thin();
    // MODE SENSE(6), caching page, DBD.
    let (c, b) = run_in(&d, &[0x1A, 0x08, 0x08, 0, 255, 0], 255);
    good(&c);
    assert_eq!(&b[..4], &[23, 0, 0x10, 0]);
    assert_eq!(&b[4..7], &[0x08, 0x12, 0x04]);
    // All pages with a block descriptor.
    let (_, b) = run_in(&d, &[0x1A, 0, 0x3F, 0, 255, 0], 255);
    assert_eq!(&b[..4], &[43, 0, 0x10, 8]);
    assert_eq!(&b[4..12], &[0, 0, 0x08, 0, 0, 0, 0x02, 0]);
    assert_eq!((b[12], b[32], b[35]), (0x08, 0x0A, 0x10));
    // Linux's first probe: 4 bytes of all pages.
    let (_, b) = run_in(&d, &[0x1A, 0, 0x3F, 0, 4, 0], 255);
    assert_eq!(b, [43, 0, 0x10, 8]);
    // MODE SENSE(10), control page.
    let (_, b) = run_in(&d, &[0x5A, 0x08, 0x0A, 0, 0, 0, 0, 0, 255, 0], 255);
    assert_eq!(&b[..8], &[0, 18, 0, 0x10, 0, 0, 0, 0]);
    assert_eq!(&b[8..12], &[0x0A, 0x0A, 0, 0x10]);
    // Saved values and unknown pages.
    sense(
        &run_in(&d, &[0x1A, 0x08, 0xC8, 0, 255, 0], 255).0,
        SenseKey::IllegalRequest,
        0x39,
        0,
    );
    sense(
        &run_in(&d, &[0x1A, 0x08, 0x2A, 0, 255, 0], 255).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    // Changeable values: none.
    let (_, b) = run_in(&d, &[0x1A, 0x08, 0x48, 0, 255, 0], 255);
    assert_eq!(&b[4..6], &[0x08, 0x12]);
    assert!(b[6..].iter().all(|&x| x == 0));

    let (_, ro) = disk(MIB, 512, 512, false, true);
    let (_, b) = run_in(&ro, &[0x1A, 0x08, 0x3F, 0, 255, 0], 255);
    assert_eq!(b[2], 0x90); // WP, DPOFUA
}

#[test]
fn mode_select_through_cdb() {
    let (_, d) = thin();
    let (_, cur) = run_in(&d, &[0x1A, 0x08, 0x08, 0, 255, 0], 255);
    let mut list = cur.clone();
    list[0] = 0;
    let c = run_out(&d, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list);
    good(&c);
    assert_eq!(c.transferred, list.len());
    list[6] = 0; // WCE off: refused
    let c = run_out(&d, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list);
    sense(&c, SenseKey::IllegalRequest, 0x26, 0);
    // Parameter list longer than the buffer.
    let c = run_out(&d, &[0x15, 0x10, 0, 0, 200, 0], &list);
    sense(&c, SenseKey::IllegalRequest, 0x24, 0);
}

#[test]
fn read_write_round_trip_all_sizes() {
    let (m, d) = thin();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let c = run_out(&d, &cdb10(0x2A, 0x08, 10, 8), &data);
    good(&c);
    assert_eq!(c.transferred, 4096);
    assert!(c.fua);
    assert_eq!(m.contents(10 * 512, 4096), data);
    let c = run_out(&d, &cdb10(0x2A, 0, 100, 1), &data[..512]);
    assert!(!c.fua);

    let (c, b) = run_in(&d, &cdb16(0x88, 0, 10, 8), 8192);
    good(&c);
    assert_eq!(b, data);
    let (_, b) = run_in(&d, &[0x08, 0, 0, 11, 2, 0], 1024);
    assert_eq!(b, &data[512..1536]);
    let (_, b) = run_in(&d, &[0xA8, 0, 0, 0, 0, 12, 0, 0, 0, 1, 0, 0], 512);
    assert_eq!(b, &data[1024..1536]);
    let c = run_out(&d, &[0x0A, 0, 0, 20, 1, 0], &data[..512]);
    good(&c);
    let c = run_out(
        &d,
        &[0xAA, 0x08, 0, 0, 0, 30, 0, 0, 0, 1, 0, 0],
        &data[..512],
    );
    assert!(c.fua);
    let mut w16 = cdb16(0x8A, 0, 40, 1);
    w16[1] = 0x08;
    assert!(run_out(&d, &w16, &data[..512]).fua);
    assert_eq!(m.contents(40 * 512, 512), &data[..512]);
    // Zero blocks: nothing moves, not an error.
    let (c, b) = run_in(&d, &cdb10(0x28, 0, 5, 0), 512);
    good(&c);
    assert!(b.is_empty());
    good(&run_in(&d, &cdb10(0x28, 0, 2048, 0), 0).0);
}

#[test]
fn hostile_reads_and_writes() {
    let (m, d) = thin();
    // Past the end, and straddling it.
    sense(
        &run_in(&d, &cdb10(0x28, 0, 2048, 1), 512).0,
        SenseKey::IllegalRequest,
        0x21,
        0,
    );
    sense(
        &run_in(&d, &cdb10(0x28, 0, 2047, 2), 1024).0,
        SenseKey::IllegalRequest,
        0x21,
        0,
    );
    // LBA + length overflows.
    sense(
        &run_in(&d, &cdb16(0x88, 0, u64::MAX - 1, 4), 2048).0,
        SenseKey::IllegalRequest,
        0x21,
        0,
    );
    // Buffer shorter than the transfer: refused, nothing written.
    let c = run_out(&d, &cdb10(0x2A, 0, 0, 4), &[0xAB; 1024]);
    sense(&c, SenseKey::IllegalRequest, 0x24, 0);
    assert_eq!(c.sense.unwrap().field.unwrap().byte, 7);
    assert!(m.contents(0, 2048).iter().all(|&b| b == 0));
    sense(
        &run_in(&d, &cdb10(0x28, 0, 0, 4), 2047).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    // A write with no buffer at all.
    sense(
        &run(&d, &cdb10(0x2A, 0, 0, 1)),
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    // Longer than the maximum transfer.
    sense(
        &run_in(&d, &cdb16(0x88, 0, 0, 2049), 2049 * 512).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    // Short CDBs.
    sense(
        &run_in(&d, &[0x28, 0, 0, 0], 512).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    sense(
        &run_in(&d, &[0x88; 10], 512).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    sense(&run(&d, &[]), SenseKey::IllegalRequest, 0x20, 0);
    // Unknown opcodes and DVD commands.
    sense(
        &run(&d, &[0xC0, 0, 0, 0, 0, 0]),
        SenseKey::IllegalRequest,
        0x20,
        0,
    );
    sense(
        &run_in(&d, &[0x46, 0, 0, 0, 0, 0, 0, 0, 8, 0], 8).0,
        SenseKey::IllegalRequest,
        0x20,
        0,
    );
    // A larger buffer than needed is fine: the transfer says how much was used.
    let (c, b) = run_in(&d, &cdb10(0x28, 0, 0, 1), 4096);
    good(&c);
    assert_eq!(b.len(), 512);
}

#[test]
fn read_only_disk_refuses_writes() {
    let (_, d) = disk(MIB, 512, 512, true, true);
    for cdb in [
        &cdb10(0x2A, 0, 0, 1)[..],
        &cdb16(0x93, 0x08, 0, 1)[..],
        &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0][..],
    ] {
        sense(&run_out(&d, cdb, &[0; 512]), SenseKey::DataProtect, 0x27, 0);
    }
    // Reads still work; read-only media don't advertise provisioning.
    good(&run_in(&d, &cdb10(0x28, 0, 0, 1), 512).0);
    assert_eq!(run_in(&d, &cdb16(0x9E, 0x10, 0, 32), 32).1[14], 0);
}

#[test]
fn medium_errors_carry_the_lba_and_the_error() {
    let (m, d) = thin();
    m.fail_range(5 * 512 + 100, 5 * 512 + 101);
    let c = run_in(&d, &cdb10(0x28, 0, 4, 4), 2048).0;
    sense(&c, SenseKey::MediumError, 0x11, 0);
    let s = c.sense_data().unwrap();
    assert_eq!(s[0], 0xF0);
    assert_eq!(&s[3..7], &5u32.to_be_bytes());
    let e = c.error.expect("error for the log");
    assert_eq!((e.op, e.offset), ("read", 5 * 512 + 100));
    let c = run_out(&d, &cdb10(0x2A, 0, 5, 1), &[1; 512]);
    sense(&c, SenseKey::MediumError, 0x0C, 0);
    assert_eq!(c.error.unwrap().op, "write");
}

#[test]
fn synchronize_cache() {
    let (m, d) = thin();
    good(&run(&d, &cdb10(0x35, 0, 0, 0)));
    good(&run(&d, &cdb16(0x91, 0, 100, 10)));
    assert_eq!(m.flushes(), 2);
    sense(
        &run(&d, &cdb10(0x35, 0, 4000, 0)),
        SenseKey::IllegalRequest,
        0x21,
        0,
    );
    assert_eq!(m.flushes(), 2);
}

fn lba_status(d: &ScsiDisk, lba: u64) -> Vec<(u64, u32, u8)> {
    let mut cdb = cdb16(0x9E, 0x12, lba, 0);
    cdb[10..14].copy_from_slice(&4096u32.to_be_bytes());
    let (c, b) = run_in(d, &cdb, 4096);
    good(&c);
    let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    assert_eq!(len + 4, b.len());
    b[8..]
        .chunks(16)
        .map(|e| {
            (
                u64::from_be_bytes(e[..8].try_into().unwrap()),
                u32::from_be_bytes(e[8..12].try_into().unwrap()),
                e[12],
            )
        })
        .collect()
}

#[test]
fn write_same_and_get_lba_status() {
    let (m, d) = thin();
    let pattern: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let c = run_out(&d, &cdb16(0x93, 0, 8, 3), &pattern);
    good(&c);
    assert_eq!(c.transferred, 512);
    assert_eq!(m.contents(8 * 512, 1536), pattern.repeat(3));
    // UNMAP bit with a zero block deallocates.
    good(&run_out(&d, &cdb16(0x93, 0x08, 16, 8), &[0; 512]));
    assert_eq!(
        lba_status(&d, 0),
        vec![(0, 16, 0), (16, 8, 1), (24, 2048 - 24, 0)]
    );
    // UNMAP bit with a non-zero block writes it.
    good(&run_out(&d, &cdb16(0x93, 0x08, 16, 1), &pattern));
    assert_eq!(lba_status(&d, 16)[0], (16, 1, 0));
    // Hostile: zero blocks (WSNZ), too many, short buffer, past the end, bad LBA status LBA.
    let bad = SenseKey::IllegalRequest;
    sense(&run_out(&d, &cdb16(0x93, 0, 0, 0), &pattern), bad, 0x24, 0);
    sense(
        &run_out(&d, &cdb16(0x93, 0, 0, 0x0001_0001), &pattern),
        bad,
        0x24,
        0,
    );
    sense(
        &run_out(&d, &cdb16(0x93, 0, 0, 1), &pattern[..100]),
        bad,
        0x24,
        0,
    );
    sense(
        &run_out(&d, &cdb16(0x93, 0, 2047, 2), &pattern),
        bad,
        0x21,
        0,
    );
    let mut cdb = cdb16(0x9E, 0x12, 2048, 0);
    cdb[13] = 32;
    sense(&run_in(&d, &cdb, 32).0, bad, 0x21, 0);
    // Allocation length 0: nothing, no error.
    let (c, b) = run_in(&d, &cdb16(0x9E, 0x12, 0, 0), 32);
    good(&c);
    assert!(b.is_empty());
}

fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
    let mut l = vec![0u8; 8];
    l[0..2].copy_from_slice(&((6 + 16 * descs.len()) as u16).to_be_bytes());
    l[2..4].copy_from_slice(&((16 * descs.len()) as u16).to_be_bytes());
    for &(lba, n) in descs {
        l.extend_from_slice(&lba.to_be_bytes());
        l.extend_from_slice(&n.to_be_bytes());
        l.extend_from_slice(&[0; 4]);
    }
    l
}

fn unmap_cdb(len: u16) -> [u8; 10] {
    cdb10(0x42, 0, 0, len)
}

#[test]
fn unmap_and_hostile_descriptors() {
    let (m, d) = thin();
    run_out(&d, &cdb10(0x2A, 0, 0, 64), &[0xAA; 64 * 512]);
    let l = unmap_list(&[(0, 8), (32, 8), (40, 0)]);
    let c = run_out(&d, &unmap_cdb(l.len() as u16), &l);
    good(&c);
    assert_eq!(c.transferred, l.len());
    assert!(m.contents(0, 4096).iter().all(|&b| b == 0));
    assert_eq!(m.contents(8 * 512, 512), vec![0xAA; 512]);
    assert_eq!(lba_status(&d, 0)[..3], [(0, 8, 1), (8, 24, 0), (32, 8, 1)]);

    let bad = SenseKey::IllegalRequest;
    // Zero length: nothing to do.
    good(&run_out(&d, &unmap_cdb(0), &[]));
    // Shorter than the header.
    sense(&run_out(&d, &unmap_cdb(6), &[0; 6]), bad, 0x1A, 0);
    // Parameter list length beyond the buffer.
    sense(&run_out(&d, &unmap_cdb(100), &l), bad, 0x24, 0);
    // A descriptor past the end: refused, and the valid one before it is not unmapped.
    let l = unmap_list(&[(48, 1), (2040, 16)]);
    sense(&run_out(&d, &unmap_cdb(l.len() as u16), &l), bad, 0x21, 0);
    assert_eq!(m.contents(48 * 512, 512), vec![0xAA; 512]);
    let l = unmap_list(&[(u64::MAX, 2)]);
    sense(&run_out(&d, &unmap_cdb(l.len() as u16), &l), bad, 0x21, 0);
    // Too many descriptors.
    let l = unmap_list(&vec![(0, 1); 257]);
    sense(&run_out(&d, &unmap_cdb(l.len() as u16), &l), bad, 0x26, 0);
    // A descriptor over the limit.
    let l = unmap_list(&[(0, 0x0040_0001)]);
    sense(&run_out(&d, &unmap_cdb(l.len() as u16), &l), bad, 0x26, 0);
    // A block descriptor length longer than the list and a partial descriptor: what fits
    // is used, the partial one is ignored.
    let mut l = unmap_list(&[(48, 1)]);
    l[2..4].copy_from_slice(&1000u16.to_be_bytes());
    l.extend_from_slice(&[0xFF; 10]);
    good(&run_out(&d, &unmap_cdb(l.len() as u16), &l));
    assert!(m.contents(48 * 512, 512).iter().all(|&b| b == 0));
    // ANCHOR is refused.
    sense(&run_out(&d, &cdb10(0x42, 1, 0, 24), &l), bad, 0x24, 0);
}

#[test]
fn verify() {
    let (_, d) = thin();
    run_out(&d, &cdb10(0x2A, 0, 0, 2), &[3; 1024]);
    good(&run(&d, &cdb10(0x2F, 0, 0, 2048)));
    good(&run(&d, &cdb16(0x8F, 0, 2000, 48)));
    sense(
        &run(&d, &cdb10(0x2F, 0, 2040, 9)),
        SenseKey::IllegalRequest,
        0x21,
        0,
    );
    let c = run_out(&d, &cdb10(0x2F, 0x02, 0, 2), &[3; 1024]);
    good(&c);
    assert_eq!(c.transferred, 1024);
    let mut data = vec![3u8; 1024];
    data[700] = 4;
    let c = run_out(&d, &cdb10(0x2F, 0x02, 0, 2), &data);
    sense(&c, SenseKey::Miscompare, 0x1D, 0);
    assert_eq!(&c.sense_data().unwrap()[3..7], &700u32.to_be_bytes());
    sense(
        &run_out(&d, &cdb10(0x2F, 0x02, 0, 2), &data[..10]),
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    sense(
        &run(&d, &cdb10(0x2F, 0x04, 0, 2)),
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
}

#[test]
fn small_commands() {
    let (_, d) = thin();
    good(&run(&d, &[0, 0, 0, 0, 0, 0]));
    good(&run(&d, &[0x1B, 0, 0, 0, 0x01, 0]));
    good(&run(&d, &[0x1E, 0, 0, 0, 0x01, 0]));
    let (c, b) = run_in(&d, &[0x03, 0, 0, 0, 252, 0], 252);
    good(&c);
    assert_eq!(
        b,
        [0x70, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    sense(
        &run_in(&d, &[0x03, 1, 0, 0, 252, 0], 252).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    // Standalone REPORT LUNS: LUN 0; allocation length under 4 is refused (SPC-4).
    let (c, b) = run_in(&d, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0], 64);
    good(&c);
    assert_eq!(b, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    sense(
        &run_in(&d, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0], 64).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
}

fn pr_out(action: u8, ty: u8, key: u64, sa: u64) -> ([u8; 10], Vec<u8>) {
    let mut p = vec![0u8; 24];
    p[..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa.to_be_bytes());
    ([0x5F, action, ty, 0, 0, 0, 0, 0, 24, 0], p)
}

fn pr(d: &dyn LogicalUnit, who: u64, action: u8, ty: u8, key: u64, sa: u64) -> Completion {
    let (cdb, p) = pr_out(action, ty, key, sa);
    run_out_as(d, InitiatorId(who), &cdb, &p)
}

#[test]
fn persistent_reservations_across_disks_and_initiators() {
    let m = Arc::new(MemoryMedium::new(MIB, 512, 512));
    let shared = SharedReservations::new();
    let a = ScsiDisk::new(m.clone(), DiskConfig::default())
        .unwrap()
        .with_reservations(shared.clone());
    let b = ScsiDisk::new(m, DiskConfig::default())
        .unwrap()
        .with_reservations(shared.clone());
    good(&pr(&a, 1, 0, 0, 0, 0xAAAA)); // REGISTER
    good(&pr(&b, 2, 6, 0, 0, 0xBBBB)); // REGISTER AND IGNORE EXISTING KEY
    good(&pr(&a, 1, 1, 3, 0xAAAA, 0)); // RESERVE, Exclusive Access

    // Node 2 is fenced from reads and writes; RESERVE by it conflicts.
    let c = run_in_as(&b, InitiatorId(2), &cdb10(0x28, 0, 0, 1), 512).0;
    assert_eq!(c.status, ScsiStatus::ReservationConflict);
    assert!(c.sense.is_none());
    let c = run_out_as(&b, InitiatorId(2), &cdb10(0x2A, 0, 0, 1), &[0; 512]);
    assert_eq!(c.status, ScsiStatus::ReservationConflict);
    assert_eq!(
        pr(&b, 2, 1, 3, 0xBBBB, 0).status,
        ScsiStatus::ReservationConflict
    );
    // The holder works through either disk; INQUIRY and TUR work for everyone.
    good(&run_out_as(
        &b,
        InitiatorId(1),
        &cdb10(0x2A, 0, 0, 1),
        &[0; 512],
    ));
    good(&run_in_as(&b, InitiatorId(2), &inquiry(false, 0, 36), 36).0);
    good(&b.execute(InitiatorId(2), &[0; 6], Data::None));

    // READ KEYS and READ RESERVATION.
    let (c, k) = run_in_as(
        &b,
        InitiatorId(2),
        &[0x5E, 0, 0, 0, 0, 0, 0, 0x10, 0, 0],
        4096,
    );
    good(&c);
    assert_eq!(&k[..8], &[0, 0, 0, 2, 0, 0, 0, 16]);
    assert_eq!(&k[8..16], &0xAAAAu64.to_be_bytes());
    assert_eq!(&k[16..24], &0xBBBBu64.to_be_bytes());
    let (_, r) = run_in_as(
        &b,
        InitiatorId(2),
        &[0x5E, 1, 0, 0, 0, 0, 0, 0x10, 0, 0],
        4096,
    );
    assert_eq!(r.len(), 24);
    assert_eq!(&r[8..16], &0xAAAAu64.to_be_bytes());
    assert_eq!(r[21], 0x03);
    // Truncated by allocation length.
    assert_eq!(
        run_in_as(&b, InitiatorId(2), &[0x5E, 0, 0, 0, 0, 0, 0, 0, 4, 0], 4096).1,
        [0, 0, 0, 2]
    );
    let (_, caps) = run_in(&a, &[0x5E, 2, 0, 0, 0, 0, 0, 0, 8, 0], 8);
    assert_eq!(caps, [0, 8, 0x04, 0x80, 0xEA, 0x01, 0, 0]);

    // Node 2 preempts node 1 (failover): node 1 is unregistered and fenced.
    good(&pr(&b, 2, 4, 1, 0xBBBB, 0xAAAA)); // PREEMPT to Write Exclusive
                                            // Node 1 first learns that its registration was preempted, then is fenced.
    let c = run_out_as(&a, InitiatorId(1), &cdb10(0x2A, 0, 0, 1), &[0; 512]);
    sense(&c, SenseKey::UnitAttention, 0x2A, 0x05);
    let c = run_out_as(&a, InitiatorId(1), &cdb10(0x2A, 0, 0, 1), &[0; 512]);
    assert_eq!(c.status, ScsiStatus::ReservationConflict);
    good(&run_in_as(&a, InitiatorId(1), &cdb10(0x28, 0, 0, 1), 512).0);
    assert_eq!(
        pr(&a, 1, 2, 1, 0xAAAA, 0).status,
        ScsiStatus::ReservationConflict
    );
    // Releasing with the wrong type; then the right one; then CLEAR.
    sense(
        &pr(&b, 2, 2, 3, 0xBBBB, 0),
        SenseKey::IllegalRequest,
        0x26,
        0x04,
    );
    good(&pr(&b, 2, 2, 1, 0xBBBB, 0));
    good(&pr(&b, 2, 3, 0, 0xBBBB, 0));
    let snap = shared.snapshot();
    assert!(snap.registrations.is_empty() && snap.reservation.is_none());

    // Hostile parameter lists.
    let (mut cdb, p) = pr_out(0, 0, 0, 1);
    cdb[8] = 23;
    sense(&run_out(&a, &cdb, &p), SenseKey::IllegalRequest, 0x1A, 0);
    cdb[8] = 24;
    sense(
        &run_out(&a, &cdb, &p[..20]),
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    cdb[5] = 0xFF; // 4 GiB parameter list
    sense(&run_out(&a, &cdb, &p), SenseKey::IllegalRequest, 0x24, 0);
    // REGISTER AND MOVE and READ FULL STATUS are not supported.
    sense(
        &run_out(&a, &[0x5F, 7, 0, 0, 0, 0, 0, 0, 24, 0], &p),
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
    sense(
        &run_in(&a, &[0x5E, 3, 0, 0, 0, 0, 0, 0, 24, 0], 24).0,
        SenseKey::IllegalRequest,
        0x24,
        0,
    );
}

#[test]
fn bad_sector_sizes_are_refused() {
    for (ls, ps) in [(0, 512), (520, 520), (256, 512), (131072, 131072)] {
        assert!(ScsiDisk::new(
            Arc::new(MemoryMedium::new(0, ls, ps)),
            DiskConfig::default()
        )
        .is_err());
    }
    // A zero-sized medium: READ CAPACITY answers, every read is out of range.
    let d = ScsiDisk::new(
        Arc::new(MemoryMedium::new(0, 512, 512)),
        DiskConfig::default(),
    )
    .unwrap();
    let (_, b) = run_in(&d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
    assert_eq!(b, [0, 0, 0, 0, 0, 0, 2, 0]);
    sense(
        &run_in(&d, &cdb10(0x28, 0, 0, 1), 512).0,
        SenseKey::IllegalRequest,
        0x21,
        0,
    );
}

#[test]
fn planned_io_for_asynchronous_callers() {
    let (m, d) = thin();
    let cmd = scsi::Command::decode(&cdb10(0x2A, 0x08, 3, 2)).unwrap();
    let io = d.plan_io(InitiatorId(0), &cmd, 1024).unwrap().unwrap();
    assert_eq!(
        io,
        scsi::BlockIo {
            write: true,
            lba: 3,
            offset: 1536,
            len: 1024,
            fua: true
        }
    );
    let r = m.write_at(&[5; 1024], io.offset);
    let c = d.complete_io(io, r);
    good(&c);
    assert!(c.fua && c.transferred == 1024);
    // A failed I/O completes with MEDIUM ERROR at the failing LBA.
    let c = d.complete_io(
        io,
        Err(MediumError::io(
            1536 + 600,
            std::io::Error::other("disk gone"),
        )),
    );
    sense(&c, SenseKey::MediumError, 0x0C, 0);
    assert_eq!(&c.sense_data().unwrap()[3..7], &4u32.to_be_bytes());
    // Checks before any I/O: buffer, range, zero length, reservations, write protection.
    let c = d.plan_io(InitiatorId(0), &cmd, 1023).unwrap_err();
    sense(&c, SenseKey::IllegalRequest, 0x24, 0);
    let zero = scsi::Command::decode(&cdb10(0x28, 0, 3, 0)).unwrap();
    assert_eq!(d.plan_io(InitiatorId(0), &zero, 0).unwrap(), None);
    let other = scsi::Command::decode(&[0, 0, 0, 0, 0, 0]).unwrap();
    assert_eq!(d.plan_io(InitiatorId(0), &other, 0).unwrap(), None);
    good(&pr(&d, 1, 0, 0, 0, 7));
    good(&pr(&d, 1, 1, 1, 7, 0));
    let c = d.plan_io(InitiatorId(2), &cmd, 1024).unwrap_err();
    assert_eq!(c.status, ScsiStatus::ReservationConflict);
    let (_, ro) = disk(MIB, 512, 512, false, true);
    sense(
        &ro.plan_io(InitiatorId(0), &cmd, 1024).unwrap_err(),
        SenseKey::DataProtect,
        0x27,
        0,
    );
}

#[test]
fn capacity_change_unit_attention() {
    let (_, d) = thin();
    d.notify_capacity_changed();
    // INQUIRY neither reports nor clears it; the next READ CAPACITY gets it once.
    good(&run_in(&d, &inquiry(false, 0, 36), 36).0);
    sense(
        &run_in(&d, &cdb16(0x9E, 0x10, 0, 32), 32).0,
        SenseKey::UnitAttention,
        0x2A,
        0x09,
    );
    good(&run_in(&d, &cdb16(0x9E, 0x10, 0, 32), 32).0);
    // REQUEST SENSE collects it instead.
    d.notify_capacity_changed();
    let (c, s) = run_in(&d, &[0x03, 0, 0, 0, 18, 0], 18);
    good(&c);
    assert_eq!((s[2], s[12], s[13]), (0x06, 0x2A, 0x09));
    good(&run(&d, &[0; 6]));
}
