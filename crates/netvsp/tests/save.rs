//! Save and restore with receive sections the guest holds: a restored NIC reuses none of
//! them before the guest's completion returns them, then uses them again; saving pauses the
//! NIC until `resume`; impossible held sections in a saved state are refused.

use guestmem::GuestMemory;
use hvdef::netvsp::{self as nv, version};
use hvdef::vmbus::Guid;
use netvsp::client::Netvsc;
use netvsp::vnet::VirtioNetHdr;
use netvsp::{MemoryBackend, MemoryPort, NetvspDevice, NicConfig, PortPolicy};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use vmbus::client::{Client, LINUX_VERSIONS};
use vmbus::testing::{GuestSynic, ThreadedTransport};
use vmbus::{Device, HostConfig, ServerConfig, VmbusHost};

const MEM: u64 = 64 << 20;
const INSTANCE: Guid = Guid::from_u128(0x5649_5249_4449_414e_4e49_4330_0000_0002);
const MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x01, 0x02, 0x04];

fn config() -> NicConfig {
    NicConfig {
        instance_id: INSTANCE,
        mac: MAC,
        mtu: 1500,
        max_queues: 1,
        policy: PortPolicy::default(),
    }
}

/// A host with a fresh NIC on `mem`; its backend's port.
fn host_with_nic(
    mem: &GuestMemory,
    synic: &Arc<GuestSynic>,
) -> (VmbusHost, Arc<NetvspDevice>, MemoryPort) {
    let host_config = HostConfig {
        server: ServerConfig {
            vp_count: 4,
            ..Default::default()
        },
        ..Default::default()
    };
    let host = VmbusHost::start(host_config, mem.clone(), synic.clone()).unwrap();
    let (backend, mut ports) = MemoryBackend::new(1, 1518);
    let dev = NetvspDevice::new(config(), mem.clone(), backend).unwrap();
    host.add_device(dev.clone()).unwrap();
    (host, dev, ports.remove(0))
}

/// A frame to the NIC's MAC.
fn frame(n: usize) -> Vec<u8> {
    let mut f = vec![0u8; 60 + n % 64];
    f[..6].copy_from_slice(&MAC);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = n as u8;
    f
}

/// The receive-buffer offsets of the transfer-page packets `tids`.
fn offsets(g: &Netvsc, tids: &[u64]) -> Vec<u32> {
    tids.iter()
        .flat_map(|t| g.xfer_offsets[t].iter().copied())
        .collect()
}

/// A guest with its NIC up (NVSP 6, buffers, RNDIS), holding every receive section sent
/// to it from now on.
fn guest_up(
    client: &mut Client<ThreadedTransport>,
    host: &VmbusHost,
    synic: &GuestSynic,
) -> Netvsc {
    let relid = client
        .offers()
        .find(|o| o.interface_type == nv::INTERFACE)
        .expect("NIC offer")
        .relid;
    let mut g = Netvsc::open(client, host.clone(), synic.event(relid), relid, 16);
    assert_eq!(g.negotiate(&[version::V6]), Some(version::V6));
    assert_eq!(g.give_buffers(client, 64, 16), (1, 1));
    g.bring_up();
    g.auto_complete = false;
    g
}

