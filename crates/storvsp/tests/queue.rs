//! Many requests in flight per channel, with each channel's io_uring and with the
//! synchronous fallback: every request completes, with the right data, through resets, hot
//! removal and a backend that stalls.

mod common;

use common::*;
use hvdef::storvsp::{self as sp, operation};
use hvdef::vmbus::packet_type;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use storvsp::{ControllerConfig, DiskSpec, ImageMedium};
use vhdx::Disk;
use vmbus::{Device, PagedRange};
use zerocopy::IntoBytes;

/// Whether this kernel lets us create an io_uring (the uring assertions need one).
fn have_io_uring() -> bool {
    let mem = guestmem::GuestMemory::new(&[(0, 4096)]).unwrap();
    let ok = guestmem::uring::GuestRing::new(&mem, 4, 0).is_ok();
    if !ok {
        eprintln!("no io_uring here: only the fallback is exercised");
    }
    ok
}

fn config(io_uring: bool) -> ControllerConfig {
    let mut c = ControllerConfig::new(INSTANCE, 0);
    c.io_uring = io_uring;
    c
}

/// Sends a 4 KiB READ(10)/WRITE(10) at block `lba` whose data is guest page `page` of the
/// channel's pool, without waiting.
fn send_rw(g: &mut Guest, id: u64, lun: u8, write: bool, lba: u32, page: usize) {
    send_skewed(g, id, lun, write, lba, page, 0);
}

fn page_gpa(g: &Guest, page: usize) -> u64 {
    g.pages[page] * 4096
}

/// The SRB status of a completion's payload.
fn srb_status(payload: &[u8]) -> u8 {
    use zerocopy::FromBytes;
    hvdef::storvsp::VstorPacket::read_from_bytes(payload)
        .expect("a 64-byte completion")
        .srb()
        .srb_status
}

/// Collects `n` completions, in whatever order they come: id -> SRB status (a rescan
/// notice in between is skipped).
fn collect(g: &mut Guest, n: usize) -> std::collections::BTreeMap<u64, u8> {
    let mut out = std::collections::BTreeMap::new();
    while out.len() < n {
        let p = g.recv();
        if p.packet_type == packet_type::DATA_INBAND && p.transaction_id == 0 {
            continue;
        }
        assert_eq!(p.packet_type, packet_type::COMPLETION);
        let s = srb_status(&p.payload);
        assert!(out.insert(p.transaction_id, s).is_none(), "completed twice");
    }
    out
}

#[test]
fn hundreds_of_requests_in_flight_complete_with_io_uring_and_without() {
    let uring = have_io_uring();
    for io_uring in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let raw = raw_disk(dir.path(), "q.img", 8 << 20);
        let vhdx = vhdx_disk(dir.path(), 64 << 20);
        let mut r = rig_with(
            config(io_uring),
            vec![
                (0, DiskSpec::open(&raw, None, false).unwrap()),
                (1, DiskSpec::open(&vhdx, None, false).unwrap()),
            ],
        );
        let mut g = r.open(0, 128);
        g.handshake(&[0x0602]);
        // 250 writes in flight at once, spread over both disks; then 250 reads of them.
        let n = 250;
        for i in 0..n {
            g.mem
                .write(page_gpa(&g, i), &pattern(i as u8, 4096))
                .unwrap();
        }
        for i in 0..n {
            send_rw(&mut g, i as u64 + 1, (i % 2) as u8, true, i as u32 * 8, i);
        }
        let done = collect(&mut g, n);
        assert_eq!(done.len(), n);
        assert!(done.values().all(|&s| s == 1), "{done:?}");
        for i in 0..n {
            g.mem.write(page_gpa(&g, i), &[0xEE; 4096]).unwrap();
        }
        for i in 0..n {
            send_rw(
                &mut g,
                1000 + i as u64,
                (i % 2) as u8,
                false,
                i as u32 * 8,
                i,
            );
        }
        let done = collect(&mut g, n);
        assert!(done.values().all(|&s| s == 1), "{done:?}");
        for i in 0..n {
            let mut back = vec![0u8; 4096];
            g.mem.read(page_gpa(&g, i), &mut back).unwrap();
            assert!(back == pattern(i as u8, 4096), "request {i}");
        }
        let c = &r.dev.inspect()["counters"];
        let queued = c["uring_transfers"].as_u64().unwrap();
        if io_uring && uring {
            // Every raw request goes to the ring; of the VHDX ones, those whose block was
            // allocated by then (all the reads, most writes).
            assert!(queued >= (n + n / 2) as u64, "{queued} in io_uring");
        } else {
            assert_eq!(queued, 0);
        }
        assert_eq!(c["direct_transfers"], 2 * n);
        r.host.stop();
    }
}

