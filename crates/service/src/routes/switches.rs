//! Routes of the host's virtual switches.

use super::{sized, R, S};
use crate::extract::{Json, Name, Query};
use crate::manager::Manager;
use api::{NewSwitch, Switch, SwitchRemoveParams};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

pub fn router() -> Router<Arc<Manager>> {
    Router::new()
        .route("/switches", get(list).post(create))
        .route("/switches/{name}", get(one).delete(remove))
}

async fn list(State(m): S) -> R<axum::Json<Vec<Switch>>> {
    m.switches().await.map(sized)
}

async fn create(State(m): S, Json(req): Json<NewSwitch>) -> R<impl IntoResponse> {
    let s = m.create_switch(req).await?;
    Ok((StatusCode::CREATED, axum::Json(s)))
}

async fn one(State(m): S, Name(name): Name) -> R<axum::Json<Switch>> {
    m.switch(&name).await.map(sized)
}

async fn remove(
    State(m): S,
    Name(name): Name,
    Query(p): Query<SwitchRemoveParams>,
) -> R<StatusCode> {
    m.remove_switch(&name, p.force.unwrap_or(false))
        .await
        .map(|()| StatusCode::NO_CONTENT)
}
