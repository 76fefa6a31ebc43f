//! Save-VM, Remove-VMSavedState and the jobs of long operations.

use crate::*;

/// Save a VM (Save-VM): its vCPUs stop, and its whole state (processors, devices, memory)
/// goes to the VM's folder; the VM is Saving, then Saved, and its worker ends. Answers at once
/// with the job; `start` restores the saved VM. 409 unless Running or Paused.
#[utoipa::path(post, path = "/vms/{name}/save", tag = "vms", params(("name" = String, Path)),
    responses((status = 202, body = Job, description = "The save job, Running"),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "Not Running or Paused")))]
pub fn save_vm() {}

/// Delete a Saved VM's saved state (Remove-VMSavedState): the VM is Off, as if turned off.
/// 409 unless Saved.
#[utoipa::path(post, path = "/vms/{name}/discard-saved-state", tag = "vms", params(("name" = String, Path)),
    responses((status = 200, body = Vm), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "Not Saved")))]
pub fn discard_saved_state() {}

/// The jobs, newest first: those running and the last 100 finished (kept across service
/// restarts; a job that was running when the service stopped is Failed, unless its work got
/// done).
#[utoipa::path(get, path = "/jobs", tag = "jobs",
    responses((status = 200, body = [Job]), (status = 403, body = ErrorBody)))]
pub fn list_jobs() {}

/// One job and its progress.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, body = Job), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub fn get_job() {}