#[test]
fn a_reset_and_a_flush_among_queued_writes_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "r.img", 4 << 20);
    let mut r = rig(vec![(0, DiskSpec::open(&raw, None, false).unwrap())], 0);
    let mut g = r.open(0, 64);
    g.handshake(&[0x0602]);
    for i in 0..100usize {
        g.mem
            .write(page_gpa(&g, i), &pattern(i as u8, 4096))
            .unwrap();
        send_rw(&mut g, i as u64 + 1, 0, true, i as u32 * 8, i);
        if i == 50 {
            g.send(
                500,
                packet_type::DATA_INBAND,
                &[],
                packet(operation::RESET_BUS).as_bytes(),
            );
        }
    }
    // SYNCHRONIZE CACHE after the writes: it completes, and so does every write.
    g.send_srb(
        600,
        0,
        &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sp::data_in::UNKNOWN,
        0,
        0,
    );
    let mut ids = Vec::new();
    for _ in 0..102 {
        ids.push(g.recv().transaction_id);
    }
    ids.sort_unstable();
    let mut want: Vec<u64> = (1..=100).chain([500, 600]).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
    let file = std::fs::read(&raw).unwrap();
    for i in 0..100 {
        assert!(file[i * 4096..(i + 1) * 4096] == pattern(i as u8, 4096)[..]);
    }
    r.host.stop();
}

#[test]
fn hot_remove_during_io_closes_the_file_only_after_its_requests() {
    for io_uring in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let a = raw_disk(dir.path(), "a.img", 4 << 20);
        let b = raw_disk(dir.path(), "b.img", 4 << 20);
        let mut r = rig_with(
            config(io_uring),
            vec![
                (0, DiskSpec::open(&a, None, false).unwrap()),
                (1, DiskSpec::open(&b, None, false).unwrap()),
            ],
        );
        let mut g = r.open(0, 64);
        g.handshake(&[0x0602]);
        for i in 0..150usize {
            send_rw(&mut g, i as u64 + 1, 1, i % 2 == 0, i as u32 * 8, i);
        }
        let spec = r.dev.remove_disk(1).expect("LUN 1");
        drop(spec);
        // Every request completes: done before the removal, or refused after it.
        let done = collect(&mut g, 150);
        assert!(
            done.values()
                .all(|&s| s == 1 || s == sp::srb_status::INVALID_LUN),
            "{done:?}"
        );
        // With every request answered, the file is closed and unlocked.
        DiskSpec::open(&b, None, false).expect("unlocked after its requests");
        r.host.stop();
    }
}

/// A raw disk whose every access waits for a gate to open.
struct Stalling {
    inner: vhdx::raw::RawDisk,
    open: Mutex<bool>,
    cv: Condvar,
}

impl Stalling {
    fn wait(&self) {
        let mut g = self.open.lock().unwrap();
        while !*g {
            g = self.cv.wait(g).unwrap();
        }
    }
}

impl Disk for Stalling {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> vhdx::Result<()> {
        self.wait();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> vhdx::Result<()> {
        self.wait();
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
        self.wait();
        self.inner.extent(offset, len, write)
    }
}

#[test]
fn a_stalled_backend_completes_every_request_and_hot_remove_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "s.img", 4 << 20);
    let disk = Arc::new(Stalling {
        inner: vhdx::raw::RawDisk::open(&raw, false).unwrap(),
        open: Mutex::new(false),
        cv: Condvar::new(),
    });
    let medium = ImageMedium::from_disk(disk.clone(), &raw, [3; 16]);
    let mut r = rig(vec![(0, DiskSpec::from_image(Arc::new(medium), "raw"))], 0);
    let mut g = r.open(0, 64);
    g.handshake(&[0x0602]);
    for i in 0..60usize {
        send_rw(&mut g, i as u64 + 1, 0, i % 3 == 0, i as u32 * 8, i);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        g.ch.channel.recv_owned().unwrap().is_none(),
        "nothing completes while the disk stalls"
    );
    // Hot remove while the disk stalls: the request being served keeps the disk (and its
    // file) open; the queued ones after it are refused.
    drop(r.dev.remove_disk(0).expect("LUN 0"));
    assert!(
        Arc::strong_count(&disk) > 1,
        "a request still holds the disk"
    );
    *disk.open.lock().unwrap() = true;
    disk.cv.notify_all();
    let done = collect(&mut g, 60);
    assert_eq!(done[&1], 1, "the stalled request completes: {done:?}");
    assert!(done
        .values()
        .all(|&s| s == 1 || s == sp::srb_status::INVALID_LUN));
    assert_eq!(Arc::strong_count(&disk), 1, "the file is let go of");
    r.host.stop();
}

