//! The network VSP: Hyper-V's synthetic NIC on VMBus, served to the guest's own
//! `hv_netvsc`.
//!
//! - [`nvsp`] and [`rndis`] are the sans-I/O protocol halves (parsing, negotiation, OIDs,
//!   the messages the host writes), tested and fuzzed on bytes alone.
//! - [`NetvspDevice`] is the [`vmbus::Device`]: one worker per open channel (primary and
//!   vRSS subchannels, each on its own thread), each with its own backend queue, its own
//!   receive sections and its own counters, so the data path shares no lock between queues.
//! - [`backend`] is the packet endpoint trait with an in-memory implementation; [`tap`]
//!   implements it over a Linux TAP device with virtio-net headers.
//! - [`policy`] is the port policy (MAC spoofing protection, DHCP and router guard, the
//!   packet filter); [`vnet`] maps checksum and LSO requests to virtio-net headers.
//!
//! **Data path.** A guest frame is copied once out of guest memory (its send-buffer section
//! or GPA_DIRECT pages) into the worker's buffer, checked against the port policy, fixed up
//! for the kernel's offload rules and written to the backend. A received frame is read by
//! the kernel straight into receive sections (one `readv`), the RNDIS headers are written in
//! front of it, and frames are batched into one transfer-page packet (one guest interrupt)
//! per pass. Frames larger than a section (TSO from the host) go as RSC fragments, one
//! section each. Sections the guest never returns are never reused: frames are then dropped
//! and counted, and the worker sleeps until the guest sends something.
//!
//! **Save** pauses the NIC (see [`held`]): the saved state has the sections the guest holds,
//! so a restored NIC does not write over them before the guest returns them;
//! [`NetvspDevice::resume`] lets a VM that goes on running continue.
#![deny(unsafe_code)]

pub mod backend;
mod bell;
pub mod buffers;
#[cfg(feature = "test-util")]
pub mod client;
pub mod held;
pub mod nvsp;
pub mod policy;
pub mod rndis;
pub mod stats;
pub mod tap;
pub mod vnet;
mod worker;

pub use backend::{Backend, BackendQueue, MemoryBackend, MemoryPort};
pub use policy::PortPolicy;
pub use stats::Counters;

use buffers::{ReceiveBuffer, SendBuffer};
use guestmem::GuestMemory;
use hvdef::vmbus::Guid;
use rndis::RndisState;
use stats::QueueCounters;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use vmbus::{
    ChannelWorker, DeviceOffer, DeviceRestoreError, OpenError, OpenedChannel, SavedDevice,
};

/// Version of [`SavedState`] (2 added the held receive sections; version 1 is still
/// restored).
pub const SAVED_STATE_VERSION: u32 = 2;
/// Largest MTU a NIC may have (jumbo frames).
pub const MAX_MTU: u32 = 9000;
/// Smallest MTU (Linux's ETH_MIN_MTU).
pub const MIN_MTU: u32 = 68;
/// Most queues (channels) a NIC may have (Linux's VRSS_CHANNEL_MAX).
pub const MAX_QUEUES: u16 = 64;

static LOG: support::RateLimit = support::RateLimit::guest();

/// What the VMM configures for one NIC.
#[derive(Debug, Clone)]
pub struct NicConfig {
    /// Instance GUID of the VMBus offer.
    pub instance_id: Guid,
    pub mac: [u8; 6],
    /// Largest payload per frame (1500 by default, up to [`MAX_MTU`]).
    pub mtu: u32,
    /// Most queues: the primary channel plus subchannels (one per vCPU, capped by the
    /// backend's queues).
    pub max_queues: u16,
    pub policy: PortPolicy,
}

/// Why a NIC could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("MTU {0} is outside {MIN_MTU}..={MAX_MTU}")]
    Mtu(u32),
    #[error("the backend has no queues")]
    NoQueues,
    #[error("MAC {0} is multicast or zero")]
    Mac(String),
    #[error("cannot create an eventfd: {0}")]
    Io(#[from] std::io::Error),
}

/// The negotiated NVSP state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NvspState {
    pub version: Option<u32>,
    pub ndis_version: Option<(u32, u32)>,
    /// The MTU the guest said it uses (NDIS_CONFIG, with the Ethernet header).
    pub guest_mtu: Option<u32>,
    pub capabilities: u64,
}

/// The device's saved state (version [`SAVED_STATE_VERSION`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedState {
    pub nvsp: NvspState,
    pub rndis: RndisState,
    /// GPADL and id of the receive buffer, when the guest gave one.
    pub receive_buffer: Option<(u32, u16)>,
    pub send_buffer: Option<(u32, u16)>,
    pub subchannels: u16,
    pub link_up: bool,
    /// Sections of the receive buffer (what held sections are checked against).
    #[serde(default)]
    pub receive_sections: Option<u32>,
    /// Channels whose guest holds receive sections.
    #[serde(default)]
    pub channels: Vec<held::SavedChannel>,
}

