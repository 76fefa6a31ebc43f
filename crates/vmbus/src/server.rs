//! The VMBus channel-management server: a sans-I/O state machine.
//!
//! Input: a message the guest posted with HvPostMessage ([`Server::post_message`]), a
//! doorbell ([`Server::signal_event`]), or a host request ([`Server::add_offer`],
//! [`Server::rescind`], [`Server::open_complete`]). Output: [`Action`]s, queued in order
//! and drained with [`Server::take_actions`]. The caller must carry out the actions in order:
//! a [`Action::CloseChannel`] must have stopped the device's ring access before a later
//! [`Action::SendMessage`] (for example a GPADL_TORNDOWN) reaches the guest.

use crate::packet::PagedRange;
use hvdef::vmbus::{self as hv, msgtype, version, Guid, MessageHeader};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Versions we accept, newest first. 6.0 is declined.
pub const SUPPORTED_VERSIONS: [u32; 8] = [
    version::WIN10_V5_3,
    version::WIN10_V5_2,
    version::WIN10_V5_1,
    version::WIN10_V5,
    version::WIN10_V4_1,
    version::WIN10,
    version::WIN8_1,
    version::WIN8,
];

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Number of VPs; target VPs must be below it.
    pub vp_count: u32,
    /// Newest protocol version to accept (default 5.3).
    pub max_version: u32,
    /// Most GPADLs that may exist at once.
    pub max_gpadls: usize,
    /// Most PFNs over all GPADLs (bounds host memory spent on guest page lists).
    pub max_total_pfns: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            vp_count: 1,
            max_version: version::WIN10_V5_3,
            max_gpadls: 4096,
            max_total_pfns: 1 << 21,
        }
    }
}

/// What the host offers for one device channel.
#[derive(Debug, Clone)]
pub struct OfferParams {
    pub interface_type: Guid,
    pub instance_id: Guid,
    pub channel_flags: u16,
    pub mmio_megabytes: u16,
    pub user_defined: [u8; hv::OFFER_USER_DEFINED_SIZE],
    pub sub_channel_index: u16,
}

impl OfferParams {
    pub fn new(interface_type: Guid, instance_id: Guid) -> Self {
        Self {
            interface_type,
            instance_id,
            channel_flags: 0,
            mmio_megabytes: 0,
            user_defined: [0; hv::OFFER_USER_DEFINED_SIZE],
            sub_channel_index: 0,
        }
    }
}

/// A message for the guest: goes into the SynIC message slot of `sint` on the target VP,
/// with SynIC message type 1.
#[derive(Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    len: u8,
    data: [u8; hv::MAX_MESSAGE_SIZE],
}

impl OutgoingMessage {
    fn new<T: IntoBytes + Immutable>(msg: &T) -> Self {
        let b = msg.as_bytes();
        let mut data = [0; hv::MAX_MESSAGE_SIZE];
        data[..b.len()].copy_from_slice(b);
        Self {
            len: b.len() as u8,
            data,
        }
    }

    /// The message bytes (channel message header first).
    pub fn as_bytes(&self) -> &[u8] {
        &self.data[..self.len as usize]
    }

    /// The channel message type.
    pub fn msgtype(&self) -> u32 {
        u32::from_le_bytes(self.data[..4].try_into().expect("4 bytes"))
    }
}

impl std::fmt::Debug for OutgoingMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutgoingMessage")
            .field("msgtype", &self.msgtype())
            .field("len", &self.len)
            .finish()
    }
}

/// Where host-to-guest interrupts of an open channel go. The VP changes with MODIFYCHANNEL,
/// so devices hold this and read [`SignalTarget::vp`] at each signal.
#[derive(Debug, Clone)]
pub struct SignalTarget {
    pub relid: u32,
    vp: Arc<AtomicU32>,
}

impl SignalTarget {
    /// The VP whose SIEF gets bit `relid` in SINT2's region.
    pub fn vp(&self) -> u32 {
        self.vp.load(Ordering::Relaxed)
    }
}

/// A validated OPENCHANNEL for the device to act on.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    pub relid: u32,
    /// Connection id the guest signals (HvSignalEvent) for this channel.
    pub connection_id: u32,
    /// The ring GPADL's pages (single range, whole pages).
    pub ring_pfns: Vec<u64>,
    /// First page of the host-to-guest ring.
    pub downstream_page_offset: u32,
    pub target: SignalTarget,
    pub user_data: [u8; hv::OPEN_USER_DATA_SIZE],
}

/// Something the caller must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Deliver `message` to VP `vp`, SINT `sint` (SynIC message type 1).
    SendMessage {
        vp: u32,
        sint: u8,
        message: OutgoingMessage,
    },
    /// Build the device's rings ([`crate::Channel::new`] with [`crate::Side::Host`]) and
    /// then call [`Server::open_complete`].
    OpenChannel(OpenRequest),
    /// Stop all ring access for this channel now.
    CloseChannel { relid: u32 },
    /// The channel's target VP changed (already visible through its [`SignalTarget`]).
    TargetVpChanged { relid: u32, vp: u32 },
    /// The guest released a rescinded channel (or never saw it); the relid is free.
    ChannelRemoved { relid: u32 },
    /// The guest unloaded (or reconnected): every channel is closed and all GPADLs gone.
    Reset,
}

/// Errors that fail the HvPostMessage hypercall itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PostError {
    #[error("unknown message connection id {0}")]
    InvalidConnectionId(u32),
    #[error("message payload of {0} bytes exceeds 240")]
    TooLong(usize),
}

