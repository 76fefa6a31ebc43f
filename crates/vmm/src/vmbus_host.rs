//! VMBus inside the worker: the run-time [`vmbus::VmbusHost`] (control thread, port table,
//! one worker thread per open channel) with the integration services as its devices.

use crate::integration::{IcBusDevice, IcDevice, IcSnapshot, ShutdownError};
use crate::kvp::{KvpBusDevice, KvpDevice};
use crate::synic::HvSynic;
use ic::{HeartbeatState, IcKind, ShutdownKind};
use std::sync::Arc;
use vmbus::{HostConfig, ServerConfig, VmbusHost};

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
}

impl Vmbus {
    /// Starts the bus with the shutdown, heartbeat, timesync and KVP services.
    pub fn start(
        hv: Arc<hv1::Partition>,
        kvm: Arc<kvm::Partition>,
        vp_count: u32,
    ) -> std::io::Result<Self> {
        let mem = kvm.memory().clone();
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
        Ok(Self {
            host,
            shutdown,
            heartbeat,
            timesync,
            kvp,
        })
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
