//! The manager's drive and network-adapter verbs (Add-/Remove-/Get-VMHardDiskDrive,
//! -VMDvdDrive, Set-VMDvdDrive, Add-/Remove-/Get-VMNetworkAdapter): each changes the VM's
//! settings in one transaction and, where Hyper-V does so on a running VM, the worker too.

use super::Manager;
use crate::db::VmRow;
use crate::devices;
use crate::error::ApiError;
use crate::worker;
use api::{
    DvdDrive, HardDisk, NetworkAdapter, NetworkAdapterStatus, NewDvdDrive, NewHardDisk,
    NewNetworkAdapter, NicLive, VmState,
};
use std::path::PathBuf;
use std::time::Duration;

/// How long a worker may take to attach or detach a drive.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(30);

impl Manager {
    /// The drives and adapters of a new VM, in order: its disks, the disks it creates (files
    /// recorded in `created`, for the caller to remove if the VM is not defined after all),
    /// its DVD drives and its network adapters.
    pub(super) fn new_vm_devices(
        &self,
        req: &api::NewVm,
        id: &str,
        folder: &std::path::Path,
        s: &mut crate::db::Settings,
        created: &mut Vec<PathBuf>,
    ) -> Result<(), ApiError> {
        let all = self.db().all()?;
        for d in &req.disks {
            let disk = devices::disk(d, id, s, &all)?;
            s.disks.push(disk);
        }
        for n in &req.new_disks {
            let path = folder.join(&n.path);
            let size = api::parse_size(&n.size)
                .map_err(|e| ApiError::invalid(format!("new_disks.size: {e}")))?;
            if path.exists() {
                return Err(ApiError::conflict(format!(
                    "new_disks.path: '{}' exists; give a new file (or attach it with disks)",
                    path.display()
                )));
            }
            let (controller, location) = devices::place(s, "new_disks", None, None)?;
            let options = vhdx::open::CreateOptions {
                format: vhdx::open::Format::Vhdx,
                image_type: vhdx::open::ImageType::Dynamic,
                size,
                block_size: 0,
                logical_sector_size: 0,
                physical_sector_size: 0,
                parent: None,
            };
            let image = vhdx::open::create(&path, &options)
                .map_err(|e| ApiError::invalid(format!("new_disks: {e}")))?;
            drop(image);
            created.push(path.clone());
            s.disks.push(HardDisk {
                path: path.to_string_lossy().into_owned(),
                controller,
                location,
                read_only: false,
                cache: api::DiskCache::None,
            });
        }
        for d in &req.dvds {
            let dvd = devices::dvd(d, s)?;
            s.dvds.push(dvd);
        }
        for n in &req.nics {
            let nic = devices::nic(n, id, s, &self.state_dir)?;
            s.nics.push(nic);
        }
        Ok(())
    }

    /// The control socket of the VM's worker, when one runs.
    fn running_socket(&self, row: &VmRow) -> Option<PathBuf> {
        if !row.state.has_worker() {
            return None;
        }
        self.workers
            .lock()
            .unwrap()
            .get(&row.id)
            .map(|w| w.socket.clone())
    }

    /// Where a device change goes: `None` while the VM is Off (its settings only), the worker's
    /// control socket while it is Running or Paused (the guest sees the change at once); 409
    /// in the states between, and while Saved (the saved devices must match on restore).
    fn live_socket(&self, row: &VmRow) -> Result<Option<PathBuf>, ApiError> {
        if !changes_live(&row.name, row.state)? {
            return Ok(None);
        }
        self.running_socket(row)
            .map(Some)
            .ok_or_else(|| ApiError::wrong_state(&row.name, row.state, "its worker is gone"))
    }

    /// Runs `change` on the VM's settings under its lock and stores the result.
    async fn change_settings<T>(
        &self,
        name: &str,
        change: impl AsyncFnOnce(&VmRow, &mut crate::db::Settings) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let id = self.find(name)?.id;
        let lock = self.lock_for(&id);
        let _g = lock.lock().await;
        let row = self.find_id(&id, name)?;
        let mut settings = row.settings.clone();
        let out = change(&row, &mut settings).await?;
        self.db().update_settings(&row.id, &row.name, &settings)?;
        Ok(out)
    }

