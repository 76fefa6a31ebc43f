//! VMBus inside the worker: the run-time [`vmbus::VmbusHost`] (control thread, port table,
//! one worker thread per open channel) with the integration services as its devices, and
//! the synthetic SCSI controller (storvsp) when the VM has disks.

use crate::integration::{IcBusDevice, IcDevice, IcSnapshot, ShutdownError};
use crate::kvp::{KvpBusDevice, KvpDevice};
use crate::synic::HvSynic;
use hvdef::vmbus::Guid;
use ic::{HeartbeatState, IcKind, ShutdownKind};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use storvsp::{ControllerConfig, StorvspDevice};
use vmbus::{HostConfig, ServerConfig, VmbusHost};

pub use services::{Service, ServiceState};
pub use storvsp::{CacheMode, DiskSpec, DriveInfo, DriveKind, ImageFormat, OpenDiskError};

mod services;

/// Instance GUID of SCSI controller 0; controller N's ends in N.
pub const SCSI0_INSTANCE_ID: Guid = Guid::from_u128(0x5649_5249_4449_414e_0000_0000_5c51_0000);
/// Hyper-V's limit of SCSI controllers per VM.
pub const MAX_SCSI_CONTROLLERS: u8 = 4;
/// Locations (LUNs) per controller.
pub const MAX_LOCATIONS: u8 = storvsp::MAX_LUNS as u8;
/// Most subchannels a controller offers, whatever the vCPU count.
pub const MAX_SCSI_SUBCHANNELS: u16 = 64;

/// The instance GUID of SCSI controller `controller` (stable, so the guest's device paths
/// are the same on every boot).
pub fn scsi_instance_id(controller: u8) -> Guid {
    Guid::from_u128(0x5649_5249_4449_414e_0000_0000_5c51_0000 + u128::from(controller))
}

/// Opens a `--disk` image: in `format`, or VHDX, VHD or raw as its content and name agree
/// (`None`). An image opened for writing holds its file lock until the VM exits; a file in
/// use fails here, naming it.
pub fn open_disk(
    path: &Path,
    format: Option<storvsp::ImageFormat>,
    read_only: bool,
) -> Result<DiskSpec, OpenDiskError> {
    DiskSpec::open(path, format, read_only)
}

/// What a drive holds.
#[derive(Debug, Clone)]
pub enum Media {
    /// A hard disk (Add-VMHardDiskDrive).
    Disk(DiskSpec),
    /// A DVD drive with an ISO loaded, or empty (Add-VMDvdDrive).
    Dvd(Option<DiskSpec>),
}

/// A drive and its place: SCSI controller and location (LUN).
#[derive(Debug, Clone)]
pub struct Drive {
    pub controller: u8,
    pub location: u8,
    pub media: Media,
}

/// Why a drive cannot be placed, added, changed or removed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("controller {0} is out of range: a VM has SCSI controllers 0 to 3")]
    ControllerOutOfRange(u8),
    #[error("location {0} is out of range: a SCSI controller has locations 0 to 63")]
    LocationOutOfRange(u8),
    #[error("location {location} of controller {controller} is in use{}", by.as_ref().map(|p| format!(" by {}", p.display())).unwrap_or_default())]
    InUse {
        controller: u8,
        location: u8,
        by: Option<std::path::PathBuf>,
    },
    #[error("every location of controller {0} is in use")]
    Full(u8),
    #[error("no drive at location {location} of controller {controller}")]
    NoDrive { controller: u8, location: u8 },
    #[error("the drive at location {location} of controller {controller} is not a DVD drive")]
    NotDvd { controller: u8, location: u8 },
    #[error("this VM has no DVD drive (start it with --dvd ISO or --dvd none)")]
    NoDvd,
    #[error(
        "this VM has no VMBus (it runs without Hyper-V enlightenments), so no SCSI controller"
    )]
    NoVmbus,
    #[error(transparent)]
    Open(Box<storvsp::OpenDiskError>),
    #[error(transparent)]
    Controller(storvsp::ControllerError),
    #[error("cannot offer SCSI controller {controller} on VMBus: {reason}")]
    Offer { controller: u8, reason: String },
}

