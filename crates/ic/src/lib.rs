//! Hyper-V integration services (hv_utils' counterparts) as VMBus devices: shutdown,
//! heartbeat, time synchronization ([`Ic`]) and key-value pair exchange ([`Kvp`]).
//!
//! Each service is a sans-I/O state machine driven through a [`vmbus::Channel`]. The worker
//! calls `open` when the guest opens the channel (the host speaks first: version
//! negotiation), `process` on every doorbell, and the service requests
//! ([`Ic::request_shutdown`], [`Ic::send_heartbeat`], [`Ic::send_timesync`], [`Kvp::set`],
//! ...) when it wants. Guest answers are hostile input: anything malformed is dropped with an
//! [`IcError`] and never panics.
//!
//! Modules: [`framework`] (pipe header, IC header, negotiation, the receive loop), one per
//! service: [`shutdown`], [`heartbeat`], [`timesync`], [`kvp`].
#![forbid(unsafe_code)]

pub mod framework;
pub mod heartbeat;
pub mod kvp;
pub mod shutdown;
pub mod timesync;

pub use framework::{IcError, IcState, SavedNegotiation, SavedVersion, FRAMEWORK_VERSIONS};
pub use heartbeat::{HeartbeatState, OutstandingHeartbeat};
pub use kvp::{
    DaemonState, HostItem, HostItemState, IpAddressInfo, IpInfo, Kvp, KvpEvent, KvpItems, KvpPool,
    KvpRequest, KvpSavedState, KvpStatus,
};
pub use shutdown::ShutdownKind;
pub use timesync::{SystemTimeSource, TimeSource};

use framework::{Framework, Incoming};
use hvdef::ic::{msgtype, IcVersion};
use hvdef::vmbus::{guid, Guid};
use std::time::{Duration, Instant};
use vmbus::{Channel, OfferParams};

/// Which integration service an [`Ic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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
        match self {
            IcKind::Shutdown => &shutdown::VERSIONS,
            IcKind::Heartbeat => &heartbeat::VERSIONS,
            IcKind::Timesync => &timesync::VERSIONS,
        }
    }

    /// Offer parameters for a channel of this service.
    pub fn offer(self, instance_id: Guid) -> OfferParams {
        OfferParams::new(self.interface_type(), instance_id)
    }

    fn name(self) -> &'static str {
        match self {
            IcKind::Shutdown => "shutdown",
            IcKind::Heartbeat => "heartbeat",
            IcKind::Timesync => "timesync",
        }
    }
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

/// Everything one [`Ic::process_report`] call found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ProcessReport {
    /// Events, in ring order.
    pub events: Vec<IcEvent>,
    /// Guest packets dropped as malformed or unexpected.
    pub dropped: u32,
    /// The first reason a packet was dropped.
    pub first_error: Option<IcError>,
    /// A send the service wanted to make failed (timesync: the SYNC after negotiation);
    /// it is retried on the next `process` (see [`Ic::sync_pending`]).
    pub send_error: Option<IcError>,
}

enum Service {
    Shutdown(shutdown::Shutdown),
    Heartbeat(heartbeat::Heartbeat),
    Timesync(timesync::Timesync),
}

/// One integration service: shutdown, heartbeat or timesync.
pub struct Ic {
    kind: IcKind,
    fw: Framework,
    service: Service,
}

impl std::fmt::Debug for Ic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ic")
            .field("kind", &self.kind)
            .field("state", &self.fw.state)
            .finish()
    }
}

impl Ic {
    fn new(kind: IcKind, service: Service) -> Self {
        Self {
            kind,
            fw: Framework::new(kind.name(), kind.msgtype(), kind.versions()),
            service,
        }
    }

    /// The shutdown service.
    pub fn shutdown() -> Self {
        Self::new(IcKind::Shutdown, Service::Shutdown(Default::default()))
    }

    /// The heartbeat service; the guest counts as lost when no heartbeat was answered for
    /// `timeout`.
    pub fn heartbeat(timeout: Duration) -> Self {
        Self::new(
            IcKind::Heartbeat,
            Service::Heartbeat(heartbeat::Heartbeat::new(timeout)),
        )
    }

    /// The time synchronization service. A SYNC goes out as soon as versions are agreed.
    pub fn timesync(clock: Box<dyn TimeSource>) -> Self {
        Self::new(
            IcKind::Timesync,
            Service::Timesync(timesync::Timesync::new(clock)),
        )
    }

