//! How `viridian run` ends, with tiny guests on the host's KVM: power-off exits 0, a reset
//! exits 3, a triple fault exits 1 with the registers, Ctrl-C exits 130, and
//! `viridian vm stop --force` turns the VM off through its control socket, and `vm pause` /
//! `vm resume` park and release its vCPUs.

mod common;

use common::{kvm_usable, tiny_kernel, POWER_OFF, RESET, SPIN, TRIPLE_FAULT};
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn run_tiny(name: &str, code: &[u8]) -> Output {
    let kernel = tiny_kernel(name, code);
    Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["run", "--memory", "64M", "--kernel"])
        .arg(kernel)
        .env(
            "VIRIDIAN_RUN_DIR",
            std::env::temp_dir().join(format!("viridian-run-{name}")),
        )
        .output()
        .unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn power_off_exits_zero() {
    if !kvm_usable() {
        return;
    }
    let out = run_tiny("off", POWER_OFF);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn reset_exits_three() {
    if !kvm_usable() {
        return;
    }
    let out = run_tiny("reset", RESET);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("reset itself"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn triple_fault_exits_one_with_registers() {
    if !kvm_usable() {
        return;
    }
    let out = run_tiny("fault", TRIPLE_FAULT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // KVM reports a triple fault, or (on hosts whose KVM cannot emulate ud2) an internal
    // error; both name the vCPU and show its registers.
    assert!(
        stderr.contains("triple-faulted") || stderr.contains("vCPU 0:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rip=0x") && stderr.contains("cr0="),
        "{stderr}"
    );
}

/// Waits until the worker's control socket exists (the VM is built and Ctrl-C is handled).
fn wait_for_socket(socket: &std::path::Path) {
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no control socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_with_timeout(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("viridian did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn ctrl_c_stops_the_vm() {
    if !kvm_usable() {
        return;
    }
    // SIGTERM and SIGHUP (a service manager, a closed terminal) stop it as Ctrl-C does.
    for signal in ["INT", "TERM"] {
        let kernel = tiny_kernel(&format!("spin-{signal}"), SPIN);
        let run_dir =
            std::env::temp_dir().join(format!("viridian-run-{signal}-{}", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_viridian"))
            .args(["run", "--name", "int", "--memory", "64M", "--kernel"])
            .arg(kernel)
            .env("VIRIDIAN_RUN_DIR", &run_dir)
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_socket(&run_dir.join("int.sock"));
        let pid = child.id().to_string();
        assert!(Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap()
            .success());
        let status = wait_with_timeout(&mut child, Duration::from_secs(20));
        assert_eq!(status.code(), Some(130), "SIG{signal}");
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        // Where the guest was, the clue to a hung guest.
        assert!(
            stderr.contains("vCPU 0 was stopped at rip=0x"),
            "SIG{signal}: {stderr}"
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn vm_stop_force_turns_the_vm_off() {
    if !kvm_usable() {
        return;
    }
    let run_dir = std::env::temp_dir().join(format!("viridian-run-stop-{}", std::process::id()));
    let kernel = tiny_kernel("spin-stop", SPIN);
    let viridian = env!("CARGO_BIN_EXE_viridian");
    let mut child = Command::new(viridian)
        .args(["run", "--name", "tiny", "--memory", "64M"])
        .args(["--disable-integration", "timesync", "--kernel"])
        .arg(kernel)
        .env("VIRIDIAN_RUN_DIR", &run_dir)
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let socket = run_dir.join("tiny.sock");
    wait_for_socket(&socket);
    let list = Command::new(viridian)
        .args(["vm", "list"])
        .env("VIRIDIAN_RUN_DIR", &run_dir)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains("tiny"));
    // The guest has no shutdown service, so a polite stop fails and says what to do.
    let polite = Command::new(viridian)
        .args(["vm", "stop", "tiny"])
        .env("VIRIDIAN_RUN_DIR", &run_dir)
        .output()
        .unwrap();
    assert!(!polite.status.success());
    assert!(String::from_utf8_lossy(&polite.stderr).contains("--force"));
    // Suspend-VM and Resume-VM on the control socket; a paused VM still turns off.
    let vm = |args: &[&str]| {
        Command::new(viridian)
            .arg("vm")
            .args(args)
            .env("VIRIDIAN_RUN_DIR", &run_dir)
            .output()
            .unwrap()
    };
    let out = vm(&["pause", "tiny"]);
    assert!(out.status.success(), "{out:?}");
    let out = vm(&["status", "tiny"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("paused"),
        "{out:?}"
    );
    let again = vm(&["pause", "tiny"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already paused"),
        "{again:?}"
    );
    assert!(vm(&["resume", "tiny"]).status.success());
    let out = vm(&["status", "tiny"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("running"),
        "{out:?}"
    );
    // Get-/Enable-/Disable-VMIntegrationService; the tiny guest connects none of them.
    let services = |out: &std::process::Output| -> Vec<(String, bool, String)> {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    s["enabled"].as_bool().unwrap(),
                    s["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let listed = services(&vm(&["integration", "tiny", "--json"]));
    let expect = |kvp: bool| {
        vec![
            ("Heartbeat".to_string(), true, "No Contact".to_string()),
            (
                "Key-Value Pair Exchange".to_string(),
                kvp,
                if kvp { "No Contact" } else { "" }.to_string(),
            ),
            ("Shutdown".to_string(), true, "No Contact".to_string()),
            ("Time Synchronization".to_string(), false, String::new()),
        ]
    };
    assert_eq!(listed, expect(true));
    let off = vm(&["integration", "tiny", "--disable", "kvp", "--json"]);
    assert_eq!(services(&off), expect(false), "{off:?}");
    let on = vm(&[
        "integration",
        "tiny",
        "--enable",
        "Key-Value Pair Exchange",
        "--json",
    ]);
    assert_eq!(services(&on), expect(true), "{on:?}");
    let bad = vm(&["integration", "tiny", "--disable", "vss"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown integration service"));
    let out = vm(&["measure", "tiny", "--json"]);
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["memory_bytes"], 64 << 20, "{out:?}");
    assert!(m["cpu_seconds"].as_f64().unwrap() > 0.0, "{out:?}");
    assert!(vm(&["pause", "tiny"]).status.success());
    let forced = Command::new(viridian)
        .args(["vm", "stop", "tiny", "--force"])
        .env("VIRIDIAN_RUN_DIR", &run_dir)
        .output()
        .unwrap();
    assert!(forced.status.success(), "{forced:?}");
    let status = wait_with_timeout(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "the control socket is removed on exit");
}

/// Disks come and go on a running VM through its control socket (Add-/Remove-VMHardDiskDrive):
/// a second writer of an attached file is refused, and a detached file is unlocked again.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn disks_are_hot_added_and_removed_through_the_control_socket() {
    if !kvm_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("viridian-hotdisk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    for p in [&a, &b] {
        std::fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
    }
    let kernel = tiny_kernel("spin-disks", SPIN);
    let run_dir = dir.join("run");
    // Killed when the test ends, whatever happens.
    struct Vm(std::process::Child);
    impl Drop for Vm {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut vm_process = Vm(Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["run", "--name", "hd", "--memory", "64M", "--kernel"])
        .arg(kernel)
        .arg("--disk")
        .arg(&a)
        .env("VIRIDIAN_RUN_DIR", &run_dir)
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .unwrap());
    wait_for_socket(&run_dir.join("hd.sock"));
    let vm = |args: &[&str]| -> Output {
        Command::new(env!("CARGO_BIN_EXE_viridian"))
            .arg("vm")
            .args(args)
            .env("VIRIDIAN_RUN_DIR", &run_dir)
            .output()
            .unwrap()
    };
    let list = || -> serde_json::Value {
        let out = vm(&["disk", "list", "hd", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(list().as_array().unwrap().len(), 1);
    assert_eq!(list()[0]["location"], 0);
    // Hot add at the lowest free location.
    let out = vm(&["disk", "add", "hd", b.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("location 1"),
        "{out:?}"
    );
    let l = list();
    assert_eq!(l.as_array().unwrap().len(), 2);
    assert_eq!(l[1]["path"], b.to_str().unwrap());
    assert_eq!(l[1]["format"], "raw");
    // The same file again is a second writer: refused, naming the file.
    let out = vm(&["disk", "add", "hd", b.to_str().unwrap(), "--location", "5"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("b.img"), "{err}");
    // A taken location and a missing disk are errors too.
    let out = vm(&[
        "disk",
        "add",
        "hd",
        a.to_str().unwrap(),
        "--location",
        "0",
        "--readonly",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("location 0 of controller 0 is in use") && err.contains("a.img"),
        "{out:?}"
    );
    let out = vm(&["disk", "remove", "hd", "--location", "9"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no drive at location 9 of controller 0"),
        "{out:?}"
    );
    let out = vm(&[
        "disk",
        "add",
        "hd",
        a.to_str().unwrap(),
        "--controller",
        "4",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("controller 4 is out of range"),
        "{out:?}"
    );
    // Hot remove: the file is unlocked again, so it can be attached once more.
    let out = vm(&["disk", "remove", "hd", "--location", "1"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(list().as_array().unwrap().len(), 1);
    let out = vm(&["disk", "add", "hd", b.to_str().unwrap(), "--location", "3"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(list()[1]["location"], 3);
    let out = vm(&["stop", "hd", "--force"]);
    assert!(out.status.success(), "{out:?}");
    wait_with_timeout(&mut vm_process.0, Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Placement and DVD drives on a running VM: disks and DVDs placed with `controller=` and
/// `location=` at start, DVDs after the disks by default, each used controller its own VMBus
/// device; a disk hot-added on a controller the VM lacks adds (offers) that controller; the
/// DVD medium is ejected and inserted through `viridian vm dvd`.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn drives_are_placed_on_controllers_and_dvd_media_change() {
    if !kvm_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("viridian-placed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b, c) = (dir.join("a.img"), dir.join("b.img"), dir.join("c.img"));
    let (iso1, iso2) = (dir.join("one.iso"), dir.join("two.iso"));
    for p in [&a, &b, &c, &iso1, &iso2] {
        std::fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
    }
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let kernel = tiny_kernel("spin-placed", SPIN);
    let run_dir = dir.join("run");
    struct Vm(std::process::Child);
    impl Drop for Vm {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut vm_process = Vm(Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["run", "--name", "pl", "--memory", "64M", "--kernel"])
        .arg(kernel)
        .args(["--disk", &s(&a)])
        .args([
            "--disk",
            &format!("{},controller=1,location=7,readonly", s(&b)),
        ])
        .args(["--dvd", &s(&iso1)])
        .args(["--dvd", "none,controller=1"])
        .env("VIRIDIAN_RUN_DIR", &run_dir)
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .unwrap());
    wait_for_socket(&run_dir.join("pl.sock"));
    let vm = |args: &[&str]| -> Output {
        Command::new(env!("CARGO_BIN_EXE_viridian"))
            .arg("vm")
            .args(args)
            .env("VIRIDIAN_RUN_DIR", &run_dir)
            .output()
            .unwrap()
    };
    let list = || -> Vec<serde_json::Value> {
        let out = vm(&["disk", "list", "pl", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let places = |l: &[serde_json::Value]| -> Vec<(u64, u64, String, String)> {
        l.iter()
            .map(|d| {
                (
                    d["controller"].as_u64().unwrap(),
                    d["location"].as_u64().unwrap(),
                    d["kind"].as_str().unwrap().to_string(),
                    d["path"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let dvd = "dvd".to_string();
    let disk = "disk".to_string();
    assert_eq!(
        places(&list()),
        vec![
            (0, 0, disk.clone(), s(&a)),
            (0, 1, dvd.clone(), s(&iso1)),
            (1, 0, dvd.clone(), String::new()),
            (1, 7, disk.clone(), s(&b)),
        ]
    );
    let l = list();
    assert_eq!(l[1]["read_only"], true);
    assert_eq!(l[1]["format"], "ISO");
    assert_eq!(l[3]["read_only"], true);
    // Two controllers, two VMBus devices with their own instance ids.
    let out = vm(&["inspect", "pl"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("5c510000") && text.contains("5c510001") && !text.contains("5c510002"),
        "{text}"
    );
    // A disk on controller 2, which the VM does not have yet: the controller is offered.
    let out = vm(&[
        "disk",
        "add",
        "pl",
        &s(&c),
        "--controller",
        "2",
        "--location",
        "5",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("location 5 of controller 2"),
        "{out:?}"
    );
    let text = String::from_utf8_lossy(&vm(&["inspect", "pl"]).stdout).into_owned();
    assert!(text.contains("5c510002"), "{text}");
    assert_eq!(places(&list()).last(), Some(&(2, 5, disk.clone(), s(&c))));
    // DVD media: eject the first drive, insert into the empty one, and errors by name.
    let out = vm(&["dvd", "pl", "--eject"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("one.iso ejected from location 1 of controller 0"),
        "{out:?}"
    );
    let out = vm(&["dvd", "pl", "--path", &s(&iso2), "--controller", "1"]);
    assert!(out.status.success(), "{out:?}");
    let out = vm(&["dvd", "pl", "--json"]);
    let dvds: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        places(&dvds),
        vec![(0, 1, dvd.clone(), String::new()), (1, 0, dvd, s(&iso2))]
    );
    let out = vm(&["dvd", "pl", "--path", &s(&iso1), "--location", "0"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("the drive at location 0 of controller 0 is not a DVD drive"),
        "{out:?}"
    );
    // The loaded ISO takes no write lock: it can be attached again as a read-only disk.
    let out = vm(&["disk", "add", "pl", &s(&iso2), "--readonly"]);
    assert!(out.status.success(), "{out:?}");
    let out = vm(&["stop", "pl", "--force"]);
    assert!(out.status.success(), "{out:?}");
    wait_with_timeout(&mut vm_process.0, Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&dir);
}
