//! The storage VSP: a synthetic SCSI controller on VMBus, served to the guest's own
//! `hv_storvsc`.
//!
//! - [`protocol`] is the sans-I/O core: packet parsing, the init handshake, completions.
//! - [`StorvspDevice`] is the [`vmbus::Device`]: one worker per open channel (primary and
//!   subchannels, each on its own thread, see `vmbus::host`), all sharing one
//!   [`scsi::Target`] and its disks through an `Arc`.
//! - [`disk`] opens image files (VHDX, VHD, raw; ISOs for DVD drives) as SCSI media.
//! - A LUN holds a disk ([`scsi::ScsiDisk`]) or a DVD drive ([`scsi::ScsiDvd`]) whose medium
//!   the host changes while the guest runs ([`StorvspDevice::change_dvd`]).
//! - [`inflight`] keeps each channel's requests between ring and completion where save can
//!   see them (commands that are not safe to replay run atomically with the record of their
//!   completion); `save` (in `save.rs`) pauses the controller and saves the disks'
//!   reservations too, and restore replays the requests.
//!
//! Requests run synchronously on the worker thread: a worker drains its ring, executes each
//! SRB, and completes it. READ and WRITE on a disk image are planned on the SCSI target
//! ([`ScsiDisk::plan_io`]) and carried out by the `vhdx` crate's vectored I/O straight
//! between the image file and the guest pages the GPA_DIRECT packet lists (`preadv` and
//! `pwritev` into guest RAM, no intermediate copy); other commands, and media without a
//! `vhdx` disk, go through a bounce buffer. A completion that does not fit stays queued and the
//! worker reports [`vmbus::Progress::WaitingForRoom`]. Every request gets a completion,
//! hostile ones and backend failures included (Linux's driver waits for ever).
//!
//! **Maximum transfer**: [`MAX_TRANSFER_BYTES`] = 1 MiB. Linux turns it into max_sectors
//! (2048) and its scatter list (257 pages, a 2.1 KiB GPA_DIRECT header that fits its 128 KiB
//! ring many times over), so 1 MiB sequential I/O goes out as single commands; it is also
//! the scsi crate's default VPD B0h maximum for 512-byte blocks, and it bounds the bounce
//! buffer each worker keeps for the commands that need one.
#![forbid(unsafe_code)]

mod buffer;
pub mod disk;
pub mod inflight;
pub mod protocol;
mod save;
mod uring;

use guestmem::GuestMemory;
use hvdef::storvsp::{self as sp, VstorPacket};
use hvdef::vmbus::{packet_type, Guid};
use inflight::{Registry, SavedRequest};
use protocol::{Handshake, Properties, Request, Srb, SrbResult};
use scsi::{Data, InitiatorId, ScsiDisk, ScsiDvd, Target};
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use vmbus::{
    BusControl, Channel, ChannelError, ChannelWorker, DeviceOffer, DeviceRestoreError, OpenError,
    OpenedChannel, PagedRange, Progress, SavedDevice, WorkerError,
};
use zerocopy::{FromBytes, IntoBytes};

pub use disk::{CacheMode, DiskSpec, ImageMedium, OpenDiskError};
/// The image formats a disk file can be opened in.
pub use vhdx::open::Format as ImageFormat;

/// Largest data transfer of one SRB (see the crate docs for why).
pub const MAX_TRANSFER_BYTES: u32 = 1 << 20;
/// Version of [`SavedState`] (3 added the disks' reservations; versions 1, the handshake
/// alone, and 2 are still restored).
pub const SAVED_STATE_VERSION: u32 = 3;
/// Hyper-V's limit of LUNs per controller.
pub const MAX_LUNS: usize = 64;

const PAGE: u64 = 4096;

static LOG: support::RateLimit = support::RateLimit::guest();

/// Why a controller could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("LUN {0} is used twice")]
    DuplicateLun(u8),
    #[error("LUN {0} is past the controller's {MAX_LUNS} locations")]
    LunOutOfRange(u8),
    #[error("disk {}: {source}", path.display())]
    Target {
        path: std::path::PathBuf,
        #[source]
        source: scsi::ConfigError,
    },
    #[error("cannot create the controller's eventfd: {0}")]
    Io(#[source] std::io::Error),
    #[error("no DVD drive at LUN {0}")]
    NotDvd(u8),
}

/// Tunables of one controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Instance GUID of the VMBus offer (one per controller).
    pub instance_id: Guid,
    /// Most subchannels the guest may ask for (Linux asks for up to one per CPU it has).
    pub max_subchannels: u16,
    /// Name in logs and inspection.
    pub name: String,
    /// Whether channels queue READ and WRITE in an io_uring each (if the kernel has one);
    /// `VIRIDIAN_NO_IO_URING=1` turns it off.
    pub io_uring: bool,
}