#[test]
fn sections_held_at_save_are_not_reused_after_restore_until_the_guest_returns_them() {
    let mem = GuestMemory::new(&[(0, MEM)]).unwrap();
    let synic = GuestSynic::new(64);
    let (host, dev, port) = host_with_nic(&mem, &synic);
    let mut client = Client::new(
        ThreadedTransport::new(host.clone(), synic.clone()),
        mem.clone(),
        1 << 20,
        MEM - (1 << 20),
    );
    client.connect(&LINUX_VERSIONS).unwrap();
    client.request_offers().unwrap();
    let mut g = guest_up(&mut client, &host, &synic);
    for n in 0..8 {
        port.inject(VirtioNetHdr::default(), &frame(n));
    }
    assert_eq!(g.wait_frames(8).len(), 8);
    let held_tids = g.held.clone();
    let held: HashSet<u32> = offsets(&g, &held_tids).into_iter().collect();
    assert_eq!(held.len(), 8, "one section a frame");
    assert_eq!(dev.inspect()["held_sections"][0], 8);
    let saved = host.save().unwrap();
    assert_eq!(dev.inspect()["paused"], true);
    let state = &saved.devices[0].state;
    assert_eq!(state.version, netvsp::SAVED_STATE_VERSION);
    assert_eq!(
        state.data["channels"][0]["held"].as_array().unwrap().len(),
        held_tids.len()
    );
    host.stop();

    // A new host with a fresh NIC takes the saved bus over.
    let (host, dev, port) = host_with_nic(&mem, &synic);
    let json = serde_json::to_string(&saved).unwrap();
    host.restore(serde_json::from_str(&json).unwrap()).unwrap();
    g.host = host.clone();
    let _ = host.signal_event(g.ch.connection_id);
    // Every section but the held ones carries a frame; frames past that are dropped.
    let free = g.sections as usize - held.len();
    for n in 0..free + 3 {
        port.inject(VirtioNetHdr::default(), &frame(n));
    }
    assert_eq!(g.wait_frames(free).len(), free);
    std::thread::sleep(Duration::from_millis(50));
    assert!(g.wait_frames(0).is_empty());
    assert!(dev.stats().drop_no_receive_section > 0);
    let new_tids = g.held[held_tids.len()..].to_vec();
    assert!(new_tids.iter().all(|t| !held_tids.contains(t)));
    let used: HashSet<u32> = offsets(&g, &new_tids).into_iter().collect();
    assert_eq!(used.len(), free);
    assert!(used.is_disjoint(&held), "a held section was written over");
    assert_eq!(
        dev.inspect()["held_sections"][0],
        g.sections,
        "every section is with the guest"
    );

    // Returning the sections held across the save frees them: the next frames use them.
    for &t in &held_tids {
        g.complete_xfer(t);
    }
    for n in 0..held.len() {
        port.inject(VirtioNetHdr::default(), &frame(n));
    }
    assert_eq!(g.wait_frames(held.len()).len(), held.len());
    let last = g.held[held_tids.len() + new_tids.len()..].to_vec();
    let reused: HashSet<u32> = offsets(&g, &last).into_iter().collect();
    assert_eq!(reused, held);
    host.stop();

    // Impossible held sections in a saved state are refused.
    let fresh = NetvspDevice::new(config(), mem.clone(), MemoryBackend::new(1, 1518).0).unwrap();
    assert!(fresh.restore(&saved.devices[0].state).is_ok());
    let sections = state.data["receive_sections"].clone();
    let in_saved: HashSet<u64> = state.data["channels"][0]["held"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|x| x["sections"].as_array().unwrap().iter())
        .map(|v| v.as_u64().unwrap())
        .collect();
    let unheld = (0..).find(|i| !in_saved.contains(i)).unwrap();
    let add = |d: &mut serde_json::Value, x: serde_json::Value| {
        d["channels"][0]["held"].as_array_mut().unwrap().push(x);
    };
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut s = saved.devices[0].state.clone();
        f(&mut s.data);
        s
    };
    for (what, bad) in [
        (
            "a section past the buffer",
            with(&|d| d["channels"][0]["held"][0]["sections"][0] = sections.clone()),
        ),
        (
            "a section held twice",
            with(&|d| {
                let s = d["channels"][0]["held"][0]["sections"][0].clone();
                add(d, serde_json::json!({ "tid": u64::MAX, "sections": [s] }));
            }),
        ),
        (
            "a transaction id twice",
            with(&|d| {
                let t = d["channels"][0]["held"][0]["tid"].clone();
                add(d, serde_json::json!({ "tid": t, "sections": [unheld] }));
            }),
        ),
        (
            "a channel past the queues",
            with(&|d| d["channels"][0]["index"] = 1.into()),
        ),
        (
            "no section count",
            with(&|d| d["receive_sections"] = serde_json::Value::Null),
        ),
        (
            "a negative section",
            with(&|d| d["channels"][0]["held"][0]["sections"][0] = (-1).into()),
        ),
    ] {
        assert!(fresh.restore(&bad).is_err(), "{what} accepted");
    }
}

#[test]
fn a_saved_nic_is_paused_until_resumed() {
    let mem = GuestMemory::new(&[(0, MEM)]).unwrap();
    let synic = GuestSynic::new(64);
    let (host, dev, port) = host_with_nic(&mem, &synic);
    let mut client = Client::new(
        ThreadedTransport::new(host.clone(), synic.clone()),
        mem.clone(),
        1 << 20,
        MEM - (1 << 20),
    );
    client.connect(&LINUX_VERSIONS).unwrap();
    client.request_offers().unwrap();
    let mut g = guest_up(&mut client, &host, &synic);
    g.auto_complete = true;
    let _ = dev.save();
    port.inject(VirtioNetHdr::default(), &frame(1));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        g.wait_frames(0).is_empty(),
        "a frame reached a paused NIC's guest"
    );
    dev.resume();
    assert_eq!(g.wait_frames(1).len(), 1);
    assert_eq!(dev.inspect()["paused"], false);
    host.stop();
}