/// A wanted place: controller and location, either chosen for the caller when `None`.
pub type Wanted = (Option<u8>, Option<u8>);

/// Places drives: explicit locations first, then the others, in order, at the lowest free
/// location of their controller (controller 0 when not given). Callers list disks before
/// DVD drives, so DVDs follow the disks. Returns (controller, location) for each, in the
/// order given, or the first error with the index of the drive it is about.
pub fn place(wanted: &[Wanted]) -> Result<Vec<(u8, u8)>, (usize, DiskError)> {
    let mut used: BTreeMap<(u8, u8), usize> = BTreeMap::new();
    let mut out = vec![(0, 0); wanted.len()];
    for (i, &(c, l)) in wanted.iter().enumerate() {
        let c = c.unwrap_or(0);
        if c >= MAX_SCSI_CONTROLLERS {
            return Err((i, DiskError::ControllerOutOfRange(c)));
        }
        let Some(l) = l else { continue };
        if l >= MAX_LOCATIONS {
            return Err((i, DiskError::LocationOutOfRange(l)));
        }
        if used.insert((c, l), i).is_some() {
            return Err((
                i,
                DiskError::InUse {
                    controller: c,
                    location: l,
                    by: None,
                },
            ));
        }
        out[i] = (c, l);
    }
    for (i, &(c, l)) in wanted.iter().enumerate() {
        if l.is_some() {
            continue;
        }
        let c = c.unwrap_or(0);
        let l = (0..MAX_LOCATIONS)
            .find(|&l| !used.contains_key(&(c, l)))
            .ok_or((i, DiskError::Full(c)))?;
        used.insert((c, l), i);
        out[i] = (c, l);
    }
    Ok(out)
}

/// The SCSI controllers of a VM, one storvsp device each, added to the bus as they are
/// first used.
struct Storage {
    controllers: Mutex<BTreeMap<u8, Arc<StorvspDevice>>>,
    mem: guestmem::GuestMemory,
    subchannels: u16,
}

impl Storage {
    fn new_controller(
        &self,
        controller: u8,
        drives: Vec<(u8, Media)>,
    ) -> Result<Arc<StorvspDevice>, DiskError> {
        let mut config = ControllerConfig::new(scsi_instance_id(controller), self.subchannels);
        config.name = format!("scsi{controller}");
        let (disks, dvds): (Vec<_>, Vec<_>) = drives
            .into_iter()
            .partition(|(_, m)| matches!(m, Media::Disk(_)));
        let disks = disks
            .into_iter()
            .filter_map(|(l, m)| match m {
                Media::Disk(d) => Some((l, d)),
                Media::Dvd(_) => None,
            })
            .collect();
        let dev =
            StorvspDevice::new(config, self.mem.clone(), disks).map_err(DiskError::Controller)?;
        for (l, m) in dvds {
            if let Media::Dvd(iso) = m {
                dev.add_dvd(l, iso).map_err(DiskError::Controller)?;
            }
        }
        Ok(dev)
    }
}

/// Guest-visible state of the integration services, for `viridian vm status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcStatus {
    pub vmbus_version: Option<u32>,
    pub heartbeat: HeartbeatState,
    pub shutdown_ready: bool,
    pub time_synced: bool,
}

/// The bus and the host's handles to its devices.
pub struct Vmbus {
    host: VmbusHost,
    shutdown: Arc<IcDevice>,
    heartbeat: Arc<IcDevice>,
    timesync: Arc<IcDevice>,
    kvp: Arc<KvpDevice>,
    storage: Storage,
    /// The integration services offered now, with their bus ids.
    services: Mutex<BTreeMap<Service, vmbus::host::DeviceId>>,
}

