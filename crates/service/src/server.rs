//! Start-up: directories, the single-instance lock, the database, adoption of running
//! workers, the socket, and serving until SIGTERM or SIGINT. Stopping the service leaves the
//! VMs running; the next service adopts them.

use crate::auth::{self, Peer};
use crate::cgroup::Cgroups;
use crate::db::Db;
use crate::manager::Manager;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What `viridiand` was told.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub listen: Option<SocketAddr>,
    /// The `viridian` binary for workers (default: `$VIRIDIAN_WORKER`, else next to this
    /// executable).
    pub worker: Option<PathBuf>,
    /// The cgroup v2 mount.
    pub cgroup_root: PathBuf,
    /// Certificate and key (PEM) for `listen`; made on first start when not given.
    pub tls: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot create {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("another viridiand is using {0}; stop it first")]
    Locked(PathBuf),
    #[error("cannot open the inventory {0}: {1}")]
    Db(PathBuf, crate::db::DbError),
    #[error("another viridiand is listening on {0}")]
    SocketInUse(PathBuf),
    #[error("cannot listen on {0}: {1}")]
    Bind(PathBuf, std::io::Error),
    #[error("no worker binary at {0}; give --worker PATH or set VIRIDIAN_WORKER to the `viridian` binary")]
    NoWorker(PathBuf),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn worker_path(cfg: &Config) -> Result<PathBuf, StartupError> {
    let path = match (&cfg.worker, std::env::var_os("VIRIDIAN_WORKER")) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => std::env::current_exe()?.with_file_name("viridian"),
    };
    if !path.is_file() {
        return Err(StartupError::NoWorker(path));
    }
    Ok(path)
}

fn mkdir(p: &Path) -> Result<(), StartupError> {
    std::fs::create_dir_all(p).map_err(|e| StartupError::Dir(p.to_path_buf(), e))
}

/// How long to wait for the state directory's lock. A service killed while it was starting
/// a worker leaves the lock (and its listening socket) with the forked child until that
/// child executes the worker a moment later.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn take_lock(lock: &std::fs::File) -> rustix::io::Result<()> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match rustix::fs::flock(lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Runs the service until SIGTERM or SIGINT.
pub fn run(cfg: Config) -> Result<(), StartupError> {
    let worker = worker_path(&cfg)?;
    mkdir(&cfg.state_dir)?;
    mkdir(&cfg.state_dir.join("vms"))?;
    mkdir(&cfg.state_dir.join("run"))?;
    let lock_path = cfg.state_dir.join("viridiand.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StartupError::Dir(lock_path.clone(), e))?;
    take_lock(&lock).map_err(|_| StartupError::Locked(cfg.state_dir.clone()))?;
    let db_path = cfg.state_dir.join("inventory.db");
    let db = Db::open(&db_path).map_err(|e| StartupError::Db(db_path.clone(), e))?;
    let cgroups = Cgroups::probe(&cfg.cgroup_root);
    match &cgroups {
        Cgroups::Enabled(p) => tracing::info!("cgroups: workers go under {}", p.display()),
        Cgroups::Disabled(why) => tracing::warn!("cgroups: {why}; workers run without limits"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(serve(cfg, worker, db, cgroups));
    drop(lock);
    result
}

async fn serve(cfg: Config, worker: PathBuf, db: Db, cgroups: Cgroups) -> Result<(), StartupError> {
    let manager = Manager::new(
        db,
        cfg.state_dir.clone(),
        worker,
        cgroups,
        cfg.socket.clone(),
    );
    // Bridges before VMs: automatic starts need their switches.
    manager.apply_switches().await;
    if let Err(e) = manager.recover_inventory().await {
        tracing::error!("recovering the inventory: {e}");
    }
    if let Some(dir) = cfg.socket.parent() {
        mkdir(dir)?;
    }
    let app =
        crate::routes::router(manager.clone()).layer(axum::middleware::from_fn(auth::authorise));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    if let Some(addr) = cfg.listen {
        let (cert, key) = crate::tls::cert_paths(&cfg.state_dir, cfg.tls.clone())?;
        let tls = crate::tls::server_config(&cert, &key)?;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| StartupError::Listen(addr, e))?;
        tracing::info!(
            "viridiand listening on https://{addr} (certificate {})",
            cert.display()
        );
        let listener = crate::tls::TlsListener::new(tcp, tokio_rustls::TlsAcceptor::from(tls))?;
        let remote = crate::routes::router(manager.clone()).layer(
            axum::middleware::from_fn_with_state(manager.clone(), auth::bearer),
        );
        let done = stopped();
        tokio::spawn(async move {
            let _ = axum::serve(listener, remote.into_make_service())
                .with_graceful_shutdown(done)
                .await;
        });
    }
    // The Unix socket last: once it answers, everything else is up.
    if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
        return Err(StartupError::SocketInUse(cfg.socket.clone()));
    }
    let _ = std::fs::remove_file(&cfg.socket);
    let listener = tokio::net::UnixListener::bind(&cfg.socket)
        .map_err(|e| StartupError::Bind(cfg.socket.clone(), e))?;
    // Anyone may connect; each request is authorised by the caller's credentials.
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o666))?;
    tracing::info!("viridiand listening on {}", cfg.socket.display());
    tokio::spawn(async move {
        signal().await;
        let _ = stop_tx.send(true);
    });
    let served = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(stopped())
        .await;
    let _ = std::fs::remove_file(&cfg.socket);
    tracing::info!(
        "viridiand stopped; running VMs keep running and the next viridiand adopts them"
    );
    served.map_err(StartupError::Io)
}

async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
