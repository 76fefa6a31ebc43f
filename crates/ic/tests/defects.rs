//! Regression tests of defects in the first IC implementation, each against the loopback.

mod common;

use common::*;
use hvdef::ic::{self as wire, msgtype, IcMessageHeader, IcVersion};
use ic::{Ic, IcError, IcEvent, IcKind, IcState};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmbus::ChannelError;
use zerocopy::{FromBytes, IntoBytes};

/// Fills the host-to-guest ring completely; returns the packets written.
fn fill(host: &mut vmbus::Channel) -> u64 {
    let mut n = 0;
    for len in [512, 8, 0] {
        while host.send_inband(5000 + n, &vec![0; len], false).is_ok() {
            n += 1;
        }
    }
    n
}

fn timesync() -> Ic {
    Ic::timesync(Box::new(FakeClock {
        host: 77,
        reference: Arc::default(),
    }))
}

/// The SYNC that follows negotiation cannot be sent because the ring to the guest is full.
/// `process` used to return the send error, losing the Negotiated event and leaving the
/// rest of the ring undrained.
#[test]
fn failed_sync_send_keeps_events_and_drains_the_ring() {
    let mut r = rig(&[IcKind::Timesync]);
    let mut ic = timesync();
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    let mut g = GuestUtil::new(IcKind::Timesync);
    assert_eq!(g.poll(&mut r.client, &mut gch), 1);
    // Two more guest packets behind the negotiation answer.
    let v = IcVersion::new(4, 0);
    for _ in 0..2 {
        r.client
            .send_inband(
                &mut gch,
                999,
                &response(msgtype::TIMESYNC, v, v, &[0; 22]),
                false,
            )
            .unwrap();
    }
    // Fill the ring to the guest.
    let junk = fill(&mut host);
    assert!(junk > 0);
    let ev = ic.process(&mut host, Instant::now()).unwrap();
    assert_eq!(
        ev,
        vec![IcEvent::Negotiated {
            framework: IcVersion::new(3, 0),
            message: v
        }]
    );
    assert!(!host.has_packet().unwrap(), "the ring was drained");
    assert!(matches!(ic.state(), IcState::Ready { .. }));
    assert!(!ic.time_synced());
    assert!(ic.sync_pending(), "the SYNC is still owed");
    // process_report says why.
    let rep = ic.process_report(&mut host, Instant::now()).unwrap();
    assert_eq!(rep.send_error, Some(IcError::Channel(ChannelError::Full)));
    assert!(ic.sync_pending());
    // The guest reads the junk; the next process sends the SYNC.
    let mut n = 0;
    while r.client.recv(&mut gch).unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, junk);
    let rep = ic.process_report(&mut host, Instant::now()).unwrap();
    assert_eq!(rep.send_error, None);
    assert!(ic.time_synced() && !ic.sync_pending());
    g.poll(&mut r.client, &mut gch);
    assert_eq!(g.time_samples, vec![(77, 0, wire::timesync_flags::SYNC)]);
    // And its ack is accepted.
    assert_eq!(
        ic.process(&mut host, Instant::now()).unwrap(),
        vec![IcEvent::TimesyncAck { status: 0 }]
    );
}

/// The caller's own retry (vmm's tick calls send_timesync while !time_synced) also works.
#[test]
fn owed_sync_can_be_sent_by_the_caller() {
    let mut r = rig(&[IcKind::Timesync]);
    let mut ic = timesync();
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    let mut g = GuestUtil::new(IcKind::Timesync);
    g.poll(&mut r.client, &mut gch);
    fill(&mut host);
    ic.process(&mut host, Instant::now()).unwrap();
    assert!(!ic.time_synced());
    while r.client.recv(&mut gch).unwrap().is_some() {}
    ic.send_timesync(&mut host, true).unwrap();
    assert!(ic.time_synced() && !ic.sync_pending());
}

