//! The ICs against a guest that answers the way Linux's hv_utils does, over the VMBus
//! loopback (guest client, server, rings in guest memory). No CPU.

use guestmem::GuestMemory;
use hvdef::ic::{self as wire, flags, msgtype, IcMessageHeader, IcVersion, NegotiateHeader};
use hvdef::vmbus::{guid, Guid};
use ic::{HeartbeatState, Ic, IcError, IcEvent, IcKind, IcState, ShutdownKind, TimeSource};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmbus::client::{Client, GuestChannel, LINUX_VERSIONS};
use vmbus::loopback::Loopback;
use vmbus::{Channel, Server, ServerConfig};
use zerocopy::{FromBytes, IntoBytes};

const MEM: u64 = 8 << 20;
const HDR: usize = wire::IC_BODY_OFFSET;

/// What Linux's util drivers support.
fn linux_versions(kind: IcKind) -> (Vec<IcVersion>, Vec<IcVersion>) {
    let fw = vec![IcVersion::new(3, 0), IcVersion::new(1, 0)];
    let msg = match kind {
        IcKind::Shutdown => vec![
            IcVersion::new(3, 2),
            IcVersion::new(3, 1),
            IcVersion::new(3, 0),
            IcVersion::new(1, 0),
        ],
        IcKind::Timesync => vec![
            IcVersion::new(4, 0),
            IcVersion::new(3, 0),
            IcVersion::new(1, 0),
        ],
        IcKind::Heartbeat => vec![IcVersion::new(3, 0), IcVersion::new(1, 0)],
    };
    (fw, msg)
}

/// A guest util driver: answers in place like vmbus_prep_negotiate_resp and the
/// shutdown/heartbeat/timesync callbacks.
struct GuestUtil {
    kind: IcKind,
    fw: Vec<IcVersion>,
    msg: Vec<IcVersion>,
    negotiated: Option<(IcVersion, IcVersion)>,
    shutdown_flags: Vec<u32>,
    time_samples: Vec<(u64, u64, u8)>,
    heartbeats: Vec<u64>,
}

impl GuestUtil {
    fn new(kind: IcKind) -> Self {
        let (fw, msg) = linux_versions(kind);
        Self {
            kind,
            fw,
            msg,
            negotiated: None,
            shutdown_flags: Vec::new(),
            time_samples: Vec::new(),
            heartbeats: Vec::new(),
        }
    }

    /// Handles every packet waiting; answers each.
    fn poll(&mut self, c: &mut Client<Loopback>, ch: &mut GuestChannel) -> usize {
        let mut n = 0;
        while let Some(p) = c.recv(ch).unwrap() {
            n += 1;
            let mut buf = p.payload.clone();
            assert!(buf.len() <= 4096, "Linux's util buffer is one page");
            assert!(buf.len() >= HDR);
            let mut hdr = IcMessageHeader::read_from_prefix(&buf[8..]).unwrap().0;
            match hdr.msgtype {
                msgtype::NEGOTIATE => {
                    hdr.msgsize = 0x10;
                    let neg = NegotiateHeader::read_from_prefix(&buf[HDR..]).unwrap().0;
                    let (fc, mc) = (neg.framework_count as usize, neg.message_count as usize);
                    assert!(HDR + 8 + 4 * (fc + mc) <= buf.len());
                    let list: Vec<IcVersion> = (0..fc + mc)
                        .map(|i| {
                            IcVersion::read_from_prefix(&buf[HDR + 8 + 4 * i..])
                                .unwrap()
                                .0
                        })
                        .collect();
                    let fw = self.fw.iter().find(|v| list[..fc].contains(v)).copied();
                    let msg = self.msg.iter().find(|v| list[fc..].contains(v)).copied();
                    let found = fw.zip(msg);
                    let (cnt, f, m) = match found {
                        Some((f, m)) => (1u16, f, m),
                        None => (0, IcVersion::default(), IcVersion::default()),
                    };
                    self.negotiated = found;
                    buf[HDR..HDR + 2].copy_from_slice(&cnt.to_le_bytes());
                    buf[HDR + 2..HDR + 4].copy_from_slice(&cnt.to_le_bytes());
                    buf[HDR + 8..HDR + 12].copy_from_slice(f.as_bytes());
                    buf[HDR + 12..HDR + 16].copy_from_slice(m.as_bytes());
                }
                msgtype::SHUTDOWN => {
                    assert!(
                        buf.len() >= HDR + 2060,
                        "Linux rejects short shutdown messages"
                    );
                    let m = wire::ShutdownMessage::read_from_prefix(&buf[HDR..])
                        .unwrap()
                        .0;
                    self.shutdown_flags.push(m.flags);
                    hdr.status = if m.flags <= 3 { 0 } else { wire::STATUS_FAIL };
                }
                msgtype::HEARTBEAT => {
                    let mut m = wire::HeartbeatMessage::read_from_prefix(&buf[HDR..])
                        .unwrap()
                        .0;
                    self.heartbeats.push(m.seq_num);
                    m.seq_num += 1;
                    buf[HDR..HDR + 40].copy_from_slice(m.as_bytes());
                }
                msgtype::TIMESYNC => {
                    let (_, v) = self.negotiated.unwrap();
                    if v.major >= 4 {
                        let m = wire::TimesyncRefMessage::read_from_prefix(&buf[HDR..])
                            .unwrap()
                            .0;
                        self.time_samples
                            .push((m.parent_time, m.vm_reference_time, m.flags));
                    } else {
                        let m = wire::TimesyncMessage::read_from_prefix(&buf[HDR..])
                            .unwrap()
                            .0;
                        self.time_samples.push((m.parent_time, 0, m.flags));
                    }
                }
                t => panic!("unexpected message type {t} for {:?}", self.kind),
            }
            hdr.flags = flags::TRANSACTION | flags::RESPONSE;
            buf[8..HDR].copy_from_slice(hdr.as_bytes());
            c.send_inband(ch, p.transaction_id, &buf, false).unwrap();
        }
        n
    }
}

