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

#[cfg(test)]
mod tests {
    use super::*;
    use api::{AutoStart, AutoStop, Recovery};

    fn settings(cpus: u32, limit: u32, weight: u32) -> Settings {
        Settings {
            cpus,
            memory: 512 << 20,
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            hyperv: true,
            cpu_limit: limit,
            cpu_reserve: 0,
            cpu_weight: weight,
            auto_start: AutoStart::Nothing,
            auto_stop: AutoStop::ShutDown,
            recovery: Recovery::None,
            disks: Vec::new(),
            dvds: Vec::new(),
            nics: Vec::new(),
            disabled_integration: Vec::new(),
        }
    }

    #[test]
    fn mapping() {
        let v = values(&settings(2, 50, 300));
        assert_eq!(
            v[0],
            ("cpu.max", "100000 100000".to_string()),
            "50 % of 2 CPUs = 1 CPU"
        );
        assert_eq!(v[1], ("cpu.weight", "300".to_string()));
        assert_eq!(
            v[2],
            ("memory.max", ((512u64 << 20) + WORKER_OVERHEAD).to_string())
        );
        assert_eq!(values(&settings(4, 100, 100))[0].1, "max 100000");
    }

    /// A directory laid out like a cgroup v2 root (the files are plain files here).
    #[test]
    fn probe_attach_update_remove() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(Cgroups::probe(root.path()), Cgroups::Disabled(_)));
        std::fs::write(root.path().join("cgroup.controllers"), "cpuset io\n").unwrap();
        let Cgroups::Disabled(why) = Cgroups::probe(root.path()) else {
            panic!()
        };
        assert!(why.contains("'cpu'"), "{why}");
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        let cg = Cgroups::probe(root.path());
        let Cgroups::Enabled(slice) = &cg else {
            panic!("{cg:?}")
        };
        assert_eq!(
            std::fs::read_to_string(slice.join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory"
        );
        cg.attach("id1", 42, &settings(1, 25, 50));
        let group = slice.join("vm-id1");
        let read = |f: &str| std::fs::read_to_string(group.join(f)).unwrap();
        assert_eq!(read("cgroup.procs"), "42");
        assert_eq!(read("cpu.max"), "25000 100000");
        assert_eq!(read("cpu.weight"), "50");
        cg.update("id1", &settings(1, 100, 70));
        assert_eq!(
            (read("cpu.max").as_str(), read("cpu.weight").as_str()),
            ("max 100000", "70")
        );
        // A real group is empty once its process is gone; rmdir then works.
        for f in ["cgroup.procs", "cpu.max", "cpu.weight", "memory.max"] {
            std::fs::remove_file(group.join(f)).unwrap();
        }
        cg.remove("id1");
        assert!(!group.exists());
    }
}