impl Vmbus {
    /// Starts the bus with the shutdown, heartbeat, timesync and KVP services.
    pub fn start(
        hv: Arc<hv1::Partition>,
        kvm: Arc<kvm::Partition>,
        vp_count: u32,
    ) -> std::io::Result<Self> {
        Self::start_with_disks(hv, kvm, vp_count, Vec::new())
    }

    /// Starts the bus as [`Vmbus::start`] does, plus one SCSI controller for each controller
    /// `drives` use (placed already, see [`place`]). Each controller offers one subchannel per
    /// vCPU beyond the first, so Linux ends up with one channel per vCPU.
    pub fn start_with_disks(
        hv: Arc<hv1::Partition>,
        kvm: Arc<kvm::Partition>,
        vp_count: u32,
        drives: Vec<Drive>,
    ) -> std::io::Result<Self> {
        let mem = kvm.memory().clone();
        let storage_mem = mem.clone();
        let synic = Arc::new(HvSynic::new(hv.clone(), kvm));
        let config = HostConfig {
            server: ServerConfig {
                vp_count,
                ..Default::default()
            },
            ..Default::default()
        };
        let host = VmbusHost::start(config, mem, synic)?;
        let shutdown = IcDevice::new(IcKind::Shutdown)?;
        let heartbeat = IcDevice::new(IcKind::Heartbeat)?;
        let timesync = IcDevice::timesync(Arc::new(move || hv.reference_time()))?;
        let mut services = BTreeMap::new();
        for (s, dev) in [
            (Service::Shutdown, &shutdown),
            (Service::Heartbeat, &heartbeat),
            (Service::TimeSynchronization, &timesync),
        ] {
            let id = host
                .add_device(Arc::new(IcBusDevice(dev.clone())))
                .map_err(std::io::Error::other)?;
            services.insert(s, id);
        }
        let kvp = KvpDevice::new()?;
        let id = host
            .add_device(Arc::new(KvpBusDevice(kvp.clone())))
            .map_err(std::io::Error::other)?;
        services.insert(Service::KeyValuePairExchange, id);
        let storage = Storage {
            controllers: Mutex::default(),
            mem: storage_mem,
            subchannels: u16::try_from(vp_count.saturating_sub(1))
                .unwrap_or(u16::MAX)
                .min(MAX_SCSI_SUBCHANNELS),
        };
        let mut by_controller: BTreeMap<u8, Vec<(u8, Media)>> = BTreeMap::new();
        for d in drives {
            by_controller
                .entry(d.controller)
                .or_default()
                .push((d.location, d.media));
        }
        for (c, drives) in by_controller {
            let dev = storage
                .new_controller(c, drives)
                .map_err(std::io::Error::other)?;
            host.add_device(dev.clone())
                .map_err(std::io::Error::other)?;
            support::lock(&storage.controllers).insert(c, dev);
        }
        Ok(Self {
            host,
            shutdown,
            heartbeat,
            timesync,
            kvp,
            storage,
            services: Mutex::new(services),
        })
    }

    /// Bytes the guest read from and wrote to its disks and DVDs, on every controller.
    pub fn disk_bytes(&self) -> (u64, u64) {
        self.controllers()
            .iter()
            .map(|(_, c)| c.io_bytes())
            .fold((0, 0), |(r, w), (a, b)| (r + a, w + b))
    }

    /// The SCSI controllers, by number.
    pub fn controllers(&self) -> Vec<(u8, Arc<StorvspDevice>)> {
        support::lock(&self.storage.controllers)
            .iter()
            .map(|(&c, d)| (c, d.clone()))
            .collect()
    }

    /// Every drive of every controller: controller and what is at each location.
    pub fn drives(&self) -> Vec<(u8, DriveInfo)> {
        self.controllers()
            .into_iter()
            .flat_map(|(c, dev)| dev.drives().into_iter().map(move |d| (c, d)))
            .collect()
    }

