//! Long operations as jobs (Start-VM, Stop-VM, Restart-VM, Save-VM): each is a row of the
//! inventory's `jobs` table from the moment the request is accepted, so `GET /jobs/{id}`
//! outlives the service. The work runs in a task holding the VM's lock; the request answers
//! 202 with the job at once.

use super::{now_ms, Manager};
use crate::db::VmRow;
use crate::error::ApiError;
use api::{Job, JobState, VmState};
use std::future::Future;
use std::sync::Arc;

/// What a job's work ends with: the VM's state and status then, or why it failed.
pub(super) type Outcome = Result<String, String>;

/// One running job's handle for its work: reports progress. A step of a longer job (the
/// stop and the start of a restart) reports its own 0 to 100 into its share of the job's.
#[derive(Clone)]
pub(super) struct Progress {
    manager: Arc<Manager>,
    id: String,
    /// The job's percent where this step starts, and how many percent it spans.
    base: u8,
    span: u8,
}

impl Progress {
    /// The same job, from `base` percent on, over `span` percent.
    fn step(&self, base: u8, span: u8) -> Self {
        Self {
            base,
            span,
            ..self.clone()
        }
    }

    /// Sets the job's percent (below 100 until it completes) and what it is doing.
    pub fn set(&self, percent: u8, doing: &str) {
        let scaled =
            u32::from(self.base) + u32::from(percent.min(100)) * u32::from(self.span) / 100;
        let percent = scaled.min(99) as u8;
        if let Err(e) = self
            .manager
            .db()
            .update_job_progress(&self.id, percent, doing)
        {
            support::limited!(
                JOB_LOG,
                warn,
                "job {}: cannot record its progress: {e}",
                self.id
            );
        }
    }
}

static JOB_LOG: support::RateLimit = support::RateLimit::guest();

/// A job's answer for the VM's state and status: `Running (Operating normally)`, or just
/// `Saved` when the status says no more.
pub(super) fn state_text(row: &VmRow) -> String {
    describe(row.state, &row.status)
}

fn describe(state: VmState, status: &str) -> String {
    if status == state.as_str() {
        status.to_string()
    } else {
        format!("{state} ({status})")
    }
}

/// A job's outcome from the VM it leaves.
fn outcome(r: Result<api::Vm, ApiError>) -> Outcome {
    match r {
        Ok(vm) => Ok(describe(vm.state, &vm.status)),
        Err(e) => Err(failure(&e)),
    }
}

/// An error's message with its causes, for a failed job.
pub(super) fn failure(e: &ApiError) -> String {
    let mut text = e.message.clone();
    for c in &e.causes {
        text.push_str("; ");
        text.push_str(c);
    }
    text
}

impl Manager {
    /// Records a job on `row` and runs `work` for it in a task that holds `guard` (the VM's
    /// lock) until it ends. Returns the job as it starts.
    pub(super) fn run_job<F, W>(
        self: &Arc<Self>,
        operation: &str,
        row: &VmRow,
        doing: &str,
        guard: tokio::sync::OwnedMutexGuard<()>,
        work: W,
    ) -> Result<Job, ApiError>
    where
        W: FnOnce(Progress) -> F,
        F: Future<Output = Outcome> + Send + 'static,
    {
        let job = Job {
            id: uuid::Uuid::new_v4().to_string(),
            operation: operation.into(),
            vm: row.name.clone(),
            state: JobState::Running,
            percent: 0,
            progress: doing.into(),
            error: None,
            started_ms: now_ms(),
            finished_ms: None,
        };
        self.db().insert_job(&job, &row.id)?;
        let progress = Progress {
            manager: self.clone(),
            id: job.id.clone(),
            base: 0,
            span: 100,
        };
        let fut = work(progress);
        let (this, mut done) = (self.clone(), job.clone());
        tokio::spawn(async move {
            let outcome = fut.await;
            drop(guard);
            done.finished_ms = Some(now_ms());
            match outcome {
                Ok(text) => {
                    done.state = JobState::Completed;
                    done.percent = 100;
                    done.progress = text;
                }
                Err(e) => {
                    done.state = JobState::Failed;
                    done.progress = "Failed".into();
                    done.error = Some(e);
                }
            }
            // The progress so far is in the database; the end replaces it.
            if let Err(e) = this.db().finish_job(&done) {
                tracing::error!("job {} ({}): cannot record its end: {e}", done.id, done.vm);
            }
        });
        Ok(job)
    }

    /// Start-VM as a job: the state and boot files are checked first (409), then the job
    /// goes from `Starting the worker` to the VM's state once Running.
    pub async fn start_job(self: &Arc<Self>, name: &str) -> Result<Job, ApiError> {
        let (guard, row) = self.locked(name).await?;
        let restore = self.startable(&row)?;
        let this = self.clone();
        self.run_job(
            "start",
            &row.clone(),
            "Starting the worker",
            guard,
            move |p| async move { outcome(this.start_checked(&row, restore, Some(&p)).await) },
        )
    }