/// A directory on a file system that takes O_DIRECT, or `None` (printed why).
fn direct_dir() -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir_in("/var/tmp")
        .or_else(|_| tempfile::tempdir())
        .ok()?;
    let probe = dir.path().join("probe");
    std::fs::write(&probe, [0u8; 4096]).ok()?;
    let flags = rustix::fs::OFlags::RDWR | rustix::fs::OFlags::DIRECT;
    match rustix::fs::open(&probe, flags, rustix::fs::Mode::empty()) {
        Ok(_) => Some(dir),
        Err(e) => {
            eprintln!("skipped: {} takes no O_DIRECT ({e})", dir.path().display());
            None
        }
    }
}

/// Sends a 4 KiB WRITE(10)/READ(10) at `lba` whose data starts `skew` bytes into guest page
/// `page` (and, when skewed, ends in the next page).
fn send_skewed(g: &mut Guest, id: u64, lun: u8, write: bool, lba: u32, page: usize, skew: u32) {
    let mut cdb = [if write { 0x2a } else { 0x28 }, 0, 0, 0, 0, 0, 0, 0, 8, 0];
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    let dir = if write {
        sp::data_in::WRITE
    } else {
        sp::data_in::READ
    };
    let mut pfns = vec![g.pages[page]];
    if skew > 0 {
        pfns.push(g.pages[page + 1]);
    }
    let r = PagedRange {
        byte_offset: skew,
        byte_count: 4096,
        pfns,
    };
    let p = g.srb_packet(lun, &cdb, dir, 4096);
    let h = vmbus::packet::gpa_direct_header(&[r]);
    g.send(id, packet_type::DATA_USING_GPA_DIRECT, &h, p.as_bytes());
}

#[test]
fn cache_none_moves_aligned_requests_unbuffered_with_io_uring_and_without() {
    let Some(dir) = direct_dir() else { return };
    let uring = have_io_uring();
    for io_uring in [true, false] {
        for cache in [storvsp::CacheMode::None, storvsp::CacheMode::Writeback] {
            let what = format!("io_uring {io_uring}, cache={}", cache.name());
            let vhdx = dir
                .path()
                .join(format!("u-{io_uring}-{}.vhdx", cache.name()));
            let _ = std::fs::remove_file(&vhdx);
            vhdx::vhdx::VhdxBuilder::new(16 << 20)
                .block_size(1 << 20)
                .create(&vhdx)
                .unwrap();
            let spec = DiskSpec::open(&vhdx, None, false)
                .unwrap()
                .with_cache(cache);
            let mut r = rig_with(config(io_uring), vec![(0, spec)]);
            let mut g = r.open(0, 128);
            g.handshake(&[0x0602]);
            // Writes (the first in each 1 MiB block allocates it: buffered, through the
            // log), then the same again in place; every 4th one 8 bytes into its page (not
            // aligned: buffered).
            let n = 64usize;
            let skew = |i: usize| if i % 4 == 3 { 8 } else { 0 };
            for pass in 0..2u8 {
                for i in 0..n {
                    let gpa = page_gpa(&g, 2 * i) + u64::from(skew(i));
                    g.mem.write(gpa, &pattern(i as u8 ^ pass, 4096)).unwrap();
                    let id = (pass as usize * n + i) as u64 + 1;
                    send_skewed(&mut g, id, 0, true, i as u32 * 64, 2 * i, skew(i));
                }
                let done = collect(&mut g, n);
                assert!(done.values().all(|&s| s == 1), "{what}: {done:?}");
            }
            for i in 0..n {
                let gpa = page_gpa(&g, 2 * i) + u64::from(skew(i));
                g.mem.write(gpa, &[0xEE; 4096]).unwrap();
                send_skewed(
                    &mut g,
                    1000 + i as u64,
                    0,
                    false,
                    i as u32 * 64,
                    2 * i,
                    skew(i),
                );
            }
            let done = collect(&mut g, n);
            assert!(done.values().all(|&s| s == 1), "{what}: {done:?}");
            for i in 0..n {
                let mut back = vec![0u8; 4096];
                g.mem
                    .read(page_gpa(&g, 2 * i) + u64::from(skew(i)), &mut back)
                    .unwrap();
                assert!(back == pattern(i as u8 ^ 1, 4096), "{what}: request {i}");
            }
            let c = &r.dev.inspect()["counters"];
            let unbuffered = c["unbuffered_transfers"].as_u64().unwrap();
            if cache == storvsp::CacheMode::None {
                // All 3 * n but the skewed quarter and the two allocating writes.
                assert_eq!(unbuffered, (3 * n - 3 * n / 4 - 2) as u64, "{what}");
            } else {
                assert_eq!(unbuffered, 0, "{what}");
            }
            let queued = c["uring_transfers"].as_u64().unwrap();
            assert_eq!(
                queued > 0,
                io_uring && uring,
                "{what}: {queued} in io_uring"
            );
            r.host.stop();
            drop(r);
            // The file holds what the guest wrote, read back through the page cache.
            let img = vhdx::open::open(&vhdx, true).unwrap();
            for i in 0..n {
                let mut back = vec![0u8; 4096];
                img.read_at(&mut back, i as u64 * 64 * 512).unwrap();
                assert!(
                    back == pattern(i as u8 ^ 1, 4096),
                    "{what}: file at request {i}"
                );
            }
        }
    }
}