impl ControllerConfig {
    pub fn new(instance_id: Guid, max_subchannels: u16) -> Self {
        Self {
            instance_id,
            max_subchannels,
            name: "scsi0".into(),
            io_uring: uring::enabled_by_env(),
        }
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    srbs: AtomicU64,
    srb_errors: AtomicU64,
    invalid_requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    medium_errors: AtomicU64,
    completions_deferred: AtomicU64,
    /// READs and WRITEs served straight between an image file and guest pages.
    direct_transfers: AtomicU64,
    /// Of those, the ones carried out in a channel's io_uring.
    uring_transfers: AtomicU64,
    /// Of the io_uring ones, those a ring's copier threads carried out.
    copier_transfers: AtomicU64,
    /// Of the direct ones, those with data moved through an image file's unbuffered
    /// (`O_DIRECT`) descriptor, bypassing the host's page cache.
    unbuffered_transfers: AtomicU64,
    rescans: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// What sits at a LUN.
enum Lun {
    /// A disk: its file and its SCSI target (READ and WRITE are planned on the target and
    /// carried out on the file by the worker).
    Disk(DiskSpec, Arc<ScsiDisk>),
    /// A DVD drive and the file of the medium the host loaded (dropped, closing the file,
    /// once the drive has let go of it after an eject).
    Dvd {
        drive: Arc<ScsiDvd>,
        medium: Option<DiskSpec>,
    },
}

impl Lun {
    /// The file a request at this LUN is served from now.
    fn spec(&self) -> Option<&DiskSpec> {
        match self {
            Lun::Disk(spec, _) => Some(spec),
            Lun::Dvd { drive, medium } => medium.as_ref().filter(|_| drive.medium().is_some()),
        }
    }

    /// Forgets a DVD medium the guest ejected.
    fn settle(&mut self) {
        if let Lun::Dvd { drive, medium } = self {
            if drive.medium().is_none() {
                *medium = None;
            }
        }
    }
}

/// What a LUN holds, for listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriveKind {
    Disk,
    Dvd,
}

/// One LUN of the controller as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveInfo {
    pub lun: u8,
    pub kind: DriveKind,
    /// The image file; `None` for an empty DVD drive.
    pub path: Option<PathBuf>,
    /// "VHDX", "VHD", "raw" or "ISO"; `None` for an empty DVD drive.
    pub format: Option<String>,
    pub read_only: bool,
    /// Whether its data goes through the host's page cache; `None` for an empty DVD drive.
    pub cache: Option<CacheMode>,
    /// Bytes; 0 for an empty DVD drive.
    pub size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
}

struct Shared {
    config: ControllerConfig,
    mem: GuestMemory,
    target: Target,
    /// Paths behind present LUNs (for FUA flushes, logs and inspection).
    luns: RwLock<BTreeMap<u8, Lun>>,
    /// Rung after a hot add or remove: the primary's worker sends ENUMERATE_BUS.
    rescan: vmbus::host::Doorbell,
    rescan_pending: AtomicBool,
    handshake: Mutex<Handshake>,
    counters: Counters,
    /// Set by save: workers take nothing off their rings and send nothing until
    /// [`StorvspDevice::resume`].
    paused: AtomicBool,
    /// Each open channel's in-flight requests.
    channels: Mutex<BTreeMap<u16, Arc<Registry>>>,
    /// Requests restored for channels the guest has not reopened yet.
    restored: Mutex<BTreeMap<u16, Vec<SavedRequest>>>,
}

/// The synthetic SCSI controller.
pub struct StorvspDevice {
    shared: Arc<Shared>,
}

pub use save::{SavedDvd, SavedReservations, SavedState};

/// The answer for targets and paths that have no LUNs (storvsc scans paths 0–7, targets
/// 0–1).
fn empty_target() -> &'static Target {
    static EMPTY: std::sync::OnceLock<Target> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Target::new)
}

impl StorvspDevice {
    /// A controller with `disks` at the given LUNs; the worker reads and writes guest
    /// memory through `mem`.
    pub fn new(
        config: ControllerConfig,
        mem: GuestMemory,
        disks: Vec<(u8, DiskSpec)>,
    ) -> Result<Arc<Self>, ControllerError> {
        let dev = Self {
            shared: Arc::new(Shared {
                config,
                mem,
                target: Target::new(),
                luns: RwLock::default(),
                rescan: vmbus::host::Doorbell::new().map_err(ControllerError::Io)?,
                rescan_pending: AtomicBool::new(false),
                handshake: Mutex::default(),
                counters: Counters::default(),
                paused: AtomicBool::new(false),
                channels: Mutex::default(),
                restored: Mutex::default(),
            }),
        };
        for (lun, spec) in disks {
            dev.insert(lun, spec)?;
        }
        Ok(Arc::new(dev))
    }

