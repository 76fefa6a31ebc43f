//! The worker's control socket: a Unix stream socket per running VM that takes one-line
//! commands (`shutdown`, `reboot`, `turn-off`, `pause`, `resume`, `status`, `kvp`,
//! `kvp-set KEY=VALUE`, `kvp-delete KEY`, `integration`,
//! `integration-set SERVICE on|off`, `measure`, `inspect`, and the storage commands of
//! [`storage_command`]) and answers with one line (`ok ...` or `error: ...`; `kvp`, `disks` and
//! `inspect` answer `ok ` and one line of JSON). `viridian vm` is its client.
//!
//! `save PATH` (Save-VM) answers `progress N` lines, then `ok: ...` or `error: ...`; once
//! saved, the VM ends (see [`crate::saved_run`]).
//!
//! `console [--write] [--force]` answers one line, then turns the connection into a byte
//! stream: the last 1 MiB of COM1's output, then live output; with `--write` the client's bytes
//! are COM1's input (one writer at a time: another is refused unless it forces a takeover).
//! See [`crate::console::serve`].

use anyhow::Context;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm::vmbus_host::CacheMode;
use vmm::VmControl;

/// Directory of control sockets: `$VIRIDIAN_RUN_DIR`, else `/run/viridian` for root, else
/// `$XDG_RUNTIME_DIR/viridian`, else `/tmp/viridian-$USER`.
pub fn socket_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VIRIDIAN_RUN_DIR") {
        return d.into();
    }
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    if uid == "0" {
        return "/run/viridian".into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("viridian");
    }
    PathBuf::from(format!("/tmp/viridian-{uid}"))
}

/// The socket of the VM called `name`.
pub fn socket_for(name: &str) -> PathBuf {
    socket_dir().join(format!("{name}.sock"))
}

/// Serves the control socket until the process exits; removes it when dropped.
pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    pub fn start(
        path: &Path,
        control: VmControl,
        saved_run: crate::saved_run::SavedRun,
    ) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use by another running VM; pick another --name",
                path.display()
            );
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot create the control socket {}", path.display()))?;
        let saved_run = std::sync::Arc::new(saved_run);
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let control = control.clone();
                    let saved_run = saved_run.clone();
                    std::thread::spawn(move || serve(stream, &control, &saved_run));
                }
            })?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, control: &VmControl, saved_run: &crate::saved_run::SavedRun) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut line = String::new();
    // Commands are short (a KVP item at most 2 KiB of UTF-16); a longer line is cut, not an
    // allocation.
    let mut reader = BufReader::new(std::io::Read::take(stream, MAX_COMMAND));
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
    if verb == "console" {
        // What the client sent after the command line is its first input.
        crate::console::serve(writer, reader.buffer(), control.console(), arg);
        return;
    }
    if verb == "save" {
        crate::saved_run::serve_save(writer, arg, control, saved_run);
        return;
    }
    let reply = match verb {
        "kvp" => match control.kvp() {
            Some(k) => format!(
                "ok {}",
                serde_json::to_string(&k.items()).unwrap_or_default()
            ),
            None => "error: this VM has no Hyper-V enlightenments (no KVP)".to_string(),
        },
        "kvp-set" | "kvp-delete" => match (control.kvp(), arg.split_once('=')) {
            (None, _) => "error: this VM has no Hyper-V enlightenments (no KVP)".to_string(),
            (Some(k), _) if !k.ready() => {
                "error: the guest has not connected its KVP service (is hv_utils loaded?)"
                    .to_string()
            }
            (Some(k), Some((key, value))) if verb == "kvp-set" => match k.set(key, value) {
                Ok(()) => format!("ok: {key} queued for the guest"),
                Err(e) => format!("error: {e}"),
            },
            (Some(k), None) if verb == "kvp-delete" => match k.delete(arg) {
                Ok(()) => format!("ok: deleting {arg}"),
                Err(e) => format!("error: {e}"),
            },
            _ => format!(
                "error: usage: {verb} KEY{}",
                if verb == "kvp-set" { "=VALUE" } else { "" }
            ),
        },
        "disks" | "disk-add" | "disk-remove" | "dvd-add" | "dvd-set" | "dvd-eject" => {
            storage_command(verb, arg, control)
        }
        "integration" => format!(
            "ok {}",
            serde_json::to_string(&control.integration()).unwrap_or_default()
        ),
        // integration-set SERVICE on|off
        "integration-set" => {
            let (name, state) = arg.rsplit_once(' ').unwrap_or((arg, ""));
            match (vmm::vmbus_host::Service::parse(name), state) {
                (Some(s), "on" | "off") => match control.set_integration(s, state == "on") {
                    Ok(()) => format!("ok: {} {}", s.name(), if state == "on" { "enabled" } else { "disabled" }),
                    Err(e) => format!("error: {e}"),
                },
                (None, _) => format!(
                    "error: unknown integration service '{}'; use heartbeat, kvp, shutdown or timesync",
                    name.chars().take(64).collect::<String>()
                ),
                _ => "error: usage: integration-set SERVICE on|off".to_string(),
            }
        }
        "measure" => format!(
            "ok {}",
            serde_json::to_string(&control.measure()).unwrap_or_default()
        ),
        "nics" | "nic-link" | "nic-add" | "nic-remove" => crate::nic::command(verb, arg, control),
        "inspect" => match control.inspect() {
            Some(mut v) => {
                if let Some(o) = v.as_object_mut() {
                    o.insert(
                        "nics".into(),
                        serde_json::json!(crate::nic::inspect(control)),
                    );
                }
                format!("ok {v}")
            }
            None => "error: this VM has no Hyper-V enlightenments (no VMBus)".to_string(),
        },
        _ => command(line.trim(), control),
    };
    let _ = writeln!(writer, "{reply}");
}