/// A buffer's GPADL and id.
type BufferRef = (u32, u16);

/// A restored state's buffers, mapped again when the primary reopens.
#[derive(Debug, Clone, Default)]
struct Restored {
    receive_buffer: Option<BufferRef>,
    send_buffer: Option<BufferRef>,
    receive_sections: Option<u32>,
    /// Every section some channel's guest holds.
    held: Vec<u32>,
}

#[derive(Default)]
struct Control {
    nvsp: NvspState,
    rndis: RndisState,
    recv: Option<Arc<ReceiveBuffer>>,
    send: Option<Arc<SendBuffer>>,
    /// Saved buffers to map again when the primary reopens after a restore.
    restored: Option<Restored>,
    subchannels: u16,
}

/// State shared by the control thread, the channel workers and the host API. The data path
/// reads only atomics; the mutexes are taken for control messages and channel open/close.
struct Shared {
    config: NicConfig,
    mem: GuestMemory,
    name: String,
    link_up: AtomicBool,
    /// Rung by [`NetvspDevice::set_link`]: the primary's worker sends the indication.
    link_bell: bell::Bell,
    /// What the guest was last told of the link: 0 nothing yet, 1 down, 2 up.
    link_reported: AtomicU8,
    packet_filter: AtomicU32,
    rndis_ready: AtomicBool,
    /// Bumped whenever a buffer is given, revoked or restored.
    generation: AtomicU64,
    control: Mutex<Control>,
    queues: Mutex<Vec<Option<Box<dyn BackendQueue>>>>,
    /// Receive sections the primary hands to each subchannel, and whether some are waiting.
    handover: Mutex<Vec<Vec<u32>>>,
    handover_pending: Vec<AtomicBool>,
    counters: Vec<QueueCounters>,
    open_channels: Mutex<Vec<u16>>,
    /// Set by save: workers leave rings and sections alone until [`NetvspDevice::resume`].
    paused: AtomicBool,
    /// Each queue's held receive sections (see [`held`]).
    held: Vec<Mutex<held::Held>>,
    /// Rung by resume, one per queue.
    resume_bells: Vec<bell::Bell>,
}

impl Shared {
    fn nic_info(&self, nvsp_version: u32) -> rndis::NicInfo {
        rndis::NicInfo {
            mac: self.config.mac,
            mtu: self.config.mtu,
            link_up: self.link_up.load(Ordering::Relaxed),
            max_queues: self.config.max_queues,
            nvsp_version,
        }
    }
}

/// The synthetic NIC.
pub struct NetvspDevice {
    shared: Arc<Shared>,
}

