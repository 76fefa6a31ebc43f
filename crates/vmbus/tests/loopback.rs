//! Loopback tests: the guest-side client against the server, no CPU.

use guestmem::GuestMemory;
use hvdef::vmbus::{self as hv, guid, msgtype, version, Guid, MessageHeader};
use std::sync::atomic::Ordering;
use vmbus::client::{Client, ClientError, LINUX_VERSIONS};
use vmbus::loopback::Loopback;
use vmbus::server::{ChannelState, ConnectionState, GpadlState, ProtocolError};
use vmbus::{ChannelError, OfferParams, Server, ServerConfig};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

const MEM: u64 = 16 << 20;
const INSTANCE: Guid = Guid::from_u128(0x11111111_2222_3333_4444_555555555555);

fn setup_with(config: ServerConfig, offers: &[Guid]) -> Client<Loopback> {
    let mem = GuestMemory::new(&[(0, MEM)]).unwrap();
    let mut server = Server::new(config);
    for (i, g) in offers.iter().enumerate() {
        let mut inst = INSTANCE;
        inst.data1 = i as u32;
        server.add_offer(OfferParams::new(*g, inst)).unwrap();
    }
    Client::new(
        Loopback::new(server, mem.clone()),
        mem,
        1 << 20,
        MEM - (1 << 20),
    )
}

fn setup(offers: &[Guid]) -> Client<Loopback> {
    setup_with(ServerConfig::default(), offers)
}

fn connected(offers: &[Guid]) -> Client<Loopback> {
    let mut c = setup(offers);
    c.connect(&LINUX_VERSIONS).unwrap();
    c.request_offers().unwrap();
    c
}

fn errors(c: &mut Client<Loopback>) -> Vec<ProtocolError> {
    std::mem::take(&mut c.transport_mut().protocol_errors)
}

#[test]
fn negotiates_newest_supported_version_and_declines_6_0() {
    let mut c = setup(&[]);
    assert!(!c.initiate_contact(version::V6_0).unwrap());
    assert_eq!(
        c.transport().server.connection(),
        &ConnectionState::Disconnected
    );
    assert!(c.initiate_contact(version::WIN10_V5_3).unwrap());
    assert_eq!(c.transport().server.version(), Some(version::WIN10_V5_3));

    let config = ServerConfig {
        max_version: version::WIN10_V5_2,
        ..Default::default()
    };
    let mut c = setup_with(config, &[]);
    assert_eq!(c.connect(&LINUX_VERSIONS).unwrap(), version::WIN10_V5_2);
}

#[test]
fn never_accepts_versions_below_win8() {
    let mut c = setup(&[]);
    assert_eq!(
        c.connect(&[version::WIN7, version::WS2008, 0x12345]),
        Err(ClientError::Declined)
    );
    // An old version on connection 1 is still accepted when supported.
    assert_eq!(c.connect(&[version::WIN8]).unwrap(), version::WIN8);
    // Replies go to the SINT2 slot of the requested VP.
    c.transport_mut().server.take_actions();
}

#[test]
fn offers_then_all_offers_delivered_and_hot_add() {
    let mut c = setup(&[guid::SHUTDOWN_IC, guid::HEARTBEAT_IC]);
    c.connect(&LINUX_VERSIONS).unwrap();
    let offers = c.request_offers().unwrap();
    assert_eq!(offers.len(), 2);
    assert_eq!(offers[0].interface_type, guid::SHUTDOWN_IC);
    assert_eq!(offers[1].interface_type, guid::HEARTBEAT_IC);
    assert_ne!(offers[0].instance_id, offers[1].instance_id);
    assert_eq!(offers[0].relid, 1);
    assert_eq!(offers[1].relid, 2);
    assert!(offers
        .iter()
        .all(|o| o.is_dedicated_interrupt && !o.monitor_allocated));
    assert_ne!(offers[0].connection_id, offers[1].connection_id);
    // A second REQUESTOFFERS is refused.
    c.post_raw(1, MessageHeader::new(msgtype::REQUEST_OFFERS).as_bytes())
        .unwrap();
    assert_eq!(errors(&mut c), vec![ProtocolError::OffersAlreadyRequested]);
    // Hot add: the offer goes out at once.
    let relid = c
        .transport_mut()
        .server
        .add_offer(OfferParams::new(guid::TIMESYNC_IC, INSTANCE))
        .unwrap();
    c.drain_messages();
    assert_eq!(c.find_offer(guid::TIMESYNC_IC).unwrap().relid, relid);
    // Offer wire layout.
    let m = &c.transport().server.version();
    assert!(m.is_some());
}

#[test]
fn offer_message_has_the_linux_layout() {
    let mut server = Server::new(ServerConfig::default());
    server
        .add_offer(OfferParams::new(guid::SCSI, INSTANCE))
        .unwrap();
    let mut ic = hv::InitiateContact::new_zeroed();
    ic.header = MessageHeader::new(msgtype::INITIATE_CONTACT);
    ic.version_requested = version::WIN10_V5_2;
    ic.interrupt_page_or_sint = 2;
    server.post_message(4, 0, ic.as_bytes()).unwrap().unwrap();
    server
        .post_message(1, 0, MessageHeader::new(msgtype::REQUEST_OFFERS).as_bytes())
        .unwrap()
        .unwrap();
    let actions = server.take_actions();
    let msgs: Vec<_> = actions
        .iter()
        .map(|a| match a {
            vmbus::Action::SendMessage { vp, sint, message } => {
                assert_eq!((*vp, *sint), (0, 2));
                message.as_bytes().to_vec()
            }
            a => panic!("unexpected {a:?}"),
        })
        .collect();
    assert_eq!(msgs.len(), 3);
    let vr = hv::VersionResponse::read_from_bytes(&msgs[0]).unwrap();
    assert_eq!((vr.version_supported, vr.connection_state), (1, 0));
    assert_eq!({ vr.msg_conn_id }, 1);
    assert_eq!(msgs[1].len(), 196);
    assert_eq!(&msgs[1][8..24], guid::SCSI.as_bytes());
    // ba6163d9-04a1-4d29-b605-72e2ffb1dc7f in Windows byte order.
    assert_eq!(&msgs[1][8..12], &[0xd9, 0x63, 0x61, 0xba]);
    assert_eq!(&msgs[1][16..18], &[0xb6, 0x05]);
    assert_eq!(u32::from_le_bytes(msgs[1][184..188].try_into().unwrap()), 1);
    assert_eq!(msgs[1][188], 0xff);
    assert_eq!(msgs[1][190], 1);
    assert_eq!(
        msgs[2],
        MessageHeader::new(msgtype::ALL_OFFERS_DELIVERED).as_bytes()
    );
}

