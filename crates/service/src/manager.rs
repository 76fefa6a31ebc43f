//! The VM manager: inventory operations and the lifecycle of each VM's worker.
//!
//! Locks: one async lock per VM serialises its operations (start, stop, patch, remove); the
//! database and the worker table sit behind short synchronous locks never held across an
//! await.

use crate::cgroup::Cgroups;
use crate::db::{Db, VmRow};
use crate::error::ApiError;
use crate::{validate, worker};
use api::{Heartbeat, NewVm, Recovery, Vm, VmEvent, VmPatch, VmState};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, watch};

/// How long a worker may take to build its VM and open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker may take to exit after `turn-off` before it is killed.
const TURN_OFF_TIMEOUT: Duration = Duration::from_secs(10);
/// Default wait for a guest shutdown before turning the VM off.
pub const DEFAULT_STOP_TIMEOUT: u64 = 30;
/// Recovery restarts allowed per minute.
const RESTARTS_PER_MINUTE: usize = 3;

mod drives;
mod jobs;
mod saving;
mod switches;

use jobs::Progress;

pub struct Manager {
    db: Mutex<Db>,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub worker: PathBuf,
    pub cgroups: Cgroups,
    pub socket: PathBuf,
    pub started: Instant,
    pub events: broadcast::Sender<VmEvent>,
    workers: Mutex<HashMap<String, Worker>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    restarts: Mutex<HashMap<String, Vec<Instant>>>,
}