struct Rig {
    client: Client<Loopback>,
    relids: Vec<u32>,
}

fn rig(kinds: &[IcKind]) -> Rig {
    let mem = GuestMemory::new(&[(0, MEM)]).unwrap();
    let mut server = Server::new(ServerConfig::default());
    let relids = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            server
                .add_offer(k.offer(Guid::from_u128(0xabc0 + i as u128)))
                .unwrap()
        })
        .collect();
    let mut client = Client::new(
        Loopback::new(server, mem.clone()),
        mem,
        1 << 20,
        MEM - (1 << 20),
    );
    client.connect(&LINUX_VERSIONS).unwrap();
    client.request_offers().unwrap();
    Rig { client, relids }
}

/// Opens the IC's channel like hv_utils (16 KiB rings... 4 pages each) and starts the IC.
fn open(r: &mut Rig, i: usize, ic: &mut Ic) -> (GuestChannel, Channel) {
    let relid = r.relids[i];
    let ch = r.client.open_channel(relid, 4, 4, 0).unwrap();
    let mut host = r
        .client
        .transport_mut()
        .host_channels
        .remove(&relid)
        .unwrap();
    ic.open(&mut host).unwrap();
    (ch, host)
}

struct FakeClock {
    host: u64,
    reference: Arc<AtomicU64>,
}

impl TimeSource for FakeClock {
    fn host_time_100ns(&self) -> u64 {
        self.host
    }
    fn guest_reference_time(&self) -> u64 {
        self.reference.load(Ordering::Relaxed)
    }
}

#[test]
fn offers_carry_the_ic_guids() {
    let r = rig(&[IcKind::Shutdown, IcKind::Heartbeat, IcKind::Timesync]);
    let offers: Vec<Guid> = r.client.offers().map(|o| o.interface_type).collect();
    assert_eq!(
        offers,
        vec![guid::SHUTDOWN_IC, guid::HEARTBEAT_IC, guid::TIMESYNC_IC]
    );
    assert_eq!(
        guid::SHUTDOWN_IC.to_string(),
        "0e0b6031-5213-4934-818b-38d90ced39db"
    );
    assert_eq!(
        guid::TIMESYNC_IC.to_string(),
        "9527e630-d0ae-497b-adce-e80ab0175caf"
    );
    assert_eq!(
        guid::HEARTBEAT_IC.to_string(),
        "57164f39-9115-4e78-ab55-382f3bd5422d"
    );
}

