//! The Debian system disk: a small Debian 12 (bookworm) that boots to a login prompt on the
//! serial console.
//!
//! `mmdebstrap` builds the root file system into a folder from the host's apt sources, and the
//! modules of the lab's Debian cloud kernel are added to it; `mke2fs -d` writes that folder as
//! ext4 into the one partition (from 1 MiB) of an MBR-partitioned raw image, with no loop
//! device and no mount; `viridian vhd convert` turns the image into a dynamic VHDX. The guest
//! boots the same cloud kernel with a busybox initramfs whose `/init` loads the Hyper-V storage
//! modules, waits for the root device and `switch_root`s to it. The result is cached under a
//! key naming the recipe and the kernel version, so a change to either builds a new disk.

use crate::cpio::Archive;
use crate::{debian, Cache, Error, Flavor, Kernel, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Bumped whenever what goes into the disk changes; part of the cache key.
const RECIPE: u32 = 1;

/// The guest's host name.
pub const HOSTNAME: &str = "viridian-debian";

/// The virtual disk's size. The VHDX is dynamic: only what is written takes space.
pub const DISK_BYTES: u64 = 2 << 30;

/// Where the one partition starts: 1 MiB, as partitioning tools align it.
const PARTITION_START: u64 = 1 << 20;

const SECTOR: u64 = 512;

/// Kernel command line: root on the first SCSI disk's first partition, the console on COM1,
/// where systemd also starts a getty (`serial-getty@ttyS0`).
pub const CMDLINE: &str = "root=/dev/sda1 rw console=ttyS0 panic=-1";

/// Packages on top of mmdebstrap's `minbase` variant (the Essential packages and apt).
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "login",
    "passwd",
    "e2fsprogs",
    "procps",
    "iproute2",
    "hyperv-daemons",
    "openssh-server",
];

/// dpkg filters that leave out documentation and translations (copyright notices stay).
const DPKG_FILTERS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
];

/// Timers masked in the image: with no network they would only spend the guest's time.
const MASKED_UNITS: &[&str] = &["apt-daily.timer", "apt-daily-upgrade.timer"];

/// Modules the initramfs loads, with their dependencies, to reach the root file system; those
/// compiled into the kernel (ext4 in the cloud kernel) are skipped.
const ROOT_MODULES: &[&str] = &["hv_vmbus", "hv_storvsc", "sd_mod", "ext4"];

/// The name of the VHDX inside the lab's carrier file system (see [`SystemDisk::lab_carrier`]).
pub(crate) const CARRIER_FILE: &str = "debian.vhdx";

/// `/init` of the system disk's initramfs: load the storage modules, wait for the root device
/// named by `root=`, mount it (`ro` unless the command line says `rw`) and hand over to its
/// init. If the root never appears, say so and power off rather than hang.
const ROOT_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
root=/dev/sda1 fstype=ext4 mode=ro init=/sbin/init
for a in $(cat /proc/cmdline); do
  case "$a" in
    root=*) root="${a#root=}";;
    rootfstype=*) fstype="${a#rootfstype=}";;
    init=*) init="${a#init=}";;
    rw) mode=rw;;
    ro) mode=ro;;
  esac
done
for m in $(cat /lib/modules/load-order); do
  insmod /lib/modules/$m.ko || echo "initramfs: insmod $m failed"
done
i=0
while [ ! -b "$root" ] && [ $i -lt 600 ]; do usleep 100000; i=$((i+1)); done
if mount -t "$fstype" -o "$mode" "$root" /root; then
  umount /proc /sys
  mount --move /dev /root/dev
  exec switch_root /root "$init"
fi
echo "initramfs: cannot mount $root ($fstype); powering off"
poweroff -f
"#;