impl PostError {
    /// The hypercall status for this error.
    pub fn hv_status(&self) -> u16 {
        match self {
            PostError::InvalidConnectionId(_) => 0x12,
            PostError::TooLong(_) => 0x05,
        }
    }
}

/// A guest message that was accepted by the hypercall but rejected by the protocol. The
/// guest gets the reply the protocol defines (a failure status) or none; nothing else
/// changes. Returned for logging and tests.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message too short for type {0}")]
    Truncated(u32),
    #[error("unknown or unsupported message type {0}")]
    UnknownType(u32),
    #[error("not connected")]
    NotConnected,
    #[error("offers already requested")]
    OffersAlreadyRequested,
    #[error("unknown channel relid {0}")]
    UnknownChannel(u32),
    #[error("channel {0} is in the wrong state for this message")]
    ChannelState(u32),
    #[error("GPADL id {0:#x} already exists")]
    DuplicateGpadl(u32),
    #[error("unknown GPADL id {0:#x}")]
    UnknownGpadl(u32),
    #[error("malformed GPADL {0:#x}: {1}")]
    BadGpadl(u32, &'static str),
    #[error("GPADL limit reached")]
    GpadlLimit,
    #[error("GPADL {0:#x} is in use by an open ring; teardown deferred until close")]
    GpadlInUse(u32),
    #[error("bad OPENCHANNEL for relid {0}: {1}")]
    BadOpen(u32, &'static str),
    #[error("invalid target VP {0}")]
    InvalidVp(u32),
}

/// Host-side API errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServerError {
    #[error("no free relid")]
    NoRelid,
    #[error("unknown relid {0}")]
    UnknownChannel(u32),
    #[error("channel {0} is not in a state that allows this")]
    ChannelState(u32),
    #[error("a channel with this interface and instance already exists")]
    DuplicateOffer,
}

/// Connection state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    Disconnected,
    Connected {
        version: u32,
        /// VP that gets channel-management messages.
        target_vp: u32,
        sint: u8,
        offers_requested: bool,
    },
}

/// Channel state.
#[derive(Debug, Clone)]
pub enum ChannelState {
    /// The current guest connection has not been sent this offer.
    NotOffered,
    /// Offered; not open.
    Offered,
    /// OPENCHANNEL validated, waiting for [`Server::open_complete`].
    Opening {
        openid: u32,
        ring_gpadl: u32,
        target: SignalTarget,
    },
    Open {
        openid: u32,
        ring_gpadl: u32,
        target: SignalTarget,
    },
    /// RESCIND sent; waiting for RELID_RELEASED.
    Rescinded,
}

/// GPADL state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpadlState {
    /// Header received; `words` holds what arrived of the range list (8-byte units).
    Building { expected_words: usize },
    /// Complete and acknowledged.
    Created,
    /// Teardown requested while its ring was open; TORNDOWN goes out on close.
    TeardownPending,
}

#[derive(Debug)]
struct ChannelEntry {
    offer: OfferParams,
    connection_id: u32,
    state: ChannelState,
    /// Downstream ring offset of the current open (for save/restore).
    downstream_offset: u32,
}

#[derive(Debug)]
struct GpadlEntry {
    relid: u32,
    /// Words counted in `Server::total_pfns`.
    accounted: usize,
    rangecount: u16,
    state: GpadlState,
    words: Vec<u64>,
    ranges: Vec<PagedRange>,
}

/// The channel-management server.
#[derive(Debug)]
pub struct Server {
    config: ServerConfig,
    connection: ConnectionState,
    channels: BTreeMap<u32, ChannelEntry>,
    gpadls: HashMap<u32, GpadlEntry>,
    total_pfns: usize,
    actions: VecDeque<Action>,
}

