//! The terminal side of the console: what stdin is, raw mode with a restore on every exit
//! path, and forwarding keys or piped bytes to the guest until Ctrl-] or end of input.

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::sync::Mutex;

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