/// The built system disk and how to boot it.
pub struct SystemDisk {
    /// The cached dynamic VHDX. Attach a differencing child or a snapshot, not this file, to
    /// keep the cache pristine.
    pub vhdx: PathBuf,
    /// The kernel whose modules are on the disk.
    pub kernel: PathBuf,
    /// The initramfs that mounts `/dev/sda1` and switches to it.
    pub initrd: PathBuf,
    /// The cache key: recipe and kernel version.
    pub key: String,
    dir: PathBuf,
}

impl SystemDisk {
    /// Returns the cached disk, building it first if this recipe and kernel have none yet
    /// (that takes minutes; `progress` hears each step).
    pub fn prepare(cache: &Cache, viridian: &Path, progress: &mut dyn Write) -> Result<Self> {
        let kernel = Kernel::fetch(cache, Flavor::Cloud)?;
        let key = format!("debian12-r{RECIPE}-{}", kernel.version);
        let dir = cache.dir().join("system-disk");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let vhdx = dir.join(format!("{key}.vhdx"));
        if !vhdx.exists() {
            let _lock = crate::lock_file(&dir.join(".lock"))?;
            // Another run may have built it while this one waited for the lock.
            if !vhdx.exists() {
                remove_leftovers(&dir, &key, &kernel.version);
                build(&kernel, viridian, &dir, &vhdx, progress)?;
            }
        }
        let initrd = dir.join(initrd_name(&kernel.version));
        root_initramfs(&crate::busybox(cache)?, &kernel, &initrd)?;
        Ok(Self {
            vhdx,
            kernel: kernel.vmlinuz(),
            initrd,
            key,
            dir,
        })
    }

