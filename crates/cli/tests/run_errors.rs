//! `viridian run` with bad input: each case is one line on stderr naming the problem and a
//! non-zero exit, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn viridian(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_viridian"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run viridian")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("viridian-run-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A file with an x86-64 bzImage setup header and a tiny payload.
fn fake_kernel(name: &str) -> PathBuf {
    common::tiny_kernel(name, common::SPIN)
}

/// Asserts a failed run whose stderr is one line containing every word of `expect`.
fn assert_one_line_error(out: &Output, expect: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {stderr}"
    );
    assert_ne!(out.status.code(), Some(101), "panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    for word in expect {
        assert!(lines[0].contains(word), "'{}' lacks '{word}'", lines[0]);
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn missing_kernel() {
    let out = viridian(&["run", "--kernel", "/nonexistent/bzImage"], &[]);
    assert_one_line_error(&out, &["/nonexistent/bzImage", "No such file"]);
}

#[test]
fn kernel_that_is_not_a_bzimage() {
    let junk = tmp("junk");
    std::fs::write(&junk, vec![0x7f; 8192]).unwrap();
    let out = viridian(&["run", "--kernel", p(&junk)], &[]);
    assert_one_line_error(&out, &[p(&junk), "not a bzImage"]);
}

#[test]
fn initrd_larger_than_memory() {
    let kernel = fake_kernel("bz-initrd");
    let initrd = tmp("initrd-big");
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(80 << 20).unwrap();
    let out = viridian(
        &[
            "run",
            "--kernel",
            p(&kernel),
            "--initrd",
            p(&initrd),
            "--memory",
            "64M",
        ],
        &[],
    );
    assert_one_line_error(&out, &[p(&initrd), "does not fit", "--memory"]);
}

#[test]
fn memory_too_small_or_larger_than_the_host() {
    let kernel = fake_kernel("bz-memory");
    let out = viridian(&["run", "--kernel", p(&kernel), "--memory", "16M"], &[]);
    assert_one_line_error(&out, &["--memory 16 MiB", "minimum"]);
    let out = viridian(&["run", "--kernel", p(&kernel), "--memory", "64T"], &[]);
    assert_one_line_error(&out, &["--memory", "more than this host"]);
    let out = viridian(&["run", "--kernel", p(&kernel), "--memory", "lots"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("e.g. 512M"));
}

#[test]
fn missing_kvm_device() {
    let kernel = fake_kernel("bz-nokvm");
    let out = viridian(
        &["run", "--kernel", p(&kernel)],
        &[("VIRIDIAN_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_one_line_error(&out, &["no KVM", "kvm-intel or kvm-amd"]);
}

#[test]
fn kvm_without_permission() {
    let is_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let setpriv = Path::new("/usr/bin/setpriv");
    let kvm_mode = std::fs::metadata("/dev/kvm").map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode()
    });
    match kvm_mode {
        Ok(mode) if is_root && setpriv.exists() && mode & 0o006 == 0 => {}
        _ => {
            eprintln!(
                "SKIPPED: needs root, /usr/bin/setpriv and a /dev/kvm closed to other users \
                 to run viridian as 'nobody'"
            );
            return;
        }
    }
    let kernel = fake_kernel("bz-perm");
    // The kernel file must be readable by nobody too.
    let out = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_viridian"))
        .args(["run", "--kernel", p(&kernel)])
        .output()
        .unwrap();
    assert_one_line_error(&out, &["permission denied", "/dev/kvm", "kvm' group"]);
}

#[test]
fn missing_disk_names_the_file() {
    let kernel = fake_kernel("bz-missing-disk");
    let out = viridian(
        &[
            "run",
            "--kernel",
            p(&kernel),
            "--disk",
            "/nonexistent/disk.vhdx",
        ],
        &[("VIRIDIAN_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_one_line_error(&out, &["/nonexistent/disk.vhdx", "No such file"]);
}

#[test]
fn disk_in_use_by_another_writer_names_the_file() {
    use vhdx::open::{create, CreateOptions, Format, ImageType};
    let kernel = fake_kernel("bz-locked-disk");
    let disk = tmp("locked.vhdx");
    let _ = std::fs::remove_file(&disk);
    // This process holds the VHDX open for writing, as a running VM does.
    let _held = create(
        &disk,
        &CreateOptions {
            format: Format::Vhdx,
            image_type: ImageType::Dynamic,
            size: 16 << 20,
            block_size: 0,
            logical_sector_size: 0,
            physical_sector_size: 0,
            parent: None,
        },
    )
    .unwrap();
    let out = viridian(
        &["run", "--kernel", p(&kernel), "--disk", p(&disk)],
        &[("VIRIDIAN_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_one_line_error(&out, &[p(&disk), "in use"]);
    // A read-only attach of the same file is allowed past the lock (it then fails on the
    // missing KVM device, not on the disk).
    let disk_ro = format!("{},readonly", p(&disk));
    let out = viridian(
        &["run", "--kernel", p(&kernel), "--disk", &disk_ro],
        &[("VIRIDIAN_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_one_line_error(&out, &["no KVM"]);
    drop(_held);
    let _ = std::fs::remove_file(&disk);
}

#[test]
fn disk_with_an_unknown_option_or_without_hyperv() {
    let kernel = fake_kernel("bz-disk-opts");
    let disk = tmp("plain.img");
    std::fs::write(&disk, vec![0; 1 << 20]).unwrap();
    let bad = format!("{},cache=bogus", p(&disk));
    let out = viridian(&["run", "--kernel", p(&kernel), "--disk", &bad], &[]);
    assert_one_line_error(&out, &["cache=\"bogus\"", "none or writeback"]);
    let out = viridian(
        &[
            "run",
            "--kernel",
            p(&kernel),
            "--no-hyperv",
            "--disk",
            p(&disk),
        ],
        &[],
    );
    assert_one_line_error(&out, &["--disk", "--no-hyperv"]);
}

#[test]
fn disk_whose_content_is_not_its_format_or_not_whole_sectors() {
    let kernel = fake_kernel("bz-disk-junk");
    let no_kvm = [("VIRIDIAN_KVM_DEVICE", "/nonexistent/kvm")];
    let junk: Vec<u8> = (0..700u32).map(|i| (i * 37 + 11) as u8).collect();
    for (name, words) in [
        (
            "junk.vhdx",
            &["VHDX file identifier", "\"vhdxfile\"", "offset 0x0"][..],
        ),
        (
            "junk.vhd",
            &["VHD footer", "\"conectix\"", "offset 0xbc"][..],
        ),
        ("junk.img", &["512-byte sectors", "format=raw"][..]),
    ] {
        let disk = tmp(name);
        std::fs::write(&disk, &junk).unwrap();
        let out = viridian(
            &["run", "--kernel", p(&kernel), "--disk", p(&disk)],
            &no_kvm,
        );
        let mut expect = vec![p(&disk)];
        expect.extend_from_slice(words);
        assert_one_line_error(&out, &expect);
    }
    // Explicitly raw, the odd-sized file is accepted (the run then fails on the missing KVM
    // device, not on the disk).
    let raw = format!("{},format=raw", p(&tmp("junk.img")));
    let out = viridian(&["run", "--kernel", p(&kernel), "--disk", &raw], &no_kvm);
    assert_one_line_error(&out, &["no KVM"]);
}

#[test]
fn disk_and_dvd_places_out_of_range_or_taken_name_the_value() {
    let kernel = fake_kernel("bz-disk-places");
    for (drives, words) in [
        (
            &["--disk", "/d/a.vhdx,controller=4"][..],
            &[
                "--disk /d/a.vhdx,controller=4",
                "controller 4 is out of range",
            ][..],
        ),
        (
            &["--disk", "/d/a.vhdx,location=64,readonly"][..],
            &["location 64 is out of range"][..],
        ),
        (
            &[
                "--disk",
                "/d/a.vhdx,location=1",
                "--dvd",
                "/d/x.iso,location=1",
            ][..],
            &[
                "--dvd /d/x.iso,location=1",
                "location 1 of controller 0 is in use",
            ][..],
        ),
        (
            &["--disk", "/d/a.vhdx,location=two"][..],
            &["location=\"two\" is not a number"][..],
        ),
        (
            &["--dvd", "/d/x.iso,readonly"][..],
            &["unknown option \"readonly\""][..],
        ),
    ] {
        let mut args = vec!["run", "--kernel", p(&kernel)];
        args.extend_from_slice(drives);
        let out = viridian(&args, &[]);
        assert_one_line_error(&out, words);
    }
}
