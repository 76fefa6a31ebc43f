//! The inventory: SQLite in WAL mode under the state directory, with migrations numbered by
//! `PRAGMA user_version`. Every write is one transaction, so a crash leaves each VM defined
//! or not.

use api::{AutoStart, AutoStop, Job, JobState, Recovery, VmState};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Schema steps; entry N brings user_version from N to N+1. Never edit a released step: add
/// one.
const MIGRATIONS: &[&str] = &[
    // 1: VMs.
    "CREATE TABLE vms (
        id TEXT PRIMARY KEY NOT NULL,
        name TEXT NOT NULL UNIQUE,
        config TEXT NOT NULL,
        state TEXT NOT NULL,
        status TEXT NOT NULL,
        pid INTEGER,
        control_socket TEXT,
        started_at INTEGER,
        created_at INTEGER NOT NULL
    );",
    // 2: API tokens, stored as SHA-256 hashes.
    "CREATE TABLE tokens (
        name TEXT PRIMARY KEY NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );",
    // 3: jobs (long operations), kept across service restarts.
    "CREATE TABLE jobs (
        id TEXT PRIMARY KEY NOT NULL,
        operation TEXT NOT NULL,
        vm TEXT NOT NULL,
        vm_id TEXT NOT NULL,
        state TEXT NOT NULL,
        percent INTEGER NOT NULL,
        progress TEXT NOT NULL,
        error TEXT,
        started_ms INTEGER NOT NULL,
        finished_ms INTEGER
    );
    CREATE INDEX jobs_started ON jobs (started_ms);",
];

/// Finished jobs kept for `GET /jobs`.
const KEPT_JOBS: u32 = 100;

/// A VM's settings, stored as JSON so that adding one needs no migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub cpus: u32,
    pub memory: u64,
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: String,
    pub hyperv: bool,
    pub cpu_limit: u32,
    pub cpu_reserve: u32,
    pub cpu_weight: u32,
    #[serde(default)]
    pub auto_start: AutoStart,
    #[serde(default)]
    pub auto_stop: AutoStop,
    #[serde(default)]
    pub recovery: Recovery,
    #[serde(default)]
    pub disks: Vec<api::HardDisk>,
    #[serde(default)]
    pub dvds: Vec<api::DvdDrive>,
    #[serde(default)]
    pub nics: Vec<api::NetworkAdapter>,
    /// Integration services not offered (short names).
    #[serde(default)]
    pub disabled_integration: Vec<String>,
}

/// One row of `vms`.
#[derive(Debug, Clone)]
pub struct VmRow {
    pub id: String,
    pub name: String,
    pub settings: Settings,
    pub state: VmState,
    pub status: String,
    pub pid: Option<u32>,
    pub control_socket: Option<String>,
    /// Milliseconds since the epoch.
    pub started_at: Option<u64>,
    pub created_at: u64,
}