    /// An ext4 image whose only file is [`CARRIER_FILE`], a copy of the VHDX, with room for
    /// it to grow to the disk's full size. The lab attaches it to L1 as a virtio drive with
    /// `snapshot=on`, so L1 sees an ordinary file it may write while the cache stays as built.
    pub(crate) fn lab_carrier(&self, progress: &mut dyn Write) -> Result<PathBuf> {
        let carrier = self.dir.join(format!("{}.carrier.ext4", self.key));
        if carrier.exists() {
            return Ok(carrier);
        }
        let _lock = crate::lock_file(&self.dir.join(".lock"))?;
        if carrier.exists() {
            return Ok(carrier);
        }
        let started = Instant::now();
        say(
            progress,
            "writing the lab's carrier file system (mke2fs -d)",
        );
        let stage = Scratch(self.dir.join(format!("carrier-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&stage.0);
        std::fs::create_dir_all(&stage.0).map_err(|e| Error::io(&stage.0, e))?;
        let inside = stage.0.join(CARRIER_FILE);
        std::fs::hard_link(&self.vhdx, &inside).map_err(|e| Error::io(&inside, e))?;
        let len = std::fs::metadata(&self.vhdx)
            .map_err(|e| Error::io(&self.vhdx, e))?
            .len();
        let size = (len + DISK_BYTES + (256 << 20)).next_multiple_of(1 << 20);
        let tmp = Scratch(stage.0.with_extension("ext4"));
        let file = std::fs::File::create(&tmp.0).map_err(|e| Error::io(&tmp.0, e))?;
        file.set_len(size).map_err(|e| Error::io(&tmp.0, e))?;
        drop(file);
        mke2fs(&stage.0, &tmp.0, 0, size, "viridian-lab")?;
        std::fs::rename(&tmp.0, &carrier).map_err(|e| Error::io(&carrier, e))?;
        say(
            progress,
            &format!(
                "carrier written in {:.0} s",
                started.elapsed().as_secs_f64()
            ),
        );
        Ok(carrier)
    }
}

/// A path removed (file or folder) when dropped: build folders and temporary files.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn say(progress: &mut dyn Write, what: &str) {
    let _ = writeln!(progress, "lab: system disk: {what}");
}

fn initrd_name(kernel_version: &str) -> String {
    format!("initrd-{kernel_version}.cpio")
}

/// Removes what killed builds left behind, and the disks and initramfs images of other keys
/// (older recipes or kernels). Called with the lock held, so no build is under way.
fn remove_leftovers(dir: &Path, key: &str, kernel_version: &str) {
    let initrd = initrd_name(kernel_version);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with("build-")
            || name.starts_with("carrier-")
            || (name.starts_with("debian12-") && !name.starts_with(&format!("{key}.")))
            || (name.starts_with("initrd-") && name != initrd);
        if stale {
            drop(Scratch(e.path()));
        }
    }
}

fn build(
    kernel: &Kernel,
    viridian: &Path,
    dir: &Path,
    vhdx: &Path,
    progress: &mut dyn Write,
) -> Result<()> {
    if !crate::is_root() {
        return Err(Error::Tool {
            what: "building the system disk".into(),
            detail: "needs root (mmdebstrap --mode=root and chroot)".into(),
        });
    }
    let started = Instant::now();
    let work = Scratch(dir.join(format!("build-{}", std::process::id())));
    std::fs::create_dir_all(&work.0).map_err(|e| Error::io(&work.0, e))?;
    say(
        progress,
        &format!(
            "building {} (once per recipe and kernel; a few minutes) in {}",
            vhdx.display(),
            work.0.display()
        ),
    );
    let rootfs = work.0.join("rootfs");
    mmdebstrap(&rootfs, progress)?;
    say(
        progress,
        &format!("adding the modules of kernel {}", kernel.version),
    );
    install_modules(kernel, &rootfs)?;
    configure(&rootfs)?;
    say(progress, "writing the ext4 partition (mke2fs -d)");
    let raw = work.0.join("disk.img");
    make_raw_disk(&rootfs, &raw, DISK_BYTES)?;
    say(
        progress,
        "converting to a dynamic VHDX (viridian vhd convert)",
    );
    let tmp = work.0.join("disk.vhdx");
    debian::run(
        Command::new(viridian)
            .args(["vhd", "convert", "--format", "vhdx", "--block-size", "1M"])
            .arg(&raw)
            .arg(&tmp),
        "viridian vhd convert",
    )?;
    std::fs::rename(&tmp, vhdx).map_err(|e| Error::io(vhdx, e))?;
    let mib = std::fs::metadata(vhdx).map(|m| m.len() >> 20).unwrap_or(0);
    say(
        progress,
        &format!(
            "built in {:.0} s ({mib} MiB VHDX)",
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(())
}

/// Runs `mmdebstrap` into `rootfs`, passing its progress lines on.
fn mmdebstrap(rootfs: &Path, progress: &mut dyn Write) -> Result<()> {
    let sources = debian_sources_in(Path::new("/etc/apt"))?;
    let mut cmd = Command::new("mmdebstrap");
    cmd.args([
        "--mode=root",
        "--variant=minbase",
        "--aptopt=Acquire::Retries \"3\"",
    ])
    .arg(format!("--include={}", PACKAGES.join(",")));
    for f in DPKG_FILTERS {
        cmd.arg(format!("--dpkgopt={f}"));
    }
    cmd.arg("bookworm").arg(rootfs).args(&sources);
    run_with_progress(&mut cmd, "mmdebstrap", progress)
}

/// Runs `cmd`, copying its standard error line by line to `progress`; on failure the last
/// lines are the error's detail.
fn run_with_progress(cmd: &mut Command, what: &str, progress: &mut dyn Write) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Tool {
            what: what.into(),
            detail: format!("{e} (is it installed? run scripts/setup.sh)"),
        })?;
    let mut tail = std::collections::VecDeque::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).split(b'\n').map_while(|l| l.ok()) {
            let line = String::from_utf8_lossy(&line).into_owned();
            say(progress, &format!("{what}: {line}"));
            if tail.len() == 20 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child.wait().map_err(|e| Error::Tool {
        what: what.into(),
        detail: e.to_string(),
    })?;
    if !status.success() {
        return Err(Error::Tool {
            what: what.into(),
            detail: format!("{status}: {}", Vec::from(tail).join("\n")),
        });
    }
    Ok(())
}

/// The apt source files under `etc_apt` (`sources.list` and `sources.list.d/*.list` or
/// `*.sources`) that name a Debian archive; other vendors' repositories are left out.
fn debian_sources_in(etc_apt: &Path) -> Result<Vec<PathBuf>> {
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(entries) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut more: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files.retain(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .any(|l| l.contains("/debian"))
    });
    if files.is_empty() {
        return Err(Error::Tool {
            what: "finding apt sources".into(),
            detail: format!("no Debian archive in {}", etc_apt.display()),
        });
    }
    Ok(files)
}

