//! Worker processes: `viridian run` started by the service, watched through a pidfd, and
//! driven through its control socket.

use crate::db::Settings;
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};

/// Paths of one VM's worker.
pub struct Paths<'a> {
    pub worker: &'a Path,
    pub run_dir: &'a Path,
    /// The service's state directory; the worker finds the switch definitions there.
    pub state_dir: &'a Path,
    pub folder: &'a Path,
    pub socket: &'a Path,
}

impl Paths<'_> {
    pub fn log(&self) -> PathBuf {
        self.folder.join("worker.log")
    }
}

/// Starts a worker in its own process group (so a signal to the service's terminal or its
/// death does not reach it), with its log in the VM's folder.
/// With `restore`, the worker resumes that saved state instead of booting the kernel.
pub fn spawn(
    p: &Paths<'_>,
    name: &str,
    s: &Settings,
    restore: Option<&Path>,
) -> std::io::Result<Child> {
    let _ = std::fs::remove_file(p.socket);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p.log())?;
    let mut cmd = Command::new(p.worker);
    cmd.arg("run")
        .arg(format!("--name={name}"))
        .arg("--control-socket")
        .arg(p.socket)
        .arg("--serial")
        .arg(p.folder.join("console.log"));
    match restore {
        // The shape of the VM comes from the saved state.
        Some(file) => {
            cmd.arg("--restore").arg(file);
        }
        None => {
            cmd.arg(format!("--kernel={}", s.kernel))
                .arg(format!("--cmdline={}", s.cmdline))
                .arg(format!("--cpus={}", s.cpus))
                .arg(format!("--memory={}M", s.memory >> 20));
            if let Some(i) = &s.initrd {
                cmd.arg(format!("--initrd={i}"));
            }
            if !s.hyperv {
                cmd.arg("--no-hyperv");
            }
        }
    }
    cmd.args(crate::devices::worker_args(s));
    cmd.env("VIRIDIAN_RUN_DIR", p.run_dir)
        .env("VIRIDIAN_STATE_DIR", p.state_dir)
        .env(
            "VIRIDIAN_LOG",
            std::env::var("VIRIDIAN_WORKER_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
}

/// A pidfd for `pid`.
pub fn pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    let p = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    Ok(rustix::process::pidfd_open(
        p,
        rustix::process::PidfdFlags::empty(),
    )?)
}

/// Waits until the process behind `fd` has exited.
pub async fn exited(fd: OwnedFd) -> std::io::Result<()> {
    // The AsyncFd owns the pidfd, so it cannot be closed while registered: the reason tokio
    // deprecated the safe constructor does not apply.
    #[allow(deprecated)]
    let afd = AsyncFd::with_interest(fd, Interest::READABLE)?;
    let _guard = afd.readable().await?;
    Ok(())
}

/// Sends SIGKILL through a pidfd.
pub fn kill(fd: &OwnedFd) {
    let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
}

/// Why a worker ended, for the VM's status.
pub fn describe(status: Option<ExitStatus>, log: &Path) -> (String, bool) {
    let Some(status) = status else {
        return (
            "the worker exited (it was adopted after a service restart, so its exit status is unknown)"
                .into(),
            false,
        );
    };
    match (status.code(), status.signal()) {
        (Some(0), _) => ("the guest powered off".into(), true),
        (Some(3), _) => ("the guest reset itself (exit status 3)".into(), false),
        (Some(130), _) => (
            "the worker was stopped by a signal (exit status 130)".into(),
            false,
        ),
        (Some(c), _) => {
            let last = last_line(log).unwrap_or_default();
            (
                format!("the worker failed (exit status {c}): {last}"),
                false,
            )
        }
        (None, Some(sig)) => (
            format!("the worker was killed by signal {sig}{}", signal_name(sig)),
            false,
        ),
        _ => (format!("the worker ended ({status})"), false),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        9 => " (SIGKILL)",
        15 => " (SIGTERM)",
        11 => " (SIGSEGV)",
        6 => " (SIGABRT)",
        _ => "",
    }
}

/// The last non-empty line of the worker's log, without terminal colours.
fn last_line(log: &Path) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let tail = &text[text.len().saturating_sub(4096)..];
    let s = String::from_utf8_lossy(tail);
    s.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.trim_start_matches("viridian: ").to_string())
}

/// Sends one command to a control socket and returns its reply (without `ok: `).
pub async fn control(socket: &Path, command: &str, timeout: Duration) -> Result<String, String> {
    let talk = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("cannot reach the worker's control socket: {e}"))?;
        s.write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        let line = line.trim().to_string();
        match line.strip_prefix("error: ") {
            Some(e) => Err(e.to_string()),
            None if line.is_empty() => Err("the worker closed the control connection".into()),
            None => Ok(line.trim_start_matches("ok: ").to_string()),
        }
    };
    tokio::time::timeout(timeout, talk)
        .await
        .unwrap_or_else(|_| Err("the worker did not answer in time".into()))
}

/// Sends a command that reports `progress N` lines before its answer (`save PATH`); returns
/// the answer. Each line must come within a minute.
pub async fn control_with_progress(
    socket: &Path,
    command: &str,
    progress: impl Fn(u8),
) -> Result<String, String> {
    const LINE_TIMEOUT: Duration = Duration::from_secs(60);
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("cannot reach the worker's control socket: {e}"))?;
    s.write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(s).lines();
    loop {
        let line = tokio::time::timeout(LINE_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| "the worker did not answer in time".to_string())?
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the worker closed the control connection".to_string())?;
        if let Some(p) = line.strip_prefix("progress ") {
            progress(p.trim().parse().unwrap_or(0));
            continue;
        }
        return match line.strip_prefix("error: ") {
            Some(e) => Err(e.to_string()),
            None => Ok(line.trim_start_matches("ok: ").to_string()),
        };
    }
}

/// Whether the control socket accepts connections (the worker built its VM).
pub async fn ready(socket: &Path) -> bool {
    tokio::net::UnixStream::connect(socket).await.is_ok()
}

/// The heartbeat from a `status` reply.
pub fn heartbeat(status: &str) -> api::Heartbeat {
    if status.contains("heartbeat=Healthy") {
        api::Heartbeat::Ok
    } else if status.contains("heartbeat=Lost") {
        api::Heartbeat::Lost
    } else {
        api::Heartbeat::NoContact
    }
}
