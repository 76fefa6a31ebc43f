//! Save and restore with requests in flight: a request taken off the ring but not completed
//! when the bus is saved is executed again by a new host's controller, a completion that had
//! not reached the ring is sent (not re-executed), each exactly once; saving pauses the
//! controller until `resume`; hostile saved states are refused; DVD drive state survives.

mod common;

use common::*;
use guestmem::GuestMemory;
use hvdef::storvsp::{self as sp, VstorPacket};
use hvdef::vmbus::packet_type;
use scsi::{Medium, MediumError, MemoryMedium};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use storvsp::{ControllerConfig, DiskSpec, StorvspDevice};
use vmbus::{Device, HostConfig, ServerConfig, VmbusHost};

/// A memory disk whose writes wait at a gate (closed: they block) and are counted.
struct Gated {
    inner: MemoryMedium,
    open: Mutex<bool>,
    cv: Condvar,
    writes: AtomicU64,
    waiting: AtomicU64,
}

impl Gated {
    fn new(open: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryMedium::new(4 << 20, 512, 512),
            open: Mutex::new(open),
            cv: Condvar::new(),
            writes: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
        })
    }

    fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.cv.notify_all();
    }

    fn wait_for_writer(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.waiting.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no write reached the disk"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Medium for Gated {
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), MediumError> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<(), MediumError> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        drop(open);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> Result<(), MediumError> {
        self.inner.flush()
    }
    fn unmap(&self, off: u64, len: u64) -> Result<(), MediumError> {
        self.inner.unmap(off, len)
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
    fn disk_id(&self) -> [u8; 16] {
        [7; 16]
    }
}

fn gated_rig(medium: &Arc<Gated>) -> Rig {
    rig(
        vec![(0, DiskSpec::from_medium(medium.clone(), "gated", "memory"))],
        0,
    )
}

/// A new host (as a worker process that takes over the VM) with a fresh controller on
/// `medium`, restored from `saved`; the guest's channel now signals it.
fn take_over(
    r: &Rig,
    g: &mut Guest,
    saved: &vmbus::host::SavedBus,
    medium: Arc<Gated>,
) -> VmbusHost {
    let config = HostConfig {
        server: ServerConfig {
            vp_count: 4,
            ..Default::default()
        },
        ..Default::default()
    };
    let host = VmbusHost::start(config, r.mem.clone(), r.synic.clone()).unwrap();
    let dev = StorvspDevice::new(
        ControllerConfig::new(INSTANCE, 0),
        r.mem.clone(),
        vec![(0, DiskSpec::from_medium(medium, "gated", "memory"))],
    )
    .unwrap();
    host.add_device(dev).unwrap();
    let json = serde_json::to_string(saved).unwrap();
    host.restore(serde_json::from_str(&json).unwrap()).unwrap();
    g.host = host.clone();
    g.signal();
    host
}