/// Copies the kernel's modules into the root file system and indexes them (`depmod` inside
/// it), so that udev loads the drivers the guest's devices need.
fn install_modules(kernel: &Kernel, rootfs: &Path) -> Result<()> {
    // Debian 12 merges /lib into /usr/lib.
    let dest = rootfs.join("usr/lib/modules");
    std::fs::create_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    debian::run(
        Command::new("cp")
            .arg("-a")
            .arg(kernel.modules_dir())
            .arg(&dest),
        "copying the kernel modules",
    )?;
    debian::run(
        Command::new("chroot")
            .arg(rootfs)
            .args(["depmod", &kernel.version])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "depmod",
    )?;
    Ok(())
}

/// The lab's settings: host name, fstab for /dev/sda1, a fixed machine id (so no boot is a
/// first boot), root without a password, and masked timers.
fn configure(rootfs: &Path) -> Result<()> {
    let write = |rel: &str, text: &str| {
        let p = rootfs.join(rel);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    };
    write("etc/hostname", &format!("{HOSTNAME}\n"))?;
    write(
        "etc/hosts",
        &format!(
            "127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n::1 localhost ip6-localhost ip6-loopback\n"
        ),
    )?;
    // The initramfs mounts the root read-write; no fsck at boot (a throwaway lab disk).
    write("etc/fstab", "/dev/sda1 / ext4 rw,errors=remount-ro 0 0\n")?;
    let id: String = b"viridian-debian\0"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    write("etc/machine-id", &format!("{id}\n"))?;
    write(
        "etc/motd",
        "\nViridian lab image: Debian 12 on Hyper-V's synthetic devices. root has no password.\n\n",
    )?;
    let shadow_path = rootfs.join("etc/shadow");
    let shadow = std::fs::read_to_string(&shadow_path).map_err(|e| Error::io(&shadow_path, e))?;
    write("etc/shadow", &without_root_password(&shadow))?;
    let units = rootfs.join("etc/systemd/system");
    std::fs::create_dir_all(&units).map_err(|e| Error::io(&units, e))?;
    for unit in MASKED_UNITS {
        let link = units.join(unit);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link).map_err(|e| Error::io(&link, e))?;
    }
    Ok(())
}

