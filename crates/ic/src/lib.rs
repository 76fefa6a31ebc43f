//! Hyper-V integration services (hv_utils' counterparts) as VMBus devices: shutdown,
//! heartbeat and time synchronization.
//!
//! Each service is an [`Ic`]: a sans-I/O state machine driven through a
//! [`vmbus::Channel`]. The worker calls [`Ic::open`] when the guest opens the channel (the
//! host speaks first: version negotiation), [`Ic::process`] on every doorbell, and the
//! service requests ([`Ic::request_shutdown`], [`Ic::send_heartbeat`], [`Ic::send_timesync`])
//! when it wants. Guest answers are hostile input: anything malformed is dropped with an
//! [`IcError`] and never panics.
#![forbid(unsafe_code)]

use hvdef::ic::{
    self as wire, flags, msgtype, HeartbeatMessage, IcMessageHeader, IcVersion, NegotiateHeader,
    PipeHeader, ShutdownMessage, TimesyncMessage, TimesyncRefMessage, FRAMEWORK_1_0, FRAMEWORK_3_0,
    IC_BODY_OFFSET,
};
use hvdef::vmbus::{guid, packet_type, Guid};
use std::time::{Duration, Instant};
use vmbus::{Channel, ChannelError, OfferParams};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes};

/// Framework versions offered (Linux picks 3.0, then 1.0).
pub const FRAMEWORK_VERSIONS: [IcVersion; 2] = [FRAMEWORK_3_0, FRAMEWORK_1_0];

/// Which integration service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcKind {
    Shutdown,
    Heartbeat,
    Timesync,
}

impl IcKind {
    /// The service's interface type GUID.
    pub fn interface_type(self) -> Guid {
        match self {
            IcKind::Shutdown => guid::SHUTDOWN_IC,
            IcKind::Heartbeat => guid::HEARTBEAT_IC,
            IcKind::Timesync => guid::TIMESYNC_IC,
        }
    }

    /// The IC message type of the service's requests.
    pub fn msgtype(self) -> u16 {
        match self {
            IcKind::Shutdown => msgtype::SHUTDOWN,
            IcKind::Heartbeat => msgtype::HEARTBEAT,
            IcKind::Timesync => msgtype::TIMESYNC,
        }
    }

    /// Message versions offered, newest first.
    pub fn versions(self) -> &'static [IcVersion] {
        const SHUTDOWN: [IcVersion; 4] = [
            IcVersion::new(3, 2),
            IcVersion::new(3, 1),
            IcVersion::new(3, 0),
            IcVersion::new(1, 0),
        ];
        const TIMESYNC: [IcVersion; 3] = [
            IcVersion::new(4, 0),
            IcVersion::new(3, 0),
            IcVersion::new(1, 0),
        ];
        const HEARTBEAT: [IcVersion; 2] = [IcVersion::new(3, 0), IcVersion::new(1, 0)];
        match self {
            IcKind::Shutdown => &SHUTDOWN,
            IcKind::Heartbeat => &HEARTBEAT,
            IcKind::Timesync => &TIMESYNC,
        }
    }

    /// Offer parameters for a channel of this service.
    pub fn offer(self, instance_id: Guid) -> OfferParams {
        OfferParams::new(self.interface_type(), instance_id)
    }
}

/// IC errors. Malformed guest packets are dropped; the state does not change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IcError {
    #[error("channel: {0}")]
    Channel(#[from] ChannelError),
    #[error("the service has not finished version negotiation")]
    NotReady,
    #[error("a request is already outstanding")]
    Busy,
    #[error("malformed IC packet: {0}")]
    Malformed(&'static str),
    #[error("unexpected IC message type {0}")]
    UnexpectedType(u16),
    #[error("the guest chose version {0}.{1}, which was not offered")]
    BadVersion(u16, u16),
    #[error("operation not supported by this service")]
    WrongService,
}

/// Negotiation / lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcState {
    /// The guest has not opened the channel.
    Closed,
    /// NEGOTIATE sent, waiting for the guest's answer.
    Negotiating,
    /// Versions agreed.
    Ready {
        framework: IcVersion,
        message: IcVersion,
    },
    /// No common version: the service is unusable until reopened.
    NoCommonVersion,
}

/// Heartbeat health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatState {
    /// No heartbeat answered yet.
    NoContact,
    /// The last answer came within the timeout.
    Healthy,
    /// Answers stopped arriving.
    Lost,
}

/// Kind of shutdown requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownKind {
    PowerOff,
    Reboot,
    Hibernate,
}