#[test]
fn shutdown_negotiates_and_requests_power_off_and_reboot() {
    let mut r = rig(&[IcKind::Shutdown]);
    let mut ic = Ic::shutdown();
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    assert_eq!(ic.state(), IcState::Negotiating);
    // Not ready yet.
    assert_eq!(
        ic.request_shutdown(&mut host, ShutdownKind::PowerOff, false, "x"),
        Err(IcError::NotReady)
    );
    let mut g = GuestUtil::new(IcKind::Shutdown);
    assert_eq!(g.poll(&mut r.client, &mut gch), 1);
    let now = Instant::now();
    let ev = ic.process(&mut host, now).unwrap();
    let expected = IcEvent::Negotiated {
        framework: IcVersion::new(3, 0),
        message: IcVersion::new(3, 2),
    };
    assert_eq!(ev, vec![expected]);
    assert!(matches!(ic.state(), IcState::Ready { .. }));

    ic.request_shutdown(&mut host, ShutdownKind::PowerOff, false, "host says stop")
        .unwrap();
    assert_eq!(
        ic.request_shutdown(&mut host, ShutdownKind::PowerOff, false, ""),
        Err(IcError::Busy)
    );
    g.poll(&mut r.client, &mut gch);
    assert_eq!(
        ic.process(&mut host, now).unwrap(),
        vec![IcEvent::ShutdownResponse { status: 0 }]
    );
    ic.request_shutdown(&mut host, ShutdownKind::Reboot, true, "")
        .unwrap();
    g.poll(&mut r.client, &mut gch);
    ic.process(&mut host, now).unwrap();
    ic.request_shutdown(&mut host, ShutdownKind::Hibernate, false, "")
        .unwrap();
    g.poll(&mut r.client, &mut gch);
    assert_eq!(
        ic.process(&mut host, now).unwrap(),
        vec![IcEvent::ShutdownResponse {
            status: wire::STATUS_FAIL
        }]
    );
    assert_eq!(g.shutdown_flags, vec![0, 3, 4]);
    // Signalling happened both ways.
    assert!(!r.client.transport().doorbells.is_empty());
    assert!(!r.client.transport().interrupts.lock().unwrap().is_empty());
}

#[test]
fn heartbeat_tracks_contact() {
    let mut r = rig(&[IcKind::Heartbeat]);
    let mut ic = Ic::heartbeat(Duration::from_secs(10));
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    let mut g = GuestUtil::new(IcKind::Heartbeat);
    let t0 = Instant::now();
    assert_eq!(ic.heartbeat_state(t0), HeartbeatState::NoContact);
    g.poll(&mut r.client, &mut gch);
    ic.process(&mut host, t0).unwrap();
    let s1 = ic.send_heartbeat(&mut host).unwrap();
    g.poll(&mut r.client, &mut gch);
    assert_eq!(
        ic.process(&mut host, t0).unwrap(),
        vec![IcEvent::HeartbeatAck { seq: s1 }]
    );
    assert_eq!(
        ic.heartbeat_state(t0 + Duration::from_secs(5)),
        HeartbeatState::Healthy
    );
    // The guest stops answering.
    let s2 = ic.send_heartbeat(&mut host).unwrap();
    assert!(s2 > s1);
    assert!(ic.process(&mut host, t0).unwrap().is_empty());
    assert_eq!(
        ic.heartbeat_state(t0 + Duration::from_secs(11)),
        HeartbeatState::Lost
    );
    // It comes back.
    g.poll(&mut r.client, &mut gch);
    ic.process(&mut host, t0 + Duration::from_secs(12)).unwrap();
    assert_eq!(
        ic.heartbeat_state(t0 + Duration::from_secs(13)),
        HeartbeatState::Healthy
    );
    assert_eq!(g.heartbeats, vec![s1, s2]);
}

#[test]
fn timesync_sends_sync_then_samples_with_reference_time() {
    let mut r = rig(&[IcKind::Timesync]);
    let reference = Arc::new(AtomicU64::new(12345));
    let host_time = wire::EPOCH_DELTA_100NS + 1_700_000_000 * 10_000_000;
    let mut ic = Ic::timesync(Box::new(FakeClock {
        host: host_time,
        reference: reference.clone(),
    }));
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    let mut g = GuestUtil::new(IcKind::Timesync);
    g.poll(&mut r.client, &mut gch);
    let ev = ic.process(&mut host, Instant::now()).unwrap();
    assert_eq!(
        ev,
        vec![IcEvent::Negotiated {
            framework: IcVersion::new(3, 0),
            message: IcVersion::new(4, 0)
        }]
    );
    assert!(ic.time_synced());
    reference.store(99999, Ordering::Relaxed);
    ic.send_timesync(&mut host, false).unwrap();
    g.poll(&mut r.client, &mut gch);
    assert_eq!(
        g.time_samples,
        vec![
            (host_time, 12345, wire::timesync_flags::SYNC),
            (host_time, 99999, wire::timesync_flags::SAMPLE)
        ]
    );
    let acks = ic.process(&mut host, Instant::now()).unwrap();
    assert_eq!(acks.len(), 2);
}