/// `/etc/shadow` with root's password field emptied: login asks for no password.
fn without_root_password(shadow: &str) -> String {
    let mut out = String::with_capacity(shadow.len());
    for line in shadow.lines() {
        match line.strip_prefix("root:") {
            Some(rest) => {
                let after = rest.split_once(':').map_or("", |(_, a)| a);
                out.push_str("root::");
                out.push_str(after);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A raw disk of `size` bytes: an MBR with one Linux partition from 1 MiB to the end, holding
/// an ext4 file system with the contents of `rootfs`.
fn make_raw_disk(rootfs: &Path, raw: &Path, size: u64) -> Result<()> {
    let too_big = || Error::Tool {
        what: "partitioning".into(),
        detail: format!("{size} bytes do not fit an MBR partition table"),
    };
    let start = u32::try_from(PARTITION_START / SECTOR).map_err(|_| too_big())?;
    let sectors = size
        .checked_sub(PARTITION_START)
        .and_then(|b| u32::try_from(b / SECTOR).ok())
        .ok_or_else(too_big)?;
    let file = std::fs::File::create(raw).map_err(|e| Error::io(raw, e))?;
    file.set_len(size).map_err(|e| Error::io(raw, e))?;
    file.write_all_at(&mbr(start, sectors), 0)
        .map_err(|e| Error::io(raw, e))?;
    drop(file);
    mke2fs(
        rootfs,
        raw,
        PARTITION_START,
        size - PARTITION_START,
        "debian-root",
    )
}

/// `mke2fs -d`: an ext4 file system of `bytes` at `offset` in `image`, filled from `from`.
/// The image is a new sparse file, so nothing needs zeroing or discarding.
fn mke2fs(from: &Path, image: &Path, offset: u64, bytes: u64, label: &str) -> Result<()> {
    debian::run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-m", "1", "-L", label, "-d"])
            .arg(from)
            .arg("-E")
            .arg(format!(
                "offset={offset},nodiscard,assume_storage_prezeroed=1"
            ))
            .arg(image)
            .arg(format!("{}k", bytes / 1024)),
        "mke2fs",
    )?;
    Ok(())
}

/// A master boot record with one Linux (0x83) partition of `sectors` sectors at LBA `start`.
/// The CHS fields hold the "use LBA" marker, as for any disk past 8 GiB.
fn mbr(start: u32, sectors: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[440..444].copy_from_slice(b"VIRI"); // disk signature
    let e = &mut m[446..462];
    e[0] = 0x00; // not marked bootable: the kernel is loaded directly
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[4] = 0x83;
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xaa;
    m
}

/// The initramfs: busybox, [`ROOT_INIT`], and the storage modules in load order.
fn root_initramfs(busybox: &Path, kernel: &Kernel, out: &Path) -> Result<()> {
    let mut a = Archive::new();
    crate::image::base(&mut a, busybox)?;
    a.dir("root");
    a.dir("lib/modules");
    a.file("init", 0o755, ROOT_INIT.as_bytes());
    let wanted: Vec<&str> = ROOT_MODULES
        .iter()
        .copied()
        .filter(|m| !kernel.is_builtin(m))
        .collect();
    let mut order = String::new();
    for (name, path) in kernel.modules_with_deps(&wanted)? {
        let data = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        a.file(&format!("lib/modules/{name}.ko"), 0o644, &data);
        order.push_str(&name);
        order.push('\n');
    }
    a.file("lib/modules/load-order", 0o644, order.as_bytes());
    crate::write_atomically(out, |f| a.write_to(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mbr_has_one_linux_partition_at_1_mib() {
        let m = mbr(2048, 4_192_256);
        assert_eq!(&m[510..], &[0x55, 0xaa]);
        assert_eq!(m[446 + 4], 0x83);
        assert_eq!(u32::from_le_bytes(m[454..458].try_into().unwrap()), 2048);
        assert_eq!(
            u32::from_le_bytes(m[458..462].try_into().unwrap()),
            4_192_256
        );
        // The other three entries are empty.
        assert!(m[462..510].iter().all(|&b| b == 0));
    }

    #[test]
    fn root_password_is_emptied_and_nothing_else_changes() {
        let shadow = "root:*:20788:0:99999:7:::\nsshd:!:20788::::::\nrootless:x:1:::::\n";
        assert_eq!(
            without_root_password(shadow),
            "root::20788:0:99999:7:::\nsshd:!:20788::::::\nrootless:x:1:::::\n"
        );
    }

    #[test]
    fn only_debian_sources_are_used() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sources.list.d")).unwrap();
        std::fs::write(
            d.join("sources.list"),
            "# deb http://example.org/debian x main\n",
        )
        .unwrap();
        std::fs::write(
            d.join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n",
        )
        .unwrap();
        std::fs::write(
            d.join("sources.list.d/vendor.list"),
            "deb https://vendor.example/apt stable main\n",
        )
        .unwrap();
        std::fs::write(
            d.join("sources.list.d/old.list.disabled"),
            "deb http://deb.debian.org/debian bullseye main\n",
        )
        .unwrap();
        assert_eq!(
            debian_sources_in(d).unwrap(),
            vec![d.join("sources.list.d/debian.sources")]
        );
        std::fs::remove_file(d.join("sources.list.d/debian.sources")).unwrap();
        assert!(debian_sources_in(d).is_err());
    }

    #[test]
    fn leftovers_of_other_keys_and_killed_builds_go() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = "debian12-r2-6.1.0-60-cloud-amd64";
        for f in [
            "debian12-r1-6.1.0-57-cloud-amd64.vhdx",
            "debian12-r1-6.1.0-57-cloud-amd64.carrier.ext4",
            "initrd-6.1.0-57-cloud-amd64.cpio",
            "debian12-r2-6.1.0-60-cloud-amd64.carrier.ext4",
            "initrd-6.1.0-60-cloud-amd64.cpio",
            ".lock",
        ] {
            std::fs::write(d.join(f), b"").unwrap();
        }
        std::fs::create_dir_all(d.join("build-123/rootfs/etc")).unwrap();
        std::fs::create_dir(d.join("carrier-456")).unwrap();
        remove_leftovers(d, key, "6.1.0-60-cloud-amd64");
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".lock",
                "debian12-r2-6.1.0-60-cloud-amd64.carrier.ext4",
                "initrd-6.1.0-60-cloud-amd64.cpio"
            ]
        );
    }

    #[test]
    fn configure_writes_the_lab_settings() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/shadow"), "root:*:1:0:99999:7:::\n").unwrap();
        configure(root).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
        assert_eq!(read("etc/hostname"), "viridian-debian\n");
        assert!(read("etc/fstab").starts_with("/dev/sda1 / ext4 "));
        assert!(read("etc/shadow").starts_with("root::1:"));
        let id = read("etc/machine-id");
        assert_eq!(id.trim().len(), 32);
        assert!(id.trim().bytes().all(|b| b.is_ascii_hexdigit()));
        let masked = std::fs::read_link(root.join("etc/systemd/system/apt-daily.timer")).unwrap();
        assert_eq!(masked, Path::new("/dev/null"));
        // Running it again (a rebuilt tree) works.
        configure(root).unwrap();
    }

    /// The real `mke2fs`: the file system lands at 1 MiB behind the partition table, with the
    /// folder's files in it (read back with `debugfs`).
    #[test]
    fn raw_disk_holds_ext4_behind_the_partition_table() {
        if Command::new("debugfs").arg("-V").output().is_err() {
            eprintln!("SKIPPED: e2fsprogs (mke2fs, debugfs) is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "lab-test\n").unwrap();
        let raw = dir.path().join("disk.img");
        make_raw_disk(&root, &raw, 64 << 20).unwrap();
        let data = std::fs::read(&raw).unwrap();
        assert_eq!(data.len(), 64 << 20);
        assert_eq!(&data[510..512], &[0x55, 0xaa]);
        let sectors = u32::from_le_bytes(data[458..462].try_into().unwrap());
        assert_eq!(u64::from(sectors) * SECTOR, (64 << 20) - PARTITION_START);
        // The ext4 superblock is 1024 bytes into the partition; its magic at offset 56.
        let sb = PARTITION_START as usize + 1024;
        assert_eq!(&data[sb + 56..sb + 58], &[0x53, 0xef]);
        let partition = dir.path().join("part.img");
        std::fs::write(&partition, &data[PARTITION_START as usize..]).unwrap();
        let out = Command::new("debugfs")
            .args(["-R", "cat /etc/hostname"])
            .arg(&partition)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "lab-test\n");
    }
}