/// What a processed guest packet meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IcEvent {
    Negotiated {
        framework: IcVersion,
        message: IcVersion,
    },
    NegotiationFailed,
    /// The guest answered a shutdown request (status 0 = it is shutting down).
    ShutdownResponse {
        status: u32,
    },
    /// The guest answered heartbeat `seq` with `seq + 1`.
    HeartbeatAck {
        seq: u64,
    },
    /// The guest acknowledged a time sample.
    TimesyncAck {
        status: u32,
    },
}

/// Clock inputs of the timesync service.
pub trait TimeSource: Send {
    /// Host wall-clock time, 100 ns units since 1601-01-01 UTC.
    fn host_time_100ns(&self) -> u64;
    /// The guest's reference counter (TIME_REF_COUNT, 100 ns units) now.
    fn guest_reference_time(&self) -> u64;
}

/// [`TimeSource`] using the host's system clock and a callback for the reference counter.
pub struct SystemTimeSource<F>(pub F);

impl<F: Fn() -> u64 + Send> TimeSource for SystemTimeSource<F> {
    fn host_time_100ns(&self) -> u64 {
        let since_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        wire::EPOCH_DELTA_100NS + (since_unix.as_nanos() / 100) as u64
    }

    fn guest_reference_time(&self) -> u64 {
        (self.0)()
    }
}

enum Service {
    Shutdown {
        outstanding: Option<u64>,
    },
    Heartbeat {
        seq: u64,
        outstanding: Option<u64>,
        last_ack: Option<Instant>,
        timeout: Duration,
    },
    Timesync {
        clock: Box<dyn TimeSource>,
        synced: bool,
    },
}

/// One integration service.
pub struct Ic {
    kind: IcKind,
    state: IcState,
    service: Service,
    next_transaction: u64,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Ic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ic")
            .field("kind", &self.kind)
            .field("state", &self.state)
            .finish()
    }
}

fn ic_packet<T: IntoBytes + Immutable + ?Sized>(
    ty: u16,
    framework: IcVersion,
    message: IcVersion,
    transaction: u8,
    body: &T,
) -> Vec<u8> {
    let body = body.as_bytes();
    let hdr = IcMessageHeader {
        framework_version: framework,
        msgtype: ty,
        message_version: message,
        msgsize: body.len() as u16,
        status: 0,
        transaction_id: transaction,
        flags: flags::TRANSACTION | flags::REQUEST,
        reserved: [0; 2],
    };
    let pipe = PipeHeader {
        pipe_type: wire::PIPE_TYPE_DATA,
        size: (size_of::<IcMessageHeader>() + body.len()) as u32,
    };
    let mut v = Vec::with_capacity(IC_BODY_OFFSET + body.len());
    v.extend_from_slice(pipe.as_bytes());
    v.extend_from_slice(hdr.as_bytes());
    v.extend_from_slice(body);
    v
}

impl Ic {
    fn new(kind: IcKind, service: Service) -> Self {
        Self {
            kind,
            state: IcState::Closed,
            service,
            next_transaction: 1,
            buf: Vec::new(),
        }
    }

    /// The shutdown service.
    pub fn shutdown() -> Self {
        Self::new(IcKind::Shutdown, Service::Shutdown { outstanding: None })
    }

    /// The heartbeat service; the guest counts as lost when no heartbeat was answered for
    /// `timeout`.
    pub fn heartbeat(timeout: Duration) -> Self {
        Self::new(
            IcKind::Heartbeat,
            Service::Heartbeat {
                seq: 0,
                outstanding: None,
                last_ack: None,
                timeout,
            },
        )
    }

    /// The time synchronization service. A SYNC goes out as soon as versions are agreed.
    pub fn timesync(clock: Box<dyn TimeSource>) -> Self {
        Self::new(
            IcKind::Timesync,
            Service::Timesync {
                clock,
                synced: false,
            },
        )
    }

    pub fn kind(&self) -> IcKind {
        self.kind
    }

    pub fn state(&self) -> IcState {
        self.state
    }

    fn transaction(&mut self) -> u64 {
        let t = self.next_transaction;
        self.next_transaction += 1;
        t
    }

