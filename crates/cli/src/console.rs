//! The console outside the VMM: what stdin is, raw mode with a restore on every exit path,
//! forwarding keys or piped bytes to the guest until Ctrl-] or end of input, the control
//! socket's `console` connection ([`serve`]) and its client, `viridian vm console` ([`attach`]).

use anyhow::Context;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm::console::{Console, InputError, WhenSlow};

/// Ctrl-]: detaches from the console, as in `virsh console`.
pub const DETACH: u8 = 0x1d;

/// What stdin is, for console input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdin {
    /// A terminal this process may use: raw mode, keys go to the guest, Ctrl-] detaches.
    Terminal,
    /// A pipe, file or socket: its bytes go to the guest until its end.
    Stream,
    /// Nothing to read (`/dev/null`, another device, closed, or a terminal this process is in
    /// the background of).
    Nothing,
}

/// Classifies stdin.
pub fn stdin_kind() -> Stdin {
    let stdin = std::io::stdin();
    if rustix::termios::isatty(stdin.as_fd()) {
        // A background job that touched the terminal would be stopped (SIGTTIN/SIGTTOU).
        let foreground = rustix::termios::tcgetpgrp(stdin.as_fd())
            .map(|pgrp| pgrp == rustix::process::getpgrp())
            .unwrap_or(true);
        return if foreground {
            Stdin::Terminal
        } else {
            Stdin::Nothing
        };
    }
    let Ok(fd) = stdin.as_fd().try_clone_to_owned() else {
        return Stdin::Nothing;
    };
    match std::fs::File::from(fd).metadata().map(|m| m.file_type()) {
        Ok(t) if t.is_fifo() || t.is_file() || t.is_socket() => Stdin::Stream,
        _ => Stdin::Nothing,
    }
}

/// The terminal settings to put back, while raw mode is on.
static SAVED: Mutex<Option<rustix::termios::Termios>> = Mutex::new(None);

/// Raw mode on stdin's terminal while this lives. The settings are also put back by
/// [`restore_terminal`] (on detach) and by a panic hook.
pub struct RawMode(());