fn read<T: FromBytes>(data: &[u8], ty: u32) -> Result<T, ProtocolError> {
    T::read_from_prefix(data)
        .map(|(v, _)| v)
        .map_err(|_| ProtocolError::Truncated(ty))
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        Self {
            config,
            connection: ConnectionState::Disconnected,
            channels: BTreeMap::new(),
            gpadls: HashMap::new(),
            total_pfns: 0,
            actions: VecDeque::new(),
        }
    }

    /// Current connection state.
    pub fn connection(&self) -> &ConnectionState {
        &self.connection
    }

    /// Negotiated version, when connected.
    pub fn version(&self) -> Option<u32> {
        match self.connection {
            ConnectionState::Connected { version, .. } => Some(version),
            ConnectionState::Disconnected => None,
        }
    }

    /// State of channel `relid`.
    pub fn channel_state(&self, relid: u32) -> Option<&ChannelState> {
        self.channels.get(&relid).map(|c| &c.state)
    }

    /// State of GPADL `id`.
    pub fn gpadl_state(&self, id: u32) -> Option<&GpadlState> {
        self.gpadls.get(&id).map(|g| &g.state)
    }

    /// Ranges of a created GPADL (for devices that map guest buffers, e.g. receive buffers).
    pub fn gpadl_ranges(&self, id: u32) -> Option<&[PagedRange]> {
        self.gpadls
            .get(&id)
            .filter(|g| !matches!(g.state, GpadlState::Building { .. }))
            .map(|g| g.ranges.as_slice())
    }

    /// The created GPADLs of channel `relid` (id and ranges), for the device's buffers.
    pub fn channel_gpadls(&self, relid: u32) -> Vec<crate::device::GpadlEntry> {
        let mut v: Vec<crate::device::GpadlEntry> = self
            .gpadls
            .iter()
            .filter(|(_, g)| g.relid == relid && g.state == GpadlState::Created)
            .map(|(&id, g)| (id, Arc::from(g.ranges.as_slice())))
            .collect();
        v.sort_unstable_by_key(|(id, _)| *id);
        v
    }

    /// Connection id the guest signals for `relid`.
    pub fn connection_id(&self, relid: u32) -> Option<u32> {
        self.channels.get(&relid).map(|c| c.connection_id)
    }

    /// Drains the queued actions, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        self.actions.drain(..).collect()
    }

    /// Next queued action.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn send<T: IntoBytes + Immutable>(&mut self, msg: &T) {
        if let ConnectionState::Connected {
            target_vp, sint, ..
        } = self.connection
        {
            self.actions.push_back(Action::SendMessage {
                vp: target_vp,
                sint,
                message: OutgoingMessage::new(msg),
            });
        }
    }

    fn send_to<T: IntoBytes + Immutable>(&mut self, vp: u32, sint: u8, msg: &T) {
        self.actions.push_back(Action::SendMessage {
            vp,
            sint,
            message: OutgoingMessage::new(msg),
        });
    }

    // ---- host API --------------------------------------------------------------------------

    /// Registers a device channel and returns its relid (also its id for the host API).
    /// If the guest has already asked for offers, the offer goes out at once.
    pub fn add_offer(&mut self, offer: OfferParams) -> Result<u32, ServerError> {
        let relid = (1..=hv::MAX_RELID)
            .find(|r| !self.channels.contains_key(r))
            .ok_or(ServerError::NoRelid)?;
        self.add_offer_with_relid(offer, relid)
    }

    /// [`Server::add_offer`] with a chosen relid (restoring runtime-added subchannels).
    pub fn add_offer_with_relid(
        &mut self,
        offer: OfferParams,
        relid: u32,
    ) -> Result<u32, ServerError> {
        if self.channels.values().any(|c| {
            c.offer.interface_type == offer.interface_type
                && c.offer.instance_id == offer.instance_id
                && c.offer.sub_channel_index == offer.sub_channel_index
        }) {
            return Err(ServerError::DuplicateOffer);
        }
        if !(1..=hv::MAX_RELID).contains(&relid) || self.channels.contains_key(&relid) {
            return Err(ServerError::NoRelid);
        }
        self.channels.insert(
            relid,
            ChannelEntry {
                offer,
                connection_id: 0x2000 | relid,
                state: ChannelState::NotOffered,
                downstream_offset: 0,
            },
        );
        if let ConnectionState::Connected {
            offers_requested: true,
            ..
        } = self.connection
        {
            self.send_offer(relid);
        }
        Ok(relid)
    }

    fn send_offer(&mut self, relid: u32) {
        let Some(c) = self.channels.get_mut(&relid) else {
            return;
        };
        c.state = ChannelState::Offered;
        let msg = hv::OfferChannel {
            header: MessageHeader::new(msgtype::OFFER_CHANNEL),
            interface_type: c.offer.interface_type,
            interface_instance: c.offer.instance_id,
            reserved1: 0,
            reserved2: 0,
            chn_flags: c.offer.channel_flags,
            mmio_megabytes: c.offer.mmio_megabytes,
            user_defined: c.offer.user_defined,
            sub_channel_index: c.offer.sub_channel_index,
            reserved3: 0,
            child_relid: relid,
            monitor_id: 0xff,
            monitor_allocated: 0,
            is_dedicated_interrupt: 1,
            connection_id: c.connection_id,
        };
        self.send(&msg);
    }

    /// Host-initiated removal of a channel. Closes it if open, sends RESCIND_CHANNELOFFER,
    /// and frees the relid when the guest answers RELID_RELEASED (at once if the guest never
    /// saw the offer).
    pub fn rescind(&mut self, relid: u32) -> Result<(), ServerError> {
        let c = self
            .channels
            .get(&relid)
            .ok_or(ServerError::UnknownChannel(relid))?;
        match &c.state {
            ChannelState::Rescinded => Err(ServerError::ChannelState(relid)),
            ChannelState::NotOffered => {
                self.remove_channel(relid);
                Ok(())
            }
            _ => {
                if matches!(
                    c.state,
                    ChannelState::Open { .. } | ChannelState::Opening { .. }
                ) {
                    self.actions.push_back(Action::CloseChannel { relid });
                }
                self.channels.get_mut(&relid).expect("exists").state = ChannelState::Rescinded;
                self.send(&hv::RelidMessage {
                    header: MessageHeader::new(msgtype::RESCIND_CHANNEL_OFFER),
                    child_relid: relid,
                });
                Ok(())
            }
        }
    }

    fn remove_channel(&mut self, relid: u32) {
        self.channels.remove(&relid);
        let ids: Vec<u32> = self
            .gpadls
            .iter()
            .filter(|(_, g)| g.relid == relid)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.remove_gpadl(id);
        }
        self.actions.push_back(Action::ChannelRemoved { relid });
    }

    /// The device finished (or failed) opening channel `relid`: sends OPENCHANNEL_RESULT.
    /// `status` 0 is success; anything else fails the guest's open.
    pub fn open_complete(&mut self, relid: u32, status: u32) -> Result<(), ServerError> {
        let c = self
            .channels
            .get_mut(&relid)
            .ok_or(ServerError::UnknownChannel(relid))?;
        let ChannelState::Opening {
            openid,
            ring_gpadl,
            target,
        } = c.state.clone()
        else {
            return Err(ServerError::ChannelState(relid));
        };
        c.state = if status == 0 {
            ChannelState::Open {
                openid,
                ring_gpadl,
                target,
            }
        } else {
            ChannelState::Offered
        };
        self.send(&hv::OpenResult {
            header: MessageHeader::new(msgtype::OPEN_CHANNEL_RESULT),
            child_relid: relid,
            openid,
            status,
        });
        Ok(())
    }

    /// HvSignalEvent: maps a connection id to the open channel whose guest-to-host ring
    /// has new data. Err is HV_STATUS_INVALID_CONNECTION_ID (0x12).
    pub fn signal_event(&self, connection_id: u32) -> Result<u32, PostError> {
        let relid = connection_id ^ 0x2000;
        match self.channels.get(&relid) {
            Some(c)
                if c.connection_id == connection_id
                    && matches!(c.state, ChannelState::Open { .. }) =>
            {
                Ok(relid)
            }
            _ => Err(PostError::InvalidConnectionId(connection_id)),
        }
    }

    // ---- guest messages --------------------------------------------------------------------

    /// Handles one HvPostMessage payload from VP `vp`. `Err(PostError)` fails the hypercall
    /// with [`PostError::hv_status`]; `Ok(Err(ProtocolError))` means the hypercall succeeds
    /// but the message was refused (any reply the protocol defines is already queued).
    pub fn post_message(
        &mut self,
        connection_id: u32,
        vp: u32,
        data: &[u8],
    ) -> Result<Result<(), ProtocolError>, PostError> {
        if connection_id != hv::MESSAGE_CONNECTION_ID
            && connection_id != hv::MESSAGE_CONNECTION_ID_4
        {
            return Err(PostError::InvalidConnectionId(connection_id));
        }
        if data.len() > hv::MAX_MESSAGE_SIZE {
            return Err(PostError::TooLong(data.len()));
        }
        let r = self.handle(vp, data);
        if let Err(e) = &r {
            static LOG: support::RateLimit = support::RateLimit::guest();
            support::limited!(LOG, debug, error = %e, "vmbus: refused guest message");
        }
        Ok(r)
    }

    fn handle(&mut self, vp: u32, data: &[u8]) -> Result<(), ProtocolError> {
        let hdr: MessageHeader = read(data, 0)?;
        let ty = hdr.msgtype;
        match ty {
            msgtype::INITIATE_CONTACT => self.initiate_contact(vp, read(data, ty)?),
            msgtype::UNLOAD => {
                self.unload(vp);
                Ok(())
            }
            _ => {
                if self.connection == ConnectionState::Disconnected {
                    return Err(ProtocolError::NotConnected);
                }
                match ty {
                    msgtype::REQUEST_OFFERS => self.request_offers(),
                    msgtype::GPADL_HEADER => self.gpadl_header(read(data, ty)?, data),
                    msgtype::GPADL_BODY => self.gpadl_body(read(data, ty)?, data),
                    msgtype::GPADL_TEARDOWN => self.gpadl_teardown(read(data, ty)?),
                    msgtype::OPEN_CHANNEL => self.open_channel(read(data, ty)?),
                    msgtype::CLOSE_CHANNEL => {
                        self.close_channel(read::<hv::RelidMessage>(data, ty)?.child_relid)
                    }
                    msgtype::RELID_RELEASED => {
                        self.relid_released(read::<hv::RelidMessage>(data, ty)?.child_relid)
                    }
                    msgtype::MODIFY_CHANNEL => self.modify_channel(read(data, ty)?),
                    _ => Err(ProtocolError::UnknownType(ty)),
                }
            }
        }
    }

    /// Closes every channel and forgets all GPADLs; channels return to NotOffered and
    /// rescinded ones are removed.
    fn reset(&mut self) {
        let relids: Vec<u32> = self.channels.keys().copied().collect();
        for relid in relids {
            let c = self.channels.get_mut(&relid).expect("exists");
            match c.state {
                ChannelState::Open { .. } | ChannelState::Opening { .. } => {
                    c.state = ChannelState::NotOffered;
                    self.actions.push_back(Action::CloseChannel { relid });
                }
                ChannelState::Rescinded => {
                    self.remove_channel(relid);
                }
                _ => c.state = ChannelState::NotOffered,
            }
        }
        self.gpadls.clear();
        self.total_pfns = 0;
        self.connection = ConnectionState::Disconnected;
        self.actions.push_back(Action::Reset);
    }

    fn initiate_contact(&mut self, vp: u32, m: hv::InitiateContact) -> Result<(), ProtocolError> {
        if self.connection != ConnectionState::Disconnected {
            // A reconnect (kexec, hibernate resume): start over.
            self.reset();
        }
        let requested = m.version_requested;
        let target_vp = if m.target_vcpu < self.config.vp_count {
            m.target_vcpu
        } else {
            vp
        };
        let sint = if requested >= version::WIN10_V5 {
            m.msg_sint()
        } else {
            hv::MESSAGE_SINT
        };
        let ok = requested <= self.config.max_version
            && SUPPORTED_VERSIONS.contains(&requested)
            && (1..16).contains(&sint);
        let reply = hv::VersionResponse {
            header: MessageHeader::new(msgtype::VERSION_RESPONSE),
            version_supported: ok as u8,
            connection_state: 0,
            padding: 0,
            msg_conn_id: if ok { hv::MESSAGE_CONNECTION_ID } else { 0 },
        };
        if !ok {
            let reply_sint = if (1..16).contains(&sint) {
                sint
            } else {
                hv::MESSAGE_SINT
            };
            self.send_to(target_vp, reply_sint, &reply);
            // Declining is normal negotiation, not an error.
            return Ok(());
        }
        self.connection = ConnectionState::Connected {
            version: requested,
            target_vp,
            sint,
            offers_requested: false,
        };
        self.send(&reply);
        Ok(())
    }

    fn unload(&mut self, vp: u32) {
        let (target, sint) = match self.connection {
            ConnectionState::Connected {
                target_vp, sint, ..
            } => (target_vp, sint),
            ConnectionState::Disconnected => (vp, hv::MESSAGE_SINT),
        };
        self.reset();
        self.send_to(target, sint, &MessageHeader::new(msgtype::UNLOAD_RESPONSE));
    }

    fn request_offers(&mut self) -> Result<(), ProtocolError> {
        let ConnectionState::Connected {
            offers_requested, ..
        } = &mut self.connection
        else {
            return Err(ProtocolError::NotConnected);
        };
        if *offers_requested {
            return Err(ProtocolError::OffersAlreadyRequested);
        }
        *offers_requested = true;
        let relids: Vec<u32> = self
            .channels
            .iter()
            .filter(|(_, c)| matches!(c.state, ChannelState::NotOffered))
            .map(|(&r, _)| r)
            .collect();
        for relid in relids {
            self.send_offer(relid);
        }
        self.send(&MessageHeader::new(msgtype::ALL_OFFERS_DELIVERED));
        Ok(())
    }

    fn gpadl_created(&mut self, relid: u32, gpadl: u32, status: u32) {
        self.send(&hv::GpadlCreated {
            header: MessageHeader::new(msgtype::GPADL_CREATED),
            child_relid: relid,
            gpadl,
            creation_status: status,
        });
    }

    fn channel_accepts_gpadl(&self, relid: u32) -> bool {
        self.channels
            .get(&relid)
            .is_some_and(|c| !matches!(c.state, ChannelState::NotOffered | ChannelState::Rescinded))
    }

    fn gpadl_header(&mut self, h: hv::GpadlHeader, data: &[u8]) -> Result<(), ProtocolError> {
        let (relid, id) = (h.child_relid, h.gpadl);
        if self.gpadls.contains_key(&id) {
            // Leave the existing GPADL alone; fail this creation.
            self.gpadl_created(relid, id, hv::STATUS_UNSUCCESSFUL);
            return Err(ProtocolError::DuplicateGpadl(id));
        }
        let fail = |s: &mut Self, e: ProtocolError| {
            s.gpadl_created(relid, id, hv::STATUS_UNSUCCESSFUL);
            Err(e)
        };
        if !self.channel_accepts_gpadl(relid) {
            return fail(self, ProtocolError::UnknownChannel(relid));
        }
        let buflen = h.range_buflen as usize;
        let rest = &data[size_of::<hv::GpadlHeader>()..];
        if h.rangecount == 0
            || !buflen.is_multiple_of(8)
            || buflen < 16 * h.rangecount as usize
            || !rest.len().is_multiple_of(8)
        {
            return fail(self, ProtocolError::BadGpadl(id, "bad range list size"));
        }
        if rest.len() > buflen {
            return fail(
                self,
                ProtocolError::BadGpadl(id, "more data than range_buflen"),
            );
        }
        let expected_words = buflen / 8;
        if self.gpadls.len() >= self.config.max_gpadls
            || self.total_pfns + expected_words > self.config.max_total_pfns
        {
            return fail(self, ProtocolError::GpadlLimit);
        }
        let words: Vec<u64> = rest
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut entry = GpadlEntry {
            relid,
            accounted: expected_words,
            rangecount: h.rangecount,
            state: GpadlState::Building { expected_words },
            words: Vec::with_capacity(expected_words),
            ranges: Vec::new(),
        };
        entry.words.extend_from_slice(&words);
        // Accounted at the announced size, so GPADLs still building count against the
        // budget too.
        self.total_pfns += expected_words;
        self.gpadls.insert(id, entry);
        self.try_finish_gpadl(id)
    }

    fn try_finish_gpadl(&mut self, id: u32) -> Result<(), ProtocolError> {
        let g = self.gpadls.get_mut(&id).expect("exists");
        let GpadlState::Building { expected_words } = g.state else {
            return Ok(());
        };
        if g.words.len() < expected_words {
            return Ok(());
        }
        let relid = g.relid;
        let bytes: Vec<u8> = g.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        match PagedRange::parse_list(&bytes, g.rangecount as u32) {
            Ok((ranges, used))
                if used == bytes.len() && ranges.iter().all(|r| r.byte_count > 0) =>
            {
                g.ranges = ranges;
                g.state = GpadlState::Created;
                self.gpadl_created(relid, id, 0);
                Ok(())
            }
            _ => {
                self.remove_gpadl(id);
                self.gpadl_created(relid, id, hv::STATUS_UNSUCCESSFUL);
                Err(ProtocolError::BadGpadl(
                    id,
                    "range list does not match its PFN count",
                ))
            }
        }
    }

    fn remove_gpadl(&mut self, id: u32) {
        if let Some(g) = self.gpadls.remove(&id) {
            self.total_pfns -= g.accounted;
        }
    }

    fn gpadl_body(&mut self, b: hv::GpadlBody, data: &[u8]) -> Result<(), ProtocolError> {
        let id = b.gpadl;
        let Some(g) = self.gpadls.get_mut(&id) else {
            return Err(ProtocolError::UnknownGpadl(id));
        };
        let GpadlState::Building { expected_words } = g.state else {
            return Err(ProtocolError::BadGpadl(id, "body for a complete GPADL"));
        };
        let rest = &data[size_of::<hv::GpadlBody>()..];
        let relid = g.relid;
        if !rest.len().is_multiple_of(8) || g.words.len() + rest.len() / 8 > expected_words {
            self.remove_gpadl(id);
            self.gpadl_created(relid, id, hv::STATUS_UNSUCCESSFUL);
            return Err(ProtocolError::BadGpadl(
                id,
                "more PFNs than the header announced",
            ));
        }
        g.words.extend(
            rest.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
        );
        self.try_finish_gpadl(id)
    }

    fn ring_in_use(&self, id: u32) -> bool {
        self.channels.values().any(|c| match &c.state {
            ChannelState::Open { ring_gpadl, .. } | ChannelState::Opening { ring_gpadl, .. } => {
                *ring_gpadl == id
            }
            _ => false,
        })
    }

    fn gpadl_teardown(&mut self, t: hv::GpadlTeardown) -> Result<(), ProtocolError> {
        let id = t.gpadl;
        let Some(g) = self.gpadls.get(&id) else {
            return Err(ProtocolError::UnknownGpadl(id));
        };
        if g.relid != t.child_relid {
            return Err(ProtocolError::BadGpadl(
                id,
                "teardown names another channel",
            ));
        }
        if self.ring_in_use(id) {
            self.gpadls.get_mut(&id).expect("exists").state = GpadlState::TeardownPending;
            return Err(ProtocolError::GpadlInUse(id));
        }
        self.remove_gpadl(id);
        self.send(&hv::GpadlTorndown {
            header: MessageHeader::new(msgtype::GPADL_TORNDOWN),
            gpadl: id,
        });
        Ok(())
    }

    fn open_channel(&mut self, m: hv::OpenChannel) -> Result<(), ProtocolError> {
        let relid = m.child_relid;
        let openid = m.openid;
        let result = self.validate_open(&m);
        match result {
            Ok(ring_pfns) => {
                let target = SignalTarget {
                    relid,
                    vp: Arc::new(AtomicU32::new(m.target_vp)),
                };
                let c = self.channels.get_mut(&relid).expect("validated");
                c.downstream_offset = m.downstream_ring_page_offset;
                c.state = ChannelState::Opening {
                    openid,
                    ring_gpadl: m.ring_gpadl,
                    target: target.clone(),
                };
                self.actions.push_back(Action::OpenChannel(OpenRequest {
                    relid,
                    connection_id: c.connection_id,
                    ring_pfns,
                    downstream_page_offset: m.downstream_ring_page_offset,
                    target,
                    user_data: m.user_data,
                }));
                Ok(())
            }
            Err(e) => {
                let status = match e {
                    ProtocolError::InvalidVp(_) | ProtocolError::BadOpen(..) => {
                        hv::STATUS_INVALID_PARAMETER
                    }
                    _ => hv::STATUS_UNSUCCESSFUL,
                };
                self.send(&hv::OpenResult {
                    header: MessageHeader::new(msgtype::OPEN_CHANNEL_RESULT),
                    child_relid: relid,
                    openid,
                    status,
                });
                Err(e)
            }
        }
    }

    fn validate_open(&self, m: &hv::OpenChannel) -> Result<Vec<u64>, ProtocolError> {
        let relid = m.child_relid;
        let c = self
            .channels
            .get(&relid)
            .ok_or(ProtocolError::UnknownChannel(relid))?;
        if !matches!(c.state, ChannelState::Offered) {
            return Err(ProtocolError::ChannelState(relid));
        }
        let gid = m.ring_gpadl;
        let g = self
            .gpadls
            .get(&gid)
            .filter(|g| g.state == GpadlState::Created && g.relid == relid)
            .ok_or(ProtocolError::BadOpen(
                relid,
                "ring GPADL unknown or not ready",
            ))?;
        let [r] = g.ranges.as_slice() else {
            return Err(ProtocolError::BadOpen(
                relid,
                "ring GPADL has several ranges",
            ));
        };
        if r.byte_offset != 0 || r.byte_count as u64 != r.pfns.len() as u64 * 4096 {
            return Err(ProtocolError::BadOpen(
                relid,
                "ring GPADL is not whole pages",
            ));
        }
        let off = m.downstream_ring_page_offset as usize;
        if off < 2 || off + 2 > r.pfns.len() {
            return Err(ProtocolError::BadOpen(relid, "bad downstream ring offset"));
        }
        if m.target_vp >= self.config.vp_count {
            return Err(ProtocolError::InvalidVp(m.target_vp));
        }
        Ok(r.pfns.clone())
    }

    fn close_channel(&mut self, relid: u32) -> Result<(), ProtocolError> {
        let c = self
            .channels
            .get_mut(&relid)
            .ok_or(ProtocolError::UnknownChannel(relid))?;
        match c.state {
            ChannelState::Open { .. } | ChannelState::Opening { .. } => {
                c.state = ChannelState::Offered;
                self.actions.push_back(Action::CloseChannel { relid });
                // Teardowns deferred while the ring was open complete now.
                let mut pending: Vec<u32> = self
                    .gpadls
                    .iter()
                    .filter(|(_, g)| g.relid == relid && g.state == GpadlState::TeardownPending)
                    .map(|(&id, _)| id)
                    .collect();
                pending.sort_unstable();
                for id in pending {
                    self.remove_gpadl(id);
                    self.send(&hv::GpadlTorndown {
                        header: MessageHeader::new(msgtype::GPADL_TORNDOWN),
                        gpadl: id,
                    });
                }
                Ok(())
            }
            _ => Err(ProtocolError::ChannelState(relid)),
        }
    }

    fn relid_released(&mut self, relid: u32) -> Result<(), ProtocolError> {
        let c = self
            .channels
            .get(&relid)
            .ok_or(ProtocolError::UnknownChannel(relid))?;
        if !matches!(c.state, ChannelState::Rescinded) {
            return Err(ProtocolError::ChannelState(relid));
        }
        self.remove_channel(relid);
        Ok(())
    }

    fn modify_channel(&mut self, m: hv::ModifyChannel) -> Result<(), ProtocolError> {
        let relid = m.child_relid;
        let vp = m.target_vp;
        let result = match self.channels.get(&relid).map(|c| &c.state) {
            None => Err(ProtocolError::UnknownChannel(relid)),
            Some(ChannelState::Open { target, .. }) => {
                if vp < self.config.vp_count {
                    target.vp.store(vp, Ordering::Relaxed);
                    Ok(())
                } else {
                    Err(ProtocolError::InvalidVp(vp))
                }
            }
            Some(_) => Err(ProtocolError::ChannelState(relid)),
        };
        if result.is_ok() {
            self.actions
                .push_back(Action::TargetVpChanged { relid, vp });
        }
        if self.version().is_some_and(|v| v >= version::WIN10_V5_3) {
            self.send(&hv::ModifyChannelResponse {
                header: MessageHeader::new(msgtype::MODIFY_CHANNEL_RESPONSE),
                child_relid: relid,
                status: if result.is_ok() {
                    0
                } else {
                    hv::STATUS_INVALID_PARAMETER as i32
                },
            });
        }
        result
    }
}