/// A controller or location argument: a number, or `auto` (`None`).
fn place_arg(s: Option<&str>) -> Option<Option<u8>> {
    match s? {
        "auto" => Some(None),
        n => n.parse().ok().map(Some),
    }
}

/// The storage commands (paths come last: they may hold spaces):
/// - `disks`: every drive as JSON (controller, location, kind, path, format, read_only,
///   cache, size, sector sizes; an empty DVD drive has no path);
/// - `disk-add C|auto L|auto rw|ro FORMAT|auto [cache=none|writeback] PATH`
///   (Add-VMHardDiskDrive; unbuffered unless `cache=writeback`);
/// - `disk-remove C L` (Remove-VMHardDiskDrive, and Remove-VMDvdDrive);
/// - `dvd-add C|auto L|auto ISO|none` (Add-VMDvdDrive);
/// - `dvd-set C|auto L|auto PATH` and `dvd-eject C|auto L|auto` (Set-VMDvdDrive).
fn storage_command(verb: &str, arg: &str, control: &VmControl) -> String {
    let place = |c: u8, l: u8| format!("location {l} of controller {c}");
    match verb {
        "disks" => {
            let list: Vec<serde_json::Value> = control
                .drives()
                .into_iter()
                .map(|(c, d)| {
                    serde_json::json!({
                        "controller": c,
                        "location": d.lun,
                        "kind": d.kind,
                        "path": d.path,
                        "format": d.format,
                        "read_only": d.read_only,
                        "cache": d.cache.map(CacheMode::name),
                        "size": d.size,
                        "logical_sector_size": d.logical_sector_size,
                        "physical_sector_size": d.physical_sector_size,
                    })
                })
                .collect();
            format!("ok {}", serde_json::Value::Array(list))
        }
        "disk-add" => {
            let mut parts = arg.splitn(5, ' ');
            let (c, l) = (place_arg(parts.next()), place_arg(parts.next()));
            let (mode, format, rest) = (parts.next(), parts.next(), parts.next());
            let format = match format {
                Some("auto") => Some(None),
                Some(f) => f.parse().ok().map(Some),
                None => None,
            };
            let (cache, path) = match rest.map(|r| (r, r.strip_prefix("cache="))) {
                Some((_, Some(r))) => {
                    let (mode, path) = r.split_once(' ').unwrap_or((r, ""));
                    (mode.parse::<CacheMode>().ok(), Some(path))
                }
                Some((path, None)) => (Some(CacheMode::default()), Some(path)),
                None => (None, None),
            };
            match (c, l, mode, format, cache, path) {
                (Some(c), Some(l), Some(m @ ("rw" | "ro")), Some(f), Some(cache), Some(path))
                    if !path.is_empty() =>
                {
                    match control.add_disk(Path::new(path), f, m == "ro", cache, c, l) {
                        Ok((c, l)) => format!("ok: {path} attached at {}", place(c, l)),
                        Err(e) => format!("error: {e}"),
                    }
                }
                _ => "error: usage: disk-add CONTROLLER|auto LOCATION|auto rw|ro FORMAT|auto [cache=none|writeback] PATH"
                    .to_string(),
            }
        }
        "disk-remove" => {
            let mut parts = arg.split(' ');
            let c = parts.next().and_then(|c| c.parse::<u8>().ok());
            let l = parts.next().and_then(|l| l.parse::<u8>().ok());
            match (c, l, parts.next()) {
                (Some(c), Some(l), None) => match control.remove_disk(c, l) {
                    Ok(Some(path)) => {
                        format!("ok: {} detached from {}", path.display(), place(c, l))
                    }
                    Ok(None) => format!("ok: the empty DVD drive at {} is removed", place(c, l)),
                    Err(e) => format!("error: {e}"),
                },
                _ => "error: usage: disk-remove CONTROLLER LOCATION".to_string(),
            }
        }
        "dvd-add" => {
            let mut parts = arg.splitn(3, ' ');
            let (c, l, iso) = (
                place_arg(parts.next()),
                place_arg(parts.next()),
                parts.next(),
            );
            match (c, l, iso) {
                (Some(c), Some(l), Some(iso)) if !iso.is_empty() => {
                    let iso = (iso != "none").then(|| Path::new(iso));
                    match control.add_dvd(iso, c, l) {
                        Ok((c, l)) => format!("ok: a DVD drive is added at {}", place(c, l)),
                        Err(e) => format!("error: {e}"),
                    }
                }
                _ => "error: usage: dvd-add CONTROLLER|auto LOCATION|auto ISO|none".to_string(),
            }
        }
        _ => {
            let eject = verb == "dvd-eject";
            let mut parts = arg.splitn(3, ' ');
            let (c, l, path) = (
                place_arg(parts.next()),
                place_arg(parts.next()),
                parts.next(),
            );
            match (c, l, path) {
                (Some(c), Some(l), None) if eject => match control.change_dvd(None, c, l) {
                    Ok((c, l, Some(old))) => {
                        format!("ok: {} ejected from {}", old.display(), place(c, l))
                    }
                    Ok((c, l, None)) => format!("ok: the DVD drive at {} is empty", place(c, l)),
                    Err(e) => format!("error: {e}"),
                },
                (Some(c), Some(l), Some(path)) if !eject && !path.is_empty() => {
                    match control.change_dvd(Some(Path::new(path)), c, l) {
                        Ok((c, l, _)) => format!("ok: {path} inserted at {}", place(c, l)),
                        Err(e) => format!("error: {e}"),
                    }
                }
                _ if eject => "error: usage: dvd-eject CONTROLLER|auto LOCATION|auto".to_string(),
                _ => "error: usage: dvd-set CONTROLLER|auto LOCATION|auto PATH".to_string(),
            }
        }
    }
}

