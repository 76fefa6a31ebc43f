//! The worker's control socket: a Unix stream socket per running VM that takes one-line
//! commands (`shutdown`, `reboot`, `turn-off`, `status`, `kvp`, `kvp-set KEY=VALUE`,
//! `kvp-delete KEY`, `inspect`, `disks`, `disk-add LUN|auto rw|ro PATH`, `disk-remove LUN`) and
//! answers with one line (`ok ...` or `error: ...`; `kvp`, `disks` and `inspect` answer `ok `
//! and one line of JSON). `viridian vm` is its client.

use anyhow::Context;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;
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
    pub fn start(path: &Path, control: VmControl) -> anyhow::Result<Self> {
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
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let control = control.clone();
                    std::thread::spawn(move || serve(stream, &control));
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

fn serve(stream: UnixStream, control: &VmControl) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut line = String::new();
    // Commands are short (a KVP item at most 2 KiB of UTF-16); a longer line is cut, not an
    // allocation.
    if BufReader::new(std::io::Read::take(stream, MAX_COMMAND))
        .read_line(&mut line)
        .is_err()
    {
        return;
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
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
        "disks" => {
            let list: Vec<serde_json::Value> = control
                .disks()
                .into_iter()
                .map(|(lun, path, format)| {
                    serde_json::json!({"location": lun, "path": path, "format": format})
                })
                .collect();
            format!("ok {}", serde_json::Value::Array(list))
        }
        // disk-add LUN|auto rw|ro PATH (the path last: it may hold spaces)
        "disk-add" => {
            let mut parts = arg.splitn(3, ' ');
            let (lun, mode, path) = (parts.next(), parts.next(), parts.next());
            let lun = match lun {
                Some("auto") => Ok(None),
                Some(l) => l.parse::<u8>().map(Some).map_err(|_| ()),
                None => Err(()),
            };
            match (lun, mode, path) {
                (Ok(lun), Some(m @ ("rw" | "ro")), Some(path)) if !path.is_empty() => {
                    match control.add_disk(std::path::Path::new(path), m == "ro", lun) {
                        Ok(l) => format!("ok: {path} attached at location {l}"),
                        Err(e) => format!("error: {e}"),
                    }
                }
                _ => "error: usage: disk-add LUN|auto rw|ro PATH".to_string(),
            }
        }
        "disk-remove" => match arg.parse::<u8>() {
            Ok(lun) => match control.remove_disk(lun) {
                Ok(path) => format!("ok: {} detached from location {lun}", path.display()),
                Err(e) => format!("error: {e}"),
            },
            Err(_) => "error: usage: disk-remove LUN".to_string(),
        },
        "inspect" => match control.inspect() {
            Some(v) => format!("ok {v}"),
            None => "error: this VM has no Hyper-V enlightenments (no VMBus)".to_string(),
        },
        _ => command(line.trim(), control),
    };
    let _ = writeln!(writer, "{reply}");
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
        "status" => match control.status() {
            Some(s) => format!(
                "ok: running vmbus={} heartbeat={:?} shutdown-service={} time-synced={}",
                s.vmbus_version
                    .map(|v| format!("{}.{}", v >> 16, v & 0xffff))
                    .unwrap_or_else(|| "none".into()),
                s.heartbeat,
                if s.shutdown_ready { "ready" } else { "absent" },
                s.time_synced
            ),
            None => "ok: running (no Hyper-V enlightenments)".to_string(),
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