    /// The guest opened the channel: send NEGOTIATE.
    pub fn open(&mut self, ch: &mut Channel) -> Result<(), IcError> {
        self.state = IcState::Negotiating;
        self.reset_service();
        let versions = self.kind.versions();
        let mut body = NegotiateHeader {
            framework_count: FRAMEWORK_VERSIONS.len() as u16,
            message_count: versions.len() as u16,
            reserved: 0,
        }
        .as_bytes()
        .to_vec();
        for v in FRAMEWORK_VERSIONS.iter().chain(versions) {
            body.extend_from_slice(v.as_bytes());
        }
        let t = self.transaction();
        let pkt = ic_packet(
            msgtype::NEGOTIATE,
            FRAMEWORK_1_0,
            FRAMEWORK_1_0,
            0,
            &body[..],
        );
        ch.send_inband(t, &pkt, false)?;
        Ok(())
    }

    /// The channel closed (or the guest reset).
    pub fn close(&mut self) {
        self.state = IcState::Closed;
        self.reset_service();
    }

    fn reset_service(&mut self) {
        match &mut self.service {
            Service::Shutdown { outstanding } => *outstanding = None,
            Service::Heartbeat {
                outstanding,
                last_ack,
                ..
            } => {
                *outstanding = None;
                *last_ack = None;
            }
            Service::Timesync { synced, .. } => *synced = false,
        }
    }

    fn ready(&self) -> Result<(IcVersion, IcVersion), IcError> {
        match self.state {
            IcState::Ready { framework, message } => Ok((framework, message)),
            _ => Err(IcError::NotReady),
        }
    }