#[test]
fn gpadl_with_many_bodies_is_reassembled() {
    let mut c = connected(&[guid::NETWORK]);
    let pfns = c.alloc_pages(200).unwrap();
    let id = c.create_gpadl(1, &pfns).unwrap();
    let r = c.transport().server.gpadl_ranges(id).unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].pfns, pfns);
    assert_eq!(r[0].byte_count, 200 * 4096);
    c.teardown_gpadl(1, id).unwrap();
    assert!(c.transport().server.gpadl_state(id).is_none());
}

#[test]
fn open_exchange_packets_with_signalling_and_close() {
    let mut c = connected(&[guid::SHUTDOWN_IC]);
    let mut ch = c.open_channel(1, 3, 3, 0).unwrap();
    assert!(matches!(
        c.transport().server.channel_state(1),
        Some(ChannelState::Open { .. })
    ));
    let mut host = c.transport_mut().host_channels.remove(&1).unwrap();

    // Guest -> host: the first packet into an empty ring rings the doorbell, the second not.
    c.send_inband(&mut ch, 7, b"hello host", true).unwrap();
    c.send_inband(&mut ch, 8, &[0xab; 100], false).unwrap();
    assert_eq!(c.transport().doorbells, vec![1]);
    let mut buf = Vec::new();
    let p = host.try_recv(&mut buf).unwrap().unwrap();
    assert_eq!(p.packet_type(), hv::packet_type::DATA_INBAND);
    assert_eq!(p.transaction_id(), 7);
    assert!(p.completion_requested());
    assert_eq!(&p.payload()[..10], b"hello host");
    let p = host.try_recv(&mut buf).unwrap().unwrap();
    assert_eq!((p.transaction_id(), p.payload().len()), (8, 104));
    assert!(host.try_recv(&mut buf).unwrap().is_none());

    // Host -> guest: interrupt goes to the target VP with the relid.
    host.send_completion(7, b"done").unwrap();
    host.send_completion(8, b"done too").unwrap();
    assert_eq!(*c.transport().interrupts.lock().unwrap(), vec![(0, 1)]);
    let p = c.recv(&mut ch).unwrap().unwrap();
    assert_eq!(p.packet_type, hv::packet_type::COMPLETION);
    assert_eq!(p.transaction_id, 7);
    assert_eq!(&p.payload[..4], b"done");
    assert_eq!(c.recv(&mut ch).unwrap().unwrap().transaction_id, 8);
    assert!(c.recv(&mut ch).unwrap().is_none());

    // Guest masks interrupts: host sends without signalling.
    ch.channel.set_interrupt_mask(true).unwrap();
    host.send_inband(1, b"x", false).unwrap();
    assert_eq!(c.transport().interrupts.lock().unwrap().len(), 1);

    c.transport_mut().host_channels.insert(1, host);
    c.close_channel(ch).unwrap();
    assert_eq!(c.transport().closed, vec![1]);
    assert!(c.transport().host_channels.is_empty());
    assert!(matches!(
        c.transport().server.channel_state(1),
        Some(ChannelState::Offered)
    ));
    // The doorbell of a closed channel is an invalid connection id.
    let conn = c.transport().server.connection_id(1).unwrap();
    assert_eq!(
        c.transport()
            .server
            .signal_event(conn)
            .unwrap_err()
            .hv_status(),
        0x12
    );
    // Reopen works.
    let ch = c.open_channel(1, 1, 1, 0).unwrap();
    assert_eq!(ch.relid, 1);
}

#[test]
fn full_ring_sets_pending_send_size_and_reader_signals() {
    let mut c = connected(&[guid::SHUTDOWN_IC]);
    let mut ch = c.open_channel(1, 1, 1, 0).unwrap();
    let mut host = c.transport_mut().host_channels.remove(&1).unwrap();
    let payload = [0x5a; 1000];
    let mut sent = 0;
    loop {
        match host.send_inband(sent, &payload, false) {
            Ok(()) => sent += 1,
            Err(ChannelError::Full) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // 4096-byte ring, 1024 + 8 bytes per packet: 3 fit (never completely full).
    assert_eq!(sent, 3);
    let doorbells_before = c.transport().doorbells.len();
    // The guest reads one packet: free space rises above pending_send_sz -> doorbell.
    assert_eq!(c.recv(&mut ch).unwrap().unwrap().transaction_id, 0);
    assert_eq!(c.transport().doorbells.len(), doorbells_before + 1);
    host.send_inband(99, &payload, false).unwrap();
    // Too large for the ring at all.
    assert!(matches!(
        host.send_inband(1, &[0; 5000], false),
        Err(ChannelError::TooLarge { .. })
    ));
    assert!(!host.is_broken());
}

#[test]
fn gpa_direct_and_xfer_page_packets_parse() {
    let mut c = connected(&[guid::SCSI]);
    let mut ch = c.open_channel(1, 2, 2, 0).unwrap();
    let mut host = c.transport_mut().host_channels.remove(&1).unwrap();
    let ranges = vec![
        vmbus::PagedRange {
            byte_offset: 512,
            byte_count: 8192,
            pfns: vec![10, 11, 12],
        },
        vmbus::PagedRange {
            byte_offset: 0,
            byte_count: 100,
            pfns: vec![77],
        },
    ];
    ch.channel.send_gpa_direct(5, &ranges, b"cdb").unwrap();
    let mut buf = Vec::new();
    let p = host.try_recv(&mut buf).unwrap().unwrap();
    assert_eq!(p.gpa_direct_ranges().unwrap(), ranges);
    assert_eq!(&p.payload()[..3], b"cdb");
    assert!(p.xfer_page_ranges().is_err());

    let mut h = hv::XferPagesHeader {
        xfer_pageset_id: 0xcafe,
        sender_owns_set: 0,
        reserved: 0,
        range_count: 2,
    }
    .as_bytes()
    .to_vec();
    h.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0]);
    host.try_send(hv::packet_type::DATA_USING_XFER_PAGES, 0, 9, &h, &[])
        .unwrap();
    let mut gbuf = Vec::new();
    let p = ch.channel.try_recv(&mut gbuf).unwrap().unwrap();
    let (set, r) = p.xfer_page_ranges().unwrap();
    assert_eq!(set, 0xcafe);
    assert_eq!(r.len(), 2);
    assert_eq!(({ r[1].byte_count }, { r[1].byte_offset }), (3, 4));
}