/// Sends a READ(10) of `len` bytes at block `lba` into guest pages `first..`, without waiting.
fn send_large_read(g: &mut Guest, id: u64, lba: u32, len: u32, first: usize) {
    let mut cdb = [0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&((len / 512) as u16).to_be_bytes());
    let r = PagedRange {
        byte_offset: 0,
        byte_count: len,
        pfns: g.pages[first..first + (len as usize).div_ceil(4096)].to_vec(),
    };
    let p = g.srb_packet(0, &cdb, sp::data_in::READ, len);
    let h = vmbus::packet::gpa_direct_header(&[r]);
    g.send(id, packet_type::DATA_USING_GPA_DIRECT, &h, p.as_bytes());
}

#[test]
fn queued_large_reads_from_the_page_cache_reach_the_guest_through_the_copiers() {
    if !have_io_uring() {
        return;
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return eprintln!("SKIPPED: one CPU, so no copiers");
    }
    const LEN: usize = 256 * 1024;
    // On a real file system (a tmpfs's reads io_uring does not do inline).
    let dir = tempfile::tempdir_in("/var/tmp")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let raw = raw_disk(dir.path(), "c.img", 4 * LEN as u64);
    let data: Vec<u8> = (0..4 * LEN as u32).map(|i| (i / 509) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let spec = DiskSpec::open(&raw, None, false)
        .unwrap()
        .with_cache(storvsp::CacheMode::Writeback);
    let mut r = rig_with(config(true), vec![(0, spec)]);
    let mut g = r.open(0, 128);
    g.handshake(&[0x0602]);
    let mut copied = 0;
    for round in 0..20u64 {
        for i in 0..4u64 {
            g.mem
                .write(page_gpa(&g, 64 * i as usize), &vec![0xEE; LEN])
                .unwrap();
        }
        for i in 0..4u64 {
            let lba = ((3 - i) * LEN as u64 / 512) as u32;
            send_large_read(&mut g, round * 4 + i + 1, lba, LEN as u32, 64 * i as usize);
        }
        let done = collect(&mut g, 4);
        assert!(done.values().all(|&s| s == 1), "{done:?}");
        for i in 0..4usize {
            let mut back = vec![0u8; LEN];
            g.mem.read(page_gpa(&g, 64 * i), &mut back).unwrap();
            let at = (3 - i) * LEN;
            assert!(back == data[at..at + LEN], "round {round}, read {i}");
        }
        copied = r.dev.inspect()["counters"]["copier_transfers"]
            .as_u64()
            .unwrap();
    }
    // The guest's packets arrive while the worker serves the first of each round, so some
    // find others waiting behind them, and a free copier.
    assert!(copied > 0, "no read went to a copier in 80");
    r.host.stop();
}