/// Answers the heartbeat the guest received, with the pipe header changed by `f`.
fn heartbeat_answer(
    r: &mut Rig,
    gch: &mut vmbus::client::GuestChannel,
    f: impl FnOnce(&mut Vec<u8>),
) {
    let p = r.client.recv(gch).unwrap().unwrap();
    let mut buf = p.payload.clone();
    let mut m = wire::HeartbeatMessage::read_from_prefix(&buf[HDR..])
        .unwrap()
        .0;
    m.seq_num += 1;
    buf[HDR..HDR + 40].copy_from_slice(m.as_bytes());
    make_response(&mut buf, 0);
    f(&mut buf);
    r.client
        .send_inband(gch, p.transaction_id, &buf, false)
        .unwrap();
}

/// The pipe header of guest packets was never looked at.
#[test]
fn guest_pipe_header_is_checked() {
    let mut r = rig(&[IcKind::Heartbeat]);
    let mut ic = Ic::heartbeat(Duration::from_secs(10));
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    GuestUtil::new(IcKind::Heartbeat).poll(&mut r.client, &mut gch);
    let now = Instant::now();
    ic.process(&mut host, now).unwrap();
    type Mutation = fn(&mut Vec<u8>);
    let cases: [(Mutation, IcError); 4] = [
        (|b| b[0] = 2, IcError::BadPipeHeader("type is not data")),
        (
            |b| {
                let n = b.len() as u32;
                b[4..8].copy_from_slice(&n.to_le_bytes());
            },
            IcError::BadPipeHeader("size exceeds the packet"),
        ),
        (
            |b| b[4..8].copy_from_slice(&28u32.to_le_bytes()),
            IcError::BadPipeHeader("size does not match the packet"),
        ),
        (
            |b| b[4..8].copy_from_slice(&4u32.to_le_bytes()),
            IcError::BadPipeHeader("size does not match the packet"),
        ),
    ];
    for (f, err) in cases {
        ic.send_heartbeat(&mut host).unwrap();
        heartbeat_answer(&mut r, &mut gch, f);
        assert_eq!(ic.process(&mut host, now), Err(err));
        assert_eq!(ic.heartbeat_state(now), ic::HeartbeatState::NoContact);
    }
    // A well-formed answer is still accepted.
    let s = ic.send_heartbeat(&mut host).unwrap();
    heartbeat_answer(&mut r, &mut gch, |_| {});
    assert_eq!(
        ic.process(&mut host, now).unwrap(),
        vec![IcEvent::HeartbeatAck { seq: s }]
    );
}

/// A timesync "ack" with no outstanding sample, a wrong transaction, or a second ack of the
/// same sample was reported as [`IcEvent::TimesyncAck`].
#[test]
fn unsolicited_timesync_acks_are_rejected() {
    let mut r = rig(&[IcKind::Timesync]);
    let mut ic = timesync();
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    let mut g = GuestUtil::new(IcKind::Timesync);
    g.poll(&mut r.client, &mut gch);
    let now = Instant::now();
    ic.process(&mut host, now).unwrap();
    // The SYNC is answered normally.
    let p = r.client.recv(&mut gch).unwrap().unwrap();
    let mut sync_answer = p.payload.clone();
    make_response(&mut sync_answer, 0);
    r.client
        .send_inband(&mut gch, p.transaction_id, &sync_answer, false)
        .unwrap();
    assert_eq!(
        ic.process(&mut host, now).unwrap(),
        vec![IcEvent::TimesyncAck { status: 0 }]
    );
    // The same ack again: nothing is outstanding.
    r.client
        .send_inband(&mut gch, p.transaction_id, &sync_answer, false)
        .unwrap();
    assert_eq!(
        ic.process(&mut host, now),
        Err(IcError::UnexpectedTransaction(p.transaction_id))
    );
    // A sample is outstanding; an ack of another transaction is refused, and one with the
    // right packet transaction but a different IC transaction byte too.
    ic.send_timesync(&mut host, false).unwrap();
    let p = r.client.recv(&mut gch).unwrap().unwrap();
    let mut answer = p.payload.clone();
    make_response(&mut answer, 0);
    r.client
        .send_inband(&mut gch, p.transaction_id + 7, &answer, false)
        .unwrap();
    assert_eq!(
        ic.process(&mut host, now),
        Err(IcError::UnexpectedTransaction(p.transaction_id + 7))
    );
    let mut forged = answer.clone();
    let mut hdr = IcMessageHeader::read_from_prefix(&forged[8..]).unwrap().0;
    hdr.transaction_id = hdr.transaction_id.wrapping_add(1);
    forged[8..HDR].copy_from_slice(hdr.as_bytes());
    r.client
        .send_inband(&mut gch, p.transaction_id, &forged, false)
        .unwrap();
    assert_eq!(
        ic.process(&mut host, now),
        Err(IcError::UnexpectedTransaction(p.transaction_id))
    );
    // The real ack still counts.
    r.client
        .send_inband(&mut gch, p.transaction_id, &answer, false)
        .unwrap();
    assert_eq!(
        ic.process(&mut host, now).unwrap(),
        vec![IcEvent::TimesyncAck { status: 0 }]
    );
}

