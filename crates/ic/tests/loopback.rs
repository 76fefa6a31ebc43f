//! The ICs against a guest that answers the way Linux's hv_utils does, over the VMBus
//! loopback (guest client, server, rings in guest memory). No CPU.

mod common;

use common::*;
use hvdef::ic::{self as wire, msgtype, IcVersion, NegotiateHeader};
use hvdef::vmbus::{guid, Guid};
use ic::{
    HeartbeatState, Ic, IcError, IcEvent, IcKind, IcState, OutstandingHeartbeat, SavedNegotiation,
    SavedService, SavedVersion, ShutdownKind, TimeSource,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zerocopy::IntoBytes;

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
    assert_eq!(e, IcError::BadPipeHeader("type is not data"));
    assert_eq!(ic.state(), IcState::Negotiating);
    // The real answer still works, and a response with a wrong sequence is dropped.
    let mut g = GuestUtil::new(IcKind::Heartbeat);
    g.poll(c, &mut gch);
    ic.process(&mut host, now).unwrap();
    let s = ic.send_heartbeat(&mut host).unwrap();
    let sent = c.recv(&mut gch).unwrap().unwrap();
    let hb = wire::HeartbeatMessage {
        seq_num: s + 5,
        ..Default::default()
    };
    let mut bad = response(msgtype::HEARTBEAT, v, v, hb.as_bytes());
    bad[8 + 16] = sent.transaction_id as u8;
    c.send_inband(&mut gch, sent.transaction_id, &bad, false)
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
    bad.negotiation = SavedNegotiation::Ready {
        framework: SavedVersion { major: 3, minor: 0 },
        message: SavedVersion { major: 9, minor: 9 },
    };
    assert_eq!(
        Ic::heartbeat(Duration::from_secs(1)).restore(&bad),
        Err(IcError::BadSavedState("version was never offered"))
    );
    // An outstanding heartbeat whose transaction was never issued.
    let mut bad = saved.clone();
    bad.service = SavedService::Heartbeat {
        seq: s1,
        outstanding: Some(OutstandingHeartbeat {
            transaction: 1000,
            seq: s1,
        }),
    };
    let mut fresh = Ic::heartbeat(Duration::from_secs(1));
    assert!(fresh.restore(&bad).is_err());
    assert_eq!(
        fresh.state(),
        IcState::Closed,
        "a refused restore changes nothing"
    );
    let mut bad = saved.clone();
    bad.version = 1;
    assert_eq!(
        Ic::heartbeat(Duration::from_secs(1)).restore(&bad),
        Err(IcError::BadSavedState("unknown version"))
    );
}
