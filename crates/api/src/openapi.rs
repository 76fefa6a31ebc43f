//! The OpenAPI 3 document, generated from the types in this crate. The service serves it at
//! `/openapi.json`; the repository keeps a copy (`openapi.json` at its root) that a test
//! compares with this one.
//!
//! The functions below are never called: they carry the description of each operation.
#![allow(dead_code)]

use crate::*;
use utoipa::OpenApi;

mod devices;
mod jobs;
mod switches;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "viridiand",
        description = "Viridian's management service: VM inventory and lifecycle. Every error \
                       answer is an ErrorBody. On the Unix socket callers are authorised by \
                       their credentials (root or the `viridian` group)."
    ),
    paths(
        list_vms, create_vm, get_vm, patch_vm, delete_vm, start_vm, stop_vm, restart_vm,
        pause_vm, resume_vm, jobs::save_vm, jobs::discard_saved_state, jobs::list_jobs, jobs::get_job,
        devices::list_disks, devices::add_disk, devices::remove_disk,
        devices::list_dvds, devices::add_dvd, devices::set_dvd, devices::remove_dvd,
        devices::list_nics, devices::add_nic, devices::remove_nic, devices::set_nic, devices::measure_vm,
        devices::list_integration, devices::set_integration,
        switches::list_switches, switches::create_switch, switches::get_switch,
        switches::remove_switch, list_tokens, create_token, revoke_token, service, stop_vms, events, openapi
    ),
    components(schemas(ErrorBody, ErrorDetail, Vm, NewVm, VmPatch, VmState, Heartbeat,
                       AutoStart, AutoStop, Recovery, VmEvent, ServiceInfo, NewToken,
                       TokenCreated, TokenInfo, HardDisk, DiskCache, NewHardDisk, NewDiskFile, DvdDrive,
                       NewDvdDrive, DvdMedia, NetworkAdapter, NetworkAdapterStatus, NicLive, AdapterVlan, VlanTrunk, NewNetworkAdapter, NetworkAdapterPatch, VmMeasure, IntegrationService, IntegrationChange,
                       Switch, SwitchType, NewSwitch, Job, JobState)),
    tags((name = "vms", description = "Virtual machines"),
          (name = "devices", description = "A VM's disks, DVD drives and network adapters"), (name = "service", description = "The service"),
          (name = "switches", description = "Virtual switches"),
          (name = "jobs", description = "Long operations and their progress"),
          (name = "tokens", description = "Bearer tokens for callers over TLS (--listen)"))
)]
struct ApiDoc;

/// The document as a value.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty-printed JSON with a final newline, as checked in.
pub fn document_json() -> String {
    let mut s = document()
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    s.push('\n');
    s
}

/// List the VMs (Get-VM).
#[utoipa::path(get, path = "/vms", tag = "vms",
    responses((status = 200, body = [Vm]), (status = 403, body = ErrorBody)))]
fn list_vms() {}

/// Define a VM (New-VM). Nothing is created when it fails.
#[utoipa::path(post, path = "/vms", tag = "vms", request_body = NewVm,
    responses(
        (status = 201, body = Vm, description = "Defined, Off"),
        (status = 400, body = ErrorBody, description = "Malformed JSON"),
        (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "A VM of that name exists"),
        (status = 413, body = ErrorBody, description = "Body over 1 MiB"),
        (status = 422, body = ErrorBody, description = "A field is invalid; the message names it")))]
fn create_vm() {}

/// One VM (Get-VM NAME), with its live heartbeat.
#[utoipa::path(get, path = "/vms/{name}", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = Vm), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
fn get_vm() {}

