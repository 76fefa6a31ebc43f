//! Helpers shared by the integration tests: running qemu-img, reading whole disks, making VHDs.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use vhdx::vhd::format::DiskType;
use vhdx::vhd::{Vhd, VhdCreateOptions};
use vhdx::Disk;

/// Whether qemu-img runs here; prints why the qemu part is skipped when it does not.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: qemu-img not installed (apt-get install qemu-utils)");
    }
    ok
}

/// Runs `cmd args`, asserts success, returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} not runnable ({e}); install qemu-utils"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The whole virtual disk, read through the library.
pub fn read_all(d: &dyn Disk) -> Vec<u8> {
    let mut v = vec![0u8; d.size() as usize];
    for (i, c) in v.chunks_mut(1 << 20).enumerate() {
        d.read_at(c, i as u64 * (1 << 20)).unwrap();
    }
    v
}

/// The whole virtual disk, as qemu-img converts it to raw.
pub fn qemu_to_raw(img: &Path, fmt: &str) -> Vec<u8> {
    let raw = img.with_extension("qemu.raw");
    let _ = std::fs::remove_file(&raw);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            fmt,
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let v = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    v
}

/// A VHD of `disk_type` with 512 KiB blocks (small, so tests cross block boundaries).
pub fn vhd(path: &Path, disk_type: DiskType, size: u64, parent: Option<&Path>) -> Vhd {
    Vhd::create(
        path,
        &VhdCreateOptions {
            disk_type,
            size,
            block_size: 512 << 10,
            parent: parent.map(Path::to_path_buf),
        },
    )
    .unwrap()
}
