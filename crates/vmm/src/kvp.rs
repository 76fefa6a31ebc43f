//! KVP (key-value pair exchange) as a VMBus device, served to the guest's own
//! `hv_kvp_daemon`. The worker refreshes the guest's auto pool (host name, OS, addresses)
//! after negotiation and then periodically, and sends the items the host sets. The host side
//! reads the latest snapshot and queues requests through [`KvpDevice`].

use crate::integration::{outcome, ResumeSlot};
use hvdef::vmbus::Guid;
use ic::kvp::{Kvp, KvpEvent, KvpItems, KvpPool, KvpSavedState};
use ic::IcState;
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmbus::host::Doorbell;
use vmbus::{
    Channel, ChannelWorker, DeviceOffer, DeviceRestoreError, OpenError, OpenedChannel, Progress,
    SavedDevice, WorkerError,
};

/// How often the guest's pools are read again.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// Instance GUID of the KVP service.
pub const INSTANCE_ID: Guid = Guid::from_u128(0x5649_5249_4449_414e_0000_0000_0000_0004);

/// Why an item was not accepted (the same checks `ic::kvp::Kvp::set` applies: not empty, no
/// NUL, and within KVP's key and value sizes in both UTF-16 units and UTF-8 bytes).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvpSetError {
    #[error("key: {0}")]
    Key(ic::IcError),
    #[error("value: {0}")]
    Value(ic::IcError),
}

enum Command {
    Set { key: String, value: String },
    Delete { key: String },
    Refresh,
}

/// The KVP service on the bus.
pub struct KvpDevice {
    items: Mutex<KvpItems>,
    resume: ResumeSlot<KvpSavedState>,
    ready: Mutex<bool>,
    commands: Mutex<VecDeque<Command>>,
    wake: Doorbell,
}

static LOG: support::RateLimit = support::RateLimit::guest();

/// Checks an item before it is queued, so the caller hears about a bad one at once.
pub fn check_item(key: &str, value: &str) -> Result<(), KvpSetError> {
    ic::kvp::check_key(key).map_err(KvpSetError::Key)?;
    ic::kvp::check_value(value).map_err(KvpSetError::Value)
}

impl KvpDevice {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            items: Mutex::default(),
            resume: ResumeSlot::default(),
            ready: Mutex::new(false),
            commands: Mutex::default(),
            wake: Doorbell::new()?,
        }))
    }

    /// Everything known: the guest's pools from the last refresh, the host's items and
    /// whether the guest applied them, addresses per adapter, the daemon's state.
    pub fn items(&self) -> KvpItems {
        support::lock(&self.items).clone()
    }

    /// Whether the guest has negotiated the service (the hv_utils driver is loaded).
    pub fn ready(&self) -> bool {
        *support::lock(&self.ready)
    }

    fn queue(&self, c: Command) {
        let mut q = support::lock(&self.commands);
        // A host that floods requests cannot grow the queue without bound.
        if q.len() < ic::kvp::MAX_QUEUE {
            q.push_back(c);
        }
        drop(q);
        self.wake.ring();
    }

    /// Pushes an item into the guest's external pool (Hyper-V's host-to-guest items; the
    /// daemon writes it to `/var/lib/hyperv/.kvp_pool_0`).
    pub fn set(&self, key: &str, value: &str) -> Result<(), KvpSetError> {
        check_item(key, value)?;
        self.queue(Command::Set {
            key: key.into(),
            value: value.into(),
        });
        Ok(())
    }

    /// Removes an item from the guest's external pool.
    pub fn delete(&self, key: &str) -> Result<(), KvpSetError> {
        check_item(key, "")?;
        self.queue(Command::Delete { key: key.into() });
        Ok(())
    }

    /// Reads the guest's pools again now.
    pub fn refresh(&self) {
        self.queue(Command::Refresh);
    }
}

/// A [`KvpDevice`] as the bus sees it.
pub struct KvpBusDevice(pub Arc<KvpDevice>);

impl vmbus::Device for KvpBusDevice {
    fn offer(&self) -> DeviceOffer {
        DeviceOffer::new("kvp", Kvp::interface_type(), INSTANCE_ID)
    }

    fn open(&self, _channel: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        let mut kvp = Kvp::new();
        let resumed = match self.0.resume.take_restored() {
            Some(saved) => {
                kvp.restore(&saved, Instant::now())
                    .map_err(|e| OpenError(format!("cannot resume the saved KVP state: {e}")))?;
                true
            }
            None => false,
        };
        Ok(Box::new(KvpWorker {
            device: self.0.clone(),
            kvp,
            resumed,
            next_refresh: None,
        }))
    }