/// Change a VM's settings (Set-VM, Set-VMProcessor, Set-VMMemory).
#[utoipa::path(patch, path = "/vms/{name}", tag = "vms", params(("name" = String, Path)),
    request_body = VmPatch,
    responses(
        (status = 200, body = Vm),
        (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "The change needs the VM Off, or the new name is taken"),
        (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
fn patch_vm() {}

/// Remove a VM and its folder (Remove-VM). The VM must be Off.
#[utoipa::path(delete, path = "/vms/{name}", tag = "vms", params(("name" = String, Path)),
    responses((status = 204, description = "Removed"), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
fn delete_vm() {}

/// Start a VM (Start-VM) as a job: its progress goes from `Starting the worker` to `Running`,
/// and it completes once the worker's control socket is up (a Saved VM is restored where it
/// was). A worker that dies first fails the job with its last words. The state and the boot
/// files are checked before the job is made (409).
#[utoipa::path(post, path = "/vms/{name}/start", tag = "vms", params(("name" = String, Path)),
    responses((status = 202, body = Job, description = "The start job, Running"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "Not Off or Saved, or a boot file is gone")))]
fn start_vm() {}

/// Stop a VM (Stop-VM) as a job: shut down through the guest's shutdown service (the job's
/// progress counts the timeout down), and turn it off when the guest has none or does not
/// finish in time. The job completes when the VM is Off.
#[utoipa::path(post, path = "/vms/{name}/stop", tag = "vms", params(("name" = String, Path), StopParams),
    responses((status = 202, body = Job, description = "The stop job, Running"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Not running")))]
fn stop_vm() {}

/// Restart a VM (Restart-VM) as a job: stop as `stop` does, then start.
#[utoipa::path(post, path = "/vms/{name}/restart", tag = "vms", params(("name" = String, Path), StopParams),
    responses((status = 202, body = Job, description = "The restart job, Running"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Not running")))]
fn restart_vm() {}

/// Pause a VM (Suspend-VM): its vCPUs stop and its state stays in memory. 409 unless it is Running.
#[utoipa::path(post, path = "/vms/{name}/pause", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = Vm), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
fn pause_vm() {}

/// Resume a paused VM (Resume-VM). 409 unless it is Paused.
#[utoipa::path(post, path = "/vms/{name}/resume", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = Vm), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
fn resume_vm() {}

/// The API tokens (names and creation times; the secrets are not kept).
#[utoipa::path(get, path = "/tokens", tag = "tokens",
    responses((status = 200, body = [TokenInfo]), (status = 403, body = ErrorBody)))]
fn list_tokens() {}

/// Make a token (`viridian token new NAME`). The answer holds the secret, shown only once.
#[utoipa::path(post, path = "/tokens", tag = "tokens", request_body = NewToken,
    responses((status = 201, body = TokenCreated), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 409, body = ErrorBody, description = "A token of that name exists"),
              (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
fn create_token() {}

/// Revoke a token (`viridian token revoke NAME`).
#[utoipa::path(delete, path = "/tokens/{name}", tag = "tokens", params(("name" = String, Path)),
    responses((status = 204, description = "Revoked"), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
fn revoke_token() {}

/// The service: version, state directory, counts, cgroup support.
#[utoipa::path(get, path = "/service", tag = "service",
    responses((status = 200, body = ServiceInfo), (status = 403, body = ErrorBody)))]
fn service() {}

/// Stop every running VM as its AutomaticStopAction says (ShutDown: the guest's shutdown
/// service within 30 s, then turn off; TurnOff), for a host that is shutting down. Answers
/// with the VMs stopped, once they are off.
#[utoipa::path(post, path = "/service/stop-vms", tag = "service",
    responses((status = 200, body = [Vm]), (status = 403, body = ErrorBody)))]
fn stop_vms() {}

/// Server-sent events: one `state` event (a VmEvent as JSON) per state change.
#[utoipa::path(get, path = "/events", tag = "service",
    responses((status = 200, content_type = "text/event-stream", body = String), (status = 403, body = ErrorBody)))]
fn events() {}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, content_type = "application/json", body = Object), (status = 403, body = ErrorBody)))]
fn openapi() {}
