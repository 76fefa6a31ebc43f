//! A guest-side VMBus client that plays the Linux driver's role (hv_vmbus) for loopback
//! tests: InitiateContact, RequestOffers, GPADLs built from guest pages, channel open and
//! close, packets, unload.

use crate::channel::{Channel, ChannelError, OwnedPacket, Side};
use guestmem::GuestMemory;
use hvdef::vmbus::{self as hv, msgtype, version, Guid, MessageHeader};
use std::collections::{BTreeMap, VecDeque};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// What the client needs from the "hypervisor".
pub trait Transport {
    /// HvPostMessage on `connection_id`. `Err` carries the hypercall status.
    fn post_message(&mut self, connection_id: u32, data: &[u8]) -> Result<(), u16>;
    /// The next message delivered to the guest's VMBus SINT, if any.
    fn next_message(&mut self) -> Option<Vec<u8>>;
    /// HvSignalEvent on `connection_id`. `Err` carries the hypercall status.
    fn signal_event(&mut self, connection_id: u32) -> Result<(), u16>;
}

/// Client errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    #[error("no reply from the host (waiting for message type {0})")]
    NoReply(u32),
    #[error("the host declined every version offered")]
    Declined,
    #[error("hypercall failed with status {0:#x}")]
    Hypercall(u16),
    #[error("GPADL creation failed with status {0:#x}")]
    GpadlFailed(u32),
    #[error("channel open failed with status {0:#x}")]
    OpenFailed(u32),
    #[error("no offer with relid {0}")]
    UnknownOffer(u32),
    #[error("out of guest pages")]
    OutOfPages,
    #[error("channel: {0}")]
    Channel(#[from] ChannelError),
    #[error("not connected")]
    NotConnected,
}

/// An offer as the guest saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferInfo {
    pub relid: u32,
    pub interface_type: Guid,
    pub instance_id: Guid,
    pub connection_id: u32,
    pub sub_channel_index: u16,
    pub is_dedicated_interrupt: bool,
    pub monitor_allocated: bool,
}

/// An open channel, guest end.
#[derive(Debug)]
pub struct GuestChannel {
    pub relid: u32,
    pub connection_id: u32,
    pub ring_gpadl: u32,
    /// The pages of both rings, in GPADL order.
    pub ring_pfns: Vec<u64>,
    pub channel: Channel,
}

/// Versions Linux proposes, newest first (6.0 with the confidential-VMBus series).
pub const LINUX_VERSIONS: [u32; 9] = [
    version::V6_0,
    version::WIN10_V5_3,
    version::WIN10_V5_2,
    version::WIN10_V5_1,
    version::WIN10_V5,
    version::WIN10_V4_1,
    version::WIN10,
    version::WIN8_1,
    version::WIN8,
];

/// The guest-side client.
pub struct Client<T> {
    transport: T,
    mem: GuestMemory,
    next_pfn: u64,
    end_pfn: u64,
    /// VP index put in InitiateContact.target_vcpu.
    pub vp: u32,
    version: Option<u32>,
    msg_conn_id: u32,
    offers: BTreeMap<u32, OfferInfo>,
    pending: VecDeque<Vec<u8>>,
    next_gpadl: u32,
}

fn msg_type(m: &[u8]) -> u32 {
    m.get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .unwrap_or(0)
}

fn parse<T: FromBytes>(m: &[u8]) -> Option<T> {
    T::read_from_prefix(m).ok().map(|(v, _)| v)
}

