//! The two initramfs images: the L2 guest (busybox + a scenario `/init`) and the L1 lab machine
//! (busybox, KVM modules, the viridian binary and its libraries, the L2 kernels and image).

use crate::cpio::Archive;
use crate::{Error, Result};
use std::path::Path;
use std::process::Command;

/// `/init` of the L2 guest. It reads `viridian.scenario=` from the command line, prints
/// `VIRIDIAN-GUEST key=value` lines, and powers off.
pub const L2_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
/bin/busybox --install -s /sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
say() { echo "VIRIDIAN-GUEST $*"; }
say init_uptime=$(cut -d' ' -f1 /proc/uptime)
S=report
for a in $(cat /proc/cmdline); do
  case "$a" in viridian.scenario=*) S="${a#viridian.scenario=}";; esac
done
if [ "$S" != boot ]; then
  say nproc=$(nproc)
  say mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  say kernel=$(uname -r)
  # Nested virtualization stays hidden, as on Hyper-V: CPUs flagged svm or vmx.
  say virt_cpus=$(grep -c -w -E 'svm|vmx' /proc/cpuinfo)
fi
M=/lib/modules/$(uname -r)
if [ "$S" = panic ]; then
  # With hv_vmbus loaded, a panic is reported through the Hyper-V crash MSRs.
  for m in $(cat $M/load-order 2>/dev/null); do insmod $M/$m.ko || say insmod_failed=$m; done
  sleep 2
  say panicking
  echo c > /proc/sysrq-trigger