    pub fn kind(&self) -> IcKind {
        self.kind
    }

    pub fn state(&self) -> IcState {
        self.fw.state
    }

    /// The guest opened the channel: send NEGOTIATE.
    pub fn open(&mut self, ch: &mut Channel) -> Result<(), IcError> {
        self.reset_service();
        self.fw.open(ch)
    }

    /// The channel closed (or the guest reset).
    pub fn close(&mut self) {
        self.fw.close();
        self.reset_service();
    }

    fn reset_service(&mut self) {
        match &mut self.service {
            Service::Shutdown(s) => s.reset(),
            Service::Heartbeat(s) => s.reset(),
            Service::Timesync(s) => s.reset(),
        }
    }

    /// Handles every packet the guest has sent. Malformed packets are dropped (and the first
    /// such error is returned after the ring is drained, when nothing else happened); ring
    /// corruption is returned at once. A failed send of the timesync SYNC does not lose the
    /// events: see [`Self::process_report`] and [`Self::sync_pending`].
    pub fn process(&mut self, ch: &mut Channel, now: Instant) -> Result<Vec<IcEvent>, IcError> {
        let r = self.process_report(ch, now)?;
        match r.first_error {
            Some(e) if r.events.is_empty() => Err(e),
            _ => Ok(r.events),
        }
    }

    /// Like [`Self::process`], with the drop count and send failures reported separately.
    pub fn process_report(
        &mut self,
        ch: &mut Channel,
        now: Instant,
    ) -> Result<ProcessReport, IcError> {
        let mut events = Vec::new();
        let service = &mut self.service;
        let out = self.fw.drain(ch, |incoming| {
            let ev = match incoming {
                Incoming::Negotiated { framework, message } => {
                    if let Service::Timesync(t) = service {
                        t.sync_owed = true;
                    }
                    IcEvent::Negotiated { framework, message }
                }
                Incoming::NegotiationFailed => IcEvent::NegotiationFailed,
                Incoming::Message {
                    transaction_id,
                    response,
                } => match service {
                    Service::Shutdown(s) => s.response(transaction_id, response)?,
                    Service::Heartbeat(s) => s.response(transaction_id, response, now)?,
                    Service::Timesync(s) => s.response(transaction_id, response)?,
                },
            };
            events.push(ev);
            Ok(())
        })?;
        let mut send_error = None;
        if let Service::Timesync(t) = &mut self.service {
            if t.sync_owed && self.fw.ready().is_ok() {
                if let Err(e) = t.send(&mut self.fw, ch, true) {
                    static LOG: support::RateLimit = support::RateLimit::guest();
                    support::limited!(LOG, debug, error = %e, "timesync: SYNC not sent yet");
                    send_error = Some(e);
                }
            }
        }
        Ok(ProcessReport {
            events,
            dropped: out.dropped,
            first_error: out.first_error,
            send_error,
        })
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
        match &mut self.service {
            Service::Shutdown(s) => s.request(&mut self.fw, ch, kind, force, reason),
            _ => {
                self.fw.ready()?;
                Err(IcError::WrongService)
            }
        }
    }

    /// Whether a shutdown request is unanswered.
    pub fn shutdown_pending(&self) -> bool {
        matches!(&self.service, Service::Shutdown(s) if s.outstanding.is_some())
    }

    /// Sends the next heartbeat. A heartbeat still unanswered is replaced.
    pub fn send_heartbeat(&mut self, ch: &mut Channel) -> Result<u64, IcError> {
        match &mut self.service {
            Service::Heartbeat(s) => s.send(&mut self.fw, ch),
            _ => {
                self.fw.ready()?;
                Err(IcError::WrongService)
            }
        }
    }

    /// Heartbeat health at `now`.
    pub fn heartbeat_state(&self, now: Instant) -> HeartbeatState {
        match &self.service {
            Service::Heartbeat(s) => s.state(now),
            _ => HeartbeatState::NoContact,
        }
    }

    /// Sends a time sample: `sync` = set the guest clock now (SYNC), otherwise SAMPLE.
    pub fn send_timesync(&mut self, ch: &mut Channel, sync: bool) -> Result<(), IcError> {
        match &mut self.service {
            Service::Timesync(s) => s.send(&mut self.fw, ch, sync),
            _ => {
                self.fw.ready()?;
                Err(IcError::WrongService)
            }
        }
    }

