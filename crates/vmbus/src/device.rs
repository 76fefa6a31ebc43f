//! The device trait: what a synthetic device (an integration service, storvsp, netvsp) gives
//! the VMBus host, and what it gets back when the guest opens one of its channels.
//!
//! A device is shared (`Arc<dyn Device>`) between the VMBus control thread, which calls
//! [`Device::open`] and [`Device::close`], and the host side that owns it (the VMM, which
//! calls the device's own methods, for example "ask the guest to shut down"). Each open
//! channel, primary or subchannel, gets a [`ChannelWorker`] that runs on a thread of its own
//! (see [`crate::host`]): the worker owns the channel's rings, and nothing else touches them.

use crate::channel::Channel;
use crate::packet::PagedRange;
use crate::server::OfferParams;
use hvdef::vmbus::Guid;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// What a device offers on the bus.
#[derive(Debug, Clone)]
pub struct DeviceOffer {
    /// Interface type, instance and flags of the primary channel. Subchannels reuse them
    /// with `sub_channel_index` 1, 2, ...
    pub params: OfferParams,
    /// A short name for logs and inspection ("shutdown", "scsi0").
    pub name: String,
    /// Most subchannels the device may add at run time (0: none).
    pub max_subchannels: u16,
}

impl DeviceOffer {
    pub fn new(name: &str, interface_type: Guid, instance_id: Guid) -> Self {
        Self {
            params: OfferParams::new(interface_type, instance_id),
            name: name.into(),
            max_subchannels: 0,
        }
    }
}

/// The guest's GPADLs of one channel, kept current by the control thread while the channel
/// is open (devices that map guest buffers, such as netvsp's receive buffer, look them up).
#[derive(Debug, Clone, Default)]
pub struct Gpadls(pub(crate) Arc<RwLock<Vec<GpadlEntry>>>);

/// A GPADL id and its ranges.
pub type GpadlEntry = (u32, Arc<[PagedRange]>);

impl Gpadls {
    /// The ranges of created GPADL `id`, if the guest created it for this channel.
    pub fn get(&self, id: u32) -> Option<Arc<[PagedRange]>> {
        support::lock_read(&self.0)
            .iter()
            .find(|(g, _)| *g == id)
            .map(|(_, r)| r.clone())
    }

    pub(crate) fn set(&self, list: Vec<GpadlEntry>) {
        *support::lock_write(&self.0) = list;
    }
}

/// Requests a device can make of the bus at run time, from any thread.
pub trait BusControl: Send + Sync {
    /// Offers `count` more subchannels of the device's primary channel (up to
    /// [`DeviceOffer::max_subchannels`] in all). They are offered to the guest at once if it
    /// has asked for offers. Returns how many were added.
    fn add_subchannels(&self, count: u16) -> u16;
}

/// Everything a device gets when the guest opens one of its channels.
pub struct OpenedChannel {
    /// 0 for the primary channel, else the subchannel index.
    pub index: u16,
    pub relid: u32,
    /// The OPENCHANNEL user data (storvsp and netvsp ignore it; named-pipe devices use it).
    pub user_data: [u8; hvdef::vmbus::OPEN_USER_DATA_SIZE],
    /// The VP that receives this channel's interrupts now (MODIFYCHANNEL changes it).
    pub target_vp: u32,
    pub gpadls: Gpadls,
    pub bus: Arc<dyn BusControl>,
}

/// Why a device refused to open a channel; the guest's OPENCHANNEL fails.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);

/// A broken channel: the worker stops touching the ring and waits for the close.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("channel: {0}")]
    Channel(#[from] crate::ChannelError),
    #[error("{0}")]
    Device(String),
}

/// What a worker's [`ChannelWorker::process`] left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Everything the guest sent is handled; wake me when it sends more.
    Idle,
    /// The ring to the guest is full (pending_send_sz is set): wake me when the guest has
    /// read, even if packets from it are waiting.
    WaitingForRoom,
}

/// The per-channel half of a device, run by one worker thread:
///
/// 1. [`ChannelWorker::start`] once, right after OPENCHANNEL_RESULT (the host speaks first
///    in some protocols);
/// 2. then, in a loop: the guest's interrupt for the incoming ring is masked,
///    [`ChannelWorker::process`] drains it, the interrupt is unmasked and the ring checked
///    once more; then the thread blocks on the channel's doorbell, the stop event, the fds
///    from [`ChannelWorker::fds`] and the [`ChannelWorker::deadline`].
///
/// `process` runs after every wake-up, whatever woke it: it must handle whatever is ready
/// without blocking.
pub trait ChannelWorker: Send {
    /// Called once before the first `process`.
    fn start(&mut self, _ch: &mut Channel) -> Result<(), WorkerError> {
        Ok(())
    }

    /// Handles what is ready: packets from the guest, the device's own fds, timers at `now`.
    fn process(&mut self, ch: &mut Channel, now: Instant) -> Result<Progress, WorkerError>;

    /// Descriptors to wait on besides the doorbell (a TAP device, an io_uring eventfd, an
    /// eventfd the device's host side rings).
    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }

    /// When `process` wants to run again without any other wake-up (a timer).
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// After a wait: which of the descriptors [`Self::fds`] gave were readable (in their
    /// order). A device can then skip reading one that was not, until the next wait.
    fn woken(&mut self, _readable: &[bool]) {}
}

/// The saved state of a device: versioned and typed (each device serializes its own
/// struct; `version` tells restore which layout `data` has).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedDevice {
    pub version: u32,
    pub data: serde_json::Value,
}

/// Why a device could not restore its state.
#[derive(Debug, thiserror::Error)]
pub enum DeviceRestoreError {
    #[error("saved state version {0} is not supported")]
    Version(u32),
    #[error("saved state is invalid: {0}")]
    Invalid(String),
}

/// A synthetic device.
pub trait Device: Send + Sync + 'static {
    /// What to offer.
    fn offer(&self) -> DeviceOffer;

    /// The guest opened channel `index`: build the worker that serves it. Called on the
    /// control thread; the port is registered before and OPENCHANNEL_RESULT sent after.
    fn open(&self, channel: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError>;

    /// Channel `index` is closed and its worker has stopped (it will never touch the ring
    /// again). Also called on guest unload and rescind.
    fn close(&self, _index: u16) {}

    /// MODIFYCHANNEL moved channel `index`'s interrupts to `vp` (the signaller already uses
    /// the new VP; the worker thread stays where it is).
    fn retarget(&self, _index: u16, _vp: u32) {}

    /// The device's state for save/restore.
    fn save(&self) -> SavedDevice {
        SavedDevice {
            version: 0,
            data: serde_json::Value::Null,
        }
    }

    /// Restores what [`Device::save`] returned, before any channel reopens.
    fn restore(&self, _saved: &SavedDevice) -> Result<(), DeviceRestoreError> {
        Ok(())
    }

    /// A JSON dump for inspection.
    fn inspect(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}