    /// Hot add (Add-VMHardDiskDrive, Add-VMDvdDrive): puts what `open` opens at `location`
    /// of `controller` (lowest free location when `None`; controller 0 when `None`). A
    /// controller the VM does not have yet is created with the drive on it and offered on
    /// VMBus at once (hot-plug), so the guest finds the controller and then the drive. The
    /// file is opened only once the place is known to be free. Returns the place.
    pub fn attach(
        &self,
        controller: Option<u8>,
        location: Option<u8>,
        open: impl FnOnce() -> Result<Media, DiskError>,
    ) -> Result<(u8, u8), DiskError> {
        let c = controller.unwrap_or(0);
        if c >= MAX_SCSI_CONTROLLERS {
            return Err(DiskError::ControllerOutOfRange(c));
        }
        let mut controllers = support::lock(&self.storage.controllers);
        let drives = controllers.get(&c).map(|d| d.drives()).unwrap_or_default();
        let l = match location {
            Some(l) if l >= MAX_LOCATIONS => return Err(DiskError::LocationOutOfRange(l)),
            Some(l) => l,
            None => (0..MAX_LOCATIONS)
                .find(|l| drives.iter().all(|d| d.lun != *l))
                .ok_or(DiskError::Full(c))?,
        };
        if let Some(d) = drives.iter().find(|d| d.lun == l) {
            return Err(DiskError::InUse {
                controller: c,
                location: l,
                by: d.path.clone(),
            });
        }
        let media = open()?;
        match controllers.get(&c) {
            Some(dev) => match media {
                Media::Disk(spec) => dev.add_disk(l, spec),
                Media::Dvd(iso) => dev.add_dvd(l, iso),
            }
            .map_err(DiskError::Controller)?,
            None => {
                let dev = self.storage.new_controller(c, vec![(l, media)])?;
                self.host
                    .add_device(dev.clone())
                    .map_err(|e| DiskError::Offer {
                        controller: c,
                        reason: e.to_string(),
                    })?;
                controllers.insert(c, dev);
            }
        }
        Ok((c, l))
    }

    /// Hot remove (Remove-VMHardDiskDrive, Remove-VMDvdDrive): the controller stays. Returns
    /// the file that was attached (`None` for an empty DVD drive); it is closed, and
    /// unlocked, once its last request is done.
    pub fn detach(
        &self,
        controller: u8,
        location: u8,
    ) -> Result<Option<std::path::PathBuf>, DiskError> {
        let dev = support::lock(&self.storage.controllers)
            .get(&controller)
            .cloned();
        let spec = dev
            .and_then(|d| d.remove_disk(location))
            .ok_or(DiskError::NoDrive {
                controller,
                location,
            })?;
        Ok(spec.map(|s| s.path))
    }

    /// Changes the medium of a DVD drive (Set-VMDvdDrive): `Some` inserts or replaces it
    /// (the guest sees UNIT ATTENTION 28h), `None` ejects it. The drive is the one at
    /// `location` of `controller` (controller 0 when `None`), else the first DVD drive of
    /// `controller`, else the VM's first DVD drive. Returns its place and the file taken out.
    pub fn change_dvd(
        &self,
        controller: Option<u8>,
        location: Option<u8>,
        iso: Option<DiskSpec>,
    ) -> Result<(u8, u8, Option<std::path::PathBuf>), DiskError> {
        let drives = self.drives();
        let (c, l) = match (controller, location) {
            (c, Some(l)) => (c.unwrap_or(0), l),
            (c, None) => drives
                .iter()
                .find(|(dc, d)| d.kind == DriveKind::Dvd && c.is_none_or(|c| c == *dc))
                .map(|(dc, d)| (*dc, d.lun))
                .ok_or(DiskError::NoDvd)?,
        };
        let dev = support::lock(&self.storage.controllers).get(&c).cloned();
        let dev = dev.ok_or(DiskError::NoDrive {
            controller: c,
            location: l,
        })?;
        match dev.change_dvd(l, iso) {
            Ok(old) => Ok((c, l, old.map(|s| s.path))),
            Err(storvsp::ControllerError::NotDvd(_)) => {
                Err(if drives.iter().any(|(dc, d)| *dc == c && d.lun == l) {
                    DiskError::NotDvd {
                        controller: c,
                        location: l,
                    }
                } else {
                    DiskError::NoDrive {
                        controller: c,
                        location: l,
                    }
                })
            }
            Err(e) => Err(DiskError::Controller(e)),
        }
    }