    /// Stop-VM as a job: 409 unless the VM runs; the job counts the shutdown timeout down
    /// and completes when the VM is Off. With `restart` (Restart-VM) the stop is the first
    /// half of the job and a start the second, and the job is refused (409) at once when the
    /// VM's boot files are gone.
    pub async fn stop_job(
        self: &Arc<Self>,
        name: &str,
        turn_off: bool,
        timeout: u64,
        restart: bool,
    ) -> Result<Job, ApiError> {
        let (guard, row) = self.locked(name).await?;
        let running = self.stoppable(&row)?;
        if restart {
            self.boot_files_exist(&row)?;
        }
        let this = self.clone();
        let kind = if restart { "restart" } else { "stop" };
        self.run_job(kind, &row.clone(), "Stopping", guard, move |p| async move {
            let work = async {
                let stopping = if restart { p.step(0, 50) } else { p.clone() };
                let off = this
                    .stop_checked(&row, running, turn_off, timeout, Some(&stopping))
                    .await?;
                if !restart {
                    return Ok(off);
                }
                let row = this.find_id(&row.id, &row.name)?;
                let restore = this.startable(&row)?;
                let starting = p.step(50, 50);
                starting.set(0, "Starting the worker");
                this.start_checked(&row, restore, Some(&starting)).await
            };
            outcome(work.await)
        })
    }

    /// `GET /jobs`: newest first.
    pub fn list_jobs(&self) -> Result<Vec<Job>, ApiError> {
        Ok(self.db().jobs()?)
    }

    /// `GET /jobs/{id}`.
    pub fn job(&self, id: &str) -> Result<Job, ApiError> {
        self.db().job(id)?.ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no job '{}'; `GET /jobs` lists them",
                    id.chars().take(64).collect::<String>()
                ),
            )
        })
    }

    /// At start-up, after the workers were adopted: the jobs an earlier service left
    /// Running end. One whose work got done anyway (the VM was saved, is running a worker
    /// started for it, or is off) is Completed; the rest Failed.
    pub(super) fn end_orphaned_jobs(&self) -> Result<(), ApiError> {
        let jobs = self.db().running_jobs()?;
        for (mut job, vm_id) in jobs {
            let row = self.db().by_id(&vm_id)?;
            let done = row.as_ref().is_some_and(|r| work_done(&job, r));
            job.finished_ms = Some(now_ms());
            if let (true, Some(r)) = (done, &row) {
                job.state = JobState::Completed;
                job.percent = 100;
                job.progress = state_text(r);
            } else {
                job.state = JobState::Failed;
                job.progress = "Failed".into();
                job.error = Some(format!(
                    "the service stopped while the job ran{}",
                    row.map(|r| format!("; VM '{}' is {}", r.name, state_text(&r)))
                        .unwrap_or_default()
                ));
            }
            tracing::info!(
                "job {} ({} {}): {:?}",
                job.id,
                job.operation,
                job.vm,
                job.state
            );
            self.db().finish_job(&job)?;
        }
        Ok(())
    }
}

