//! The VMBus host at run time: the thin I/O adapter around the sans-I/O [`Server`].
//!
//! * **vCPU threads** call [`VmbusHost::post_message`] (HvPostMessage: checked there, then
//!   queued, bounded, for the control thread) and [`VmbusHost::signal_event`] (HvSignalEvent:
//!   a port-table lookup and an eventfd write, no device code and no VM-wide lock).
//! * **One control thread** owns the [`Server`] and the devices: it carries out the server's
//!   actions, opens and closes channels, and delivers host-to-guest messages through the
//!   [`Synic`] interface, keeping them in order when the guest's message queue is full.
//! * **One worker thread per open channel** runs the device's [`ChannelWorker`] (see
//!   [`worker`]). A channel's port is registered (in the port table and through
//!   [`Synic::route_signal`]) before OPENCHANNEL_RESULT goes out; on close,
//!   the worker is stopped and joined before any later message (such as GPADL_TORNDOWN) can
//!   reach the guest, so nothing touches a ring after its close.

mod ports;
mod worker;

pub use ports::Doorbell;
pub use worker::WorkerStats;

use crate::channel::{Channel, Side, SignalFn};
use crate::device::{
    BusControl, Device, DeviceOffer, DeviceRestoreError, Gpadls, OpenedChannel, SavedDevice,
};
use crate::server::{Action, OpenRequest, RestoreError, SavedState, Server, ServerConfig};
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender, TrySendError};
use guestmem::GuestMemory;
use hvdef::hv::HvStatus;
use hvdef::vmbus::{self as hv, MAX_MESSAGE_SIZE};
use ports::Ports;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use worker::WorkerHandle;

/// The one interface between VMBus (and its devices) and the hypervisor's SynIC: host-to-guest
/// messages and events, and the guest-to-host signal route. Devices never see the hypercall
/// code.
pub trait Synic: Send + Sync {
    /// Posts a VMBus message (SynIC message type 1) to `sint` of VP `vp`.
    fn post_message(&self, vp: u32, sint: u8, message: &[u8]) -> Result<(), PostFailure>;
    /// Sets event flag `flag` of `sint` on VP `vp` and interrupts it if the flag was clear.
    fn signal_event(&self, vp: u32, sint: u8, flag: u32);
    /// A channel with `connection_id` opened: the hypervisor may ring `doorbell` itself for the
    /// guest's HvSignalEvent on it, without [`VmbusHost::signal_event`] (which keeps working
    /// for the same id). Called before the guest hears that the channel opened.
    fn route_signal(&self, connection_id: u32, doorbell: &Arc<Doorbell>);
    /// The channel with `connection_id` is closing: undo [`Synic::route_signal`]. Called before
    /// its worker stops.
    fn unroute_signal(&self, connection_id: u32);
}

/// Why a message could not be posted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostFailure {
    /// The VP's queue for the SINT is full: try again once the guest has taken messages.
    QueueFull,
    /// The message can never be delivered (no such VP or SINT); it is dropped.
    Undeliverable(String),
}

/// Host configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub server: ServerConfig,
    /// Guest messages that may wait for the control thread; more get
    /// HV_STATUS_INSUFFICIENT_BUFFERS and the guest retries.
    pub message_queue: usize,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            server: ServerConfig::default(),
            message_queue: 32,
        }
    }
}

/// Identifies a device on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(u64);

/// Host API errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    #[error("cannot offer the device: {0}")]
    Offer(#[from] crate::server::ServerError),
    #[error("no such device")]
    UnknownDevice,
    #[error("the VMBus host has stopped")]
    Stopped,
    #[error("restore: {0}")]
    Restore(String),
}

impl From<RestoreError> for HostError {
    fn from(e: RestoreError) -> Self {
        HostError::Restore(e.to_string())
    }
}

impl From<DeviceRestoreError> for HostError {
    fn from(e: DeviceRestoreError) -> Self {
        HostError::Restore(e.to_string())
    }
}

/// The saved state of the whole bus: the server's, and each device's by offer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedBus {
    pub version: u32,
    pub server: SavedState,
    pub devices: Vec<SavedBusDevice>,
}

/// One device of a [`SavedBus`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedBusDevice {
    pub interface_type: String,
    pub instance_id: String,
    /// Relids of the subchannels the device had added, in index order.
    pub subchannel_relids: Vec<u32>,
    pub state: SavedDevice,
}

const SAVED_BUS_VERSION: u32 = 1;

