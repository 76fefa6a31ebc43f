//! The HTTP routes: thin handlers over the manager.

use crate::error::ApiError;
use crate::extract::{Json, Name, Query, BODY_LIMIT};
use crate::manager::{Manager, DEFAULT_STOP_TIMEOUT};
use api::{Job, NewToken, NewVm, ServiceInfo, StopParams, TokenCreated, TokenInfo, Vm, VmPatch};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::Stream;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

mod devices;
mod jobs;
mod switches;

type S = State<Arc<Manager>>;
type R<T> = Result<T, ApiError>;

pub fn router(m: Arc<Manager>) -> Router {
    Router::new()
        .route("/vms", get(list).post(create))
        .route("/vms/{name}", get(one).patch(patch).delete(remove))
        .route("/vms/{name}/start", post(start))
        .route("/vms/{name}/stop", post(stop))
        .route("/vms/{name}/restart", post(restart))
        .route("/vms/{name}/pause", post(pause))
        .route("/vms/{name}/resume", post(resume))
        .merge(devices::router())
        .merge(switches::router())
        .merge(jobs::router())
        .route("/tokens", get(tokens).post(new_token))
        .route("/tokens/{name}", axum::routing::delete(revoke_token))
        .route("/service", get(service))
        .route("/service/stop-vms", post(stop_vms))
        .route("/events", get(events))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(m)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        "no such resource; GET /openapi.json lists them",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this resource does not take that method; GET /openapi.json lists them",
    )
}

fn sized<T>(v: T) -> axum::Json<T> {
    axum::Json(v)
}

async fn list(State(m): S) -> R<axum::Json<Vec<Vm>>> {
    m.list().await.map(sized)
}

async fn create(State(m): S, Json(req): Json<NewVm>) -> R<impl IntoResponse> {
    let vm = m.create(req).await?;
    Ok((StatusCode::CREATED, axum::Json(vm)))
}

async fn one(State(m): S, Name(name): Name) -> R<axum::Json<Vm>> {
    m.get(&name).await.map(sized)
}

async fn patch(State(m): S, Name(name): Name, Json(p): Json<VmPatch>) -> R<axum::Json<Vm>> {
    m.patch(&name, p).await.map(sized)
}

async fn remove(State(m): S, Name(name): Name) -> R<StatusCode> {
    m.delete(&name).await.map(|()| StatusCode::NO_CONTENT)
}

async fn start(State(m): S, Name(name): Name) -> R<Accepted> {
    m.start_job(&name).await.map(accepted)
}

/// A job's answer: 202 with the job.
type Accepted = (StatusCode, axum::Json<Job>);

fn accepted(job: Job) -> Accepted {
    (StatusCode::ACCEPTED, axum::Json(job))
}

fn stop_params(p: &StopParams) -> R<(bool, u64)> {
    let timeout = p.timeout.unwrap_or(DEFAULT_STOP_TIMEOUT);
    if timeout > 3600 {
        return Err(ApiError::invalid(format!(
            "timeout: {timeout} s is too long; use at most 3600"
        )));
    }
    Ok((p.turn_off.unwrap_or(false), timeout))
}

async fn stop(State(m): S, Name(name): Name, Query(p): Query<StopParams>) -> R<Accepted> {
    let (turn_off, timeout) = stop_params(&p)?;
    m.stop_job(&name, turn_off, timeout, false)
        .await
        .map(accepted)
}

async fn restart(State(m): S, Name(name): Name, Query(p): Query<StopParams>) -> R<Accepted> {
    let (turn_off, timeout) = stop_params(&p)?;
    m.stop_job(&name, turn_off, timeout, true)
        .await
        .map(accepted)
}

async fn pause(State(m): S, Name(name): Name) -> R<axum::Json<Vm>> {
    m.pause(&name, false).await.map(sized)
}

async fn resume(State(m): S, Name(name): Name) -> R<axum::Json<Vm>> {
    m.pause(&name, true).await.map(sized)
}

async fn tokens(State(m): S) -> R<axum::Json<Vec<TokenInfo>>> {
    m.tokens().map(sized)
}

async fn new_token(
    State(m): S,
    Json(req): Json<NewToken>,
) -> R<(StatusCode, axum::Json<TokenCreated>)> {
    let t = m.create_token(&req.name)?;
    Ok((StatusCode::CREATED, axum::Json(t)))
}

async fn revoke_token(State(m): S, Name(name): Name) -> R<StatusCode> {
    m.revoke_token(&name).map(|()| StatusCode::NO_CONTENT)
}

async fn service(State(m): S) -> R<axum::Json<ServiceInfo>> {
    let (defined, running) = m.counts()?;
    Ok(axum::Json(ServiceInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        uptime_secs: m.started.elapsed().as_secs(),
        state_dir: m.state_dir.to_string_lossy().into_owned(),
        socket: m.socket.to_string_lossy().into_owned(),
        worker: m.worker.to_string_lossy().into_owned(),
        vms_defined: defined,
        vms_running: running,
        cgroups: m.cgroups.describe(),
        host_cpus: crate::host::cpus(),
        host_memory_bytes: crate::host::memory(),
    }))
}

async fn stop_vms(State(m): S) -> R<axum::Json<Vec<Vm>>> {
    m.stop_all().await.map(sized)
}

async fn events(State(m): S) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    let rx = m.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(ev) => Event::default()
                .event("state")
                .data(serde_json::to_string(&ev).unwrap_or_default()),
            // A slow reader missed events; it should re-read the VMs.
            Err(RecvError::Lagged(n)) => Event::default().event("lagged").data(n.to_string()),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        api::openapi::document_json(),
    )
}
