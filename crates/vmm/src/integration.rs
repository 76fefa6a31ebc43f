//! The integration services (shutdown, heartbeat, timesync) as VMBus devices. Each runs on
//! the worker thread of its channel with its own timer; the `ic` crate's sans-I/O state
//! machine does the protocol. The host side (the control socket) talks to a device through
//! its [`IcDevice`] handle: a status snapshot the worker keeps current, and a command queue
//! with an eventfd the worker waits on.

use hvdef::vmbus::Guid;
use ic::{HeartbeatState, Ic, IcError, IcEvent, IcKind, IcState, ShutdownKind};
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmbus::host::Doorbell;
use vmbus::{Channel, ChannelError, ChannelWorker, DeviceOffer, OpenError, OpenedChannel};
use vmbus::{DeviceRestoreError, Progress, SavedDevice, WorkerError};

/// How often the host sends a heartbeat and a time sample.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
pub const TIME_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// How long without a heartbeat answer before the guest counts as lost.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// The guest's reference counter (100 ns units), for timesync.
pub type ReferenceClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Instance GUIDs of the integration services (constant, so the guest sees the same devices
/// on every boot).
pub fn instance_id(kind: IcKind) -> Guid {
    let n = match kind {
        IcKind::Shutdown => 1,
        IcKind::Heartbeat => 2,
        IcKind::Timesync => 3,
    };
    Guid::from_u128(0x5649_5249_4449_414e_0000_0000_0000_0000 | n)
}

fn name(kind: IcKind) -> &'static str {
    match kind {
        IcKind::Shutdown => "shutdown",
        IcKind::Heartbeat => "heartbeat",
        IcKind::Timesync => "timesync",
    }
}

/// What the host last saw of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IcSnapshot {
    /// Versions are agreed and the channel is open.
    pub ready: bool,
    #[serde(serialize_with = "debug_string")]
    pub heartbeat: HeartbeatState,
    pub time_synced: bool,
}

fn debug_string<S: serde::Serializer, T: std::fmt::Debug>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:?}"))
}

impl Default for IcSnapshot {
    fn default() -> Self {
        Self {
            ready: false,
            heartbeat: HeartbeatState::NoContact,
            time_synced: false,
        }
    }
}

enum Command {
    Shutdown(ShutdownKind),
}

/// Why a shutdown request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("the guest has not connected its shutdown service (no hv_utils driver?); use --force to power off")]
    NotConnected,
    #[error("shutdown service: {0}")]
    Ic(#[from] IcError),
}

/// One integration service on the bus.
pub struct IcDevice {
    kind: IcKind,
    clock: Option<ReferenceClock>,
    status: Mutex<IcSnapshot>,
    resume: ResumeSlot<ic::IcSavedState>,
    commands: Mutex<VecDeque<Command>>,
    wake: Doorbell,
}

static LOG: support::RateLimit = support::RateLimit::guest();

impl IcDevice {
    /// The shutdown or heartbeat service.
    pub fn new(kind: IcKind) -> std::io::Result<Arc<Self>> {
        Self::build(kind, None)
    }

    /// The timesync service, reading the guest's reference counter from `clock`.
    pub fn timesync(clock: ReferenceClock) -> std::io::Result<Arc<Self>> {
        Self::build(IcKind::Timesync, Some(clock))
    }

    fn build(kind: IcKind, clock: Option<ReferenceClock>) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            kind,
            clock,
            status: Mutex::default(),
            resume: ResumeSlot::default(),
            commands: Mutex::default(),
            wake: Doorbell::new()?,
        }))
    }

    pub fn kind(&self) -> IcKind {
        self.kind
    }

    /// The latest status the worker published.
    pub fn snapshot(&self) -> IcSnapshot {
        *support::lock(&self.status)
    }

    /// Asks the guest to power off or reboot (shutdown service only).
    pub fn request_shutdown(&self, kind: ShutdownKind) -> Result<(), ShutdownError> {
        if self.kind != IcKind::Shutdown {
            return Err(IcError::WrongService.into());
        }
        if !self.snapshot().ready {
            return Err(ShutdownError::NotConnected);
        }
        support::lock(&self.commands).push_back(Command::Shutdown(kind));
        self.wake.ring();
        Ok(())
    }

    fn state_machine(&self) -> Ic {
        match (self.kind, &self.clock) {
            (IcKind::Shutdown, _) => Ic::shutdown(),
            (IcKind::Heartbeat, _) => Ic::heartbeat(HEARTBEAT_TIMEOUT),
            (IcKind::Timesync, clock) => {
                let clock = clock.clone().unwrap_or_else(|| Arc::new(|| 0));
                Ic::timesync(Box::new(ic::SystemTimeSource(move || clock())))
            }
        }
    }
}

