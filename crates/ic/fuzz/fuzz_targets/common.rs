//! Shared by the IC fuzz targets: a host/guest channel pair over a small guest memory, and
//! a guest that either sends arbitrary packets or answers the host's last packet in place
//! the way Linux does, with arbitrary corruption.
#![allow(dead_code)]

use guestmem::GuestMemory;
use hvdef::ic::{flags, msgtype, IcMessageHeader, IcVersion, IC_BODY_OFFSET};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use vmbus::{Channel, Side};
use zerocopy::{FromBytes, IntoBytes};

/// Rings like hv_utils': 4 pages each (a control page and 12 KiB of data).
const PAGES: u64 = 4;

pub struct Pair {
    pub host: Channel,
    pub guest: Channel,
    buf: Vec<u8>,
    /// The host packets the guest has read, not yet answered: (transaction, payload).
    pub inbox: Vec<(u64, Vec<u8>)>,
}

impl Pair {
    pub fn new() -> Self {
        let mem = GuestMemory::new(&[(0, 16 * 4096)]).unwrap();
        let pfns: Vec<u64> = (1..=2 * PAGES).collect();
        Channel::initialize_rings(&mem, &pfns, PAGES as u32).unwrap();
        let host = Channel::new(&mem, &pfns, PAGES as u32, Side::Host, None).unwrap();
        let guest = Channel::new(&mem, &pfns, PAGES as u32, Side::Guest, None).unwrap();
        Self {
            host,
            guest,
            buf: Vec::new(),
            inbox: Vec::new(),
        }
    }

    /// The guest reads what the host sent (keeps at most a few packets).
    pub fn guest_read(&mut self) {
        while let Ok(Some(p)) = self.guest.try_recv(&mut self.buf) {
            if self.inbox.len() < 8 {
                self.inbox.push((p.transaction_id(), p.payload().to_vec()));
            }
        }
    }
}

/// A guest action.
#[derive(Debug, Arbitrary)]
pub enum GuestOp {
    /// An arbitrary in-band packet.
    Raw { transaction: u64, payload: Vec<u8> },
    /// An arbitrary packet of another type.
    Typed {
        packet_type: u16,
        transaction: u64,
        payload: Vec<u8>,
    },
    /// Answer the oldest unanswered host packet in place, like Linux: negotiation picks the
    /// first offered versions; other messages get `status`. Then corrupt it.
    Answer {
        status: u32,
        /// Answer with the first offered framework / message versions, or these.
        pick: Option<(u16, u16, u16, u16)>,
        flips: Vec<(u16, u8)>,
        truncate: Option<u16>,
        transaction_delta: u8,
        /// Write these bytes at this offset of the message body.
        patch: Option<(u16, Vec<u8>)>,
    },
    /// The guest reads its ring.
    Read,
}

fn negotiate_in_place(buf: &mut [u8], pick: Option<(u16, u16, u16, u16)>) {
    let b = IC_BODY_OFFSET;
    if buf.len() < b + 8 {
        return;
    }
    let fc = u16::from_le_bytes([buf[b], buf[b + 1]]) as usize;
    let first = |i: usize| -> Option<IcVersion> {
        let o = b + 8 + 4 * i;
        buf.get(o..o + 4)
            .map(|s| IcVersion::read_from_bytes(s).unwrap())
    };
    let (f, m) = match pick {
        Some((a, b, c, d)) => (Some(IcVersion::new(a, b)), Some(IcVersion::new(c, d))),
        None => (first(0), first(fc)),
    };
    let (Some(f), Some(m)) = (f, m) else { return };
    buf[b..b + 2].copy_from_slice(&1u16.to_le_bytes());
    buf[b + 2..b + 4].copy_from_slice(&1u16.to_le_bytes());
    if buf.len() >= b + 16 {
        buf[b + 8..b + 12].copy_from_slice(f.as_bytes());
        buf[b + 12..b + 16].copy_from_slice(m.as_bytes());
    }
}

impl GuestOp {
    pub fn run(self, p: &mut Pair) {
        match self {
            GuestOp::Raw {
                transaction,
                payload,
            } => {
                let _ = p.guest.send_inband(transaction, &payload, false);
            }
            GuestOp::Typed {
                packet_type,
                transaction,
                payload,
            } => {
                let _ = p.guest.try_send(packet_type, 0, transaction, &[], &payload);
            }
            GuestOp::Answer {
                status,
                pick,
                flips,
                truncate,
                transaction_delta,
                patch,
            } => {
                p.guest_read();
                if p.inbox.is_empty() {
                    return;
                }
                let (t, mut buf) = p.inbox.remove(0);
                if buf.len() >= IC_BODY_OFFSET {
                    let mut h = IcMessageHeader::read_from_prefix(&buf[8..]).unwrap().0;
                    if h.msgtype == msgtype::NEGOTIATE {
                        negotiate_in_place(&mut buf, pick);
                    } else {
                        h.status = status;
                    }
                    h.flags = flags::TRANSACTION | flags::RESPONSE;
                    buf[8..IC_BODY_OFFSET].copy_from_slice(h.as_bytes());
                }
                if let Some((off, bytes)) = patch {
                    let off = IC_BODY_OFFSET + off as usize;
                    for (i, b) in bytes.into_iter().enumerate() {
                        if let Some(d) = buf.get_mut(off + i) {
                            *d = b;
                        }
                    }
                }
                let len = buf.len();
                for (off, x) in flips {
                    if len > 0 {
                        buf[off as usize % len] ^= x;
                    }
                }
                if let Some(n) = truncate {
                    buf.truncate(n as usize);
                }
                let _ = p.guest.send_inband(t.wrapping_add(transaction_delta as u64), &buf, false);
            }
            GuestOp::Read => p.guest_read(),
        }
    }
}