    /// The handle the vCPU threads use for HvPostMessage and HvSignalEvent.
    pub fn host(&self) -> &VmbusHost {
        &self.host
    }

    /// Asks the guest to shut down (or reboot) through the shutdown service.
    pub fn request_shutdown(&self, reboot: bool) -> Result<(), ShutdownError> {
        let kind = if reboot {
            ShutdownKind::Reboot
        } else {
            ShutdownKind::PowerOff
        };
        self.shutdown.request_shutdown(kind)
    }

    pub fn status(&self) -> IcStatus {
        let s = |d: &IcDevice| -> IcSnapshot { d.snapshot() };
        IcStatus {
            vmbus_version: self.host.version(),
            heartbeat: s(&self.heartbeat).heartbeat,
            shutdown_ready: s(&self.shutdown).ready,
            time_synced: s(&self.timesync).time_synced,
        }
    }

    /// The KVP service.
    pub fn kvp(&self) -> &KvpDevice {
        &self.kvp
    }

    /// A JSON dump of the bus and its devices.
    pub fn inspect(&self) -> serde_json::Value {
        self.host
            .inspect()
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    /// Stops every channel worker and the control thread, then closes every drive's file
    /// (a VHDX is left clean, its log empty), even while handles to the bus live on.
    pub fn stop(&self) {
        self.host.stop();
        for (_, dev) in self.controllers() {
            for e in dev.close() {
                tracing::error!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_defaults_explicit_places_and_errors() {
        // Explicit places first; the rest fill controller 0 (or their own) from location 0.
        assert_eq!(
            place(&[(None, None), (None, Some(0)), (Some(2), None), (None, None)]).unwrap(),
            vec![(0, 1), (0, 0), (2, 0), (0, 2)]
        );
        assert_eq!(
            place(&[(Some(3), Some(63)), (Some(3), None)]).unwrap(),
            vec![(3, 63), (3, 0)]
        );
        let err = |w: &[Wanted]| place(w).map_err(|(i, e)| (i, e.to_string()));
        let (i, e) = err(&[(None, None), (Some(4), None)]).unwrap_err();
        assert_eq!(i, 1);
        assert!(e.contains("controller 4 is out of range"), "{e}");
        let (i, e) = err(&[(Some(1), Some(64))]).unwrap_err();
        assert_eq!(i, 0);
        assert!(e.contains("location 64 is out of range"), "{e}");
        let (i, e) = err(&[(Some(1), Some(5)), (None, None), (Some(1), Some(5))]).unwrap_err();
        assert_eq!(i, 2);
        assert!(e.contains("location 5 of controller 1 is in use"), "{e}");
        let full: Vec<Wanted> = (0..65).map(|_| (None, None)).collect();
        let (i, e) = err(&full).unwrap_err();
        assert_eq!(i, 64);
        assert!(e.contains("every location of controller 0"), "{e}");
        assert_eq!(place(&full[..64]).unwrap().last(), Some(&(0, 63)));
    }

    #[test]
    fn controllers_have_their_own_instance_ids() {
        assert_eq!(scsi_instance_id(0), SCSI0_INSTANCE_ID);
        let ids: std::collections::BTreeSet<String> = (0..MAX_SCSI_CONTROLLERS)
            .map(|c| scsi_instance_id(c).to_string())
            .collect();
        assert_eq!(ids.len(), 4);
        assert!(scsi_instance_id(3).to_string().ends_with("5c510003"));
    }
}
