//! The lab: real Linux guests on a real KVM, on any Linux machine.
//!
//! It builds, from Debian packages only, an L1 image (Debian's cloud kernel with KVM modules,
//! busybox, the `viridian` binary and its libraries) and an L2 guest (a Debian kernel and a
//! busybox initramfs whose `/init` runs a scenario and prints `VIRIDIAN-GUEST key=value` lines).
//! L1 runs under `qemu-system-x86_64 -accel tcg -cpu max,la57=off`, which emulates AMD SVM with nested
//! paging, so L1's `kvm-amd` gives Viridian a real `/dev/kvm`. See shared/docs/lab.md.

#![forbid(unsafe_code)]

pub mod cpio;
mod debian;
pub mod disk_bench;
pub mod image;
pub mod kernel;
pub mod netbench;
pub mod network;
pub mod profile;
pub mod system_disk;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

pub use kernel::{Flavor, Kernel};
pub use system_disk::SystemDisk;

/// How long L1 may print nothing before it counts as hung. Longer than a scenario's default
/// timeout inside L1 (300 s), after which L1's script always prints its verdict; scenarios
/// with longer timeouts print as they go (a booting system).
const L1_SILENCE: Duration = Duration::from_secs(330);

/// How long a CPU of L1 may be stuck in its kernel (its watchdog's "soft lockup" report)
/// before L1 counts as wedged and is replaced: seen 2026-12-04, both of L1's CPUs stuck on
/// an L2 guest's vCPU threads (the emulated VMRUN never came back) for minutes.
const L1_LOCKUP_SECONDS: u32 = 50;

/// The seconds in a Linux watchdog's "BUG: soft lockup - CPU#N stuck for Ss!" line.
fn soft_lockup_seconds(line: &str) -> Option<u32> {
    let rest = line.split_once("BUG: soft lockup - CPU#")?.1;
    let secs = rest.split_once(" stuck for ")?.1.split_once("s!")?.0;
    secs.parse().ok()
}

/// L1's emulated CPU, unless `$VIRIDIAN_LAB_CPU` names another (QEMU's `-cpu` syntax): an AMD
/// CPU with SVM and nested paging, without 5-level paging: with it, L1's KVM builds 5-level
/// nested page tables for L2, which QEMU's TCG walks for every L2 access, and two L1 boots in a
/// row hung as their first network guests started (docs/lab.md).
const L1_CPU: &str = "max,la57=off";

/// L1's accelerator (`VIRIDIAN_LAB_ACCEL` overrides it).
const L1_ACCEL: &str = "tcg,thread=multi";

/// A scenario's time limit inside L1 unless it sets its own.
const SCENARIO_TIMEOUT: u32 = 300;

/// What the system scenario types at the root shell: wait for systemd to finish starting,
/// report its state, the failed units, the OS and the root device, then power off. The
/// marker is put together by the guest's shell, so the echo of this line carries none.
const LOGIN_COMMANDS: &str = "m=VIRIDIAN-GUEST; echo \"$m system_state=$(systemctl is-system-running --wait)\"; systemctl --failed --no-legend; cat /etc/os-release; . /etc/os-release; echo \"$m os=$ID-$VERSION_ID user=$(id -un) root=$(findmnt -no SOURCE /)\"; poweroff";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Tool { what: String, detail: String },
}

impl Error {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where downloaded packages and built images live, outside any checkout.
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// `$VIRIDIAN_CACHE`, else `/var/cache/viridian` for root, else `~/.cache/viridian`.
    pub fn default_location() -> Result<Self> {
        let dir = if let Some(d) = std::env::var_os("VIRIDIAN_CACHE") {
            PathBuf::from(d)
        } else if is_root() {
            PathBuf::from("/var/cache/viridian")
        } else {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
            PathBuf::from(home).join(".cache/viridian")
        };
        Self::at(dir)
    }

    pub fn at(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(dir.join("images")).map_err(|e| Error::io(&dir, e))?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Holds the cache's lock until the returned file is dropped. Taken while packages are
    /// downloaded and unpacked, so concurrent lab runs never unpack the same package at once.
    fn lock(&self) -> Result<std::fs::File> {
        lock_file(&self.dir.join(".lock"))
    }
}

/// Opens `path` and holds an exclusive lock on it until the returned file is dropped.
fn lock_file(path: &Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.lock().map_err(|e| Error::io(path, e))?;
    Ok(file)
}

/// Creates `path` through a temporary file next to it, filled by `fill`, and a rename, so that
/// nobody (another lab run sharing the cache) ever sees it partly written.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    let tmp = path.with_file_name(name);
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| fill(&mut f))
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::io(path, e))
}

