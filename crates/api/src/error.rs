//! The error envelope every non-2xx answer carries: `{"error": {"code", "message", "causes"}}`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What went wrong, as the body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// One error: a stable machine-readable `code`, a `message` for people that says what to do
/// next, and the underlying `causes`, outermost first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable identifier, e.g. `not_found`, `conflict`, `invalid_field`, `malformed_json`.
    pub code: String,
    /// What happened and what to do about it.
    pub message: String,
    /// Underlying causes, outermost first (may be empty).
    #[serde(default)]
    pub causes: Vec<String>,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
                causes: Vec::new(),
            },
        }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error.message)?;
        for c in &self.error.causes {
            write!(f, ": {c}")?;
        }
        Ok(())
    }
}
