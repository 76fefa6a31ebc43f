//! `viridian run --nic` with a tiny guest on the host's KVM, in a fresh network namespace:
//! each NIC's TAP becomes a port of the switch's bridge (with its VLAN), `viridian vm nic`
//! lists, disconnects, hot-adds and hot-removes NICs through the control socket, the
//! counters show in `vm status` and `vm inspect`, and the TAPs are gone when the VM exits.
//! The guest's own driver is exercised in the lab (tests/lab.rs).

mod common;

use common::{kvm_usable, tiny_kernel, SPIN};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use vswitch::testing::{in_netns, Net, VlanEntry};

const VIRIDIAN: &str = env!("CARGO_BIN_EXE_viridian");

fn usable() -> bool {
    if !kvm_usable() {
        return false;
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED: /dev/net/tun: {e}");
            false
        }
    }
}

/// A `viridian` command with this test's state and run directories.
struct Env {
    state: PathBuf,
    run: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Self {
        let base = std::env::temp_dir().join(format!("viridian-nic-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        Self {
            state: base.join("state"),
            run: base.join("run"),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(VIRIDIAN);
        c.args(args)
            .env("VIRIDIAN_STATE_DIR", &self.state)
            .env("VIRIDIAN_RUN_DIR", &self.run);
        c
    }

    fn out(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout and stderr.
    fn ok(&self, args: &[&str]) -> (String, String) {
        let o = self.out(args);
        assert!(o.status.success(), "viridian {args:?}: {o:?}");
        (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.out(args);
        assert!(!o.status.success(), "viridian {args:?} succeeded: {o:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    fn nics(&self, vm: &str) -> Vec<serde_json::Value> {
        let (out, _) = self.ok(&["vm", "nic", "list", vm, "--json"]);
        serde_json::from_str(&out).unwrap()
    }

    fn ports(&self, switch: &str) -> Vec<String> {
        let (out, _) = self.ok(&["switch", "list", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        let sw = list
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == switch)
            .unwrap_or_else(|| panic!("no switch {switch}: {list}"));
        let mut ports: Vec<String> = sw["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect();
        ports.sort();
        ports
    }
}

/// Kills the VM when the test ends, whatever happens.
struct Vm(std::process::Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(60), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn exists(ifname: &str) -> bool {
    Path::new("/sys/class/net").join(ifname).exists()
}

fn mac_of(n: &serde_json::Value) -> &str {
    n["mac"].as_str().unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn nics_are_switch_ports_and_come_and_go() {
    if !usable() {
        return;
    }
    in_netns(|| {
        let env = Env::new("ports");
        let net = Net::open();
        env.ok(&["switch", "new", "t1", "--type", "private"]);
        let (out, _) = env.ok(&["switch", "list", "--json"]);
        let vlans = out.contains("\"vlan_filtering\": true");
        let kernel = tiny_kernel("spin-nic", SPIN);
        let second = if vlans {
            "switch=t1,mac=00:15:5d:aa:bb:01,vlan=10"
        } else {
            eprintln!("this kernel's bridge has no VLAN filtering: the second NIC is untagged");
            "switch=t1,mac=00:15:5d:aa:bb:01"
        };
        let mut vm = Vm(env
            .cmd(&["run", "--name", "n1", "--memory", "64M", "--kernel"])
            .arg(&kernel)
            .args(["--nic", "switch=t1", "--nic", second])
            .stderr(Stdio::null())
            .spawn()
            .unwrap());
        wait_for("no control socket", || env.run.join("n1.sock").exists());

        // Both TAPs are ports of the switch's bridge, up; the first has the stable MAC.
        let nics = env.nics("n1");
        assert_eq!(nics.len(), 2, "{nics:?}");
        let stable = vmm::network::mac_string(&vswitch::stable_mac("n1", 0));
        assert_eq!(mac_of(&nics[0]), stable);
        assert_eq!(mac_of(&nics[1]), "00:15:5d:aa:bb:01");
        let taps: Vec<String> = nics
            .iter()
            .map(|n| n["tap"].as_str().unwrap().to_string())
            .collect();
        assert!(taps.iter().all(|t| t.starts_with("vif")), "{taps:?}");
        assert_eq!(env.ports("t1"), taps);
        for (n, tap) in nics.iter().zip(&taps) {
            let link = net.link(tap).unwrap();
            assert_eq!(link.master.as_deref(), Some("vs-t1"));
            assert!(link.up, "{tap} is down");
            assert_eq!(n["switch"], "t1");
            assert_eq!(n["link_up"], true);
            assert_eq!(n["guest_ready"], false, "the tiny guest has no driver");
        }
        if vlans {
            assert_eq!(net.link(&taps[1]).unwrap().vlans, [VlanEntry::access(10)]);
            assert_eq!(nics[1]["vlan"]["access"], 10);
        }

        // The cable: one NIC, then every NIC.
        env.ok(&[
            "vm",
            "nic",
            "n1",
            "--disconnect",
            "--mac",
            "00-15-5D-AA-BB-01",
        ]);
        let links: Vec<bool> = env
            .nics("n1")
            .iter()
            .map(|n| n["link_up"] == true)
            .collect();
        assert_eq!(links, [true, false]);
        let (_, err) = env.ok(&["vm", "nic", "n1", "--connect"]);
        assert!(err.contains("connected"), "{err}");
        assert!(env.nics("n1").iter().all(|n| n["link_up"] == true));
        let err = env.fails(&["vm", "nic", "n1", "--connect", "--mac", "00:15:5d:00:00:99"]);
        assert!(err.contains("no NIC has MAC 00:15:5d:00:00:99"), "{err}");
        let err = env.fails(&["vm", "nic", "n1"]);
        assert!(err.contains("--connect"), "{err}");

        // Counters in status and inspect.
        let (status, _) = env.ok(&["vm", "status", "n1"]);
        let line = format!(
            "nic 00:15:5d:aa:bb:01 switch=t1 tap={} link=up tx=0/0B",
            taps[1]
        );
        assert!(status.contains(&line), "{status}");
        assert!(status.contains("drops: spoofed-mac=0"), "{status}");
        let (inspect, _) = env.ok(&["vm", "inspect", "n1"]);
        let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
        assert_eq!(inspect["nics"].as_array().unwrap().len(), 2);
        assert_eq!(inspect["nics"][1]["counters"]["drop_spoofed_mac"], 0);
        let text = inspect.to_string();
        assert!(
            text.contains("4e1c0000") && text.contains("4e1c0001") && text.contains("netvsp"),
            "{text}"
        );

        // Hot add: the lowest free slot, a new TAP on the switch.
        let (_, err) = env.ok(&["vm", "nic", "add", "n1", "--switch", "t1"]);
        assert!(err.contains("slot 2"), "{err}");
        let nics = env.nics("n1");
        assert_eq!(nics.len(), 3);
        let added = nics[2]["tap"].as_str().unwrap().to_string();
        assert_eq!(
            mac_of(&nics[2]),
            vmm::network::mac_string(&vswitch::stable_mac("n1", 2))
        );
        assert_eq!(net.link(&added).unwrap().master.as_deref(), Some("vs-t1"));
        assert!(env.ports("t1").contains(&added));
        let err = env.fails(&[
            "vm",
            "nic",
            "add",
            "n1",
            "--switch",
            "t1",
            "--mac",
            "00:15:5d:aa:bb:01",
        ]);
        assert!(err.contains("already NIC 1's"), "{err}");
        let err = env.fails(&["vm", "nic", "add", "n1", "--switch", "nope"]);
        assert!(err.contains("viridian switch new nope"), "{err}");
        let err = env.fails(&["vm", "nic", "add", "n1", "--switch", "t1", "--vlan", "4095"]);
        assert!(err.contains("vlan: \"4095\""), "{err}");
        assert_eq!(env.nics("n1").len(), 3, "failed adds leave nothing behind");

        // Hot remove: rescinded, off the switch, the TAP closed.
        let mac = mac_of(&nics[2]).to_string();
        let (_, err) = env.ok(&["vm", "nic", "remove", "n1", "--mac", &mac]);
        assert!(err.contains("is closed"), "{err}");
        assert!(!exists(&added), "{added} still exists");
        assert_eq!(env.ports("t1"), taps);
        let err = env.fails(&["vm", "nic", "remove", "n1", "--mac", &mac]);
        assert!(err.contains(&format!("no NIC has MAC {mac}")), "{err}");
        // The slot is free again.
        let (_, err) = env.ok(&["vm", "nic", "add", "n1", "--switch", "t1", "--mac", &mac]);
        assert!(err.contains("slot 2"), "{err}");

        // Exit: every TAP goes, and with it every port.
        env.ok(&["vm", "stop", "n1", "--force"]);
        let status = vm.0.wait().unwrap();
        assert_eq!(status.code(), Some(0));
        for t in &taps {
            assert!(!exists(t), "{t} still exists after the VM exited");
        }
        assert!(env.ports("t1").is_empty());
    });
}

/// Errors before (or instead of) a VM: one line each, saying what to do.
#[test]
#[cfg_attr(no_kvm, ignore = "/dev/kvm cannot be opened on this machine")]
fn nic_errors_are_one_line() {
    if !usable() {
        return;
    }
    in_netns(|| {
        let env = Env::new("errors");
        let kernel = tiny_kernel("spin-nic-err", SPIN);
        let k = kernel.to_str().unwrap();
        let run = |nic: &str, extra: &[&str]| -> String {
            let mut args = vec!["run", "--memory", "64M", "--kernel", k, "--nic", nic];
            args.extend_from_slice(extra);
            let err = env.fails(&args);
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            err
        };
        let err = run("switch=nope", &[]);
        assert!(
            err.contains("no switch named \"nope\"") && err.contains("viridian switch new nope"),
            "{err}"
        );
        let err = run("switch=t1,vlan=abc", &[]);
        assert!(err.contains("--nic switch=t1,vlan=abc: vlan:"), "{err}");
        let err = run("switch=t1,colour=red", &[]);
        assert!(err.contains("unknown field \"colour\""), "{err}");
        let err = run("switch=t1", &["--no-hyperv"]);
        assert!(err.contains("drop --no-hyperv"), "{err}");
        // No TAP is left behind by the failed start.
        let links = Net::open();
        assert!(links.link("vif0").is_none());
    });
}