/// Copies `from` to `to` so that `to` is never partial.
fn copy_atomically(from: &Path, to: &Path) -> Result<()> {
    let mut src = std::fs::File::open(from).map_err(|e| Error::io(from, e))?;
    write_atomically(to, |f| std::io::copy(&mut src, f).map(|_| ()))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether this host's `/dev/kvm` can boot a full Linux kernel; if not, why.
pub fn host_kvm_can_run_linux() -> std::result::Result<(), String> {
    if std::env::var_os("VIRIDIAN_DEMO_IN_LAB").is_some() {
        return Err("VIRIDIAN_DEMO_IN_LAB is set".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Err("this host has no /dev/kvm".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(
            "this host's KVM is the paravirtual nested kvm_pvm, which cannot boot a full Linux kernel"
                .into(),
        );
    }
    Ok(())
}

fn busybox(cache: &Cache) -> Result<PathBuf> {
    Ok(debian::unpack(cache, "busybox-static")?.join("bin/busybox"))
}

/// The demo guest: the Debian system disk (see [`SystemDisk`]), built on first use.
pub struct DemoGuest {
    pub disk: SystemDisk,
    pub cmdline: String,
}

impl DemoGuest {
    /// `viridian` converts the disk image when it is built.
    pub fn prepare(cache: &Cache, viridian: &Path) -> Result<Self> {
        Ok(Self {
            disk: SystemDisk::prepare(cache, viridian, &mut std::io::stderr())?,
            cmdline: system_disk::CMDLINE.into(),
        })
    }

    /// A new differencing VHDX in `dir` on the cached system disk, for one demo run: the
    /// guest writes there, never into the cache. The caller deletes it afterwards.
    pub fn scratch_disk(&self, viridian: &Path, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(format!("viridian-demo-{}.vhdx", std::process::id()));
        let _ = std::fs::remove_file(&path);
        debian::run(
            Command::new(viridian)
                .args(["vhd", "new"])
                .arg(&path)
                .arg("--parent")
                .arg(&self.disk.vhdx),
            "viridian vhd new --parent",
        )?;
        Ok(path)
    }
}

/// Which VMM runs the L2 guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Viridian,
    /// QEMU with `-enable-kvm -M pc`.
    QemuPc,
    /// QEMU with `-enable-kvm -M microvm`.
    QemuMicrovm,
}

/// One L2 boot inside the lab.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub vmm: Vmm,
    pub kernel: Flavor,
    pub cpus: u32,
    pub memory_mib: u64,
    /// What the guest's `/init` does (`viridian.scenario=`): `report`, `boot` (power off at once), `hyperv`, ...
    pub guest: String,
    /// Whether to pass `quiet` to the guest kernel.
    pub quiet: bool,
    /// Run the VM in the background and stop it with `viridian vm stop` once the guest prints
    /// `VIRIDIAN-GUEST ready` (Viridian only).
    pub stop_with_control: bool,
    /// Before stopping it (with `stop_with_control`), push `LabKey=LabValue` with
    /// `viridian vm kvp --set`, wait until the guest reports it in its pool file and the host
    /// sees the guest's OS name, and print `viridian vm kvp --json` as a `LAB-KVP` line.
    pub kvp: bool,
    /// Give the VM a new dynamic VHDX of this many MiB (`viridian vhd new` inside L1) with
    /// `--disk`; after the VM exits, print the MD5 of its first 4 MiB as `VIRIDIAN-GUEST
    /// host_md5=` (converted to raw by `viridian vhd convert`) and `viridian vhd test`'s verdict.
    pub disk_mib: Option<u64>,
    /// Boot the Debian system disk ([`SystemDisk`]) instead of the scenario initramfs: wait
    /// for the `login:` prompt on the serial console (`VIRIDIAN-GUEST login_seconds=`), stop
    /// the VM with `viridian vm stop` (`exit_seconds=`), then, with `check_disk`, print
    /// `viridian vhd test`'s verdict on the VHDX (`host_vhd_test=ok`, `checked_seconds=`).
    pub system_disk: bool,
    /// With `system_disk`: log in as root through `viridian run`'s standard input (a pipe)
    /// instead of stopping the VM at the prompt, and type [`LOGIN_COMMANDS`], which power the
    /// guest off (`VIRIDIAN-GUEST shell_seconds=`, `system_state=`, `os=`, `off_seconds=`).
    pub login: bool,
    /// With `system_disk`: run `viridian vhd test` on the VHDX after the VM exits.
    pub check_disk: bool,
    /// The scenario's time limit inside L1, in seconds.
    pub timeout_seconds: u32,
    /// Run the VM under `viridiand` inside L1 instead of `viridian run`: define it with
    /// `viridian vm new`, start it, wait for `VIRIDIAN-GUEST ready` in its console log, then
    /// print its heartbeat (`svc_heartbeat=`) and whether `viridian vm console` replays the
    /// guest's `ready` line (`svc_console=1`), stop it with `viridian vm stop`, print the
    /// states the service went through (`svc_states=`, from its log), and finally the guest's
    /// console.
    pub service: bool,
    /// The whole L1 side instead of one `viridian run` (scenarios with several guests, see
    /// [`network`]).
    pub script: Option<String>,
    /// How often L1 may run the scenario: after a run in which an L2 guest triple-faulted, or
    /// failed without any guest printing a report, L1 prints `LAB-REDO` and runs it again, up
    /// to this many runs in all (the emulated machine's faults, see [`LabRun::emulation_fault`];
    /// a fresh L1 costs every scenario again). Only for scenarios that start from nothing each
    /// time (the network ones make their own switches and guests).
    pub tries: u32,
}

impl Scenario {
    pub fn new(name: &str, vmm: Vmm, kernel: Flavor, cpus: u32, guest: &str) -> Self {
        Self {
            name: name.into(),
            vmm,
            kernel,
            cpus,
            memory_mib: 512,
            guest: guest.into(),
            quiet: true,
            stop_with_control: false,
            kvp: false,
            disk_mib: None,
            system_disk: false,
            login: false,
            check_disk: false,
            timeout_seconds: SCENARIO_TIMEOUT,
            service: false,
            script: None,
            tries: 1,
        }
    }

    /// The runs L1 may make of it: [`Self::tries`], at least one.
    fn runs(&self) -> u32 {
        self.tries.max(1)
    }

    /// Boots the Debian system disk to its login prompt (see [`Scenario::system_disk`]).
    /// Systemd under nested emulation on a busy host takes minutes; it prints as it goes.
    pub fn system(name: &str, cpus: u32, memory_mib: u64) -> Self {
        Self {
            memory_mib,
            quiet: false,
            system_disk: true,
            check_disk: true,
            timeout_seconds: 600,
            ..Self::new(name, Vmm::Viridian, Flavor::Cloud, cpus, "system")
        }
    }

    /// The `viridian run --demo` guest in the lab: the system disk, logged in by the lab (L1's
    /// console takes no keyboard input), which runs [`LOGIN_COMMANDS`] and powers off. The
    /// disk is a throwaway snapshot, so it is not checked afterwards.
    pub fn demo(cpus: u32, memory_mib: u64) -> Self {
        Self {
            login: true,
            check_disk: false,
            ..Self::system("demo", cpus, memory_mib)
        }
    }

    /// The system disk's steps (see [`Scenario::system_disk`] and [`Scenario::login`]).
    /// `el` prints the seconds since the scenario started; `await TEXT SECS` waits until the
    /// serial log holds TEXT, the VM exits, or SECS pass.
    fn system_command(&self) -> String {
        let prelude = format!(
            "n={name}; log=/tmp/$n.log; rm -f $log /tmp/$n.in; s0=$(cut -d' ' -f1 /proc/uptime); \
             el() {{ awk -v s=$s0 '{{printf \"%.1f\", $1 - s}}' /proc/uptime; }}; \
             await() {{ i=0; until grep -q \"$1\" $log 2>/dev/null || ! kill -0 $p 2>/dev/null || [ $i -ge $2 ]; do sleep 1; i=$((i+1)); done; grep -q \"$1\" $log 2>/dev/null; }}; ",
            name = self.name,
        );
        let start = format!(
            "viridian run --name $n --serial $log --kernel /l2/vmlinuz-{flavor} --initrd /l2/system-initrd.cpio --cpus {cpus} --memory {mem}M --disk /disk/{file} --cmdline '{cmdline}{quiet}'",
            flavor = self.kernel.name(),
            cpus = self.cpus,
            mem = self.memory_mib,
            file = system_disk::CARRIER_FILE,
            cmdline = system_disk::CMDLINE,
            quiet = if self.quiet { " quiet" } else { "" },
        );
        let prompt = "await 'login: ' 400 && echo && echo VIRIDIAN-GUEST login_seconds=$(el)";
        let session = if self.login {
            format!(
                "{prelude}mkfifo /tmp/$n.in; trap '' PIPE; {start} < /tmp/$n.in & p=$!; exec 3>/tmp/$n.in; \
                 {prompt} && printf 'root\\r' >&3 && await '@{host}:~# ' 120 && echo && echo VIRIDIAN-GUEST shell_seconds=$(el) && printf '%s\\r' '{LOGIN_COMMANDS}' >&3; \
                 i=0; while kill -0 $p 2>/dev/null && [ $i -lt 300 ]; do sleep 1; i=$((i+1)); done; \
                 kill -0 $p 2>/dev/null || echo VIRIDIAN-GUEST off_seconds=$(el); "
                , host = system_disk::HOSTNAME
            )
        } else {
            format!("{prelude}{start} & p=$!; {prompt}; ")
        };
        let check = if self.check_disk {
            format!(
                "viridian vhd test /disk/{} >/dev/null && echo VIRIDIAN-GUEST host_vhd_test=ok; echo VIRIDIAN-GUEST checked_seconds=$(el); ",
                system_disk::CARRIER_FILE
            )
        } else {
            String::new()
        };
        format!(
            "{session}\
             kill -0 $p 2>/dev/null && {{ viridian vm stop $n --timeout 120 || viridian vm stop $n --force; }}; wait $p; rc=$?; exec 3>&-; rm -f /tmp/$n.in; \
             echo VIRIDIAN-GUEST exit_seconds=$(el); {check}exit $rc"
        )
    }

    /// The service scenario's Save-VM and Start-VM of the Saved VM (see [`Scenario::service`]),
    /// with `$S` its directory, `$c` the console log and `field` a field of `vm get --json`:
    /// `vm save` (`svc_save_seconds=`, `svc_saved_state=`, the file's `svc_saved_bytes=`, the
    /// guest's last tick before it as `svc_tick_saved=N,UPTIME`), then `vm start`, which
    /// restores it (`svc_restore_seconds=` until it returns, `svc_resumed_seconds=` until the
    /// guest's next tick, `svc_tick_restored=`, `svc_new_boot=` the count of `init_uptime=`
    /// lines after it, `svc_saved_kept=`, `svc_heartbeat_restored=`, and `svc_console_restored=`
    /// whether `vm console` still replays the `ready` line from before the save). The console log before
    /// the save stays as `$S/before.log`; the restored worker appends to the console log, so
    /// what follows the save is `$S/after.log` and `svc_log_kept=1` says the earlier output is
    /// still at the front. The worker's own lines about it are `LAB-WORKER`.
    fn save_steps(name: &str) -> String {
        format!(
            "up() {{ cut -d' ' -f1 /proc/uptime; }}; \
             since() {{ awk -v a=$1 -v b=$(up) 'BEGIN {{printf \"%.1f\", b - a}}'; }}; \
             tick() {{ grep -o 'tick=[0-9]* uptime=[0-9.]*' $1 | sed -n \"$2\" | sed 's/tick=//; s/ uptime=/,/'; }}; \
             i=0; until grep -q 'tick=' $c || [ $i -ge 30 ]; do sleep 1; i=$((i+1)); done; \
             t=$(up); viridian vm save {name} >$S/save.out 2>&1 || echo \"LAB-ERROR vm save: $(tr '\\n' ' ' < $S/save.out)\"; \
             echo VIRIDIAN-GUEST svc_save_seconds=$(since $t) svc_saved_state=$(field state); \
             f=$(ls -d $S/state/vms/*)/vm.saved; \
             echo VIRIDIAN-GUEST svc_saved_bytes=$(ls -l $f | awk '{{print $5}}') svc_tick_saved=$(tick $c '$p'); \
             cp $c $S/before.log; n=$(stat -c %s $c); new() {{ tail -c +$((n+1)) $c > $S/after.log; }}; \
             t=$(up); viridian vm start {name} >$S/start.out 2>&1 || echo \"LAB-ERROR vm start after save: $(tr '\\n' ' ' < $S/start.out)\"; \
             echo VIRIDIAN-GUEST svc_restore_seconds=$(since $t) svc_saved_kept=$(ls $f 2>/dev/null | wc -l); \
             i=0; until new; grep -q 'tick=' $S/after.log || [ $i -ge 60 ]; do sleep 1; i=$((i+1)); done; \
             echo VIRIDIAN-GUEST svc_resumed_seconds=$(since $t) svc_tick_restored=$(tick $S/after.log 1p) svc_new_boot=$(grep -c init_uptime= $S/after.log) svc_log_kept=$(head -c $n $c | cmp -s - $S/before.log && echo 1); \
             i=0; until [ \"$(field heartbeat)\" = OK ] || [ $i -ge 60 ]; do sleep 1; i=$((i+1)); done; \
             echo VIRIDIAN-GUEST svc_heartbeat_restored=$(field heartbeat); \
             timeout 5 viridian vm console {name} --read-only </dev/null >$S/view2 2>&1; \
             echo VIRIDIAN-GUEST svc_console_restored=$(grep -c 'VIRIDIAN-GUEST ready' $S/view2); \
             grep -E 'saved to|restored from' $(ls -d $S/state/vms/*)/worker.log | sed 's/^/LAB-WORKER /'; "
        )
    }

    /// The host side of the KVP checks (see [`Scenario::kvp`]).
    fn kvp_steps(name: &str) -> String {
        format!(
            "viridian vm kvp {name} --set LabKey=LabValue; \
             i=0; until grep -q 'kvp_pool0=' /tmp/{name}.log || [ $i -ge 120 ]; do sleep 1; i=$((i+1)); done; \
             i=0; until viridian vm kvp {name} --json | grep -q OSName || [ $i -ge 60 ]; do sleep 1; i=$((i+1)); done; \
             echo LAB-KVP $(viridian vm kvp {name} --json); viridian vm kvp {name}; "
        )
    }

    /// The host side of the `formats` scenario: a dynamic VHDX (64 MiB), a differencing VHDX
    /// (32 MiB, on controller 1) on a parent qemu-img made, a fixed VHD (16 MiB), a raw image
    /// (8 MiB), a read-only raw image (4 MiB) and a DVD with `/l2/one.iso`. While the guest
    /// runs: the VHDX's allocated size after the guest's writes, `vm dvd --eject`, the
    /// allocated size after the guest's discard, `vm dvd --path /l2/two.iso`, and the drive
    /// as `vm dvd` lists it once the guest has ejected that disc itself. After it:
    /// `qemu-img check` and `viridian vhd test` of the images, and the MD5 of the 1 MiB the
    /// guest wrote at 1 MiB on each, read on the host. Then a second, short boot (guest
    /// scenario `ids`) with the VHDX and the VHD moved to new names and the raw image where it
    /// was, in another order: the identifiers the guest reports (`id_SECTORS=`) must be the
    /// first boot's. The images live on a tmpfs of their own, which frees the blocks a discard
    /// punches out of a file.
    fn formats_command(
        name: &str,
        kernel: &str,
        cpus: u32,
        memory_mib: u64,
        cmdline: &str,
    ) -> String {
        let say = "echo VIRIDIAN-GUEST";
        let wait = |marker: &str| {
            format!("i=0; until grep -q {marker} /tmp/{name}.log 2>/dev/null || ! kill -0 $p 2>/dev/null || [ $i -ge 240 ]; do sleep 1; i=$((i+1)); done; ")
        };
        let region_md5 = |file: &str, key: &str| {
            format!("viridian vhd convert $D/{file} $D/{file}.raw >/dev/null 2>&1; {say} host_md5_{key}=$(dd if=$D/{file}.raw bs=65536 skip=16 count=16 2>/dev/null | md5sum | cut -c1-32); rm -f $D/{file}.raw; ")
        };
        format!(
            "D=/tmp/{name}; rm -rf $D /tmp/{name}.log; mkdir -p $D; mount -t tmpfs -o size=512m tmpfs $D; \
             viridian vhd new $D/dyn.vhdx --size 64M >/dev/null || echo LAB-ERROR vhd new failed; \
             viridian vhd new $D/fixed.vhd --size 16M --fixed >/dev/null; \
             viridian vhd new $D/plain.img --size 8M >/dev/null; \
             viridian vhd new $D/ro.img --size 4M >/dev/null; \
             qemu-img create -q -f vhdx $D/parent.vhdx 32M || echo LAB-ERROR qemu-img create failed; \
             viridian vhd new $D/child.vhdx --parent $D/parent.vhdx >/dev/null; \
             {say} host_dyn_id=$(viridian vhd get $D/dyn.vhdx | awk '/^DiskIdentifier/ {{print $3}}' | tr -d -); \
             {say} host_fixed_id=$(viridian vhd get $D/fixed.vhd | awk '/^DiskIdentifier/ {{print $3}}' | tr -d -); \
             {say} host_iso_md5=$(md5sum < /l2/one.bin | cut -c1-32) host_iso2_md5=$(md5sum < /l2/two.bin | cut -c1-32); \
             viridian run --name {name} --serial /tmp/{name}.log --kernel {kernel} --initrd /l2/initrd.cpio --cpus {cpus} --memory {memory_mib}M \
               --disk $D/dyn.vhdx --disk $D/fixed.vhd --disk $D/plain.img --disk $D/ro.img,readonly --disk $D/child.vhdx,controller=1 --dvd /l2/one.iso \
               --cmdline '{cmdline}' & p=$!; \
             {w1}\
             {say} host_kb_written=$(du -k $D/dyn.vhdx | cut -f1); \
             viridian vm dvd {name} --eject; \
             {w2}\
             {say} host_kb_discarded=$(du -k $D/dyn.vhdx | cut -f1); \
             viridian vm dvd {name} --path /l2/two.iso; \
             {say} host_dvd_path=$(viridian vm dvd {name} | tail -n 1 | awk '{{print $NF}}'); \
             {w3}\
             {say} host_dvd_after_guest_eject=$(viridian vm dvd {name} | tail -n 1 | awk '{{print $NF}}'); \
             wait $p; rc=$?; \
             for f in dyn.vhdx parent.vhdx; do qemu-img check -q -f vhdx $D/$f && {say} host_qemu_check_${{f%.vhdx}}=ok; done; \
             for f in dyn.vhdx fixed.vhd plain.img child.vhdx; do viridian vhd test $D/$f >/dev/null && {say} host_vhd_test_${{f%.*}}=ok; done; \
             {m1}{m2}{m3}{m4}\
             mkdir $D/moved; mv $D/dyn.vhdx $D/moved/renamed.vhdx; mv $D/fixed.vhd $D/moved/renamed.vhd; \
             viridian run --kernel {kernel} --initrd /l2/initrd.cpio --cpus 1 --memory {memory_mib}M \
               --disk $D/plain.img --disk $D/moved/renamed.vhdx --disk $D/moved/renamed.vhd --cmdline '{ids_cmdline}' || echo LAB-ERROR the second boot failed; \
             umount $D; rm -rf $D; exit $rc",
            ids_cmdline = cmdline.replace("viridian.scenario=formats", "viridian.scenario=ids viridian.disks=3"),
            w1 = wait("formats_written"),
            w2 = wait("formats_discarded"),
            w3 = wait("formats_guest_ejected"),
            m1 = region_md5("dyn.vhdx", "131072"),
            m2 = region_md5("child.vhdx", "65536"),
            m3 = region_md5("fixed.vhd", "32768"),
            m4 = region_md5("plain.img", "16384"),
        )
    }

    fn command(&self) -> String {
        if let Some(script) = &self.script {
            return script.clone();
        }
        let kernel = format!("/l2/vmlinuz-{}", self.kernel.name());
        let cmdline = format!(
            "console=ttyS0 panic=-1 {}viridian.scenario={}",
            if self.quiet { "quiet " } else { "" },
            self.guest
        );
        match self.vmm {
            Vmm::Viridian if self.system_disk => self.system_command(),
            Vmm::Viridian if self.service => format!(
                "S=/tmp/svc-{name}; rm -rf $S; mkdir -p $S; \
                 grep -q cgroup2 /proc/mounts || mount -t cgroup2 none /sys/fs/cgroup; \
                 viridiand --state-dir $S/state --socket $S/d.sock >$S/d.log 2>&1 & d=$!; \
                 i=0; until [ -S $S/d.sock ] || [ $i -ge 100 ]; do sleep 0.2; i=$((i+1)); done; \
                 export VIRIDIAN_SOCKET=$S/d.sock; \
                 field() {{ viridian vm get {name} --json | sed -n \"s/^  \\\"$1\\\": \\\"\\(.*\\)\\\",*$/\\1/p\"; }}; \
                 viridian vm new {name} --cpus {} --memory {}M --kernel {kernel} --initrd /l2/initrd.cpio --cmdline '{cmdline}' >/dev/null; \
                 viridian vm start {name}; \
                 c=$(ls -d $S/state/vms/*)/console.log; \
                 i=0; until grep -q 'VIRIDIAN-GUEST ready' $c 2>/dev/null || [ $i -ge 600 ]; do sleep 1; i=$((i+1)); done; \
                 i=0; until [ \"$(field heartbeat)\" = OK ] || [ $i -ge 30 ]; do sleep 1; i=$((i+1)); done; \
                 echo VIRIDIAN-GUEST svc_heartbeat=$(field heartbeat); \
                 p=$(viridian vm get {name} --json | sed -n \"s/^  \\\"pid\\\": \\([0-9]*\\).*/\\1/p\"); \
                 g=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/$p/cgroup); \
                 echo VIRIDIAN-GUEST svc_cgroup=${{g#/sys/fs/cgroup}}; \
                 cg() {{ for f in \"$@\"; do printf '%s,' \"$(tr ' ' _ < $g/$f)\"; done; }}; \
                 echo VIRIDIAN-GUEST svc_cg=$(cg cpu.max cpu.weight memory.max); \
                 viridian vm set {name} --cpu-limit 50 --cpu-weight 200 >/dev/null; \
                 echo VIRIDIAN-GUEST svc_cg_set=$(cg cpu.max cpu.weight); \
                 timeout 5 viridian vm console {name} --read-only </dev/null >$S/view 2>&1; \
                 echo VIRIDIAN-GUEST svc_console=$(grep -c 'VIRIDIAN-GUEST ready' $S/view); \
                 {save}\
                 viridian vm stop {name} >/dev/null; \
                 [ -d $g ] || echo VIRIDIAN-GUEST svc_cg_removed=1; \
                 echo VIRIDIAN-GUEST svc_states=$(sed -n \"s/.*VM '{name}' is \\([A-Z][A-Za-z]*\\):.*/\\1/p\" $S/d.log | tr '\\n' ','); \
                 echo VIRIDIAN-GUEST svc_status=$(field status | tr ' ' '_'); \
                 cat $c; kill $d; wait $d; exit 0",
                self.cpus, self.memory_mib, name = self.name, save = Self::save_steps(&self.name)
            ),
            Vmm::Viridian if self.stop_with_control => format!(
                "rm -f /tmp/{name}.log; \
                 viridian run --name {name} --serial /tmp/{name}.log --kernel {kernel} --initrd /l2/initrd.cpio --cpus {} --memory {}M --cmdline '{cmdline}' & p=$!; \
                 i=0; until grep -q 'VIRIDIAN-GUEST ready' /tmp/{name}.log 2>/dev/null || ! kill -0 $p 2>/dev/null || [ $i -ge 600 ]; do sleep 1; i=$((i+1)); done; \
                 echo VIRIDIAN-GUEST host_status=$(viridian vm status {name} | tr ' ' ','); \
                 {kvp}\
                 viridian vm stop {name} --timeout 300 || viridian vm stop {name} --force; wait $p",
                self.cpus, self.memory_mib, name = self.name, kvp = if self.kvp { Self::kvp_steps(&self.name) } else { String::new() }
            ),
            Vmm::Viridian if self.guest == "hotplug" => format!(
                "rm -f /tmp/{name}-a.vhdx /tmp/{name}-b.vhdx /tmp/{name}.log; \
                 viridian vhd new /tmp/{name}-a.vhdx --size 16M >/dev/null; viridian vhd new /tmp/{name}-b.vhdx --size 32M >/dev/null; \
                 viridian run --name {name} --serial /tmp/{name}.log --kernel {kernel} --initrd /l2/initrd.cpio --cpus {} --memory {}M --disk /tmp/{name}-a.vhdx --cmdline '{cmdline}' & p=$!; \
                 i=0; until grep -q hotplug_ready /tmp/{name}.log 2>/dev/null || ! kill -0 $p 2>/dev/null || [ $i -ge 120 ]; do sleep 1; i=$((i+1)); done; \
                 viridian vm disk add {name} /tmp/{name}-b.vhdx; \
                 i=0; until grep -q hotplug_added /tmp/{name}.log 2>/dev/null || ! kill -0 $p 2>/dev/null || [ $i -ge 120 ]; do sleep 1; i=$((i+1)); done; \
                 viridian vm disk remove {name} --location 1; \
                 wait $p; rc=$?; rm -f /tmp/{name}-a.vhdx /tmp/{name}-b.vhdx; exit $rc",
                self.cpus, self.memory_mib, name = self.name
            ),
            Vmm::Viridian if self.guest == "formats" => Self::formats_command(&self.name, &kernel, self.cpus, self.memory_mib, &cmdline),
            Vmm::Viridian if self.disk_mib.is_some() => format!(
                "rm -f /tmp/{name}.vhdx /tmp/{name}.img; viridian vhd new /tmp/{name}.vhdx --size {mib}M >/dev/null || echo LAB-ERROR vhd new failed; \
                 viridian run --kernel {kernel} --initrd /l2/initrd.cpio --cpus {} --memory {}M --disk /tmp/{name}.vhdx --cmdline '{cmdline}'; rc=$?; \
                 viridian vhd test /tmp/{name}.vhdx >/dev/null && echo VIRIDIAN-GUEST host_vhd_test=ok; \
                 viridian vhd convert /tmp/{name}.vhdx /tmp/{name}.img >/dev/null 2>&1; \
                 echo VIRIDIAN-GUEST host_md5=$(dd if=/tmp/{name}.img bs=65536 count=64 2>/dev/null | md5sum | cut -c1-32); \
                 rm -f /tmp/{name}.vhdx /tmp/{name}.img; exit $rc",
                self.cpus, self.memory_mib, name = self.name, mib = self.disk_mib.unwrap_or(64)
            ),
            // `exec`, so that the scenario timeout's SIGTERM reaches viridian, which then stops
            // the VM and reports where each vCPU was.
            Vmm::Viridian => format!(
                "{}exec viridian run --kernel {kernel} --initrd /l2/initrd.cpio --cpus {} --memory {}M --cmdline '{cmdline}'",
                if self.quiet { "" } else { "VIRIDIAN_LOG=info,vmm=debug " },
                self.cpus, self.memory_mib
            ),
            Vmm::QemuPc | Vmm::QemuMicrovm => format!(
                "qemu-system-x86_64 -L /usr/share/qemu -enable-kvm -cpu host -M {} -m {} -smp {} -nodefaults -no-user-config -display none -serial stdio -no-reboot -kernel {kernel} -initrd /l2/initrd.cpio -append '{cmdline}'",
                if self.vmm == Vmm::QemuPc { "pc" } else { "microvm" },
                self.memory_mib,
                self.cpus
            ),
        }
    }
}

/// What one scenario did.
#[derive(Debug, Clone, Default)]
pub struct ScenarioResult {
    pub name: String,
    /// The VMM's exit status inside L1 (124 = timed out).
    pub exit_code: i32,
    /// `VIRIDIAN-GUEST key=value` lines the guest printed.
    pub guest: BTreeMap<String, String>,
    /// L1 wall-clock seconds from starting the VMM to its exit.
    pub seconds: f64,
    /// Everything printed while it ran.
    pub console: String,
    /// L1's wall clock (seconds since the epoch, from the host's RTC) when it ended.
    pub clock: Option<u64>,
}

/// What starts a `key=value` report line, from the guest or the L1 side of a scenario.
const GUEST_MARKER: &str = "VIRIDIAN-GUEST ";

/// What `viridian run` prints when a vCPU triple-faults.
pub(crate) const TRIPLE_FAULT: &str = "triple-faulted; the guest is dead";

/// How many fresh L1 machines a run may start after an emulation fault
/// ([`LabRun::emulation_fault`]): on 2026-12-03, a loaded day, 3 of 4 L1 boots saw the
/// 2-vCPU network guest triple-fault; on 2026-12-04, on an idle host, 3 of 6 L1 boots that
/// ran `net-private` triple-faulted themselves (QEMU said so) a minute into it, and one
/// more in the system-disk test.
/// An L2 fault alone is mostly dealt with inside L1 ([`Scenario::tries`]).
pub const L1_RETRIES: u32 = 3;

/// The outcome of one lab boot.
#[derive(Debug, Default)]
pub struct LabRun {
    pub scenarios: Vec<ScenarioResult>,
    /// `LAB-ERROR` lines from L1.
    pub errors: Vec<String>,
    /// Whether L1 got through its whole script.
    pub completed: bool,
    /// How often the L1 machine itself failed and the script was started again.
    pub l1_retries: u32,
    /// Why the first lab VM was given up (see [`LabRun::emulation_fault`]).
    pub retried_because: Option<String>,
    /// L1's uptime when its `/init` started.
    pub l1_init_uptime: Option<f64>,
    /// Scenarios L1 ran again after an emulation fault (`LAB-REDO`, see [`Scenario::tries`]),
    /// as `name: why`; only the last run of each is in [`Self::scenarios`].
    pub redone: Vec<String>,
}

impl LabRun {
    pub fn scenario(&self, name: &str) -> Option<&ScenarioResult> {
        self.scenarios.iter().find(|s| s.name == name)
    }

    /// A failure of the emulated machine rather than of a scenario, worth one fresh lab VM:
    /// L1 did not finish its script (its kernel crashed or hung), an L2 guest triple-faulted,
    /// or an L2 guest hung before its `/init` printed anything. Both have been seen only with a 2-vCPU guest under load on L1's
    /// emulated SVM (TCG), L1's kernel once crashing on a vCPU thread in the same scenario
    /// (docs/lab.md, "Known faults of the emulated lab machine"); no scenario expects a
    /// triple fault.
    pub fn emulation_fault(&self) -> Option<String> {
        if !self.completed {
            return Some(format!(
                "the lab VM failed before finishing its script ({:?})",
                self.errors
            ));
        }
        if let Some(s) = self
            .scenarios
            .iter()
            .find(|s| s.console.contains(TRIPLE_FAULT))
        {
            return Some(format!("an L2 guest of {} triple-faulted", s.name));
        }
        // A guest that never reached its /init (no VIRIDIAN-GUEST line at all) and was killed
        // at the time limit: a boot hang, seen with 2-vCPU guests on the emulated SVM.
        self.scenarios
            .iter()
            .find(|s| s.exit_code != 0 && s.guest.is_empty())
            .map(|s| {
                format!(
                    "an L2 guest of {} printed nothing before its time ran out (exit {})",
                    s.name, s.exit_code
                )
            })
    }
}

/// The lab's ingredients, fetched and cached.
pub struct Lab {
    cache: PathBuf,
    l1_kernel: Kernel,
    l2_kernels: Vec<Kernel>,
    busybox: PathBuf,
    /// Debian's hv_kvp_daemon (package hyperv-daemons), for the L2 guest.
    kvp_daemon: PathBuf,
    /// Debian's eject (package eject), for the L2 guest's own eject of its DVD.
    eject: PathBuf,
    /// dnsmasq and nft for the network scenarios' Default Switch (see [`network`]).
    net_tools: Vec<(String, PathBuf)>,
    /// iperf3 for the network benchmark, in L1 and L2 (see [`netbench`]).
    iperf3: netbench::Iperf3,
    viridian: PathBuf,
    qemu: PathBuf,
    /// QEMU's loadable modules (the TCG accelerator is one).
    qemu_modules: PathBuf,
    firmware: PathBuf,
}

/// L1 modules for the virtio drive that holds the system disk's carrier (ext4 too, where it is
/// not built in).
const L1_DISK_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];

