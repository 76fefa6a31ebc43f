//! Host-KVM start-up benchmarks with a tiny guest (Firecracker's published promises as the
//! yardstick: start under 10 ms, worker overhead under 5 MiB). Benchmarks, not pass/fail
//! tests: `cargo test --release -p cli --test host_bench -- --ignored --nocapture`.

mod common;

use common::{kvm_usable, tiny_kernel, POWER_OFF, SPIN};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn start_to_first_instruction_and_memory_overhead() {
    if !kvm_usable() {
        return;
    }
    let exe = env!("CARGO_BIN_EXE_viridian");
    let off = tiny_kernel("off", POWER_OFF);
    for hyperv in [false, true] {
        let mut times = vec![];
        for _ in 0..21 {
            let mut cmd = Command::new(exe);
            cmd.args(["run", "--memory", "128M", "--kernel"]).arg(&off);
            if !hyperv {
                cmd.arg("--no-hyperv");
            }
            let t = Instant::now();
            let status = cmd.stdout(Stdio::null()).status().unwrap();
            times.push(t.elapsed());
            assert!(status.success(), "tiny guest did not power off: {status}");
        }
        times.sort();
        println!(
            "process start -> guest's first instruction -> power-off -> exit, 1 vCPU / 128 MiB{}: median {:.2} ms, min {:.2} ms (21 runs)",
            if hyperv { ", Hyper-V on" } else { "" },
            times[10].as_secs_f64() * 1e3,
            times[0].as_secs_f64() * 1e3
        );
    }

    let spin = tiny_kernel("spin", SPIN);
    let mut child = Command::new(exe)
        .args(["run", "--memory", "128M", "--kernel"])
        .arg(&spin)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    println!(
        "worker resident memory with a running 128 MiB guest: VmRSS {} KiB (RssAnon {} KiB, RssFile {} KiB); the guest touched under 1 MiB of its RAM",
        kb("VmRSS:"),
        kb("RssAnon:"),
        kb("RssFile:")
    );
}