// ---- save / restore / inspection ----------------------------------------------------------

/// Saved connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedConnection {
    pub version: u32,
    pub target_vp: u32,
    pub sint: u8,
    pub offers_requested: bool,
}

/// Saved channel state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SavedChannelState {
    NotOffered,
    Offered,
    Opening {
        openid: u32,
        ring_gpadl: u32,
        target_vp: u32,
        downstream_page_offset: u32,
    },
    Open {
        openid: u32,
        ring_gpadl: u32,
        target_vp: u32,
        downstream_page_offset: u32,
    },
    Rescinded,
}

/// Saved channel (offer and state). GUIDs are their canonical text form.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedChannel {
    pub relid: u32,
    pub interface_type: String,
    pub instance_id: String,
    pub sub_channel_index: u16,
    pub state: SavedChannelState,
}

/// Saved GPADL.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedGpadl {
    pub id: u32,
    pub relid: u32,
    pub rangecount: u16,
    /// `Some(n)` while building: n words expected in total.
    pub building: Option<usize>,
    pub teardown_pending: bool,
    /// The range list as received (8-byte words).
    pub words: Vec<u64>,
}

/// Everything the server knows, for save/restore and inspection (serialize it to JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    pub connection: Option<SavedConnection>,
    pub channels: Vec<SavedChannel>,
    pub gpadls: Vec<SavedGpadl>,
}