const QEMU_FIRMWARE: &[&str] = &[
    "bios-256k.bin",
    "bios-microvm.bin",
    "linuxboot_dma.bin",
    "kvmvapic.bin",
];

impl Lab {
    /// Fetches everything (Debian packages into the cache) and checks the host tools.
    pub fn prepare(cache: &Cache, viridian: &Path) -> Result<Self> {
        let cloud = Kernel::fetch(cache, Flavor::Cloud)?;
        let amd64 = Kernel::fetch(cache, Flavor::Amd64)?;
        let l1_kernel = Kernel::fetch(cache, Flavor::Cloud)?;
        let busybox = busybox(cache)?;
        let kvp_daemon = debian::unpack(cache, "hyperv-daemons")?.join("usr/sbin/hv_kvp_daemon");
        let eject = debian::unpack(cache, "eject")?.join("usr/bin/eject");
        let qemu_root = debian::unpack(cache, "qemu-system-x86")?;
        let common = debian::unpack(cache, "qemu-system-common")?;
        let data = debian::unpack(cache, "qemu-system-data")?;
        let seabios = debian::unpack(cache, "seabios")?;
        let firmware = cache.dir().join("qemu-firmware");
        std::fs::create_dir_all(&firmware).map_err(|e| Error::io(&firmware, e))?;
        let dirs = [
            data.join("usr/share/qemu"),
            seabios.join("usr/share/seabios"),
            qemu_root.join("usr/share/qemu"),
        ];
        for name in QEMU_FIRMWARE {
            let resolved = find_firmware(&dirs, name).ok_or_else(|| Error::Tool {
                what: "finding QEMU firmware".into(),
                detail: format!("{name} is in none of {dirs:?}"),
            })?;
            copy_atomically(&resolved, &firmware.join(name))?;
        }
        Ok(Self {
            cache: cache.dir().to_path_buf(),
            l1_kernel,
            l2_kernels: vec![cloud, amd64],
            busybox,
            kvp_daemon,
            eject,
            net_tools: network::l1_tools(cache)?,
            iperf3: netbench::iperf3(cache)?,
            viridian: viridian.to_path_buf(),
            qemu: qemu_root.join("usr/bin/qemu-system-x86_64"),
            qemu_modules: common.join("usr/lib/x86_64-linux-gnu/qemu"),
            firmware,
        })
    }