    /// Measure-VM: what the running worker has used since it started.
    pub async fn measure(&self, name: &str) -> Result<api::VmMeasure, ApiError> {
        let row = self.find(name)?;
        let Some(socket) = self.running_socket(&row) else {
            return Err(ApiError::wrong_state(
                &row.name,
                row.state,
                "it is not running",
            ));
        };
        let reply = worker::control(&socket, "measure", DEVICE_TIMEOUT)
            .await
            .map_err(|e| {
                ApiError::new(
                    axum::http::StatusCode::CONFLICT,
                    "worker_refused",
                    format!("the worker of VM '{}' did not answer: {e}", row.name),
                )
            })?;
        let json = reply.strip_prefix("ok ").unwrap_or(&reply);
        serde_json::from_str(json.trim()).map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "worker_refused",
                format!(
                    "the worker of VM '{}' answered something else: {e}",
                    row.name
                ),
            )
        })
    }

    /// Get-VMIntegrationService: from the worker while it runs, else the settings.
    pub async fn integration(&self, name: &str) -> Result<Vec<api::IntegrationService>, ApiError> {
        let row = self.find(name)?;
        if let Some(socket) = self.running_socket(&row) {
            let reply = worker::control(&socket, "integration", DEVICE_TIMEOUT).await;
            if let Some(list) = reply
                .ok()
                .and_then(|r| serde_json::from_str(r.trim_start_matches("ok ")).ok())
            {
                return Ok(list);
            }
        }
        Ok(api::INTEGRATION_SERVICES
            .iter()
            .map(|(long, short)| api::IntegrationService {
                name: long.to_string(),
                enabled: !row.settings.disabled_integration.iter().any(|d| d == short),
                status: String::new(),
            })
            .collect())
    }

    /// Enable-/Disable-VMIntegrationService: a setting, and on a running VM the channel is
    /// offered or rescinded at once.
    pub async fn set_integration(
        &self,
        name: &str,
        service: &str,
        enabled: bool,
    ) -> Result<Vec<api::IntegrationService>, ApiError> {
        let short = api::integration_service(service).ok_or_else(|| {
            missing(format!(
                "there is no integration service '{service}'; use heartbeat, kvp, shutdown or timesync"
            ))
        })?;
        self.change_settings(name, async |row, s| {
            if let Some(socket) = self.running_socket(row) {
                let command = format!(
                    "integration-set {short} {}",
                    if enabled { "on" } else { "off" }
                );
                worker_says(&socket, &command, &row.name).await?;
            }
            s.disabled_integration.retain(|d| d != short);
            if !enabled {
                s.disabled_integration.push(short.to_string());
            }
            Ok(())
        })
        .await?;
        self.integration(name).await
    }

    pub fn disks(&self, name: &str) -> Result<Vec<HardDisk>, ApiError> {
        Ok(self.find(name)?.settings.disks)
    }

    pub fn dvds(&self, name: &str) -> Result<Vec<DvdDrive>, ApiError> {
        Ok(self.find(name)?.settings.dvds)
    }

    /// Get-VMNetworkAdapter: the settings and, while a worker runs the VM, what it reports
    /// for each adapter (matched by MAC).
    pub async fn nics(&self, name: &str) -> Result<Vec<NetworkAdapterStatus>, ApiError> {
        let row = self.find(name)?;
        let mut live: Vec<(String, NicLive)> = Vec::new();
        if let Some(socket) = self.running_socket(&row) {
            let reply = worker::control(&socket, "nics", DEVICE_TIMEOUT)
                .await
                .map_err(|e| worker_error(&row.name, e))?;
            live = parse_live(&reply).map_err(|e| worker_error(&row.name, e))?;
        }
        Ok(row
            .settings
            .nics
            .into_iter()
            .map(|adapter| {
                let live = live
                    .iter()
                    .position(|(mac, _)| *mac == adapter.mac)
                    .map(|i| live.swap_remove(i).1);
                NetworkAdapterStatus { adapter, live }
            })
            .collect())
    }

    /// Add-VMHardDiskDrive: on a running VM the worker attaches it at once.
    pub async fn add_disk(&self, name: &str, req: NewHardDisk) -> Result<HardDisk, ApiError> {
        let all = self.db().all()?;
        self.change_settings(name, async |row, s| {
            let disk = devices::disk(&req, &row.id, s, &all)?;
            if let Some(socket) = self.live_socket(row)? {
                let command = format!(
                    "disk-add {} {} {} auto cache={} {}",
                    disk.controller,
                    disk.location,
                    if disk.read_only { "ro" } else { "rw" },
                    disk.cache.name(),
                    disk.path
                );
                worker_says(&socket, &command, &row.name).await?;
            }
            s.disks.push(disk.clone());
            Ok(disk)
        })
        .await
    }

    /// Remove-VMHardDiskDrive.
    pub async fn remove_disk(
        &self,
        name: &str,
        controller: u8,
        location: u8,
    ) -> Result<HardDisk, ApiError> {
        self.change_settings(name, async |row, s| {
            let i = s
                .disks
                .iter()
                .position(|d| (d.controller, d.location) == (controller, location))
                .ok_or_else(|| no_drive(&row.name, "disk", controller, location))?;
            if let Some(socket) = self.live_socket(row)? {
                let command = format!("disk-remove {controller} {location}");
                worker_says(&socket, &command, &row.name).await?;
            }
            Ok(s.disks.remove(i))
        })
        .await
    }

    /// Add-VMDvdDrive: on a running VM the worker adds the drive at once.
    pub async fn add_dvd(&self, name: &str, req: NewDvdDrive) -> Result<DvdDrive, ApiError> {
        self.change_settings(name, async |row, s| {
            let dvd = devices::dvd(&req, s)?;
            if let Some(socket) = self.live_socket(row)? {
                let command = format!(
                    "dvd-add {} {} {}",
                    dvd.controller,
                    dvd.location,
                    dvd.path.as_deref().unwrap_or("none")
                );
                worker_says(&socket, &command, &row.name).await?;
            }
            s.dvds.push(dvd.clone());
            Ok(dvd)
        })
        .await
    }

    /// Remove-VMDvdDrive: on a running VM the worker removes the drive at once.
    pub async fn remove_dvd(
        &self,
        name: &str,
        controller: u8,
        location: u8,
    ) -> Result<DvdDrive, ApiError> {
        self.change_settings(name, async |row, s| {
            let i = dvd_index(&s.dvds, &row.name, controller, location)?;
            if let Some(socket) = self.live_socket(row)? {
                let command = format!("disk-remove {controller} {location}");
                worker_says(&socket, &command, &row.name).await?;
            }
            Ok(s.dvds.remove(i))
        })
        .await
    }

    /// Set-VMDvdDrive -Path: inserts an ISO or ejects (`path` none); a running guest sees
    /// the medium change.
    pub async fn set_dvd_media(
        &self,
        name: &str,
        controller: u8,
        location: u8,
        path: Option<String>,
    ) -> Result<DvdDrive, ApiError> {
        self.change_settings(name, async |row, s| {
            let i = dvd_index(&s.dvds, &row.name, controller, location)?;
            let path = devices::media(path.as_deref())?;
            if let Some(socket) = self.live_socket(row)? {
                let command = match &path {
                    Some(p) => format!("dvd-set {controller} {location} {p}"),
                    None => format!("dvd-eject {controller} {location}"),
                };
                worker_says(&socket, &command, &row.name).await?;
            }
            s.dvds[i].path = path;
            Ok(s.dvds[i].clone())
        })
        .await
    }

    /// Add-VMNetworkAdapter: on a running VM the worker offers it to the guest at once.
    pub async fn add_nic(
        &self,
        name: &str,
        req: NewNetworkAdapter,
    ) -> Result<NetworkAdapter, ApiError> {
        let state_dir = self.state_dir.clone();
        self.change_settings(name, async |row, s| {
            let nic = devices::nic(&req, &row.id, s, &state_dir)?;
            if let Some(socket) = self.live_socket(row)? {
                let command = format!("nic-add {}", devices::nic_spec(&nic));
                worker_says(&socket, &command, &row.name).await?;
            }
            s.nics.push(nic.clone());
            Ok(nic)
        })
        .await
    }

    /// Remove-VMNetworkAdapter: on a running VM the worker rescinds it and closes its TAP.
    pub async fn remove_nic(&self, name: &str, mac: &str) -> Result<NetworkAdapter, ApiError> {
        let mac = devices::format_mac(&devices::parse_mac("mac", mac)?);
        self.change_settings(name, async |row, s| {
            let i = nic_index(&s.nics, &row.name, &mac)?;
            if let Some(socket) = self.live_socket(row)? {
                worker_says(&socket, &format!("nic-remove {mac}"), &row.name).await?;
            }
            Ok(s.nics.remove(i))
        })
        .await
    }

    /// Connect-/Disconnect-VMNetworkAdapter: the cable; a running guest sees its carrier.
    /// Set-VMNetworkAdapter(Vlan): the VLAN and the port's guards, while the VM is Off.
    pub async fn set_nic(
        &self,
        name: &str,
        mac: &str,
        p: api::NetworkAdapterPatch,
    ) -> Result<NetworkAdapter, ApiError> {
        let mac = devices::format_mac(&devices::parse_mac("mac", mac)?);
        self.change_settings(name, async |row, s| {
            let i = nic_index(&s.nics, &row.name, &mac)?;
            let n = &mut s.nics[i];
            let off_only = [
                ("vlan", p.vlan.is_some()),
                ("mac_spoofing", p.mac_spoofing.is_some()),
                ("dhcp_guard", p.dhcp_guard.is_some()),
                ("router_guard", p.router_guard.is_some()),
            ];
            if let Some((field, _)) = off_only.iter().find(|(_, given)| *given) {
                if row.state != VmState::Off {
                    return Err(ApiError::new(
                        axum::http::StatusCode::CONFLICT,
                        "wrong_state",
                        format!(
                            "{field}: VM '{}' is {}; an adapter's VLAN, MAC spoofing and guards change while its VM is Off (they apply at the next start)",
                            row.name, row.state
                        ),
                    ));
                }
            }
            if let Some(v) = &p.vlan {
                if let Some(v) = v {
                    devices::check_vlan("vlan", v)?;
                }
                n.vlan = v.clone();
            }
            n.mac_spoofing = p.mac_spoofing.unwrap_or(n.mac_spoofing);
            n.dhcp_guard = p.dhcp_guard.unwrap_or(n.dhcp_guard);
            n.router_guard = p.router_guard.unwrap_or(n.router_guard);
            if let Some(connected) = p.connected {
                if let Some(socket) = self.live_socket(row)? {
                    let command =
                        format!("nic-link {} {mac}", if connected { "up" } else { "down" });
                    worker_says(&socket, &command, &row.name).await?;
                }
                s.nics[i].connected = connected;
            }
            Ok(s.nics[i].clone())
        })
        .await
    }

    /// After a start: the adapters whose cable is out are disconnected in the worker too.
    pub(super) async fn apply_links(&self, row: &VmRow) {
        let socket = self
            .workers
            .lock()
            .unwrap()
            .get(&row.id)
            .map(|w| w.socket.clone());
        let Some(socket) = socket else {
            return;
        };
        for n in row.settings.nics.iter().filter(|n| !n.connected) {
            if let Err(e) =
                worker_says(&socket, &format!("nic-link down {}", n.mac), &row.name).await
            {
                tracing::warn!("VM '{}': {e}", row.name);
            }
        }
    }
}

