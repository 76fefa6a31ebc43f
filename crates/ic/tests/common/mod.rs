//! Shared harness of the IC loopback tests: a VMBus loopback (guest client, server, rings in
//! guest memory), a guest util driver that answers like Linux's hv_utils, and helpers.
#![allow(dead_code)]

use guestmem::GuestMemory;
use hvdef::ic::{self as wire, flags, msgtype, IcMessageHeader, IcVersion, NegotiateHeader};
use hvdef::vmbus::Guid;
use ic::{Ic, IcKind, TimeSource};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vmbus::client::{Client, GuestChannel, LINUX_VERSIONS};
use vmbus::loopback::Loopback;
use vmbus::{Channel, OfferParams, Server, ServerConfig};
use zerocopy::{FromBytes, IntoBytes};

pub const MEM: u64 = 8 << 20;
pub const HDR: usize = wire::IC_BODY_OFFSET;

/// What Linux's util drivers support.
pub fn linux_versions(kind: IcKind) -> (Vec<IcVersion>, Vec<IcVersion>) {
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
pub struct GuestUtil {
    pub kind: IcKind,
    pub fw: Vec<IcVersion>,
    pub msg: Vec<IcVersion>,
    pub negotiated: Option<(IcVersion, IcVersion)>,
    pub shutdown_flags: Vec<u32>,
    pub time_samples: Vec<(u64, u64, u8)>,
    pub heartbeats: Vec<u64>,
}

impl GuestUtil {
    pub fn new(kind: IcKind) -> Self {
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
    pub fn poll(&mut self, c: &mut Client<Loopback>, ch: &mut GuestChannel) -> usize {
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

pub struct Rig {
    pub client: Client<Loopback>,
    pub relids: Vec<u32>,
}

pub fn rig(kinds: &[IcKind]) -> Rig {
    let offers: Vec<OfferParams> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| k.offer(Guid::from_u128(0xabc0 + i as u128)))
        .collect();
    rig_offers(offers)
}

/// A bus with these offers, connected and enumerated by the guest client.
pub fn rig_offers(offers: Vec<OfferParams>) -> Rig {
    let mem = GuestMemory::new(&[(0, MEM)]).unwrap();
    let mut server = Server::new(ServerConfig::default());
    let relids = offers
        .into_iter()
        .map(|o| server.add_offer(o).unwrap())
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
pub fn open(r: &mut Rig, i: usize, ic: &mut Ic) -> (GuestChannel, Channel) {
    let (ch, mut host) = open_raw(r, i);
    ic.open(&mut host).unwrap();
    (ch, host)
}

/// Opens channel `i` like hv_utils (4 pages per ring: a control page and 12 KiB of data)
/// and returns both ends; the host service is not started.
pub fn open_raw(r: &mut Rig, i: usize) -> (GuestChannel, Channel) {
    let relid = r.relids[i];
    let ch = r.client.open_channel(relid, 4, 4, 0).unwrap();
    let host = r
        .client
        .transport_mut()
        .host_channels
        .remove(&relid)
        .unwrap();
    (ch, host)
}

pub struct FakeClock {
    pub host: u64,
    pub reference: Arc<AtomicU64>,
}

impl TimeSource for FakeClock {
    fn host_time_100ns(&self) -> u64 {
        self.host
    }
    fn guest_reference_time(&self) -> u64 {
        self.reference.load(Ordering::Relaxed)
    }
}

pub fn response(ty: u16, fw: IcVersion, msg: IcVersion, body: &[u8]) -> Vec<u8> {
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

/// Answers a NEGOTIATE in place like vmbus_prep_negotiate_resp: picks the first of the
/// guest's versions that the host offered, or answers counts 0.
pub fn negotiate_in_place(
    buf: &mut [u8],
    fw: &[IcVersion],
    msg: &[IcVersion],
) -> Option<(IcVersion, IcVersion)> {
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
    let f = fw.iter().find(|v| list[..fc].contains(v)).copied();
    let m = msg.iter().find(|v| list[fc..].contains(v)).copied();
    let found = f.zip(m);
    let (cnt, f, m) = match found {
        Some((f, m)) => (1u16, f, m),
        None => (0, IcVersion::default(), IcVersion::default()),
    };
    buf[HDR..HDR + 2].copy_from_slice(&cnt.to_le_bytes());
    buf[HDR + 2..HDR + 4].copy_from_slice(&cnt.to_le_bytes());
    buf[HDR + 8..HDR + 12].copy_from_slice(f.as_bytes());
    buf[HDR + 12..HDR + 16].copy_from_slice(m.as_bytes());
    let mut hdr = IcMessageHeader::read_from_prefix(&buf[8..]).unwrap().0;
    hdr.msgsize = 0x10;
    hdr.flags = flags::TRANSACTION | flags::RESPONSE;
    buf[8..HDR].copy_from_slice(hdr.as_bytes());
    found
}

/// Rewrites the IC header of a received request into a response with `status`.
pub fn make_response(buf: &mut [u8], status: u32) {
    let mut hdr = IcMessageHeader::read_from_prefix(&buf[8..]).unwrap().0;
    hdr.status = status;
    hdr.flags = flags::TRANSACTION | flags::RESPONSE;
    buf[8..HDR].copy_from_slice(hdr.as_bytes());
}