fn write_cdb(lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0x2a, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

fn no_packet_within(g: &mut Guest, wait: Duration) {
    std::thread::sleep(wait);
    assert!(
        g.ch.channel.recv_owned().unwrap().is_none(),
        "unexpected packet"
    );
}

#[test]
fn a_request_executing_at_save_is_executed_again_after_restore() {
    let old = Gated::new(false);
    let mut r = gated_rig(&old);
    let mut g = r.open(0, 16);
    g.handshake(&[0x0602]);
    // A write that reaches the disk and waits there, and a read behind it in the ring.
    let data = pattern(11, 4096);
    g.write_guest(0, &data);
    g.send_srb(100, 0, &write_cdb(8, 8), sp::data_in::WRITE, 4096, 0);
    old.wait_for_writer();
    g.send_srb(
        101,
        0,
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sp::data_in::READ,
        8,
        3000,
    );
    let saved = r.host.save().unwrap();
    let state = &saved
        .devices
        .iter()
        .find(|d| d.state.version == storvsp::SAVED_STATE_VERSION)
        .unwrap()
        .state;
    let reqs = state.data["channels"][0]["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 1, "{state:?}");
    assert!(reqs[0]["completion"].is_null());
    let v = r.dev.inspect();
    assert_eq!(
        (v["paused"].as_bool(), &v["channels"][0]["in_flight"]),
        (Some(true), &1.into())
    );
    // The write finishes on the old disk, but its completion stays out of the ring, and
    // nothing else is taken off it.
    old.set(true);
    no_packet_within(&mut g, Duration::from_millis(100));
    assert_eq!(old.writes.load(Ordering::SeqCst), 1);
    r.host.stop();

    // A new host on a fresh (empty) disk: the write runs again there, then the read.
    let new = Gated::new(true);
    let host = take_over(&r, &mut g, &saved, new.clone());
    assert_eq!(g.completion(100).srb().srb_status, 1);
    let s = g.completion(101).srb();
    assert_eq!(s.srb_status, 1);
    assert_eq!(
        g.read_guest(3000, 4),
        ((4u32 << 20) / 512 - 1).to_be_bytes()
    );
    assert_eq!(new.writes.load(Ordering::SeqCst), 1);
    let (s, back) = g.read10(102, 0, 8, 8, 0);
    assert_eq!(s.srb_status, 1);
    assert!(back == data, "the replayed write is on the new disk");
    no_packet_within(&mut g, Duration::from_millis(50));
    host.stop();
}

#[test]
fn completions_held_at_save_are_sent_once_and_not_executed_again() {
    let old = Gated::new(true);
    let mut r = gated_rig(&old);
    // A small ring: the guest does not read, so completions pile up in the worker.
    let mut g = r.open(0, 2);
    g.handshake(&[0x0602]);
    g.write_guest(0, &pattern(3, 512));
    let held_now = |r: &Rig| r.dev.inspect()["channels"][0]["executed_not_sent"] == 1;
    let mut n = 0u64;
    while !held_now(&r) {
        n += 1;
        assert!(n < 1000, "the ring never filled");
        g.send_srb(n, 0, &write_cdb(n as u32, 1), sp::data_in::WRITE, 512, 0);
        std::thread::sleep(Duration::from_millis(2));
    }
    // A few more stay in the ring from the guest: the worker takes nothing while it waits.
    for _ in 0..3 {
        n += 1;
        g.send_srb(n, 0, &write_cdb(n as u32, 1), sp::data_in::WRITE, 512, 0);
    }
    std::thread::sleep(Duration::from_millis(20));
    let saved = r.host.save().unwrap();
    let state = &saved
        .devices
        .iter()
        .find(|d| d.state.version == storvsp::SAVED_STATE_VERSION)
        .unwrap()
        .state;
    let held = state.data["channels"][0]["requests"]
        .as_array()
        .unwrap()
        .clone();
    assert!(!held.is_empty(), "{state:?}");
    assert!(held.iter().all(|q| !q["completion"].is_null()));
    let executed_before = old.writes.load(Ordering::SeqCst);
    r.host.stop();

    let new = Gated::new(true);
    let host = take_over(&r, &mut g, &saved, new.clone());
    for id in 1..=n {
        let c = g.completion(id);
        assert_eq!((c.srb().srb_status, { c.status }), (1, 0), "request {id}");
    }
    no_packet_within(&mut g, Duration::from_millis(50));
    // Every write ran exactly once, on one disk or the other.
    assert_eq!(executed_before + new.writes.load(Ordering::SeqCst), n);
    assert_eq!(held.len(), 1);
    assert_eq!(executed_before, n - 3);
    host.stop();
}

#[test]
fn a_saved_controller_is_paused_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), "a.img", 1 << 20);
    let mut r = rig(vec![(0, DiskSpec::open(&path, None, false).unwrap())], 0);
    let mut g = r.open(0, 16);
    g.handshake(&[0x0602]);
    let _ = r.dev.save();
    g.send_srb(1, 0, &[0, 0, 0, 0, 0, 0], sp::data_in::UNKNOWN, 0, 0);
    no_packet_within(&mut g, Duration::from_millis(100));
    r.dev.resume();
    assert_eq!(g.completion(1).srb().srb_status, 1);
    assert_eq!(r.dev.inspect()["paused"], false);
    r.host.stop();
}

