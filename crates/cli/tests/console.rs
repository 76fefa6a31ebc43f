//! The guest's console input, with a tiny guest on the host's KVM that echoes COM1 and powers
//! off after a `q`: piped stdin of `viridian run` reaches the guest in order and complete
//! (more than the UART's FIFO and input queue hold at once).

mod common;

use common::{kvm_usable, tiny_kernel, ECHO};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Text without a `q`, `n` bytes long, in lines.
fn text(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            if i % 61 == 60 {
                b'\n'
            } else {
                b"abcdefghijklmnoprstuvwxyz0123456789"[i % 35]
            }
        })
        .collect()
}

/// Runs the echo guest with `input` piped into `viridian run`; returns its stdout.
fn echo_through_stdin(name: &str, input: &[u8]) -> Vec<u8> {
    let kernel = tiny_kernel(name, ECHO);
    let mut child = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["run", "--memory", "64M", "--kernel"])
        .arg(kernel)
        .env(
            "VIRIDIAN_RUN_DIR",
            std::env::temp_dir().join(format!("viridian-console-{name}-{}", std::process::id())),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).map(|_| out)
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the echo guest did not power off");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    feeder.join().unwrap().unwrap();
    reader.join().unwrap().unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn piped_stdin_is_typed_into_the_guest() {
    if !kvm_usable() {
        return;
    }
    let out = echo_through_stdin("echo-short", b"root\nhello world\nq");
    assert_eq!(out, b"root\nhello world\nq");
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn pasted_input_larger_than_every_buffer_arrives_whole() {
    if !kvm_usable() {
        return;
    }
    // 200 KB: three times the input queue, 3000 times the FIFO.
    let mut input = text(200_000);
    input.push(b'q');
    let started = Instant::now();
    let out = echo_through_stdin("echo-paste", &input);
    eprintln!("200 KB echoed in {:?}", started.elapsed());
    assert_eq!(out.len(), input.len());
    assert!(out == input, "the echo differs from the input");
}

/// Killed when the test ends, whatever happens.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits for the exit status, up to `limit`.
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(started.elapsed() < limit, "no exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reads the rest of stdout in a thread.
    fn stdout(&mut self) -> std::thread::JoinHandle<Vec<u8>> {
        let mut out = self.0.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        })
    }
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `viridian vm console`: a writer types, a read-only viewer joins later and gets the replay, a
/// second writer is refused naming the holder, `--force` takes the input over, and every client
/// ends when the guest powers off.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn vm_console_attaches_watches_and_takes_over() {
    if !kvm_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("viridian-vmconsole-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run_dir = dir.join("run");
    let log = dir.join("console.log");
    let viridian = env!("CARGO_BIN_EXE_viridian");
    let mut vm = Proc(
        Command::new(viridian)
            .args(["run", "--name", "echo", "--memory", "64M", "--kernel"])
            .arg(tiny_kernel("echo-vmconsole", ECHO))
            .arg("--serial")
            .arg(&log)
            .env("VIRIDIAN_RUN_DIR", &run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let vm_stdout = vm.stdout();
    let socket = run_dir.join("echo.sock");
    wait_until("the control socket", Duration::from_secs(60), || {
        socket.exists()
    });
    let console = |args: &[&str], stdin: Stdio| {
        Proc(
            Command::new(viridian)
                .args(["vm", "console", "echo"])
                .args(args)
                .env("VIRIDIAN_RUN_DIR", &run_dir)
                .stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    };
    let logged = || std::fs::read(&log).unwrap_or_default();

    // A writer with piped input, kept open.
    let mut writer = console(&[], Stdio::piped());
    let writer_out = writer.stdout();
    let mut typing = writer.0.stdin.take().unwrap();
    typing.write_all(b"abc").unwrap();
    wait_until("the echo of abc", Duration::from_secs(30), || {
        logged() == b"abc"
    });

    // A viewer that comes later gets the replay.
    let mut viewer = console(&["--read-only"], Stdio::null());
    let viewer_out = viewer.stdout();

    // A second writer is refused, and told who holds the input.
    let refused = Command::new(viridian)
        .args(["vm", "console", "echo"])
        .env("VIRIDIAN_RUN_DIR", &run_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("held by `viridian vm console` (pid"), "{why}");
    assert!(why.contains("--force"), "{why}");

    // --force takes over; the first writer's keys go nowhere now, and it is told so.
    let mut forced = console(&["--force"], Stdio::piped());
    let forced_out = forced.stdout();
    let mut forcing = forced.0.stdin.take().unwrap();
    forcing.write_all(b"def ").unwrap();
    wait_until("the echo of def", Duration::from_secs(30), || {
        logged() == b"abcdef "
    });
    typing.write_all(b"x").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Its `q` powers the guest off.
    forcing.write_all(b"q").unwrap();
    assert_eq!(vm.wait(Duration::from_secs(60)).code(), Some(0));
    let whole = b"abcdef q".to_vec();
    assert_eq!(
        logged(),
        whole,
        "the taken-over writer's x did not reach the guest"
    );
    assert_eq!(vm_stdout.join().unwrap(), whole);
    for (who, p, out) in [
        ("the viewer", &mut viewer, viewer_out),
        ("the forcing writer", &mut forced, forced_out),
        ("the first writer", &mut writer, writer_out),
    ] {
        assert!(
            p.wait(Duration::from_secs(20)).success(),
            "{who} exits 0 when the VM stops"
        );
        let out = String::from_utf8_lossy(&out.join().unwrap()).into_owned();
        if who == "the first writer" {
            assert!(out.starts_with("abcdef "), "{out}");
            assert!(
                out.contains(
                    "[viridian: console input was taken over by `viridian vm console` (pid"
                ),
                "{out}"
            );
            assert!(out.ends_with("q"), "{out}");
        } else {
            assert_eq!(out, String::from_utf8_lossy(&whole), "{who}");
        }
    }
}

/// A pseudo-terminal: the master end (the "user") and the slave end (the terminal
/// `viridian run` gets as stdin, stdout and stderr).
struct Pty {
    master: std::fs::File,
    slave: std::fs::File,
    screen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Pty {
    fn open() -> Self {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master =
            openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_str().unwrap())
            .unwrap();
        let master = std::fs::File::from(master);
        let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut reader, shown) = (master.try_clone().unwrap(), screen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                shown.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            master,
            slave,
            screen,
        }
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, text: &str) {
        wait_until(
            &format!("{text:?} on the terminal"),
            Duration::from_secs(60),
            || self.screen().contains(text),
        );
    }

    fn typ(&mut self, keys: &[u8]) {
        self.master.write_all(keys).unwrap();
    }

    /// The terminal's settings that raw mode changes.
    fn modes(&self) -> String {
        let t = rustix::termios::tcgetattr(&self.slave).unwrap();
        format!(
            "{:?} {:?} {:?} {:?}",
            t.input_modes, t.output_modes, t.control_modes, t.local_modes
        )
    }

    fn is_raw(&self) -> bool {
        let t = rustix::termios::tcgetattr(&self.slave).unwrap();
        !t.local_modes.contains(rustix::termios::LocalModes::ICANON)
    }

    /// `viridian run` on this terminal.
    fn run(&self, name: &str, code: &[u8], run_dir: &std::path::Path) -> Proc {
        let tty = || Stdio::from(self.slave.try_clone().unwrap());
        Proc(
            Command::new(env!("CARGO_BIN_EXE_viridian"))
                .args(["run", "--name", name, "--memory", "64M", "--kernel"])
                .arg(tiny_kernel(name, code))
                .env("VIRIDIAN_RUN_DIR", run_dir)
                .stdin(tty())
                .stdout(tty())
                .stderr(tty())
                .spawn()
                .unwrap(),
        )
    }
}

/// On a terminal, `viridian run` goes raw: keys reach the guest one by one (Ctrl-C included),
/// Ctrl-] detaches with the terminal restored while the VM goes on, and the terminal is
/// restored when the guest powers off and on SIGTERM.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn a_terminal_is_raw_while_attached_and_restored_on_every_exit() {
    if !kvm_usable() {
        return;
    }
    let run_dir = std::env::temp_dir().join(format!("viridian-pty-{}", std::process::id()));
    let mut pty = Pty::open();
    let cooked = pty.modes();
    assert!(!pty.is_raw());

    // Ctrl-]: detached, terminal restored, the VM still there.
    let mut vm = pty.run("pty-detach", ECHO, &run_dir);
    wait_until("raw mode", Duration::from_secs(60), || pty.is_raw());
    pty.typ(b"hi\x03");
    // Echoed by the guest, not by the terminal (no line editing, no signal for Ctrl-C).
    pty.wait_for("hi\x03");
    pty.typ(b"\x1d");
    pty.wait_for("viridian vm console pty-detach");
    assert_eq!(pty.modes(), cooked);
    assert!(vm.0.try_wait().unwrap().is_none(), "the VM goes on running");
    let reattached = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["vm", "console", "pty-detach"])
        .env("VIRIDIAN_RUN_DIR", &run_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reattached = Proc(reattached);
    let replay = reattached.stdout();
    reattached.0.stdin.take().unwrap().write_all(b"q").unwrap();
    assert_eq!(vm.wait(Duration::from_secs(60)).code(), Some(0));
    assert!(reattached.wait(Duration::from_secs(20)).success());
    assert_eq!(replay.join().unwrap(), b"hi\x03q");
    assert!(
        !pty.screen().ends_with('q'),
        "a detached terminal gets no more output"
    );

    // The guest powers off while the terminal is raw.
    let mut vm = pty.run("pty-off", ECHO, &run_dir);
    wait_until("raw mode", Duration::from_secs(60), || pty.is_raw());
    pty.typ(b"q");
    assert_eq!(vm.wait(Duration::from_secs(60)).code(), Some(0));
    assert_eq!(pty.modes(), cooked);

    // SIGTERM while the terminal is raw.
    let mut vm = pty.run("pty-term", common::SPIN, &run_dir);
    wait_until("raw mode", Duration::from_secs(60), || pty.is_raw());
    assert!(Command::new("kill")
        .args(["-TERM", &vm.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert_eq!(vm.wait(Duration::from_secs(20)).code(), Some(130));
    assert_eq!(pty.modes(), cooked);
}

/// Asks the control socket for the console's input; returns the reply line.
fn ask_for_input(socket: &std::path::Path) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(b"console --write\n").unwrap();
    let mut reply = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut reply).unwrap();
    reply
}

/// A writer pasting into a guest that reads nothing waits for it; when that writer goes away
/// (killed), the input is free again for the next one.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn a_writer_that_leaves_while_the_guest_reads_nothing_frees_the_input() {
    if !kvm_usable() {
        return;
    }
    let run_dir = std::env::temp_dir().join(format!("viridian-stuck-{}", std::process::id()));
    let viridian = env!("CARGO_BIN_EXE_viridian");
    let _vm = Proc(
        Command::new(viridian)
            .args(["run", "--name", "deaf", "--memory", "64M", "--kernel"])
            .arg(tiny_kernel("deaf", common::SPIN))
            .env("VIRIDIAN_RUN_DIR", &run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let socket = run_dir.join("deaf.sock");
    wait_until("the control socket", Duration::from_secs(60), || {
        socket.exists()
    });
    let mut paster = Proc(
        Command::new(viridian)
            .args(["vm", "console", "deaf"])
            .env("VIRIDIAN_RUN_DIR", &run_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Probe only once the paster holds the input: a probe is a writer too, and one that got
    // in first would turn the paster away.
    let mut said = String::new();
    let mut errors = std::io::BufReader::new(paster.0.stderr.take().unwrap());
    std::io::BufRead::read_line(&mut errors, &mut said).unwrap();
    assert!(said.contains("attached"), "{said}");
    let mut pipe = paster.0.stdin.take().unwrap();
    std::thread::spawn(move || pipe.write_all(&text(300_000)));
    wait_until(
        "the paste to hold the input",
        Duration::from_secs(30),
        || ask_for_input(&socket).contains("held by `viridian vm console` (pid"),
    );
    paster.0.kill().unwrap();
    paster.wait(Duration::from_secs(10));
    wait_until("the input to be free", Duration::from_secs(10), || {
        ask_for_input(&socket).starts_with("ok: console attached, input is yours")
    });
}
