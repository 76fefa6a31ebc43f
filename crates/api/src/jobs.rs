//! Long operations (Save-VM) run as jobs: the request answers 202 with the job at once, and
//! `/jobs/{id}` shows its progress until it has completed or failed.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum JobState {
    Running,
    Completed,
    Failed,
}

/// A long operation and its progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// Its id, for `GET /jobs/{id}`.
    pub id: String,
    /// What it does: `save`.
    pub operation: String,
    /// The VM it works on.
    pub vm: String,
    pub state: JobState,
    /// 0 to 100.
    pub percent: u8,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
}