    fn close(&self, _index: u16) {
        *support::lock(&self.0.ready) = false;
        self.0.resume.clear();
    }

    fn save(&self) -> SavedDevice {
        self.0.resume.save()
    }

    fn restore(&self, saved: &SavedDevice) -> Result<(), DeviceRestoreError> {
        self.0.resume.restore(saved, |_| Ok(()))
    }

    fn inspect(&self) -> serde_json::Value {
        serde_json::json!({
            "ready": self.0.ready(),
            "items": self.0.items(),
        })
    }
}

struct KvpWorker {
    device: Arc<KvpDevice>,
    kvp: Kvp,
    /// Resumed from a saved state: the versions are already agreed.
    resumed: bool,
    next_refresh: Option<Instant>,
}

impl KvpWorker {
    fn log(&self, events: &[KvpEvent]) {
        for e in events {
            match e {
                KvpEvent::Negotiated { .. } => {
                    support::limited!(LOG, info, "KVP service negotiated")
                }
                KvpEvent::NoDaemon => {
                    support::limited!(LOG, info, "KVP: the guest's hv_kvp_daemon is not running")
                }
                other => tracing::trace!("kvp: {other:?}"),
            }
        }
    }
}

impl ChannelWorker for KvpWorker {
    fn start(&mut self, ch: &mut Channel) -> Result<(), WorkerError> {
        if self.resumed {
            return Ok(());
        }
        outcome("KVP", self.kvp.open(ch)).map(|_| ())
    }

    fn process(&mut self, ch: &mut Channel, now: Instant) -> Result<Progress, WorkerError> {
        self.device.wake.clear();
        let mut room = true;
        match self.kvp.process(ch, now) {
            Ok(events) => self.log(&events),
            Err(e) => room &= outcome("KVP", Err(e))?,
        }
        let ready = matches!(self.kvp.state(), IcState::Ready { .. });
        if ready {
            let commands: Vec<Command> = support::lock(&self.device.commands).drain(..).collect();
            for c in commands {
                let r = match c {
                    Command::Set { key, value } => self.kvp.set(KvpPool::External, &key, &value),
                    Command::Delete { key } => self.kvp.delete(KvpPool::External, &key),
                    Command::Refresh => self.kvp.refresh(),
                };
                if let Err(e) = r {
                    support::limited!(LOG, debug, "KVP request refused: {e}");
                }
            }
            if self.next_refresh.is_none_or(|t| now >= t) {
                if let Err(e) = self.kvp.refresh() {
                    support::limited!(LOG, debug, "KVP refresh refused: {e}");
                }
                self.next_refresh = Some(now + REFRESH_INTERVAL);
            }
            match self.kvp.poll(ch, now) {
                Ok(events) => self.log(&events),
                Err(e) => room &= outcome("KVP", Err(e))?,
            }
        }
        *support::lock(&self.device.items) = self.kvp.items();
        self.device.resume.publish(self.kvp.save());
        *support::lock(&self.device.ready) = ready;
        Ok(if room {
            Progress::Idle
        } else {
            Progress::WaitingForRoom
        })
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.device.wake.as_fd()]
    }

    fn deadline(&self) -> Option<Instant> {
        match (self.kvp.deadline(), self.next_refresh) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_items_are_checked_before_they_are_queued() {
        use ic::kvp::{MAX_KEY_UNITS, MAX_VALUE_UNITS};
        assert_eq!(check_item("Owner", "ops"), Ok(()));
        assert!(matches!(check_item("", "x"), Err(KvpSetError::Key(_))));
        assert!(matches!(check_item("a\0b", "x"), Err(KvpSetError::Key(_))));
        assert!(matches!(check_item("k", "v\0"), Err(KvpSetError::Value(_))));
        let long_key = "k".repeat(MAX_KEY_UNITS + 1);
        assert!(matches!(
            check_item(&long_key, ""),
            Err(KvpSetError::Key(_))
        ));
        assert_eq!(check_item(&"k".repeat(MAX_KEY_UNITS), ""), Ok(()));
        // Counted as the wire carries them: one emoji is two UTF-16 units and 4 UTF-8 bytes.
        let emoji = "\u{1F600}".repeat(MAX_VALUE_UNITS / 2 + 1);
        assert!(matches!(
            check_item("k", &emoji),
            Err(KvpSetError::Value(_))
        ));
        let dev = KvpDevice::new().unwrap();
        assert!(dev.set("", "x").is_err());
        // A flood of requests stays bounded.
        for i in 0..1000 {
            dev.set(&format!("k{i}"), "v").unwrap();
        }
        assert_eq!(support::lock(&dev.commands).len(), ic::kvp::MAX_QUEUE);
    }
}
