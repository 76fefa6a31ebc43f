//! `viridiand`, Viridian's management service (the role of Hyper-V's VMMS): the VM inventory in
//! SQLite under the state directory, one worker process (`viridian run`) per running VM, and
//! the REST API on a Unix socket. The binary's `main` lives in the `cli` package
//! (`crates/cli/src/bin/viridiand.rs`) so that the CLI's integration tests can run it.
#![forbid(unsafe_code)]

mod auth;
mod cgroup;
mod db;
mod devices;
mod error;
mod extract;
mod host;
mod manager;
mod routes;
mod server;
mod tls;
mod token;
mod validate;
mod worker;

pub use error::ApiError;
pub use server::{run, Config, StartupError};
