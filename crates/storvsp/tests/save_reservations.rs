//! Save and restore around commands that are not safe to replay: a PERSISTENT RESERVE OUT
//! is either saved not started (it runs once later) or with its completion (sent, not run
//! again), and the disk's reservations are saved with it, so a fresh controller carries on
//! as if each command ran once.

mod common;

use common::*;
use hvdef::storvsp::{self as sp, ScsiRequest};
use scsi::MemoryMedium;
use std::sync::Arc;
use std::time::Duration;
use storvsp::{ControllerConfig, DiskSpec, StorvspDevice, SAVED_STATE_VERSION};
use vmbus::{Device, HostConfig, ServerConfig, VmbusHost};

fn memory_disk() -> DiskSpec {
    DiskSpec::from_medium(
        Arc::new(MemoryMedium::new(1 << 20, 512, 512)),
        "mem",
        "memory",
    )
}

/// PERSISTENT RESERVE OUT REGISTER from key `old` to key `new`, its parameter list written at
/// `offset` of the guest's data pages.
fn send_register(g: &mut Guest, id: u64, old: u64, new: u64, offset: u32) {
    let mut params = [0u8; 24];
    params[..8].copy_from_slice(&old.to_be_bytes());
    params[8..16].copy_from_slice(&new.to_be_bytes());
    g.write_guest(offset, &params);
    let cdb = [0x5f, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    g.send_srb(id, 0, &cdb, sp::data_in::WRITE, 24, offset);
}

/// PERSISTENT RESERVE IN READ KEYS: the generation and the keys.
fn read_keys(g: &mut Guest, id: u64) -> (u32, Vec<u64>) {
    let cdb = [0x5e, 0, 0, 0, 0, 0, 0, 0, 64, 0];
    let s = g.srb(id, 0, &cdb, sp::data_in::READ, 64, 0);
    assert_good(&s);
    let b = g.read_guest(0, 64);
    let generation = u32::from_be_bytes(b[0..4].try_into().unwrap());
    let n = u32::from_be_bytes(b[4..8].try_into().unwrap()) as usize / 8;
    let keys = (0..n)
        .map(|i| u64::from_be_bytes(b[8 + 8 * i..16 + 8 * i].try_into().unwrap()))
        .collect();
    (generation, keys)
}

fn assert_good(s: &ScsiRequest) {
    assert_eq!((s.srb_status, s.scsi_status), (1, 0), "not GOOD");
}

fn no_packet_within(g: &mut Guest, wait: Duration) {
    std::thread::sleep(wait);
    assert!(
        g.ch.channel.recv_owned().unwrap().is_none(),
        "unexpected packet"
    );
}

fn storvsp_state(saved: &vmbus::host::SavedBus) -> &serde_json::Value {
    &saved
        .devices
        .iter()
        .find(|d| d.state.version == SAVED_STATE_VERSION)
        .unwrap()
        .state
        .data
}

#[test]
fn a_register_saved_with_its_completion_runs_once_on_a_fresh_controller() {
    let mut r = rig(vec![(0, memory_disk())], 0);
    // A small ring the guest does not read: completions pile up in the worker.
    let mut g = r.open(0, 2);
    g.handshake(&[0x0602]);
    let held_now = |r: &Rig| r.dev.inspect()["channels"][0]["executed_not_sent"] == 1;
    let mut n = 0u64;
    while !held_now(&r) {
        n += 1;
        assert!(n < 1000, "the ring never filled");
        send_register(&mut g, n, n - 1, n, 32 * n as u32);
        std::thread::sleep(Duration::from_millis(2));
    }
    // Two more wait in the ring from the guest.
    for _ in 0..2 {
        n += 1;
        send_register(&mut g, n, n - 1, n, 32 * n as u32);
    }
    std::thread::sleep(Duration::from_millis(20));
    let saved = r.host.save().unwrap();
    let state = storvsp_state(&saved);
    let held = state["channels"][0]["requests"].as_array().unwrap();
    assert_eq!(held.len(), 1, "{state}");
    assert!(!held[0]["completion"].is_null());
    assert_eq!(state["reservations"][0]["generation"], n - 2);
    r.host.stop();

    // A new host with a fresh controller and disk: the held completion is sent, the two in
    // the ring run there.
    let config = HostConfig {
        server: ServerConfig {
            vp_count: 4,
            ..Default::default()
        },
        ..Default::default()
    };
    let host = VmbusHost::start(config, r.mem.clone(), r.synic.clone()).unwrap();
    let fresh = StorvspDevice::new(
        ControllerConfig::new(INSTANCE, 0),
        r.mem.clone(),
        vec![(0, memory_disk())],
    )
    .unwrap();
    host.add_device(fresh).unwrap();
    let json = serde_json::to_string(&saved).unwrap();
    host.restore(serde_json::from_str(&json).unwrap()).unwrap();
    g.host = host.clone();
    g.signal();
    for id in 1..=n {
        assert_good(&g.completion(id).srb());
    }
    no_packet_within(&mut g, Duration::from_millis(50));
    // Each REGISTER moved the generation on once, and the last key is the one registered.
    assert_eq!(read_keys(&mut g, n + 1), (n as u32, vec![n]));
    host.stop();
}

#[test]
fn a_save_racing_a_register_sees_it_not_started_or_completed() {
    let mut r = rig(vec![(0, memory_disk())], 0);
    let mut g = r.open(0, 16);
    g.handshake(&[0x0602]);
    let (mut unstarted, mut executed) = (0, 0);
    for i in 0..2000u64 {
        send_register(&mut g, i + 1, i, i + 1, 0);
        // Save somewhere between the packet reaching the ring and its completion.
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_nanos(i % 100 * 400) {
            std::hint::spin_loop();
        }
        let saved = r.dev.save();
        let reqs = saved.data["channels"][0]["requests"].as_array().cloned();
        let generation = saved.data["reservations"][0]["generation"]
            .as_u64()
            .unwrap_or(0);
        match reqs.as_deref() {
            Some([q]) if q["completion"].is_null() => {
                unstarted += 1;
                assert_eq!(generation, i, "saved unexecuted after it took effect");
            }
            Some([_]) => {
                executed += 1;
                assert_eq!(generation, i + 1, "saved with its completion before it ran");
            }
            // Still in the ring, or its completion already is.
            _ => assert!(generation == i || generation == i + 1),
        }
        r.dev.resume();
        assert_good(&g.completion(i + 1).srb());
    }
    assert_eq!(read_keys(&mut g, 1000), (2000, vec![2000]));
    eprintln!("{unstarted} saves before a REGISTER ran, {executed} after");
    r.host.stop();
}

#[test]
fn hostile_saved_reservations_are_refused() {
    let mem = guestmem::GuestMemory::new(&[(0, 1 << 20)]).unwrap();
    let dev = StorvspDevice::new(
        ControllerConfig::new(INSTANCE, 0),
        mem,
        vec![(2, memory_disk())],
    )
    .unwrap();
    let mut good = dev.save();
    dev.resume();
    good.data["reservations"] = serde_json::json!([{
        "lun": 2, "generation": 5, "registrations": [[0, 7], [1, 8]],
        "reservation": [1, 5], "aptpl": false, "unit_attentions": [[0, 42, 3]],
    }]);
    dev.restore(&good).unwrap();
    assert_eq!(dev.save().data["reservations"], good.data["reservations"]);
    dev.resume();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut s = good.clone();
        f(&mut s.data["reservations"][0]);
        s
    };
    for (what, bad) in [
        ("a LUN without a disk", with(&|r| r["lun"] = 3.into())),
        ("an unknown type", with(&|r| r["reservation"][1] = 2.into())),
        (
            "an unregistered holder",
            with(&|r| r["reservation"][0] = 9.into()),
        ),
        ("a key of 0", with(&|r| r["registrations"][0][1] = 0.into())),
        (
            "an initiator registered twice",
            with(&|r| r["registrations"][1][0] = 0.into()),
        ),
        (
            "two unit attentions for one initiator",
            with(&|r| r["unit_attentions"] = serde_json::json!([[0, 42, 3], [0, 42, 4]])),
        ),
    ] {
        assert!(dev.restore(&bad).is_err(), "{what} accepted");
    }
    let mut twice = good.clone();
    let r0 = twice.data["reservations"][0].clone();
    twice.data["reservations"] = serde_json::json!([r0.clone(), r0]);
    assert!(dev.restore(&twice).is_err(), "a LUN saved twice accepted");
    // A state without reservations leaves the disk with none.
    let mut none = good.clone();
    none.data["reservations"] = serde_json::json!([]);
    dev.restore(&none).unwrap();
    assert_eq!(dev.save().data["reservations"], serde_json::json!([]));
}