/// Restore errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("saved channel {0} does not match the offer registered with that relid")]
    OfferMismatch(u32),
    #[error("saved state is inconsistent: {0}")]
    Inconsistent(&'static str),
}

impl Server {
    /// Snapshot of the state (also the inspection dump).
    pub fn save(&self) -> SavedState {
        let channels = self
            .channels
            .iter()
            .map(|(&relid, c)| SavedChannel {
                relid,
                interface_type: c.offer.interface_type.to_string(),
                instance_id: c.offer.instance_id.to_string(),
                sub_channel_index: c.offer.sub_channel_index,
                state: match &c.state {
                    ChannelState::NotOffered => SavedChannelState::NotOffered,
                    ChannelState::Offered => SavedChannelState::Offered,
                    ChannelState::Opening {
                        openid,
                        ring_gpadl,
                        target,
                    } => SavedChannelState::Opening {
                        openid: *openid,
                        ring_gpadl: *ring_gpadl,
                        target_vp: target.vp(),
                        downstream_page_offset: c.downstream_offset,
                    },
                    ChannelState::Open {
                        openid,
                        ring_gpadl,
                        target,
                    } => SavedChannelState::Open {
                        openid: *openid,
                        ring_gpadl: *ring_gpadl,
                        target_vp: target.vp(),
                        downstream_page_offset: c.downstream_offset,
                    },
                    ChannelState::Rescinded => SavedChannelState::Rescinded,
                },
            })
            .collect();
        let mut gpadls: Vec<SavedGpadl> = self
            .gpadls
            .iter()
            .map(|(&id, g)| SavedGpadl {
                id,
                relid: g.relid,
                rangecount: g.rangecount,
                building: match g.state {
                    GpadlState::Building { expected_words } => Some(expected_words),
                    _ => None,
                },
                teardown_pending: g.state == GpadlState::TeardownPending,
                words: g.words.clone(),
            })
            .collect();
        gpadls.sort_by_key(|g| g.id);
        SavedState {
            connection: match self.connection {
                ConnectionState::Disconnected => None,
                ConnectionState::Connected {
                    version,
                    target_vp,
                    sint,
                    offers_requested,
                } => Some(SavedConnection {
                    version,
                    target_vp,
                    sint,
                    offers_requested,
                }),
            },
            channels,
            gpadls,
        }
    }