/// Whether a device change of a VM in `state` goes to its worker too (Running, Paused) or
/// only to its settings (Off); other states refuse it.
fn changes_live(vm: &str, state: VmState) -> Result<bool, ApiError> {
    match state {
        VmState::Off => Ok(false),
        VmState::Running | VmState::Paused => Ok(true),
        state => Err(ApiError::wrong_state(
            vm,
            state,
            "its devices change while it is Off, Running or Paused",
        )),
    }
}

fn nic_index(nics: &[NetworkAdapter], vm: &str, mac: &str) -> Result<usize, ApiError> {
    nics.iter()
        .position(|n| n.mac == mac)
        .ok_or_else(|| missing(format!("VM '{vm}' has no network adapter with MAC {mac}")))
}

fn missing(message: String) -> ApiError {
    ApiError::new(axum::http::StatusCode::NOT_FOUND, "no_device", message)
}

fn no_drive(vm: &str, what: &str, controller: u8, location: u8) -> ApiError {
    missing(format!(
        "VM '{vm}' has no {what} at controller {controller} location {location}"
    ))
}

fn dvd_index(dvds: &[DvdDrive], vm: &str, controller: u8, location: u8) -> Result<usize, ApiError> {
    dvds.iter()
        .position(|d| (d.controller, d.location) == (controller, location))
        .ok_or_else(|| no_drive(vm, "DVD drive", controller, location))
}

