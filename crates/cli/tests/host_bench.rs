//! Host-KVM start-up benchmarks with a tiny guest (Firecracker's published promises as the
//! yardstick: start under 10 ms, worker overhead under 5 MiB). Benchmarks, not pass/fail
//! tests: `cargo test --release -p cli --test host_bench -- --ignored --nocapture`.

mod common;

use common::{kvm_usable, tiny_kernel, POWER_OFF, SPIN};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn start_to_first_instruction_and_memory_overhead() {
    if !kvm_usable() {
        return;
    }
    let exe = env!("CARGO_BIN_EXE_viridian");
    // The guest's first instructions print "!\n" on COM1, then it powers off: the first byte on
    // the worker's stdout marks the guest running.
    let mut code = vec![0x66, 0xba, 0xf8, 0x03, 0xb0, b'!', 0xee, 0xb0, b'\n', 0xee];
    code.extend_from_slice(POWER_OFF);
    let hello = tiny_kernel("hello", &code);
    for hyperv in [false, true] {
        let (mut first, mut total) = (vec![], vec![]);
        for _ in 0..21 {
            let mut cmd = Command::new(exe);
            cmd.args(["run", "--memory", "128M", "--kernel"])
                .arg(&hello);
            if !hyperv {
                cmd.arg("--no-hyperv");
            }
            let t = Instant::now();
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut byte = [0u8; 1];
            child.stdout.take().unwrap().read_exact(&mut byte).unwrap();
            first.push(t.elapsed());
            let status = child.wait().unwrap();
            total.push(t.elapsed());
            assert!(status.success(), "tiny guest did not power off: {status}");
            assert_eq!(byte[0], b'!');
        }
        first.sort();
        total.sort();
        println!(
            "1 vCPU / 128 MiB{}: process start -> guest's first output: median {:.2} ms (min {:.2}); start -> power-off -> exit: median {:.2} ms (21 runs)",
            if hyperv { ", Hyper-V on" } else { "" },
            first[10].as_secs_f64() * 1e3,
            first[0].as_secs_f64() * 1e3,
            total[10].as_secs_f64() * 1e3,
        );
    }

    let spin = tiny_kernel("spin", SPIN);
    let mut child = Command::new(exe)
        .args(["run", "--memory", "128M", "--kernel"])
        .arg(&spin)
        .stdin(Stdio::null())
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