/// The database.
pub struct Db {
    conn: Connection,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database has schema version {0}, newer than this viridiand knows ({1}); run a newer viridiand")]
    TooNew(u32, u32),
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Self { conn })
    }

    pub fn insert(&mut self, row: &VmRow) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO vms (id, name, config, state, status, pid, control_socket, started_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                row.id,
                row.name,
                settings_json(&row.settings),
                row.state.as_str(),
                row.status,
                row.pid,
                row.control_socket,
                row.started_at.map(|t| t as i64),
                row.created_at as i64
            ],
        )?;
        tx.commit()
    }

    pub fn by_name(&self, name: &str) -> rusqlite::Result<Option<VmRow>> {
        self.conn
            .query_row(&format!("{SELECT} WHERE name = ?1"), [name], from_row)
            .optional()
    }

    pub fn by_id(&self, id: &str) -> rusqlite::Result<Option<VmRow>> {
        self.conn
            .query_row(&format!("{SELECT} WHERE id = ?1"), [id], from_row)
            .optional()
    }

    pub fn all(&self) -> rusqlite::Result<Vec<VmRow>> {
        let mut stmt = self.conn.prepare(&format!("{SELECT} ORDER BY name"))?;
        let rows = stmt.query_map([], from_row)?;
        rows.collect()
    }

    /// Writes a VM's name and settings.
    pub fn update_settings(&mut self, id: &str, name: &str, s: &Settings) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE vms SET name = ?2, config = ?3 WHERE id = ?1",
            params![id, name, settings_json(s)],
        )?;
        Ok(())
    }

    /// Writes a VM's state and its worker (pid, control socket, start time; None when off).
    pub fn update_runtime(
        &mut self,
        id: &str,
        state: VmState,
        status: &str,
        worker: Option<(u32, &str, u64)>,
    ) -> rusqlite::Result<()> {
        let (pid, socket, started) = match worker {
            Some((p, s, t)) => (Some(p), Some(s), Some(t as i64)),
            None => (None, None, None),
        };
        self.conn.execute(
            "UPDATE vms SET state = ?2, status = ?3, pid = ?4, control_socket = ?5, started_at = ?6 WHERE id = ?1",
            params![id, state.as_str(), status, pid, socket, started],
        )?;
        Ok(())
    }

    /// Writes only the state and status text.
    pub fn update_state(&mut self, id: &str, state: VmState, status: &str) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE vms SET state = ?2, status = ?3 WHERE id = ?1",
            params![id, state.as_str(), status],
        )?;
        Ok(())
    }

    /// Adds a token; false when the name is taken.
    pub fn add_token(&mut self, name: &str, hash: &str, created_at: u64) -> rusqlite::Result<bool> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO tokens (name, hash, created_at) VALUES (?1, ?2, ?3)",
            params![name, hash, created_at as i64],
        )?;
        Ok(n == 1)
    }

    /// Token names and creation times (seconds).
    pub fn tokens(&self) -> rusqlite::Result<Vec<(String, u64)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, created_at FROM tokens ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        rows.collect()
    }

    /// Whether a token with this hash exists.
    pub fn token_hash_known(&self, hash: &str) -> rusqlite::Result<bool> {
        self.conn
            .query_row("SELECT 1 FROM tokens WHERE hash = ?1", [hash], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
    }

    /// Removes a token; false when there was none of that name.
    pub fn revoke_token(&mut self, name: &str) -> rusqlite::Result<bool> {
        Ok(self
            .conn
            .execute("DELETE FROM tokens WHERE name = ?1", [name])?
            == 1)
    }

    pub fn delete(&mut self, id: &str) -> rusqlite::Result<()> {
        self.conn.execute("DELETE FROM vms WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Records a new job on the VM `vm_id`.
    pub fn insert_job(&mut self, job: &Job, vm_id: &str) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO jobs (id, operation, vm, vm_id, state, percent, progress, error, started_ms, finished_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                job.id,
                job.operation,
                job.vm,
                vm_id,
                job.state.as_str(),
                job.percent,
                job.progress,
                job.error,
                job.started_ms as i64,
                job.finished_ms.map(|t| t as i64)
            ],
        )?;
        Ok(())
    }

    /// Writes a running job's progress.
    pub fn update_job_progress(
        &mut self,
        id: &str,
        percent: u8,
        progress: &str,
    ) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE jobs SET percent = ?2, progress = ?3 WHERE id = ?1 AND state = 'Running'",
            params![id, percent, progress],
        )?;
        Ok(())
    }

    /// Ends a job (Completed or Failed) and forgets the oldest finished ones beyond
    /// [`KEPT_JOBS`], in one transaction.
    pub fn finish_job(&mut self, job: &Job) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE jobs SET state = ?2, percent = ?3, progress = ?4, error = ?5, finished_ms = ?6 WHERE id = ?1",
            params![
                job.id,
                job.state.as_str(),
                job.percent,
                job.progress,
                job.error,
                job.finished_ms.map(|t| t as i64)
            ],
        )?;
        tx.execute(
            "DELETE FROM jobs WHERE state != 'Running' AND id NOT IN
             (SELECT id FROM jobs WHERE state != 'Running' ORDER BY finished_ms DESC, started_ms DESC LIMIT ?1)",
            [KEPT_JOBS],
        )?;
        tx.commit()
    }

    /// The jobs, newest first.
    pub fn jobs(&self) -> rusqlite::Result<Vec<Job>> {
        let mut stmt = self.conn.prepare(&format!(
            "{JOB_SELECT} ORDER BY started_ms DESC, rowid DESC"
        ))?;
        let rows = stmt.query_map([], |r| job_from_row(r).map(|(j, _)| j))?;
        rows.collect()
    }

    pub fn job(&self, id: &str) -> rusqlite::Result<Option<Job>> {
        self.conn
            .query_row(&format!("{JOB_SELECT} WHERE id = ?1"), [id], |r| {
                job_from_row(r).map(|(j, _)| j)
            })
            .optional()
    }

    /// The jobs still Running, with their VMs' ids.
    pub fn running_jobs(&self) -> rusqlite::Result<Vec<(Job, String)>> {
        let mut stmt = self
            .conn
            .prepare(&format!("{JOB_SELECT} WHERE state = 'Running'"))?;
        let rows = stmt.query_map([], job_from_row)?;
        rows.collect()
    }
}

const JOB_SELECT: &str = "SELECT id, operation, vm, vm_id, state, percent, progress, error, started_ms, finished_ms FROM jobs";

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Job, String)> {
    let state: String = r.get(4)?;
    let job = Job {
        id: r.get(0)?,
        operation: r.get(1)?,
        vm: r.get(2)?,
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        percent: r.get::<_, u8>(5)?.min(100),
        progress: r.get(6)?,
        error: r.get(7)?,
        started_ms: r.get::<_, i64>(8)? as u64,
        finished_ms: r.get::<_, Option<i64>>(9)?.map(|t| t as u64),
    };
    Ok((job, r.get(3)?))
}