    /// Handles every packet the guest has sent. Malformed packets are dropped (and the first
    /// such error is returned after the ring is drained); ring corruption is returned at once.
    pub fn process(&mut self, ch: &mut Channel, now: Instant) -> Result<Vec<IcEvent>, IcError> {
        let mut events = Vec::new();
        let mut first_err = None;
        loop {
            let mut buf = std::mem::take(&mut self.buf);
            let r = match ch.try_recv(&mut buf) {
                Ok(Some(p)) => {
                    let r = if p.packet_type() == packet_type::DATA_INBAND {
                        self.handle(p.payload(), now)
                    } else if p.packet_type() == packet_type::COMPLETION {
                        Ok(None)
                    } else {
                        Err(IcError::Malformed("not an in-band packet"))
                    };
                    Some(r)
                }
                Ok(None) => None,
                Err(e) => {
                    self.buf = buf;
                    return Err(e.into());
                }
            };
            self.buf = buf;
            match r {
                None => break,
                Some(Ok(Some(ev))) => {
                    let negotiated = matches!(ev, IcEvent::Negotiated { .. });
                    events.push(ev);
                    if negotiated {
                        if let Service::Timesync { .. } = self.service {
                            self.send_timesync(ch, true)?;
                        }
                    }
                }
                Some(Ok(None)) => {}
                Some(Err(e)) => {
                    tracing::debug!(service = ?self.kind, error = %e, "ic: dropped packet");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if events.is_empty() => Err(e),
            _ => Ok(events),
        }
    }

    fn handle(&mut self, payload: &[u8], now: Instant) -> Result<Option<IcEvent>, IcError> {
        let (pipe, rest) =
            PipeHeader::read_from_prefix(payload).map_err(|_| IcError::Malformed("short"))?;
        let _ = pipe;
        let (hdr, body) =
            IcMessageHeader::read_from_prefix(rest).map_err(|_| IcError::Malformed("short"))?;
        if hdr.flags & flags::RESPONSE == 0 {
            return Err(IcError::Malformed("not a response"));
        }
        let status = hdr.status;
        let ty = hdr.msgtype;
        match ty {
            msgtype::NEGOTIATE => self.negotiated(body),
            t if t == self.kind.msgtype() => {
                self.ready()?;
                self.service_response(status, body, now)
            }
            t => Err(IcError::UnexpectedType(t)),
        }
    }

    fn negotiated(&mut self, body: &[u8]) -> Result<Option<IcEvent>, IcError> {
        if self.state != IcState::Negotiating {
            return Err(IcError::Malformed(
                "negotiation answer while not negotiating",
            ));
        }
        let (h, rest) =
            NegotiateHeader::read_from_prefix(body).map_err(|_| IcError::Malformed("short"))?;
        if h.framework_count == 0 || h.message_count == 0 {
            self.state = IcState::NoCommonVersion;
            return Ok(Some(IcEvent::NegotiationFailed));
        }
        let (versions, _) = <[IcVersion]>::ref_from_prefix_with_elems(rest, 2)
            .map_err(|_| IcError::Malformed("short version list"))?;
        let (fw, msg) = (versions[0], versions[1]);
        if !FRAMEWORK_VERSIONS.contains(&fw) {
            return Err(IcError::BadVersion(fw.major, fw.minor));
        }
        if !self.kind.versions().contains(&msg) {
            return Err(IcError::BadVersion(msg.major, msg.minor));
        }
        self.state = IcState::Ready {
            framework: fw,
            message: msg,
        };
        Ok(Some(IcEvent::Negotiated {
            framework: fw,
            message: msg,
        }))
    }

    fn service_response(
        &mut self,
        status: u32,
        body: &[u8],
        now: Instant,
    ) -> Result<Option<IcEvent>, IcError> {
        match &mut self.service {
            Service::Shutdown { outstanding } => {
                if outstanding.take().is_none() {
                    return Err(IcError::Malformed("unsolicited shutdown response"));
                }
                Ok(Some(IcEvent::ShutdownResponse { status }))
            }
            Service::Heartbeat {
                outstanding,
                last_ack,
                ..
            } => {
                let (m, _) = HeartbeatMessage::read_from_prefix(body)
                    .map_err(|_| IcError::Malformed("short heartbeat"))?;
                let Some(seq) = *outstanding else {
                    return Err(IcError::Malformed("unsolicited heartbeat response"));
                };
                if m.seq_num != seq.wrapping_add(1) {
                    return Err(IcError::Malformed("heartbeat sequence mismatch"));
                }
                *outstanding = None;
                *last_ack = Some(now);
                Ok(Some(IcEvent::HeartbeatAck { seq }))
            }
            Service::Timesync { .. } => Ok(Some(IcEvent::TimesyncAck { status })),
        }
    }

    /// Asks the guest to shut down (power off, reboot or hibernate; `force` sets the force
    /// flag). The answer arrives as [`IcEvent::ShutdownResponse`].
    pub fn request_shutdown(
        &mut self,
        ch: &mut Channel,
        kind: ShutdownKind,
        force: bool,
        reason: &str,
    ) -> Result<(), IcError> {
        let (fw, ver) = self.ready()?;
        let Service::Shutdown { outstanding } = &self.service else {
            return Err(IcError::WrongService);
        };
        if outstanding.is_some() {
            return Err(IcError::Busy);
        }
        let mut m = ShutdownMessage::new_zeroed();
        m.flags = match kind {
            ShutdownKind::PowerOff => wire::shutdown_flags::POWER_OFF,
            ShutdownKind::Reboot => wire::shutdown_flags::RESTART,
            ShutdownKind::Hibernate => wire::shutdown_flags::HIBERNATE,
        } | if force {
            wire::shutdown_flags::FORCE
        } else {
            0
        };
        m.reason_code = 0;
        m.timeout_seconds = 0;
        // UTF-16LE text, truncated to the field (leaving a terminator).
        for (i, u) in reason
            .encode_utf16()
            .take(wire::SHUTDOWN_MESSAGE_SIZE / 2 - 1)
            .enumerate()
        {
            m.message[2 * i..2 * i + 2].copy_from_slice(&u.to_le_bytes());
        }
        let t = self.transaction();
        let pkt = ic_packet(msgtype::SHUTDOWN, fw, ver, t as u8, &m);
        ch.send_inband(t, &pkt, false)?;
        if let Service::Shutdown { outstanding } = &mut self.service {
            *outstanding = Some(t);
        }
        Ok(())
    }

    /// Sends the next heartbeat. A heartbeat still unanswered is replaced.
    pub fn send_heartbeat(&mut self, ch: &mut Channel) -> Result<u64, IcError> {
        let (fw, ver) = self.ready()?;
        let Service::Heartbeat { seq, .. } = &self.service else {
            return Err(IcError::WrongService);
        };
        let next = seq.wrapping_add(2);
        let m = HeartbeatMessage {
            seq_num: next,
            reserved: [0; 8],
        };
        let t = self.transaction();
        let pkt = ic_packet(msgtype::HEARTBEAT, fw, ver, t as u8, &m);
        ch.send_inband(t, &pkt, false)?;
        if let Service::Heartbeat {
            seq, outstanding, ..
        } = &mut self.service
        {
            *seq = next;
            *outstanding = Some(next);
        }
        Ok(next)
    }

    /// Heartbeat health at `now`.
    pub fn heartbeat_state(&self, now: Instant) -> HeartbeatState {
        match &self.service {
            Service::Heartbeat {
                last_ack, timeout, ..
            } => match last_ack {
                None => HeartbeatState::NoContact,
                Some(t) if now.saturating_duration_since(*t) <= *timeout => HeartbeatState::Healthy,
                Some(_) => HeartbeatState::Lost,
            },
            _ => HeartbeatState::NoContact,
        }
    }

    /// Sends a time sample: `sync` = set the guest clock now (SYNC), otherwise SAMPLE.
    pub fn send_timesync(&mut self, ch: &mut Channel, sync: bool) -> Result<(), IcError> {
        let (fw, ver) = self.ready()?;
        let Service::Timesync { clock, synced } = &mut self.service else {
            return Err(IcError::WrongService);
        };
        let f = if sync {
            wire::timesync_flags::SYNC
        } else {
            wire::timesync_flags::SAMPLE
        };
        let parent_time = clock.host_time_100ns();
        let reference = clock.guest_reference_time();
        let t = self.next_transaction;
        self.next_transaction += 1;
        let pkt = if ver.major >= 4 {
            let m = TimesyncRefMessage {
                parent_time,
                vm_reference_time: reference,
                flags: f,
                leap_flags: 0,
                stratum: 0,
                reserved: [0; 3],
            };
            ic_packet(msgtype::TIMESYNC, fw, ver, t as u8, &m)
        } else {
            let m = TimesyncMessage {
                parent_time,
                child_time: 0,
                round_trip_time: 0,
                flags: f,
            };
            ic_packet(msgtype::TIMESYNC, fw, ver, t as u8, &m)
        };
        ch.send_inband(t, &pkt, false)?;
        if sync {
            *synced = true;
        }
        Ok(())
    }

    /// Whether the timesync service has sent its SYNC.
    pub fn time_synced(&self) -> bool {
        matches!(self.service, Service::Timesync { synced: true, .. })
    }
}

/// Saved IC state (also the inspection dump). Versions are (major, minor).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IcSavedState {
    pub kind: String,
    /// "closed", "negotiating", "ready" or "no_common_version".
    pub state: String,
    pub framework: Option<(u16, u16)>,
    pub message: Option<(u16, u16)>,
    pub next_transaction: u64,
    /// Outstanding shutdown transaction or heartbeat sequence number.
    pub outstanding: Option<u64>,
    /// Last heartbeat sequence number sent.
    pub heartbeat_seq: u64,
    /// Timesync: SYNC already sent.
    pub time_synced: bool,
}

impl Ic {
    /// Snapshot of the state. Heartbeat timing is not saved: after a restore the guest is in
    /// [`HeartbeatState::NoContact`] until it answers again.
    pub fn save(&self) -> IcSavedState {
        let (state, framework, message) = match self.state {
            IcState::Closed => ("closed", None, None),
            IcState::Negotiating => ("negotiating", None, None),
            IcState::Ready { framework, message } => (
                "ready",
                Some((framework.major, framework.minor)),
                Some((message.major, message.minor)),
            ),
            IcState::NoCommonVersion => ("no_common_version", None, None),
        };
        let (outstanding, heartbeat_seq, time_synced) = match &self.service {
            Service::Shutdown { outstanding } => (*outstanding, 0, false),
            Service::Heartbeat {
                seq, outstanding, ..
            } => (*outstanding, *seq, false),
            Service::Timesync { synced, .. } => (None, 0, *synced),
        };
        IcSavedState {
            kind: format!("{:?}", self.kind),
            state: state.into(),
            framework,
            message,
            next_transaction: self.next_transaction,
            outstanding,
            heartbeat_seq,
            time_synced,
        }
    }

