//! Routes of Save-VM, Remove-VMSavedState and the jobs.

use super::{sized, R, S};
use crate::extract::Name;
use crate::manager::Manager;
use api::{Job, Vm};
use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

pub fn router() -> Router<Arc<Manager>> {
    Router::new()
        .route("/vms/{name}/save", post(save))
        .route("/vms/{name}/discard-saved-state", post(discard))
        .route("/jobs", get(list))
        .route("/jobs/{id}", get(one))
}

async fn save(State(m): S, Name(name): Name) -> R<super::Accepted> {
    m.save(&name).await.map(super::accepted)
}

async fn discard(State(m): S, Name(name): Name) -> R<axum::Json<Vm>> {
    m.discard_saved_state(&name).await.map(sized)
}

async fn list(State(m): S) -> R<axum::Json<Vec<Job>>> {
    m.list_jobs().map(sized)
}

async fn one(State(m): S, Name(id): Name) -> R<axum::Json<Job>> {
    m.job(&id).map(sized)
}
