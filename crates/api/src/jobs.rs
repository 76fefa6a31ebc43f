//! Long operations (Start-VM, Stop-VM, Restart-VM, Save-VM) run as jobs: the request answers
//! 202 with the job at once, and `/jobs/{id}` shows its progress until it has completed or
//! failed. The service keeps jobs in its inventory, so they outlive a restart of it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum JobState {
    Running,
    Completed,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "Running",
            JobState::Completed => "Completed",
            JobState::Failed => "Failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [JobState::Running, JobState::Completed, JobState::Failed]
            .into_iter()
            .find(|j| j.as_str() == s)
    }
}

/// A long operation and its progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// Its id, for `GET /jobs/{id}`.
    pub id: String,
    /// What it does: `start`, `stop`, `restart` or `save`.
    pub operation: String,
    /// The VM it works on.
    pub vm: String,
    pub state: JobState,
    /// 0 to 100.
    pub percent: u8,
    /// What it is doing now (e.g. `Waiting for the guest to shut down: 25 s left`); once
    /// Completed, the VM's state and status then, e.g. `Running (Operating normally)`.
    #[serde(default)]
    pub progress: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
}
