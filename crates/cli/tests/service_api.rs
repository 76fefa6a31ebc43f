//! The management service against a real `viridiand` on a temporary state directory and
//! socket, with real workers (`viridian run`) running tiny guests on this host's KVM: the
//! API's answers and errors, the lifecycle, dying workers, a killed service adopting its
//! workers again, the socket's authorisation, and the CLI verbs.

mod common;

use api::client::Client;
use common::{kvm_usable, tiny_kernel, ECHO, POWER_OFF, SPIN};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running viridiand; killed (with its VMs' workers) when dropped.
struct Service {
    child: Child,
    dir: tempfile::TempDir,
    client: Client,
    args: Vec<String>,
}

impl Service {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Other users must reach the socket for the 403 test.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = spawn_service(dir.path(), &args);
        let s = Service {
            child,
            client: Client::new(dir.path().join("d.sock")),
            dir,
            args,
        };
        s.wait_ready();
        s
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("d.sock")
    }

    /// Waits until this service answers (not a listener an earlier one left to a worker it
    /// was forking when it was killed).
    fn wait_ready(&self) {
        let start = Instant::now();
        let pid = u64::from(self.child.id());
        let answers = || {
            self.client
                .get("/service")
                .is_ok_and(|r| r.json()["pid"].as_u64() == Some(pid))
        };
        while !answers() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "viridiand did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("viridiand.log")).unwrap_or_default()
    }

    /// `kill -9` of the service, then a new one on the same state directory.
    fn kill9_and_restart(&mut self) {
        kill9(self.child.id());
        let _ = self.child.wait();
        self.child = spawn_service(self.dir.path(), &self.args);
        self.wait_ready();
    }

    fn req(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
        let r = self.client.request(method, path, bytes.as_deref()).unwrap();
        (r.status, r.json())
    }

    fn vm(&self, name: &str) -> Value {
        let (status, v) = self.req("GET", &format!("/vms/{name}"), None);
        assert_eq!(status, 200, "{v}");
        v
    }

    /// Start-VM, Stop-VM or Restart-VM at `path`: 202 with a Running job on the VM, which is
    /// followed to its end. Answers as the request did when it was refused (a 4xx before any
    /// job), 200 and the VM once the job has completed, or 409 and the job when it failed.
    fn act(&self, path: &str) -> (u16, Value) {
        let (status, job) = self.req("POST", path, None);
        if status != 202 {
            return (status, job);
        }
        assert_eq!(job["state"], "Running", "{path}: {job}");
        let op = path.rsplit('/').next().unwrap().split('?').next().unwrap();
        assert_eq!(job["operation"], op, "{job}");
        let job = self.wait_job(&job);
        if job["state"] == "Failed" {
            assert!(
                job["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{job}"
            );
            return (409, job);
        }
        assert_eq!(job["state"], "Completed", "{path}: {job}");
        assert_eq!(job["percent"], 100, "{job}");
        let vm = self.vm(job["vm"].as_str().unwrap());
        // Its result is the VM's state and status then ("Running (Operating normally)").
        let result = job["progress"].as_str().unwrap();
        assert!(
            result
                .split_once(" (")
                .is_some_and(|(state, _)| ["Off", "Running", "Saved"].contains(&state)),
            "{job}"
        );
        (200, vm)
    }

    /// Polls a job until it is no longer Running.
    fn wait_job(&self, job: &Value) -> Value {
        let start = Instant::now();
        let path = format!("/jobs/{}", job["id"].as_str().unwrap());
        loop {
            let (status, j) = self.req("GET", &path, None);
            assert_eq!(status, 200, "{j}");
            if j["state"] != "Running" {
                return j;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "{j}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn define(&self, name: &str, kernel: &Path, extra: Value) -> Value {
        let mut body = json!({"name": name, "memory": "64M", "kernel": kernel});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = self.req("POST", "/vms", Some(body));
        assert_eq!(status, 201, "{v}");
        v
    }

    /// Runs the CLI against this service.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_viridian"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    fn wait_for(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let start = Instant::now();
        loop {
            let v = self.vm(name);
            if f(&v) {
                return v;
            }
            assert!(
                start.elapsed() < limit,
                "{name}: not {what} within {limit:?}: {v}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // No spinning guest outlives its test.
        if let Ok(r) = self.client.get("/vms") {
            for vm in r.json().as_array().into_iter().flatten() {
                if let Some(pid) = vm["pid"].as_u64() {
                    kill9(pid as u32);
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_service(dir: &Path, args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("viridiand.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_viridiand"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("d.sock"))
        .arg("--worker")
        .arg(env!("CARGO_BIN_EXE_viridian"))
        .args(args)
        .env("VIRIDIAN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn kill9(pid: u32) {
    let _ = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// CPU time (clock ticks, user and system) process `pid` uses during `span`.
fn cpu_ticks_over(pid: u64, span: Duration) -> u64 {
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<u64> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        fields.iter().sum::<u64>()
    };
    let before = ticks();
    std::thread::sleep(span);
    ticks() - before
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// A new 16 MiB dynamic VHDX at `path` (`viridian vhd new`).
fn vhd_new(path: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .args(["vhd", "new"])
        .arg(path)
        .args(["--size", "16M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// An error answer: the status and the envelope's code; the message must not be empty.
fn assert_error(r: (u16, Value), status: u16, code: &str) -> String {
    let (s, v) = r;
    assert_eq!(s, status, "{v}");
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert!(e["causes"].is_array(), "{v}");
    let msg = e["message"].as_str().unwrap_or_default().to_string();
    assert!(!msg.is_empty(), "{v}");
    msg
}

#[test]
fn crud_and_bad_input() {
    let s = Service::start();
    let kernel = tiny_kernel("svc-crud", SPIN);
    let vm = s.define("web", &kernel, json!({"cpus": 1, "cmdline": "quiet"}));
    assert_eq!(vm["state"], "Off");
    assert_eq!(vm["heartbeat"], "NoContact");
    assert_eq!(vm["memory_bytes"], 64 << 20);
    let folder = PathBuf::from(vm["folder"].as_str().unwrap());
    assert!(folder.is_dir(), "each VM has its folder");
    assert_eq!(s.vm("web")["id"], vm["id"]);
    let (status, list) = s.req("GET", "/vms", None);
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);

    // 409: the name is taken; nothing new is created.
    let body = json!({"name": "web", "memory": "64M", "kernel": kernel});
    assert_error(s.req("POST", "/vms", Some(body)), 409, "duplicate_name");
    assert_eq!(
        std::fs::read_dir(folder.parent().unwrap()).unwrap().count(),
        1
    );
    // 404.
    assert_error(s.req("GET", "/vms/nope", None), 404, "not_found");
    assert_error(s.req("DELETE", "/vms/nope", None), 404, "not_found");
    assert_error(s.act("/vms/nope/start"), 404, "not_found");
    assert_error(s.req("GET", "/nothing/here", None), 404, "no_route");
    // 409: wrong state.
    assert_error(s.act("/vms/web/stop"), 409, "wrong_state");
    assert_error(s.req("POST", "/vms/web/pause", None), 409, "wrong_state");
    assert_error(s.req("POST", "/vms/web/resume", None), 409, "wrong_state");

    // 400: not JSON.
    for raw in [&b"{\"name\": "[..], b"not json", b""] {
        let r = s.client.request("POST", "/vms", Some(raw)).unwrap();
        assert_error((r.status, r.json()), 400, "malformed_json");
    }
    // 413: a huge body.
    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(4 << 20));
    let r = s
        .client
        .request("POST", "/vms", Some(huge.as_bytes()))
        .unwrap();
    assert_error((r.status, r.json()), 413, "body_too_large");

    // 422: each bad field is named.
    let too_long = "n".repeat(101);
    let cases = [
        (json!({"name": "a/b", "kernel": kernel}), "name"),
        (json!({"name": "..", "kernel": kernel}), "name"),
        (json!({"name": "", "kernel": kernel}), "name"),
        (json!({"name": too_long, "kernel": kernel}), "name"),
        (json!({"name": "x", "kernel": "/no/such/kernel"}), "kernel"),
        (json!({"name": "x", "kernel": "relative/kernel"}), "kernel"),
        (
            json!({"name": "x", "kernel": kernel, "initrd": "/no/such/initrd"}),
            "initrd",
        ),
        (json!({"name": "x", "kernel": kernel, "cpus": 0}), "cpus"),
        (
            json!({"name": "x", "kernel": kernel, "cpus": 100000}),
            "cpus",
        ),
        (
            json!({"name": "x", "kernel": kernel, "cpus": "two"}),
            "cpus",
        ),
        (
            json!({"name": "x", "kernel": kernel, "memory": "16M"}),
            "memory",
        ),
        (
            json!({"name": "x", "kernel": kernel, "memory": "100T"}),
            "memory",
        ),
        (
            json!({"name": "x", "kernel": kernel, "memory": "lots"}),
            "memory",
        ),
        (
            json!({"name": "x", "kernel": kernel, "cpu_weight": 0}),
            "cpu_weight",
        ),
        (
            json!({"name": "x", "kernel": kernel, "cpu_limit": 101}),
            "cpu_limit",
        ),
        (
            json!({"name": "x", "kernel": kernel, "recovery": "Sometimes"}),
            "recovery",
        ),
        (
            json!({"name": "x", "kernel": kernel, "colour": "green"}),
            "colour",
        ),
        (json!({"kernel": kernel}), "name"),
    ];
    for (body, field) in cases {
        let msg = assert_error(
            s.req("POST", "/vms", Some(body.clone())),
            422,
            "invalid_field",
        );
        assert!(msg.contains(field), "{body} -> {msg}");
    }
    assert_eq!(
        s.req("GET", "/vms", None).1.as_array().unwrap().len(),
        1,
        "no half-created VM"
    );

    // PATCH: settings and a rename; a bad value changes nothing.
    let (status, v) = s.req(
        "PATCH",
        "/vms/web",
        Some(json!({"cpus": 2, "memory": "128M", "cpu_weight": 200})),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["cpus"].as_u64(), v["memory_bytes"].as_u64()),
        (Some(2), Some(128 << 20))
    );
    let msg = assert_error(
        s.req("PATCH", "/vms/web", Some(json!({"cpus": 1, "memory": "1"}))),
        422,
        "invalid_field",
    );
    assert!(msg.starts_with("memory"), "{msg}");
    assert_eq!(s.vm("web")["cpus"], 2, "a failed PATCH changes nothing");
    s.define("db", &kernel, json!({}));
    assert_error(
        s.req("PATCH", "/vms/db", Some(json!({"name": "web"}))),
        409,
        "duplicate_name",
    );
    let (status, v) = s.req("PATCH", "/vms/db", Some(json!({"name": "db 2"})));
    assert_eq!((status, v["name"].as_str()), (200, Some("db 2")));
    assert_eq!(s.vm("db%202")["name"], "db 2");

    // DELETE removes the row and the folder.
    let (status, _) = s.req("DELETE", "/vms/web", None);
    assert_eq!(status, 204);
    assert_error(s.req("GET", "/vms/web", None), 404, "not_found");
    assert!(!folder.exists(), "the folder goes with the VM");

    // The service and its document.
    let (status, info) = s.req("GET", "/service", None);
    assert_eq!(status, 200);
    assert_eq!(info["vms_defined"], 1);
    let r = s.client.get("/openapi.json").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), api::openapi::document_json());
}

#[test]
fn cli_verbs() {
    let s = Service::start();
    let kernel = tiny_kernel("svc-cli", SPIN);
    let k = kernel.to_str().unwrap();
    let out = s.cli(&[
        "vm", "new", "app", "--cpus", "1", "--memory", "64M", "--kernel", k, "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["name"], "app");
    // `vm new --disk` takes `viridian run`'s cache option.
    let files = tempfile::tempdir().unwrap();
    let image = files.path().join("w.vhdx");
    vhd_new(&image);
    let spec = format!("{},cache=writeback,readonly", image.display());
    let out = s.cli(&[
        "vm", "new", "cached", "--kernel", k, "--disk", &spec, "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            v["disks"][0]["cache"].as_str(),
            v["disks"][0]["read_only"].as_bool()
        ),
        (Some("writeback"), Some(true)),
        "{v}"
    );
    let out = s.cli(&[
        "vm",
        "new",
        "bad",
        "--kernel",
        k,
        "--disk",
        &format!("{},cache=unsafe", image.display()),
    ]);
    assert!(!out.status.success(), "{out:?}");
    let out = s.cli(&["vm", "remove", "cached"]);
    assert!(out.status.success(), "{out:?}");

    let out = s.cli(&["vm", "get", "app", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["name", "id", "state", "heartbeat"] {
        assert!(!v[key].is_null(), "vm get --json lacks {key}: {v}");
    }
    assert_eq!(
        (v["state"].as_str(), v["heartbeat"].as_str()),
        (Some("Off"), Some("NoContact"))
    );

    let out = s.cli(&["vm", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "Name",
            "State",
            "CPUUsage(%)",
            "MemoryAssigned(M)",
            "Uptime",
            "Status"
        ]
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("app ") && l.contains("Off")),
        "{text}"
    );
    let out = s.cli(&["vm", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "app");

    let out = s.cli(&[
        "vm",
        "set",
        "app",
        "--cpu-limit",
        "50",
        "--auto-start",
        "Start",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["cpu_limit"].as_u64(), v["auto_start"].as_str()),
        (Some(50), Some("Start"))
    );

    // Errors name the field and exit 1.
    let out = s.cli(&["vm", "set", "app", "--memory", "12Q"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("memory"),
        "{out:?}"
    );
    let out = s.cli(&["vm", "new", "app", "--kernel", k]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists already"),
        "{out:?}"
    );
    let out = s.cli(&["vm", "get", "ghost"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no VM called 'ghost'"),
        "{out:?}"
    );

    let out = s.cli(&["service", "status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["vms_defined"], 1);
    let out = s.cli(&["service", "status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Cgroups"),
        "{out:?}"
    );

    let out = s.cli(&["vm", "remove", "app"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(s.req("GET", "/vms", None).1, json!([]));
}

#[test]
fn other_users_are_forbidden() {
    let s = Service::start();
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED: setpriv (util-linux) is not installed");
        return;
    }
    // nobody, without the viridian group.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_viridian"))
        .arg("--socket")
        .arg(s.socket())
        .args(["service", "status"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("Permission denied") && !stderr.contains("viridian' group") {
        eprintln!("SKIPPED: user nobody cannot run the test binary here: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("neither root nor in the 'viridian' group"),
        "{stderr}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn lifecycle_with_a_tiny_guest() {
    if !kvm_usable() {
        return;
    }
    let s = Service::start();
    let kernel = tiny_kernel("svc-life", SPIN);
    s.define("spin", &kernel, json!({}));

    // Watch the events stream while the VM starts and stops.
    let mut events = std::os::unix::net::UnixStream::connect(s.socket()).unwrap();
    events
        .write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    events
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(events).lines() {
            let Ok(line) = line else { break };
            if let Some(data) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(data).unwrap();
                seen.push(v["state"].as_str().unwrap().to_string());
                if seen.last().map(String::as_str) == Some("Off") {
                    break;
                }
            }
        }
        seen
    });
    std::thread::sleep(Duration::from_millis(100));

    let started = Instant::now();
    let (status, v) = s.act("/vms/spin/start");
    assert_eq!(status, 200, "{v}");
    eprintln!("start answered Running after {:?}", started.elapsed());
    assert_eq!(v["state"], "Running");
    let pid = v["pid"].as_u64().unwrap();
    assert!(alive(pid));
    assert_eq!(v["memory_assigned_bytes"], 64 << 20);

    assert_error(s.act("/vms/spin/start"), 409, "wrong_state");
    assert_error(s.req("DELETE", "/vms/spin", None), 409, "wrong_state");
    assert_error(
        s.req("PATCH", "/vms/spin", Some(json!({"cpus": 2}))),
        409,
        "wrong_state",
    );
    // Suspend-VM: the spinning vCPU stops using the host's CPU; Resume-VM: it spins again.
    assert_error(s.req("POST", "/vms/spin/resume", None), 409, "wrong_state");
    assert!(
        cpu_ticks_over(pid, Duration::from_secs(1)) >= 5,
        "the guest spins"
    );
    let (status, v) = s.req("POST", "/vms/spin/pause", None);
    assert_eq!((status, v["state"].as_str()), (200, Some("Paused")), "{v}");
    assert_error(s.req("POST", "/vms/spin/pause", None), 409, "wrong_state");
    let paused = cpu_ticks_over(pid, Duration::from_secs(1));
    assert!(paused <= 3, "a paused VM used {paused} ticks in 1 s");
    let (status, v) = s.req("POST", "/vms/spin/resume", None);
    assert_eq!((status, v["state"].as_str()), (200, Some("Running")), "{v}");
    assert!(
        cpu_ticks_over(pid, Duration::from_secs(1)) >= 5,
        "the guest spins again"
    );
    // Measure-VM: the spinning vCPU's time, the guest's memory.
    let (status, m) = s.req("GET", "/vms/spin/measure", None);
    assert_eq!(status, 200, "{m}");
    assert!(m["cpu_seconds"].as_f64().unwrap() > 0.2, "{m}");
    assert_eq!(m["memory_bytes"], 64 << 20, "{m}");
    assert!(m["resident_bytes"].as_u64().unwrap() > 0, "{m}");
    let out = s.cli(&["vm", "measure", "spin"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("CPUTime(s)"),
        "{out:?}"
    );
    // Limits change on a running VM.
    let (status, v) = s.req("PATCH", "/vms/spin", Some(json!({"cpu_limit": 50})));
    assert_eq!((status, v["cpu_limit"].as_u64()), (200, Some(50)));

    let v = s.vm("spin");
    assert_eq!(
        v["heartbeat"], "NoContact",
        "a tiny guest has no heartbeat service"
    );
    let out = s.cli(&["vm", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("spin ") && l.contains("Running")),
        "{text}"
    );

    // The guest has no shutdown service: stop turns it off, and says so.
    let (status, v) = s.act("/vms/spin/stop");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "Off");
    assert!(v["status"].as_str().unwrap().contains("Turned off"), "{v}");
    assert!(!alive(pid), "the worker is gone");
    assert!(v["pid"].is_null());
    let seen = reader.join().unwrap();
    assert_eq!(
        seen,
        ["Starting", "Running", "Paused", "Running", "Stopping", "Off"],
        "events"
    );

    // Through the CLI: start, stop --turn-off, restart.
    let out = s.cli(&["vm", "start", "spin"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Running"),
        "{out:?}"
    );
    let out = s.cli(&["vm", "restart", "spin", "--turn-off"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Running"),
        "{out:?}"
    );
    let out = s.cli(&["vm", "stop", "spin", "--turn-off"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Off (Turned off)"),
        "{out:?}"
    );
    assert_eq!(s.vm("spin")["state"], "Off");
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn a_guest_that_powers_off_goes_off() {
    if !kvm_usable() {
        return;
    }
    let s = Service::start();
    s.define("off", &tiny_kernel("svc-off", POWER_OFF), json!({}));
    let (status, v) = s.act("/vms/off/start");
    assert_eq!(status, 200, "{v}");
    let v = s.wait_for("off", "Off", Duration::from_secs(10), |v| {
        v["state"] == "Off"
    });
    assert_eq!(v["status"], "the guest powered off");
}

/// `viridian vm console NAME` reaches a service's worker through its control socket; the
/// guest echoes COM1 and powers off after a `q`.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn vm_console_reaches_a_service_worker() {
    if !kvm_usable() {
        return;
    }
    let s = Service::start();
    let v = s.define("echo", &tiny_kernel("svc-echo", ECHO), json!({}));
    let out = s.cli(&["vm", "console", "echo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("echo is Off"),
        "{out:?}"
    );
    let (status, body) = s.act("/vms/echo/start");
    assert_eq!(status, 200, "{body}");
    let mut console = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .arg("--socket")
        .arg(s.socket())
        .args(["vm", "console", "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    console.stdin.take().unwrap().write_all(b"hello q").unwrap();
    let out = console.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"hello q");
    s.wait_for("echo", "Off", Duration::from_secs(20), |v| {
        v["state"] == "Off"
    });
    let folder = PathBuf::from(v["folder"].as_str().unwrap());
    assert_eq!(
        std::fs::read(folder.join("console.log")).unwrap(),
        b"hello q"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn a_killed_worker_goes_off_at_once_and_recovery_restarts_it() {
    if !kvm_usable() {
        return;
    }
    let s = Service::start();
    let kernel = tiny_kernel("svc-kill", SPIN);
    s.define("victim", &kernel, json!({}));
    s.define("phoenix", &kernel, json!({"recovery": "Restart"}));
    let pid = s.act("/vms/victim/start").1["pid"].as_u64().unwrap();
    kill9(pid as u32);
    let killed = Instant::now();
    let v = s.wait_for("victim", "Off", Duration::from_secs(1), |v| {
        v["state"] == "Off"
    });
    eprintln!("Off {:?} after kill -9", killed.elapsed());
    assert!(v["status"].as_str().unwrap().contains("signal 9"), "{v}");

    let first = s.act("/vms/phoenix/start").1["pid"].as_u64().unwrap();
    kill9(first as u32);
    let v = s.wait_for("phoenix", "restarted", Duration::from_secs(20), |v| {
        v["state"] == "Running" && v["pid"].as_u64().is_some_and(|p| p != first)
    });
    assert!(alive(v["pid"].as_u64().unwrap()));
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn a_restarted_service_adopts_running_workers() {
    if !kvm_usable() {
        return;
    }
    let mut s = Service::start();
    s.define("keep", &tiny_kernel("svc-adopt", SPIN), json!({}));
    let pid = s.act("/vms/keep/start").1["pid"].as_u64().unwrap();
    s.kill9_and_restart();
    assert!(alive(pid), "the VM survives its service");
    let v = s.vm("keep");
    assert_eq!(
        (v["state"].as_str(), v["pid"].as_u64()),
        (Some("Running"), Some(pid)),
        "{v}"
    );
    assert!(v["status"].as_str().unwrap().contains("adopted"), "{v}");
    // Managed as before: the adopted worker is stopped, and its end is noticed.
    let (status, v) = s.act("/vms/keep/stop?turn_off=true");
    assert_eq!((status, v["state"].as_str()), (200, Some("Off")), "{v}");
    let start = Instant::now();
    while alive(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the worker still runs"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A worker killed while no service runs is Off, with the reason, after the restart.
    let pid = s.act("/vms/keep/start").1["pid"].as_u64().unwrap();
    kill9(s.child.id());
    let _ = s.child.wait();
    kill9(pid as u32);
    let start = Instant::now();
    while alive(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "kill -9 did not end the worker"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    s.kill9_and_restart();
    let v = s.vm("keep");
    assert_eq!(v["state"], "Off", "{v}");
    assert!(
        v["status"]
            .as_str()
            .unwrap()
            .contains("ended while the service was not running"),
        "{v}"
    );
}

/// cli; hlt; jmp back to the hlt: a guest that idles without using the host's CPU.
const IDLE: &[u8] = &[0xfa, 0xf4, 0xeb, 0xfd];

/// `kill -9` of the service, many rounds, while a VM runs and while VMs are being created:
/// the database opens, each VM is defined or not (with its folder, or without a trace), every
/// acknowledged create is kept, and the running worker is adopted again every time.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn service_killed_50_times() {
    if !kvm_usable() {
        return;
    }
    let rounds: usize = std::env::var("VIRIDIAN_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(50);
    let mut s = Service::start();
    let kernel = tiny_kernel("svc-crash", IDLE);
    s.define("steady", &kernel, json!({}));
    let (status, v) = s.act("/vms/steady/start");
    assert_eq!(status, 200, "{v}");
    let pid = v["pid"].as_u64().unwrap();
    let mut acked: Vec<String> = Vec::new();
    let started = Instant::now();
    for round in 0..rounds {
        let client = s.client.clone();
        let k = kernel.clone();
        let creator = std::thread::spawn(move || {
            let mut ok = Vec::new();
            for i in 0.. {
                let name = format!("r{round}-{i}");
                let body = serde_json::to_vec(&json!({"name": name, "memory": "64M", "kernel": k}))
                    .unwrap();
                match client.request("POST", "/vms", Some(&body)) {
                    Ok(r) if r.status == 201 => ok.push(name),
                    Ok(r) => panic!("create {name}: {} {}", r.status, r.text()),
                    Err(_) => break,
                }
            }
            ok
        });
        std::thread::sleep(Duration::from_millis(rand::random_range(0..40)));
        kill9(s.child.id());
        let _ = s.child.wait();
        acked.extend(creator.join().unwrap());
        s.child = spawn_service(s.dir.path(), &s.args);
        s.wait_ready();

        let (status, list) = s.req("GET", "/vms", None);
        assert_eq!(status, 200, "round {round}: {list}");
        let list = list.as_array().unwrap().clone();
        let names: Vec<&str> = list.iter().map(|v| v["name"].as_str().unwrap()).collect();
        for a in &acked {
            assert!(
                names.contains(&a.as_str()),
                "round {round}: acknowledged VM {a} was lost"
            );
        }
        let mut ids: Vec<String> = list
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect();
        let mut folders: Vec<String> = std::fs::read_dir(s.dir.path().join("state/vms"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        folders.sort();
        assert_eq!(
            ids, folders,
            "round {round}: each VM has its folder, and no folder is left over"
        );
        let steady = list.iter().find(|v| v["name"] == "steady").unwrap();
        assert_eq!(
            (steady["state"].as_str(), steady["pid"].as_u64()),
            (Some("Running"), Some(pid)),
            "round {round}: the running worker is adopted again: {steady}"
        );
    }
    // Killed while VMs start: each is Running with its worker adopted, or Off with no worker
    // left behind.
    for round in 0..10 {
        let name = format!("starting-{round}");
        s.define(&name, &kernel, json!({}));
        let client = s.client.clone();
        let path = format!("/vms/{name}/start");
        let starter = std::thread::spawn(move || client.request("POST", &path, None));
        std::thread::sleep(Duration::from_millis(rand::random_range(0..40)));
        kill9(s.child.id());
        let _ = s.child.wait();
        let answer = starter.join().unwrap();
        s.child = spawn_service(s.dir.path(), &s.args);
        s.wait_ready();
        let v = s.vm(&name);
        // An accepted start's job outlives the service: it ended, Completed if the VM runs.
        if let Some(r) = answer.ok().filter(|r| r.status == 202) {
            let id = r.json()["id"].as_str().unwrap().to_string();
            let (status, job) = s.req("GET", &format!("/jobs/{id}"), None);
            assert_eq!(status, 200, "round {round}: the job was lost: {job}");
            let completed = job["state"] == "Completed";
            assert_eq!(
                completed,
                v["state"] == "Running",
                "round {round}: {job} {v}"
            );
            if !completed {
                assert_eq!(job["state"], "Failed", "round {round}: {job}");
                assert!(
                    job["error"]
                        .as_str()
                        .unwrap()
                        .contains("the service stopped"),
                    "round {round}: {job}"
                );
            }
        }
        let workers = Command::new("pgrep")
            .args(["-f", &format!("{}.sock", v["id"].as_str().unwrap())])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .count()
            })
            .unwrap_or(0);
        match v["state"].as_str() {
            Some("Running") => assert_eq!(workers, 1, "round {round}: {v}"),
            Some("Off") => assert_eq!(workers, 0, "round {round}: a worker was left behind: {v}"),
            _ => panic!("round {round}: {v}"),
        }
        if v["state"] == "Running" {
            let (status, v) = s.act(&format!("/vms/{name}/stop?turn_off=true"));
            assert_eq!(status, 200, "{v}");
        }
    }
    eprintln!(
        "{rounds} rounds in {:?}; {} VMs created and acknowledged",
        started.elapsed(),
        acked.len()
    );
    let (status, v) = s.act("/vms/steady/stop?turn_off=true");
    assert_eq!((status, v["state"].as_str()), (200, Some("Off")), "{v}");
    assert!(!alive(pid));
}

/// A TCP port on the loopback that forwards each connection to the service's socket (for
/// tools that speak only TCP).
fn tcp_proxy(socket: PathBuf) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(tcp) = conn else { break };
            let Ok(unix) = std::os::unix::net::UnixStream::connect(&socket) else {
                continue;
            };
            let (mut t2, mut u2) = (tcp.try_clone().unwrap(), unix.try_clone().unwrap());
            let (mut t1, mut u1) = (tcp, unix);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut t1, &mut u1);
                let _ = u1.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut t2);
                let _ = t2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

/// schemathesis (from PyPI; scripts/setup.sh installs it) against the live service with the
/// checked-in document: no 5xx, no answer that breaks the schema. As root, the service runs
/// in a network namespace of its own, so the switches schemathesis makes (bridges, the Default
/// Switch's dnsmasq and NAT) are real but gone with the namespace; otherwise `/switches` is
/// left out, since the service could not make bridges anyway.
#[test]
fn schemathesis_finds_no_server_errors_or_schema_violations() {
    let st = std::env::var("SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    if Command::new(&st).arg("--version").output().is_err() {
        eprintln!("SKIPPED: schemathesis is not installed (pip install schemathesis; scripts/setup.sh does it)");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        vswitch::testing::in_netns(move || {
            vswitch::testing::Net::open().up("lo");
            schemathesis(&st, &[]);
        });
    } else {
        eprintln!("not root: /switches is left out (the service could not make bridges)");
        schemathesis(&st, &["--exclude-path-regex", "^/switches"]);
    }
}

fn schemathesis(st: &str, extra: &[&str]) {
    let s = Service::start();
    s.define("web", &tiny_kernel("svc-st", IDLE), json!({}));
    let port = tcp_proxy(s.socket());
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi.json");
    let out = Command::new(st)
        .args(["run", schema, "--url"])
        .arg(format!("http://127.0.0.1:{port}"))
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--exclude-path",
            "/events",
            "--max-examples",
            "40",
            "--workers",
            "1",
            "--no-color",
        ])
        .args(extra)
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "schemathesis failed:\n{stdout}\n{stderr}\nservice log:\n{}",
        s.log()
    );
}

/// Over TLS (`--listen`, with the certificate made on first start), every request needs a
/// bearer token made with `viridian token new`; a missing, wrong or revoked one gets 401.
#[test]
fn tls_listener_needs_a_valid_token() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIPPED: curl is not installed");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = Service::start_with(&["--listen", &format!("127.0.0.1:{port}")]);
    let cert = s.dir.path().join("state/tls/cert.pem");
    assert!(
        cert.is_file(),
        "a self-signed certificate is made on first start"
    );
    let curl = |token: Option<&str>| -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(&cert)
        .arg(format!("https://127.0.0.1:{port}/vms"));
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        assert!(
            out.status.success(),
            "curl: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            code.parse().unwrap(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    };
    // A client that connects and never says anything holds up no one.
    let _silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_error(curl(None), 401, "unauthorized");
    assert_error(curl(Some("vrd_0000")), 401, "unauthorized");

    let out = s.cli(&["token", "new", "ci"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let token = stdout.lines().last().unwrap().trim().to_string();
    assert!(token.starts_with("vrd_"), "{stdout}");
    let (status, v) = curl(Some(&token));
    assert_eq!((status, v), (200, json!([])));
    let out = s.cli(&["token", "new", "ci"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists already"),
        "{out:?}"
    );
    let out = s.cli(&["token", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "ci");
    assert!(v[0].get("token").is_none(), "a listed token has no secret");
    // Only the hash is stored.
    for f in ["inventory.db", "inventory.db-wal"] {
        let bytes = std::fs::read(s.dir.path().join("state").join(f)).unwrap_or_default();
        let hay = String::from_utf8_lossy(&bytes);
        assert!(!hay.contains(&token[4..]), "{f} holds the token in clear");
    }

    // The CLI against the remote service.
    s.define("far", &tiny_kernel("svc-tls", IDLE), json!({}));
    let remote = |token: &str| {
        Command::new(env!("CARGO_BIN_EXE_viridian"))
            .args(["--host", &format!("https://127.0.0.1:{port}"), "--ca-cert"])
            .arg(&cert)
            .args(["vm", "list", "--json"])
            .env("VIRIDIAN_TOKEN", token)
            .output()
            .unwrap()
    };
    let out = remote(&token);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "far");
    let out = remote("vrd_wrong");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("token"),
        "{out:?}"
    );

    let out = s.cli(&["token", "revoke", "ci"]);
    assert!(out.status.success(), "{out:?}");
    assert_error(curl(Some(&token)), 401, "unauthorized");
    let out = s.cli(&["token", "revoke", "ci"]);
    assert_eq!(out.status.code(), Some(1));
}

/// AutomaticStopAction: `POST /service/stop-vms` (`viridian service stop-vms`) stops each
/// running VM as its setting says, and leaves the others alone.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn automatic_stop_action() {
    if !kvm_usable() {
        return;
    }
    let s = Service::start();
    let kernel = tiny_kernel("svc-autostop", IDLE);
    s.define("polite", &kernel, json!({"auto_stop": "ShutDown"}));
    s.define("blunt", &kernel, json!({"auto_stop": "TurnOff"}));
    s.define("idle", &kernel, json!({}));
    for n in ["polite", "blunt"] {
        assert_eq!(s.act(&format!("/vms/{n}/start")).0, 200);
    }
    let out = s.cli(&["service", "stop-vms"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("blunt: Off (Turned off)"), "{text}");
    // No shutdown service in a tiny guest: asked, then turned off.
    assert!(
        text.contains("polite: Off (Turned off: the guest could not shut down"),
        "{text}"
    );
    assert!(!text.contains("idle"), "{text}");
    for n in ["polite", "blunt", "idle"] {
        assert_eq!(s.vm(n)["state"], "Off");
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Figures: creates per second, `GET /vms` per second with 1,000 VMs defined and the
/// service's memory then, start latency through the service against `viridian run`, and
/// density (idle 64 MiB guests started through the service).
/// `cargo test --release -p cli --test service_api -- --ignored --nocapture service_bench`
#[test]
#[ignore]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn service_bench() {
    if !kvm_usable() {
        return;
    }
    let s = Service::start();
    let kernel = tiny_kernel("svc-bench", IDLE);
    let t = Instant::now();
    for i in 0..1000 {
        s.define(&format!("vm{i:04}"), &kernel, json!({}));
    }
    let created = t.elapsed();
    let t = Instant::now();
    let n = 100;
    for _ in 0..n {
        let r = s.client.get("/vms").unwrap();
        assert_eq!(r.status, 200);
    }
    let listed = t.elapsed();
    eprintln!(
        "BENCH create: {:.0} VMs/s; GET /vms with 1000 VMs: {:.1} requests/s; service RSS {} MiB",
        1000.0 / created.as_secs_f64(),
        n as f64 / listed.as_secs_f64(),
        rss_kib(s.child.id()) / 1024
    );

    // Start latency: the service (until POST start answers Running) against viridian run
    // (until its control socket is up).
    let rounds = 10;
    let mut via_service = Duration::ZERO;
    for _ in 0..rounds {
        let t = Instant::now();
        let (status, v) = s.act("/vms/vm0000/start");
        via_service += t.elapsed();
        assert_eq!(status, 200, "{v}");
        s.act("/vms/vm0000/stop?turn_off=true");
    }
    let mut direct = Duration::ZERO;
    for i in 0..rounds {
        let run_dir = s.dir.path().join(format!("direct-{i}"));
        let t = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_viridian"))
            .args(["run", "--name", "d", "--memory", "64M", "--kernel"])
            .arg(&kernel)
            .env("VIRIDIAN_RUN_DIR", &run_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while std::os::unix::net::UnixStream::connect(run_dir.join("d.sock")).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        direct += t.elapsed();
        let _ = child.kill();
        let _ = child.wait();
    }
    eprintln!(
        "BENCH start: via the service {:?}, viridian run {:?}, ratio {:.2}",
        via_service / rounds,
        direct / rounds,
        via_service.as_secs_f64() / direct.as_secs_f64()
    );

    // Density.
    let count: usize = std::env::var("VIRIDIAN_DENSITY")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(100);
    let t = Instant::now();
    let mut pids = Vec::new();
    for i in 0..count {
        let (status, v) = s.act(&format!("/vms/vm{i:04}/start"));
        if status != 200 {
            eprintln!("BENCH density: start {i} failed: {v}");
            break;
        }
        pids.push(v["pid"].as_u64().unwrap() as u32);
    }
    let started = t.elapsed();
    let workers: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
    eprintln!(
        "BENCH density: {} idle 64 MiB guests started in {:?} ({:.1}/s); worker RSS {:.1} MiB per VM; service RSS {} MiB",
        pids.len(),
        started,
        pids.len() as f64 / started.as_secs_f64(),
        workers as f64 / 1024.0 / pids.len().max(1) as f64,
        rss_kib(s.child.id()) / 1024
    );
}

/// Disks, DVD drives and network adapters are VM settings (Add-/Remove-/Get-VMHardDiskDrive,
/// -VMDvdDrive, -VMNetworkAdapter): placed, checked, created with the VM, handed to the
/// worker, and changed on a running VM where Hyper-V allows it.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn drives_and_adapters_are_settings() {
    if !kvm_usable() {
        return;
    }
    let s = Service::start();
    let files = tempfile::tempdir().unwrap();
    let (a, c) = (files.path().join("a.vhdx"), files.path().join("c.vhdx"));
    vhd_new(&a);
    vhd_new(&c);
    let junk = files.path().join("junk.vhdx");
    std::fs::write(&junk, [0x5a; 700]).unwrap();
    let iso = files.path().join("tools.iso");
    std::fs::write(&iso, vec![0; 64 << 10]).unwrap();
    let kernel = tiny_kernel("svc-dev", IDLE);

    let v = s.define(
        "dev",
        &kernel,
        json!({"disks": [{"path": a, "cache": "writeback"}], "new_disks": [{"path": "b.vhdx", "size": "8M"}],
               "dvds": [{"path": iso}]}),
    );
    let folder = PathBuf::from(v["folder"].as_str().unwrap());
    let b = folder.join("b.vhdx");
    assert_eq!(
        v["disks"],
        json!([{"path": a, "controller": 0, "location": 0, "read_only": false, "cache": "writeback"},
               {"path": b, "controller": 0, "location": 1, "read_only": false, "cache": "none"}])
    );
    assert_eq!(
        v["dvds"],
        json!([{"path": iso, "controller": 0, "location": 2}])
    );
    assert!(b.is_file(), "the new disk is created in the VM's folder");

    // Another VM may not write the same file; a failed New-VM leaves nothing behind.
    let (status, body) = s.req(
        "POST",
        "/vms",
        Some(json!({"name": "thief", "memory": "64M", "kernel": kernel,
                    "new_disks": [{"path": files.path().join("t.vhdx"), "size": "8M"}],
                    "disks": [{"path": a}]})),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("'dev'"),
        "{body}"
    );
    assert_error(s.req("GET", "/vms/thief", None), 404, "not_found");
    assert!(!files.path().join("t.vhdx").exists());

    // Bad drives: not an image, a taken place, out of range, no such drive, a bad path.
    let msg = assert_error(
        s.req("POST", "/vms/dev/disks", Some(json!({"path": junk}))),
        422,
        "invalid_field",
    );
    assert!(
        msg.starts_with("disks.path:") && msg.contains("junk.vhdx"),
        "{msg}"
    );
    assert_error(
        s.req(
            "POST",
            "/vms/dev/disks",
            Some(json!({"path": c, "location": 1})),
        ),
        409,
        "conflict",
    );
    let msg = assert_error(
        s.req(
            "POST",
            "/vms/dev/disks",
            Some(json!({"path": c, "controller": 4})),
        ),
        422,
        "invalid_field",
    );
    assert!(msg.contains("controller"), "{msg}");
    let msg = assert_error(
        s.req(
            "POST",
            "/vms/dev/disks",
            Some(json!({"path": c, "cache": "unsafe"})),
        ),
        422,
        "invalid_field",
    );
    assert!(
        msg.starts_with("cache:") && msg.contains("writeback"),
        "{msg}"
    );
    assert_error(
        s.req("DELETE", "/vms/dev/disks/0/9", None),
        404,
        "no_device",
    );
    assert_error(s.req("DELETE", "/vms/dev/disks/x/0", None), 400, "bad_path");
    assert_error(
        s.req("DELETE", "/vms/dev/disks/0/64", None),
        400,
        "bad_path",
    );
    assert_error(
        s.req("DELETE", "/vms/ghost/disks/0/0", None),
        404,
        "not_found",
    );

    // Network adapters: a defined switch or the Default Switch, unicast MACs, VLAN 1-4094.
    let msg = assert_error(
        s.req("POST", "/vms/dev/nics", Some(json!({"switch": "nosuch"}))),
        422,
        "invalid_field",
    );
    assert!(msg.contains("viridian switch new"), "{msg}");
    assert_error(
        s.req(
            "POST",
            "/vms/dev/nics",
            Some(json!({"switch": "default", "mac": "01:00:5e:00:00:01"})),
        ),
        422,
        "invalid_field",
    );
    assert_error(
        s.req(
            "POST",
            "/vms/dev/nics",
            Some(json!({"switch": "default", "vlan": 4095})),
        ),
        422,
        "invalid_field",
    );
    let (status, nic) = s.req(
        "POST",
        "/vms/dev/nics",
        Some(json!({"switch": "default", "vlan": 10})),
    );
    assert_eq!(status, 201, "{nic}");
    let mac = nic["mac"].as_str().unwrap().to_string();
    assert!(mac.starts_with("00:15:5d:"), "{mac}");
    assert_error(
        s.req(
            "POST",
            "/vms/dev/nics",
            Some(json!({"switch": "default", "mac": mac})),
        ),
        409,
        "conflict",
    );
    let (status, list) = s.req("GET", "/vms/dev/nics", None);
    assert_eq!((status, list.as_array().map(Vec::len)), (200, Some(1)));
    let (status, _) = s.req("DELETE", &format!("/vms/dev/nics/{mac}"), None);
    assert_eq!(status, 200);

    // Integration services are settings; the worker starts without the disabled ones.
    let (status, list) = s.req(
        "PUT",
        "/vms/dev/integration/kvp",
        Some(json!({"enabled": false})),
    );
    assert_eq!(status, 200, "{list}");
    assert_eq!(list[1]["enabled"], false, "{list}");
    assert_error(
        s.req(
            "PUT",
            "/vms/dev/integration/vss",
            Some(json!({"enabled": false})),
        ),
        404,
        "no_device",
    );

    // The worker gets the drives; a running VM takes disks and media, not new drive bays.
    let (status, v) = s.act("/vms/dev/start");
    assert_eq!(status, 200, "{v}");
    let out = s.cli(&[
        "vm",
        "disk",
        "add",
        "dev",
        c.to_str().unwrap(),
        "--cache",
        "writeback",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = s.cli(&["vm", "disk", "list", "dev", "--json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let paths: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        paths,
        [
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            c.to_str().unwrap(),
            iso.to_str().unwrap()
        ]
    );
    // The worker itself has every drive, c hot-added at location 3, and lets it go again.
    let state_dir = folder.parent().unwrap().parent().unwrap();
    let socket = state_dir
        .join("run")
        .join(format!("{}.sock", v["id"].as_str().unwrap()));
    let worker_drives = || {
        let out = Command::new(env!("CARGO_BIN_EXE_viridian"))
            .args(["vm", "disk", "list", "--json", "--socket"])
            .arg(&socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["location"].as_u64().unwrap(),
                    d["path"].as_str().unwrap_or("").to_string(),
                    d["cache"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    let held = worker_drives();
    let at =
        |l: u64, p: &Path, cache: &str| (l, p.to_str().unwrap().to_string(), cache.to_string());
    // The cache modes reached the worker: a's from New-VM at its start, c's with the hot add.
    assert!(held.contains(&at(0, &a, "writeback")), "{held:?}");
    assert!(held.contains(&at(1, &b, "none")), "{held:?}");
    assert!(held.contains(&at(3, &c, "writeback")), "{held:?}");
    assert_eq!(held.len(), 4, "{held:?}");
    let (status, _) = s.req("DELETE", "/vms/dev/disks/0/3", None);
    assert_eq!(status, 200);
    assert_eq!(worker_drives().len(), 3);
    let (_, list) = s.req("GET", "/vms/dev/integration", None);
    assert_eq!(
        (
            list[1]["enabled"].clone(),
            list[1]["status"].clone(),
            list[0]["status"].clone()
        ),
        (json!(false), json!(""), json!("No Contact")),
        "the worker reports, without KVP: {list}"
    );
    let (status, list) = s.req(
        "PUT",
        "/vms/dev/integration/Key-Value%20Pair%20Exchange",
        Some(json!({"enabled": true})),
    );
    assert_eq!(
        (status, list[1]["status"].clone()),
        (200, json!("No Contact")),
        "{list}"
    );
    let (status, d) = s.req("PUT", "/vms/dev/dvds/0/2", Some(json!({"path": null})));
    assert_eq!((status, d["path"].clone()), (200, Value::Null), "{d}");
    // A running VM takes new DVD drives too, and lets them go.
    let (status, d) = s.req("POST", "/vms/dev/dvds", Some(json!({"path": iso})));
    assert_eq!(status, 201, "{d}");
    assert!(
        worker_drives().contains(&at(d["location"].as_u64().unwrap(), &iso, "none")),
        "{d}"
    );
    let (status, _) = s.req(
        "DELETE",
        &format!("/vms/dev/dvds/{}/{}", d["controller"], d["location"]),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(worker_drives().len(), 3);
    let (status, v) = s.act("/vms/dev/stop?turn_off=true");
    assert_eq!(status, 200, "{v}");
    assert_error(s.req("GET", "/vms/dev/measure", None), 409, "wrong_state");
    let (_, list) = s.req("GET", "/vms/dev/integration", None);
    assert_eq!(
        list[1]["enabled"], true,
        "enabled while running, kept: {list}"
    );
    let v = s.vm("dev");
    assert_eq!(v["disks"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["dvds"][0]["path"], Value::Null, "{v}");
}

/// Whether this test runs as root (network namespaces need it); prints why not.
fn root_or_skip() -> bool {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        eprintln!("SKIPPED: needs root for a network namespace of its own");
    }
    root
}

/// Switches are a resource of the service (New-, Get-, Remove-VMSwitch), in a network
/// namespace of the test's own: made, listed with the VMs using them, refused while in use
/// unless forced, re-created when the service starts, and `viridian switch` goes through the
/// service.
#[test]
fn switches_are_a_service_resource() {
    if !root_or_skip() {
        return;
    }
    vswitch::testing::in_netns(|| {
        let net = vswitch::testing::Net::open();
        net.add_port("phys0");
        let mut s = Service::start();
        let (status, v) = s.req("GET", "/switches", None);
        assert_eq!((status, v), (200, json!([])));

        // Bad input names the field.
        for (body, status, code, field) in [
            (json!({"name": "lab"}), 422, "invalid_field", "type"),
            (
                json!({"name": "lab", "type": "bogus"}),
                422,
                "invalid_field",
                "type",
            ),
            (
                json!({"name": "thirteen-char", "type": "private"}),
                422,
                "invalid_field",
                "name",
            ),
            (
                json!({"name": "a/b", "type": "private"}),
                422,
                "invalid_field",
                "name",
            ),
            (
                json!({"name": "x", "type": "internal", "host_address": "300.1.1.1/24"}),
                422,
                "invalid_field",
                "host_address",
            ),
            (
                json!({"name": "x", "type": "private", "host_address": "10.1.1.1/24"}),
                422,
                "invalid_field",
                "host_address",
            ),
            (
                json!({"name": "e", "adapter": "nosuch0"}),
                422,
                "invalid_field",
                "adapter",
            ),
            (
                json!({"name": "e", "adapter": "lo"}),
                409,
                "conflict",
                "adapter",
            ),
            (
                json!({"name": "x", "type": "private", "vlan": 1}),
                422,
                "invalid_field",
                "unknown field",
            ),
        ] {
            let msg = assert_error(s.req("POST", "/switches", Some(body.clone())), status, code);
            assert!(
                msg.starts_with(field) || msg.contains(field),
                "{body}: {msg}"
            );
        }
        assert!(net.link("vs-x").is_none() && net.link("vs-e").is_none());

        let (status, lab) = s.req(
            "POST",
            "/switches",
            Some(json!({"name": "lab", "type": "internal", "host_address": "198.51.100.1/24"})),
        );
        assert_eq!(status, 201, "{lab}");
        assert_eq!(
            (
                lab["type"].clone(),
                lab["bridge"].clone(),
                lab["present"].clone()
            ),
            (json!("internal"), json!("vs-lab"), json!(true))
        );
        assert_eq!(
            net.link("vs-lab").unwrap().addresses,
            ["198.51.100.1/24".parse().unwrap()]
        );
        assert_error(
            s.req(
                "POST",
                "/switches",
                Some(json!({"name": "lab", "type": "private"})),
            ),
            409,
            "duplicate_name",
        );
        let (status, ext) = s.req(
            "POST",
            "/switches",
            Some(json!({"name": "ext", "adapter": "phys0"})),
        );
        assert_eq!(
            (status, ext["type"].as_str()),
            (201, Some("external")),
            "{ext}"
        );
        assert_eq!(net.link("phys0").unwrap().master.as_deref(), Some("vs-ext"));
        assert_error(s.req("GET", "/switches/nosuch", None), 404, "not_found");
        assert_error(s.req("GET", "/switches/a%2Fb", None), 404, "not_found");
        assert_error(s.req("DELETE", "/switches/nosuch", None), 404, "not_found");

        // The CLI goes through the service.
        let out = s.cli(&["switch", "new", "iso", "--type", "private"]);
        assert!(out.status.success(), "{out:?}");
        let out = s.cli(&["switch", "list", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["ext", "iso", "lab"]);
        let out = s.cli(&["switch", "list"]);
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table.contains("vs-iso") && table.contains("present"),
            "{table}"
        );

        // A VM's adapter keeps its switch unless the removal is forced.
        let kernel = tiny_kernel("svc-sw", IDLE);
        s.define("web", &kernel, json!({"nics": [{"switch": "lab"}]}));
        let (_, lab) = s.req("GET", "/switches/lab", None);
        assert_eq!(lab["vms"], json!(["web"]), "{lab}");
        let msg = assert_error(s.req("DELETE", "/switches/lab", None), 409, "in_use");
        assert!(msg.contains("web"), "{msg}");
        let out = s.cli(&["switch", "remove", "lab"]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("web"),
            "{out:?}"
        );
        assert!(net.link("vs-lab").is_some());
        let out = s.cli(&["switch", "remove", "lab", "--force"]);
        assert!(out.status.success(), "{out:?}");
        assert!(net.link("vs-lab").is_none());
        let msg = assert_error(
            s.req("POST", "/vms/web/nics", Some(json!({"switch": "lab"}))),
            422,
            "invalid_field",
        );
        assert!(msg.starts_with("nics.switch:"), "{msg}");

        // The service re-creates missing bridges when it starts (`switch apply`).
        net.delete("vs-iso");
        s.kill9_and_restart();
        assert!(net.link("vs-iso").is_some(), "{}", s.log());
        let (status, _) = s.req("DELETE", "/switches/ext", None);
        assert_eq!(status, 204);
        assert_eq!(net.link("phys0").unwrap().master, None);
        let (status, _) = s.req("DELETE", "/switches/iso", None);
        assert_eq!(status, 204);
        let (_, v) = s.req("GET", "/switches", None);
        assert_eq!(v, json!([]));
    });
}

/// Network adapters of a running VM through the service (Add-, Remove-, Connect-,
/// Disconnect-VMNetworkAdapter), in a network namespace of the test's own: the worker opens a
/// TAP on the switch and offers it, closes it again, and the cable setting holds across starts.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn nics_change_on_a_running_vm() {
    if !kvm_usable() || !root_or_skip() {
        return;
    }
    vswitch::testing::in_netns(|| {
        let s = Service::start();
        let (status, v) = s.req(
            "POST",
            "/switches",
            Some(json!({"name": "lab", "type": "private"})),
        );
        assert_eq!(status, 201, "{v}");
        let ports = || {
            let (_, sw) = s.req("GET", "/switches/lab", None);
            sw["ports"].as_array().unwrap().len()
        };
        let v = s.define("net", &tiny_kernel("svc-nic", IDLE), json!({}));
        let (status, v2) = s.act("/vms/net/start");
        assert_eq!(status, 200, "{v2}");
        let socket = PathBuf::from(v["folder"].as_str().unwrap())
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("run")
            .join(format!("{}.sock", v["id"].as_str().unwrap()));
        let worker_nics = || {
            let out = Command::new(env!("CARGO_BIN_EXE_viridian"))
                .args(["vm", "nic", "list", "--json", "--socket"])
                .arg(&socket)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        };

        // Hot add: a TAP on the switch, offered to the guest.
        let out = s.cli(&["vm", "nic", "add", "net", "--switch", "lab"]);
        assert!(out.status.success(), "{out:?}");
        let (_, nics) = s.req("GET", "/vms/net/nics", None);
        let mac = nics[0]["mac"].as_str().unwrap().to_string();
        assert_eq!(nics[0]["connected"], true, "{nics}");
        assert_eq!(ports(), 1);
        let live = worker_nics();
        assert_eq!(live[0]["mac"], mac.as_str(), "{live}");
        assert_eq!(live[0]["link_up"], true, "{live}");
        assert_error(
            s.req("POST", "/vms/net/nics", Some(json!({"switch": "nosuch"}))),
            422,
            "invalid_field",
        );

        // Disconnect and connect the cable.
        let out = s.cli(&["vm", "nic", "net", "--disconnect"]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(worker_nics()[0]["link_up"], false);
        let (_, nics) = s.req("GET", "/vms/net/nics", None);
        assert_eq!(nics[0]["connected"], false, "{nics}");
        assert_error(
            s.req(
                "PATCH",
                "/vms/net/nics/00:15:5d:ff:ff:ff",
                Some(json!({"connected": true})),
            ),
            404,
            "no_device",
        );

        // The cable stays out across a restart.
        let (status, v) = s.act("/vms/net/restart?turn_off=true");
        assert_eq!(status, 200, "{v}");
        assert_eq!(worker_nics()[0]["link_up"], false);
        let (status, n) = s.req(
            "PATCH",
            &format!("/vms/net/nics/{mac}"),
            Some(json!({"connected": true})),
        );
        assert_eq!((status, n["connected"].clone()), (200, json!(true)), "{n}");
        assert_eq!(worker_nics()[0]["link_up"], true);

        // Hot remove: rescinded, its TAP closed and off the switch.
        let out = s.cli(&["vm", "nic", "remove", "net", "--mac", &mac]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(worker_nics(), json!([]));
        assert_eq!(ports(), 0);
        let (_, nics) = s.req("GET", "/vms/net/nics", None);
        assert_eq!(nics, json!([]));
        let (status, v) = s.act("/vms/net/stop?turn_off=true");
        assert_eq!(status, 200, "{v}");
    });
}

/// The first `want` bytes (or more) `viridian vm console NAME --read-only` shows.
fn console_replay(s: &Service, name: &str, want: usize) -> Vec<u8> {
    let mut viewer = Command::new(env!("CARGO_BIN_EXE_viridian"))
        .arg("--socket")
        .arg(s.socket())
        .args(["vm", "console", name, "--read-only"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = viewer.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < want {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(bytes) => got.extend(bytes),
            Err(_) => break,
        }
    }
    let _ = viewer.kill();
    let _ = viewer.wait();
    got
}

/// Save-VM as a job: the VM goes Saving, then Saved (its worker ends, its state in its
/// folder); Start-VM resumes it where it was; Remove-VMSavedState discards it; wrong states
/// are 409; the events show Saving and Saved.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn a_saved_vm_starts_where_it_was() {
    if !kvm_usable() {
        return;
    }
    let s = Service::start();
    let v = s.define("count", &tiny_kernel("svc-count", common::COUNT), json!({}));
    let folder = s
        .dir
        .path()
        .join("state/vms")
        .join(v["id"].as_str().unwrap());
    let (log, state) = (folder.join("console.log"), folder.join("vm.saved"));
    assert_error(s.req("POST", "/vms/count/save", None), 409, "wrong_state");
    assert_error(
        s.req("POST", "/vms/count/discard-saved-state", None),
        409,
        "wrong_state",
    );
    assert_error(s.req("POST", "/vms/nope/save", None), 404, "not_found");
    assert_error(s.req("GET", "/jobs/nope", None), 404, "not_found");

    let mut events = std::os::unix::net::UnixStream::connect(s.socket()).unwrap();
    events
        .write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    events
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(events).lines() {
            let Ok(line) = line else { break };
            if let Some(data) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(data).unwrap();
                seen.push(v["state"].as_str().unwrap().to_string());
                if seen.len() == 6 {
                    break;
                }
            }
        }
        seen
    });
    std::thread::sleep(Duration::from_millis(100));

    let (status, v) = s.act("/vms/count/start");
    assert_eq!(status, 200, "{v}");
    let pid = v["pid"].as_u64().unwrap();
    let lines = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let start = Instant::now();
    while lines(&log) < 15 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no count in {}: {:?}; worker: {:?}",
            log.display(),
            std::fs::read_to_string(&log),
            std::fs::read_to_string(folder.join("worker.log"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let (status, job) = s.req("POST", "/vms/count/save", None);
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["operation"], "save");
    assert_eq!(job["vm"], "count");
    assert_eq!(job["state"], "Running");
    assert_eq!(s.vm("count")["state"], "Saving");
    let (status, list) = s.req("GET", "/jobs", None);
    assert_eq!(status, 200);
    assert_eq!(list[0]["id"], job["id"]);
    let id = job["id"].as_str().unwrap();
    let job = loop {
        let (status, j) = s.req("GET", &format!("/jobs/{id}"), None);
        assert_eq!(status, 200, "{j}");
        if j["state"] != "Running" {
            break j;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{j}");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "Save-VM of a 64 MiB guest: the job took {:?}",
        started.elapsed()
    );
    assert_eq!(job["state"], "Completed", "{job}");
    assert_eq!(job["percent"], 100);
    let v = s.vm("count");
    assert_eq!(
        (v["state"].as_str(), v["status"].as_str()),
        (Some("Saved"), Some("Saved")),
        "{v}"
    );
    assert!(v["pid"].is_null(), "{v}");
    assert!(!alive(pid), "the worker ended");
    assert!(state.is_file(), "the saved state is in the VM's folder");
    assert_error(s.req("POST", "/vms/count/save", None), 409, "wrong_state");
    assert_error(s.req("POST", "/vms/count/pause", None), 409, "wrong_state");
    let before = std::fs::read_to_string(&log).unwrap();
    let counted = common::assert_counts_on(&before);

    // Start-VM of a Saved VM: restored, the count goes on.
    let started = Instant::now();
    let (status, v) = s.act("/vms/count/start");
    assert_eq!((status, v["state"].as_str()), (200, Some("Running")), "{v}");
    eprintln!(
        "Start-VM of the Saved VM answered after {:?}",
        started.elapsed()
    );
    assert!(!state.exists(), "the saved state is used up");
    let start = Instant::now();
    while lines(&log) < before.lines().count() + 5 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no count after the restore"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The console log goes on: the restored worker appends to it.
    let after = std::fs::read_to_string(&log).unwrap();
    assert!(after.starts_with(&before), "{before:?} then {after:?}");
    assert!(common::assert_counts_on(&after) > counted);
    // `vm console` replays the output from before the save too.
    let replay = console_replay(&s, "count", before.len());
    assert!(
        replay.starts_with(before.as_bytes()),
        "the replay after the restore: {:?}",
        String::from_utf8_lossy(&replay)
    );
    let seen = reader.join().unwrap();
    assert_eq!(
        seen,
        ["Starting", "Running", "Saving", "Saved", "Starting", "Running"],
        "events"
    );

    // Through the CLI: save, then discard the saved state (Remove-VMSavedState).
    let out = s.cli(&["vm", "save", "count"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("count: Saved"),
        "{out:?}"
    );
    assert!(state.is_file());
    // Get-Job: the CLI's save is the newest job; the first one is still there.
    let out = s.cli(&["job", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let newest = text.lines().nth(1).unwrap_or_default();
    assert!(
        newest.contains(" save ") && newest.contains("Completed") && newest.ends_with(" Saved"),
        "{text}"
    );
    let out = s.cli(&["job", "get", id, "--json"]);
    let first: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (first["id"].as_str(), first["state"].as_str()),
        (Some(id), Some("Completed"))
    );
    let out = s.cli(&["job", "get", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no job 'nope'"),
        "{out:?}"
    );
    let out = s.cli(&["vm", "discard-saved-state", "count"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Off"),
        "{out:?}"
    );
    assert!(!state.exists());
    assert_eq!(s.vm("count")["state"], "Off");
    // Remove-VM of a Saved VM takes its saved state with its folder.
    assert_eq!(s.act("/vms/count/start").0, 200);
    assert_eq!(s.req("POST", "/vms/count/save", None).0, 202);
    s.wait_for("count", "Saved", Duration::from_secs(60), |v| {
        v["state"] == "Saved"
    });
    assert_eq!(s.req("DELETE", "/vms/count", None).0, 204);
    assert!(!folder.exists());
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}

/// Sends `sig` straight away (no `kill` process in between).
fn signal_now(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

/// Jobs are kept in the inventory: after `kill -9` of the service, a save job that was
/// running shows how it ended. Completed when its worker finished the save on its own (the
/// saved state is complete, the VM Saved); Failed ("the service stopped") when the worker
/// died too. (The worker is stopped only while the job is made: a stopped process in a
/// process group its parent's death orphans would get SIGHUP.)
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn jobs_outlive_a_killed_service() {
    if !kvm_usable() {
        return;
    }
    let mut s = Service::start();
    let kernel = tiny_kernel("svc-jobs", SPIN);
    let mut ids = Vec::new();
    for (name, finishes) in [("finishes", true), ("dies", false)] {
        s.define(name, &kernel, json!({}));
        let pid = s.act(&format!("/vms/{name}/start")).1["pid"]
            .as_u64()
            .unwrap() as u32;
        // A stopped worker does not answer: the save job stays Running.
        signal(pid, "STOP");
        let (status, job) = s.req("POST", &format!("/vms/{name}/save"), None);
        assert_eq!(status, 202, "{job}");
        let path = format!("/jobs/{}", job["id"].as_str().unwrap());
        ids.push(job["id"].clone());
        std::thread::sleep(Duration::from_millis(300));
        let (_, j) = s.req("GET", &path, None);
        assert_eq!(j["state"], "Running", "{j}");
        use rustix::process::Signal;
        if finishes {
            // The save goes on while the service dies.
            signal_now(pid, Signal::CONT);
            signal_now(s.child.id(), Signal::KILL);
        } else {
            // The worker dies before it could save.
            signal_now(s.child.id(), Signal::KILL);
            signal_now(pid, Signal::KILL);
        }
        let _ = s.child.wait();
        let start = Instant::now();
        while alive(u64::from(pid)) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name}: the worker still runs"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        s.child = spawn_service(s.dir.path(), &s.args);
        s.wait_ready();
        let (status, j) = s.req("GET", &path, None);
        assert_eq!(status, 200, "{name}: the job was lost: {j}");
        let v = s.vm(name);
        assert!(j["finished_ms"].as_u64().is_some(), "{j}");
        if finishes {
            assert_eq!(
                (j["state"].as_str(), j["percent"].as_u64()),
                (Some("Completed"), Some(100)),
                "{j}"
            );
            assert_eq!(v["state"], "Saved", "{v}");
            assert_eq!(j["progress"], "Saved", "{j}");
        } else {
            assert_eq!(j["state"], "Failed", "{j}");
            assert!(
                j["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("the service stopped while the job ran"),
                "{j}"
            );
            assert_eq!(v["state"], "Off", "{v}");
        }
    }
    // Both are still listed (with the starts), newest first.
    let (_, list) = s.req("GET", "/jobs", None);
    let listed: Vec<&Value> = list.as_array().unwrap().iter().map(|j| &j["id"]).collect();
    assert_eq!(listed.len(), 4, "{list}");
    assert_eq!((listed[0], listed[2]), (&ids[1], &ids[0]), "{list}");
}

/// Set-VMNetworkAdapterVlan -Access/-Trunk and Set-VMNetworkAdapter -DhcpGuard/-RouterGuard
/// as adapter settings of a VM that is Off: taken by `POST /vms`, `POST .../nics`, `PATCH`,
/// `vm new --nic` (the `viridian run --nic` syntax) and `vm nic add`, and bad values are 422
/// naming the field.
#[test]
fn adapter_vlans_and_guards_are_settings() {
    let s = Service::start();
    let kernel = tiny_kernel("svc-vlan", IDLE);
    let v = s.define(
        "tr",
        &kernel,
        json!({"nics": [{"switch": "default", "vlan": {"allowed": [10, 20], "native": 20},
                         "dhcp_guard": true}]}),
    );
    let nic = &v["nics"][0];
    assert_eq!(
        (
            &nic["vlan"],
            &nic["dhcp_guard"],
            &nic["router_guard"],
            &nic["mac_spoofing"]
        ),
        (
            &json!({"allowed": [10, 20], "native": 20}),
            &json!(true),
            &json!(false),
            &json!(false)
        ),
        "{v}"
    );
    let mac = nic["mac"].as_str().unwrap().to_string();
    // An old client's bare access id still works, and reads back the same.
    let (status, old) = s.req(
        "POST",
        "/vms/tr/nics",
        Some(json!({"switch": "default", "vlan": 30})),
    );
    assert_eq!((status, &old["vlan"]), (201, &json!(30)), "{old}");

    let bad = |body: Value, field: &str| {
        let msg = assert_error(
            s.req("POST", "/vms/tr/nics", Some(body)),
            422,
            "invalid_field",
        );
        assert!(msg.starts_with(field), "{field}: {msg}");
    };
    bad(json!({"switch": "default", "vlan": 0}), "nics.vlan: 0 ");
    bad(
        json!({"switch": "default", "vlan": 4095}),
        "nics.vlan: 4095",
    );
    bad(json!({"switch": "default", "vlan": "ten"}), "vlan:");
    bad(
        json!({"switch": "default", "vlan": {"allowed": [10, 20], "native": 1}}),
        "nics.vlan.native: VLAN 1 is not among the allowed",
    );
    bad(
        json!({"switch": "default", "vlan": {"allowed": []}}),
        "nics.vlan.allowed:",
    );
    bad(
        json!({"switch": "default", "vlan": {"allowed": [10, 4095]}}),
        "nics.vlan.allowed: 4095",
    );
    let too_many: Vec<u16> = (1..=4094).chain([7]).collect();
    bad(
        json!({"switch": "default", "vlan": {"allowed": too_many}}),
        "nics.vlan.allowed: a trunk allows 1 to 4094",
    );
    bad(
        json!({"switch": "default", "vlan": {"allowed": [5], "pvid": 5}}),
        "vlan:",
    );
    bad(
        json!({"switch": "default", "dhcp_guard": "on"}),
        "dhcp_guard:",
    );
    bad(
        json!({"switch": "default", "guard": true}),
        "guard: unknown field `guard`",
    );
    let every: Vec<u16> = (1..=4094).collect();
    let (status, n) = s.req(
        "POST",
        "/vms/tr/nics",
        Some(json!({"switch": "default", "vlan": {"allowed": every}})),
    );
    assert_eq!(status, 201, "a trunk may allow every id: {n}");

    // PATCH while Off: a new VLAN, untagged (null), the guards; absent fields stay.
    let patch = |body: Value| s.req("PATCH", &format!("/vms/tr/nics/{mac}"), Some(body));
    let (status, n) = patch(json!({"vlan": 12, "router_guard": true}));
    assert_eq!(status, 200, "{n}");
    assert_eq!(
        (&n["vlan"], &n["dhcp_guard"], &n["router_guard"]),
        (&json!(12), &json!(true), &json!(true))
    );
    let (status, n) = patch(json!({"vlan": null, "dhcp_guard": false}));
    assert_eq!(status, 200, "{n}");
    assert_eq!(
        (&n["vlan"], &n["dhcp_guard"], &n["router_guard"]),
        (&Value::Null, &json!(false), &json!(true))
    );
    let msg = assert_error(patch(json!({"vlan": 4095})), 422, "invalid_field");
    assert!(msg.starts_with("vlan: 4095"), "{msg}");
    let msg = assert_error(
        patch(json!({"vlan": {"allowed": [3], "native": 4}})),
        422,
        "invalid_field",
    );
    assert!(msg.starts_with("vlan.native:"), "{msg}");
    assert_error(patch(json!({"speed": 10})), 422, "invalid_field");
    let (_, nics) = s.req("GET", "/vms/tr/nics", None);
    assert_eq!(
        nics[0]["vlan"],
        Value::Null,
        "a refused PATCH changes nothing: {nics}"
    );
    assert!(
        nics[0].get("live").is_none(),
        "an Off VM has no live state: {nics}"
    );

    // The CLI: `vm new --nic` in `viridian run`'s syntax, `vm nic add --trunk --native`.
    let out = s.cli(&[
        "vm",
        "new",
        "cl",
        "--memory",
        "64M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--nic",
        "switch=default,vlan=trunk:10,20;native=10,dhcp-guard=on,router-guard=on",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = s.cli(&[
        "vm",
        "nic",
        "add",
        "cl",
        "--switch",
        "default",
        "--trunk",
        "7,8",
        "--native",
        "8",
        "--router-guard",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = s.cli(&[
        "vm", "nic", "add", "cl", "--switch", "default", "--vlan", "9",
    ]);
    assert!(out.status.success(), "{out:?}");
    let got: Vec<(Value, Value, Value)> = s.vm("cl")["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["vlan"].clone(),
                n["dhcp_guard"].clone(),
                n["router_guard"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                json!({"allowed": [10, 20], "native": 10}),
                json!(true),
                json!(true)
            ),
            (
                json!({"allowed": [7, 8], "native": 8}),
                json!(false),
                json!(true)
            ),
            (json!(9), json!(false), json!(false)),
        ]
    );
    let out = s.cli(&["vm", "nic", "list", "cl", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, s.req("GET", "/vms/cl/nics", None).1);
    // The CLI checks first, naming the field; the service checks what the CLI cannot.
    let out = s.cli(&[
        "vm", "nic", "add", "cl", "--switch", "default", "--vlan", "0",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("vlan: \"0\" is not a VLAN id"),
        "{out:?}"
    );
    let out = s.cli(&[
        "vm", "nic", "add", "cl", "--switch", "default", "--trunk", "7", "--native", "9",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nics.vlan.native"),
        "{out:?}"
    );
    let out = s.cli(&[
        "vm", "nic", "add", "cl", "--switch", "default", "--native", "9",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--native needs --trunk: {out:?}"
    );
    assert_eq!(s.vm("cl")["nics"].as_array().unwrap().len(), 3);
}

/// A running VM's adapters: the worker starts with each adapter's trunk and guards and takes
/// them on hot add, a PATCH of them is 409 naming the field until the VM is Off, and
/// `vm nic list --json` reads the same from another host (TLS and a token) as on this one,
/// with the worker's live state.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn running_adapters_have_their_vlan_and_guards_and_list_remotely() {
    if !kvm_usable() || !root_or_skip() {
        return;
    }
    vswitch::testing::in_netns(|| {
        vswitch::testing::Net::open().up("lo");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = Service::start_with(&["--listen", &format!("127.0.0.1:{port}")]);
        let (status, v) = s.req(
            "POST",
            "/switches",
            Some(json!({"name": "lab", "type": "private"})),
        );
        assert_eq!(status, 201, "{v}");
        // Without VLAN filtering in this kernel's bridge the adapters stay untagged (the
        // worker refuses a VLAN there); the guards are tested either way.
        let vlans = v["vlan_filtering"] == true;
        if !vlans {
            eprintln!(
                "this kernel's bridge has no VLAN filtering: the running adapters are untagged"
            );
        }
        let pick = |tagged: Value, untagged: Value| if vlans { tagged } else { untagged };
        s.define(
            "g",
            &tiny_kernel("svc-guard", IDLE),
            json!({"nics": [{"switch": "lab",
                             "vlan": pick(json!({"allowed": [10, 20], "native": 10}), Value::Null),
                             "router_guard": true}]}),
        );
        let (status, v) = s.act("/vms/g/start");
        assert_eq!(status, 200, "{v}");
        let list = || {
            let out = s.cli(&["vm", "nic", "list", "g", "--json"]);
            assert!(out.status.success(), "{out:?}");
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        };
        let nics = list();
        let live = &nics[0]["live"];
        assert_eq!(live["slot"], 0, "{nics}");
        assert!(
            live["tap"].as_str().is_some_and(|t| !t.is_empty()),
            "{nics}"
        );
        assert_eq!(live["link_up"], true, "{nics}");
        assert_eq!(live["counters"]["tx_packets"], 0, "{nics}");
        let mac = nics[0]["mac"].as_str().unwrap().to_string();

        // What the worker itself has, read from its control socket.
        let worker = || {
            let out = Command::new(env!("CARGO_BIN_EXE_viridian"))
                .args(["vm", "nic", "list", "--json", "--socket"])
                .arg(
                    s.dir
                        .path()
                        .join("state/run")
                        .join(format!("{}.sock", s.vm("g")["id"].as_str().unwrap())),
                )
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        };
        let w = worker();
        assert_eq!(
            w[0]["vlan"],
            pick(
                json!({"trunk": {"allowed": [10, 20], "native": 10}}),
                json!("untagged")
            ),
            "{w}"
        );
        assert_eq!(
            w[0]["policy"],
            json!({"mac_spoofing_protection": true, "dhcp_guard": false, "router_guard": true})
        );

        // Hot add with a trunk and the DHCP guard.
        let mut add = vec!["vm", "nic", "add", "g", "--switch", "lab", "--dhcp-guard"];
        if vlans {
            add.extend(["--trunk", "30"]);
        }
        let out = s.cli(&add);
        assert!(out.status.success(), "{out:?}");
        let w = worker();
        assert_eq!(
            w[1]["vlan"],
            pick(
                json!({"trunk": {"allowed": [30], "native": null}}),
                json!("untagged")
            ),
            "{w}"
        );
        assert_eq!(w[1]["policy"]["dhcp_guard"], true, "{w}");

        // The same list from another host: TLS, a bearer token.
        let out = s.cli(&["token", "new", "far"]);
        assert!(out.status.success(), "{out:?}");
        let token = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_string();
        let remote = Command::new(env!("CARGO_BIN_EXE_viridian"))
            .args(["--host", &format!("https://127.0.0.1:{port}"), "--ca-cert"])
            .arg(s.dir.path().join("state/tls/cert.pem"))
            .args(["vm", "nic", "list", "g", "--json"])
            .env("VIRIDIAN_TOKEN", &token)
            .output()
            .unwrap();
        assert!(remote.status.success(), "{remote:?}");
        let far: Value = serde_json::from_slice(&remote.stdout).unwrap();
        assert_eq!(far, list(), "remote and local lists differ");
        assert_eq!(far.as_array().unwrap().len(), 2, "{far}");
        assert!(far[1]["live"]["tap"].is_string(), "{far}");
        let table = Command::new(env!("CARGO_BIN_EXE_viridian"))
            .args(["--host", &format!("https://127.0.0.1:{port}"), "--ca-cert"])
            .arg(s.dir.path().join("state/tls/cert.pem"))
            .args(["vm", "nic", "list", "g"])
            .env("VIRIDIAN_TOKEN", &token)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&table.stdout);
        let vlan_text = if vlans {
            "trunk:10,20;native=10"
        } else {
            "untagged"
        };
        assert!(text.contains(&mac) && text.contains(vlan_text), "{text}");

        // VLAN and guards change while Off; the next start has them.
        for field in ["vlan", "dhcp_guard", "router_guard", "mac_spoofing"] {
            let value = if field == "vlan" {
                json!(5)
            } else {
                json!(true)
            };
            let msg = assert_error(
                s.req(
                    "PATCH",
                    &format!("/vms/g/nics/{mac}"),
                    Some(json!({ field: value })),
                ),
                409,
                "wrong_state",
            );
            assert!(
                msg.starts_with(&format!("{field}: VM 'g' is Running")),
                "{msg}"
            );
        }
        let (status, v) = s.act("/vms/g/stop?turn_off=true");
        assert_eq!(status, 200, "{v}");
        let (status, n) = s.req(
            "PATCH",
            &format!("/vms/g/nics/{mac}"),
            Some(
                json!({"vlan": pick(json!(5), Value::Null), "router_guard": false,
                        "dhcp_guard": true}),
            ),
        );
        assert_eq!(status, 200, "{n}");
        let (status, v) = s.act("/vms/g/start");
        assert_eq!(status, 200, "{v}");
        let w = worker();
        assert_eq!(
            w[0]["vlan"],
            pick(json!({"access": 5}), json!("untagged")),
            "{w}"
        );
        assert_eq!(
            w[0]["policy"],
            json!({"mac_spoofing_protection": true, "dhcp_guard": true, "router_guard": false})
        );
        let (status, v) = s.act("/vms/g/stop?turn_off=true");
        assert_eq!(status, 200, "{v}");
    });
}