    /// Applies a saved state to a server whose offers were registered again (same relids).
    /// Returns the open requests of channels that were open or opening: the caller rebuilds
    /// their rings (the indices live in guest memory) and, for opening ones, calls
    /// [`Server::open_complete`]. Saved channels must match the registered offers.
    pub fn restore(&mut self, saved: &SavedState) -> Result<Vec<OpenRequest>, RestoreError> {
        for sc in &saved.channels {
            let c = self
                .channels
                .get(&sc.relid)
                .ok_or(RestoreError::OfferMismatch(sc.relid))?;
            if c.offer.interface_type.to_string() != sc.interface_type
                || c.offer.instance_id.to_string() != sc.instance_id
                || c.offer.sub_channel_index != sc.sub_channel_index
            {
                return Err(RestoreError::OfferMismatch(sc.relid));
            }
        }
        // Saved state is input from a file: check everything the guest could not have set.
        if let Some(c) = &saved.connection {
            if !SUPPORTED_VERSIONS.contains(&c.version) || c.version > self.config.max_version {
                return Err(RestoreError::Inconsistent("connection version"));
            }
            if c.target_vp >= self.config.vp_count {
                return Err(RestoreError::Inconsistent("connection target VP"));
            }
            if !(1..16).contains(&c.sint) {
                return Err(RestoreError::Inconsistent("connection SINT"));
            }
        }
        if saved.gpadls.len() > self.config.max_gpadls {
            return Err(RestoreError::Inconsistent("too many GPADLs"));
        }
        let mut gpadls = HashMap::new();
        let mut total = 0usize;
        for g in &saved.gpadls {
            let expected = g.building.unwrap_or(g.words.len());
            if g.words.len() > expected || gpadls.contains_key(&g.id) {
                return Err(RestoreError::Inconsistent("GPADL words"));
            }
            let mut entry = GpadlEntry {
                relid: g.relid,
                accounted: expected,
                rangecount: g.rangecount,
                state: GpadlState::Created,
                words: g.words.clone(),
                ranges: Vec::new(),
            };
            if let Some(expected_words) = g.building {
                entry.state = GpadlState::Building { expected_words };
            } else {
                let bytes: Vec<u8> = g.words.iter().flat_map(|w| w.to_le_bytes()).collect();
                let (ranges, used) = PagedRange::parse_list(&bytes, g.rangecount as u32)
                    .map_err(|_| RestoreError::Inconsistent("GPADL ranges"))?;
                if used != bytes.len() {
                    return Err(RestoreError::Inconsistent("GPADL ranges"));
                }
                entry.ranges = ranges;
                if g.teardown_pending {
                    entry.state = GpadlState::TeardownPending;
                }
            }
            total += expected;
            gpadls.insert(g.id, entry);
        }
        let mut opens = Vec::new();
        let mut states = Vec::new();
        for sc in &saved.channels {
            let state = match &sc.state {
                SavedChannelState::NotOffered => (ChannelState::NotOffered, 0),
                SavedChannelState::Offered => (ChannelState::Offered, 0),
                SavedChannelState::Rescinded => (ChannelState::Rescinded, 0),
                SavedChannelState::Opening {
                    openid,
                    ring_gpadl,
                    target_vp,
                    downstream_page_offset,
                }
                | SavedChannelState::Open {
                    openid,
                    ring_gpadl,
                    target_vp,
                    downstream_page_offset,
                } => {
                    let g = gpadls
                        .get(ring_gpadl)
                        .filter(|g| g.relid == sc.relid && g.ranges.len() == 1)
                        .ok_or(RestoreError::Inconsistent("ring GPADL"))?;
                    if *target_vp >= self.config.vp_count {
                        return Err(RestoreError::Inconsistent("channel target VP"));
                    }
                    let pages = g.ranges[0].pfns.len();
                    let off = *downstream_page_offset as usize;
                    if saved.connection.is_none() || off < 2 || off + 2 > pages {
                        return Err(RestoreError::Inconsistent("channel ring layout"));
                    }
                    let target = SignalTarget {
                        relid: sc.relid,
                        vp: Arc::new(AtomicU32::new(*target_vp)),
                    };
                    let c = &self.channels[&sc.relid];
                    opens.push(OpenRequest {
                        relid: sc.relid,
                        connection_id: c.connection_id,
                        ring_pfns: g.ranges[0].pfns.clone(),
                        downstream_page_offset: *downstream_page_offset,
                        target: target.clone(),
                        user_data: [0; hv::OPEN_USER_DATA_SIZE],
                    });
                    let st = if matches!(sc.state, SavedChannelState::Open { .. }) {
                        ChannelState::Open {
                            openid: *openid,
                            ring_gpadl: *ring_gpadl,
                            target,
                        }
                    } else {
                        ChannelState::Opening {
                            openid: *openid,
                            ring_gpadl: *ring_gpadl,
                            target,
                        }
                    };
                    (st, *downstream_page_offset)
                }
            };
            states.push((sc.relid, state));
        }
        for (relid, (state, off)) in states {
            let c = self.channels.get_mut(&relid).expect("checked");
            c.state = state;
            c.downstream_offset = off;
        }
        if total > self.config.max_total_pfns
            || gpadls
                .values()
                .any(|g: &GpadlEntry| !self.channels.contains_key(&g.relid))
        {
            return Err(RestoreError::Inconsistent("GPADL owners or sizes"));
        }
        self.gpadls = gpadls;
        self.total_pfns = total;
        self.connection = match &saved.connection {
            None => ConnectionState::Disconnected,
            Some(c) => ConnectionState::Connected {
                version: c.version,
                target_vp: c.target_vp,
                sint: c.sint,
                offers_requested: c.offers_requested,
            },
        };
        Ok(opens)
    }
}