    /// L1's `/init`. With `carrier`, it also mounts the system disk's carrier file system
    /// from the virtio drive on `/disk`.
    fn l1_init(
        &self,
        modules: &[(String, PathBuf)],
        scenarios: &[Scenario],
        carrier: bool,
    ) -> String {
        let mut s = String::from(
            r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "LAB-L1 init_uptime=$(cut -d' ' -f1 /proc/uptime) la57=$(grep -c ' la57' /proc/cpuinfo) thp=$(sed 's/.*\[\(.*\)\].*/\1/' /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
export PATH=/bin:/usr/bin
"#,
        );
        for (name, _) in modules {
            s.push_str(&format!(
                "insmod /modules/{name}.ko || echo \"LAB-ERROR insmod {name} failed\"\n"
            ));
        }
        if carrier {
            s.push_str(
                r#"i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
mkdir -p /disk && mount -t ext4 /dev/vda /disk || echo "LAB-ERROR cannot mount the system disk's carrier"
"#,
            );
        }
        s.push_str("[ -e /dev/kvm ] || echo \"LAB-ERROR L1 has no /dev/kvm\"\n");
        s.push_str(&l1_run_function());
        for sc in scenarios {
            s.push_str(&format!(
                "run {} {} {} \"{}\"\n",
                sc.name,
                sc.timeout_seconds,
                sc.runs(),
                shell_double_quote(&sc.command())
            ));
        }
        s.push_str("echo LAB-DONE\npoweroff -f\n");
        s
    }