/// An [`IcDevice`] as the bus sees it.
pub struct IcBusDevice(pub Arc<IcDevice>);

impl vmbus::Device for IcBusDevice {
    fn offer(&self) -> DeviceOffer {
        let kind = self.0.kind;
        DeviceOffer::new(name(kind), kind.interface_type(), instance_id(kind))
    }

    fn open(&self, _channel: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        support::lock(&self.0.commands).clear();
        let mut ic = self.0.state_machine();
        let resumed = match self.0.resume.take_restored() {
            Some(saved) => {
                ic.restore(&saved)
                    .map_err(|e| OpenError(format!("cannot resume the saved state: {e}")))?;
                true
            }
            None => false,
        };
        Ok(Box::new(IcWorker {
            device: self.0.clone(),
            ic,
            resumed,
            next_heartbeat: Instant::now(),
            next_sample: Instant::now() + TIME_SAMPLE_INTERVAL,
        }))
    }

    fn close(&self, _index: u16) {
        *support::lock(&self.0.status) = IcSnapshot::default();
        self.0.resume.clear();
    }

    fn save(&self) -> SavedDevice {
        self.0.resume.save()
    }

    fn restore(&self, saved: &SavedDevice) -> Result<(), DeviceRestoreError> {
        let kind = self.0.kind;
        self.0.resume.restore(saved, |s| {
            (s.kind == kind)
                .then_some(())
                .ok_or_else(|| "saved for another service".to_string())
        })
    }

    fn inspect(&self) -> serde_json::Value {
        serde_json::to_value(self.0.snapshot()).unwrap_or_default()
    }
}

/// Layout of [`SavedDevice::data`] for the integration services and KVP: the open channel's
/// protocol state, `Option<T>` of the service's own saved-state struct.
const SAVED_VERSION: u32 = 1;

/// A service's protocol state for save/restore: what the worker published after its last
/// pass, and what to resume from when the channel reopens after a restore.
pub(crate) struct ResumeSlot<T> {
    saved: Mutex<Option<T>>,
    restored: Mutex<Option<T>>,
}

impl<T> Default for ResumeSlot<T> {
    fn default() -> Self {
        Self {
            saved: Mutex::new(None),
            restored: Mutex::new(None),
        }
    }
}

impl<T: serde::Serialize + serde::de::DeserializeOwned> ResumeSlot<T> {
    pub fn publish(&self, state: T) {
        *support::lock(&self.saved) = Some(state);
    }

    pub fn clear(&self) {
        *support::lock(&self.saved) = None;
    }

    pub fn take_restored(&self) -> Option<T> {
        support::lock(&self.restored).take()
    }

    pub fn save(&self) -> SavedDevice {
        SavedDevice {
            version: SAVED_VERSION,
            data: serde_json::to_value(&*support::lock(&self.saved)).unwrap_or_default(),
        }
    }

    /// Keeps a saved state for the next open, after `check` accepted it.
    pub fn restore(
        &self,
        saved: &SavedDevice,
        check: impl FnOnce(&T) -> Result<(), String>,
    ) -> Result<(), DeviceRestoreError> {
        if saved.version != SAVED_VERSION {
            return Err(DeviceRestoreError::Version(saved.version));
        }
        let state: Option<T> = serde_json::from_value(saved.data.clone())
            .map_err(|e| DeviceRestoreError::Invalid(e.to_string()))?;
        if let Some(s) = &state {
            check(s).map_err(DeviceRestoreError::Invalid)?;
        }
        *support::lock(&self.restored) = state;
        Ok(())
    }
}

struct IcWorker {
    device: Arc<IcDevice>,
    ic: Ic,
    /// Resumed from a saved state: the versions are already agreed.
    resumed: bool,
    next_heartbeat: Instant,
    next_sample: Instant,
}

/// Maps an IC error: a broken ring stops the worker, a full ring waits for room, anything
/// else was one bad packet or a refused request and is logged.
pub(crate) fn outcome(service: &str, r: Result<(), IcError>) -> Result<bool, WorkerError> {
    match r {
        Ok(()) => Ok(true),
        Err(IcError::Channel(ChannelError::Full)) => Ok(false),
        Err(IcError::Channel(e @ (ChannelError::Broken(_) | ChannelError::InvalidRing(_)))) => {
            Err(WorkerError::Channel(e))
        }
        Err(e) => {
            support::limited!(LOG, debug, "{service} service: {e}");
            Ok(true)
        }
    }
}

impl IcWorker {
    fn ready(&self) -> bool {
        matches!(self.ic.state(), IcState::Ready { .. })
    }