/// A running worker.
struct Worker {
    pid: u32,
    socket: PathBuf,
    started_ms: u64,
    pidfd: Arc<OwnedFd>,
    /// Becomes `Some(reason)` when the worker has exited and its VM is Off.
    exit: watch::Receiver<Option<String>>,
    /// Set when the service itself stops the worker: the status to show afterwards.
    stop_reason: Option<String>,
    /// Whether the VM reached Running (recovery applies only then).
    ready: bool,
    cpu_sample: Option<(Instant, u64)>,
    cpu_percent: f64,
    /// Asked to save (Save-VM): ending with status 0 and a saved state means Saved.
    saving: bool,
    /// Started from a saved state (removed once Running).
    restoring: bool,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Manager {
    pub fn new(
        db: Db,
        state_dir: PathBuf,
        worker: PathBuf,
        cgroups: Cgroups,
        socket: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Self {
            db: Mutex::new(db),
            run_dir: state_dir.join("run"),
            state_dir,
            worker,
            cgroups,
            socket,
            started: Instant::now(),
            events: broadcast::channel(1024).0,
            workers: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            restarts: Mutex::new(HashMap::new()),
        })
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    fn folder(&self, id: &str) -> PathBuf {
        self.vms_dir().join(id)
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn find(&self, name: &str) -> Result<VmRow, ApiError> {
        self.db()
            .by_name(name)?
            .ok_or_else(|| ApiError::not_found(name))
    }

    fn find_id(&self, id: &str, name: &str) -> Result<VmRow, ApiError> {
        self.db()
            .by_id(id)?
            .ok_or_else(|| ApiError::not_found(name))
    }

    /// The VM named `name` as it is once its lock is held (the guard goes with the job that
    /// changes it).
    async fn locked(
        &self,
        name: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, VmRow), ApiError> {
        let id = self.find(name)?.id;
        let guard = self.lock_for(&id).lock_owned().await;
        Ok((guard, self.find_id(&id, name)?))
    }

    fn emit(&self, row: &VmRow, state: VmState, status: &str) {
        tracing::info!("VM '{}' is {state}: {status}", row.name);
        let _ = self.events.send(VmEvent {
            name: row.name.clone(),
            id: row.id.clone(),
            state,
            status: status.to_string(),
            time_ms: now_ms(),
        });
    }

    fn set_state(&self, row: &VmRow, state: VmState, status: &str) -> Result<(), ApiError> {
        self.db().update_state(&row.id, state, status)?;
        self.emit(row, state, status);
        Ok(())
    }

    /// The API view of a row, with live figures from its worker.
    fn view(&self, row: &VmRow, heartbeat: Heartbeat) -> Vm {
        let mut workers = self.workers.lock().unwrap();
        let w = workers.get_mut(&row.id);
        let (pid, uptime, cpu) = match w {
            Some(w) => {
                let now = Instant::now();
                if let Some(ticks) = crate::host::cpu_ticks(w.pid) {
                    let ncpu = f64::from(crate::host::cpus());
                    match w.cpu_sample {
                        Some((t, old)) if now.duration_since(t) >= Duration::from_millis(500) => {
                            let secs = now.duration_since(t).as_secs_f64();
                            let used = ticks.saturating_sub(old) as f64
                                / crate::host::TICKS_PER_SEC as f64;
                            w.cpu_percent = (used / secs / ncpu * 100.0).clamp(0.0, 100.0);
                            w.cpu_sample = Some((now, ticks));
                        }
                        Some(_) => {}
                        None => {
                            let secs =
                                (now_ms().saturating_sub(w.started_ms) as f64 / 1000.0).max(0.001);
                            let used = ticks as f64 / crate::host::TICKS_PER_SEC as f64;
                            w.cpu_percent = (used / secs / ncpu * 100.0).clamp(0.0, 100.0);
                            w.cpu_sample = Some((now, ticks));
                        }
                    }
                }
                let cpu = (w.cpu_percent * 10.0).round() / 10.0;
                (
                    Some(w.pid),
                    now_ms().saturating_sub(w.started_ms) / 1000,
                    cpu,
                )
            }
            None => (None, 0, 0.0),
        };
        let s = &row.settings;
        Vm {
            name: row.name.clone(),
            id: row.id.clone(),
            state: row.state,
            status: row.status.clone(),
            heartbeat,
            cpus: s.cpus,
            memory_bytes: s.memory,
            kernel: s.kernel.clone(),
            initrd: s.initrd.clone(),
            cmdline: s.cmdline.clone(),
            hyperv: s.hyperv,
            cpu_limit: s.cpu_limit,
            cpu_reserve: s.cpu_reserve,
            cpu_weight: s.cpu_weight,
            auto_start: s.auto_start,
            auto_stop: s.auto_stop,
            recovery: s.recovery,
            folder: self.folder(&row.id).to_string_lossy().into_owned(),
            pid,
            uptime_secs: uptime,
            cpu_usage_percent: cpu,
            memory_assigned_bytes: if pid.is_some() { s.memory } else { 0 },
            created_at: row.created_at / 1000,
            disks: s.disks.clone(),
            dvds: s.dvds.clone(),
            nics: s.nics.clone(),
        }
    }

    async fn heartbeat(&self, row: &VmRow) -> Heartbeat {
        if row.state != VmState::Running {
            return Heartbeat::NoContact;
        }
        let socket = match self.workers.lock().unwrap().get(&row.id) {
            Some(w) => w.socket.clone(),
            None => return Heartbeat::NoContact,
        };
        match worker::control(&socket, "status", Duration::from_secs(1)).await {
            Ok(s) => worker::heartbeat(&s),
            Err(_) => Heartbeat::NoContact,
        }
    }

    pub async fn get(&self, name: &str) -> Result<Vm, ApiError> {
        let row = self.find(name)?;
        let hb = self.heartbeat(&row).await;
        Ok(self.view(&row, hb))
    }

    pub async fn list(&self) -> Result<Vec<Vm>, ApiError> {
        let rows = self.db().all()?;
        // At most 32 control connections at a time (file descriptors).
        let mut beats = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(32) {
            beats.extend(
                futures_util::future::join_all(chunk.iter().map(|r| self.heartbeat(r))).await,
            );
        }
        Ok(rows
            .iter()
            .zip(beats)
            .map(|(r, hb)| self.view(r, hb))
            .collect())
    }

    pub fn counts(&self) -> Result<(u64, u64), ApiError> {
        let rows = self.db().all()?;
        let running = rows.iter().filter(|r| r.state.has_worker()).count();
        Ok((rows.len() as u64, running as u64))
    }

    /// New-VM: the folder first, then the row in one transaction; a crash between the two
    /// leaves a folder without a row, which the next start removes.
    pub async fn create(&self, req: NewVm) -> Result<Vm, ApiError> {
        let mut settings = validate::new_vm(&req)?;
        if self.db().by_name(&req.name)?.is_some() {
            return Err(duplicate(&req.name));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let folder = self.folder(&id);
        std::fs::create_dir_all(&folder)
            .map_err(|e| ApiError::internal("cannot create the VM's folder", e))?;
        let mut created = Vec::new();
        if let Err(e) = self.new_vm_devices(&req, &id, &folder, &mut settings, &mut created) {
            for f in &created {
                let _ = std::fs::remove_file(f);
            }
            let _ = std::fs::remove_dir_all(&folder);
            return Err(e);
        }
        let row = VmRow {
            id,
            name: req.name.clone(),
            settings,
            state: VmState::Off,
            status: "Defined".into(),
            pid: None,
            control_socket: None,
            started_at: None,
            created_at: now_ms(),
        };
        if let Err(e) = self.db().insert(&row) {
            for f in &created {
                let _ = std::fs::remove_file(f);
            }
            let _ = std::fs::remove_dir_all(&folder);
            return Err(if is_unique_violation(&e) {
                duplicate(&req.name)
            } else {
                e.into()
            });
        }
        tracing::info!("defined VM '{}' ({})", row.name, row.id);
        self.emit(&row, VmState::Off, "Defined");
        Ok(self.view(&row, Heartbeat::NoContact))
    }

    pub async fn patch(&self, name: &str, p: VmPatch) -> Result<Vm, ApiError> {
        let id = self.find(name)?.id;
        let lock = self.lock_for(&id);
        let _g = lock.lock().await;
        let row = self.find_id(&id, name)?;
        if let Some(field) = validate::needs_off(&p) {
            if row.state != VmState::Off {
                return Err(ApiError::wrong_state(
                    &row.name,
                    row.state,
                    &format!(
                        "{field} changes only while it is Off (`viridian vm stop {}` first)",
                        row.name
                    ),
                ));
            }
        }
        let settings = validate::patch(&row.settings, &p)?;
        let new_name = p.name.clone().unwrap_or_else(|| row.name.clone());
        if new_name != row.name && self.db().by_name(&new_name)?.is_some() {
            return Err(duplicate(&new_name));
        }
        if let Err(e) = self.db().update_settings(&id, &new_name, &settings) {
            return Err(if is_unique_violation(&e) {
                duplicate(&new_name)
            } else {
                e.into()
            });
        }
        if row.state.has_worker() {
            self.cgroups.update(&id, &settings);
        }
        let row = self.find_id(&id, name)?;
        let hb = self.heartbeat(&row).await;
        Ok(self.view(&row, hb))
    }

    /// Remove-VM: the row goes in one transaction, then the folder.
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        let id = self.find(name)?.id;
        let lock = self.lock_for(&id);
        let _g = lock.lock().await;
        let row = self.find_id(&id, name)?;
        if row.state.has_worker() {
            return Err(ApiError::wrong_state(
                &row.name,
                row.state,
                &format!("stop it first (`viridian vm stop {}`)", row.name),
            ));
        }
        self.db().delete(&id)?;
        let _ = std::fs::remove_dir_all(self.folder(&id));
        self.locks.lock().unwrap().remove(&id);
        tracing::info!("removed VM '{}' ({id})", row.name);
        self.emit(&row, VmState::Off, "Removed");
        Ok(())
    }

    /// Start-VM (recovery restarts, automatic starts). Answers once the worker's control
    /// socket is up (Running), or the worker has ended (Off; an error unless the guest simply
    /// powered off).
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<Vm, ApiError> {
        let id = self.find(name)?.id;
        let lock = self.lock_for(&id);
        let _g = lock.lock().await;
        let row = self.find_id(&id, name)?;
        let restore = self.startable(&row)?;
        self.start_checked(&row, restore, None).await
    }

    /// Whether `row` may start now (Off or Saved, its boot files there); for a Saved VM, the
    /// saved state to restore.
    fn startable(&self, row: &VmRow) -> Result<Option<PathBuf>, ApiError> {
        if row.state != VmState::Off && row.state != VmState::Saved {
            return Err(ApiError::wrong_state(
                &row.name,
                row.state,
                "start needs it Off",
            ));
        }
        let restore = (row.state == VmState::Saved).then(|| self.saved_state(&row.id));
        if restore.is_none() {
            self.boot_files_exist(row)?;
        }
        Ok(restore)
    }

    /// 409 when the kernel or initrd a boot needs is gone.
    fn boot_files_exist(&self, row: &VmRow) -> Result<(), ApiError> {
        let s = &row.settings;
        for (field, path) in [("kernel", Some(&s.kernel)), ("initrd", s.initrd.as_ref())] {
            if let Some(p) = path {
                if !Path::new(p).is_file() {
                    return Err(ApiError::conflict(format!(
                        "{field} '{p}' no longer exists; set another with `viridian vm set {} --{field} PATH`",
                        row.name
                    )));
                }
            }
        }
        Ok(())
    }

    /// Starts the worker of `row`, which [`Self::startable`] allowed, under the VM's lock.
    async fn start_checked(
        self: &Arc<Self>,
        row: &VmRow,
        restore: Option<PathBuf>,
        progress: Option<&Progress>,
    ) -> Result<Vm, ApiError> {
        let (id, name, s) = (row.id.as_str(), row.name.as_str(), &row.settings);
        let folder = self.folder(id);
        let socket = self.run_dir.join(format!("{id}.sock"));
        let _ = std::fs::create_dir_all(&folder);
        self.set_state(row, VmState::Starting, "Starting the worker")?;
        let paths = worker::Paths {
            worker: &self.worker,
            run_dir: &self.run_dir,
            state_dir: &self.state_dir,
            folder: &folder,
            socket: &socket,
        };
        let spawned = worker::spawn(&paths, &row.name, s, restore.as_deref()).and_then(|child| {
            let fd = worker::pidfd(child.id());
            fd.map(|fd| (child, fd))
        });
        let (child, pidfd) = match spawned {
            Ok(x) => x,
            Err(e) => {
                let msg = format!("cannot start the worker {}: {e}", self.worker.display());
                self.db().update_runtime(id, VmState::Off, &msg, None)?;
                self.emit(row, VmState::Off, &msg);
                return Err(ApiError::internal("cannot start the worker", msg));
            }
        };
        let pid = child.id();
        let started = now_ms();
        self.db().update_runtime(
            id,
            VmState::Starting,
            "Starting the worker",
            Some((pid, &socket.to_string_lossy(), started)),
        )?;
        self.cgroups.attach(id, pid, s);
        let mut exit = self.watch(id, pid, socket.clone(), started, pidfd, Some(child));
        if restore.is_some() {
            if let Some(w) = self.workers.lock().unwrap().get_mut(id) {
                w.restoring = true;
            }
        }
        tracing::info!("VM '{}': worker {pid} started", row.name);
        note(
            progress,
            10,
            if restore.is_some() {
                "Restoring the saved state"
            } else {
                "Building the VM"
            },
        );

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(reason) = exit.borrow().clone() {
                let row = self.find_id(id, name)?;
                return if reason == "the guest powered off" {
                    Ok(self.view(&row, Heartbeat::NoContact))
                } else {
                    Err(ApiError::new(
                        axum::http::StatusCode::CONFLICT,
                        "start_failed",
                        format!("VM '{}' did not start: {reason}", row.name),
                    )
                    .with_cause(format!(
                        "the worker's log: {}",
                        folder.join("worker.log").display()
                    )))
                };
            }
            if worker::ready(&socket).await {
                break;
            }
            if Instant::now() > deadline {
                self.turn_off(id, "the worker did not get ready within 60 s; turned off")
                    .await;
                let row = self.find_id(id, name)?;
                return Err(ApiError::conflict(format!(
                    "VM '{}' did not start: {}",
                    row.name, row.status
                )));
            }
            let _ = tokio::time::timeout(Duration::from_millis(2), exit.changed()).await;
        }
        {
            let mut workers = self.workers.lock().unwrap();
            if let Some(w) = workers.get_mut(id) {
                w.ready = true;
            }
        }
        if let Some(file) = &restore {
            // Restored: the saved state is used up, as Hyper-V's is.
            let _ = std::fs::remove_file(file);
        }
        // The worker may end right after getting ready; its watcher then wrote Off already.
        if exit.borrow().is_none() {
            self.set_state(row, VmState::Running, "Operating normally")?;
            self.apply_links(row).await;
        }
        let row = self.find_id(id, name)?;
        Ok(self.view(&row, Heartbeat::NoContact))
    }

    /// Records a worker and watches its pidfd; returns the receiver that reports its end.
    fn watch(
        self: &Arc<Self>,
        id: &str,
        pid: u32,
        socket: PathBuf,
        started_ms: u64,
        pidfd: OwnedFd,
        child: Option<std::process::Child>,
    ) -> watch::Receiver<Option<String>> {
        let (tx, rx) = watch::channel(None);
        let pidfd = Arc::new(pidfd);
        self.workers.lock().unwrap().insert(
            id.to_string(),
            Worker {
                pid,
                socket,
                started_ms,
                pidfd: pidfd.clone(),
                exit: rx.clone(),
                stop_reason: None,
                ready: child.is_none(),
                cpu_sample: None,
                cpu_percent: 0.0,
                saving: false,
                restoring: false,
            },
        );
        let this = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let fd = match pidfd.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::error!("cannot watch worker {pid}: {e}");
                    return;
                }
            };
            if let Err(e) = worker::exited(fd).await {
                tracing::error!("cannot watch worker {pid}: {e}");
                return;
            }
            let status = child.and_then(|mut c| c.wait().ok());
            this.worker_exited(&id, status, tx).await;
        });
        rx
    }

    /// A worker ended: its VM goes Off with the reason, and may be restarted.
    async fn worker_exited(
        self: &Arc<Self>,
        id: &str,
        status: Option<std::process::ExitStatus>,
        tx: watch::Sender<Option<String>>,
    ) {
        let w = self.workers.lock().unwrap().remove(id);
        let log = self.folder(id).join("worker.log");
        let (described, clean) = worker::describe(status, &log);
        let requested = w.as_ref().and_then(|w| w.stop_reason.clone());
        let reason = requested.clone().unwrap_or(described);
        if let Some(w) = &w {
            let _ = std::fs::remove_file(&w.socket);
        }
        self.cgroups.remove(id);
        let row = match self.db().by_id(id) {
            Ok(Some(r)) => r,
            _ => {
                let _ = tx.send(Some(reason));
                return;
            }
        };
        let (state, reason) = self.state_after_exit(
            id,
            w.as_ref().is_some_and(|w| w.saving),
            w.as_ref().is_some_and(|w| w.restoring && !w.ready),
            status.and_then(|s| s.code()),
            &reason,
        );
        if let Err(e) = self.db().update_runtime(id, state, &reason, None) {
            tracing::error!("cannot record that VM '{}' is {state}: {e}", row.name);
        }
        self.emit(&row, state, &reason);
        let _ = tx.send(Some(reason.clone()));
        let was_ready = w.as_ref().is_some_and(|w| w.ready);
        if state == VmState::Off
            && requested.is_none()
            && !clean
            && was_ready
            && row.settings.recovery == Recovery::Restart
        {
            self.recover(row);
        }
    }

    fn recover(self: &Arc<Self>, row: VmRow) {
        let now = Instant::now();
        let allowed = {
            let mut r = self.restarts.lock().unwrap();
            let times = r.entry(row.id.clone()).or_default();
            times.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
            if times.len() >= RESTARTS_PER_MINUTE {
                false
            } else {
                times.push(now);
                true
            }
        };
        if !allowed {
            let msg = format!(
                "{}; not restarted: {RESTARTS_PER_MINUTE} recovery restarts in the last minute",
                row.status
            );
            let _ = self.db().update_state(&row.id, VmState::Off, &msg);
            self.emit(&row, VmState::Off, &msg);
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            tracing::info!("VM '{}': recovery restart", row.name);
            if let Err(e) = this.start(&row.name).await {
                tracing::warn!("VM '{}': recovery restart failed: {e}", row.name);
            }
        });
    }

    /// Turns a worker off (`turn-off`, then SIGKILL) and waits until it has ended.
    async fn turn_off(&self, id: &str, reason: &str) {
        let (socket, pidfd, mut exit) = {
            let mut workers = self.workers.lock().unwrap();
            let Some(w) = workers.get_mut(id) else { return };
            w.stop_reason = Some(reason.to_string());
            (w.socket.clone(), w.pidfd.clone(), w.exit.clone())
        };
        let _ = worker::control(&socket, "turn-off", Duration::from_secs(2)).await;
        if !wait_exit(&mut exit, TURN_OFF_TIMEOUT).await {
            tracing::warn!("worker did not turn off within {TURN_OFF_TIMEOUT:?}; killing it");
            worker::kill(&pidfd);
            wait_exit(&mut exit, TURN_OFF_TIMEOUT).await;
        }
    }

    /// Stop-VM: the guest's shutdown service within `timeout`, else (or with `turn_off`) a
    /// turn-off. Answers when the VM is Off.
    pub async fn stop(&self, name: &str, turn_off: bool, timeout: u64) -> Result<Vm, ApiError> {
        let id = self.find(name)?.id;
        let lock = self.lock_for(&id);
        let _g = lock.lock().await;
        let row = self.find_id(&id, name)?;
        let running = self.stoppable(&row)?;
        self.stop_checked(&row, running, turn_off, timeout, None)
            .await
    }

    /// The control socket and exit watch of `row`'s worker; 409 unless it has one.
    fn stoppable(&self, row: &VmRow) -> Result<RunningWorker, ApiError> {
        let socket = self
            .workers
            .lock()
            .unwrap()
            .get(&row.id)
            .map(|w| (w.socket.clone(), w.exit.clone()));
        socket
            .filter(|_| row.state.has_worker())
            .ok_or_else(|| ApiError::wrong_state(&row.name, row.state, "it is not running"))
    }

    /// Stops the worker of `row`, which [`Self::stoppable`] found, under the VM's lock.
    async fn stop_checked(
        &self,
        row: &VmRow,
        (socket, mut exit): RunningWorker,
        turn_off: bool,
        timeout: u64,
        progress: Option<&Progress>,
    ) -> Result<Vm, ApiError> {
        let id = row.id.as_str();
        if row.state == VmState::Paused && !turn_off {
            // A paused guest cannot answer its shutdown service: let it run first.
            let _ = worker::control(&socket, "resume", Duration::from_secs(15)).await;
        }
        if turn_off {
            self.set_state(row, VmState::Stopping, "Turning off")?;
            note(progress, 50, "Turning off");
            self.turn_off(id, "Turned off").await;
        } else {
            self.set_state(
                row,
                VmState::Stopping,
                "Shutting down through the guest's shutdown service",
            )?;
            if let Some(w) = self.workers.lock().unwrap().get_mut(id) {
                w.stop_reason = Some("Shut down by the guest's shutdown service".into());
            }
            match worker::control(&socket, "shutdown", Duration::from_secs(5)).await {
                Ok(_) => {
                    if !wait_shutdown(&mut exit, timeout, progress).await {
                        note(progress, 95, "Turning off");
                        self.turn_off(
                            id,
                            &format!("The guest did not shut down within {timeout} s; turned off"),
                        )
                        .await;
                    }
                }
                Err(e) => {
                    note(progress, 50, "Turning off: the guest could not shut down");
                    self.turn_off(
                        id,
                        &format!("Turned off: the guest could not shut down ({e})"),
                    )
                    .await;
                }
            }
        }
        let row = self.find_id(id, &row.name)?;
        Ok(self.view(&row, Heartbeat::NoContact))
    }

    /// Suspend-VM and Resume-VM: the worker parks its vCPUs (the guest stays in memory) or
    /// lets them run again.
    pub async fn pause(&self, name: &str, resume: bool) -> Result<Vm, ApiError> {
        let id = self.find(name)?.id;
        let lock = self.lock_for(&id);
        let _g = lock.lock().await;
        let row = self.find_id(&id, name)?;
        let (verb, from, to, status) = if resume {
            ("resume", VmState::Paused, VmState::Running, "Running")
        } else {
            ("pause", VmState::Running, VmState::Paused, "Paused")
        };
        if row.state != from {
            return Err(ApiError::wrong_state(
                &row.name,
                row.state,
                if resume {
                    "resume needs it Paused"
                } else {
                    "pause needs it Running"
                },
            ));
        }
        let socket = self
            .workers
            .lock()
            .unwrap()
            .get(&id)
            .map(|w| w.socket.clone());
        let Some(socket) = socket else {
            return Err(ApiError::wrong_state(
                &row.name,
                row.state,
                "its worker is gone",
            ));
        };
        if let Err(e) = worker::control(&socket, verb, Duration::from_secs(15)).await {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "worker_refused",
                format!("the worker of {} could not {verb} it: {e}", row.name),
            ));
        }
        self.set_state(&row, to, status)?;
        let row = self.find_id(&id, name)?;
        Ok(self.view(&row, Heartbeat::NoContact))
    }

    /// At start-up: adopt the workers that still run, mark the rest Off, remove folders
    /// without a VM, then apply each VM's automatic start action.
    pub async fn recover_inventory(self: &Arc<Self>) -> Result<(), ApiError> {
        let rows = self.db().all()?;
        let mut was_running = Vec::new();
        for row in &rows {
            if !row.state.has_worker() && row.pid.is_none() {
                continue;
            }
            let adopted = match (row.pid, row.control_socket.as_deref()) {
                (Some(pid), Some(socket)) => self.adopt(row, pid, Path::new(socket)),
                // The service died between starting the worker and recording it.
                _ => {
                    let socket = self.run_dir.join(format!("{}.sock", row.id));
                    match crate::host::find_worker(&socket) {
                        Some(pid) => self.adopt(row, pid, &socket),
                        None => false,
                    }
                }
            };
            if !adopted {
                let msg = match row.pid {
                    Some(pid) => {
                        format!("The worker (pid {pid}) ended while the service was not running")
                    }
                    None => "The service stopped while the VM was starting".to_string(),
                };
                let (state, msg) =
                    self.state_after_exit(&row.id, row.state == VmState::Saving, false, None, &msg);
                self.db().update_runtime(&row.id, state, &msg, None)?;
                self.emit(row, state, &msg);
                if state == VmState::Off {
                    was_running.push(row.id.clone());
                }
            }
        }
        self.end_orphaned_jobs()?;
        self.remove_orphan_folders(&rows);
        for row in rows {
            use api::AutoStart;
            let start = match row.settings.auto_start {
                AutoStart::Nothing => false,
                AutoStart::Start => true,
                AutoStart::StartIfRunning => was_running.contains(&row.id),
            };
            if start && !self.workers.lock().unwrap().contains_key(&row.id) {
                tracing::info!("VM '{}': automatic start", row.name);
                if let Err(e) = self.start(&row.name).await {
                    tracing::warn!("VM '{}': automatic start failed: {e}", row.name);
                }
            }
        }
        Ok(())
    }

    /// Takes over a worker from an earlier service, if `pid` still is that worker.
    fn adopt(self: &Arc<Self>, row: &VmRow, pid: u32, socket: &Path) -> bool {
        // The pidfd first, then the check: the pidfd then refers to the process checked.
        let Ok(fd) = worker::pidfd(pid) else {
            return false;
        };
        if !crate::host::is_worker(pid, socket) {
            return false;
        }
        let started = row.started_at.unwrap_or_else(now_ms);
        self.watch(&row.id, pid, socket.to_path_buf(), started, fd, None);
        let status = "Operating normally (adopted after a service restart)";
        let _ = self.db().update_runtime(
            &row.id,
            VmState::Running,
            status,
            Some((pid, &socket.to_string_lossy(), started)),
        );
        self.emit(row, VmState::Running, status);
        tracing::info!("VM '{}': adopted worker {pid}", row.name);
        true
    }

    fn remove_orphan_folders(&self, rows: &[VmRow]) {
        let Ok(entries) = std::fs::read_dir(self.vms_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !rows.iter().any(|r| r.id == name) {
                tracing::info!(
                    "removing {}: no VM has it (a create or remove was cut short)",
                    e.path().display()
                );
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

async fn wait_exit(exit: &mut watch::Receiver<Option<String>>, limit: Duration) -> bool {
    tokio::time::timeout(limit, exit.wait_for(|r| r.is_some()))
        .await
        .is_ok()
}

/// Waits up to `timeout` seconds for a guest to shut down, counting the time left down in
/// the job's progress; whether the worker ended.
async fn wait_shutdown(
    exit: &mut watch::Receiver<Option<String>>,
    timeout: u64,
    progress: Option<&Progress>,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        let done = timeout.saturating_sub(secs) * 90 / timeout.max(1);
        note(
            progress,
            done as u8,
            &format!("Waiting for the guest to shut down: {secs} s left"),
        );
        let step = left.min(Duration::from_secs(1));
        if wait_exit(exit, step).await {
            return true;
        }
        if step == left {
            return false;
        }
    }
}

/// Reports a step of a job, if the operation runs as one.
fn note(progress: Option<&Progress>, percent: u8, doing: &str) {
    if let Some(p) = progress {
        p.set(percent, doing);
    }
}

/// A worker's control socket and the watch that reports its end.
type RunningWorker = (PathBuf, watch::Receiver<Option<String>>);

fn duplicate(name: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::CONFLICT,
        "duplicate_name",
        format!("a VM called '{name}' exists already; pick another name"),
    )
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

/// API tokens.
impl Manager {
    pub fn create_token(&self, name: &str) -> Result<api::TokenCreated, ApiError> {
        validate::name(name)?;
        let token = crate::token::generate()
            .map_err(|_| ApiError::internal("the system's random source failed", "ring"))?;
        let created_at = now_ms() / 1000;
        if !self
            .db()
            .add_token(name, &crate::token::hash(&token), created_at)?
        {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "duplicate_name",
                format!("a token called '{name}' exists already; revoke it (`viridian token revoke {name}`) or pick another name"),
            ));
        }
        tracing::info!("made API token '{name}'");
        Ok(api::TokenCreated {
            name: name.to_string(),
            token,
            created_at,
        })
    }

    pub fn tokens(&self) -> Result<Vec<api::TokenInfo>, ApiError> {
        Ok(self
            .db()
            .tokens()?
            .into_iter()
            .map(|(name, created_at)| api::TokenInfo { name, created_at })
            .collect())
    }

    pub fn revoke_token(&self, name: &str) -> Result<(), ApiError> {
        if !self.db().revoke_token(name)? {
            return Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                format!("there is no token called '{name}' (`viridian token list` shows them)"),
            ));
        }
        tracing::info!("revoked API token '{name}'");
        Ok(())
    }

    pub fn token_valid(&self, token: &str) -> bool {
        self.db()
            .token_hash_known(&crate::token::hash(token))
            .unwrap_or(false)
    }
}

/// AutomaticStopAction.
impl Manager {
    /// Stops every running VM as its `auto_stop` says (ShutDown within the default timeout,
    /// then TurnOff; or TurnOff), all at once; answers when they are off.
    pub async fn stop_all(&self) -> Result<Vec<Vm>, ApiError> {
        let rows = self.db().all()?;
        let running: Vec<VmRow> = rows.into_iter().filter(|r| r.state.has_worker()).collect();
        let stops = running.iter().map(|r| {
            let turn_off = r.settings.auto_stop == api::AutoStop::TurnOff;
            self.stop(&r.name, turn_off, DEFAULT_STOP_TIMEOUT)
        });
        let results = futures_util::future::join_all(stops).await;
        let mut out = Vec::new();
        for (row, r) in running.iter().zip(results) {
            match r {
                Ok(vm) => out.push(vm),
                // It ended by itself meanwhile.
                Err(e) if e.code == "wrong_state" => {}
                Err(e) => tracing::warn!("VM '{}': automatic stop: {e}", row.name),
            }
        }
        Ok(out)
    }
}
