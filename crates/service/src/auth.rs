//! Who may use the Unix socket: root, and members of the `viridian` group, by the peer's
//! credentials (SO_PEERCRED).

use crate::error::ApiError;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use tokio::net::UnixListener;

/// The group whose members may manage VMs.
pub const GROUP: &str = "viridian";

/// The credentials of the process at the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(c) => Peer {
                uid: Some(c.uid()),
                gid: Some(c.gid()),
                pid: c.pid(),
            },
            Err(e) => {
                tracing::warn!("cannot read the caller's credentials: {e}");
                Peer {
                    uid: None,
                    gid: None,
                    pid: None,
                }
            }
        }
    }
}

/// Whether the peer may use the API, or why not.
pub fn check(peer: &Peer) -> Result<(), String> {
    let Some(uid) = peer.uid else {
        return Err("the caller's credentials cannot be read".into());
    };
    if uid == 0 {
        return Ok(());
    }
    let user = crate::host::user_name(uid);
    if let Some((gid, members)) = crate::host::group(GROUP) {
        let in_group = peer.gid == Some(gid)
            || user.as_ref().is_some_and(|u| members.contains(u))
            || peer
                .pid
                .and_then(|p| u32::try_from(p).ok())
                .is_some_and(|p| crate::host::groups(p).contains(&gid));
        if in_group {
            return Ok(());
        }
    }
    let who = user.unwrap_or_else(|| format!("uid {uid}"));
    Err(format!(
        "{who} is neither root nor in the '{GROUP}' group; add it with `usermod -aG {GROUP} {who}` (and log in again)"
    ))
}

/// Middleware that answers 403 to callers who may not use the API.
pub async fn authorise(ConnectInfo(peer): ConnectInfo<Peer>, req: Request, next: Next) -> Response {
    match check(&peer) {
        Ok(()) => next.run(req).await,
        Err(why) => ApiError::forbidden(why).into_response(),
    }
}

/// Middleware for TCP: a valid bearer token, else 401.
pub async fn bearer(
    State(m): State<std::sync::Arc<crate::manager::Manager>>,
    req: Request,
    next: Next,
) -> Response {
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let message = match token {
        Some(t) if m.token_valid(t) => return next.run(req).await,
        Some(_) => "the bearer token is not valid (revoked, or never made here); make one with `viridian token new NAME` on the host",
        None => "give a token as `Authorization: Bearer TOKEN` (VIRIDIAN_TOKEN for the CLI); make one with `viridian token new NAME` on the host",
    };
    let mut r = ApiError::new(
        axum::http::StatusCode::UNAUTHORIZED,
        "unauthorized",
        message,
    )
    .into_response();
    r.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    r
}
