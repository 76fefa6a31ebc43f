//! Operations on a VM's drives and network adapters.

use crate::*;

/// What a running VM has used since it started (Measure-VM).
#[utoipa::path(get, path = "/vms/{name}/measure", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = VmMeasure), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The VM is not running")))]
pub fn measure_vm() {}

/// The integration services (Get-VMIntegrationService).
#[utoipa::path(get, path = "/vms/{name}/integration", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = [IntegrationService]), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub fn list_integration() {}

/// Enable or disable an integration service (Enable-/Disable-VMIntegrationService); a
/// running guest sees its channel offered or rescinded.
#[utoipa::path(put, path = "/vms/{name}/integration/{service}", tag = "vms",
    params(("name" = String, Path), ("service" = String, Path, description = "heartbeat, kvp, shutdown or timesync (or Hyper-V's name)")),
    request_body = IntegrationChange,
    responses((status = 200, body = [IntegrationService]), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
pub fn set_integration() {}

/// The VM's disks (Get-VMHardDiskDrive).
#[utoipa::path(get, path = "/vms/{name}/disks", tag = "devices", params(("name" = String, Path)),
    responses((status = 200, body = [HardDisk]), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub fn list_disks() {}

/// Attach a disk (Add-VMHardDiskDrive). On a running VM the guest sees it at once.
#[utoipa::path(post, path = "/vms/{name}/disks", tag = "devices", params(("name" = String, Path)),
    request_body = NewHardDisk,
    responses((status = 201, body = HardDisk), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The place is taken, another VM writes the file, or the worker refused"),
              (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub fn add_disk() {}

/// Detach a disk (Remove-VMHardDiskDrive); on a running VM after its outstanding I/O.
#[utoipa::path(delete, path = "/vms/{name}/disks/{controller}/{location}", tag = "devices",
    params(("name" = String, Path), ("controller" = u8, Path), ("location" = u8, Path)),
    responses((status = 200, body = HardDisk), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub fn remove_disk() {}

/// The VM's DVD drives (Get-VMDvdDrive).
#[utoipa::path(get, path = "/vms/{name}/dvds", tag = "devices", params(("name" = String, Path)),
    responses((status = 200, body = [DvdDrive]), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub fn list_dvds() {}

/// Add a DVD drive (Add-VMDvdDrive); a running guest sees the new drive at once. 409 while
/// the VM is Starting, Stopping, Saving or Saved.
#[utoipa::path(post, path = "/vms/{name}/dvds", tag = "devices", params(("name" = String, Path)),
    request_body = NewDvdDrive,
    responses((status = 201, body = DvdDrive), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
pub fn add_dvd() {}

/// Insert an ISO or eject (Set-VMDvdDrive -Path); a running guest sees the medium change.
#[utoipa::path(put, path = "/vms/{name}/dvds/{controller}/{location}", tag = "devices",
    params(("name" = String, Path), ("controller" = u8, Path), ("location" = u8, Path)),
    request_body = DvdMedia,
    responses((status = 200, body = DvdDrive), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
pub fn set_dvd() {}

/// Remove a DVD drive (Remove-VMDvdDrive); a running guest loses it at once.
#[utoipa::path(delete, path = "/vms/{name}/dvds/{controller}/{location}", tag = "devices",
    params(("name" = String, Path), ("controller" = u8, Path), ("location" = u8, Path)),
    responses((status = 200, body = DvdDrive), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub fn remove_dvd() {}

/// The VM's network adapters (Get-VMNetworkAdapter); while it runs, each with `live`: its
/// TAP, link, guest state and counters from the worker.
#[utoipa::path(get, path = "/vms/{name}/nics", tag = "devices", params(("name" = String, Path)),
    responses((status = 200, body = [NetworkAdapterStatus]), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub fn list_nics() {}

/// Add a network adapter (Add-VMNetworkAdapter); a running guest sees a new interface (a
/// VMBus offer). 422 unless the switch is defined (or `default`).
#[utoipa::path(post, path = "/vms/{name}/nics", tag = "devices", params(("name" = String, Path)),
    request_body = NewNetworkAdapter,
    responses((status = 201, body = NetworkAdapter), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
pub fn add_nic() {}

/// Remove a network adapter by its MAC (Remove-VMNetworkAdapter); on a running VM it is
/// rescinded and its TAP closed.
#[utoipa::path(delete, path = "/vms/{name}/nics/{mac}", tag = "devices",
    params(("name" = String, Path), ("mac" = String, Path)),
    responses((status = 200, body = NetworkAdapter), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub fn remove_nic() {}

/// Connect or disconnect a network adapter's cable (Connect-/Disconnect-VMNetworkAdapter; a
/// running guest sees its carrier change, and the setting holds across starts), or change
/// its VLAN (Set-VMNetworkAdapterVlan), MAC spoofing, DHCP guard or router guard
/// (Set-VMNetworkAdapter) while the VM is Off: 409 naming the field on a running VM.
#[utoipa::path(patch, path = "/vms/{name}/nics/{mac}", tag = "devices",
    params(("name" = String, Path), ("mac" = String, Path)),
    request_body = NetworkAdapterPatch,
    responses((status = 200, body = NetworkAdapter), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
pub fn set_nic() {}
