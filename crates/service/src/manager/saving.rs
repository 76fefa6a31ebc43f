//! Save-VM as a job, Start-VM of a Saved VM (the worker restores the saved state), and
//! Remove-VMSavedState. The saved state is one file in the VM's folder; Remove-VM deletes it
//! with the folder.

use super::{now_ms, wait_exit, Manager};
use crate::error::ApiError;
use crate::worker;
use api::{Heartbeat, Job, JobState, Vm, VmState};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The saved state's name in the VM's folder.
const SAVED_STATE: &str = "vm.saved";
/// Finished jobs kept for `GET /jobs`.
const KEPT_JOBS: usize = 100;
/// How long a worker may take to end after it has saved.
const SAVED_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The jobs since the service started.
#[derive(Default)]
pub(super) struct Jobs(Vec<Job>);

impl Manager {
    /// Where a VM's saved state lives.
    pub(super) fn saved_state(&self, id: &str) -> PathBuf {
        self.folder(id).join(SAVED_STATE)
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_job(&self, operation: &str, vm: &str) -> Job {
        let job = Job {
            id: uuid::Uuid::new_v4().to_string(),
            operation: operation.into(),
            vm: vm.into(),
            state: JobState::Running,
            percent: 0,
            error: None,
            started_ms: now_ms(),
            finished_ms: None,
        };
        let mut jobs = self.jobs();
        jobs.0.push(job.clone());
        let finished = jobs
            .0
            .iter()
            .filter(|j| j.state != JobState::Running)
            .count();
        if finished > KEPT_JOBS {
            if let Some(i) = jobs.0.iter().position(|j| j.state != JobState::Running) {
                jobs.0.remove(i);
            }
        }
        job
    }

    fn update_job(&self, id: &str, f: impl FnOnce(&mut Job)) {
        if let Some(j) = self.jobs().0.iter_mut().find(|j| j.id == id) {
            f(j);
        }
    }

    /// `GET /jobs`: newest first.
    pub fn list_jobs(&self) -> Vec<Job> {
        self.jobs().0.iter().rev().cloned().collect()
    }

    /// `GET /jobs/{id}`.
    pub fn job(&self, id: &str) -> Result<Job, ApiError> {
        self.jobs()
            .0
            .iter()
            .find(|j| j.id == id)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "not_found",
                    format!(
                        "no job '{}'; `GET /jobs` lists them",
                        id.chars().take(64).collect::<String>()
                    ),
                )
            })
    }

    /// Save-VM: the VM goes Saving at once and the answer is the job; the worker writes the
    /// saved state and ends, and the VM is Saved. A save that fails before the worker stopped
    /// the VM leaves it as it was.
    pub async fn save(self: &Arc<Self>, name: &str) -> Result<Job, ApiError> {
        let id = self.find(name)?.id;
        let guard = self.lock_for(&id).lock_owned().await;
        let row = self.find_id(&id, name)?;
        if row.state != VmState::Running && row.state != VmState::Paused {
            return Err(ApiError::wrong_state(
                &row.name,
                row.state,
                "save needs it Running or Paused",
            ));
        }
        let worker = {
            let mut workers = self.workers.lock().unwrap();
            workers.get_mut(&id).map(|w| {
                w.saving = true;
                (w.socket.clone(), w.exit.clone())
            })
        };
        let Some((socket, mut exit)) = worker else {
            return Err(ApiError::wrong_state(
                &row.name,
                row.state,
                "its worker is gone",
            ));
        };
        let previous = row.state;
        self.set_state(&row, VmState::Saving, "Saving")?;
        let job = self.new_job("save", &row.name);
        let (this, job_id) = (self.clone(), job.id.clone());
        tokio::spawn(async move {
            let path = this.saved_state(&id);
            let _ = std::fs::remove_file(&path);
            let command = format!("save {}", path.display());
            let progress = |pct: u8| this.update_job(&job_id, |j| j.percent = pct.min(99));
            let result = worker::control_with_progress(&socket, &command, progress).await;
            let error = match result {
                Ok(_) => {
                    // The worker ends once it has answered; its watcher records Saved.
                    if !wait_exit(&mut exit, SAVED_EXIT_TIMEOUT).await {
                        this.turn_off(&id, "Saved; the worker did not end, so it was killed")
                            .await;
                    }
                    match this.find_id(&id, &row.name) {
                        Ok(r) if r.state == VmState::Saved => None,
                        Ok(r) => Some(format!("the VM is {} after saving: {}", r.state, r.status)),
                        Err(e) => Some(e.to_string()),
                    }
                }
                Err(e) => {
                    if let Some(w) = this.workers.lock().unwrap().get_mut(&id) {
                        w.saving = false;
                    }
                    if exit.borrow().is_none() {
                        let status = format!("Save failed: {e}");
                        if let Err(e) = this.set_state(&row, previous, &status) {
                            tracing::error!("VM '{}': {e}", row.name);
                        }
                    }
                    Some(e)
                }
            };
            this.update_job(&job_id, |j| {
                j.finished_ms = Some(now_ms());
                match error {
                    None => {
                        j.state = JobState::Completed;
                        j.percent = 100;
                    }
                    Some(e) => {
                        j.state = JobState::Failed;
                        j.error = Some(e);
                    }
                }
            });
            drop(guard);
        });
        Ok(job)
    }

    /// Remove-VMSavedState: a Saved VM's state file goes; the VM is Off.
    pub async fn discard_saved_state(&self, name: &str) -> Result<Vm, ApiError> {
        let id = self.find(name)?.id;
        let lock = self.lock_for(&id);
        let _g = lock.lock().await;
        let row = self.find_id(&id, name)?;
        if row.state != VmState::Saved {
            return Err(ApiError::wrong_state(
                &row.name,
                row.state,
                "only a Saved VM has a saved state to discard",
            ));
        }
        if let Err(e) = std::fs::remove_file(self.saved_state(&id)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(ApiError::internal("cannot delete the saved state", e));
            }
        }
        self.set_state(&row, VmState::Off, "Saved state discarded")?;
        let row = self.find_id(&id, name)?;
        Ok(self.view(&row, Heartbeat::NoContact))
    }

    /// The state a worker that ended leaves its VM in: Saved when it saved (or failed to
    /// restore a saved state that is still there), else Off.
    pub(super) fn state_after_exit(
        &self,
        id: &str,
        saving: bool,
        restoring: bool,
        code: Option<i32>,
        reason: &str,
    ) -> (VmState, String) {
        if !self.saved_state(id).is_file() {
            return (VmState::Off, reason.to_string());
        }
        if saving && matches!(code, Some(0) | None) {
            (VmState::Saved, "Saved".into())
        } else if restoring {
            (
                VmState::Saved,
                format!("the saved state could not be restored: {reason} (`viridian vm discard-saved-state` drops it)"),
            )
        } else {
            (VmState::Off, reason.to_string())
        }
    }
}