fn mac_string(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl NetvspDevice {
    /// A NIC over `backend`'s queues; the workers move frames to and from guest memory
    /// `mem`. `max_queues` is capped by the backend's queue count and [`MAX_QUEUES`].
    pub fn new(
        mut config: NicConfig,
        mem: GuestMemory,
        backend: impl Backend,
    ) -> Result<Arc<Self>, NicError> {
        if !(MIN_MTU..=MAX_MTU).contains(&config.mtu) {
            return Err(NicError::Mtu(config.mtu));
        }
        if config.mac[0] & 1 != 0 || config.mac == [0; 6] {
            return Err(NicError::Mac(mac_string(&config.mac)));
        }
        let mut queues = backend.into_queues();
        if queues.is_empty() {
            return Err(NicError::NoQueues);
        }
        for q in &mut queues {
            if let Err(e) = q.set_enabled(false) {
                support::limited!(LOG, warn, error = %e, "netvsp: cannot disable a backend queue");
            }
        }
        config.max_queues = config
            .max_queues
            .clamp(1, MAX_QUEUES)
            .min(queues.len() as u16);
        let n = usize::from(config.max_queues);
        queues.truncate(n);
        let name = format!("nic-{}", mac_string(&config.mac));
        Ok(Arc::new(Self {
            shared: Arc::new(Shared {
                name,
                mem,
                link_up: AtomicBool::new(true),
                link_bell: bell::Bell::new()?,
                link_reported: AtomicU8::new(0),
                packet_filter: AtomicU32::new(0),
                rndis_ready: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                control: Mutex::default(),
                queues: Mutex::new(queues.into_iter().map(Some).collect()),
                handover: Mutex::new(vec![Vec::new(); n]),
                handover_pending: (0..n).map(|_| AtomicBool::new(false)).collect(),
                counters: (0..n).map(|_| QueueCounters::default()).collect(),
                open_channels: Mutex::default(),
                paused: AtomicBool::new(false),
                held: (0..n).map(|_| Mutex::default()).collect(),
                resume_bells: (0..n)
                    .map(|_| bell::Bell::new())
                    .collect::<Result<_, _>>()?,
                config,
            }),
        }))
    }

    pub fn mac(&self) -> [u8; 6] {
        self.shared.config.mac
    }

    /// Connects or disconnects the cable: the guest gets an RNDIS media connect or
    /// disconnect indication (once it has initialized RNDIS). While down, frames are
    /// dropped both ways.
    pub fn set_link(&self, up: bool) {
        self.shared.link_up.store(up, Ordering::Relaxed);
        self.shared.link_bell.ring();
    }

    pub fn link_up(&self) -> bool {
        self.shared.link_up.load(Ordering::Relaxed)
    }

    /// Totals over all queues.
    pub fn stats(&self) -> Counters {
        let mut t = Counters::default();
        for c in &self.shared.counters {
            t += c.snapshot();
        }
        t
    }

    /// Counters of each queue.
    pub fn queue_stats(&self) -> Vec<Counters> {
        self.shared.counters.iter().map(|c| c.snapshot()).collect()
    }

    /// The negotiated NVSP state.
    pub fn nvsp(&self) -> NvspState {
        support::lock(&self.shared.control).nvsp
    }

    /// The RNDIS state.
    pub fn rndis(&self) -> RndisState {
        support::lock(&self.shared.control).rndis.clone()
    }

    /// Subchannels offered so far.
    pub fn subchannels(&self) -> u16 {
        support::lock(&self.shared.control).subchannels
    }

    /// Pauses the NIC and saves it (see [`held`]).
    fn saved(&self) -> SavedState {
        let sh = &self.shared;
        sh.paused.store(true, Ordering::SeqCst);
        // Waits for a pass under way.
        let channels = (0u16..)
            .zip(&sh.held)
            .filter_map(|(i, h)| held::save(i, &support::lock(h)))
            .collect();
        let c = support::lock(&sh.control);
        let r = c.restored.clone().unwrap_or_else(|| Restored {
            receive_buffer: c.recv.as_ref().map(|r| (r.buf.gpadl, r.buf.id)),
            send_buffer: c.send.as_ref().map(|s| (s.buf.gpadl, s.buf.id)),
            receive_sections: c.recv.as_ref().map(|r| r.sections),
            held: Vec::new(),
        });
        SavedState {
            nvsp: c.nvsp,
            rndis: c.rndis.clone(),
            receive_buffer: r.receive_buffer,
            send_buffer: r.send_buffer,
            subchannels: c.subchannels,
            link_up: self.link_up(),
            receive_sections: r.receive_sections,
            channels,
        }
    }

    /// Lets a paused (saved) NIC go on.
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
        for b in &self.shared.resume_bells {
            b.ring();
        }
    }
}

impl vmbus::Device for NetvspDevice {
    fn offer(&self) -> DeviceOffer {
        let mut o = DeviceOffer::new(
            &self.shared.name,
            hvdef::netvsp::INTERFACE,
            self.shared.config.instance_id,
        );
        o.max_subchannels = self.shared.config.max_queues - 1;
        o
    }

    fn open(&self, ch: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        let i = usize::from(ch.index);
        let queue = support::lock(&self.shared.queues)
            .get_mut(i)
            .and_then(Option::take);
        let Some(mut queue) = queue else {
            return Err(OpenError(format!("no backend queue {i}")));
        };
        if let Err(e) = queue.set_enabled(true) {
            support::limited!(LOG, warn, error = %e, queue = i, "netvsp: cannot enable a backend queue");
        }
        support::lock(&self.shared.open_channels).push(ch.index);
        Ok(Box::new(worker::Worker::new(
            self.shared.clone(),
            ch,
            queue,
        )))
    }

    fn close(&self, index: u16) {
        support::lock(&self.shared.open_channels).retain(|&i| i != index);
        // The guest's sections on a closed channel are its own again.
        for (i, h) in (0u16..).zip(&self.shared.held) {
            if i == index || index == 0 {
                support::lock(h).clear();
            }
        }
        if index == 0 {
            // The guest's driver is gone or reloading: it starts over with INIT.
            // Its subchannels are rescinded with it.
            *support::lock(&self.shared.control) = Control::default();
            self.shared.rndis_ready.store(false, Ordering::Release);
            self.shared.packet_filter.store(0, Ordering::Relaxed);
            self.shared.link_reported.store(0, Ordering::Relaxed);
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
            for (h, p) in support::lock(&self.shared.handover)
                .iter_mut()
                .zip(&self.shared.handover_pending)
            {
                h.clear();
                p.store(false, Ordering::Relaxed);
            }
        }
    }