// ---- hostile sequences --------------------------------------------------------------------

#[test]
fn bad_hypercall_inputs() {
    let mut c = setup(&[]);
    assert_eq!(
        c.post_raw(7, &[14, 0, 0, 0, 0, 0, 0, 0]),
        Err(ClientError::Hypercall(0x12))
    );
    assert_eq!(c.post_raw(1, &[0; 241]), Err(ClientError::Hypercall(5)));
    // Messages before InitiateContact are refused, truncated ones too.
    c.post_raw(1, MessageHeader::new(msgtype::REQUEST_OFFERS).as_bytes())
        .unwrap();
    c.post_raw(4, &[14, 0, 0, 0]).unwrap();
    c.post_raw(4, &[14, 0, 0, 0, 0, 0, 0, 0, 1]).unwrap();
    assert_eq!(
        errors(&mut c),
        vec![
            ProtocolError::NotConnected,
            ProtocolError::Truncated(0),
            ProtocolError::Truncated(14)
        ]
    );
    assert!(c.drain_messages().is_empty());
    c.connect(&LINUX_VERSIONS).unwrap();
    c.post_raw(1, &[200, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    c.post_raw(1, &[5, 0, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap();
    assert_eq!(
        errors(&mut c),
        vec![ProtocolError::UnknownType(200), ProtocolError::Truncated(5)]
    );
    assert_eq!(
        c.transport()
            .server
            .signal_event(0x2001)
            .unwrap_err()
            .hv_status(),
        0x12
    );
}

#[test]
fn unknown_relid_everywhere() {
    let mut c = connected(&[guid::SHUTDOWN_IC]);
    // OPEN of an unknown relid: failure result.
    assert_eq!(
        c.send_open(42, 0xE1E10, 2, 0).unwrap(),
        hv::STATUS_UNSUCCESSFUL
    );
    // GPADL for an unknown channel: GPADL_CREATED with a failure status.
    let pfns = c.alloc_pages(4).unwrap();
    assert_eq!(
        c.create_gpadl(42, &pfns),
        Err(ClientError::GpadlFailed(hv::STATUS_UNSUCCESSFUL))
    );
    // CLOSE, RELID_RELEASED, MODIFY for unknown relids: ignored (5.3: failure response).
    c.post_raw(
        1,
        hv::RelidMessage {
            header: MessageHeader::new(msgtype::CLOSE_CHANNEL),
            child_relid: 42,
        }
        .as_bytes(),
    )
    .unwrap();
    c.release_relid(42).unwrap();
    assert_eq!(
        c.modify_channel(42, 0).unwrap(),
        Some(hv::STATUS_INVALID_PARAMETER as i32)
    );
    let e = errors(&mut c);
    assert_eq!(
        e,
        vec![
            ProtocolError::UnknownChannel(42),
            ProtocolError::UnknownChannel(42),
            ProtocolError::UnknownChannel(42),
            ProtocolError::UnknownChannel(42),
            ProtocolError::UnknownChannel(42),
        ]
    );
    // A GPADL body for an unknown GPADL, a teardown of an unknown GPADL.
    c.post_raw(
        1,
        hv::GpadlBody {
            header: MessageHeader::new(msgtype::GPADL_BODY),
            msgnumber: 0,
            gpadl: 5,
        }
        .as_bytes(),
    )
    .unwrap();
    c.post_raw(
        1,
        hv::GpadlTeardown {
            header: MessageHeader::new(msgtype::GPADL_TEARDOWN),
            child_relid: 1,
            gpadl: 5,
        }
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(
        errors(&mut c),
        vec![
            ProtocolError::UnknownGpadl(5),
            ProtocolError::UnknownGpadl(5)
        ]
    );
    let left: Vec<u32> = c.drain_messages().iter().map(|m| m[0] as u32).collect();
    assert!(left.is_empty(), "{left:?}");
}

fn gpadl_header(relid: u32, id: u32, buflen: u16, rangecount: u16, words: &[u64]) -> Vec<u8> {
    let mut m = hv::GpadlHeader {
        header: MessageHeader::new(msgtype::GPADL_HEADER),
        child_relid: relid,
        gpadl: id,
        range_buflen: buflen,
        rangecount,
    }
    .as_bytes()
    .to_vec();
    for w in words {
        m.extend_from_slice(&w.to_le_bytes());
    }
    m
}

#[test]
fn malformed_gpadls_fail_with_status() {
    let mut c = connected(&[guid::SHUTDOWN_IC]);
    let range = |pages: u64| pages * 4096; // byte_count in the low half, offset 0
                                           // Duplicate id: the second creation fails, the first is intact.
    let pfns = c.alloc_pages(2).unwrap();
    let id = c.create_gpadl(1, &pfns).unwrap();
    c.send_gpadl(1, id, &pfns).unwrap();
    assert_eq!(c.wait_gpadl_created(id).unwrap(), hv::STATUS_UNSUCCESSFUL);
    assert_eq!(
        c.transport().server.gpadl_state(id),
        Some(&GpadlState::Created)
    );
    assert_eq!(errors(&mut c), vec![ProtocolError::DuplicateGpadl(id)]);

    // Header says 2 pages of PFNs but the range claims 3 pages.
    c.post_raw(1, &gpadl_header(1, 0x100, 24, 1, &[range(3), 10, 11]))
        .unwrap();
    assert_eq!(
        c.wait_gpadl_created(0x100).unwrap(),
        hv::STATUS_UNSUCCESSFUL
    );
    // More PFN data in the header than range_buflen.
    c.post_raw(1, &gpadl_header(1, 0x101, 16, 1, &[range(1), 10, 11]))
        .unwrap();
    assert_eq!(
        c.wait_gpadl_created(0x101).unwrap(),
        hv::STATUS_UNSUCCESSFUL
    );
    // Oversized: a body adds more PFNs than announced.
    c.post_raw(1, &gpadl_header(1, 0x102, 32, 1, &[range(3), 10]))
        .unwrap();
    let mut body = hv::GpadlBody {
        header: MessageHeader::new(msgtype::GPADL_BODY),
        msgnumber: 0,
        gpadl: 0x102,
    }
    .as_bytes()
    .to_vec();
    body.extend_from_slice(&[0u8; 8 * 5]);
    c.post_raw(1, &body).unwrap();
    assert_eq!(
        c.wait_gpadl_created(0x102).unwrap(),
        hv::STATUS_UNSUCCESSFUL
    );
    assert!(c.transport().server.gpadl_state(0x102).is_none());
    // Zero ranges, odd sizes, range offset beyond a page.
    c.post_raw(1, &gpadl_header(1, 0x103, 16, 0, &[range(1), 10]))
        .unwrap();
    assert_eq!(
        c.wait_gpadl_created(0x103).unwrap(),
        hv::STATUS_UNSUCCESSFUL
    );
    c.post_raw(1, &gpadl_header(1, 0x104, 17, 1, &[range(1), 10]))
        .unwrap();
    assert_eq!(
        c.wait_gpadl_created(0x104).unwrap(),
        hv::STATUS_UNSUCCESSFUL
    );
    c.post_raw(
        1,
        &gpadl_header(1, 0x105, 16, 1, &[range(1) | (5000 << 32), 10]),
    )
    .unwrap();
    assert_eq!(
        c.wait_gpadl_created(0x105).unwrap(),
        hv::STATUS_UNSUCCESSFUL
    );
    // The largest header a u16 range_buflen allows is accepted and waits for its bodies.
    c.post_raw(1, &gpadl_header(1, 0x106, 0xfff8, 1, &[range(8190)]))
        .unwrap();
    assert_eq!(
        c.transport().server.gpadl_state(0x106),
        Some(&GpadlState::Building {
            expected_words: 8191
        })
    );
    assert_eq!(errors(&mut c).len(), 6);
}

#[test]
fn gpadl_budget_is_enforced() {
    let config = ServerConfig {
        max_total_pfns: 64,
        max_gpadls: 3,
        ..Default::default()
    };
    let mut c = setup_with(config, &[guid::SHUTDOWN_IC]);
    c.connect(&LINUX_VERSIONS).unwrap();
    c.request_offers().unwrap();
    let pfns = c.alloc_pages(40).unwrap();
    let a = c.create_gpadl(1, &pfns).unwrap();
    assert_eq!(
        c.create_gpadl(1, &pfns),
        Err(ClientError::GpadlFailed(hv::STATUS_UNSUCCESSFUL))
    );
    c.teardown_gpadl(1, a).unwrap();
    c.create_gpadl(1, &pfns).unwrap();
    c.create_gpadl(1, &pfns[..5]).unwrap();
    c.create_gpadl(1, &pfns[..5]).unwrap();
    assert_eq!(
        c.create_gpadl(1, &pfns[..1]),
        Err(ClientError::GpadlFailed(hv::STATUS_UNSUCCESSFUL))
    );
    // The refused 40-page GPADL's body then names an unknown GPADL.
    assert_eq!(
        errors(&mut c),
        vec![
            ProtocolError::GpadlLimit,
            ProtocolError::UnknownGpadl(a + 1),
            ProtocolError::GpadlLimit
        ]
    );
}

#[test]
fn open_twice_and_bad_opens() {
    let mut c = connected(&[guid::SHUTDOWN_IC, guid::HEARTBEAT_IC]);
    let ch = c.open_channel(1, 1, 1, 0).unwrap();
    // Second open of the same channel: failure, the first stays open.
    assert_eq!(
        c.send_open(1, ch.ring_gpadl, 2, 0).unwrap(),
        hv::STATUS_UNSUCCESSFUL
    );
    assert!(matches!(
        c.transport().server.channel_state(1),
        Some(ChannelState::Open { .. })
    ));
    assert!(c.transport().host_channels.contains_key(&1));

    let pfns = c.alloc_pages(4).unwrap();
    let g2 = c.create_gpadl(2, &pfns).unwrap();
    // Ring GPADL of another channel.
    assert_eq!(
        c.send_open(2, ch.ring_gpadl, 2, 0).unwrap(),
        hv::STATUS_INVALID_PARAMETER
    );
    // Downstream offset leaving no data page.
    assert_eq!(
        c.send_open(2, g2, 1, 0).unwrap(),
        hv::STATUS_INVALID_PARAMETER
    );
    assert_eq!(
        c.send_open(2, g2, 3, 0).unwrap(),
        hv::STATUS_INVALID_PARAMETER
    );
    // Target VP out of range.
    assert_eq!(
        c.send_open(2, g2, 2, 5).unwrap(),
        hv::STATUS_INVALID_PARAMETER
    );
    // Overlapping ring pages (the same page twice): the host refuses to build the rings.
    let p = c.alloc_pages(2).unwrap();
    let g3 = c.create_gpadl(2, &[p[0], p[1], p[0], p[1]]).unwrap();
    assert_eq!(c.send_open(2, g3, 2, 0).unwrap(), hv::STATUS_UNSUCCESSFUL);
    // PFNs outside guest RAM.
    let g4 = c
        .create_gpadl(2, &[1 << 40, 2 << 40, 3 << 40, 4 << 40])
        .unwrap();
    assert_eq!(c.send_open(2, g4, 2, 0).unwrap(), hv::STATUS_UNSUCCESSFUL);
    assert!(matches!(
        c.transport().server.channel_state(2),
        Some(ChannelState::Offered)
    ));
    // Garbage initial indices in the guest's rings: refused.
    let p = c.alloc_pages(4).unwrap();
    c.memory().write_obj(p[0] * 4096 + 4, &13u32).unwrap();
    let g5 = c.create_gpadl(2, &p).unwrap();
    assert_eq!(c.send_open(2, g5, 2, 0).unwrap(), hv::STATUS_UNSUCCESSFUL);
    // A valid open still works afterwards.
    assert_eq!(c.send_open(2, g2, 2, 0).unwrap(), 0);
}

#[test]
fn teardown_of_an_open_ring_is_deferred_until_close() {
    let mut c = connected(&[guid::SHUTDOWN_IC]);
    let ch = c.open_channel(1, 1, 1, 0).unwrap();
    let g = ch.ring_gpadl;
    assert_eq!(
        c.teardown_gpadl(1, g),
        Err(ClientError::NoReply(msgtype::GPADL_TORNDOWN))
    );
    assert_eq!(errors(&mut c), vec![ProtocolError::GpadlInUse(g)]);
    assert_eq!(
        c.transport().server.gpadl_state(g),
        Some(&GpadlState::TeardownPending)
    );
    // The ring still works.
    let host = c.transport_mut().host_channels.get_mut(&1).unwrap();
    host.send_inband(1, b"still alive", false).unwrap();
    // Teardown naming the wrong channel is refused.
    c.post_raw(
        1,
        hv::GpadlTeardown {
            header: MessageHeader::new(msgtype::GPADL_TEARDOWN),
            child_relid: 9,
            gpadl: g,
        }
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(
        errors(&mut c),
        vec![ProtocolError::BadGpadl(g, "teardown names another channel")]
    );
    // Close: the channel closes first, then the deferred TORNDOWN goes out.
    c.post_raw(
        1,
        hv::RelidMessage {
            header: MessageHeader::new(msgtype::CLOSE_CHANNEL),
            child_relid: 1,
        }
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(c.transport().closed, vec![1]);
    c.wait_for(msgtype::GPADL_TORNDOWN, |_| true).unwrap();
    assert!(c.transport().server.gpadl_state(g).is_none());
    // Closing again is refused.
    c.post_raw(
        1,
        hv::RelidMessage {
            header: MessageHeader::new(msgtype::CLOSE_CHANNEL),
            child_relid: 1,
        }
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(errors(&mut c), vec![ProtocolError::ChannelState(1)]);
}

#[test]
fn garbage_ring_indices_break_the_channel() {
    let mut c = connected(&[guid::SHUTDOWN_IC]);
    let mut ch = c.open_channel(1, 2, 2, 0).unwrap();
    let mut host = c.transport_mut().host_channels.remove(&1).unwrap();
    c.send_inband(&mut ch, 1, b"ok", false).unwrap();
    let ring0 = c.transport().server.gpadl_ranges(ch.ring_gpadl).unwrap()[0].pfns[0] * 4096;
    let mem = c.memory().clone();
    // Unaligned write index.
    mem.store_u32(ring0, 13, Ordering::SeqCst).unwrap();
    let mut buf = Vec::new();
    assert!(matches!(
        host.try_recv(&mut buf),
        Err(ChannelError::Broken(_))
    ));
    assert!(host.is_broken());
    assert!(matches!(
        host.send_inband(1, b"x", false),
        Err(ChannelError::Broken(_))
    ));

    // Index beyond the data area.
    let mut ch = reopen(&mut c, ch);
    let mut host = c.transport_mut().host_channels.remove(&1).unwrap();
    let ring0 = c.transport().server.gpadl_ranges(ch.ring_gpadl).unwrap()[0].pfns[0] * 4096;
    c.send_inband(&mut ch, 1, b"ok", false).unwrap();
    mem.store_u32(ring0, 0x10_0000, Ordering::SeqCst).unwrap();
    assert!(matches!(
        host.try_recv(&mut buf),
        Err(ChannelError::Broken(_))
    ));

    // Host-to-guest ring: the guest corrupts the read index the host checks on send.
    let ch = reopen(&mut c, ch);
    let mut host = c.transport_mut().host_channels.remove(&1).unwrap();
    let pfns = c.transport().server.gpadl_ranges(ch.ring_gpadl).unwrap()[0]
        .pfns
        .clone();
    let down = pfns[3] * 4096;
    mem.store_u32(down + 4, 0xffff_fff8, Ordering::SeqCst)
        .unwrap();
    assert!(matches!(
        host.send_inband(1, b"x", false),
        Err(ChannelError::Broken(_))
    ));
}

fn reopen(
    c: &mut Client<Loopback>,
    ch: vmbus::client::GuestChannel,
) -> vmbus::client::GuestChannel {
    c.transport_mut().host_channels.remove(&1);
    c.close_channel(ch).unwrap();
    c.open_channel(1, 2, 2, 0).unwrap()
}

#[test]
fn packets_larger_than_the_ring_break_the_channel() {
    let mut c = connected(&[guid::SHUTDOWN_IC]);
    let mut ch = c.open_channel(1, 2, 2, 0).unwrap();
    let mem = c.memory().clone();
    let cases = [
        // len8 says 64 KiB in an 8 KiB ring.
        (2u16, 8192u16, 64u32),
        // Packet longer than what the write index says was written.
        (2, 8, 40),
        // offset8 below the descriptor size.
        (1, 4, 40),
        // offset8 beyond the packet.
        (5, 4, 40),
        // Less than a descriptor and trailer written.
        (2, 2, 16),
    ];
    for (i, (offset8, len8, write_index)) in cases.into_iter().enumerate() {
        if i > 0 {
            ch = reopen(&mut c, ch);
        }
        let mut host = c.transport_mut().host_channels.remove(&1).unwrap();
        let pfns = c.transport().server.gpadl_ranges(ch.ring_gpadl).unwrap()[0]
            .pfns
            .clone();
        let (ctl, data) = (pfns[0] * 4096, pfns[1] * 4096);
        let desc = hv::PacketDescriptor {
            packet_type: 6,
            offset8,
            len8,
            flags: 0,
            transaction_id: 1,
        };
        mem.write_obj(data, &desc).unwrap();
        mem.store_u32(ctl, write_index, Ordering::SeqCst).unwrap();
        let mut buf = Vec::new();
        let e = host.try_recv(&mut buf).unwrap_err();
        assert!(matches!(e, ChannelError::Broken(_)), "case {i}: {e:?}");
        assert!(host.is_broken());
    }
}

#[test]
fn rescind_closes_and_waits_for_relid_released() {
    let mut c = connected(&[guid::SHUTDOWN_IC, guid::HEARTBEAT_IC]);
    let _ch = c.open_channel(1, 1, 1, 0).unwrap();
    let pfns = c.alloc_pages(2).unwrap();
    let extra = c.create_gpadl(1, &pfns).unwrap();
    c.transport_mut().server.rescind(1).unwrap();
    c.transport_mut().pump();
    assert_eq!(c.transport().closed, vec![1]);
    let m = c
        .wait_for(msgtype::RESCIND_CHANNEL_OFFER, |_| true)
        .unwrap();
    assert_eq!(m.len(), 12);
    assert!(c.find_offer(guid::SHUTDOWN_IC).is_none());
    assert!(matches!(
        c.transport().server.channel_state(1),
        Some(ChannelState::Rescinded)
    ));
    // Rescinding twice is an error; a GPADL for a rescinded channel fails.
    assert!(c.transport_mut().server.rescind(1).is_err());
    let p = c.alloc_pages(1).unwrap();
    assert!(c.create_gpadl(1, &p).is_err());
    c.release_relid(1).unwrap();
    assert_eq!(c.transport().removed, vec![1]);
    assert!(c.transport().server.channel_state(1).is_none());
    assert!(c.transport().server.gpadl_state(extra).is_none());
    // RELID_RELEASED for a channel that was not rescinded is refused.
    c.release_relid(2).unwrap();
    assert_eq!(errors(&mut c).last(), Some(&ProtocolError::ChannelState(2)));
    // The relid is reused by the next offer, which the connected guest sees at once.
    let r = c
        .transport_mut()
        .server
        .add_offer(OfferParams::new(guid::TIMESYNC_IC, INSTANCE))
        .unwrap();
    assert_eq!(r, 1);
    c.drain_messages();
    assert_eq!(c.find_offer(guid::TIMESYNC_IC).unwrap().relid, 1);
}

#[test]
fn unload_then_reconnect_like_kexec() {
    let mut c = connected(&[guid::SHUTDOWN_IC, guid::HEARTBEAT_IC]);
    let _a = c.open_channel(1, 1, 1, 0).unwrap();
    let _b = c.open_channel(2, 1, 1, 0).unwrap();
    c.unload().unwrap();
    assert_eq!(c.transport().closed, vec![1, 2]);
    assert!(c.transport().host_channels.is_empty());
    assert_eq!(
        c.transport().server.connection(),
        &ConnectionState::Disconnected
    );
    assert!(matches!(
        c.transport().server.channel_state(1),
        Some(ChannelState::NotOffered)
    ));
    // The new kernel starts over.
    c.connect(&LINUX_VERSIONS).unwrap();
    let offers = c.request_offers().unwrap();
    assert_eq!(offers.len(), 2);
    let mut ch = c.open_channel(1, 1, 1, 0).unwrap();
    c.send_inband(&mut ch, 1, b"after kexec", false).unwrap();
    let mut host = c.transport_mut().host_channels.remove(&1).unwrap();
    let mut buf = Vec::new();
    assert_eq!(
        &host.try_recv(&mut buf).unwrap().unwrap().payload()[..11],
        b"after kexec"
    );
    // A reconnect without UNLOAD (InitiateContact while connected) also resets.
    c.connect(&LINUX_VERSIONS).unwrap();
    assert_eq!(c.transport().closed, vec![1, 2, 1]);
    assert_eq!(c.transport().resets, 2);
}

#[test]
fn modify_channel_moves_interrupts() {
    let config = ServerConfig {
        vp_count: 2,
        ..Default::default()
    };
    let mut c = setup_with(config, &[guid::SHUTDOWN_IC]);
    c.vp = 1;
    c.connect(&LINUX_VERSIONS).unwrap();
    c.request_offers().unwrap();
    // Replies go to the VP named in InitiateContact.
    let mut ch = c.open_channel(1, 1, 1, 1).unwrap();
    assert!(c.transport().inbox.is_empty());
    let mut host = c.transport_mut().host_channels.remove(&1).unwrap();
    host.send_inband(1, b"a", false).unwrap();
    assert_eq!(c.modify_channel(1, 0).unwrap(), Some(0));
    c.recv(&mut ch).unwrap().unwrap();
    host.send_inband(2, b"b", false).unwrap();
    assert_eq!(
        *c.transport().interrupts.lock().unwrap(),
        vec![(1, 1), (0, 1)]
    );
    assert_eq!(
        c.modify_channel(1, 7).unwrap(),
        Some(hv::STATUS_INVALID_PARAMETER as i32)
    );
    assert_eq!(errors(&mut c), vec![ProtocolError::InvalidVp(7)]);
}

#[test]
fn modify_channel_before_5_3_has_no_response() {
    let mut c = setup(&[guid::SHUTDOWN_IC]);
    c.connect(&[version::WIN10_V5_2]).unwrap();
    c.request_offers().unwrap();
    let _ch = c.open_channel(1, 1, 1, 0).unwrap();
    assert_eq!(c.modify_channel(1, 0).unwrap(), None);
    assert!(c.drain_messages().is_empty());
}

use vmbus::testing::Rng;

#[test]
fn random_messages_never_panic() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut c = connected(&[guid::SHUTDOWN_IC, guid::HEARTBEAT_IC]);
    let _ch = c.open_channel(1, 1, 1, 0).unwrap();
    for _ in 0..200_000 {
        let len = (rng.next() % 64) as usize;
        let mut m: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if len >= 4 {
            // Mostly valid message types, relids and GPADL ids.
            m[0] = (rng.next() % 26) as u8;
            m[1..4].fill(0);
        }
        if len >= 12 && rng.next().is_multiple_of(2) {
            m[8..12].copy_from_slice(&((rng.next() % 4) as u32).to_le_bytes());
        }
        if len >= 16 && rng.next().is_multiple_of(2) {
            m[12..16].copy_from_slice(&(0xE1E10 + (rng.next() % 4) as u32).to_le_bytes());
        }
        let _ = c.post_raw(if rng.next().is_multiple_of(2) { 1 } else { 4 }, &m);
        c.drain_messages();
        c.transport_mut().protocol_errors.clear();
        c.transport_mut().interrupts.lock().unwrap().clear();
    }
}

#[test]
fn random_ring_contents_never_panic() {
    let mut rng = Rng(0xfeed_beef_0bad_f00d);
    let mut c = connected(&[guid::SHUTDOWN_IC]);
    let ch = c.open_channel(1, 2, 2, 0).unwrap();
    let pfns = c.transport().server.gpadl_ranges(ch.ring_gpadl).unwrap()[0]
        .pfns
        .clone();
    let mem = c.memory().clone();
    let mut buf = Vec::new();
    let mut broken = 0;
    for _ in 0..20_000 {
        let mut host =
            vmbus::Channel::new(&mem, &pfns, 3, vmbus::Side::Host, None).unwrap_or_else(|_| {
                mem.zero(pfns[0] * 4096, 4096).unwrap();
                vmbus::Channel::new(&mem, &pfns, 3, vmbus::Side::Host, None).unwrap()
            });
        // Random descriptor bytes and a random (often plausible) write index.
        let mut d = [0u8; 32];
        d.iter_mut().for_each(|b| *b = rng.next() as u8);
        mem.write(pfns[1] * 4096, &d).unwrap();
        let w = match rng.next() % 3 {
            0 => rng.next() as u32,
            _ => (rng.next() % 8192) as u32 & !7,
        };
        mem.store_u32(pfns[0] * 4096, w, Ordering::SeqCst).unwrap();
        mem.store_u32(pfns[0] * 4096 + 4, 0, Ordering::SeqCst)
            .unwrap();
        for _ in 0..4 {
            match host.try_recv(&mut buf) {
                Ok(Some(p)) => {
                    let _ = p.gpa_direct_ranges();
                    let _ = p.xfer_page_ranges();
                }
                Ok(None) => break,
                Err(_) => {
                    broken += 1;
                    break;
                }
            }
        }
    }
    assert!(broken > 1000);
}

#[test]
fn save_and_restore_keeps_open_channels_working() {
    let mut c = connected(&[guid::SHUTDOWN_IC, guid::HEARTBEAT_IC]);
    let mut ch = c.open_channel(1, 1, 1, 0).unwrap();
    c.send_inband(&mut ch, 1, b"before", false).unwrap();
    // A GPADL still being built and a deferred teardown survive too.
    c.post_raw(
        1,
        &gpadl_header(2, 0x500, 8 + 8 * 30, 1, &[30 * 4096, 1, 2, 3]),
    )
    .unwrap();
    c.post_raw(
        1,
        hv::GpadlTeardown {
            header: MessageHeader::new(msgtype::GPADL_TEARDOWN),
            child_relid: 1,
            gpadl: ch.ring_gpadl,
        }
        .as_bytes(),
    )
    .unwrap();
    errors(&mut c);
    let saved = c.transport().server.save();
    let json = serde_json::to_string(&saved).unwrap();
    assert!(json.contains("0e0b6031-5213-4934-818b-38d90ced39db"));
    let back: vmbus::server::SavedState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);

    // A new server with the same offers takes the state over.
    let mut server = Server::new(ServerConfig::default());
    for (i, g) in [guid::SHUTDOWN_IC, guid::HEARTBEAT_IC].iter().enumerate() {
        let mut inst = INSTANCE;
        inst.data1 = i as u32;
        server.add_offer(OfferParams::new(*g, inst)).unwrap();
    }
    let opens = server.restore(&back).unwrap();
    assert_eq!(server.save(), saved);
    assert_eq!(opens.len(), 1);
    let req = &opens[0];
    let mut host = vmbus::Channel::new(
        c.memory(),
        &req.ring_pfns,
        req.downstream_page_offset,
        vmbus::Side::Host,
        None,
    )
    .unwrap();
    c.transport_mut().server = server;
    c.transport_mut().host_channels.clear();
    let mut buf = Vec::new();
    assert_eq!(
        &host.try_recv(&mut buf).unwrap().unwrap().payload()[..6],
        b"before"
    );
    host.send_inband(2, b"after", false).unwrap();
    assert_eq!(&c.recv(&mut ch).unwrap().unwrap().payload[..5], b"after");
    // The restored doorbell mapping works and the deferred teardown completes on close.
    assert_eq!(c.transport().server.signal_event(ch.connection_id), Ok(1));
    c.post_raw(
        1,
        hv::RelidMessage {
            header: MessageHeader::new(msgtype::CLOSE_CHANNEL),
            child_relid: 1,
        }
        .as_bytes(),
    )
    .unwrap();
    c.wait_for(msgtype::GPADL_TORNDOWN, |_| true).unwrap();
    assert_eq!(
        c.transport().server.gpadl_state(0x500),
        Some(&GpadlState::Building { expected_words: 31 })
    );

    // Restoring onto different offers fails.
    let mut other = Server::new(ServerConfig::default());
    other
        .add_offer(OfferParams::new(guid::SCSI, INSTANCE))
        .unwrap();
    assert!(other.restore(&saved).is_err());
}

#[test]
fn host_api_misuse_is_an_error_not_a_panic() {
    let mut c = connected(&[guid::SHUTDOWN_IC]);
    let server = &mut c.transport_mut().server;
    assert!(server.open_complete(1, 0).is_err());
    assert!(server.open_complete(99, 0).is_err());
    assert!(server.rescind(99).is_err());
    let mut first = INSTANCE;
    first.data1 = 0;
    assert_eq!(
        server.add_offer(OfferParams::new(guid::SHUTDOWN_IC, first)),
        Err(vmbus::server::ServerError::DuplicateOffer)
    );
    // Relids run out at 2047.
    for i in 0..2046u32 {
        let mut inst = INSTANCE;
        inst.data2 = (i & 0xffff) as u16;
        inst.data3 = 7;
        server
            .add_offer(OfferParams::new(guid::SCSI, inst))
            .unwrap();
    }
    assert_eq!(
        server.add_offer(OfferParams::new(guid::NETWORK, INSTANCE)),
        Err(vmbus::server::ServerError::NoRelid)
    );
}

#[test]
fn close_or_rescind_while_the_device_is_still_opening() {
    let mut server = Server::new(ServerConfig::default());
    server
        .add_offer(OfferParams::new(guid::SHUTDOWN_IC, INSTANCE))
        .unwrap();
    let mem = GuestMemory::new(&[(0, MEM)]).unwrap();
    let mut c = Client::new(Loopback::new(server, mem.clone()), mem, 1 << 20, 4 << 20);
    c.connect(&LINUX_VERSIONS).unwrap();
    c.request_offers().unwrap();
    let pfns = c.alloc_pages(4).unwrap();
    vmbus::Channel::initialize_rings(c.memory(), &pfns, 2).unwrap();
    let g = c.create_gpadl(1, &pfns).unwrap();
    // Post OPENCHANNEL straight to the server, so the open request stays pending.
    let open = hv::OpenChannel {
        header: MessageHeader::new(msgtype::OPEN_CHANNEL),
        child_relid: 1,
        openid: 1,
        ring_gpadl: g,
        target_vp: 0,
        downstream_ring_page_offset: 2,
        user_data: [0; hv::OPEN_USER_DATA_SIZE],
    };
    let server = &mut c.transport_mut().server;
    server.post_message(1, 0, open.as_bytes()).unwrap().unwrap();
    let actions = server.take_actions();
    assert!(matches!(actions[..], [vmbus::Action::OpenChannel(_)]));
    assert!(matches!(
        server.channel_state(1),
        Some(ChannelState::Opening { .. })
    ));
    // MODIFYCHANNEL is refused while opening; CLOSECHANNEL closes.
    let modify = hv::ModifyChannel {
        header: MessageHeader::new(msgtype::MODIFY_CHANNEL),
        child_relid: 1,
        target_vp: 0,
    };
    assert_eq!(
        server.post_message(1, 0, modify.as_bytes()).unwrap(),
        Err(ProtocolError::ChannelState(1))
    );
    let close = hv::RelidMessage {
        header: MessageHeader::new(msgtype::CLOSE_CHANNEL),
        child_relid: 1,
    };
    server
        .post_message(1, 0, close.as_bytes())
        .unwrap()
        .unwrap();
    // The late completion of the device is refused; no OPENRESULT goes out.
    assert!(server.open_complete(1, 0).is_err());
    let actions = server.take_actions();
    assert!(actions
        .iter()
        .any(|a| matches!(a, vmbus::Action::CloseChannel { relid: 1 })));
    assert!(!actions.iter().any(|a| matches!(
        a,
        vmbus::Action::SendMessage { message, .. } if message.msgtype() == msgtype::OPEN_CHANNEL_RESULT
    )));
    // Rescind while opening closes the device side too.
    server.post_message(1, 0, open.as_bytes()).unwrap().unwrap();
    server.take_actions();
    server.rescind(1).unwrap();
    let actions = server.take_actions();
    assert!(matches!(
        actions[0],
        vmbus::Action::CloseChannel { relid: 1 }
    ));
    assert!(matches!(
        &actions[1],
        vmbus::Action::SendMessage { message, .. } if message.msgtype() == msgtype::RESCIND_CHANNEL_OFFER
    ));
}

/// Saved state comes from a file: a tampered version, target VP, SINT or ring layout is
/// refused, not trusted.
#[test]
fn restore_refuses_a_tampered_connection_or_channel() {
    use vmbus::server::{SavedChannelState, SavedState};
    let mut c = connected(&[guid::SHUTDOWN_IC]);
    let _ch = c.open_channel(1, 1, 1, 0).unwrap();
    let saved = c.transport().server.save();
    let fresh = || {
        let mut s = Server::new(ServerConfig::default());
        let mut inst = INSTANCE;
        inst.data1 = 0;
        s.add_offer(OfferParams::new(guid::SHUTDOWN_IC, inst))
            .unwrap();
        s
    };
    assert!(
        fresh().restore(&saved).is_ok(),
        "the untouched state restores"
    );
    let tamper = |f: &dyn Fn(&mut SavedState)| {
        let mut s = saved.clone();
        f(&mut s);
        fresh().restore(&s)
    };
    type Tamper<'a> = &'a dyn Fn(&mut SavedState);
    let cases: [(&str, Tamper); 6] = [
        ("version", &|s| {
            s.connection.as_mut().unwrap().version = 0x0009_0000
        }),
        ("6.0", &|s| {
            s.connection.as_mut().unwrap().version = version::V6_0
        }),
        ("target VP", &|s| {
            s.connection.as_mut().unwrap().target_vp = 7
        }),
        ("SINT", &|s| s.connection.as_mut().unwrap().sint = 0),
        ("channel VP", &|s| {
            if let SavedChannelState::Open { target_vp, .. } = &mut s.channels[0].state {
                *target_vp = 5;
            }
        }),
        ("ring layout", &|s| {
            if let SavedChannelState::Open {
                downstream_page_offset,
                ..
            } = &mut s.channels[0].state
            {
                *downstream_page_offset = 1;
            }
        }),
    ];
    for (what, f) in cases {
        assert!(tamper(f).is_err(), "a tampered {what} was restored");
    }
}