/// Sends a device command to the worker; its refusal is the answer (409, with its words).
async fn worker_says(socket: &std::path::Path, command: &str, vm: &str) -> Result<(), ApiError> {
    worker::control(socket, command, DEVICE_TIMEOUT)
        .await
        .map(drop)
        .map_err(|e| worker_error(vm, e))
}

fn worker_error(vm: &str, e: String) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::CONFLICT,
        "worker_refused",
        format!("the worker of VM '{vm}' refused: {e}"),
    )
}

/// One adapter of the worker's `nics` answer: what it is now, by MAC.
#[derive(serde::Deserialize)]
struct WorkerNic {
    mac: String,
    #[serde(flatten)]
    live: NicLive,
}

/// The worker's `nics` answer (`ok [...]`, a JSON list).
fn parse_live(reply: &str) -> Result<Vec<(String, NicLive)>, String> {
    let json = reply.strip_prefix("ok").unwrap_or(reply).trim();
    let nics: Vec<WorkerNic> = serde_json::from_str(json)
        .map_err(|e| format!("its NIC list is not what this service reads: {e}"))?;
    Ok(nics.into_iter().map(|n| (n.mac, n.live)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_change_live_only_while_a_worker_runs_the_guest() {
        assert!(!changes_live("v", VmState::Off).unwrap());
        assert!(changes_live("v", VmState::Running).unwrap());
        assert!(changes_live("v", VmState::Paused).unwrap());
        for s in [
            VmState::Starting,
            VmState::Stopping,
            VmState::Saving,
            VmState::Saved,
        ] {
            let e = changes_live("v", s).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (409, "wrong_state"), "{s}");
        }
    }
}
