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