    /// Locks the LUN table for a change at `lun`: the lock and whether `lun` may be taken.
    fn free_lun(
        &self,
        lun: u8,
    ) -> Result<std::sync::RwLockWriteGuard<'_, BTreeMap<u8, Lun>>, ControllerError> {
        if lun as usize >= MAX_LUNS {
            return Err(ControllerError::LunOutOfRange(lun));
        }
        let luns = support::lock_write(&self.shared.luns);
        if luns.contains_key(&lun) {
            return Err(ControllerError::DuplicateLun(lun));
        }
        Ok(luns)
    }

    fn insert(&self, lun: u8, spec: DiskSpec) -> Result<(), ControllerError> {
        let mut luns = self.free_lun(lun)?;
        let disk =
            ScsiDisk::new(spec.medium.clone(), scsi::DiskConfig::default()).map_err(|source| {
                ControllerError::Target {
                    path: spec.path.clone(),
                    source,
                }
            })?;
        let disk = Arc::new(disk);
        self.shared.target.insert(lun, disk.clone());
        luns.insert(lun, Lun::Disk(spec, disk));
        Ok(())
    }

    /// The DVD drive's own identifier (VPD page 83h): the controller's instance and the LUN,
    /// so it stays the same whatever medium is loaded.
    fn dvd_id(&self, lun: u8) -> [u8; 16] {
        let mut id = [0u8; 16];
        id.copy_from_slice(self.shared.config.instance_id.as_bytes());
        id[15] ^= lun;
        id[14] ^= 0xdd;
        id
    }

    fn rescan(&self) {
        self.shared.rescan_pending.store(true, Ordering::Release);
        self.shared.rescan.ring();
    }

    /// Hot add: puts a disk at `lun` while the VM runs and tells the guest to rescan
    /// (ENUMERATE_BUS on the primary channel).
    pub fn add_disk(&self, lun: u8, spec: DiskSpec) -> Result<(), ControllerError> {
        self.insert(lun, spec)?;
        self.rescan();
        Ok(())
    }

    /// Puts a DVD drive at `lun`, loaded with `medium` (an ISO, see [`DiskSpec::open_iso`])
    /// or empty, and tells a running guest to rescan.
    pub fn add_dvd(&self, lun: u8, medium: Option<DiskSpec>) -> Result<(), ControllerError> {
        let mut luns = self.free_lun(lun)?;
        let drive = Arc::new(ScsiDvd::new(
            medium.as_ref().map(|m| m.medium.clone()),
            self.dvd_id(lun),
        ));
        self.shared.target.insert(lun, drive.clone());
        luns.insert(lun, Lun::Dvd { drive, medium });
        drop(luns);
        self.rescan();
        Ok(())
    }

    /// Changes the medium of the DVD drive at `lun` (Set-VMDvdDrive): `Some` inserts or
    /// replaces it, and the guest sees UNIT ATTENTION 28h (medium may have changed) on its
    /// next command; `None` ejects it, whatever the guest's PREVENT MEDIUM REMOVAL says (the
    /// administrator's action). Returns the medium taken out, if any.
    pub fn change_dvd(
        &self,
        lun: u8,
        medium: Option<DiskSpec>,
    ) -> Result<Option<DiskSpec>, ControllerError> {
        let mut luns = support::lock_write(&self.shared.luns);
        let Some(Lun::Dvd {
            drive,
            medium: loaded,
        }) = luns.get_mut(&lun)
        else {
            return Err(ControllerError::NotDvd(lun));
        };
        drive.change_medium(medium.as_ref().map(|m| m.medium.clone()));
        let old = std::mem::replace(loaded, medium);
        Ok(old)
    }

    /// The attached drives, by LUN. A DVD medium the guest has ejected is let go of (its
    /// file closed) here.
    pub fn drives(&self) -> Vec<DriveInfo> {
        let mut luns = support::lock_write(&self.shared.luns);
        luns.values_mut().for_each(Lun::settle);
        luns.iter()
            .map(|(&lun, l)| {
                let kind = match l {
                    Lun::Disk(..) => DriveKind::Disk,
                    Lun::Dvd { .. } => DriveKind::Dvd,
                };
                let spec = l.spec();
                let m = spec.map(|s| &s.medium);
                DriveInfo {
                    lun,
                    kind,
                    path: spec.map(|s| s.path.clone()),
                    format: spec.map(|s| s.format.clone()),
                    read_only: kind == DriveKind::Dvd || m.is_some_and(|m| m.is_read_only()),
                    cache: spec.map(|s| s.cache),
                    size: m.map_or(0, |m| m.size()),
                    logical_sector_size: m.map_or(0, |m| m.logical_sector_size()),
                    physical_sector_size: m.map_or(0, |m| m.physical_sector_size()),
                }
            })
            .collect()
    }

    /// Hot remove: takes the drive at `lun` away and tells the guest to rescan. Requests
    /// already executing keep their own reference to the medium, so the file is closed (and
    /// unlocked) only once the last of them has completed. Returns the file (`None` inside
    /// for an empty DVD drive).
    pub fn remove_disk(&self, lun: u8) -> Option<Option<DiskSpec>> {
        let spec = {
            let mut luns = support::lock_write(&self.shared.luns);
            let mut l = luns.remove(&lun)?;
            self.shared.target.remove(lun);
            l.settle();
            match l {
                Lun::Disk(spec, _) => Some(spec),
                Lun::Dvd { medium, .. } => medium,
            }
        };
        self.rescan();
        Some(spec)
    }

    /// Bytes read and written by the guest through this controller.
    pub fn io_bytes(&self) -> (u64, u64) {
        let c = &self.shared.counters;
        (
            c.bytes_read.load(Ordering::Relaxed),
            c.bytes_written.load(Ordering::Relaxed),
        )
    }

    /// Takes every drive off the controller once the VM has stopped: each medium is flushed
    /// and, with the last reference gone, its file closed (a VHDX writes its clean header) and
    /// unlocked, whoever still holds the controller. Returns the flush failures, each naming
    /// its file.
    pub fn close(&self) -> Vec<String> {
        let luns = std::mem::take(&mut *support::lock_write(&self.shared.luns));
        let mut errors = Vec::new();
        for (lun, l) in luns {
            self.shared.target.remove(lun);
            if let Some(spec) = l.spec() {
                if let Err(e) = spec.medium.flush() {
                    errors.push(format!("disk {}: {e}", spec.path.display()));
                }
            }
        }
        errors
    }

    /// The handshake as it stands.
    pub fn handshake(&self) -> Handshake {
        *support::lock(&self.shared.handshake)
    }

    /// A channel's io_uring, unless the configuration or the kernel says no.
    fn queue(&self) -> Option<uring::Queue> {
        if !self.shared.config.io_uring {
            return None;
        }
        uring::Queue::new(&self.shared.mem)
            .map_err(|e| {
                support::limited!(LOG, warn, error = %e, "storvsp: no io_uring, disk I/O is synchronous");
            })
            .ok()
    }

    fn properties(&self) -> Properties {
        Properties {
            max_transfer_bytes: MAX_TRANSFER_BYTES,
            max_subchannels: self.shared.config.max_subchannels,
        }
    }
}

