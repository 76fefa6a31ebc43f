//! The inventory: SQLite in WAL mode under the state directory, with migrations numbered by
//! `PRAGMA user_version`. Every write is one transaction, so a crash leaves each VM defined
//! or not.

use api::{AutoStart, AutoStop, Recovery, VmState};
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
];

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
mod tests {
    use super::*;

    fn row(name: &str) -> VmRow {
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
}
