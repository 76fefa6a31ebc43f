//! Save-VM in the foreground worker, with a tiny guest on the host's KVM: `viridian vm save-to`
//! writes the whole VM to a file and ends it; `viridian run --restore` resumes it where it was
//! (the count on COM1 goes on from where it stopped, the guest's Hyper-V state is still there).
//! Broken saved-state files are refused with one line naming the file and the offset.

mod common;

use common::{assert_counts_on, kvm_usable, tiny_kernel, COUNT};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("viridian-save-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn viridian(run_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_viridian"));
    c.env("VIRIDIAN_RUN_DIR", run_dir);
    c
}

fn spawn_run(run_dir: &Path, args: &[&str]) -> Child {
    viridian(run_dir)
        .arg("run")
        .args(args)
        .arg("--no-console-input")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split('\n')
        .map(str::to_string)
        .collect()
}

fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status.code(), err);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("viridian did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn save(run_dir: &Path, socket: &Path, file: &Path) -> std::process::Output {
    viridian(run_dir)
        .args(["vm", "save-to", "--socket"])
        .arg(socket)
        .arg("--path")
        .arg(file)
        .output()
        .unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn a_saved_vm_resumes_where_it_was() {
    if !kvm_usable() {
        return;
    }
    let d = dir("resume");
    let kernel = tiny_kernel("count", COUNT);
    let (socket, first_log, state) = (d.join("a.sock"), d.join("first.log"), d.join("vm.saved"));
    let child = spawn_run(
        &d,
        &[
            "--memory",
            "64M",
            "--control-socket",
            socket.to_str().unwrap(),
            "--serial",
            first_log.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
        ],
    );
    wait_for("the guest's count", Duration::from_secs(30), || {
        lines(&first_log).len() > 20
    });
    let started = Instant::now();
    let out = save(&d, &socket, &state);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("saved to"), "{stderr}");
    let (code, err) = finish(child, Duration::from_secs(20));
    assert_eq!(code, Some(0), "a saved worker exits 0: {err}");
    assert!(err.contains("the VM was saved"), "{err}");
    let before = std::fs::read_to_string(&first_log).unwrap();
    let counted = assert_counts_on(&before);
    let size = std::fs::metadata(&state).unwrap().len();
    eprintln!(
        "saved a 64 MiB guest at count {counted} in {took:?}: a {} KiB file",
        size >> 10
    );
    assert!(size < 8 << 20, "zero pages are not written: {size} bytes");

    // Restore it, twice from the same file: each resumes from the same place.
    for round in 0..2 {
        let log = d.join(format!("restored-{round}.log"));
        let socket = d.join(format!("r{round}.sock"));
        let started = Instant::now();
        let child = spawn_run(
            &d,
            &[
                "--restore",
                state.to_str().unwrap(),
                "--control-socket",
                socket.to_str().unwrap(),
                "--serial",
                log.to_str().unwrap(),
            ],
        );
        wait_for("the restored count", Duration::from_secs(30), || {
            lines(&log).len() > 10
        });
        eprintln!(
            "round {round}: counting again {:?} after the restore began",
            started.elapsed()
        );
        let out = viridian(&d)
            .args(["vm", "stop", "--force", "--socket"])
            .arg(&socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let (code, err) = finish(child, Duration::from_secs(20));
        assert_eq!(code, Some(0), "{err}");
        let after = std::fs::read_to_string(&log).unwrap();
        let total = assert_counts_on(&format!("{before}{after}"));
        assert!(
            total > counted + 5,
            "the restored guest counted on: {after}"
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn broken_saved_state_files_are_refused_in_one_line() {
    if !kvm_usable() {
        return;
    }
    let d = dir("broken");
    let restore = |file: &Path| {
        let out = viridian(&d)
            .args(["run", "--no-console-input", "--restore"])
            .arg(file)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let garbage = d.join("garbage");
    std::fs::write(&garbage, b"not a saved state at all").unwrap();
    let err = restore(&garbage);
    assert!(
        err.contains(&format!(
            "{}: offset 0: not a Viridian saved-state file",
            garbage.display()
        )),
        "{err}"
    );
    let empty = d.join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert!(restore(&empty).contains("offset 0: cannot read the file header"));
    let missing = restore(&d.join("missing"));
    assert!(missing.contains("cannot open"), "{missing}");

    // A real file, then broken in its version, its configuration and its end.
    let kernel = tiny_kernel("count-broken", COUNT);
    let socket = d.join("b.sock");
    let child = spawn_run(
        &d,
        &[
            "--memory",
            "64M",
            "--control-socket",
            socket.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
        ],
    );
    wait_for("the control socket", Duration::from_secs(30), || {
        socket.exists()
    });
    std::thread::sleep(Duration::from_millis(200));
    let state = d.join("good.saved");
    assert!(save(&d, &socket, &state).status.success());
    finish(child, Duration::from_secs(20));
    let good = std::fs::read(&state).unwrap();

    let bad = d.join("bad.saved");
    let mut v = good.clone();
    v[8] = 7;
    std::fs::write(&bad, &v).unwrap();
    let err = restore(&bad);
    assert!(
        err.contains("offset 8: saved-state format version 7 is not supported"),
        "{err}"
    );
    let mut v = good.clone();
    v[40] ^= 0x01;
    std::fs::write(&bad, &v).unwrap();
    assert!(restore(&bad).contains("checksum mismatch"));
    std::fs::write(&bad, &good[..good.len() / 2]).unwrap();
    let err = restore(&bad);
    assert!(
        err.contains(&format!("{}: offset ", bad.display())),
        "{err}"
    );
    // A size field flipped: the RAM section's length.
    let mut v = good.clone();
    let conf = u64::from_le_bytes(v[24..32].try_into().unwrap()) as usize;
    let mach_at = 16 + 16 + conf;
    let mach = u64::from_le_bytes(v[mach_at + 8..mach_at + 16].try_into().unwrap()) as usize;
    let ram_len_at = mach_at + 16 + mach + 8;
    v[ram_len_at + 5] ^= 0x80;
    std::fs::write(&bad, &v).unwrap();
    let err = restore(&bad);
    assert!(err.contains("RAM section"), "{err}");
}

/// A save that fails once the VM has stopped for it (here its `PATH.tmp` is a directory, so
/// the file cannot be made) turns the VM off, and `viridian run` says that the save failed and
/// why, with exit status 1, rather than that someone turned it off.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn a_failed_save_says_why_the_vm_ended() {
    if !kvm_usable() {
        return;
    }
    let d = dir("failed");
    let kernel = tiny_kernel("count-failed", COUNT);
    let (socket, log) = (d.join("f.sock"), d.join("f.log"));
    let child = spawn_run(
        &d,
        &[
            "--memory",
            "64M",
            "--control-socket",
            socket.to_str().unwrap(),
            "--serial",
            log.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
        ],
    );
    wait_for("the guest's count", Duration::from_secs(30), || {
        lines(&log).len() > 5
    });
    let state = d.join("vm.saved");
    std::fs::create_dir(d.join("vm.saved.tmp")).unwrap();
    let out = save(&d, &socket, &state);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let (code, err) = finish(child, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("viridian: saving the VM failed: cannot write")
            && err.contains("the VM was turned off"),
        "{err}"
    );
    assert!(!err.contains("vm stop --force"), "{err}");
    assert!(!state.exists());
}