impl RawMode {
    pub fn enter() -> std::io::Result<Self> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        raw.make_raw();
        // Output processing stays as it was, so this process's own messages on the same
        // terminal still start at the left margin (the guest's output already has CR LF).
        raw.output_modes = saved.output_modes;
        *support::lock(&SAVED) = Some(saved);
        install_panic_hook();
        if let Err(e) =
            rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
        {
            support::lock(&SAVED).take();
            return Err(e.into());
        }
        Ok(Self(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Puts the terminal back as it was before raw mode, if raw mode is on.
pub fn restore_terminal() {
    if let Some(saved) = support::lock(&SAVED).take() {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin().as_fd(),
            rustix::termios::OptionalActions::Now,
            &saved,
        );
    }
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

/// How forwarding input ended.
#[derive(Debug, PartialEq, Eq)]
pub enum InputEnd<E> {
    /// The user pressed Ctrl-] (terminal only).
    Detach,
    /// Stdin ended or failed.
    Eof,
    /// `send` refused more input, and why.
    Refused(E),
}

/// Reads stdin and hands the bytes to `send` until it ends; on a terminal, Ctrl-] stops it
/// (the bytes before it are sent, the key itself is not).
pub fn forward<E>(kind: Stdin, mut send: impl FnMut(&[u8]) -> Result<(), E>) -> InputEnd<E> {
    if kind == Stdin::Nothing {
        return InputEnd::Eof;
    }
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return InputEnd::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return InputEnd::Eof,
        };
        let chunk = &buf[..n];
        let detach = match kind {
            Stdin::Terminal => chunk.iter().position(|&b| b == DETACH),
            _ => None,
        };
        let keys = &chunk[..detach.unwrap_or(n)];
        if !keys.is_empty() {
            if let Err(why) = send(keys) {
                return InputEnd::Refused(why);
            }
        }
        if detach.is_some() {
            return InputEnd::Detach;
        }
    }
}

/// How often a console connection checks whether its viewer has ended (the VM stopped).
const SESSION_POLL: Duration = Duration::from_millis(250);

/// A `console [--write] [--force]` connection on the control socket: the reply line, then the
/// replay and live output; with `--write`, the client's bytes (`early` first: what came with the
/// command line) go to COM1. Ends when the client goes or the VM stops.
pub fn serve(mut stream: UnixStream, early: &[u8], console: &Arc<Console>, args: &str) {
    let (mut write, mut force) = (false, false);
    for flag in args.split_whitespace() {
        match flag {
            "--write" => write = true,
            "--force" => force = true,
            other => {
                let _ = writeln!(
                    stream,
                    "error: console: unknown option '{}' (console [--write] [--force])",
                    other.chars().take(32).collect::<String>()
                );
                return;
            }
        }
    }
    let who = match rustix::net::sockopt::socket_peercred(&stream) {
        Ok(cred) => format!("`viridian vm console` (pid {})", cred.pid.as_raw_nonzero()),
        Err(_) => "a `viridian vm console` client".to_string(),
    };
    let mut writer = None;
    if write {
        match console.take_input(&who, force) {
            Ok(w) => writer = Some(w),
            Err(e) => {
                let _ = writeln!(
                    stream,
                    "error: {e}; attach with --read-only to watch, or --force to take the input over"
                );
                return;
            }
        }
    }
    let mode = if writer.is_some() {
        "input is yours"
    } else {
        "read-only"
    };
    let Ok(sink) = stream.try_clone() else { return };
    if writeln!(stream, "ok: console attached, {mode}").is_err() {
        return;
    }
    let viewer = match console.attach(&who, Box::new(sink), true, WhenSlow::Disconnect) {
        Ok(v) => v,
        Err(_) => return,
    };
    let _ = stream.set_read_timeout(Some(SESSION_POLL));
    let mut buf = [0u8; 4096];
    let mut pending = early.to_vec();
    loop {
        if !pending.is_empty() {
            if let Some(w) = &writer {
                // A guest that does not read keeps this waiting; a client that left meanwhile
                // must not keep the input.
                match w.send_while(&pending, || !hung_up(&stream)) {
                    Ok(()) => {}
                    Err(InputError::Stopped | InputError::Cancelled) => break,
                    Err(e) => {
                        viewer.notice(&format!(
                            "\r\n[viridian: {e}; this connection is read-only now]\r\n"
                        ));
                        writer = None;
                    }
                }
            }
            pending.clear();
        }
        match stream.read(&mut buf) {
            // The client went away.
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if viewer.ended().is_some() {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    drop(writer);
    viewer.detach();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Whether the peer of `stream` has closed its end.
fn hung_up(stream: &UnixStream) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(stream, PollFlags::RDHUP)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now)).is_ok()
        && fds[0]
            .revents()
            .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
}

/// `viridian vm console`: attaches this terminal (or piped stdin) to a VM's console through
/// its control socket until Ctrl-], or until the VM stops.
pub fn attach(socket: &Path, name: &str, read_only: bool, force: bool) -> anyhow::Result<i32> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach {name}'s control socket {} (is the VM running? `viridian vm list`)",
            socket.display()
        )
    })?;
    let command = match (read_only, force) {
        (true, _) => "console",
        (false, false) => "console --write",
        (false, true) => "console --write --force",
    };
    writeln!(stream, "{command}")?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut output = BufReader::new(stream.try_clone()?);
    let mut reply = String::new();
    output.read_line(&mut reply)?;
    let reply = reply.trim_end();
    if let Some(e) = reply.strip_prefix("error: ") {
        anyhow::bail!("{e}");
    }
    anyhow::ensure!(
        reply.starts_with("ok"),
        "the VM closed the console connection"
    );
    stream.set_read_timeout(None)?;
    let kind = stdin_kind();
    eprintln!(
        "viridian: attached to {name}'s console{}{}",
        if read_only { " (read-only)" } else { "" },
        if kind == Stdin::Terminal {
            "; Ctrl-] detaches"
        } else {
            ""
        }
    );
    let raw = match kind {
        Stdin::Terminal => Some(RawMode::enter().context("cannot put the terminal in raw mode")?),
        _ => None,
    };
    let (done, ended) = std::sync::mpsc::channel();
    let closed = done.clone();
    std::thread::Builder::new()
        .name("console-output".into())
        .spawn(move || {
            let _ = std::io::copy(&mut output, &mut Unbuffered(std::io::stdout()));
            let _ = closed.send(false);
        })?;
    // With --read-only, keys other than Ctrl-] are dropped, and piped input is not read.
    let input = if read_only && kind != Stdin::Terminal {
        Stdin::Nothing
    } else {
        kind
    };
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let end = forward(input, |keys| {
                if read_only {
                    Ok(())
                } else {
                    stream.write_all(keys)
                }
            });
            // At the end of piped input the output goes on; the client stays connected.
            match end {
                InputEnd::Eof => {}
                InputEnd::Detach => {
                    let _ = done.send(true);
                }
                // The VM's side went away.
                InputEnd::Refused(_) => {
                    let _ = done.send(false);
                }
            }
        })?;
    let detached = ended.recv().unwrap_or(false);
    drop(raw);
    if detached {
        eprintln!("\nviridian: detached from {name}'s console; the VM goes on running");
    } else {
        eprintln!("\nviridian: {name}'s console closed (the VM stopped)");
    }
    Ok(0)
}

/// Stdout, flushed after every write: console output is interactive.
struct Unbuffered(std::io::Stdout);

impl Write for Unbuffered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = self.0.lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