struct GuestMessage {
    connection_id: u32,
    vp: u32,
    len: u8,
    data: [u8; MAX_MESSAGE_SIZE],
}

type Reply<T> = Sender<T>;

enum Request {
    AddDevice(Arc<dyn Device>, Reply<Result<DeviceId, HostError>>),
    RemoveDevice(DeviceId, Reply<Result<(), HostError>>),
    AddSubchannels { device: DeviceId, count: u16 },
    Inspect(Reply<serde_json::Value>),
    Save(Reply<SavedBus>),
    Restore(Box<SavedBus>, Reply<Result<(), HostError>>),
    Stop,
}

struct Shared {
    ports: Ports,
    messages: Sender<GuestMessage>,
    requests: Sender<Request>,
    /// Host-to-guest messages waiting for room in the guest's SynIC queue.
    backlog: AtomicUsize,
    /// Negotiated protocol version, 0 when disconnected.
    version: AtomicU32,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Handle to the VMBus host; clones share it.
#[derive(Clone)]
pub struct VmbusHost {
    shared: Arc<Shared>,
}

static GUEST_LOG: support::RateLimit = support::RateLimit::guest();

impl VmbusHost {
    /// Starts the control thread.
    pub fn start(
        config: HostConfig,
        mem: GuestMemory,
        synic: Arc<dyn Synic>,
    ) -> std::io::Result<Self> {
        let (messages, message_rx) = bounded(config.message_queue.max(1));
        let (requests, request_rx) = unbounded();
        let shared = Arc::new(Shared {
            ports: Ports::default(),
            messages,
            requests,
            backlog: AtomicUsize::new(0),
            version: AtomicU32::new(0),
            thread: Mutex::new(None),
        });
        let control = Control {
            server: Server::new(config.server),
            mem,
            synic,
            shared: shared.clone(),
            devices: BTreeMap::new(),
            relids: HashMap::new(),
            workers: HashMap::new(),
            starting: Vec::new(),
            outbox: VecDeque::new(),
            next_device: 1,
        };
        let thread = std::thread::Builder::new()
            .name("vmbus".into())
            .spawn(move || control.run(message_rx, request_rx))?;
        *support::lock(&shared.thread) = Some(thread);
        Ok(Self { shared })
    }

    /// HvPostMessage from VP `vp`: checked here, on the vCPU thread, and queued for the
    /// control thread. A full queue, or host messages still waiting for the guest to take
    /// them, answer HV_STATUS_INSUFFICIENT_BUFFERS; the guest retries.
    pub fn post_message(&self, connection_id: u32, vp: u32, payload: &[u8]) -> HvStatus {
        if connection_id != hv::MESSAGE_CONNECTION_ID
            && connection_id != hv::MESSAGE_CONNECTION_ID_4
        {
            return HvStatus::INVALID_CONNECTION_ID;
        }
        if payload.len() > MAX_MESSAGE_SIZE {
            return HvStatus::INVALID_PARAMETER;
        }
        if self.shared.backlog.load(Ordering::Acquire) > 0 {
            return HvStatus::INSUFFICIENT_BUFFERS;
        }
        let mut msg = GuestMessage {
            connection_id,
            vp,
            len: payload.len() as u8,
            data: [0; MAX_MESSAGE_SIZE],
        };
        msg.data[..payload.len()].copy_from_slice(payload);
        match self.shared.messages.try_send(msg) {
            Ok(()) => HvStatus::SUCCESS,
            Err(TrySendError::Full(_)) => HvStatus::INSUFFICIENT_BUFFERS,
            Err(TrySendError::Disconnected(_)) => HvStatus::INVALID_CONNECTION_ID,
        }
    }

    /// HvSignalEvent: rings the doorbell of the channel with this connection id.
    pub fn signal_event(&self, connection_id: u32) -> HvStatus {
        self.shared.ports.signal(connection_id)
    }

    /// The negotiated VMBus version, if the guest is connected.
    pub fn version(&self) -> Option<u32> {
        match self.shared.version.load(Ordering::Acquire) {
            0 => None,
            v => Some(v),
        }
    }