    /// Whether the timesync service has sent its SYNC.
    pub fn time_synced(&self) -> bool {
        matches!(&self.service, Service::Timesync(s) if s.synced)
    }

    /// Timesync: versions are agreed but the SYNC could not be sent yet (e.g. the ring was
    /// full). The next [`Self::process`] retries it, as does [`Self::send_timesync`].
    pub fn sync_pending(&self) -> bool {
        matches!(&self.service, Service::Timesync(s) if s.sync_owed)
    }
}

/// Version of [`IcSavedState`].
pub const IC_SAVED_STATE_VERSION: u32 = 2;

/// The service-specific part of [`IcSavedState`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "service")]
pub enum SavedService {
    Shutdown {
        /// Transaction of the unanswered request.
        outstanding: Option<u64>,
    },
    Heartbeat {
        /// Last sequence number sent.
        seq: u64,
        outstanding: Option<OutstandingHeartbeat>,
    },
    Timesync {
        /// SYNC already sent.
        synced: bool,
        /// SYNC owed (could not be sent yet).
        sync_owed: bool,
        /// Transactions of unacknowledged samples, oldest first.
        outstanding: Vec<u64>,
    },
}

/// Saved IC state (also the inspection dump): typed and versioned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IcSavedState {
    /// [`IC_SAVED_STATE_VERSION`].
    pub version: u32,
    pub kind: IcKind,
    pub negotiation: SavedNegotiation,
    pub next_transaction: u64,
    pub service: SavedService,
}

impl Ic {
    /// Snapshot of the state. Heartbeat timing is not saved: after a restore the guest is in
    /// [`HeartbeatState::NoContact`] until it answers again.
    pub fn save(&self) -> IcSavedState {
        let service = match &self.service {
            Service::Shutdown(s) => SavedService::Shutdown {
                outstanding: s.outstanding,
            },
            Service::Heartbeat(s) => SavedService::Heartbeat {
                seq: s.seq,
                outstanding: s.outstanding,
            },
            Service::Timesync(s) => SavedService::Timesync {
                synced: s.synced,
                sync_owed: s.sync_owed,
                outstanding: s.outstanding.iter().copied().collect(),
            },
        };
        IcSavedState {
            version: IC_SAVED_STATE_VERSION,
            kind: self.kind,
            negotiation: self.fw.save(),
            next_transaction: self.fw.next_transaction,
            service,
        }
    }

    /// Restores a snapshot taken from the same kind of service. Everything is validated
    /// before anything changes.
    pub fn restore(&mut self, s: &IcSavedState) -> Result<(), IcError> {
        if s.version != IC_SAVED_STATE_VERSION {
            return Err(IcError::BadSavedState("unknown version"));
        }
        if s.kind != self.kind {
            return Err(IcError::WrongService);
        }
        let (state, neg_t) = self.fw.check_saved(&s.negotiation, s.next_transaction)?;
        let ready = matches!(state, IcState::Ready { .. });
        let issued = |t: u64| t != 0 && t < s.next_transaction;
        match (&s.service, &mut self.service) {
            (SavedService::Shutdown { outstanding }, Service::Shutdown(x)) => {
                if outstanding.is_some_and(|t| !ready || !issued(t)) {
                    return Err(IcError::BadSavedState("shutdown transaction"));
                }
                x.outstanding = *outstanding;
            }
            (SavedService::Heartbeat { seq, outstanding }, Service::Heartbeat(x)) => {
                if outstanding.is_some_and(|o| !ready || !issued(o.transaction) || o.seq != *seq) {
                    return Err(IcError::BadSavedState("heartbeat transaction"));
                }
                x.seq = *seq;
                x.outstanding = *outstanding;
                x.last_ack = None;
            }
            (
                SavedService::Timesync {
                    synced,
                    sync_owed,
                    outstanding,
                },
                Service::Timesync(x),
            ) => {
                if outstanding.len() > timesync::MAX_OUTSTANDING
                    || outstanding.iter().any(|&t| !ready || !issued(t))
                    || (*sync_owed && (!ready || *synced))
                {
                    return Err(IcError::BadSavedState("timesync state"));
                }
                x.synced = *synced;
                x.sync_owed = *sync_owed;
                x.outstanding = outstanding.iter().copied().collect();
            }
            _ => return Err(IcError::WrongService),
        }
        self.fw.apply_saved(state, neg_t, s.next_transaction);
        Ok(())
    }
}
