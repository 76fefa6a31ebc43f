//! VMBus inside the worker: the run-time [`vmbus::VmbusHost`] (control thread, port table,
//! one worker thread per open channel) with the integration services as its devices, and
//! the synthetic SCSI controller (storvsp) when the VM has disks.

use crate::integration::{IcBusDevice, IcDevice, IcSnapshot, ShutdownError};
use crate::kvp::{KvpBusDevice, KvpDevice};
use crate::synic::HvSynic;
use hvdef::vmbus::Guid;
use ic::{HeartbeatState, IcKind, ShutdownKind};
use std::path::Path;
use std::sync::Arc;
use storvsp::{ControllerConfig, StorvspDevice};
use vmbus::{HostConfig, ServerConfig, VmbusHost};

pub use storvsp::{DiskSpec, ImageFormat, OpenDiskError};

/// Instance GUID of SCSI controller 0.
pub const SCSI0_INSTANCE_ID: Guid = Guid::from_u128(0x5649_5249_4449_414e_0000_0000_5c51_0000);
/// Most subchannels a controller offers, whatever the vCPU count.
pub const MAX_SCSI_SUBCHANNELS: u16 = 64;

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
    storage: Option<Arc<StorvspDevice>>,
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

    /// Starts the bus as [`Vmbus::start`] does, plus SCSI controller 0 with `disks` at LUN
    /// 0, 1, 2 ... when there are any. The controller offers one subchannel per vCPU beyond
    /// the first, so Linux ends up with one channel per vCPU.
    pub fn start_with_disks(
        hv: Arc<hv1::Partition>,
        kvm: Arc<kvm::Partition>,
        vp_count: u32,
        disks: Vec<DiskSpec>,
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
        for dev in [&shutdown, &heartbeat, &timesync] {
            host.add_device(Arc::new(IcBusDevice(dev.clone())))
                .map_err(std::io::Error::other)?;
        }
        let kvp = KvpDevice::new()?;
        host.add_device(Arc::new(KvpBusDevice(kvp.clone())))
            .map_err(std::io::Error::other)?;
        let storage = if disks.is_empty() {
            None
        } else {
            let subchannels = u16::try_from(vp_count.saturating_sub(1))
                .unwrap_or(u16::MAX)
                .min(MAX_SCSI_SUBCHANNELS);
            let luns = (0u8..).zip(disks).collect();
            let dev = StorvspDevice::new(
                ControllerConfig::new(SCSI0_INSTANCE_ID, subchannels),
                storage_mem,
                luns,
            )
            .map_err(std::io::Error::other)?;
            host.add_device(dev.clone())
                .map_err(std::io::Error::other)?;
            Some(dev)
        };
        Ok(Self {
            host,
            shutdown,
            heartbeat,
            timesync,
            kvp,
            storage,
        })
    }

    /// SCSI controller 0, when the VM has disks.
    pub fn storage(&self) -> Option<&Arc<StorvspDevice>> {
        self.storage.as_ref()
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

    /// Stops every channel worker and the control thread.
    pub fn stop(&self) {
        self.host.stop();
    }
}