#[test]
fn timesync_v3_guest_gets_the_old_layout() {
    let mut r = rig(&[IcKind::Timesync]);
    let mut ic = Ic::timesync(Box::new(FakeClock {
        host: 42,
        reference: Arc::default(),
    }));
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    let mut g = GuestUtil::new(IcKind::Timesync);
    g.msg = vec![IcVersion::new(3, 0)];
    g.poll(&mut r.client, &mut gch);
    ic.process(&mut host, Instant::now()).unwrap();
    g.poll(&mut r.client, &mut gch);
    assert_eq!(g.time_samples, vec![(42, 0, wire::timesync_flags::SYNC)]);
}

#[test]
fn system_time_source_is_since_1601() {
    let s = ic::SystemTimeSource(|| 7);
    let t = s.host_time_100ns();
    // After 2020-01-01 and before 2200.
    assert!(t > wire::EPOCH_DELTA_100NS + 1_577_836_800 * 10_000_000);
    assert!(t < wire::EPOCH_DELTA_100NS + 7_258_118_400 * 10_000_000);
    assert_eq!(s.guest_reference_time(), 7);
}

#[test]
fn all_three_ics_on_one_bus_and_fallback_to_framework_1() {
    let mut r = rig(&[IcKind::Shutdown, IcKind::Heartbeat, IcKind::Timesync]);
    let mut ics = [
        Ic::shutdown(),
        Ic::heartbeat(Duration::from_secs(5)),
        Ic::timesync(Box::new(FakeClock {
            host: 1,
            reference: Arc::default(),
        })),
    ];
    let mut chans = Vec::new();
    for (i, ic) in ics.iter_mut().enumerate() {
        chans.push(open(&mut r, i, ic));
    }
    for (i, (gch, host)) in chans.iter_mut().enumerate() {
        let mut g = GuestUtil::new(ics[i].kind());
        g.fw = vec![IcVersion::new(1, 0)];
        g.poll(&mut r.client, gch);
        let ev = ics[i].process(host, Instant::now()).unwrap();
        assert!(matches!(
            ev[0],
            IcEvent::Negotiated { framework, .. } if framework == IcVersion::new(1, 0)
        ));
    }
}

#[test]
fn no_common_version() {
    let mut r = rig(&[IcKind::Heartbeat]);
    let mut ic = Ic::heartbeat(Duration::from_secs(1));
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    let mut g = GuestUtil::new(IcKind::Heartbeat);
    g.msg = vec![IcVersion::new(9, 9)];
    g.poll(&mut r.client, &mut gch);
    assert_eq!(
        ic.process(&mut host, Instant::now()).unwrap(),
        vec![IcEvent::NegotiationFailed]
    );
    assert_eq!(ic.state(), IcState::NoCommonVersion);
    assert_eq!(ic.send_heartbeat(&mut host), Err(IcError::NotReady));
}

fn response(ty: u16, fw: IcVersion, msg: IcVersion, body: &[u8]) -> Vec<u8> {
    let hdr = IcMessageHeader {
        framework_version: fw,
        msgtype: ty,
        message_version: msg,
        msgsize: body.len() as u16,
        status: 0,
        transaction_id: 0,
        flags: flags::TRANSACTION | flags::RESPONSE,
        reserved: [0; 2],
    };
    let mut v = wire::PipeHeader {
        pipe_type: 1,
        size: (20 + body.len()) as u32,
    }
    .as_bytes()
    .to_vec();
    v.extend_from_slice(hdr.as_bytes());
    v.extend_from_slice(body);
    v
}