impl vmbus::Device for StorvspDevice {
    fn offer(&self) -> DeviceOffer {
        let mut o = DeviceOffer::new(
            &self.shared.config.name,
            sp::INTERFACE,
            self.shared.config.instance_id,
        );
        o.max_subchannels = self.shared.config.max_subchannels;
        o
    }

    fn open(&self, ch: OpenedChannel) -> Result<Box<dyn ChannelWorker>, OpenError> {
        let registry = Registry::new(ch.index)
            .map_err(|e| OpenError(format!("cannot create the channel's eventfd: {e}")))?;
        support::lock(&self.shared.channels).insert(ch.index, registry.clone());
        let replay = support::lock(&self.shared.restored)
            .remove(&ch.index)
            .unwrap_or_default();
        Ok(Box::new(Worker {
            shared: self.shared.clone(),
            props: self.properties(),
            index: ch.index,
            bus: ch.bus,
            initiator: InitiatorId(u64::from(ch.index)),
            registry,
            replay: replay
                .into_iter()
                .map(|request| Pending { seq: None, request })
                .collect(),
            recv: Vec::new(),
            data: Vec::new(),
            out: VecDeque::new(),
            queue: self.queue(),
            others_waiting: false,
        }))
    }

    fn close(&self, index: u16) {
        // The guest gets no completion on a closed channel: its requests are forgotten.
        support::lock(&self.shared.channels).remove(&index);
        if index == 0 {
            // The guest's driver is gone (or reloading): it starts over with BEGIN_INIT.
            *support::lock(&self.shared.handshake) = Handshake::default();
        }
    }

    /// Pauses the controller (see [`StorvspDevice::resume`]) and saves the handshake, each
    /// channel's in-flight requests, a pending rescan and the DVD drives' state.
    fn save(&self) -> SavedDevice {
        SavedDevice {
            version: SAVED_STATE_VERSION,
            data: serde_json::to_value(self.save_state()).unwrap_or(serde_json::Value::Null),
        }
    }

    /// Restores a saved state into a controller built with the same drives, before the
    /// guest's channels reopen; each reopened channel first finishes its saved requests.
    fn restore(&self, saved: &SavedDevice) -> Result<(), DeviceRestoreError> {
        self.restore_state(saved)
    }

    fn inspect(&self) -> serde_json::Value {
        let s = &self.shared;
        let h = self.handshake();
        let c = &s.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut disks = Vec::new();
        let mut dvds = Vec::new();
        for d in self.drives() {
            let mut v = serde_json::json!({
                "lun": d.lun,
                "path": d.path.as_ref().map(|p| p.display().to_string()),
                "format": d.format,
                "size": d.size,
                "logical_sector_size": d.logical_sector_size,
                "physical_sector_size": d.physical_sector_size,
                "read_only": d.read_only,
            });
            match d.kind {
                DriveKind::Disk => disks.push(v),
                DriveKind::Dvd => {
                    if let Some(Lun::Dvd { drive, .. }) = support::lock_read(&s.luns).get(&d.lun) {
                        let snap = drive.snapshot();
                        v["medium_present"] = snap.medium_present.into();
                        v["removal_prevented"] = snap.prevent.into();
                        v["unit_attention_pending"] = snap.unit_attention.into();
                        v["media_event"] = format!("{:?}", snap.event).into();
                    }
                    dvds.push(v);
                }
            }
        }
        serde_json::json!({
            "kind": "storvsp",
            "name": s.config.name,
            "instance_id": s.config.instance_id.to_string(),
            "protocol_version": h.version.map(|v| format!("{}.{}", v >> 8, v & 0xff)),
            "phase": h.phase,
            "subchannels": h.subchannels,
            "max_subchannels": s.config.max_subchannels,
            "max_transfer_bytes": MAX_TRANSFER_BYTES,
            "paused": s.paused.load(Ordering::SeqCst),
            "channels": support::lock(&s.channels)
                .values()
                .map(|r| {
                    let q = r.lock();
                    serde_json::json!({
                        "index": r.index,
                        "in_flight": q.entries.len(),
                        "executed_not_sent": q.entries.iter().filter(|e| e.completion.is_some()).count(),
                    })
                })
                .collect::<Vec<_>>(),
            "disks": disks,
            "dvds": dvds,
            "counters": {
                "requests": n(&c.requests),
                "srbs": n(&c.srbs),
                "srb_errors": n(&c.srb_errors),
                "invalid_requests": n(&c.invalid_requests),
                "bytes_read": n(&c.bytes_read),
                "bytes_written": n(&c.bytes_written),
                "flushes": n(&c.flushes),
                "medium_errors": n(&c.medium_errors),
                "completions_deferred": n(&c.completions_deferred),
                "direct_transfers": n(&c.direct_transfers),
                "uring_transfers": n(&c.uring_transfers),
                "copier_transfers": n(&c.copier_transfers),
                "unbuffered_transfers": n(&c.unbuffered_transfers),
                "rescans": n(&c.rescans),
            },
        })
    }
}