/// Whether a job's work was done although its service stopped (its VM as found now).
fn work_done(job: &Job, vm: &VmRow) -> bool {
    let started_since = vm.started_at.is_some_and(|t| t >= job.started_ms);
    match job.operation.as_str() {
        // The saved state is renamed into place only once complete.
        "save" => vm.state == VmState::Saved,
        "start" | "restart" => vm.state == VmState::Running && started_since,
        "stop" => vm.state == VmState::Off,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Cgroups;
    use crate::db::Db;
    use std::time::Duration;

    /// A manager on a temporary state directory, with one VM defined.
    fn manager(dir: &std::path::Path) -> (Arc<Manager>, VmRow) {
        let db = Db::open(&dir.join("inventory.db")).unwrap();
        let m = Manager::new(
            db,
            dir.to_path_buf(),
            dir.join("no-worker"),
            Cgroups::probe(&dir.join("no-cgroup")),
            dir.join("d.sock"),
        );
        let row = crate::db::tests::row("vm");
        m.db().insert(&row).unwrap();
        (m, row)
    }

    /// Runs a stop-like job waiting up to 3 s for a worker that ends after `ends_after` (or
    /// never); the job's (percent, progress) as it went, and how it ended.
    async fn shutdown_job(ends_after: Option<Duration>) -> (Vec<(u8, String)>, Job) {
        let dir = tempfile::tempdir().unwrap();
        let (m, row) = manager(dir.path());
        let (tx, mut exit) = tokio::sync::watch::channel(None);
        if let Some(after) = ends_after {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(Some("the guest powered off".to_string()));
            });
        } else {
            std::mem::forget(tx);
        }
        let guard = m.lock_for(&row.id).lock_owned().await;
        let job = m
            .run_job("stop", &row, "Stopping", guard, move |p| async move {
                match super::super::wait_shutdown(&mut exit, 3, Some(&p)).await {
                    true => Ok("Off (the guest powered off)".into()),
                    false => Err("the guest did not shut down".into()),
                }
            })
            .unwrap();
        assert_eq!(
            (job.state, job.progress.as_str()),
            (JobState::Running, "Stopping")
        );
        let mut seen: Vec<(u8, String)> = Vec::new();
        let end = loop {
            let j = m.job(&job.id).unwrap();
            if j.state != JobState::Running {
                break j;
            }
            if seen.last() != Some(&(j.percent, j.progress.clone())) {
                seen.push((j.percent, j.progress));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (seen, end)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_job_counts_the_shutdown_timeout_down() {
        let (seen, end) = shutdown_job(None).await;
        let texts: Vec<&str> = seen.iter().map(|(_, t)| t.as_str()).collect();
        for left in ["3 s left", "2 s left", "1 s left"] {
            assert!(
                texts.contains(&format!("Waiting for the guest to shut down: {left}").as_str()),
                "{seen:?}"
            );
        }
        assert!(
            seen.windows(2).all(|w| w[0].0 <= w[1].0),
            "the percent rises: {seen:?}"
        );
        assert_eq!(end.state, JobState::Failed);
        assert_eq!(end.error.as_deref(), Some("the guest did not shut down"));
        assert!(end.percent < 100 && end.finished_ms.is_some(), "{end:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_reports_into_its_share_of_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let (m, row) = manager(dir.path());
        let guard = m.lock_for(&row.id).lock_owned().await;
        let (tx, rx) = tokio::sync::oneshot::channel::<Progress>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let job = m
            .run_job("restart", &row, "Stopping", guard, move |p| async move {
                let _ = tx.send(p);
                let _ = done_rx.await;
                Ok("Running (Operating normally)".into())
            })
            .unwrap();
        let p = rx.await.unwrap();
        let percent = |m: &Manager| m.job(&job.id).unwrap().percent;
        p.step(0, 50).set(100, "stopped");
        assert_eq!(percent(&m), 50);
        p.step(50, 50).set(10, "building");
        assert_eq!(percent(&m), 55);
        p.step(50, 50).set(100, "almost");
        assert_eq!(percent(&m), 99, "100 only once completed");
        done_tx.send(()).unwrap();
        while m.job(&job.id).unwrap().state == JobState::Running {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(percent(&m), 100);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_job_completes_when_the_worker_ends() {
        let (_, end) = shutdown_job(Some(Duration::from_millis(1200))).await;
        assert_eq!(
            (end.state, end.percent, end.progress.as_str()),
            (JobState::Completed, 100, "Off (the guest powered off)")
        );
        let took = end.finished_ms.unwrap() - end.started_ms;
        assert!((1100..2900).contains(&took), "{took} ms");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_left_running_end_as_their_vm_says() {
        let dir = tempfile::tempdir().unwrap();
        let (m, row) = manager(dir.path());
        let job = |operation: &str| Job {
            id: format!("{operation}-job"),
            operation: operation.into(),
            vm: "vm".into(),
            state: JobState::Running,
            percent: 10,
            progress: "working".into(),
            error: None,
            started_ms: 1000,
            finished_ms: None,
        };
        for op in ["save", "start", "stop", "restart"] {
            m.db().insert_job(&job(op), &row.id).unwrap();
        }
        // The VM is Off now: the stop got done; the rest did not.
        m.end_orphaned_jobs().unwrap();
        let state = |id: &str| m.job(id).unwrap();
        assert_eq!(state("stop-job").state, JobState::Completed);
        assert_eq!(state("stop-job").progress, "Off ()");
        for id in ["save-job", "start-job", "restart-job"] {
            let j = state(id);
            assert_eq!(j.state, JobState::Failed, "{j:?}");
            assert_eq!(
                j.error.as_deref(),
                Some("the service stopped while the job ran; VM 'vm' is Off ()")
            );
        }
        // Running on a worker started after the job began: the start got done; one started
        // before it did not.
        for (started_at, done) in [(2000, true), (500, false)] {
            let mut j = job("start");
            j.id = format!("start-{started_at}");
            m.db().insert_job(&j, &row.id).unwrap();
            m.db()
                .update_runtime(
                    &row.id,
                    VmState::Running,
                    "Operating normally",
                    Some((1, "/s", started_at)),
                )
                .unwrap();
            m.end_orphaned_jobs().unwrap();
            let got = state(&j.id);
            assert_eq!(got.state == JobState::Completed, done, "{got:?}");
        }
    }
}
