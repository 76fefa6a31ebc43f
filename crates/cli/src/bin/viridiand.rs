//! `viridiand`, the management service. Its code is the `service` crate (crates/service);
//! the binary is built in this package so that the CLI's integration tests can start it.
#![forbid(unsafe_code)]

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "viridiand",
    version,
    about = "Viridian's management service: VM inventory, workers and the REST API"
)]
struct Args {
    /// Where the inventory database and the VMs' folders live.
    #[arg(long, default_value = "/var/lib/viridian")]
    state_dir: PathBuf,
    /// The Unix socket of the API.
    #[arg(long, default_value = api::client::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Also serve the API over TLS on this TCP address; callers need a bearer token
    /// (`viridian token new NAME`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// The TLS certificate (PEM) for --listen (default: STATE_DIR/tls/cert.pem, made
    /// self-signed on first start).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The `viridian` binary that runs each VM (default: $VIRIDIAN_WORKER, else the one next
    /// to viridiand).
    #[arg(long)]
    worker: Option<PathBuf>,
    /// The cgroup v2 mount under which `viridian.slice` is made.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIRIDIAN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let result = service::run(service::Config {
        state_dir: args.state_dir,
        socket: args.socket,
        listen: args.listen,
        worker: args.worker,
        cgroup_root: args.cgroup_root,
        tls: args.tls_cert.zip(args.tls_key),
    });
    if let Err(e) = result {
        eprintln!("viridiand: {e}");
        std::process::exit(1);
    }
}
