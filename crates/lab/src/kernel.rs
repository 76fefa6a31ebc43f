//! Debian kernels unpacked from their packages, with module lookup and dependency order.

use crate::{debian, Cache, Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Which Debian kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// `linux-image-amd64`: everything as modules, MP-table support, XZ-compressed.
    Amd64,
    /// `linux-image-cloud-amd64`: smaller, LZ4, no MP-table support (SMP needs the MADT).
    Cloud,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Amd64 => "amd64",
            Flavor::Cloud => "cloud",
        }
    }

    fn metapackage(self) -> &'static str {
        match self {
            Flavor::Amd64 => "linux-image-amd64",
            Flavor::Cloud => "linux-image-cloud-amd64",
        }
    }
}

/// An unpacked kernel package.
pub struct Kernel {
    pub flavor: Flavor,
    pub version: String,
    root: PathBuf,
    modules: HashMap<String, PathBuf>,
}

impl Kernel {
    pub fn fetch(cache: &Cache, flavor: Flavor) -> Result<Self> {
        let package = debian::resolve_dependency(flavor.metapackage(), "linux-image-")?;
        let root = debian::unpack(cache, &package)?;
        let version = package.trim_start_matches("linux-image-").to_string();
        let mut modules = HashMap::new();
        collect_modules(&root.join("lib/modules").join(&version), &mut modules);
        let k = Self {
            flavor,
            version,
            root,
            modules,
        };
        if !k.vmlinuz().exists() {
            return Err(Error::Tool {
                what: format!("unpacking {package}"),
                detail: format!("{} is missing", k.vmlinuz().display()),
            });
        }
        Ok(k)
    }

    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.version))
    }

    /// `lib/modules/VERSION` of the unpacked package (the modules, `modules.builtin` and
    /// friends; no `modules.dep`, which `depmod` makes on installation).
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.version)
    }

    /// Whether module `name` is compiled into the kernel (listed in `modules.builtin`).
    pub fn is_builtin(&self, name: &str) -> bool {
        let wanted = normalize(name);
        std::fs::read_to_string(self.modules_dir().join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko"))
            .any(|m| normalize(m) == wanted)
    }

    /// The value of a build option in the kernel's own config (`y`, `m`, ...), `None` when
    /// unset.
    pub fn config(&self, option: &str) -> Option<String> {
        let path = self.root.join(format!("boot/config-{}", self.version));
        let text = std::fs::read_to_string(path).ok()?;
        let prefix = format!("{option}=");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
    }

    /// The `.ko` files for `names` and everything they depend on, in a valid load order.
    pub fn modules_with_deps(&self, names: &[&str]) -> Result<Vec<(String, PathBuf)>> {
        let mut order = Vec::new();
        for name in names {
            self.visit(&normalize(name), &mut order, 0)?;
        }
        Ok(order)
    }

    fn visit(&self, name: &str, order: &mut Vec<(String, PathBuf)>, depth: u32) -> Result<()> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let path = self.modules.get(name).ok_or_else(|| Error::Tool {
            what: format!("kernel {}", self.version),
            detail: format!("no module named {name}"),
        })?;
        if depth < 16 {
            for dep in module_depends(path)? {
                self.visit(&dep, order, depth + 1)?;
            }
        }
        order.push((name.to_string(), path.clone()));
        Ok(())
    }
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn collect_modules(dir: &Path, out: &mut HashMap<String, PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_modules(&p, out);
        } else if let Some(stem) = p.file_name().and_then(|n| n.to_str()) {
            if let Some(name) = stem.strip_suffix(".ko") {
                out.insert(normalize(name), p.clone());
            }
        }
    }
}

/// The `depends=` entry of a module's `.modinfo` strings.
fn module_depends(path: &Path) -> Result<Vec<String>> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let key = b"\0depends=";
    let Some(at) = data.windows(key.len()).position(|w| w == key) else {
        return Ok(vec![]);
    };
    let rest = &data[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(normalize)
        .collect())
}