/// Shutdown answers must carry the request's transaction.
#[test]
fn shutdown_answer_of_another_transaction_is_rejected() {
    let mut r = rig(&[IcKind::Shutdown]);
    let mut ic = Ic::shutdown();
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    GuestUtil::new(IcKind::Shutdown).poll(&mut r.client, &mut gch);
    let now = Instant::now();
    ic.process(&mut host, now).unwrap();
    ic.request_shutdown(&mut host, ic::ShutdownKind::PowerOff, false, "")
        .unwrap();
    let p = r.client.recv(&mut gch).unwrap().unwrap();
    let mut answer = p.payload.clone();
    make_response(&mut answer, 0);
    r.client
        .send_inband(&mut gch, p.transaction_id + 1, &answer, false)
        .unwrap();
    assert_eq!(
        ic.process(&mut host, now),
        Err(IcError::UnexpectedTransaction(p.transaction_id + 1))
    );
    assert!(ic.shutdown_pending());
    r.client
        .send_inband(&mut gch, p.transaction_id, &answer, false)
        .unwrap();
    assert_eq!(
        ic.process(&mut host, now).unwrap(),
        vec![IcEvent::ShutdownResponse { status: 0 }]
    );
    assert!(!ic.shutdown_pending());
}

/// A negotiation answer naming more than one version each (or answering a NEGOTIATE that
/// was never sent) is refused.
#[test]
fn bad_negotiation_answers_are_refused() {
    let mut r = rig(&[IcKind::Heartbeat]);
    let mut ic = Ic::heartbeat(Duration::from_secs(1));
    let (mut gch, mut host) = open(&mut r, 0, &mut ic);
    let p = r.client.recv(&mut gch).unwrap().unwrap();
    let mut buf = p.payload.clone();
    let (fw, msg) = linux_versions(IcKind::Heartbeat);
    negotiate_in_place(&mut buf, &fw, &msg).unwrap();
    let mut two = buf.clone();
    two[HDR..HDR + 2].copy_from_slice(&2u16.to_le_bytes());
    r.client
        .send_inband(&mut gch, p.transaction_id, &two, false)
        .unwrap();
    assert!(matches!(
        ic.process(&mut host, Instant::now()),
        Err(IcError::Malformed(_))
    ));
    r.client
        .send_inband(&mut gch, p.transaction_id + 3, &buf, false)
        .unwrap();
    assert_eq!(
        ic.process(&mut host, Instant::now()),
        Err(IcError::UnexpectedTransaction(p.transaction_id + 3))
    );
    assert_eq!(ic.state(), IcState::Negotiating);
    r.client
        .send_inband(&mut gch, p.transaction_id, &buf, false)
        .unwrap();
    assert!(matches!(
        ic.process(&mut host, Instant::now()).unwrap()[..],
        [IcEvent::Negotiated { .. }]
    ));
}
