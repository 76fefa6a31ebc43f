//! Host-KVM start-up benchmarks with a tiny guest (Firecracker's published promises as the
//! yardstick: start under 10 ms, worker overhead under 5 MiB). Benchmarks, not pass/fail
//! tests: `cargo test --release -p cli --test host_bench -- --ignored --nocapture`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A bzImage whose 64-bit entry point runs `code`.
fn tiny_kernel(name: &str, code: &[u8]) -> PathBuf {
    let setup = 5 * 512;
    let mut img = vec![0u8; setup + 0x200 + code.len()];
    img[0x1f1] = 4;
    img[0x201] = 0x6a;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1;
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
    img[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[setup + 0x200..].copy_from_slice(code);
    let path = std::env::temp_dir().join(format!("viridian-bench-{}-{name}", std::process::id()));
    std::fs::write(&path, img).unwrap();
    path
}

/// mov dx, 0x604; mov ax, SLP_TYP(5) | SLP_EN; out dx, ax (ACPI S5: the worker exits 0).
const POWER_OFF: &[u8] = &[
    0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef, 0xeb, 0xfe,
];
/// jmp $
const SPIN: &[u8] = &[0xeb, 0xfe];

fn kvm_usable() -> bool {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("SKIPPED: /dev/kvm cannot be opened");
        return false;
    }
    true
}

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
