//! The run-time host with real threads and eventfds: the guest-side client (and per-channel
//! guest threads) on one side, the control thread and one worker thread per open channel on
//! the other, joined only by the hypercall entry points and the [`GuestSynic`] stand-in.

use guestmem::GuestMemory;
use hvdef::vmbus::{self as hv, msgtype, Guid, MessageHeader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmbus::client::{Client, GuestChannel, LINUX_VERSIONS};
use vmbus::host::DeviceId;
use vmbus::testing::{
    run_echo, wait_event, Echo, EchoLoad, GuestSynic, ThreadedTransport, Traffic,
};
use vmbus::{
    Channel, ChannelError, ChannelWorker, Device, DeviceOffer, HostConfig, OpenError,
    OpenedChannel, Progress, ServerConfig, VmbusHost, WorkerError,
};
use zerocopy::IntoBytes;

const MEM: u64 = 64 << 20;
const FLOOD: Guid = Guid::from_u128(0xf100_0000_0000_0000_0000_0000_0000_0000);

fn instance(n: u32) -> Guid {
    Guid::from_u128(0x1234_0000_0000_0000_0000_0000_0000_0000 | u128::from(n))
}

/// Sends packets to the guest until the ring is full, and again whenever there is room.
struct Flood;

impl Device for Flood {
    fn offer(&self) -> DeviceOffer {
        DeviceOffer::new("flood", FLOOD, instance(0))
    }

    fn open(&self, _ch: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        Ok(Box::new(FloodWorker(0)))
    }
}

struct FloodWorker(u64);

impl ChannelWorker for FloodWorker {
    fn process(&mut self, ch: &mut Channel, _now: Instant) -> Result<Progress, WorkerError> {
        loop {
            match ch.send_inband(self.0, &[0xab; 256], false) {
                Ok(()) => self.0 += 1,
                Err(ChannelError::Full) => return Ok(Progress::WaitingForRoom),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

struct Rig {
    host: VmbusHost,
    synic: Arc<GuestSynic>,
    client: Client<ThreadedTransport>,
    mem: GuestMemory,
}

fn echo(subchannels: u16) -> Arc<Echo> {
    Arc::new(Echo {
        subchannels,
        ..Default::default()
    })
}

/// The guest end of an echo channel on its own thread (see [`run_echo`]).
fn guest_echo(
    ch: GuestChannel,
    host: VmbusHost,
    synic: Arc<GuestSynic>,
    count: u64,
    seed: u64,
    stop: Option<Arc<AtomicBool>>,
) -> (Traffic, GuestChannel) {
    let load = EchoLoad {
        seed,
        stop,
        ..EchoLoad::new(count)
    };
    run_echo(ch, &host, &synic, &load)
}

/// A host with `devices` (each with its own instance GUID), and a connected guest.
fn rig(devices: Vec<Arc<dyn Device>>, vp_count: u32) -> (Rig, Vec<DeviceId>) {
    let mem = GuestMemory::new(&[(0, MEM)]).unwrap();
    let synic = GuestSynic::new(64);
    let config = HostConfig {
        server: ServerConfig {
            vp_count,
            ..Default::default()
        },
        ..Default::default()
    };
    let host = VmbusHost::start(config, mem.clone(), synic.clone()).unwrap();
    let ids = devices
        .into_iter()
        .enumerate()
        .map(|(i, d)| host.add_device(Arc::new(Renamed(d, i as u32))).unwrap())
        .collect();
    let mut client = Client::new(
        ThreadedTransport::new(host.clone(), synic.clone()),
        mem.clone(),
        1 << 20,
        MEM - (1 << 20),
    );
    client.connect(&LINUX_VERSIONS).unwrap();
    client.request_offers().unwrap();
    (
        Rig {
            host,
            synic,
            client,
            mem,
        },
        ids,
    )
}

/// Gives each device of a rig its own instance GUID.
struct Renamed(Arc<dyn Device>, u32);

impl Device for Renamed {
    fn offer(&self) -> DeviceOffer {
        let mut o = self.0.offer();
        o.params.instance_id = instance(self.1);
        o
    }
    fn open(&self, ch: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        self.0.open(ch)
    }
    fn retarget(&self, index: u16, vp: u32) {
        self.0.retarget(index, vp)
    }
    fn inspect(&self) -> serde_json::Value {
        self.0.inspect()
    }
}

fn relid_of(c: &Client<ThreadedTransport>, n: u32, sub: u16) -> u32 {
    c.offers()
        .find(|o| o.instance_id == instance(n) && o.sub_channel_index == sub)
        .unwrap_or_else(|| panic!("no offer for device {n} subchannel {sub}"))
        .relid
}

fn packets() -> u64 {
    std::env::var("VMBUS_THREADED_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn worker_stat(host: &VmbusHost, device: usize, channel: usize, key: &str) -> u64 {
    let v = host.inspect().unwrap();
    v["devices"][device]["channels"][channel]["worker"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {v:#}"))
}

#[test]
fn eight_channels_carry_100k_packets_each_with_nothing_lost_duplicated_or_stuck() {
    let devices: Vec<Arc<dyn Device>> = (0..8).map(|_| echo(0) as Arc<dyn Device>).collect();
    let (mut r, _) = rig(devices, 1);
    let count = packets();
    let channels: Vec<GuestChannel> = (0..8)
        .map(|n| {
            let relid = relid_of(&r.client, n, 0);
            r.client.open_channel(relid, 16, 16, 0).unwrap()
        })
        .collect();
    assert_eq!(r.host.open_ports(), 8);
    let started = Instant::now();
    let threads: Vec<_> = channels
        .into_iter()
        .enumerate()
        .map(|(i, ch)| {
            let (host, synic) = (r.host.clone(), r.synic.clone());
            std::thread::spawn(move || guest_echo(ch, host, synic, count, 77 + i as u64, None))
        })
        .collect();
    for t in threads {
        let (traffic, _) = t.join().expect("guest thread");
        assert_eq!((traffic.sent, traffic.completed), (count, count));
    }
    eprintln!(
        "8 x {count} packets in {:.2} s, {} guest interrupts",
        started.elapsed().as_secs_f64(),
        r.synic.interrupts.load(Ordering::Relaxed)
    );
    r.host.stop();
}

#[test]
fn close_rescind_and_unload_stop_the_workers_before_the_rings_go_away() {
    let devices: Vec<Arc<dyn Device>> = (0..3).map(|_| echo(0) as Arc<dyn Device>).collect();
    let (mut r, ids) = rig(devices, 1);
    let mut open = |n: u32| {
        let relid = relid_of(&r.client, n, 0);
        r.client.open_channel(relid, 4, 4, 0).unwrap()
    };
    let chans = [open(0), open(1), open(2)];
    let info: Vec<(u32, u32, u32, Vec<u64>)> = chans
        .iter()
        .map(|c| (c.relid, c.connection_id, c.ring_gpadl, c.ring_pfns.clone()))
        .collect();
    let stops: Vec<Arc<AtomicBool>> = (0..3).map(|_| Arc::default()).collect();
    let mut threads: Vec<Option<std::thread::JoinHandle<(Traffic, GuestChannel)>>> = chans
        .into_iter()
        .zip(&stops)
        .enumerate()
        .map(|(i, (ch, stop))| {
            let (host, synic, stop) = (r.host.clone(), r.synic.clone(), stop.clone());
            Some(std::thread::spawn(move || {
                guest_echo(ch, host, synic, u64::MAX, i as u64, Some(stop))
            }))
        })
        .collect();
    // Let traffic flow on all three.
    std::thread::sleep(Duration::from_millis(300));
    let mut finish = |i: usize, r: &Rig| {
        stops[i].store(true, Ordering::Relaxed);
        let (traffic, _ch) = threads[i].take().unwrap().join().expect("guest thread");
        assert!(traffic.completed > 0, "channel {i} carried nothing");
        // Any host access to these pages from now on kills the test process.
        for &pfn in &info[i].3 {
            r.mem.revoke(pfn * 4096, 4096).unwrap();
        }
        let conn = info[i].1;
        for _ in 0..100 {
            assert_eq!(
                r.host.signal_event(conn),
                hvdef::hv::HvStatus::INVALID_CONNECTION_ID,
                "the doorbell of a closed channel still rings"
            );
        }
    };
    // 1. The guest closes channel 0 and tears its ring GPADL down (GPADL_TORNDOWN only goes
    //    out after the worker has stopped).
    let (relid, _, gpadl, _) = info[0].clone();
    r.client
        .post_raw(
            hv::MESSAGE_CONNECTION_ID,
            hv::RelidMessage {
                header: MessageHeader::new(msgtype::CLOSE_CHANNEL),
                child_relid: relid,
            }
            .as_bytes(),
        )
        .unwrap();
    r.client.teardown_gpadl(relid, gpadl).unwrap();
    finish(0, &r);
    // 2. The host rescinds device 1 (hot-unplug) while its guest thread is busy.
    r.host.remove_device(ids[1]).unwrap();
    finish(1, &r);
    r.client
        .wait_for(msgtype::RESCIND_CHANNEL_OFFER, |_| true)
        .unwrap();
    r.client.release_relid(info[1].0).unwrap();
    // 3. The guest unloads (kexec) with channel 2 busy.
    r.client.unload().unwrap();
    finish(2, &r);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.host.open_ports(), 0);
    // The bus works after all that: reconnect, reopen device 2.
    r.client.connect(&LINUX_VERSIONS).unwrap();
    r.client.request_offers().unwrap();
    let relid = relid_of(&r.client, 2, 0);
    let mut ch = r.client.open_channel(relid, 4, 4, 0).unwrap();
    r.client.send_inband(&mut ch, 9, b"again", true).unwrap();
    let event = r.synic.event(ch.relid);
    let p = loop {
        if let Some(p) = r.client.recv(&mut ch).unwrap() {
            break p;
        }
        assert!(wait_event(&event, Duration::from_secs(5)), "no completion");
    };
    assert_eq!((p.transaction_id, &p.payload[..5]), (9, &b"again"[..]));
    r.host.stop();
}

#[test]
fn a_guest_that_never_reads_makes_the_device_wait_not_spin() {
    let (mut r, _) = rig(vec![Arc::new(Flood)], 1);
    let relid = relid_of(&r.client, 0, 0);
    let mut ch = r.client.open_channel(relid, 2, 2, 0).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let passes = worker_stat(&r.host, 0, 0, "passes");
    let wakeups = worker_stat(&r.host, 0, 0, "wakeups");
    assert!(
        passes <= 3 && wakeups <= 2,
        "the worker spun while the ring was full: {passes} passes, {wakeups} wake-ups"
    );
    // The guest reads a few packets: once free space crosses pending_send_sz the host is
    // signalled and fills the ring again, once per crossing.
    let before = passes;
    let mut got = 0;
    for _ in 0..20 {
        if r.client.recv(&mut ch).unwrap().is_some() {
            got += 1;
        }
    }
    assert_eq!(got, 20);
    std::thread::sleep(Duration::from_millis(300));
    let after = worker_stat(&r.host, 0, 0, "passes");
    assert!(after > before, "the device never woke after the guest read");
    assert!(
        after - before <= 25,
        "{} passes for 20 reads",
        after - before
    );
    r.host.stop();
}

#[test]
fn hot_plug_and_rescind_while_other_channels_carry_traffic() {
    let devices: Vec<Arc<dyn Device>> = (0..2).map(|_| echo(0) as Arc<dyn Device>).collect();
    let (mut r, _) = rig(devices, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..2)
        .map(|n| {
            let relid = relid_of(&r.client, n, 0);
            let ch = r.client.open_channel(relid, 8, 8, 0).unwrap();
            let (host, synic, stop) = (r.host.clone(), r.synic.clone(), stop.clone());
            std::thread::spawn(move || guest_echo(ch, host, synic, u64::MAX, n as u64, Some(stop)))
        })
        .collect();
    for round in 0..5u32 {
        // Hot-plug: the offer reaches the connected guest at once.
        let n = 10 + round;
        let id = r.host.add_device(Arc::new(Renamed(echo(0), n))).unwrap();
        r.client
            .wait_for(msgtype::OFFER_CHANNEL, |_| true)
            .or_else(|_| {
                r.client
                    .offers()
                    .any(|o| o.instance_id == instance(n))
                    .then_some(vec![])
                    .ok_or(())
            })
            .expect("hot-plugged offer");
        let relid = relid_of(&r.client, n, 0);
        let mut ch = r.client.open_channel(relid, 2, 2, 0).unwrap();
        r.client.send_inband(&mut ch, 1, b"hi", true).unwrap();
        let event = r.synic.event(relid);
        loop {
            if let Some(p) = r.client.recv(&mut ch).unwrap() {
                assert_eq!(&p.payload[..2], b"hi");
                break;
            }
            assert!(wait_event(&event, Duration::from_secs(5)), "no completion");
        }
        // Hot-unplug.
        r.host.remove_device(id).unwrap();
        r.client
            .wait_for(msgtype::RESCIND_CHANNEL_OFFER, |m| {
                m.get(8..12) == Some(&relid.to_le_bytes()[..])
            })
            .unwrap();
        r.client.release_relid(relid).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for t in busy {
        let (traffic, _) = t.join().expect("guest thread");
        assert!(traffic.completed > 100, "traffic stalled: {traffic:?}");
    }
    // The removed devices are gone from the bus; the two busy ones remain.
    std::thread::sleep(Duration::from_millis(100));
    let v = r.host.inspect().unwrap();
    assert_eq!(v["devices"].as_array().unwrap().len(), 2, "{v:#}");
    r.host.stop();
}

#[test]
fn subchannels_get_their_own_workers_and_follow_modifychannel() {
    let dev = echo(2);
    let retargets = dev.retargets.clone();
    let (mut r, _) = rig(vec![dev as Arc<dyn Device>], 2);
    let primary = relid_of(&r.client, 0, 0);
    let _p = r.client.open_channel(primary, 2, 2, 0).unwrap();
    // Opening the primary made the device offer two subchannels.
    let deadline = Instant::now() + Duration::from_secs(5);
    while r
        .client
        .offers()
        .filter(|o| o.instance_id == instance(0))
        .count()
        < 3
    {
        assert!(Instant::now() < deadline, "no subchannel offers");
        r.client.drain_messages();
        std::thread::sleep(Duration::from_millis(10));
    }
    let subs: Vec<GuestChannel> = (1..=2)
        .map(|i| {
            let relid = relid_of(&r.client, 0, i);
            r.client.open_channel(relid, 2, 2, 1).unwrap()
        })
        .collect();
    let threads: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, ch)| {
            let (host, synic) = (r.host.clone(), r.synic.clone());
            std::thread::spawn(move || guest_echo(ch, host, synic, 2000, i as u64, None))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().0.completed, 2000);
    }
    let v = r.host.inspect().unwrap();
    let chans = v["devices"][0]["channels"].as_array().unwrap();
    assert_eq!(chans.len(), 3);
    assert!(
        chans
            .iter()
            .all(|c| c["open"] == true && c["worker"].is_object()),
        "{v:#}"
    );
    // MODIFYCHANNEL moves a subchannel's interrupts and tells the device.
    let sub1 = relid_of(&r.client, 0, 1);
    assert_eq!(r.client.modify_channel(sub1, 0).unwrap(), Some(0));
    assert_eq!(
        r.client.modify_channel(sub1, 7).unwrap(),
        Some(hv::STATUS_INVALID_PARAMETER as i32)
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(retargets.lock().unwrap().as_slice(), &[(1, 0)]);
    r.host.stop();
}

#[test]
fn hypercall_errors_and_a_full_guest_queue() {
    let (r, _) = rig(vec![echo(0) as Arc<dyn Device>], 1);
    use hvdef::hv::HvStatus;
    assert_eq!(r.host.signal_event(0x2777), HvStatus::INVALID_CONNECTION_ID);
    assert_eq!(
        r.host.post_message(9, 0, &[0; 16]),
        HvStatus::INVALID_CONNECTION_ID
    );
    assert_eq!(
        r.host.post_message(1, 0, &[0; 241]),
        HvStatus::INVALID_PARAMETER
    );
    // The guest stops taking messages: once its SynIC queue (64) is full, replies wait on the
    // host and new messages are refused until the guest reads again. Nothing is lost.
    let unload = MessageHeader::new(msgtype::UNLOAD);
    let mut accepted = 0;
    let mut refused = 0;
    for _ in 0..500 {
        match r.host.post_message(1, 0, unload.as_bytes()) {
            HvStatus::SUCCESS => accepted += 1,
            HvStatus::INSUFFICIENT_BUFFERS => {
                refused += 1;
                std::thread::sleep(Duration::from_micros(100));
            }
            s => panic!("{s:?}"),
        }
    }
    assert!(
        refused > 0 && accepted >= 64,
        "{accepted} accepted, {refused} refused"
    );
    let mut replies = 0;
    while let Some(m) = r.synic.next_message(Duration::from_millis(500)) {
        assert_eq!(&m[..4], &msgtype::UNLOAD_RESPONSE.to_le_bytes());
        replies += 1;
    }
    assert_eq!(replies, accepted, "every accepted UNLOAD gets its answer");
    r.host.stop();
}

/// Save a running bus, stop it, and restore it into a new host (as a worker process that
/// took over the VM would): the guest's open channel keeps working on a new worker thread.
#[test]
fn a_saved_bus_restores_into_a_new_host_with_its_channels_open() {
    let (mut r, _) = rig(vec![echo(0) as Arc<dyn Device>], 1);
    let relid = relid_of(&r.client, 0, 0);
    let ch = r.client.open_channel(relid, 4, 4, 0).unwrap();
    let (t, ch) = guest_echo(ch, r.host.clone(), r.synic.clone(), 500, 3, None);
    assert_eq!(t.completed, 500);
    let saved = r.host.save().unwrap();
    let json = serde_json::to_string(&saved).unwrap();
    r.host.stop();
    assert!(r.synic.routed().is_empty(), "a stopped host unroutes");

    let config = HostConfig {
        server: ServerConfig {
            vp_count: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let host = VmbusHost::start(config, r.mem.clone(), r.synic.clone()).unwrap();
    host.add_device(Arc::new(Renamed(echo(0), 0))).unwrap();
    host.restore(serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(host.version(), Some(hvdef::vmbus::version::WIN10_V5_3));
    assert_eq!(host.open_ports(), 1);
    assert_eq!(
        r.synic.routed(),
        vec![ch.connection_id],
        "restore routes again"
    );
    let routed = r.synic.routed_signals.load(Ordering::Relaxed);
    let (t, _ch) = guest_echo(ch, host.clone(), r.synic.clone(), 500, 4, None);
    assert_eq!(t.completed, 500);
    assert!(r.synic.routed_signals.load(Ordering::Relaxed) > routed);
    // A second restore onto a bus in use is refused.
    assert!(host.restore(serde_json::from_str(&json).unwrap()).is_err());
    host.stop();
}

/// Opening a channel routes its connection id's doorbell to the hypervisor before the guest
/// hears OPENCHANNEL_RESULT; closing, rescinding or unloading unroutes it. Signals on the route
/// reach the worker without the host's port table; the table still answers for the same id.
#[test]
fn open_channels_route_their_signals_to_the_hypervisor_and_close_unroutes() {
    let devices: Vec<Arc<dyn Device>> = (0..2).map(|_| echo(0) as Arc<dyn Device>).collect();
    let (mut r, _) = rig(devices, 1);
    assert!(r.synic.routed().is_empty());
    let relids = [relid_of(&r.client, 0, 0), relid_of(&r.client, 1, 0)];
    let a = r.client.open_channel(relids[0], 4, 4, 0).unwrap();
    // open_channel returned: OPENCHANNEL_RESULT arrived, so the route is already there.
    assert_eq!(r.synic.routed(), vec![a.connection_id]);
    let b = r.client.open_channel(relids[1], 4, 4, 0).unwrap();
    let (conn_a, conn_b) = (a.connection_id, b.connection_id);
    let mut both = vec![conn_a, conn_b];
    both.sort_unstable();
    assert_eq!(r.synic.routed(), both);

    let (t, a) = guest_echo(a, r.host.clone(), r.synic.clone(), 300, 1, None);
    assert_eq!(t.completed, 300);
    let routed = r.synic.routed_signals.load(Ordering::Relaxed);
    assert!(routed > 0, "the echo traffic signalled through the route");
    assert_eq!(
        r.host.signal_event(conn_a),
        hvdef::hv::HvStatus::SUCCESS,
        "the exit path works for a routed id"
    );

    r.client
        .post_raw(
            hv::MESSAGE_CONNECTION_ID,
            hv::RelidMessage {
                header: MessageHeader::new(msgtype::CLOSE_CHANNEL),
                child_relid: a.relid,
            }
            .as_bytes(),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.synic.routed() != vec![conn_b] {
        assert!(Instant::now() < deadline, "close did not unroute");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        r.synic.signal(&r.host, conn_a),
        hvdef::hv::HvStatus::INVALID_CONNECTION_ID,
        "a closed channel's signal reaches nothing"
    );
    r.client.unload().unwrap();
    assert!(r.synic.routed().is_empty(), "unload unroutes");
    assert_eq!(r.host.open_ports(), 0);
    let log = r.synic.route_log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            (conn_a, true),
            (conn_b, true),
            (conn_a, false),
            (conn_b, false)
        ]
    );
    r.host.stop();
}
