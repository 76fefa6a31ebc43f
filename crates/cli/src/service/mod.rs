//! The CLI's side of the management service: a client on the service's socket
//! (`viridian --socket PATH`, or `VIRIDIAN_SOCKET`, or /run/viridian/viridiand.sock), and the
//! verbs that use it.

pub mod job;
mod remote;
pub mod table;
pub mod token;
pub mod vm;

use anyhow::Context;
use api::client::{Client, DEFAULT_SOCKET};
use clap::Subcommand;
use std::path::PathBuf;
use std::sync::OnceLock;

static SOCKET: OnceLock<Option<PathBuf>> = OnceLock::new();
static HOST: OnceLock<(Option<String>, Option<PathBuf>)> = OnceLock::new();

/// Records `--socket`, `--host` and `--ca-cert` from the command line.
pub fn set_target(socket: Option<PathBuf>, host: Option<String>, ca_cert: Option<PathBuf>) {
    let _ = SOCKET.set(socket);
    let _ = HOST.set((host, ca_cert));
}

/// The remote service named with --host or VIRIDIAN_HOST, and its certificate.
fn remote_host() -> Option<(String, Option<PathBuf>)> {
    let (host, ca) = HOST.get().cloned().unwrap_or_default();
    let host = host.or_else(|| {
        std::env::var("VIRIDIAN_HOST")
            .ok()
            .filter(|h| !h.is_empty())
    })?;
    let ca = ca.or_else(|| std::env::var_os("VIRIDIAN_CA_CERT").map(PathBuf::from));
    Some((host, ca))
}

/// The socket given with --socket or VIRIDIAN_SOCKET, if any.
fn explicit_socket() -> Option<PathBuf> {
    SOCKET
        .get()
        .cloned()
        .flatten()
        .or_else(|| std::env::var_os("VIRIDIAN_SOCKET").map(PathBuf::from))
}

/// The client for the service: remote over TLS with `--host`, else the Unix socket. A remote
/// host that cannot be set up (bad URL, unreadable certificate) ends the command.
pub fn client() -> Client {
    if let Some((host, ca)) = remote_host() {
        match remote::client(&host, ca.as_deref()) {
            Ok(c) => return c,
            Err(e) => {
                eprintln!("viridian: --host {host}: {e:#}");
                std::process::exit(1);
            }
        }
    }
    Client::new(explicit_socket().unwrap_or_else(|| DEFAULT_SOCKET.into()))
}

/// The client when a service answers there; `None` means "no service: fall back to the
/// control sockets". A socket named explicitly must answer.
pub fn client_if_up() -> anyhow::Result<Option<Client>> {
    let c = client();
    if c.reachable() {
        Ok(Some(c))
    } else if explicit_socket().is_some() || remote_host().is_some() {
        // Let the request itself report why.
        Ok(Some(c))
    } else {
        Ok(None)
    }
}

/// Percent-encodes a path segment.
pub fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One request; a non-2xx answer becomes an error with the service's message. Returns the
/// status code and the JSON body (Null when empty).
pub fn call(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let bytes = body.map(|b| serde_json::to_vec(b).expect("JSON serialises"));
    let r = c
        .request(method, path, bytes.as_deref())
        .map_err(anyhow::Error::msg)?;
    if (200..300).contains(&r.status) {
        let v = if r.body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&r.body).context("viridiand sent malformed JSON")?
        };
        return Ok((r.status, v));
    }
    match r.error() {
        Some(e) => Err(ServiceError {
            status: r.status,
            message: e.to_string(),
        }
        .into()),
        None => anyhow::bail!("viridiand answered {}: {}", r.status, r.text()),
    }
}

/// An error answer from the service.
#[derive(Debug)]
pub struct ServiceError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ServiceError {}

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Show the service: version, state directory, VM counts, cgroups.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Stop every running VM as its AutomaticStopAction says (for host shutdown).
    StopVms,
}

pub fn main(cmd: ServiceCommand) -> anyhow::Result<i32> {
    match cmd {
        ServiceCommand::Status { json } => {
            let (_, v) = call(&client(), "GET", "/service", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let info: api::ServiceInfo = serde_json::from_value(v)?;
                table::service(&info);
            }
            Ok(0)
        }
        ServiceCommand::StopVms => {
            let (_, v) = call(&client(), "POST", "/service/stop-vms", None)?;
            for vm in serde_json::from_value::<Vec<api::Vm>>(v)? {
                println!("{}: {} ({})", vm.name, vm.state, vm.status);
            }
            Ok(0)
        }
    }
}