    /// Restores a snapshot taken from the same kind of service.
    pub fn restore(&mut self, s: &IcSavedState) -> Result<(), IcError> {
        if s.kind != format!("{:?}", self.kind) {
            return Err(IcError::WrongService);
        }
        let v = |p: Option<(u16, u16)>| p.map(|(a, b)| IcVersion::new(a, b));
        self.state = match (s.state.as_str(), v(s.framework), v(s.message)) {
            ("closed", _, _) => IcState::Closed,
            ("negotiating", _, _) => IcState::Negotiating,
            ("no_common_version", _, _) => IcState::NoCommonVersion,
            ("ready", Some(framework), Some(message))
                if FRAMEWORK_VERSIONS.contains(&framework)
                    && self.kind.versions().contains(&message) =>
            {
                IcState::Ready { framework, message }
            }
            _ => return Err(IcError::Malformed("saved IC state")),
        };
        self.next_transaction = s.next_transaction;
        match &mut self.service {
            Service::Shutdown { outstanding } => *outstanding = s.outstanding,
            Service::Heartbeat {
                seq,
                outstanding,
                last_ack,
                ..
            } => {
                *seq = s.heartbeat_seq;
                *outstanding = s.outstanding;
                *last_ack = None;
            }
            Service::Timesync { synced, .. } => *synced = s.time_synced,
        }
        Ok(())
    }
}
