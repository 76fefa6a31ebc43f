//! One cgroup v2 group per worker under `viridian.slice`:
//! - CPU limit (percent of the VM's processors, Set-VMProcessor -Maximum) → `cpu.max`
//!   as `limit × cpus × 1000` µs per 100 000 µs period;
//! - relative weight (Set-VMProcessor -RelativeWeight, 1..=10000) → `cpu.weight`;
//! - memory ceiling: guest memory + 256 MiB for the worker → `memory.max`;
//! - reserve (Set-VMProcessor -Reserve) has no cgroup v2 control; it is stored only.

use crate::db::Settings;
use std::path::{Path, PathBuf};

/// Extra memory a worker may use beyond its guest's RAM.
pub const WORKER_OVERHEAD: u64 = 256 << 20;

/// Where groups go, or why there are none.
#[derive(Debug, Clone)]
pub enum Cgroups {
    Enabled(PathBuf),
    Disabled(String),
}

impl Cgroups {
    /// Sets up `viridian.slice` under the cgroup v2 root `root` when it is writable.
    pub fn probe(root: &Path) -> Self {
        let controllers = match std::fs::read_to_string(root.join("cgroup.controllers")) {
            Ok(c) => c,
            Err(e) => {
                return Self::Disabled(format!(
                    "{} is not a cgroup v2 hierarchy ({e})",
                    root.display()
                ))
            }
        };
        for c in ["cpu", "memory"] {
            if !controllers.split_whitespace().any(|x| x == c) {
                return Self::Disabled(format!(
                    "the cgroup v2 root {} offers no '{c}' controller",
                    root.display()
                ));
            }
        }
        let slice = root.join("viridian.slice");
        let setup = || -> std::io::Result<()> {
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory");
            std::fs::create_dir_all(&slice)?;
            std::fs::write(slice.join("cgroup.subtree_control"), "+cpu +memory")
        };
        match setup() {
            Ok(()) => Self::Enabled(slice),
            Err(e) => Self::Disabled(format!("cannot set up {}: {e}", slice.display())),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Enabled(p) => format!("enabled: {}", p.display()),
            Self::Disabled(why) => format!("disabled: {why}"),
        }
    }

    /// Puts `pid` in the VM's group with its limits. Failures are logged; the VM runs anyway.
    pub fn attach(&self, id: &str, pid: u32, s: &Settings) {
        let Self::Enabled(slice) = self else { return };
        let group = slice.join(format!("vm-{id}"));
        let result = std::fs::create_dir_all(&group)
            .and_then(|()| apply(&group, s))
            .and_then(|()| std::fs::write(group.join("cgroup.procs"), pid.to_string()));
        if let Err(e) = result {
            tracing::warn!(
                "cgroup {}: {e}; the VM runs without limits",
                group.display()
            );
        }
    }

    /// Applies changed limits to a running VM's group.
    pub fn update(&self, id: &str, s: &Settings) {
        let Self::Enabled(slice) = self else { return };
        let group = slice.join(format!("vm-{id}"));
        if let Err(e) = apply(&group, s) {
            tracing::warn!("cgroup {}: {e}", group.display());
        }
    }

    /// Removes the VM's group once its worker is gone.
    pub fn remove(&self, id: &str) {
        if let Self::Enabled(slice) = self {
            let _ = std::fs::remove_dir(slice.join(format!("vm-{id}")));
        }
    }
}

/// The values written for `s`: (file, contents).
pub fn values(s: &Settings) -> [(&'static str, String); 3] {
    let max = if s.cpu_limit >= 100 {
        "max 100000".to_string()
    } else {
        format!(
            "{} 100000",
            u64::from(s.cpu_limit) * u64::from(s.cpus) * 1000
        )
    };
    [
        ("cpu.max", max),
        ("cpu.weight", s.cpu_weight.to_string()),
        ("memory.max", (s.memory + WORKER_OVERHEAD).to_string()),
    ]
}

fn apply(group: &Path, s: &Settings) -> std::io::Result<()> {
    for (file, value) in values(s) {
        std::fs::write(group.join(file), value)?;
    }
    Ok(())
}