impl<T: Transport> Client<T> {
    /// `pool` is a page-aligned guest-physical range the client may use for rings.
    pub fn new(transport: T, mem: GuestMemory, pool_gpa: u64, pool_len: u64) -> Self {
        Self {
            transport,
            mem,
            next_pfn: pool_gpa / 4096,
            end_pfn: (pool_gpa + pool_len) / 4096,
            vp: 0,
            version: None,
            msg_conn_id: hv::MESSAGE_CONNECTION_ID,
            offers: BTreeMap::new(),
            pending: VecDeque::new(),
            next_gpadl: hv::FIRST_GPADL_HANDLE,
        }
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The negotiated version.
    pub fn version(&self) -> Option<u32> {
        self.version
    }

    /// Offers received so far (rescinded ones removed).
    pub fn offers(&self) -> impl Iterator<Item = &OfferInfo> {
        self.offers.values()
    }

    /// The offer with this interface type.
    pub fn find_offer(&self, interface_type: Guid) -> Option<&OfferInfo> {
        self.offers
            .values()
            .find(|o| o.interface_type == interface_type)
    }

    /// Takes `n` fresh guest pages (PFNs) from the pool.
    pub fn alloc_pages(&mut self, n: u64) -> Result<Vec<u64>, ClientError> {
        if self.end_pfn - self.next_pfn < n {
            return Err(ClientError::OutOfPages);
        }
        let v = (self.next_pfn..self.next_pfn + n).collect();
        self.next_pfn += n;
        Ok(v)
    }

    /// Posts raw bytes (for hostile tests).
    pub fn post_raw(&mut self, connection_id: u32, data: &[u8]) -> Result<(), ClientError> {
        self.transport
            .post_message(connection_id, data)
            .map_err(ClientError::Hypercall)
    }

    fn post<M: IntoBytes + Immutable>(&mut self, msg: &M) -> Result<(), ClientError> {
        let conn = self.msg_conn_id;
        self.post_raw(conn, msg.as_bytes())
    }

    fn note(&mut self, m: &[u8]) {
        match msg_type(m) {
            msgtype::OFFER_CHANNEL => {
                if let Some(o) = parse::<hv::OfferChannel>(m) {
                    self.offers.insert(
                        o.child_relid,
                        OfferInfo {
                            relid: o.child_relid,
                            interface_type: o.interface_type,
                            instance_id: o.interface_instance,
                            connection_id: o.connection_id,
                            sub_channel_index: o.sub_channel_index,
                            is_dedicated_interrupt: o.is_dedicated_interrupt & 1 != 0,
                            monitor_allocated: o.monitor_allocated & 1 != 0,
                        },
                    );
                }
            }
            msgtype::RESCIND_CHANNEL_OFFER => {
                if let Some(r) = parse::<hv::RelidMessage>(m) {
                    self.offers.remove(&{ r.child_relid });
                }
            }
            _ => {}
        }
    }

    /// Returns the next message of type `ty` (matching `pred`), keeping other messages
    /// queued. Offers and rescinds are recorded as they arrive.
    pub fn wait_for(
        &mut self,
        ty: u32,
        pred: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<u8>, ClientError> {
        if let Some(i) = self
            .pending
            .iter()
            .position(|m| msg_type(m) == ty && pred(m))
        {
            return Ok(self.pending.remove(i).expect("index valid"));
        }
        while let Some(m) = self.transport.next_message() {
            self.note(&m);
            if msg_type(&m) == ty && pred(&m) {
                return Ok(m);
            }
            // Offers are recorded in `offers`; keep everything else for later.
            if msg_type(&m) != msgtype::OFFER_CHANNEL {
                self.pending.push_back(m);
            }
        }
        Err(ClientError::NoReply(ty))
    }

    /// Drains every message delivered so far (recording offers and rescinds) and returns
    /// them, together with any still queued.
    pub fn drain_messages(&mut self) -> Vec<Vec<u8>> {
        while let Some(m) = self.transport.next_message() {
            self.note(&m);
            self.pending.push_back(m);
        }
        self.pending.drain(..).collect()
    }

    /// Sends one InitiateContact and waits for the VersionResponse. Returns whether the
    /// host accepted.
    pub fn initiate_contact(&mut self, version: u32) -> Result<bool, ClientError> {
        let mut m = hv::InitiateContact {
            header: MessageHeader::new(msgtype::INITIATE_CONTACT),
            version_requested: version,
            target_vcpu: self.vp,
            ..Default::default()
        };
        let conn = if version >= version::WIN10_V5 {
            m.interrupt_page_or_sint = hv::MESSAGE_SINT as u64;
            hv::MESSAGE_CONNECTION_ID_4
        } else {
            hv::MESSAGE_CONNECTION_ID
        };
        self.post_raw(conn, m.as_bytes())?;
        let r = self.wait_for(msgtype::VERSION_RESPONSE, |_| true)?;
        let r: hv::VersionResponse = parse(&r).ok_or(ClientError::NoReply(15))?;
        if r.version_supported != 0 {
            self.version = Some(version);
            self.msg_conn_id = r.msg_conn_id;
            self.offers.clear();
            self.pending.clear();
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Negotiates like Linux: newest first, one at a time.
    pub fn connect(&mut self, versions: &[u32]) -> Result<u32, ClientError> {
        for &v in versions {
            if self.initiate_contact(v)? {
                return Ok(v);
            }
        }
        Err(ClientError::Declined)
    }

    /// RequestOffers; collects offers until AllOffersDelivered.
    pub fn request_offers(&mut self) -> Result<Vec<OfferInfo>, ClientError> {
        self.post(&MessageHeader::new(msgtype::REQUEST_OFFERS))?;
        self.wait_for(msgtype::ALL_OFFERS_DELIVERED, |_| true)?;
        Ok(self.offers.values().cloned().collect())
    }

    /// Sends a GPADL_HEADER and the bodies for one range over `pfns` (whole pages) without
    /// waiting. Returns the GPADL id used.
    pub fn send_gpadl(&mut self, relid: u32, id: u32, pfns: &[u64]) -> Result<(), ClientError> {
        let range_buflen = 8 + 8 * pfns.len();
        let first = pfns.len().min(hv::GPADL_HEADER_MAX_PFNS);
        let mut msg = hv::GpadlHeader {
            header: MessageHeader::new(msgtype::GPADL_HEADER),
            child_relid: relid,
            gpadl: id,
            range_buflen: range_buflen as u16,
            rangecount: 1,
        }
        .as_bytes()
        .to_vec();
        msg.extend_from_slice(
            hv::GpaRange {
                byte_count: (pfns.len() * 4096) as u32,
                byte_offset: 0,
            }
            .as_bytes(),
        );
        for p in &pfns[..first] {
            msg.extend_from_slice(&p.to_le_bytes());
        }
        let conn = self.msg_conn_id;
        self.post_raw(conn, &msg)?;
        for chunk in pfns[first..].chunks(hv::GPADL_BODY_MAX_PFNS) {
            let mut msg = hv::GpadlBody {
                header: MessageHeader::new(msgtype::GPADL_BODY),
                msgnumber: 0,
                gpadl: id,
            }
            .as_bytes()
            .to_vec();
            for p in chunk {
                msg.extend_from_slice(&p.to_le_bytes());
            }
            self.post_raw(conn, &msg)?;
        }
        Ok(())
    }

    /// Allocates a GPADL id.
    pub fn next_gpadl_id(&mut self) -> u32 {
        let id = self.next_gpadl;
        self.next_gpadl += 1;
        id
    }

    /// Waits for GPADL_CREATED for `id`; returns its status.
    pub fn wait_gpadl_created(&mut self, id: u32) -> Result<u32, ClientError> {
        let m = self.wait_for(msgtype::GPADL_CREATED, |m| {
            parse::<hv::GpadlCreated>(m).is_some_and(|c| c.gpadl == id)
        })?;
        Ok(parse::<hv::GpadlCreated>(&m)
            .expect("checked")
            .creation_status)
    }

    /// Builds a GPADL over `pfns` and waits for GPADL_CREATED.
    pub fn create_gpadl(&mut self, relid: u32, pfns: &[u64]) -> Result<u32, ClientError> {
        let id = self.next_gpadl_id();
        self.send_gpadl(relid, id, pfns)?;
        match self.wait_gpadl_created(id)? {
            0 => Ok(id),
            s => Err(ClientError::GpadlFailed(s)),
        }
    }

    /// GPADL_TEARDOWN; waits for GPADL_TORNDOWN.
    pub fn teardown_gpadl(&mut self, relid: u32, id: u32) -> Result<(), ClientError> {
        self.post(&hv::GpadlTeardown {
            header: MessageHeader::new(msgtype::GPADL_TEARDOWN),
            child_relid: relid,
            gpadl: id,
        })?;
        self.wait_for(msgtype::GPADL_TORNDOWN, |m| {
            parse::<hv::GpadlTorndown>(m).is_some_and(|t| t.gpadl == id)
        })?;
        Ok(())
    }

    /// Sends OPENCHANNEL and waits for the result; returns its status.
    pub fn send_open(
        &mut self,
        relid: u32,
        ring_gpadl: u32,
        downstream_offset: u32,
        target_vp: u32,
    ) -> Result<u32, ClientError> {
        self.post(&hv::OpenChannel {
            header: MessageHeader::new(msgtype::OPEN_CHANNEL),
            child_relid: relid,
            openid: relid,
            ring_gpadl,
            target_vp,
            downstream_ring_page_offset: downstream_offset,
            user_data: [0; hv::OPEN_USER_DATA_SIZE],
        })?;
        let m = self.wait_for(msgtype::OPEN_CHANNEL_RESULT, |m| {
            parse::<hv::OpenResult>(m).is_some_and(|r| r.child_relid == relid)
        })?;
        Ok(parse::<hv::OpenResult>(&m).expect("checked").status)
    }

    /// Opens channel `relid` with rings of `send_pages` and `recv_pages` data pages (plus
    /// a control page each), interrupts to `target_vp`.
    pub fn open_channel(
        &mut self,
        relid: u32,
        send_pages: u64,
        recv_pages: u64,
        target_vp: u32,
    ) -> Result<GuestChannel, ClientError> {
        let offer = self
            .offers
            .get(&relid)
            .cloned()
            .ok_or(ClientError::UnknownOffer(relid))?;
        let pfns = self.alloc_pages(send_pages + recv_pages + 2)?;
        let downstream = (send_pages + 1) as u32;
        Channel::initialize_rings(&self.mem, &pfns, downstream)?;
        let gpadl = self.create_gpadl(relid, &pfns)?;
        match self.send_open(relid, gpadl, downstream, target_vp)? {
            0 => {}
            s => return Err(ClientError::OpenFailed(s)),
        }
        let channel = Channel::new(&self.mem, &pfns, downstream, Side::Guest, None)?;
        Ok(GuestChannel {
            relid,
            connection_id: offer.connection_id,
            ring_gpadl: gpadl,
            ring_pfns: pfns,
            channel,
        })
    }

    fn doorbell(&mut self, ch: &mut GuestChannel) -> Result<(), ClientError> {
        if ch.channel.take_signal() {
            self.transport
                .signal_event(ch.connection_id)
                .map_err(ClientError::Hypercall)?;
        }
        Ok(())
    }

    /// Sends an in-band packet and rings the doorbell if the protocol says so.
    pub fn send_inband(
        &mut self,
        ch: &mut GuestChannel,
        transaction_id: u64,
        payload: &[u8],
        completion_requested: bool,
    ) -> Result<(), ClientError> {
        let r = ch
            .channel
            .send_inband(transaction_id, payload, completion_requested);
        self.doorbell(ch)?;
        Ok(r?)
    }

    /// Sends any packet (see [`Channel::try_send`]).
    pub fn send_packet(
        &mut self,
        ch: &mut GuestChannel,
        packet_type: u16,
        flags: u16,
        transaction_id: u64,
        type_header: &[u8],
        payload: &[u8],
    ) -> Result<(), ClientError> {
        let r = ch
            .channel
            .try_send(packet_type, flags, transaction_id, type_header, payload);
        self.doorbell(ch)?;
        Ok(r?)
    }

    /// Receives the next packet from the host, if any.
    pub fn recv(&mut self, ch: &mut GuestChannel) -> Result<Option<OwnedPacket>, ClientError> {
        let r = ch.channel.recv_owned();
        self.doorbell(ch)?;
        Ok(r?)
    }

    /// CLOSECHANNEL, then tears the ring GPADL down.
    pub fn close_channel(&mut self, ch: GuestChannel) -> Result<(), ClientError> {
        self.post(&hv::RelidMessage {
            header: MessageHeader::new(msgtype::CLOSE_CHANNEL),
            child_relid: ch.relid,
        })?;
        self.teardown_gpadl(ch.relid, ch.ring_gpadl)
    }

    /// RELID_RELEASED (the answer to a rescind).
    pub fn release_relid(&mut self, relid: u32) -> Result<(), ClientError> {
        self.post(&hv::RelidMessage {
            header: MessageHeader::new(msgtype::RELID_RELEASED),
            child_relid: relid,
        })
    }

    /// MODIFYCHANNEL. With 5.3 and later, waits for the response and returns its status.
    pub fn modify_channel(
        &mut self,
        relid: u32,
        target_vp: u32,
    ) -> Result<Option<i32>, ClientError> {
        self.post(&hv::ModifyChannel {
            header: MessageHeader::new(msgtype::MODIFY_CHANNEL),
            child_relid: relid,
            target_vp,
        })?;
        if self.version.is_some_and(|v| v >= version::WIN10_V5_3) {
            let m = self.wait_for(msgtype::MODIFY_CHANNEL_RESPONSE, |m| {
                parse::<hv::ModifyChannelResponse>(m).is_some_and(|r| r.child_relid == relid)
            })?;
            Ok(Some(
                parse::<hv::ModifyChannelResponse>(&m)
                    .expect("checked")
                    .status,
            ))
        } else {
            Ok(None)
        }
    }

    /// UNLOAD; waits for UNLOAD_RESPONSE and forgets the connection.
    pub fn unload(&mut self) -> Result<(), ClientError> {
        self.post(&MessageHeader::new(msgtype::UNLOAD))?;
        self.wait_for(msgtype::UNLOAD_RESPONSE, |_| true)?;
        self.version = None;
        self.offers.clear();
        self.pending.clear();
        Ok(())
    }
}