#[test]
fn hostile_saved_states_are_refused() {
    let mem = GuestMemory::new(&[(0, 1 << 20)]).unwrap();
    let dev = StorvspDevice::new(ControllerConfig::new(INSTANCE, 1), mem, vec![]).unwrap();
    dev.add_dvd(3, None).unwrap();
    let good = dev.save();
    dev.resume();
    assert!(dev.restore(&good).is_ok());
    // A version-1 state (the handshake alone) still restores.
    let mut v1 = good.clone();
    v1.version = 1;
    v1.data = serde_json::json!({ "handshake": good.data["handshake"] });
    assert!(dev.restore(&v1).is_ok());
    let ok_packet = {
        let p = VstorPacket::new(sp::operation::EXECUTE_SRB, 0);
        let mut bytes = vec![0u8; 16];
        bytes[0..2].copy_from_slice(&packet_type::DATA_INBAND.to_le_bytes());
        bytes[2..4].copy_from_slice(&2u16.to_le_bytes());
        bytes[4..6].copy_from_slice(&((16 + size_of::<VstorPacket>() as u16) / 8).to_le_bytes());
        bytes.extend_from_slice(zerocopy::IntoBytes::as_bytes(&p));
        bytes
    };
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut s = good.clone();
        f(&mut s.data);
        s
    };
    let channel = |index: u16, packet: Vec<u8>, completion: Option<Vec<u8>>| serde_json::json!([{ "index": index, "requests": [{ "packet": packet, "completion": completion }] }]);
    assert!(dev
        .restore(&with(
            &|d| d["channels"] = channel(1, ok_packet.clone(), None)
        ))
        .is_ok());
    for (what, bad) in [
        (
            "channel past the subchannels",
            with(&|d| d["channels"] = channel(2, ok_packet.clone(), None)),
        ),
        (
            "malformed packet",
            with(&|d| d["channels"] = channel(0, vec![1, 2, 3], None)),
        ),
        (
            "short completion",
            with(&|d| d["channels"] = channel(0, ok_packet.clone(), Some(vec![0; 10]))),
        ),
        (
            "a DVD at a LUN without one",
            with(&|d| d["dvds"][0]["lun"] = 4.into()),
        ),
        (
            "an unknown media event",
            with(&|d| d["dvds"][0]["event"] = 9.into()),
        ),
    ] {
        assert!(dev.restore(&bad).is_err(), "{what} accepted");
    }
    let mut future = good.clone();
    future.version = storvsp::SAVED_STATE_VERSION + 1;
    assert!(dev.restore(&future).is_err());
}

#[test]
fn dvd_state_survives_save_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let iso = dir.path().join("d.iso");
    std::fs::write(&iso, pattern(1, 64 * 2048)).unwrap();
    let mut r = rig(vec![], 0);
    r.dev
        .add_dvd(1, Some(DiskSpec::open_iso(&iso).unwrap()))
        .unwrap();
    let mut g = r.open(0, 16);
    g.handshake(&[0x0602]);
    // The guest locks the tray.
    let s = g.srb(1, 1, &[0x1e, 0, 0, 0, 1, 0], sp::data_in::UNKNOWN, 0, 0);
    assert_eq!(s.srb_status, 1);
    let saved = r.dev.save();
    r.host.stop();
    assert_eq!(saved.data["dvds"][0]["removal_prevented"], true);
    let mem = r.mem.clone();
    let fresh =
        StorvspDevice::new(ControllerConfig::new(INSTANCE, 0), mem.clone(), vec![]).unwrap();
    fresh
        .add_dvd(1, Some(DiskSpec::open_iso(&iso).unwrap()))
        .unwrap();
    fresh.restore(&saved).unwrap();
    assert_eq!(fresh.inspect()["dvds"][0]["removal_prevented"], true);
    // Saved after the guest ejected: restored empty, whatever medium the host attached.
    let mut ejected = saved.clone();
    ejected.data["dvds"][0]["medium_present"] = false.into();
    fresh.restore(&ejected).unwrap();
    assert_eq!(fresh.drives()[0].path, None);
}