/// Why an SRB's data buffer is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    #[error("the GPA_DIRECT header is malformed")]
    BadRanges,
    #[error("the SRB claims {claimed} bytes but the packet describes {described}")]
    Short { claimed: u64, described: u64 },
    #[error("page {0:#x} is not guest RAM")]
    OutsideRam(u64),
    #[error("data direction {0} with a data buffer")]
    Direction(u8),
    #[error("transfer of {0} bytes exceeds the maximum")]
    TooLong(u32),
}

/// The guest pages an SRB's data lives in: `(gpa, len)` pieces in order, exactly
/// `data_transfer_length` bytes, each checked to be guest RAM.
pub fn data_pieces(
    mem: &GuestMemory,
    ranges: &[PagedRange],
    len: u32,
) -> Result<Vec<(u64, usize)>, BufferError> {
    if len > MAX_TRANSFER_BYTES {
        return Err(BufferError::TooLong(len));
    }
    let described: u64 = ranges.iter().map(|r| u64::from(r.byte_count)).sum();
    if described < u64::from(len) {
        return Err(BufferError::Short {
            claimed: len.into(),
            described,
        });
    }
    let mut left = u64::from(len);
    let mut out = Vec::new();
    for r in ranges {
        let mut off = u64::from(r.byte_offset);
        let mut count = u64::from(r.byte_count).min(left);
        for &pfn in &r.pfns {
            if count == 0 {
                break;
            }
            let n = (PAGE - off).min(count);
            let gpa = pfn
                .checked_mul(PAGE)
                .and_then(|g| g.checked_add(off))
                .ok_or(BufferError::OutsideRam(pfn))?;
            if !mem.contains(gpa, n) {
                return Err(BufferError::OutsideRam(pfn));
            }
            out.push((gpa, n as usize));
            count -= n;
            left -= n;
            off = 0;
        }
        if count > 0 {
            return Err(BufferError::BadRanges);
        }
        if left == 0 {
            break;
        }
    }
    Ok(out)
}

/// One channel's worker.
struct Worker {
    shared: Arc<Shared>,
    props: Properties,
    index: u16,
    bus: Arc<dyn BusControl>,
    initiator: InitiatorId,
    /// This channel's in-flight requests, shared with save.
    registry: Arc<Registry>,
    /// Requests to finish before the ring is read: restored from a saved state, or taken
    /// off the ring just as save paused the controller.
    replay: VecDeque<Pending>,
    recv: Vec<u8>,
    /// The bounce buffer for SRB data (at most [`MAX_TRANSFER_BYTES`]).
    data: Vec<u8>,
    /// Completions and host-initiated packets that are not in the ring yet.
    out: VecDeque<Outgoing>,
    /// The channel's io_uring and the requests in it; `None`: synchronous I/O.
    queue: Option<uring::Queue>,
    /// More packets wait in the ring behind the one being handled.
    others_waiting: bool,
}

/// A request [`Worker::replay_restored`] finishes.
struct Pending {
    /// Its handle in the registry, once recorded there.
    seq: Option<u64>,
    request: SavedRequest,
}

/// What a guest packet gets.
enum Reply {
    Send(VstorPacket),
    /// Nothing (a completion of ours, or a packet that asked for none).
    Nothing,
    /// Its completion, once its I/O in the channel's io_uring is done.
    Later,
}

/// A packet for the guest.
struct Outgoing {
    /// The in-flight request it completes, or `None` for a host-initiated packet.
    request: Option<(u64, u64)>,
    packet: VstorPacket,
}