const SELECT: &str =
    "SELECT id, name, config, state, status, pid, control_socket, started_at, created_at FROM vms";

fn settings_json(s: &Settings) -> String {
    serde_json::to_string(s).expect("settings serialise")
}

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VmRow> {
    let config: String = r.get(2)?;
    let settings = serde_json::from_str(&config).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let state: String = r.get(3)?;
    Ok(VmRow {
        id: r.get(0)?,
        name: r.get(1)?,
        settings,
        state: VmState::parse(&state).unwrap_or(VmState::Off),
        status: r.get(4)?,
        pid: r.get(5)?,
        control_socket: r.get(6)?,
        started_at: r.get::<_, Option<i64>>(7)?.map(|t| t as u64),
        created_at: r.get::<_, i64>(8)? as u64,
    })
}

fn migrate(conn: &mut Connection) -> Result<(), DbError> {
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as u32;
    if version > known {
        return Err(DbError::TooNew(version, known));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", i as u32 + 1)?;
        tx.commit()?;
        tracing::info!("database schema migrated to version {}", i + 1);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A VM row with small settings.
    pub(crate) fn row(name: &str) -> VmRow {
        VmRow {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.into(),
            settings: Settings {
                cpus: 1,
                memory: 64 << 20,
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
                hyperv: true,
                cpu_limit: 100,
                cpu_reserve: 0,
                cpu_weight: 100,
                auto_start: AutoStart::Nothing,
                auto_stop: AutoStop::ShutDown,
                recovery: Recovery::None,
                disks: Vec::new(),
                dvds: Vec::new(),
                nics: Vec::new(),
                disabled_integration: Vec::new(),
            },
            state: VmState::Off,
            status: String::new(),
            pid: None,
            control_socket: None,
            started_at: None,
            created_at: 1,
        }
    }

    #[test]
    fn crud_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inventory.db");
        let mut db = Db::open(&path).unwrap();
        let a = row("a");
        db.insert(&a).unwrap();
        assert!(db.insert(&row("a")).is_err(), "names are unique");
        db.update_runtime(&a.id, VmState::Running, "up", Some((7, "/s", 9)))
            .unwrap();
        drop(db);
        let db = Db::open(&path).unwrap();
        let got = db.by_name("a").unwrap().unwrap();
        assert_eq!(
            (got.state, got.pid, got.started_at),
            (VmState::Running, Some(7), Some(9))
        );
        assert_eq!(db.all().unwrap().len(), 1);
        let v: u32 = db
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as u32);
    }

    fn job(n: u64) -> Job {
        Job {
            id: format!("job-{n}"),
            operation: "save".into(),
            vm: "a".into(),
            state: JobState::Running,
            percent: 0,
            progress: "Saving".into(),
            error: None,
            started_ms: n,
            finished_ms: None,
        }
    }

    #[test]
    fn jobs_outlive_a_reopen_and_only_the_last_finished_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inventory.db");
        let mut db = Db::open(&path).unwrap();
        for n in 0..KEPT_JOBS as u64 + 5 {
            db.insert_job(&job(n), "vm-id").unwrap();
        }
        db.update_job_progress("job-0", 40, "Saving: 40 %").unwrap();
        for n in 1..KEPT_JOBS as u64 + 5 {
            let mut j = job(n);
            j.state = JobState::Completed;
            j.percent = 100;
            j.finished_ms = Some(1000 + n);
            db.finish_job(&j).unwrap();
        }
        drop(db);
        let mut db = Db::open(&path).unwrap();
        let jobs = db.jobs().unwrap();
        assert_eq!(
            jobs.len(),
            KEPT_JOBS as usize + 1,
            "the running one and 100 finished"
        );
        assert_eq!(jobs[0].id, format!("job-{}", KEPT_JOBS + 4), "newest first");
        assert!(
            db.job("job-1").unwrap().is_none(),
            "the oldest finished went"
        );
        let running = db.running_jobs().unwrap();
        assert_eq!(running.len(), 1);
        let (j, vm) = &running[0];
        assert_eq!(
            (j.percent, j.progress.as_str(), vm.as_str()),
            (40, "Saving: 40 %", "vm-id")
        );
        // Progress no longer changes a finished job.
        let mut failed = j.clone();
        failed.state = JobState::Failed;
        failed.error = Some("the service stopped".into());
        failed.finished_ms = Some(5000);
        db.finish_job(&failed).unwrap();
        db.update_job_progress("job-0", 90, "late").unwrap();
        assert_eq!(db.job("job-0").unwrap().unwrap(), failed);
    }
}