    /// Boots L1 and runs `scenarios` in order, copying the console to `out`.
    ///
    /// Lab runs take turns (a lock in the cache): two emulated L1 machines on a small host starve
    /// each other. If the L1 machine itself dies or hangs before finishing its script (its own
    /// kernel crashed; seen under TCG's nested SVM with the host loaded), the script runs again
    /// in a fresh L1, at most [`L1_RETRIES`] times, and the run says so. A scenario that fails
    /// or times out is not retried.
    pub fn run(&self, scenarios: &[Scenario], out: &mut dyn Write) -> Result<LabRun> {
        let system = if scenarios.iter().any(|s| s.system_disk) {
            let cache = Cache::at(self.cache.clone())?;
            let disk = SystemDisk::prepare(&cache, &self.viridian, out)?;
            let carrier = disk.lab_carrier(out)?;
            Some((disk, carrier))
        } else {
            None
        };
        let system = system.as_ref().map(|(d, c)| (d, c.as_path()));
        let lock = PathBuf::from(&self.cache).join("lab.lock");
        let _turn = lock_file(&lock)?;
        let mut run = self.run_once(scenarios, system, out)?;
        let mut retries = 0;
        while retries < L1_RETRIES {
            let Some(why) = run.emulation_fault() else {
                break;
            };
            retries += 1;
            let _ = writeln!(
                out,
                "LAB-RETRY {why}; starting a fresh lab VM ({retries} of at most {L1_RETRIES})"
            );
            let redone = std::mem::take(&mut run.redone);
            run = self.run_once(scenarios, system, out)?;
            run.redone.splice(0..0, redone);
            run.l1_retries = retries;
            run.retried_because = Some(why);
        }
        Ok(run)
    }