impl Worker {
    /// Sends what is queued, in order; false while the ring is full or the controller is
    /// paused.
    fn flush_out(&mut self, ch: &mut Channel) -> Result<bool, WorkerError> {
        if self.out.is_empty() {
            return Ok(true);
        }
        let registry = self.registry.clone();
        let Some(mut requests) = registry.lock_unless(&self.shared.paused) else {
            return Ok(false);
        };
        while let Some(o) = self.out.front() {
            let r = match o.request {
                Some((_, id)) => ch.send_completion(id, o.packet.as_bytes()),
                // storvsc takes an unsolicited packet as in-band with transaction id 0.
                None => ch.send_inband(0, o.packet.as_bytes(), false),
            };
            match r {
                Ok(()) => {
                    match o.request {
                        Some((seq, _)) => requests.done(seq),
                        None => requests.notices = requests.notices.saturating_sub(1),
                    }
                    self.out.pop_front();
                }
                Err(ChannelError::Full) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Runs the request `seq` (a packet taken off the ring, or restored) and queues its
    /// completion. A request that is not safe to replay ([`inflight::replay_safe`]) runs in
    /// one critical section with the record of its completion, and not at all while the
    /// controller is paused: then this returns false and the request is still to run.
    fn run(&mut self, seq: u64, p: &vmbus::packet::Packet<'_>) -> bool {
        let ptype = p.packet_type();
        let registry = self.registry.clone();
        let atomic = if inflight::replay_safe(ptype, p.payload()) {
            None
        } else {
            match registry.lock_unless(&self.shared.paused) {
                Some(requests) => Some(requests),
                None => return false,
            }
        };
        let ranges = (ptype == packet_type::DATA_USING_GPA_DIRECT).then(|| p.gpa_direct_ranges());
        let tag = (seq, p.transaction_id());
        let reply = self.handle(ptype, p.completion_requested(), p.payload(), ranges, tag);
        let mut requests = atomic.unwrap_or_else(|| registry.lock());
        match reply {
            Reply::Send(packet) => {
                requests.executed(seq, packet);
                self.out.push_back(Outgoing {
                    request: Some(tag),
                    packet,
                });
            }
            Reply::Nothing => requests.done(seq),
            Reply::Later => {}
        }
        true
    }

    /// Finishes the requests of a restored state: a saved completion is sent again, a
    /// request saved while it executed runs once more. False while paused.
    fn replay_restored(&mut self) -> bool {
        while let Some(next) = self.replay.pop_front() {
            let registry = self.registry.clone();
            let Some(mut requests) = registry.lock_unless(&self.shared.paused) else {
                self.replay.push_front(next);
                return false;
            };
            // restore() checked that both parse (and a deferred one came off the ring).
            let Ok(p) = vmbus::packet::Packet::parse(&next.request.packet) else {
                continue;
            };
            let seq = next
                .seq
                .unwrap_or_else(|| requests.taken(&next.request.packet));
            let done = next
                .request
                .completion
                .as_deref()
                .and_then(|c| VstorPacket::read_from_bytes(c).ok());
            match done {
                Some(packet) => {
                    requests.executed(seq, packet);
                    self.out.push_back(Outgoing {
                        request: Some((seq, p.transaction_id())),
                        packet,
                    });
                }
                None => {
                    drop(requests);
                    if !self.run(seq, &p) {
                        self.replay.push_front(Pending {
                            seq: Some(seq),
                            request: next.request,
                        });
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Handles one guest packet; returns the completion to send, if any.
    fn handle(
        &mut self,
        ptype: u16,
        completion_requested: bool,
        payload: &[u8],
        ranges: Option<Result<Vec<PagedRange>, vmbus::packet::PacketError>>,
        tag: (u64, u64),
    ) -> Reply {
        let shared = self.shared.clone();
        let c = &shared.counters;
        Counters::add(&c.requests, 1);
        if ptype != packet_type::DATA_INBAND && ptype != packet_type::DATA_USING_GPA_DIRECT {
            // Completions of our own ENUMERATE_BUS packets need no answer; anything else
            // that asks for one gets a refusal.
            if ptype == packet_type::COMPLETION || !completion_requested {
                return Reply::Nothing;
            }
            Counters::add(&c.invalid_requests, 1);
            support::limited!(LOG, warn, ptype, "storvsp: packet type not supported");
            return Reply::Send(protocol::complete(sp::status::NOT_SUPPORTED));
        }
        let req = match protocol::parse(payload) {
            Ok(r) => r,
            Err(e) => {
                Counters::add(&c.invalid_requests, 1);
                support::limited!(LOG, warn, error = %e, "storvsp: bad request");
                return Reply::Send(protocol::complete(e.status()));
            }
        };
        let Request::ExecuteSrb(srb) = req else {
            let r =
                support::lock(&self.shared.handshake).control(&req, &self.props, self.index == 0);
            if r.add_subchannels > 0 {
                let added = self.bus.add_subchannels(r.add_subchannels);
                if added < r.add_subchannels {
                    support::limited!(
                        LOG,
                        warn,
                        asked = r.add_subchannels,
                        added,
                        "storvsp: fewer subchannels offered"
                    );
                }
            }
            return Reply::Send(r.packet);
        };
        Counters::add(&c.srbs, 1);
        if !support::lock(&self.shared.handshake).ready() {
            Counters::add(&c.invalid_requests, 1);
            let mut p = SrbResult::invalid_request().packet(&srb);
            p.status = sp::status::INVALID_DEVICE_STATE;
            return Reply::Send(p);
        }
        let Some(result) = self.execute(&srb, ranges, tag) else {
            return Reply::Later;
        };
        if result.srb_status != sp::srb_status::SUCCESS {
            Counters::add(&c.srb_errors, 1);
        }
        Reply::Send(result.packet(&srb))
    }

    /// Executes an SRB; `None`: its I/O is in the channel's io_uring.
    fn execute(
        &mut self,
        srb: &Srb,
        ranges: Option<Result<Vec<PagedRange>, vmbus::packet::PacketError>>,
        tag: (u64, u64),
    ) -> Option<SrbResult> {
        let shared = self.shared.clone();
        let c = &shared.counters;
        let invalid = |e: BufferError| {
            Counters::add(&c.invalid_requests, 1);
            support::limited!(LOG, warn, error = %e, "storvsp: SRB data buffer refused");
            Some(SrbResult::invalid_request())
        };
        let Some(cdb) = srb.cdb() else {
            return invalid(BufferError::BadRanges);
        };
        let len = srb.data_transfer_length;
        let pieces = if len == 0 {
            Vec::new()
        } else {
            let ranges = match ranges {
                Some(Ok(r)) => r,
                Some(Err(_)) => return invalid(BufferError::BadRanges),
                None => {
                    return invalid(BufferError::Short {
                        claimed: len.into(),
                        described: 0,
                    })
                }
            };
            match data_pieces(&self.shared.mem, &ranges, len) {
                Ok(p) => p,
                Err(e) => return invalid(e),
            }
        };
        if len > 0 && srb.data_in != sp::data_in::READ && srb.data_in != sp::data_in::WRITE {
            return invalid(BufferError::Direction(srb.data_in));
        }
        let (target, present) = if srb.path_id == 0 && srb.target_id == 0 {
            let t = &shared.target;
            (t, t.get(srb.lun).is_some())
        } else {
            (empty_target(), false)
        };
        if present {
            if let Some(r) = self.execute_direct(srb, cdb, &pieces, tag) {
                return r;
            }
        }
        let len = len as usize;
        self.data.clear();
        self.data.resize(len, 0);
        let write = len > 0 && srb.data_in == sp::data_in::WRITE;
        if write {
            let mut at = 0;
            for &(gpa, n) in &pieces {
                if self
                    .shared
                    .mem
                    .read(gpa, &mut self.data[at..at + n])
                    .is_err()
                {
                    return invalid(BufferError::OutsideRam(gpa / PAGE));
                }
                at += n;
            }
        }
        let data = if len == 0 {
            Data::None
        } else if write {
            Data::Out(&self.data)
        } else {
            Data::In(&mut self.data)
        };
        let completion = target.execute(srb.lun, self.initiator, cdb, data);
        let completion = self.settle(srb.lun, completion);
        let transferred = completion.transferred.min(len);
        if write {
            Counters::add(&c.bytes_written, transferred as u64);
        } else if transferred > 0 {
            let mut at = 0;
            for &(gpa, n) in &pieces {
                if at >= transferred {
                    break;
                }
                let n = n.min(transferred - at);
                if self.shared.mem.write(gpa, &self.data[at..at + n]).is_err() {
                    return invalid(BufferError::OutsideRam(gpa / PAGE));
                }
                at += n;
            }
            Counters::add(&c.bytes_read, transferred as u64);
        }
        Some(SrbResult::from_scsi(&completion, present))
    }
}

impl Worker {
    /// READ and WRITE on a disk whose medium has a `vhdx` disk: planned on the target and
    /// carried out straight between the image file and the guest pages. `None`: not such a
    /// command, the bounce path serves it.
    fn execute_direct(
        &mut self,
        srb: &Srb,
        cdb: &[u8],
        pieces: &[(u64, usize)],
        (seq, transaction_id): (u64, u64),
    ) -> Option<Option<SrbResult>> {
        let cmd = scsi::Command::decode(cdb).ok()?;
        let write = match cmd {
            scsi::Command::Read { .. } => false,
            scsi::Command::Write { .. } => true,
            _ => return None,
        };
        // The medium too: it holds a raw or VHD file's lock until the I/O is done.
        let (disk, medium, unit, cache) = match support::lock_read(&self.shared.luns).get(&srb.lun)
        {
            Some(Lun::Disk(spec, unit)) => (
                spec.disk.clone()?,
                spec.medium.clone(),
                unit.clone(),
                spec.cache,
            ),
            _ => return None,
        };
        let unbuffered = cache == CacheMode::None;
        let len = srb.data_transfer_length as usize;
        // A buffer in the other direction is no buffer for this command (as on the bounce
        // path): the target then refuses the transfer length.
        let wanted = if write {
            sp::data_in::WRITE
        } else {
            sp::data_in::READ
        };
        let buffer_len = if srb.data_in == wanted { len } else { 0 };
        let completion = match unit.plan_io(self.initiator, &cmd, buffer_len) {
            Err(c) => c,
            Ok(None) => scsi::Completion::good(0),
            Ok(Some(io)) => {
                Counters::add(&self.shared.counters.direct_transfers, 1);
                let queued = self.queue.as_mut().map(|q| {
                    q.submit(
                        seq,
                        transaction_id,
                        *srb,
                        io,
                        unit.clone(),
                        disk.clone(),
                        medium,
                        (pieces, unbuffered),
                        self.others_waiting,
                    )
                });
                match queued {
                    Some(Ok(uring::Submitted::InFlight { unbuffered, copied })) => {
                        let c = &self.shared.counters;
                        Counters::add(&c.uring_transfers, 1);
                        Counters::add(&c.copier_transfers, u64::from(copied));
                        Counters::add(&c.unbuffered_transfers, u64::from(unbuffered));
                        return Some(None);
                    }
                    Some(Err(c)) => c,
                    Some(Ok(uring::Submitted::Declined)) | None => {
                        let mut buf =
                            buffer::GuestBuffer::new(&self.shared.mem, pieces, io.len, unbuffered);
                        let r = if io.write {
                            disk.write_vectored(&buf, io.offset)
                        } else {
                            disk.read_vectored(&mut buf, io.offset)
                        };
                        Counters::add(
                            &self.shared.counters.unbuffered_transfers,
                            u64::from(buf.unbuffered_bytes() > 0),
                        );
                        unit.complete_io(io, r.map_err(|e| medium_error(io.offset, e)))
                    }
                }
            }
        };
        Some(Some(self.finish_direct(srb, completion)))
    }

    /// The result of a direct READ or WRITE once its medium access is over.
    fn finish_direct(&self, srb: &Srb, completion: scsi::Completion) -> SrbResult {
        let completion = self.settle(srb.lun, completion);
        let c = &self.shared.counters;
        let transferred = completion
            .transferred
            .min(srb.data_transfer_length as usize) as u64;
        let write = srb.data_in == sp::data_in::WRITE;
        Counters::add(
            if write {
                &c.bytes_written
            } else {
                &c.bytes_read
            },
            transferred,
        );
        SrbResult::from_scsi(&completion, true)
    }

    /// Completes the requests whose io_uring operations are all done (`completed_only`:
    /// see [`uring::Queue::reap`]).
    fn reap(&mut self, completed_only: bool) {
        let Some(q) = self.queue.as_mut() else {
            return;
        };
        for (seq, p, r) in q.reap(completed_only) {
            let completion = p.unit.complete_io(p.io, r);
            let packet = self.finish_direct(&p.srb, completion).packet(&p.srb);
            self.registry.lock().executed(seq, packet);
            self.out.push_back(Outgoing {
                request: Some((seq, p.transaction_id)),
                packet,
            });
        }
    }

    /// Logs a backend failure (naming the file and offset) and carries out a FUA write's
    /// flush before the command completes.
    fn settle(&self, lun: u8, mut completion: scsi::Completion) -> scsi::Completion {
        if completion.error.is_none() && !completion.fua {
            return completion;
        }
        let c = &self.shared.counters;
        let spec = support::lock_read(&self.shared.luns)
            .get(&lun)
            .and_then(|l| l.spec().cloned());
        let spec = spec.as_ref();
        let path = || {
            spec.map(|s| s.path.display().to_string())
                .unwrap_or_default()
        };
        if let Some(e) = &completion.error {
            Counters::add(&c.medium_errors, 1);
            support::limited!(LOG, error, path = %path(), offset = e.offset, error = %e, "storvsp: disk I/O failed");
        }
        if completion.fua && completion.status == scsi::ScsiStatus::Good {
            Counters::add(&c.flushes, 1);
            if let Some(Err(e)) = spec.map(|s| s.medium.flush()) {
                Counters::add(&c.medium_errors, 1);
                support::limited!(LOG, error, path = %path(), error = %e, "storvsp: flush after FUA write failed");
                completion = scsi::Completion::check(scsi::Sense::new(
                    scsi::SenseKey::MediumError,
                    scsi::sense::asc::WRITE_ERROR,
                ));
            }
        }
        completion
    }
}

/// A `vhdx` error as the medium error the target reports (DATA PROTECT for a read-only
/// disk, MEDIUM ERROR otherwise).
fn medium_error(offset: u64, e: vhdx::Error) -> scsi::MediumError {
    match e {
        vhdx::Error::ReadOnly => scsi::MediumError::read_only(offset),
        e => scsi::MediumError::io(offset, e),
    }
}

impl ChannelWorker for Worker {
    fn process(&mut self, ch: &mut Channel, _now: Instant) -> Result<Progress, WorkerError> {
        self.registry.wake.clear();
        self.reap(false);
        if self.index == 0 && self.shared.rescan_pending.swap(false, Ordering::AcqRel) {
            self.shared.rescan.clear();
            // Only a guest past END_INIT has a SCSI host to rescan.
            if support::lock(&self.shared.handshake).ready() {
                Counters::add(&self.shared.counters.rescans, 1);
                self.registry.lock().notices += 1;
                self.out.push_back(Outgoing {
                    request: None,
                    packet: VstorPacket::new(sp::operation::ENUMERATE_BUS, 0),
                });
            }
        }
        if !self.replay_restored() || !self.flush_out(ch)? {
            return Ok(Progress::WaitingForRoom);
        }
        let mut buf = std::mem::take(&mut self.recv);
        let registry = self.registry.clone();
        let r = loop {
            // Taking a packet off the ring and recording it are one step for save.
            let (seq, p) = {
                let Some(mut requests) = registry.lock_unless(&self.shared.paused) else {
                    break Ok(Progress::WaitingForRoom);
                };
                match ch.try_recv(&mut buf) {
                    Ok(Some(p)) => (requests.taken(p.bytes()), p),
                    Ok(None) => break Ok(Progress::Idle),
                    Err(e) => break Err(e.into()),
                }
            };
            self.others_waiting = ch.has_packet().unwrap_or(false);
            if !self.run(seq, &p) {
                // Save paused the controller after this came off the ring: it runs on resume.
                self.replay.push_back(Pending {
                    seq: Some(seq),
                    request: SavedRequest {
                        packet: p.bytes().to_vec(),
                        completion: None,
                    },
                });
                break Ok(Progress::WaitingForRoom);
            }
            // A backend that completes inline (the page cache, a RAM disk) has finished
            // this request already: answer it now, so the guest queues its next request
            // while the worker serves the ones behind this.
            self.reap(true);
            match self.flush_out(ch) {
                Ok(true) => {}
                Ok(false) => {
                    Counters::add(&self.shared.counters.completions_deferred, 1);
                    break Ok(Progress::WaitingForRoom);
                }
                Err(e) => break Err(e),
            }
        };
        self.recv = buf;
        r
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.registry.wake.as_fd()];
        if self.index == 0 {
            fds.push(self.shared.rescan.as_fd());
        }
        if let Some(q) = &self.queue {
            fds.push(q.event_fd());
        }
        fds
    }

    fn deadline(&self) -> Option<Instant> {
        // Operations the kernel did not take at once are handed to it again soon.
        self.queue
            .as_ref()
            .filter(|q| q.needs_poll())
            .map(|_| Instant::now() + std::time::Duration::from_millis(1))
    }
}