#[test]
fn hostile_guest_answers_are_dropped() {
    let mut r = rig(&[IcKind::Heartbeat]);
    let mut ic = Ic::heartbeat(Duration::from_secs(1));
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    let now = Instant::now();
    let v = IcVersion::new(3, 0);
    let c = &mut r.client;
    // Short packets, a request instead of a response, a version never offered, unknown type.
    c.send_inband(&mut gch, 1, &[1, 2, 3], false).unwrap();
    c.send_inband(&mut gch, 1, &[0; 30], false).unwrap();
    let mut neg = NegotiateHeader {
        framework_count: 1,
        message_count: 1,
        reserved: 0,
    }
    .as_bytes()
    .to_vec();
    neg.extend_from_slice(IcVersion::new(3, 0).as_bytes());
    neg.extend_from_slice(IcVersion::new(7, 7).as_bytes());
    c.send_inband(
        &mut gch,
        1,
        &response(msgtype::NEGOTIATE, v, v, &neg),
        false,
    )
    .unwrap();
    c.send_inband(
        &mut gch,
        1,
        &response(msgtype::NEGOTIATE, v, v, &neg[..10]),
        false,
    )
    .unwrap();
    c.send_inband(&mut gch, 1, &response(77, v, v, &[]), false)
        .unwrap();
    // A heartbeat answer before negotiation.
    c.send_inband(
        &mut gch,
        1,
        &response(msgtype::HEARTBEAT, v, v, &[0; 40]),
        false,
    )
    .unwrap();
    let e = ic.process(&mut host, now).unwrap_err();
    assert_eq!(e, IcError::Malformed("short"));
    assert_eq!(ic.state(), IcState::Negotiating);
    // The real answer still works, and a response with a wrong sequence is dropped.
    let mut g = GuestUtil::new(IcKind::Heartbeat);
    g.poll(c, &mut gch);
    ic.process(&mut host, now).unwrap();
    let s = ic.send_heartbeat(&mut host).unwrap();
    let hb = wire::HeartbeatMessage {
        seq_num: s + 5,
        ..Default::default()
    };
    c.send_inband(
        &mut gch,
        1,
        &response(msgtype::HEARTBEAT, v, v, hb.as_bytes()),
        false,
    )
    .unwrap();
    assert_eq!(
        ic.process(&mut host, now),
        Err(IcError::Malformed("heartbeat sequence mismatch"))
    );
    assert_eq!(ic.heartbeat_state(now), HeartbeatState::NoContact);
    // Ring corruption surfaces as a broken channel.
    let pfns = c.transport().server.gpadl_ranges(gch.ring_gpadl).unwrap()[0]
        .pfns
        .clone();
    c.memory()
        .store_u32(pfns[0] * 4096, 3, Ordering::SeqCst)
        .unwrap();
    assert!(matches!(
        ic.process(&mut host, now),
        Err(IcError::Channel(vmbus::ChannelError::Broken(_)))
    ));
}

#[test]
fn reopen_renegotiates() {
    let mut r = rig(&[IcKind::Shutdown]);
    let mut ic = Ic::shutdown();
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    let mut g = GuestUtil::new(IcKind::Shutdown);
    g.poll(&mut r.client, &mut gch);
    ic.process(&mut host, Instant::now()).unwrap();
    ic.close();
    r.client
        .transport_mut()
        .host_channels
        .insert(r.relids[0], host);
    r.client.close_channel(gch).unwrap();
    assert_eq!(ic.state(), IcState::Closed);
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    g.poll(&mut r.client, &mut gch);
    assert_eq!(ic.process(&mut host, Instant::now()).unwrap().len(), 1);
    assert!(matches!(ic.state(), IcState::Ready { .. }));
}

#[test]
fn save_restore_round_trips() {
    let mut r = rig(&[IcKind::Heartbeat]);
    let mut ic = Ic::heartbeat(Duration::from_secs(10));
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    let mut g = GuestUtil::new(IcKind::Heartbeat);
    g.poll(&mut r.client, &mut gch);
    ic.process(&mut host, Instant::now()).unwrap();
    let s1 = ic.send_heartbeat(&mut host).unwrap();
    let saved = ic.save();
    let json = serde_json::to_string(&saved).unwrap();
    let mut ic2 = Ic::heartbeat(Duration::from_secs(10));
    ic2.restore(&serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(ic2.save(), saved);
    assert_eq!(ic2.state(), ic.state());
    // The restored service accepts the answer to the heartbeat sent before the save.
    g.poll(&mut r.client, &mut gch);
    let now = Instant::now();
    assert_eq!(
        ic2.process(&mut host, now).unwrap(),
        vec![IcEvent::HeartbeatAck { seq: s1 }]
    );
    assert_eq!(ic2.heartbeat_state(now), HeartbeatState::Healthy);
    // Wrong service or bad versions are refused.
    assert_eq!(Ic::shutdown().restore(&saved), Err(IcError::WrongService));
    let mut bad = saved.clone();
    bad.message = Some((9, 9));
    assert!(Ic::heartbeat(Duration::from_secs(1)).restore(&bad).is_err());
}