    /// One L1 boot. `system` is the system disk and its carrier, when a scenario boots it.
    fn run_once(
        &self,
        scenarios: &[Scenario],
        system: Option<(&SystemDisk, &Path)>,
        out: &mut dyn Write,
    ) -> Result<LabRun> {
        let mut wanted = vec!["kvm_amd"];
        let net = scenarios.iter().any(|s| s.guest == network::GUEST);
        if net {
            wanted.extend(network::L1_MODULES);
        }
        if system.is_some() {
            wanted.extend(L1_DISK_MODULES);
        }
        let wanted: Vec<&str> = wanted
            .into_iter()
            .filter(|m| !self.l1_kernel.is_builtin(m))
            .collect();
        let modules = self.l1_kernel.modules_with_deps(&wanted)?;
        // Per-run image names: tests may run labs concurrently.
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let l2_initrd = PathBuf::from(&self.cache).join(format!("images/l2-initrd-{tag}.cpio"));
        let kernels: Vec<&Kernel> = self.l2_kernels.iter().collect();
        let mut l2_programs = vec![
            (
                "usr/sbin/hv_kvp_daemon".to_string(),
                self.kvp_daemon.clone(),
            ),
            ("usr/bin/eject".to_string(), self.eject.clone()),
        ];
        let iperf3 = scenarios.iter().any(netbench::uses_iperf3);
        let lib_dirs = if iperf3 {
            l2_programs.push(("usr/bin/iperf3".into(), self.iperf3.program.clone()));
            self.iperf3.lib_dirs.clone()
        } else {
            Vec::new()
        };
        image::l2_initramfs(
            &self.busybox,
            &kernels,
            &l2_programs,
            &lib_dirs,
            &[],
            &l2_initrd,
        )?;
        let fio = scenarios.iter().any(|s| s.guest == disk_bench::GUEST);
        let fio_initrd = if fio {
            let cache = Cache::at(self.cache.clone())?;
            let path = PathBuf::from(&self.cache).join(format!("images/l2-fio-{tag}.cpio"));
            let mut with_fio = l2_programs.clone();
            with_fio.push(("usr/bin/fio".into(), disk_bench::fio(&cache)?));
            image::l2_initramfs(
                &self.busybox,
                &kernels,
                &with_fio,
                &lib_dirs,
                disk_bench::L2_MODULES,
                &path,
            )?;
            Some(path)
        } else {
            None
        };
        let mut programs = vec![("bin/viridian".to_string(), self.viridian.clone())];
        if scenarios.iter().any(|s| s.service) {
            programs.push((
                "bin/viridiand".to_string(),
                self.viridian.with_file_name("viridiand"),
            ));
        }
        if net {
            programs.extend(self.net_tools.iter().cloned());
        }
        if iperf3 {
            programs.push(("bin/iperf3".into(), self.iperf3.program.clone()));
        }
        if scenarios
            .iter()
            .any(|s| profile::used_by(s.script.as_deref()))
        {
            programs.push(("bin/perf".into(), host_tool("perf", "linux-perf")?));
        }
        let contents_l2 = l2_initrd.clone();
        let mut files = vec![("l2/initrd.cpio".to_string(), l2_initrd)];
        for k in &self.l2_kernels {
            if scenarios.iter().any(|s| s.kernel == k.flavor) {
                files.push((format!("l2/vmlinuz-{}", k.flavor.name()), k.vmlinuz()));
            }
        }
        if let Some((disk, _)) = system {
            files.push(("l2/system-initrd.cpio".into(), disk.initrd.clone()));
        }
        if let Some(path) = &fio_initrd {
            files.push(("l2/fio-initrd.cpio".into(), path.clone()));
            let brd = self
                .l1_kernel
                .modules_with_deps(&[disk_bench::L1_RAM_DISK_MODULE])?;
            if let Some((_, path)) = brd.last() {
                files.push((disk_bench::L1_RAM_DISK_PATH.into(), path.clone()));
            }
        }
        if scenarios.iter().any(|s| s.vmm != Vmm::Viridian) {
            programs.push(("bin/qemu-system-x86_64".into(), self.qemu.clone()));
            for name in QEMU_FIRMWARE {
                files.push((format!("usr/share/qemu/{name}"), self.firmware.join(name)));
            }
        }
        let isos = if scenarios.iter().any(|s| s.guest == "formats") {
            programs.push(("bin/qemu-img".into(), host_tool("qemu-img", "qemu-utils")?));
            let dir = PathBuf::from(&self.cache).join(format!("images/iso-{tag}"));
            for (name, inner, seed) in [("one", "hello.bin", 1u8), ("two", "second.bin", 2)] {
                let (data, iso) = make_iso(&dir, name, inner, seed)?;
                files.push((format!("l2/{name}.bin"), data));
                files.push((format!("l2/{name}.iso"), iso));
            }
            Some(dir)
        } else {
            None
        };
        let contents = image::L1Contents {
            busybox: &self.busybox,
            init: self.l1_init(&modules, scenarios, system.is_some()),
            modules,
            programs,
            files,
            lib_dirs,
        };
        let l1_image = PathBuf::from(&self.cache).join(format!("images/l1-{tag}.cpio"));
        let qemu_log = PathBuf::from(&self.cache).join(format!("images/l1-{tag}.qemu.log"));
        image::l1_initramfs(&contents, &l1_image)?;

        let limits: u64 = scenarios
            .iter()
            .map(|s| (u64::from(s.timeout_seconds) + 20) * u64::from(s.runs()))
            .sum();
        let deadline = Instant::now() + Duration::from_secs(120 + limits);
        let mut qemu = Command::new(&self.qemu);
        qemu.env("QEMU_MODULE_DIR", &self.qemu_modules)
            .arg("-accel")
            .arg(std::env::var("VIRIDIAN_LAB_ACCEL").unwrap_or_else(|_| L1_ACCEL.into()))
            .arg("-cpu")
            .arg(std::env::var("VIRIDIAN_LAB_CPU").unwrap_or_else(|_| L1_CPU.into()))
            .args(["-m", "3072", "-smp", "2"])
            .args([
                "-nographic",
                "-vga",
                "none",
                "-no-reboot",
                "-nic",
                "none",
                "-L",
            ])
            .arg(&self.firmware)
            .arg("-kernel")
            .arg(self.l1_kernel.vmlinuz())
            .arg("-initrd")
            .arg(&l1_image)
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            // QEMU's own word on why L1 reset (it says "Triple fault" for one of L1's).
            .args(["-d", "cpu_reset", "-D"])
            .arg(&qemu_log)
            // More of QEMU's options for L1, for experiments (`-mem-prealloc`).
            .args(
                std::env::var("VIRIDIAN_LAB_QEMU_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            );
        if let Some((_, carrier)) = system {
            // snapshot=on: L1's writes go to a temporary overlay, never into the cache.
            qemu.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,snapshot=on,cache=unsafe",
                carrier.display()
            ));
        }
        let mut child = qemu
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::io(&self.qemu, e))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (lines, console) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut run = LabRun::default();
        let mut current: Option<ScenarioResult> = None;
        let mut stalled = None;
        loop {
            let now = Instant::now();
            let wait = L1_SILENCE.min(deadline.saturating_duration_since(now));
            let line = match console.recv_timeout(wait) {
                Ok(line) => line.map_err(|e| Error::io(&self.qemu, e))?,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    stalled = Some(if Instant::now() >= deadline {
                        "it ran past its deadline".to_string()
                    } else {
                        format!("it printed nothing for {} s", L1_SILENCE.as_secs())
                    });
                    let _ = child.kill();
                    break;
                }
            };
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            let _ = writeln!(out, "{line}");
            parse_line(line, &mut run, &mut current);
            if let Some(secs) = soft_lockup_seconds(line).filter(|&s| s >= L1_LOCKUP_SECONDS) {
                // Wedged: L1's own time-outs cannot run, and it still prints every 28 s.
                stalled = Some(format!("a CPU of it was stuck for {secs} s (soft lockup)"));
                let _ = child.kill();
                break;
            }
        }
        let status = child.wait().map_err(|e| Error::io(&self.qemu, e))?;
        if let (Some(why), false) = (stalled, run.completed) {
            run.errors.push(format!("the lab VM was killed: {why}"));
        }
        let _ = std::fs::remove_file(&l1_image);
        let _ = std::fs::remove_file(&contents_l2);
        if let Some(path) = &fio_initrd {
            let _ = std::fs::remove_file(path);
        }
        if let Some(dir) = isos {
            let _ = std::fs::remove_dir_all(dir);
        }
        let qemu_said = match run.completed {
            true => String::new(),
            false => std::fs::read_to_string(&qemu_log).unwrap_or_default(),
        };
        let _ = std::fs::remove_file(&qemu_log);
        if !run.completed {
            let triple = match qemu_said.contains("Triple fault") {
                true => "; QEMU says L1 triple-faulted",
                false => "",
            };
            run.errors.push(format!(
                "the lab VM stopped before finishing its script ({status}{triple})"
            ));
        }
        Ok(run)
    }
}

/// A program of this host (installed by scripts/setup.sh from Debian's `package`).
fn host_tool(name: &str, package: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Tool {
            what: format!("finding {name}"),
            detail: format!("not on PATH; install Debian's {package} (scripts/setup.sh)"),
        })
}

