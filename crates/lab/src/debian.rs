//! Fetches Debian packages with `apt-get download` and unpacks them with `dpkg-deb -x` into the
//! cache, without installing anything.

use crate::{Cache, Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().map_err(|e| Error::Tool {
        what: what.to_string(),
        detail: format!("{e} (is it installed? run the README's set-up command)"),
    })?;
    if !out.status.success() {
        return Err(Error::Tool {
            what: what.to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The concrete package a metapackage (e.g. `linux-image-amd64`) depends on first.
pub fn resolve_dependency(metapackage: &str, prefix: &str) -> Result<String> {
    let out = run(
        Command::new("apt-cache").args(["depends", "--no-recommends", metapackage]),
        &format!("apt-cache depends {metapackage}"),
    )?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with(prefix))
        .map(str::to_string)
        .ok_or_else(|| Error::Tool {
            what: format!("resolving {metapackage}"),
            detail: format!("no dependency starting with {prefix}; run 'apt-get update'"),
        })
}

/// Downloads and unpacks `package`; returns the directory holding its files. Cached.
pub fn unpack(cache: &Cache, package: &str) -> Result<PathBuf> {
    let root = cache.dir().join("packages").join(package);
    let done = root.join(".unpacked");
    if done.exists() {
        return Ok(root);
    }
    let _lock = cache.lock()?;
    if done.exists() {
        // Another lab run unpacked it while this one waited for the lock.
        return Ok(root);
    }
    let debs = cache.dir().join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| Error::io(&debs, e))?;
    if find_deb(&debs, package).is_none() {
        eprintln!("lab: downloading Debian package {package}");
        run(
            Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(&debs),
            &format!("apt-get download {package}"),
        )?;
    }
    let deb = find_deb(&debs, package).ok_or_else(|| Error::Tool {
        what: format!("apt-get download {package}"),
        detail: "no .deb appeared".into(),
    })?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        &format!("dpkg-deb -x {}", deb.display()),
    )?;
    std::fs::write(&done, b"").map_err(|e| Error::io(&done, e))?;
    Ok(root)
}

fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}