    /// Open channels with a registered port.
    pub fn open_ports(&self) -> usize {
        self.shared.ports.len()
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, HostError> {
        let (tx, rx) = bounded(1);
        self.shared
            .requests
            .send(make(tx))
            .map_err(|_| HostError::Stopped)?;
        rx.recv().map_err(|_| HostError::Stopped)
    }

    /// Offers a device (hot-plug when the guest is already connected).
    pub fn add_device(&self, device: Arc<dyn Device>) -> Result<DeviceId, HostError> {
        self.call(|r| Request::AddDevice(device, r))?
    }

    /// Rescinds every channel of a device (hot-unplug); open ones are closed and their
    /// workers stopped first.
    pub fn remove_device(&self, id: DeviceId) -> Result<(), HostError> {
        self.call(|r| Request::RemoveDevice(id, r))?
    }

    /// A JSON dump of the bus: connection, channels, GPADLs, devices and their workers.
    pub fn inspect(&self) -> Result<serde_json::Value, HostError> {
        self.call(Request::Inspect)
    }

    /// Saves the bus and every device.
    pub fn save(&self) -> Result<SavedBus, HostError> {
        self.call(Request::Save)
    }

    /// Restores a saved bus into this host, whose devices must have been added again in the
    /// same order. Open channels get their workers back.
    pub fn restore(&self, saved: SavedBus) -> Result<(), HostError> {
        self.call(|r| Request::Restore(Box::new(saved), r))?
    }

    /// Stops every worker and the control thread.
    pub fn stop(&self) {
        let _ = self.shared.requests.send(Request::Stop);
        let thread = support::lock(&self.shared.thread).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

struct DeviceEntry {
    device: Arc<dyn Device>,
    offer: DeviceOffer,
    /// Relid of each channel, primary first; `None` once removed.
    relids: Vec<Option<u32>>,
    bus: Arc<DeviceBus>,
    removing: bool,
}

/// [`BusControl`] for one device: requests go to the control thread without waiting for it
/// (a worker may ask while the control thread is stopping another worker).
struct DeviceBus {
    requests: Sender<Request>,
    device: DeviceId,
    max: u16,
    granted: AtomicU16,
}

impl BusControl for DeviceBus {
    fn add_subchannels(&self, count: u16) -> u16 {
        let mut granted = 0;
        let _ = self
            .granted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |have| {
                granted = count.min(self.max.saturating_sub(have));
                Some(have + granted)
            });
        if granted > 0 {
            let _ = self.requests.send(Request::AddSubchannels {
                device: self.device,
                count: granted,
            });
        }
        granted
    }
}

struct OpenChannel {
    connection_id: u32,
    gpadls: Gpadls,
    worker: Option<WorkerHandle>,
}

struct Starting {
    relid: u32,
    name: String,
    channel: Channel,
    worker: Box<dyn crate::device::ChannelWorker>,
    doorbell: Arc<Doorbell>,
}

struct Control {
    server: Server,
    mem: GuestMemory,
    synic: Arc<dyn Synic>,
    shared: Arc<Shared>,
    devices: BTreeMap<DeviceId, DeviceEntry>,
    /// relid → (device, channel index).
    relids: HashMap<u32, (DeviceId, u16)>,
    workers: HashMap<u32, OpenChannel>,
    /// Workers to start once the messages of the current step are out.
    starting: Vec<Starting>,
    outbox: VecDeque<(u32, u8, crate::server::OutgoingMessage)>,
    next_device: u64,
}

/// How often to retry host-to-guest messages while the guest's queue is full.
const BACKLOG_RETRY: Duration = Duration::from_millis(2);

impl Control {
    fn run(mut self, messages: Receiver<GuestMessage>, requests: Receiver<Request>) {
        loop {
            let stop = if self.outbox.is_empty() {
                select! {
                    recv(messages) -> m => m.map(|m| self.guest_message(m)).is_err(),
                    recv(requests) -> r => r.map_or(true, |r| self.request(r)),
                }
            } else {
                select! {
                    recv(messages) -> m => m.map(|m| self.guest_message(m)).is_err(),
                    recv(requests) -> r => r.map_or(true, |r| self.request(r)),
                    default(BACKLOG_RETRY) => false,
                }
            };
            self.flush_outbox();
            if stop {
                break;
            }
        }
        for (_, open) in std::mem::take(&mut self.workers) {
            self.remove_port(open.connection_id);
            if let Some(w) = open.worker {
                w.stop();
            }
        }
    }

    fn guest_message(&mut self, m: GuestMessage) {
        let data = &m.data[..m.len as usize];
        // The connection id and length were checked on the vCPU thread.
        let _ = self.server.post_message(m.connection_id, m.vp, data);
        let ty = data
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        // Workers see a new GPADL before the guest hears GPADL_CREATED (the guest may name
        // it in its very next packet).
        if matches!(
            ty,
            Some(hv::msgtype::GPADL_HEADER | hv::msgtype::GPADL_BODY | hv::msgtype::GPADL_TEARDOWN)
        ) {
            self.refresh_gpadls();
        }
        self.pump();
        if ty == Some(hv::msgtype::GPADL_TEARDOWN) {
            self.refresh_gpadls();
        }
    }

    /// Handles a host request; true to stop.
    fn request(&mut self, r: Request) -> bool {
        match r {
            Request::AddDevice(device, reply) => {
                let _ = reply.send(self.add_device(device));
            }
            Request::RemoveDevice(id, reply) => {
                let _ = reply.send(self.remove_device(id));
            }
            Request::AddSubchannels { device, count } => self.add_subchannels(device, count),
            Request::Inspect(reply) => {
                let _ = reply.send(self.inspect());
            }
            Request::Save(reply) => {
                let _ = reply.send(self.save());
            }
            Request::Restore(saved, reply) => {
                let _ = reply.send(self.restore(&saved));
            }
            Request::Stop => return true,
        }
        self.pump();
        false
    }

    fn add_device(&mut self, device: Arc<dyn Device>) -> Result<DeviceId, HostError> {
        let offer = device.offer();
        let relid = self.server.add_offer(offer.params.clone())?;
        let id = DeviceId(self.next_device);
        self.next_device += 1;
        self.relids.insert(relid, (id, 0));
        let bus = Arc::new(DeviceBus {
            requests: self.shared.requests.clone(),
            device: id,
            max: offer.max_subchannels,
            granted: AtomicU16::new(0),
        });
        self.devices.insert(
            id,
            DeviceEntry {
                device,
                offer,
                relids: vec![Some(relid)],
                bus,
                removing: false,
            },
        );
        Ok(id)
    }

    fn remove_device(&mut self, id: DeviceId) -> Result<(), HostError> {
        let dev = self.devices.get_mut(&id).ok_or(HostError::UnknownDevice)?;
        if dev.removing {
            return Err(HostError::UnknownDevice);
        }
        dev.removing = true;
        let relids: Vec<u32> = dev.relids.iter().flatten().copied().collect();
        for relid in relids {
            // Already rescinded channels stay as they are.
            let _ = self.server.rescind(relid);
        }
        self.pump();
        self.forget_removed(id);
        Ok(())
    }

    fn add_subchannels(&mut self, id: DeviceId, count: u16) {
        let Some(dev) = self.devices.get_mut(&id) else {
            return;
        };
        if dev.removing {
            return;
        }
        for _ in 0..count {
            let index = dev.relids.len() as u16;
            let mut params = dev.offer.params.clone();
            params.sub_channel_index = index;
            match self.server.add_offer(params) {
                Ok(relid) => {
                    dev.relids.push(Some(relid));
                    self.relids.insert(relid, (id, index));
                }
                Err(e) => {
                    support::limited!(
                        GUEST_LOG,
                        warn,
                        "vmbus: no subchannel for {}: {e}",
                        dev.offer.name
                    );
                    break;
                }
            }
        }
    }

    /// Carries out the server's actions, in order.
    fn pump(&mut self) {
        while let Some(action) = self.server.poll_action() {
            match action {
                Action::SendMessage { vp, sint, message } => {
                    self.outbox.push_back((vp, sint, message));
                    self.flush_outbox();
                }
                Action::OpenChannel(req) => self.open(req, true),
                Action::CloseChannel { relid } => self.close(relid),
                Action::TargetVpChanged { relid, vp } => {
                    if let Some((dev, index)) = self.relids.get(&relid) {
                        if let Some(d) = self.devices.get(dev) {
                            d.device.retarget(*index, vp);
                        }
                    }
                }
                Action::ChannelRemoved { relid } => self.channel_removed(relid),
                Action::Reset => self.drop_subchannel_offers(None),
            }
        }
        self.shared
            .version
            .store(self.server.version().unwrap_or(0), Ordering::Release);
        self.flush_outbox();
        for s in std::mem::take(&mut self.starting) {
            let Some(open) = self.workers.get_mut(&s.relid) else {
                continue;
            };
            match worker::spawn(s.name, s.channel, s.worker, s.doorbell) {
                Ok(w) => open.worker = Some(w),
                Err(e) => tracing::error!("vmbus: cannot start a worker thread: {e}"),
            }
        }
    }

    fn open(&mut self, req: OpenRequest, send_result: bool) {
        let relid = req.relid;
        let status = match self.try_open(req) {
            Ok(()) => 0,
            Err(e) => {
                support::limited!(GUEST_LOG, warn, "vmbus: channel {relid} not opened: {e}");
                hv::STATUS_UNSUCCESSFUL
            }
        };
        if send_result {
            if let Err(e) = self.server.open_complete(relid, status) {
                tracing::debug!("vmbus: open_complete({relid}): {e}");
            }
        }
    }

    fn try_open(&mut self, req: OpenRequest) -> Result<(), String> {
        let &(id, index) = self
            .relids
            .get(&req.relid)
            .ok_or_else(|| "no device owns this channel".to_string())?;
        let dev = self
            .devices
            .get(&id)
            .ok_or_else(|| "no device owns this channel".to_string())?;
        let signal: SignalFn = {
            let synic = self.synic.clone();
            let target = req.target.clone();
            Arc::new(move || synic.signal_event(target.vp(), hv::MESSAGE_SINT, target.relid))
        };
        let channel = Channel::new(
            &self.mem,
            &req.ring_pfns,
            req.downstream_page_offset,
            Side::Host,
            Some(signal),
        )
        .map_err(|e| e.to_string())?;
        let doorbell = Arc::new(Doorbell::new().map_err(|e| e.to_string())?);
        let gpadls = Gpadls::default();
        gpadls.set(self.server.channel_gpadls(req.relid));
        let name = if index == 0 {
            dev.offer.name.clone()
        } else {
            format!("{}.{index}", dev.offer.name)
        };
        let worker = dev
            .device
            .open(OpenedChannel {
                index,
                relid: req.relid,
                user_data: req.user_data,
                target_vp: req.target.vp(),
                gpadls: gpadls.clone(),
                bus: dev.bus.clone(),
            })
            .map_err(|e| e.to_string())?;
        // The doorbell works before OPENCHANNEL_RESULT leaves; the worker starts right after.
        self.shared
            .ports
            .insert(req.connection_id, doorbell.clone());
        self.synic.route_signal(req.connection_id, &doorbell);
        self.workers.insert(
            req.relid,
            OpenChannel {
                connection_id: req.connection_id,
                gpadls,
                worker: None,
            },
        );
        self.starting.push(Starting {
            relid: req.relid,
            name: format!("vmbus-{name}"),
            channel,
            worker,
            doorbell,
        });
        Ok(())
    }

    fn close(&mut self, relid: u32) {
        self.starting.retain(|s| s.relid != relid);
        if let Some(open) = self.workers.remove(&relid) {
            self.remove_port(open.connection_id);
            if let Some(w) = open.worker {
                w.stop();
            }
        }
        let Some(&(id, index)) = self.relids.get(&relid) else {
            return;
        };
        if let Some(d) = self.devices.get(&id) {
            d.device.close(index);
        }
        if index == 0 {
            // Subchannels live as long as their primary is open.
            self.drop_subchannel_offers(Some(id));
        }
    }

    /// Stops HvSignalEvent on `connection_id` from reaching the channel's doorbell.
    fn remove_port(&self, connection_id: u32) {
        self.synic.unroute_signal(connection_id);
        self.shared.ports.remove(connection_id);
    }

    /// Rescinds the subchannel offers of one device (or of all, on guest reset).
    fn drop_subchannel_offers(&mut self, only: Option<DeviceId>) {
        for (id, dev) in &mut self.devices {
            if only.is_some_and(|o| o != *id) {
                continue;
            }
            for relid in dev.relids.iter().skip(1).flatten() {
                let _ = self.server.rescind(*relid);
            }
            dev.bus.granted.store(0, Ordering::Release);
        }
    }

    fn channel_removed(&mut self, relid: u32) {
        let Some((id, index)) = self.relids.remove(&relid) else {
            return;
        };
        if let Some(dev) = self.devices.get_mut(&id) {
            if let Some(slot) = dev.relids.get_mut(index as usize) {
                *slot = None;
            }
            // Trailing removed subchannels free their indices for the next request.
            while dev.relids.len() > 1 && dev.relids.last() == Some(&None) {
                dev.relids.pop();
            }
        }
        self.forget_removed(id);
    }

    fn forget_removed(&mut self, id: DeviceId) {
        if self
            .devices
            .get(&id)
            .is_some_and(|d| d.removing && d.relids.iter().all(Option::is_none))
        {
            self.devices.remove(&id);
        }
    }

    fn refresh_gpadls(&mut self) {
        for (relid, open) in &self.workers {
            open.gpadls.set(self.server.channel_gpadls(*relid));
        }
    }

    /// Delivers waiting host-to-guest messages in order, until the guest's queue is full.
    fn flush_outbox(&mut self) {
        while let Some((vp, sint, msg)) = self.outbox.front() {
            match self.synic.post_message(*vp, *sint, msg.as_bytes()) {
                Ok(()) => {
                    self.outbox.pop_front();
                }
                Err(PostFailure::QueueFull) => break,
                Err(PostFailure::Undeliverable(why)) => {
                    support::limited!(GUEST_LOG, warn, "vmbus: message to VP {vp} dropped: {why}");
                    self.outbox.pop_front();
                }
            }
        }
        self.shared
            .backlog
            .store(self.outbox.len(), Ordering::Release);
    }

    fn inspect(&self) -> serde_json::Value {
        let devices: Vec<serde_json::Value> = self
            .devices
            .iter()
            .map(|(id, d)| {
                let channels: Vec<serde_json::Value> = d
                    .relids
                    .iter()
                    .enumerate()
                    .filter_map(|(index, r)| r.map(|relid| (index, relid)))
                    .map(|(index, relid)| {
                        let worker = self.workers.get(&relid).and_then(|o| o.worker.as_ref());
                        serde_json::json!({
                            "index": index,
                            "relid": relid,
                            "open": self.workers.contains_key(&relid),
                            "doorbells": worker.map(|w| w.doorbell.count()),
                            "worker": worker.map(|w| w.stats.snapshot()),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "id": id.0,
                    "name": d.offer.name,
                    "interface_type": d.offer.params.interface_type.to_string(),
                    "instance_id": d.offer.params.instance_id.to_string(),
                    "removing": d.removing,
                    "channels": channels,
                    "state": d.device.inspect(),
                })
            })
            .collect();
        serde_json::json!({
            "version": self.server.version(),
            "message_backlog": self.outbox.len(),
            "server": self.server.save(),
            "devices": devices,
        })
    }

    fn save(&self) -> SavedBus {
        SavedBus {
            version: SAVED_BUS_VERSION,
            server: self.server.save(),
            devices: self
                .devices
                .values()
                .filter(|d| !d.removing)
                .map(|d| SavedBusDevice {
                    interface_type: d.offer.params.interface_type.to_string(),
                    instance_id: d.offer.params.instance_id.to_string(),
                    subchannel_relids: d.relids.iter().skip(1).flatten().copied().collect(),
                    state: d.device.save(),
                })
                .collect(),
        }
    }

    fn restore(&mut self, saved: &SavedBus) -> Result<(), HostError> {
        if saved.version != SAVED_BUS_VERSION {
            return Err(HostError::Restore(format!(
                "saved bus version {} is not supported",
                saved.version
            )));
        }
        if !self.workers.is_empty() || self.server.version().is_some() {
            return Err(HostError::Restore("the bus is already in use".into()));
        }
        let live: Vec<DeviceId> = self.devices.keys().copied().collect();
        if live.len() != saved.devices.len() {
            return Err(HostError::Restore(format!(
                "{} devices saved, {} added",
                saved.devices.len(),
                live.len()
            )));
        }
        for (id, sd) in live.iter().zip(&saved.devices) {
            let d = &self.devices[id];
            if d.offer.params.interface_type.to_string() != sd.interface_type
                || d.offer.params.instance_id.to_string() != sd.instance_id
            {
                return Err(HostError::Restore(format!(
                    "device {} does not match the saved {}",
                    d.offer.name, sd.instance_id
                )));
            }
            if sd.subchannel_relids.len() > d.offer.max_subchannels as usize {
                return Err(HostError::Restore("too many subchannels".into()));
            }
        }
        for (id, sd) in live.iter().zip(&saved.devices) {
            let dev = self.devices.get_mut(id).expect("listed");
            for (i, &relid) in sd.subchannel_relids.iter().enumerate() {
                let index = i as u16 + 1;
                let mut params = dev.offer.params.clone();
                params.sub_channel_index = index;
                self.server.add_offer_with_relid(params, relid)?;
                dev.relids.push(Some(relid));
                self.relids.insert(relid, (*id, index));
            }
            dev.bus
                .granted
                .store(sd.subchannel_relids.len() as u16, Ordering::Release);
            dev.device.restore(&sd.state)?;
        }
        let opens = self.server.restore(&saved.server)?;
        for req in opens {
            let opening = matches!(
                self.server.channel_state(req.relid),
                Some(crate::server::ChannelState::Opening { .. })
            );
            self.open(req, opening);
        }
        self.pump();
        Ok(())
    }
}
