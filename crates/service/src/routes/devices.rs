//! Routes of a VM's drives and network adapters.

use super::{sized, R, S};
use crate::error::ApiError;
use crate::extract::{Json, Name};
use crate::manager::Manager;
use api::{
    DvdDrive, DvdMedia, HardDisk, NetworkAdapter, NewDvdDrive, NewHardDisk, NewNetworkAdapter,
};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use axum::Router;
use std::sync::Arc;

pub fn router() -> Router<Arc<Manager>> {
    Router::new()
        .route("/vms/{name}/disks", get(disks).post(add_disk))
        .route(
            "/vms/{name}/disks/{controller}/{location}",
            delete(remove_disk),
        )
        .route("/vms/{name}/dvds", get(dvds).post(add_dvd))
        .route(
            "/vms/{name}/dvds/{controller}/{location}",
            axum::routing::put(set_dvd).delete(remove_dvd),
        )
        .route("/vms/{name}/nics", get(nics).post(add_nic))
        .route("/vms/{name}/nics/{mac}", delete(remove_nic).patch(set_nic))
        .route("/vms/{name}/measure", get(measure))
        .route("/vms/{name}/integration", get(integration))
        .route(
            "/vms/{name}/integration/{service}",
            axum::routing::put(set_integration),
        )
}

/// `{name}/.../{controller}/{location}` in a path.
struct Place(String, u8, u8);

fn bad_path(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_path", message)
}

impl<T: Send + Sync> FromRequestParts<T> for Place {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &T) -> Result<Self, ApiError> {
        let axum::extract::Path((name, c, l)) =
            axum::extract::Path::<(String, String, String)>::from_request_parts(parts, state)
                .await
                .map_err(|e| bad_path(e.body_text()))?;
        let number = |what: &str, v: &str, max: u8| {
            v.parse::<u8>().ok().filter(|n| *n < max).ok_or_else(|| {
                bad_path(format!(
                    "{what}: '{v}' is not a number from 0 to {}",
                    max - 1
                ))
            })
        };
        Ok(Place(
            name,
            number("controller", &c, api::MAX_CONTROLLERS)?,
            number("location", &l, api::MAX_LOCATIONS)?,
        ))
    }
}

/// `{name}/.../{second}` in a path (a MAC, a service).
struct NameAnd(String, String);

impl<T: Send + Sync> FromRequestParts<T> for NameAnd {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &T) -> Result<Self, ApiError> {
        let axum::extract::Path((name, mac)) =
            axum::extract::Path::<(String, String)>::from_request_parts(parts, state)
                .await
                .map_err(|e| bad_path(e.body_text()))?;
        Ok(NameAnd(name, mac))
    }
}

async fn disks(State(m): S, Name(name): Name) -> R<axum::Json<Vec<HardDisk>>> {
    m.disks(&name).map(sized)
}

async fn add_disk(
    State(m): S,
    Name(name): Name,
    Json(req): Json<NewHardDisk>,
) -> R<impl IntoResponse> {
    let disk = m.add_disk(&name, req).await?;
    Ok((StatusCode::CREATED, axum::Json(disk)))
}

async fn remove_disk(State(m): S, Place(name, c, l): Place) -> R<axum::Json<HardDisk>> {
    m.remove_disk(&name, c, l).await.map(sized)
}

async fn dvds(State(m): S, Name(name): Name) -> R<axum::Json<Vec<DvdDrive>>> {
    m.dvds(&name).map(sized)
}

async fn add_dvd(
    State(m): S,
    Name(name): Name,
    Json(req): Json<NewDvdDrive>,
) -> R<impl IntoResponse> {
    let dvd = m.add_dvd(&name, req).await?;
    Ok((StatusCode::CREATED, axum::Json(dvd)))
}

async fn set_dvd(
    State(m): S,
    Place(name, c, l): Place,
    Json(req): Json<DvdMedia>,
) -> R<axum::Json<DvdDrive>> {
    m.set_dvd_media(&name, c, l, req.path).await.map(sized)
}

async fn remove_dvd(State(m): S, Place(name, c, l): Place) -> R<axum::Json<DvdDrive>> {
    m.remove_dvd(&name, c, l).await.map(sized)
}

async fn measure(State(m): S, Name(name): Name) -> R<axum::Json<api::VmMeasure>> {
    m.measure(&name).await.map(sized)
}

async fn integration(State(m): S, Name(name): Name) -> R<axum::Json<Vec<api::IntegrationService>>> {
    m.integration(&name).await.map(sized)
}

async fn set_integration(
    State(m): S,
    NameAnd(name, service): NameAnd,
    Json(req): Json<api::IntegrationChange>,
) -> R<axum::Json<Vec<api::IntegrationService>>> {
    m.set_integration(&name, &service, req.enabled)
        .await
        .map(sized)
}

async fn nics(State(m): S, Name(name): Name) -> R<axum::Json<Vec<api::NetworkAdapterStatus>>> {
    m.nics(&name).await.map(sized)
}

async fn add_nic(
    State(m): S,
    Name(name): Name,
    Json(req): Json<NewNetworkAdapter>,
) -> R<impl IntoResponse> {
    let nic = m.add_nic(&name, req).await?;
    Ok((StatusCode::CREATED, axum::Json(nic)))
}

async fn remove_nic(State(m): S, NameAnd(name, mac): NameAnd) -> R<axum::Json<NetworkAdapter>> {
    m.remove_nic(&name, &mac).await.map(sized)
}

async fn set_nic(
    State(m): S,
    NameAnd(name, mac): NameAnd,
    Json(req): Json<api::NetworkAdapterPatch>,
) -> R<axum::Json<NetworkAdapter>> {
    m.set_nic(&name, &mac, req).await.map(sized)
}