/// An ISO 9660 image `dir/name.iso` (Rock Ridge and Joliet, made by genisoimage) holding one
/// 256 KiB file `inner` of bytes derived from `seed`; returns that file's and the image's
/// paths.
fn make_iso(dir: &Path, name: &str, inner: &str, seed: u8) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let data: Vec<u8> = (0..256u32 << 10)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect();
    let file = dir.join(format!("{name}.bin"));
    std::fs::write(&file, data).map_err(|e| Error::io(&file, e))?;
    let iso = dir.join(format!("{name}.iso"));
    let out = Command::new(host_tool("genisoimage", "genisoimage")?)
        .args([
            "-quiet",
            "-R",
            "-J",
            "-V",
            &format!("VIRIDIAN_{name}"),
            "-o",
        ])
        .arg(&iso)
        .arg("-graft-points")
        .arg(format!("{inner}={}", file.display()))
        .output()
        .map_err(|e| Error::io(&iso, e))?;
    if !out.status.success() {
        return Err(Error::Tool {
            what: format!("genisoimage {}", iso.display()),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok((file, iso))
}

/// Escapes `s` for use inside a double-quoted shell word, so that the L1 script passes it to
/// `sh -c` unexpanded.
fn shell_double_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | '"' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// L1's `run NAME LIMIT TRIES COMMAND`: runs one scenario's command under `timeout`, its
/// output to the console (and `$LAB_SCRATCH/lab-scenario.out`, `/tmp` in L1) between
/// `LAB-BEGIN` and `LAB-END`, and again after `LAB-REDO` while tries remain and the run shows
/// an emulation fault: the same two tests [`LabRun::emulation_fault`] makes of a scenario (an
/// L2 triple fault, or a failure before any guest reported), see [`Scenario::tries`].
fn l1_run_function() -> String {
    r#"run() {
  name=$1; limit=$2; tries=$3; shift 3
  out=${LAB_SCRATCH:-/tmp}/lab-scenario
  while :; do
    echo "LAB-BEGIN $name"
    t0=$(cut -d' ' -f1 /proc/uptime)
    { timeout $limit sh -c "$*" </dev/null 2>&1; echo $? > $out.rc; } | tee $out.out
    rc=$(cat $out.rc)
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo
    echo "LAB-END $name rc=$rc t0=$t0 t1=$t1 clock=$(date +%s)"
    tries=$((tries - 1))
    [ $tries -gt 0 ] || break
    if grep -q 'TRIPLE_FAULT' $out.out; then why="an L2 guest triple-faulted"
    elif [ $rc != 0 ] && ! grep -q 'GUEST_MARKER' $out.out; then why="no guest printed a report (exit $rc)"
    else break; fi
    echo "LAB-REDO $name $why"
  done
}
"#
    .replace("TRIPLE_FAULT", TRIPLE_FAULT)
    .replace("GUEST_MARKER", GUEST_MARKER)
}

/// Finds firmware `name` in `dirs`, following Debian's symlinks by file name (their targets
/// point into other packages, which are unpacked in separate trees here).
fn find_firmware(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    let mut name = std::ffi::OsString::from(name);
    for _ in 0..4 {
        let hit = dirs
            .iter()
            .map(|d| d.join(&name))
            .find(|p| p.symlink_metadata().is_ok())?;
        match std::fs::read_link(&hit) {
            Ok(target) => name = target.file_name()?.to_owned(),
            Err(_) => return Some(hit),
        }
    }
    None
}

fn parse_line(line: &str, run: &mut LabRun, current: &mut Option<ScenarioResult>) {
    let fields = |rest: &str| -> BTreeMap<String, String> {
        rest.split_whitespace()
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    if let Some(name) = line.strip_prefix("LAB-BEGIN ") {
        *current = Some(ScenarioResult {
            name: name.trim().to_string(),
            ..Default::default()
        });
    } else if let Some(rest) = line.strip_prefix("LAB-END ") {
        if let Some(mut r) = current.take() {
            let f = fields(rest);
            r.exit_code = f.get("rc").and_then(|v| v.parse().ok()).unwrap_or(-1);
            let t = |k: &str| f.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            r.seconds = t("t1") - t("t0");
            r.clock = f.get("clock").and_then(|v| v.parse().ok());
            run.scenarios.push(r);
        }
    } else if let Some(rest) = line.strip_prefix("LAB-REDO ") {
        let (name, why) = rest.split_once(' ').unwrap_or((rest, ""));
        if let Some(i) = run.scenarios.iter().rposition(|s| s.name == name) {
            run.scenarios.remove(i);
        }
        run.redone.push(format!("{name}: {why}"));
    } else if let Some(rest) = line.strip_prefix("LAB-ERROR ") {
        run.errors.push(rest.to_string());
    } else if line.starts_with("LAB-DONE") {
        run.completed = true;
    } else if let Some(rest) = line.strip_prefix("LAB-L1 ") {
        run.l1_init_uptime = fields(rest).get("init_uptime").and_then(|v| v.parse().ok());
    } else if let Some(r) = current.as_mut() {
        if line.matches(GUEST_MARKER).count() > 1 {
            // Every writer inside L1 writes whole lines (`viridian run` too, whenever nobody
            // types at it); a line holding two reports means one writer split another's.
            run.errors.push(format!(
                "{}: two lines ran into each other (a writer split another's line): {line}",
                r.name
            ));
        }
        for report in line.split(GUEST_MARKER).skip(1) {
            r.guest.extend(fields(report));
        }
        r.console.push_str(line);
        r.console.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the parser makes of these console lines.
    fn run_of(lines: &[&str]) -> LabRun {
        let mut run = LabRun::default();
        let mut cur = None;
        for l in lines {
            parse_line(l, &mut run, &mut cur);
        }
        run
    }

    #[test]
    fn parses_scenario_output() {
        let run = run_of(&[
            "LAB-L1 init_uptime=3.50",
            "LAB-BEGIN smp",
            "[    0.0] Linux version ...",
            "VIRIDIAN-GUEST nproc=2",
            "VIRIDIAN-GUEST mem_kb=496000",
            "VIRIDIAN-GUEST poweroff",
            "LAB-END smp rc=0 t0=4.00 t1=9.50",
            "LAB-ERROR insmod x failed",
            "LAB-DONE",
        ]);
        assert!(run.completed);
        assert_eq!(run.l1_init_uptime, Some(3.5));
        let s = run.scenario("smp").unwrap();
        assert_eq!(s.exit_code, 0);
        assert_eq!(s.guest["nproc"], "2");
        assert_eq!(s.guest["poweroff"], "");
        assert!((s.seconds - 5.5).abs() < 1e-9);
        assert!(s.console.contains("Linux version"));
        assert_eq!(run.errors, vec!["insmod x failed"]);
    }

    #[test]
    fn a_line_split_by_another_writer_is_reported_not_misread() {
        // The formats run of issue 8: L1's `host_dvd_path=` line landed inside the guest's
        // `dvd2_md5=` line.
        let run = run_of(&[
            "LAB-BEGIN formats",
            "VIRIDIAN-GUEST dvd2_md5=5463665fVIRIDIAN-GUEST host_dvd_path=/l2/two.iso",
            "9a44bda13fdeaac387e6b425",
            "VIRIDIAN-GUEST host_dvd_after_guest_eject=-",
            "LAB-END formats rc=0 t0=1 t1=2",
        ]);
        let s = run.scenario("formats").unwrap();
        assert_eq!(s.guest["host_dvd_path"], "/l2/two.iso");
        assert_eq!(s.guest["dvd2_md5"], "5463665f");
        assert_eq!(s.guest["host_dvd_after_guest_eject"], "-");
        assert_eq!(run.errors.len(), 1, "{:?}", run.errors);
        assert!(
            run.errors[0].contains("formats: two lines ran into each other"),
            "{:?}",
            run.errors
        );
    }

    #[test]
    fn an_l2_triple_fault_or_an_unfinished_script_is_an_emulation_fault() {
        let clean = [
            "LAB-BEGIN a",
            "VIRIDIAN-GUEST poweroff",
            "LAB-END a rc=0 t0=1 t1=2",
            "LAB-DONE",
        ];
        assert_eq!(run_of(&clean).emulation_fault(), None);
        let faulted = run_of(&[
            "LAB-BEGIN net",
            "[netb] viridian: viridian: vCPU 1 triple-faulted; the guest is dead.",
            "LAB-END net rc=124 t0=1 t1=2",
            "LAB-DONE",
        ]);
        let why = faulted.emulation_fault().unwrap();
        assert!(why.contains("net triple-faulted"), "{why}");
        let hung = run_of(&[
            "LAB-BEGIN hv-2cpu",
            "Terminated",
            "LAB-END hv-2cpu rc=143 t0=37 t1=337",
            "LAB-DONE",
        ]);
        let why = hung.emulation_fault().unwrap();
        assert!(why.contains("hv-2cpu printed nothing"), "{why}");
        let failed = run_of(&[
            "LAB-BEGIN b",
            "VIRIDIAN-GUEST init_uptime=3.1",
            "LAB-END b rc=1 t0=1 t1=2",
            "LAB-DONE",
        ]);
        assert_eq!(
            failed.emulation_fault(),
            None,
            "a guest that ran and failed is no fault of L1"
        );
        let unfinished = run_of(&["LAB-BEGIN a", "[   45.6] Kernel panic - not syncing"]);
        let why = unfinished.emulation_fault().unwrap();
        assert!(why.contains("before finishing"), "{why}");
    }

    /// L1's `run` in the host's `sh`: a scenario whose guest triple-faults runs again (while
    /// tries remain), one that failed after a guest reported does not, and the parser keeps
    /// only the last run of a redone scenario.
    #[test]
    fn a_scenario_that_hit_an_emulation_fault_runs_again_in_the_same_l1() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("count");
        let run_l1 = |tries: u32, first: &str, then: &str| {
            let _ = std::fs::remove_file(&count);
            let cmd = format!(
                "n=$(cat {c} 2>/dev/null || echo 0); echo $((n + 1)) > {c}; \
                 if [ $n = 0 ]; then {first}; else {then}; fi",
                c = count.display()
            );
            let script = format!(
                "{}run sc 20 {tries} \"{}\"\necho LAB-DONE\n",
                l1_run_function(),
                shell_double_quote(&cmd)
            );
            let out = std::process::Command::new("sh")
                .args(["-c", &script])
                .env("LAB_SCRATCH", dir.path())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            (run_of(&lines), text)
        };
        let fault = format!("echo '[netb] viridian: viridian: vCPU 1 {TRIPLE_FAULT}.'; exit 1");
        let ok = "echo 'VIRIDIAN-GUEST x=2'; exit 0";

        let (run, text) = run_l1(3, &fault, ok);
        assert_eq!(text.matches("LAB-BEGIN sc").count(), 2, "{text}");
        assert_eq!(run.redone, ["sc: an L2 guest triple-faulted"], "{text}");
        assert_eq!(run.scenarios.len(), 1, "{text}");
        assert_eq!(run.scenarios[0].exit_code, 0, "{text}");
        assert_eq!(run.scenarios[0].guest["x"], "2", "{text}");
        assert_eq!(run.emulation_fault(), None, "{text}");

        let silent = "sleep 0; exit 143";
        let (run, text) = run_l1(3, silent, ok);
        assert_eq!(run.redone.len(), 1, "{text}");
        assert!(run.redone[0].contains("no guest printed"), "{text}");
        assert_eq!(run.scenarios[0].exit_code, 0, "{text}");

        // One try: the fault stays, for a fresh L1 to deal with.
        let (run, text) = run_l1(1, &fault, ok);
        assert!(run.redone.is_empty(), "{text}");
        assert_eq!(run.scenarios[0].exit_code, 1, "{text}");
        assert!(run.emulation_fault().is_some(), "{text}");

        // A guest that reported and then failed is the scenario's failure, never redone.
        let (run, text) = run_l1(3, "echo 'VIRIDIAN-GUEST x=1'; exit 1", ok);
        assert!(run.redone.is_empty(), "{text}");
        assert_eq!(run.scenarios[0].exit_code, 1, "{text}");

        // Every try faulted: the last run is the one kept.
        let (run, text) = run_l1(2, &fault, &fault);
        assert_eq!(text.matches("LAB-BEGIN sc").count(), 2, "{text}");
        assert_eq!(run.scenarios.len(), 1, "{text}");
        assert!(run.emulation_fault().is_some(), "{text}");
    }

    #[test]
    fn a_soft_lockup_line_gives_its_seconds() {
        assert_eq!(
            soft_lockup_seconds(
                "[   64.517077] watchdog: BUG: soft lockup - CPU#0 stuck for 53s! [vcpu1:163]"
            ),
            Some(53)
        );
        assert_eq!(soft_lockup_seconds("VIRIDIAN-GUEST stuck for 53s!"), None);
        assert_eq!(
            soft_lockup_seconds("watchdog: BUG: soft lockup - CPU#1 stuck for s! [x]"),
            None
        );
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(
            shell_double_quote(r#"a "b" $c `d` \e"#),
            r#"a \"b\" \$c \`d\` \\e"#
        );
    }

    #[test]
    fn scenario_commands() {
        let s = Scenario::new("a", Vmm::Viridian, Flavor::Amd64, 2, "report");
        let c = s.command();
        assert!(
            c.contains("--cpus 2") && c.contains("/l2/vmlinuz-amd64"),
            "{c}"
        );
        let f = Scenario::new("f", Vmm::Viridian, Flavor::Cloud, 1, "formats").command();
        assert!(
            f.contains("--dvd /l2/one.iso")
                && f.contains("child.vhdx,controller=1")
                && f.contains("ro.img,readonly")
                && f.contains("vm dvd f --eject")
                && f.contains("${f%.vhdx}")
                && f.contains("viridian.scenario=ids viridian.disks=3")
                && f.contains("--disk $D/moved/renamed.vhdx"),
            "{f}"
        );
        let q = Scenario::new("b", Vmm::QemuMicrovm, Flavor::Cloud, 1, "boot").command();
        assert!(q.contains("-M microvm") && q.contains("-enable-kvm"), "{q}");
    }

    /// A stand-in for `viridian` inside L1: `run` plays a guest on the serial log (login
    /// prompt, then a shell reading CR-terminated lines from standard input, as a terminal
    /// sends them), `vm stop` ends it, `vhd test` passes. Every call is logged.
    const FAKE_VIRIDIAN: &str = r#"#!/bin/sh
echo "$*" >> "$FAKE/calls"
readcr() {
  line=
  while :; do
    c=$(dd bs=1 count=1 2>/dev/null)
    [ -z "$c" ] && return 1
    [ "$c" = "$(printf '\r')" ] && return 0
    line="$line$c"
  done
}
case "$1 $2" in
  "vm stop") touch "$FAKE/stopped"; exit 0;;
  "vhd test") exit 0;;
esac
while [ $# -gt 0 ]; do [ "$1" = --serial ] && log=$2; shift; done
printf 'Debian GNU/Linux 12 viridian-debian ttyS0\n\nviridian-debian login: ' > "$log"
if [ -n "$FAKE_LOGIN" ]; then
  readcr && [ "$line" = root ] || exit 9
  printf '\nroot@viridian-debian:~# ' >> "$log"
  readcr || exit 8
  echo "$line" > "$FAKE/typed"
  echo "VIRIDIAN-GUEST system_state=running"
  exit 0
fi
while [ ! -e "$FAKE/stopped" ]; do sleep 0.2; done
"#;

    /// Runs a system scenario's command with [`FAKE_VIRIDIAN`] first in PATH.
    fn run_with_fake_viridian(sc: &Scenario) -> (std::process::Output, String, tempfile::TempDir) {
        use std::os::unix::fs::PermissionsExt;
        let fake = tempfile::tempdir().unwrap();
        let bin = fake.path().join("viridian");
        std::fs::write(&bin, FAKE_VIRIDIAN).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            fake.path().display(),
            std::env::var("PATH").unwrap()
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(sc.command())
            .env("PATH", path)
            .env("FAKE", fake.path());
        if sc.login {
            cmd.env("FAKE_LOGIN", "1");
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let calls = std::fs::read_to_string(fake.path().join("calls")).unwrap_or_default();
        (out, calls, fake)
    }

    #[test]
    fn system_scenario_stops_the_vm_at_the_login_prompt() {
        let sc = Scenario::system(&format!("unit-prompt-{}", std::process::id()), 1, 256);
        let (out, calls, _fake) = run_with_fake_viridian(&sc);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(stdout.contains("VIRIDIAN-GUEST login_seconds="), "{stdout}");
        assert!(
            stdout.contains("VIRIDIAN-GUEST host_vhd_test=ok"),
            "{stdout}"
        );
        assert!(calls.contains("--disk /disk/debian.vhdx"), "{calls}");
        assert!(calls.contains("root=/dev/sda1"), "{calls}");
        assert!(calls.contains(&format!("vm stop {}", sc.name)), "{calls}");
    }

    #[test]
    fn system_scenario_logs_in_through_standard_input() {
        let mut sc = Scenario::system(&format!("unit-login-{}", std::process::id()), 1, 256);
        sc.login = true;
        let (out, calls, fake) = run_with_fake_viridian(&sc);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        for key in [
            "login_seconds=",
            "shell_seconds=",
            "system_state=running",
            "off_seconds=",
            "host_vhd_test=ok",
        ] {
            assert!(
                stdout.contains(&format!("VIRIDIAN-GUEST {key}")),
                "{key}: {stdout}"
            );
        }
        assert!(calls.contains("vhd test"), "{calls}");
        // The guest powered itself off: no `vm stop`.
        assert!(!calls.contains("vm stop"), "{calls}");
        let typed = std::fs::read_to_string(fake.path().join("typed")).unwrap();
        assert_eq!(typed.trim_end(), LOGIN_COMMANDS);
        // The typed line (echoed by the guest's terminal) carries no marker of its own.
        assert!(!typed.contains("VIRIDIAN-GUEST "), "{typed}");
    }

    #[test]
    fn the_lab_demo_logs_in_and_leaves_its_throwaway_disk_unchecked() {
        let mut sc = Scenario::demo(1, 512);
        sc.name = format!("unit-demo-{}", std::process::id());
        let (out, calls, _fake) = run_with_fake_viridian(&sc);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(
            stdout.contains("VIRIDIAN-GUEST system_state=running"),
            "{stdout}"
        );
        assert!(!calls.contains("vhd test"), "{calls}");
        assert!(calls.contains("--cpus 1 --memory 512M"), "{calls}");
    }
}