fi
if [ "$S" = hyperv ]; then
  # Start with a wrong clock so that timesync has something to correct.
  date -s "2001-01-01 00:00:00" >/dev/null
  for m in $(cat $M/load-order 2>/dev/null); do insmod $M/$m.ko || say insmod_failed=$m; done
  i=0
  while [ $(ls /sys/bus/vmbus/devices 2>/dev/null | wc -l) -lt 3 ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
  sleep 3
  dmesg | grep -q "Hypervisor detected: Microsoft Hyper-V" && say hypervisor=hyperv
  say vmbus_version=$(dmesg | sed -n 's/.*Vmbus version:\([0-9.]*\).*/\1/p' | head -n1)
  for d in /sys/bus/vmbus/devices/*; do
    [ -e "$d/driver" ] && say bound=$(basename $(readlink $d/driver))
  done
  say unchecked_msr=$(dmesg | grep -c "unchecked MSR")
  say apic=$(dmesg | sed -n 's/.*Using enlightened APIC (\([a-z0-9]*\) mode).*/\1/p' | head -n1)
  say vmbus_errors=$(dmesg | grep -i "vmbus" | grep -ci "error\|fail\|timed out")
  say clock=$(date +%s)
  if [ $(nproc) -gt 1 ]; then
    # Move every channel to vCPU 1 and check that its Hyper-V interrupts arrive there.
    for c in /sys/bus/vmbus/devices/*/channels/*/cpu; do echo 1 > $c 2>/dev/null; done
    before=$(awk '/HYP:/ {print $3}' /proc/interrupts)
    sleep 6
    after=$(awk '/HYP:/ {print $3}' /proc/interrupts)
    say vcpu1_interrupts=$((after - before))
  fi
  dmesg | grep -i -E "hyper-v|hv_|vmbus" | sed 's/^/GUEST-DMESG /'
  say ready
  # Wait for `viridian vm stop`: hv_utils runs /sbin/poweroff (below). The ticks show whether
  # a restored guest goes on where it was saved (its count and uptime continue).
  n=0
  while true; do n=$((n+1)); say tick=$n uptime=$(cut -d' ' -f1 /proc/uptime); sleep 2; done
fi
if [ "$S" = storage ]; then
  # Debian's own hv_storvsc drives the synthetic SCSI controller: find the disk, write a
  # pattern through the page cache and fsync it, drop the cache, read it back.
  for m in $(cat $M/load-order 2>/dev/null); do insmod $M/$m.ko || say insmod_failed=$m; done
  i=0
  while [ ! -e /sys/block/sda ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
  if [ -e /sys/block/sda ]; then
    say disk_sectors=$(cat /sys/block/sda/size)
    say disk_logical_block=$(cat /sys/block/sda/queue/logical_block_size)
    say disk_vendor=$(cat /sys/block/sda/device/vendor | tr -d ' ')
    for d in /sys/bus/vmbus/devices/*; do
      [ "$(cat $d/class_id 2>/dev/null)" = "{ba6163d9-04a1-4d29-b605-72e2ffb1dc7f}" ] && say disk_channels=$(ls $d/channels | wc -l)
    done
    dd if=/dev/urandom of=/tmp/pattern bs=1024 count=4096 2>/dev/null
    dd if=/tmp/pattern of=/dev/sda bs=65536 conv=fsync 2>/dev/null && say disk_written=1
    echo 3 > /proc/sys/vm/drop_caches
    say pattern_md5=$(md5sum < /tmp/pattern | cut -c1-32)
    say readback_md5=$(dd if=/dev/sda bs=65536 count=64 2>/dev/null | md5sum | cut -c1-32)
  else
    say disk=missing
  fi
  dmesg | grep -i -E "scsi|sd |storvsc" | sed 's/^/GUEST-DMESG /'
fi
if [ "$S" = formats ]; then
  # Five disks of different formats told apart by size (64M dynamic VHDX, 32M differencing
  # VHDX on controller 1, 16M fixed VHD, 8M raw, 4M raw read-only) and a DVD drive.
  for m in $(cat $M/load-order 2>/dev/null); do insmod $M/$m.ko || say insmod_failed=$m; done
  i=0
  while { [ $(ls -d /sys/block/sd* 2>/dev/null | wc -l) -lt 5 ] || [ ! -e /sys/block/sr0 ]; } && [ $i -lt 90 ]; do sleep 1; i=$((i+1)); done
  dev_of() { for d in /sys/block/sd*; do [ "$(cat $d/size)" = "$1" ] && basename $d; done; }
  for d in /sys/block/sd* /sys/block/sr0; do
    [ -e $d ] || continue
    s=$(cat $d/size)
    [ "$(basename $d)" = sr0 ] && s=dvd
    serial=$(dd if=$d/device/vpd_pg80 bs=1 skip=4 count=32 2>/dev/null)
    say disk_$s=$(basename $d),$(cat $d/queue/logical_block_size),$(cat $d/queue/physical_block_size),$(cat $d/ro),$(cat $d/device/type),$(basename $(readlink $d/device)),$(cat $d/device/wwid 2>/dev/null | tr -d ' '),$serial,$(cat $d/queue/discard_max_bytes)
    # The device identification page, which udev's scsi_id names /dev/disk/by-id links from.
    say pg83_$s=$(od -An -tx1 -v $d/device/vpd_pg83 2>/dev/null | tr -d ' \n')
  done
  # 1 MiB at 1 MiB on every writable disk, fsynced; its MD5 for the host to compare.
  for s in 131072 65536 32768 16384; do
    n=$(dev_of $s)
    dd if=/dev/urandom of=/tmp/w bs=65536 count=16 2>/dev/null
    dd if=/tmp/w of=/dev/$n bs=65536 seek=16 conv=fsync 2>/dev/null && say md5_$s=$(md5sum < /tmp/w | cut -c1-32)
  done
  # 8 MiB more on the dynamic VHDX, to be discarded later.
  n=$(dev_of 131072)
  dd if=/dev/urandom of=/dev/$n bs=65536 seek=256 count=128 conv=fsync 2>/dev/null && say trim_written=1
  # The read-only disk refuses writes.
  n=$(dev_of 8192)
  dd if=/dev/zero of=/dev/$n bs=4096 count=1 conv=fsync 2>/dev/null || say ro_write_refused=1
  mkdir -p /mnt
  mount -t iso9660 -o ro /dev/sr0 /mnt && say dvd_md5=$(md5sum < /mnt/hello.bin | cut -c1-32) && umount /mnt
  say formats_written
  # The host ejects the disc (viridian vm dvd --eject): opening the drive then fails.
  i=0
  while dd if=/dev/sr0 of=/dev/null bs=2048 count=1 2>/dev/null && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
  dd if=/dev/sr0 of=/dev/null bs=2048 count=1 2>/dev/null || say dvd_ejected=1
  n=$(dev_of 131072)
  blkdiscard -o 16777216 -l 8388608 /dev/$n && say discarded=1
  echo 3 > /proc/sys/vm/drop_caches
  z=$(dd if=/dev/zero bs=65536 count=128 2>/dev/null | md5sum | cut -c1-32)
  [ "$(dd if=/dev/$n bs=65536 skip=256 count=128 2>/dev/null | md5sum | cut -c1-32)" = "$z" ] && say discarded_reads_zero=1
  say formats_discarded
  # The host inserts another disc.
  i=0
  while ! mount -t iso9660 -o ro /dev/sr0 /mnt 2>/dev/null && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
  [ -e /mnt/second.bin ] && say dvd2_md5=$(md5sum < /mnt/second.bin | cut -c1-32) && umount /mnt
  # The guest ejects it itself (START STOP UNIT with LoEj, after unlocking the tray).
  eject /dev/sr0 && say guest_ejected=1
  say formats_guest_ejected
  sleep 2
  dmesg | grep -i -E "scsi|sd |sr |storvsc|cdrom|isofs" | sed 's/^/GUEST-DMESG /'
fi
if [ "$S" = ids ]; then
  # The identifiers of viridian.disks= disks, told apart by size, in a second boot.
  N=1
  for a in $(cat /proc/cmdline); do
    case "$a" in viridian.disks=*) N=${a#*=};; esac
  done
  for m in $(cat $M/load-order 2>/dev/null); do insmod $M/$m.ko || say insmod_failed=$m; done
  i=0
  while [ $(ls -d /sys/block/sd* 2>/dev/null | wc -l) -lt $N ] && [ $i -lt 90 ]; do sleep 1; i=$((i+1)); done
  for d in /sys/block/sd*; do
    [ -e $d ] || continue
    say id_$(cat $d/size)=$(cat $d/device/wwid 2>/dev/null | tr -d ' '),$(dd if=$d/device/vpd_pg80 bs=1 skip=4 count=32 2>/dev/null),$(basename $(readlink $d/device))
  done
fi
if [ "$S" = hotplug ]; then
  # The host adds a second disk while the guest runs, then removes it.
  for m in $(cat $M/load-order 2>/dev/null); do insmod $M/$m.ko || say insmod_failed=$m; done
  i=0
  while [ ! -e /sys/block/sda ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
  say hotplug_ready
  i=0
  while [ ! -e /sys/block/sdb ] && [ $i -lt 90 ]; do sleep 1; i=$((i+1)); done
  [ -e /sys/block/sdb ] && say sdb_sectors=$(cat /sys/block/sdb/size)
  say hotplug_added
  i=0
  while [ -e /sys/block/sdb ] && [ $i -lt 90 ]; do sleep 1; i=$((i+1)); done
  [ -e /sys/block/sdb ] || say sdb_removed=1
fi
if [ "$S" = kvp ]; then
  # Debian's hv_kvp_daemon publishes this guest's name, OS and addresses over KVP and writes
  # what the host sets into /var/lib/hyperv/.kvp_pool_0.
  hostname viridian-kvp-guest
  # As on an installed Debian: the host name resolves through /etc/hosts (the daemon reports
  # it as FullyQualifiedDomainName).
  printf '127.0.0.1 localhost\n127.0.1.1 viridian-kvp-guest\n' > /etc/hosts
  ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
  for m in $(cat $M/load-order 2>/dev/null); do insmod $M/$m.ko || say insmod_failed=$m; done
  i=0
  while [ ! -e /dev/vmbus/hv_kvp ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
  [ -e /dev/vmbus/hv_kvp ] || say kvp_device=missing
  mkdir -p /var/lib/hyperv
  /usr/sbin/hv_kvp_daemon -n > /tmp/kvp.log 2>&1 &
  sleep 2
  say ready
  i=0
  while ! grep -a -q LabValue /var/lib/hyperv/.kvp_pool_0 2>/dev/null && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
  grep -a -q LabValue /var/lib/hyperv/.kvp_pool_0 2>/dev/null && say kvp_pool0=LabKey
  sed 's/^/GUEST-KVP /' /tmp/kvp.log
  while true; do sleep 1; done
fi
if [ "$S" = fio ]; then
  # The QEMU guest has no VMBus, the Viridian guest no virtio: load what loads.
  for m in $(cat $M/load-order 2>/dev/null); do insmod $M/$m.ko 2>/dev/null; done
  . /fio.sh
fi
if [ "$S" = net ]; then
  for m in $(cat $M/load-order 2>/dev/null); do insmod $M/$m.ko || say insmod_failed=$m; done
  . /net.sh
fi
say poweroff
poweroff -f
"#;

/// `/sbin/poweroff` as hv_utils' orderly power-off runs it: report, then power off.
pub const L2_POWEROFF: &str =
    "#!/bin/busybox sh\necho \"VIRIDIAN-GUEST orderly_poweroff\" > /dev/console\nexec /bin/busybox poweroff -f\n";

/// Guest modules loaded by the scenarios (with their dependencies): the Hyper-V drivers, and
/// the CD-ROM driver and ISO 9660 for the `formats` scenario's DVD.
pub const HYPERV_MODULES: &[&str] = &[
    "hv_vmbus",
    "hv_utils",
    "hv_storvsc",
    "sd_mod",
    "sr_mod",
    "isofs",
];

/// Adds busybox and the base directories and device nodes.
pub(crate) fn base(archive: &mut Archive, busybox: &Path) -> Result<()> {
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib64",
        "lib/x86_64-linux-gnu",
        "etc",
    ] {
        archive.dir(d);
    }
    archive.char_device("dev/console", 5, 1);
    archive.char_device("dev/null", 1, 3);
    let bb = std::fs::read(busybox).map_err(|e| Error::io(busybox, e))?;
    archive.file("bin/busybox", 0o755, &bb);
    Ok(())
}

/// What a Debian guest's `/etc/os-release` says (hv_kvp_daemon reads it for OSName and
/// OSVersion).
pub const L2_OS_RELEASE: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nID=debian\n";

/// The L2 guest's initramfs, with the Hyper-V modules and `extra_modules` of each kernel
/// under `/lib/modules/VERSION/` and their load order in `load-order`, and `programs` (path in
/// the image, host path) with their shared libraries (looked for in `lib_dirs` before the
/// host's).
pub fn l2_initramfs(
    busybox: &Path,
    kernels: &[&crate::Kernel],
    programs: &[(String, std::path::PathBuf)],
    lib_dirs: &[std::path::PathBuf],
    extra_modules: &[&str],
    out: &Path,
) -> Result<()> {
    let mut a = Archive::new();
    base(&mut a, busybox)?;
    a.file("init", 0o755, L2_INIT.as_bytes());
    a.file("sbin/poweroff", 0o755, L2_POWEROFF.as_bytes());
    a.file("etc/os-release", 0o644, L2_OS_RELEASE.as_bytes());
    a.file("net.sh", 0o644, crate::network::L2_NET.as_bytes());
    a.file("bench.sh", 0o644, crate::netbench::L2_BENCH.as_bytes());
    a.file(
        "fio.sh",
        0o644,
        crate::disk_bench::guest_script().as_bytes(),
    );
    add_programs(&mut a, programs, &[], lib_dirs)?;
    a.dir("lib/modules");
    for k in kernels {
        let dir = format!("lib/modules/{}", k.version);
        a.dir(&dir);
        let modules = k.modules_with_deps(
            &[HYPERV_MODULES, crate::network::L2_MODULES, extra_modules].concat(),
        )?;
        let mut order = String::new();
        for (name, path) in &modules {
            let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            a.file(&format!("{dir}/{name}.ko"), 0o644, &data);
            order.push_str(name);
            order.push('\n');
        }
        a.file(&format!("{dir}/load-order"), 0o644, order.as_bytes());
    }
    write(a, out)
}

/// Writes the archive under a temporary name and renames it into place, so a reader never sees
/// a partial image even when several lab runs share the cache.
fn write(a: Archive, out: &Path) -> Result<()> {
    crate::write_atomically(out, |f| a.write_to(f))
}

/// What goes into the L1 image.
pub struct L1Contents<'a> {
    pub busybox: &'a Path,
    pub init: String,
    /// (name, path) in load order.
    pub modules: Vec<(String, std::path::PathBuf)>,
    /// Executables copied with their shared libraries: (path in image, host path).
    pub programs: Vec<(String, std::path::PathBuf)>,
    /// Plain files: (path in image, host path).
    pub files: Vec<(String, std::path::PathBuf)>,
    /// Where the programs' libraries are looked for before the host's (libraries unpacked
    /// from Debian's packages).
    pub lib_dirs: Vec<std::path::PathBuf>,
}

pub fn l1_initramfs(contents: &L1Contents, out: &Path) -> Result<()> {
    let mut a = Archive::new();
    base(&mut a, contents.busybox)?;
    a.file("init", 0o755, contents.init.as_bytes());
    a.dir("modules");
    for (name, path) in &contents.modules {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        a.file(&format!("modules/{name}.ko"), 0o644, &data);
    }
    add_programs(
        &mut a,
        &contents.programs,
        &contents.files,
        &contents.lib_dirs,
    )?;
    write(a, out)
}

/// Adds executables with the shared libraries `ldd` lists for them (searching `lib_dirs`
/// first), and plain files, creating their directories.
fn add_programs(
    a: &mut Archive,
    programs: &[(String, std::path::PathBuf)],
    files: &[(String, std::path::PathBuf)],
    lib_dirs: &[std::path::PathBuf],
) -> Result<()> {
    let mut libs = std::collections::BTreeSet::new();
    for (_, host) in programs {
        libs.extend(shared_libraries(host, lib_dirs)?);
    }
    let mut dirs = std::collections::BTreeSet::new();
    for (image, _) in programs.iter().chain(files) {
        let mut p = Path::new(image).parent();
        while let Some(d) = p {
            if !d.as_os_str().is_empty() {
                dirs.insert(d.to_string_lossy().into_owned());
            }
            p = d.parent();
        }
    }
    for d in dirs {
        a.dir(&d);
    }
    for SharedLibrary { name, real } in libs {
        let data = std::fs::read(&real).map_err(|e| Error::io(&real, e))?;
        let dest = if name.starts_with("ld-linux") {
            format!("lib64/{name}")
        } else {
            format!("lib/x86_64-linux-gnu/{name}")
        };
        a.file(&dest, 0o755, &data);
    }
    for (image, host) in programs {
        let data = std::fs::read(host).map_err(|e| Error::io(host, e))?;
        a.file(image, 0o755, &data);
    }
    for (image, host) in files {
        let data = std::fs::read(host).map_err(|e| Error::io(host, e))?;
        a.file(image, 0o644, &data);
    }
    Ok(())
}

/// A library `ldd` listed: the name the dynamic loader looks up, and the file it resolves to.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct SharedLibrary {
    name: String,
    real: std::path::PathBuf,
}

/// The shared libraries `ldd` lists for `program`, found in `lib_dirs` first. Nothing is
/// copied: concurrent lab runs must never see a half-written library.
fn shared_libraries(program: &Path, lib_dirs: &[std::path::PathBuf]) -> Result<Vec<SharedLibrary>> {
    let mut ldd = Command::new("ldd");
    if !lib_dirs.is_empty() {
        let path = std::env::join_paths(lib_dirs).map_err(|e| Error::Tool {
            what: format!("ldd {}", program.display()),
            detail: e.to_string(),
        })?;
        ldd.env("LD_LIBRARY_PATH", path);
    }
    let out = ldd
        .arg(program)
        .output()
        .map_err(|e| Error::io(program, e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        if line.contains("not found") {
            return Err(Error::Tool {
                what: format!("ldd {}", program.display()),
                detail: format!("missing library: {}", line.trim()),
            });
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            // Keep the name the loader looks up (the symlink's); read the real file's bytes.
            let real = std::fs::canonicalize(p).map_err(|e| Error::io(Path::new(p), e))?;
            let name = Path::new(p)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            libs.push(SharedLibrary { name, real });
        }
    }
    Ok(libs)
}
