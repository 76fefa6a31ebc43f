//! API errors and their HTTP form, the envelope `{"error": {"code", "message", "causes"}}`.

use api::ErrorBody;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answer.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub causes: Vec<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            causes: Vec::new(),
        }
    }

    pub fn with_cause(mut self, cause: impl std::fmt::Display) -> Self {
        self.causes.push(cause.to_string());
        self
    }

    pub fn not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("there is no VM called '{name}' (`viridian vm list` shows them)"),
        )
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn wrong_state(name: &str, state: api::VmState, wanted: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "wrong_state",
            format!("VM '{name}' is {state}; {wanted}"),
        )
    }

    /// 422: a field's value is wrong; `message` starts with the field's name.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 500: a fault of the host or the service, never of the request.
    pub fn internal(what: &str, cause: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what}; the service log (journalctl -u viridiand) has details"),
        )
        .with_cause(cause)
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        tracing::error!("database: {e}");
        Self::internal("the inventory database failed", e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = ErrorBody::new(self.code, self.message);
        body.error.causes = self.causes;
        (self.status, axum::Json(body)).into_response()
    }
}