    fn save(&self) -> SavedDevice {
        SavedDevice {
            version: SAVED_STATE_VERSION,
            data: serde_json::to_value(self.saved()).unwrap_or(serde_json::Value::Null),
        }
    }

    fn restore(&self, saved: &SavedDevice) -> Result<(), DeviceRestoreError> {
        if !(1..=SAVED_STATE_VERSION).contains(&saved.version) {
            return Err(DeviceRestoreError::Version(saved.version));
        }
        let s: SavedState = serde_json::from_value(saved.data.clone())
            .map_err(|e| DeviceRestoreError::Invalid(e.to_string()))?;
        if let Some(v) = s.nvsp.version {
            if !nvsp::VERSIONS.contains(&v) {
                return Err(DeviceRestoreError::Invalid(format!(
                    "NVSP version {v:#x} is not one this NIC speaks"
                )));
            }
        } else if s.receive_buffer.is_some() || s.rndis.initialized {
            return Err(DeviceRestoreError::Invalid(
                "buffers or RNDIS without an NVSP version".into(),
            ));
        }
        if s.subchannels >= self.shared.config.max_queues {
            return Err(DeviceRestoreError::Invalid(format!(
                "{} subchannels, more than the {} queues allow",
                s.subchannels, self.shared.config.max_queues
            )));
        }
        if s.rndis
            .rss
            .table
            .iter()
            .any(|&q| q >= u32::from(self.shared.config.max_queues))
        {
            return Err(DeviceRestoreError::Invalid(
                "RSS table names a queue the NIC does not have".into(),
            ));
        }
        let sections = s.receive_sections.filter(|_| s.receive_buffer.is_some());
        let (maps, all_held) = held::restore(&s.channels, self.shared.config.max_queues, sections)
            .map_err(DeviceRestoreError::Invalid)?;
        let sh = &self.shared;
        for (i, h) in (0u16..).zip(&sh.held) {
            *support::lock(h) = maps.get(&i).cloned().unwrap_or_default();
        }
        let mut c = support::lock(&sh.control);
        *c = Control {
            nvsp: s.nvsp,
            rndis: s.rndis.clone(),
            recv: None,
            send: None,
            restored: Some(Restored {
                receive_buffer: s.receive_buffer,
                send_buffer: s.send_buffer,
                receive_sections: s.receive_sections,
                held: all_held,
            }),
            subchannels: s.subchannels,
        };
        sh.paused.store(false, Ordering::SeqCst);
        sh.packet_filter
            .store(s.rndis.packet_filter, Ordering::Relaxed);
        sh.rndis_ready.store(s.rndis.initialized, Ordering::Release);
        sh.link_reported
            .store(if s.link_up { 2 } else { 1 }, Ordering::Relaxed);
        sh.link_up.store(s.link_up, Ordering::Relaxed);
        sh.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn inspect(&self) -> serde_json::Value {
        let s = &self.shared;
        // Before the control lock: a worker takes its held lock first.
        let held: Vec<usize> = s
            .held
            .iter()
            .map(|h| support::lock(h).values().map(Vec::len).sum())
            .collect();
        let c = support::lock(&s.control);
        let v = c.nvsp.version;
        serde_json::json!({
            "kind": "netvsp",
            "name": s.name,
            "mac": mac_string(&s.config.mac),
            "mtu": s.config.mtu,
            "max_queues": s.config.max_queues,
            "policy": s.config.policy,
            "link_up": s.link_up.load(Ordering::Relaxed),
            "nvsp_version": v.map(|v| format!("{:#x}", v)),
            "ndis_version": c.nvsp.ndis_version.map(|(a, b)| format!("{a}.{b}")),
            "guest_mtu": c.nvsp.guest_mtu,
            "rndis": c.rndis,
            "receive_buffer": c.recv.as_ref().map(|r| serde_json::json!({
                "gpadl": r.buf.gpadl,
                "bytes": r.buf.len(),
                "section_size": r.section_size,
                "sections": r.sections,
            })),
            "send_buffer": c.send.as_ref().map(|b| serde_json::json!({
                "gpadl": b.buf.gpadl,
                "bytes": b.buf.len(),
                "section_size": b.section_size,
                "sections": b.sections,
            })),
            "subchannels": c.subchannels,
            "open_channels": *support::lock(&s.open_channels),
            "paused": s.paused.load(Ordering::SeqCst),
            "held_sections": held,
            "counters": self.stats(),
            "queues": self.queue_stats(),
        })
    }
}