/// Longest command line read.
const MAX_COMMAND: u64 = 16 * 1024;

fn command(line: &str, control: &VmControl) -> String {
    match line {
        "shutdown" | "reboot" => match control.shutdown(line.trim() == "reboot") {
            Ok(()) => "ok: the guest was asked to shut down".to_string(),
            Err(e) => format!("error: {e}"),
        },
        "turn-off" => {
            control.turn_off();
            "ok: turned off".to_string()
        }
        "pause" => match control.pause() {
            Ok(()) => "ok: paused".to_string(),
            Err(e) => format!("error: {e}"),
        },
        "resume" => match control.resume() {
            Ok(()) => "ok: running".to_string(),
            Err(e) => format!("error: {e}"),
        },
        "status" => match control.status() {
            Some(s) => format!(
                "ok: {} vmbus={} heartbeat={:?} shutdown-service={} time-synced={}",
                if control.is_paused() {
                    "paused"
                } else {
                    "running"
                },
                s.vmbus_version
                    .map(|v| format!("{}.{}", v >> 16, v & 0xffff))
                    .unwrap_or_else(|| "none".into()),
                s.heartbeat,
                if s.shutdown_ready { "ready" } else { "absent" },
                s.time_synced
            ),
            None => format!(
                "ok: {} (no Hyper-V enlightenments)",
                if control.is_paused() {
                    "paused"
                } else {
                    "running"
                }
            ),
        },
        other => format!(
            "error: unknown command '{}'",
            other.chars().take(64).collect::<String>()
        ),
    }
}

/// Sends one command and returns the reply line.
pub fn send(path: &Path, command: &str) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach the VM's control socket {} (is the VM running? `viridian vm list`)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    writeln!(stream, "{command}")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    let reply = reply.trim().to_string();
    match reply.strip_prefix("error: ") {
        Some(e) => anyhow::bail!("{e}"),
        None if reply.is_empty() => anyhow::bail!("the VM closed the control connection"),
        None => Ok(reply
            .strip_prefix("ok: ")
            .or_else(|| reply.strip_prefix("ok "))
            .unwrap_or(&reply)
            .to_string()),
    }
}
