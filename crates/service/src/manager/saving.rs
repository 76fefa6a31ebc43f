//! Save-VM as a job (see [`super::jobs`]), Start-VM of a Saved VM (the worker restores the saved state), and
//! Remove-VMSavedState. The saved state is one file in the VM's folder; Remove-VM deletes it
//! with the folder.

use super::jobs::state_text;
use super::{wait_exit, Manager};
use crate::error::ApiError;
use crate::worker;
use api::{Heartbeat, Job, Vm, VmState};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The saved state's name in the VM's folder.
const SAVED_STATE: &str = "vm.saved";
/// How long a worker may take to end after it has saved.
const SAVED_EXIT_TIMEOUT: Duration = Duration::from_secs(30);

impl Manager {
    /// Where a VM's saved state lives.
    pub(super) fn saved_state(&self, id: &str) -> PathBuf {
        self.folder(id).join(SAVED_STATE)
    }

    /// Save-VM: the VM goes Saving at once and the answer is the job; the worker writes the
    /// saved state and ends, and the VM is Saved. A save that fails before the worker stopped
    /// the VM leaves it as it was.
    pub async fn save(self: &Arc<Self>, name: &str) -> Result<Job, ApiError> {
        let (guard, row) = self.locked(name).await?;
        let id = row.id.clone();
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
        let this = self.clone();
        self.run_job(
            "save",
            &row.clone(),
            "Saving",
            guard,
            move |progress| async move {
                let path = this.saved_state(&id);
                let _ = std::fs::remove_file(&path);
                let command = format!("save {}", path.display());
                // The worker reports each percent once.
                let report = |pct: u8| progress.set(pct, &format!("Saving: {pct} %"));
                let result = worker::control_with_progress(&socket, &command, report).await;
                match result {
                    Ok(_) => {
                        // The worker ends once it has answered; its watcher records Saved.
                        if !wait_exit(&mut exit, SAVED_EXIT_TIMEOUT).await {
                            this.turn_off(&id, "Saved; the worker did not end, so it was killed")
                                .await;
                        }
                        match this.find_id(&id, &row.name) {
                            Ok(r) if r.state == VmState::Saved => Ok(state_text(&r)),
                            Ok(r) => {
                                Err(format!("the VM is {} after saving: {}", r.state, r.status))
                            }
                            Err(e) => Err(e.to_string()),
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
                        Err(e)
                    }
                }
            },
        )
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