    fn publish(&self, now: Instant) {
        *support::lock(&self.device.status) = IcSnapshot {
            ready: self.ready(),
            heartbeat: self.ic.heartbeat_state(now),
            time_synced: self.ic.time_synced(),
        };
        self.device.resume.publish(self.ic.save());
    }

    /// Periodic requests and host commands; false when the ring was full.
    fn send_due(&mut self, ch: &mut Channel, now: Instant) -> Result<bool, WorkerError> {
        let kind = self.device.kind;
        if !self.ready() {
            return Ok(true);
        }
        match kind {
            IcKind::Heartbeat if now >= self.next_heartbeat => {
                if !outcome(name(kind), self.ic.send_heartbeat(ch).map(|_| ()))? {
                    return Ok(false);
                }
                self.next_heartbeat = now + HEARTBEAT_INTERVAL;
            }
            IcKind::Timesync if !self.ic.time_synced() || now >= self.next_sample => {
                let sync = !self.ic.time_synced();
                if !outcome(name(kind), self.ic.send_timesync(ch, sync))? {
                    return Ok(false);
                }
                self.next_sample = now + TIME_SAMPLE_INTERVAL;
            }
            _ => {}
        }
        loop {
            let Some(cmd) = support::lock(&self.device.commands).pop_front() else {
                return Ok(true);
            };
            match cmd {
                Command::Shutdown(k) => {
                    let r = self.ic.request_shutdown(ch, k, false, "viridian vm stop");
                    if !outcome(name(kind), r)? {
                        support::lock(&self.device.commands).push_front(Command::Shutdown(k));
                        return Ok(false);
                    }
                }
            }
        }
    }
}

impl ChannelWorker for IcWorker {
    fn start(&mut self, ch: &mut Channel) -> Result<(), WorkerError> {
        if self.resumed {
            return Ok(());
        }
        // The host speaks first: version negotiation.
        outcome(name(self.device.kind), self.ic.open(ch)).map(|_| ())
    }

    fn process(&mut self, ch: &mut Channel, now: Instant) -> Result<Progress, WorkerError> {
        self.device.wake.clear();
        let kind = self.device.kind;
        let drained = match self.ic.process(ch, now) {
            Ok(events) => {
                for e in events {
                    match e {
                        IcEvent::Negotiated { .. } => {
                            support::limited!(LOG, info, "{kind:?} service negotiated")
                        }
                        IcEvent::ShutdownResponse { status } => {
                            tracing::info!(
                                "guest answered the shutdown request: status {status:#x}"
                            )
                        }
                        other => tracing::trace!("{kind:?}: {other:?}"),
                    }
                }
                true
            }
            Err(e) => outcome(name(kind), Err(e))?,
        };
        let sent = self.send_due(ch, now)?;
        self.publish(now);
        Ok(if drained && sent {
            Progress::Idle
        } else {
            Progress::WaitingForRoom
        })
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.device.wake.as_fd()]
    }

    fn deadline(&self) -> Option<Instant> {
        if !self.ready() {
            return None;
        }
        match self.device.kind {
            IcKind::Heartbeat => Some(self.next_heartbeat),
            IcKind::Timesync => Some(self.next_sample),
            IcKind::Shutdown => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbus::Device;

    #[test]
    fn saved_state_is_versioned_and_checked_before_it_is_kept() {
        let hb = IcBusDevice(IcDevice::new(IcKind::Heartbeat).unwrap());
        // Nothing open: the saved state says so.
        let empty = hb.save();
        assert_eq!(empty.version, SAVED_VERSION);
        assert!(empty.data.is_null());
        assert!(hb.restore(&empty).is_ok());
        let other_version = SavedDevice {
            version: 99,
            ..empty.clone()
        };
        assert!(matches!(
            hb.restore(&other_version),
            Err(DeviceRestoreError::Version(99))
        ));
        // A timesync state offered to the heartbeat service is refused.
        let ts = Ic::timesync(Box::new(ic::SystemTimeSource(|| 0)));
        let wrong = SavedDevice {
            version: SAVED_VERSION,
            data: serde_json::to_value(Some(ts.save())).unwrap(),
        };
        assert!(matches!(
            hb.restore(&wrong),
            Err(DeviceRestoreError::Invalid(_))
        ));
        let garbage = SavedDevice {
            version: SAVED_VERSION,
            data: serde_json::json!({"kind": 7}),
        };
        assert!(hb.restore(&garbage).is_err());
        // Its own kind is kept for the next open.
        let own = SavedDevice {
            version: SAVED_VERSION,
            data: serde_json::to_value(Some(Ic::heartbeat(HEARTBEAT_TIMEOUT).save())).unwrap(),
        };
        hb.restore(&own).unwrap();
        assert!(hb.0.resume.take_restored().is_some());
    }
}
