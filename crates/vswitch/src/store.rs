//! Switch definitions on disk: `STATE_DIR/switches/NAME.json`, written atomically (a temporary
//! file, fsynced, renamed over the old one, then the directory fsynced). One process at a
//! time changes them: every change holds an exclusive lock on `switches/.lock`.

use crate::cidr::Cidr;
use crate::error::{io_err, Error, Result};
use crate::name;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The kinds of switch, as Hyper-V has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwitchKind {
    /// VMs on this host only; the host has no interface on it.
    Private,
    /// VMs and the host, through the bridge device.
    Internal,
    /// Bridged to a physical adapter; the host keeps its connectivity through the bridge.
    External,
    /// Internal with a fixed subnet, NAT to the host's uplink, DHCP and DNS.
    Default,
}

impl SwitchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchKind::Private => "private",
            SwitchKind::Internal => "internal",
            SwitchKind::External => "external",
            SwitchKind::Default => "default",
        }
    }
}

impl std::fmt::Display for SwitchKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A switch as defined (what `switch apply` re-creates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchDef {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: SwitchKind,
    /// External: the physical adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// Internal and Default: the host's address on the switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_address: Option<Cidr>,
}

impl SwitchDef {
    pub fn bridge(&self) -> String {
        name::bridge_name(&self.name)
    }

    /// Checks the fields against each other (a definition read from disk is not trusted).
    pub fn check(&self) -> Result<()> {
        name::check_switch_name(&self.name)?;
        let invalid = |field, reason: &str| Error::Invalid {
            field,
            value: self.name.clone(),
            reason: reason.to_string(),
        };
        if (self.kind == SwitchKind::Default) != (self.name == name::DEFAULT_SWITCH) {
            return Err(invalid(
                "switch name",
                "the switch named \"default\" is the Default Switch, and only it",
            ));
        }
        match (&self.adapter, self.kind) {
            (Some(a), SwitchKind::External) => name::check_ifname("adapter", a)?,
            (None, SwitchKind::External) => {
                return Err(invalid("adapter", "an External switch needs an adapter"))
            }
            (Some(_), _) => {
                return Err(invalid("adapter", "only an External switch has an adapter"))
            }
            (None, _) => {}
        }
        if let Some(a) = &self.host_address {
            if matches!(self.kind, SwitchKind::Private | SwitchKind::External) {
                return Err(invalid(
                    "host address",
                    "only Internal and Default switches have a host address",
                ));
            }
            a.check_host_address().map_err(|reason| Error::Invalid {
                field: "host address",
                value: a.to_string(),
                reason,
            })?;
        }
        Ok(())
    }
}

/// The `switches` folder of a state directory.
pub struct Store {
    dir: PathBuf,
}

/// Held while definitions change.
pub struct StoreLock {
    _file: File,
}

impl Store {
    /// The store of a state directory, which need not exist (nothing is defined then).
    pub fn at(state_dir: &Path) -> Store {
        Store {
            dir: state_dir.join("switches"),
        }
    }

    /// The store of a state directory, made if it does not exist.
    pub fn open(state_dir: &Path) -> Result<Store> {
        let store = Store::at(state_dir);
        fs::create_dir_all(&store.dir).map_err(io_err(&store.dir))?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn lock(&self) -> Result<StoreLock> {
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
            Error::Io {
                path,
                source: e.into(),
            }
        })?;
        Ok(StoreLock { _file: file })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// The definition of `name` (a valid switch name), if there is one.
    pub fn load(&self, name: &str) -> Result<Option<SwitchDef>> {
        let path = self.path(name);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let bad = |reason: String| Error::BadDefinition {
            path: path.clone(),
            reason,
        };
        let def: SwitchDef = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if def.name != name {
            return Err(bad(format!(
                "it defines switch {:?}, not {name:?}",
                def.name
            )));
        }
        def.check().map_err(|e| bad(e.to_string()))?;
        Ok(Some(def))
    }

    /// The names of the defined switches, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&self.dir))?;
            let file = entry.file_name();
            let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(".json")) else {
                continue;
            };
            if name::check_switch_name(stem).is_ok() {
                names.push(stem.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Every definition, by name; a file that cannot be read or trusted is an error.
    pub fn list(&self) -> Result<Vec<SwitchDef>> {
        let mut defs = Vec::new();
        for n in self.names()? {
            defs.extend(self.load(&n)?);
        }
        Ok(defs)
    }

    pub fn save(&self, def: &SwitchDef) -> Result<()> {
        let path = self.path(&def.name);
        let tmp = self.dir.join(format!(".{}.json.tmp", def.name));
        let mut text = serde_json::to_vec_pretty(def).map_err(|e| Error::BadDefinition {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        text.push(b'\n');
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&text).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.sync_dir()
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn internal(name: &str) -> SwitchDef {
        SwitchDef {
            name: name.into(),
            kind: SwitchKind::Internal,
            adapter: None,
            host_address: Some("192.168.50.1/24".parse().unwrap()),
        }
    }

    #[test]
    fn round_trips_and_lists_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let _lock = store.lock().unwrap();
        store.save(&internal("lab")).unwrap();
        store.save(&internal("a1")).unwrap();
        let text = fs::read_to_string(dir.path().join("switches/lab.json")).unwrap();
        assert!(text.contains("\"type\": \"internal\""), "{text}");
        assert!(
            text.contains("\"host_address\": \"192.168.50.1/24\""),
            "{text}"
        );
        let names: Vec<_> = store.list().unwrap().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["a1", "lab"]);
        assert_eq!(store.load("lab").unwrap(), Some(internal("lab")));
        store.delete("lab").unwrap();
        assert_eq!(store.load("lab").unwrap(), None);
        // No temporary files are left behind.
        let left: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}"); // .lock and a1.json
    }

    #[test]
    fn hostile_files_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cases = [
            ("x", "not json"),
            ("y", r#"{"name":"other","type":"private"}"#),
            ("z", r#"{"name":"z","type":"external"}"#),
            ("w", r#"{"name":"w","type":"private","adapter":"eth0"}"#),
            ("v", r#"{"name":"v","type":"default"}"#),
            (
                "u",
                r#"{"name":"u","type":"internal","host_address":"1.2.3.4/40"}"#,
            ),
            ("t", r#"{"name":"t","type":"internal","bridge":"eth0"}"#),
            ("s", r#"{"name":"s","type":"external","adapter":"../../x"}"#),
        ];
        for (name, text) in cases {
            fs::write(store.dir().join(format!("{name}.json")), text).unwrap();
            let err = store.load(name).unwrap_err().to_string();
            assert!(err.contains(&format!("{name}.json")), "{err}");
        }
        assert!(store.list().is_err());
    }
}
