//! The disk benchmark: Debian's `fio` in the L2 guest, on Viridian's storvsc and on QEMU's
//! virtio-blk, over the same two files in L1 (a raw image and a dynamic VHDX holding the same
//! data), in one lab run.
//!
//! The files live on an ext2 file system on a RAM disk in L1 (`brd`), not on L1's tmpfs: QEMU's
//! fastest setting, `cache=none`, opens them with `O_DIRECT`, which tmpfs refuses on L1's 6.1
//! kernel. The first scenario to run makes the RAM disk and the files (random data, so every
//! block of the VHDX is allocated and no read is served from a hole) and picks QEMU's
//! `aio=io_uring` if L1's QEMU opens the raw image with it, else `aio=native`.
//!
//! The guest (`/fio.sh`, run for `viridian.scenario=fio`) runs [`JOBS`] one after the other on
//! its only disk (`sda` or `vda`), each `viridian.fio_seconds=` long after a second of ramp,
//! and prints fio's terse output as `FIO-TERSE` lines; [`results`] reads them.
//!
//! [`Settings::rounds`] repeats the four scenarios in the same L1 boot, the two VMMs taking
//! turns to go first, and [`table`] pairs each round's Viridian and QEMU numbers: the ratio of a
//! round compares two runs minutes apart, and the median of the rounds' ratios is what the
//! benchmark reports (the same row moves by 2x between runs of the emulated lab).

use crate::{debian, Cache, Flavor, LabRun, Result, Scenario, ScenarioResult, Vmm};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The guest scenario (`viridian.scenario=`) of every fio scenario.
pub const GUEST: &str = "fio";

/// L2 modules the QEMU guest needs for its virtio-blk disk.
pub const L2_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];

/// The L1 module that gives the RAM disk; loaded by the first fio scenario, with its size.
pub const L1_RAM_DISK_MODULE: &str = "brd";

/// Where the RAM disk's module is in L1's image (outside the mount point).
pub(crate) const L1_RAM_DISK_PATH: &str = "lab/brd.ko";

/// The size of each benchmark file, in MiB.
pub const FILE_MIB: u64 = 256;

/// The guest's memory, in MiB: its initramfs carries fio and about 80 MiB of libraries.
const GUEST_MIB: u64 = 1024;

/// One fio job: name, `--rw`, `--bs`, `--iodepth`.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub name: &'static str,
    pub rw: &'static str,
    pub bs: &'static str,
    pub iodepth: u32,
}

impl Job {
    /// Whether the job is measured in MiB/s rather than IOPS.
    pub fn is_throughput(&self) -> bool {
        self.bs == "1M"
    }

    /// What the benchmark reports of `r`: MiB/s for throughput jobs, else IOPS.
    pub fn value(&self, r: &FioResult) -> f64 {
        if self.is_throughput() {
            r.mib_per_second()
        } else {
            r.iops
        }
    }

    /// The unit of [`Job::value`].
    pub fn unit(&self) -> &'static str {
        if self.is_throughput() {
            "MiB/s"
        } else {
            "IOPS"
        }
    }
}

/// The benchmark's jobs, in the order the guest runs them.
pub const JOBS: &[Job] = &[
    Job {
        name: "randread_4k_qd1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
    },
    Job {
        name: "randread_4k_qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
    },
    Job {
        name: "randwrite_4k_qd1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
    },
    Job {
        name: "randwrite_4k_qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
    },
    Job {
        name: "read_1m_qd8",
        rw: "read",
        bs: "1M",
        iodepth: 8,
    },
    Job {
        name: "write_1m_qd8",
        rw: "write",
        bs: "1M",
        iodepth: 8,
    },
];

/// The image format of a benchmark file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Vhdx,
}

impl Format {
    fn file(self) -> &'static str {
        match self {
            Format::Raw => "raw.img",
            Format::Vhdx => "dyn.vhdx",
        }
    }

    fn qemu_format(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhdx => "vhdx",
        }
    }

    pub fn name(self) -> &'static str {
        self.qemu_format()
    }
}

/// The name of the scenario for `vmm` on `format` in round `round` (from 0).
pub fn scenario_name(vmm: Vmm, format: Format, round: u32) -> String {
    let vmm = if vmm == Vmm::Viridian {
        "viridian"
    } else {
        "qemu"
    };
    format!("fio-{vmm}-{}-{round}", format.name())
}

/// `/fio.sh` of the L2 guest (see the module's documentation).
pub fn guest_script() -> String {
    let jobs: Vec<String> = JOBS
        .iter()
        .map(|j| format!("\"{} {} {} {}\"", j.name, j.rw, j.bs, j.iodepth))
        .collect();
    format!(
        r#"
RT=10; ONLY=
for a in $(cat /proc/cmdline); do
  case "$a" in
    viridian.fio_seconds=*) RT=${{a#*=}};;
    viridian.fio_jobs=*) ONLY=,${{a#*=}},;;
  esac
done
DEV=; i=0
while [ -z "$DEV" ] && [ $i -lt 60 ]; do
  for d in sda vda; do [ -e /sys/block/$d ] && DEV=$d; done
  [ -n "$DEV" ] || sleep 1
  i=$((i+1))
done
say fio_dev=$DEV
if [ -n "$DEV" ]; then
  Q=/sys/block/$DEV/queue
  say queue=$(for f in rotational scheduler nr_requests max_sectors_kb optimal_io_size minimum_io_size physical_block_size discard_max_bytes write_cache; do printf '%s:%s,' $f "$(cat $Q/$f | tr ' ' _)"; done)
  for job in {jobs}; do
    set -- $job
    case "$ONLY" in ''|*,$1,*) ;; *) continue;; esac
    # The block layer's own count of what reached the disk: requests and their mean size.
    b=$(awk '{{print $1 + $5, $3 + $7}}' /sys/block/$DEV/stat)
    line=$(fio --name=$1 --filename=/dev/$DEV --rw=$2 --bs=$3 --iodepth=$4 --ioengine=libaio --direct=1 --thread --time_based --runtime=$RT --ramp_time=1 --norandommap --randrepeat=0 --minimal 2>/tmp/fio.err)
    if [ -n "$line" ]; then echo "FIO-TERSE $line"; else say fio_failed=$1; sed 's/^/FIO-ERROR /' /tmp/fio.err; fi
    say $1_requests=$(awk -v b="$b" '{{split(b, o, " "); n = $1 + $5 - o[1]; k = ($3 + $7 - o[2]) / 2; printf "%d,mean_kib=%d", n, n ? k / n : 0}}' /sys/block/$DEV/stat)
  done
fi
"#,
        jobs = jobs.join(" ")
    )
}

/// What a disk benchmark run does.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Each job's length, in seconds.
    pub seconds: u32,
    /// The jobs to run, by name; empty for all of [`JOBS`].
    pub jobs: Vec<String>,
    /// Profile L1 during each VM's run ([`crate::profile`]).
    pub profile: bool,
    /// `NAME=VALUE` settings in Viridian's environment (to compare its own knobs, such as
    /// `VIRIDIAN_NO_IO_URING=1`, against the same QEMU runs); see [`Settings::env_ok`].
    pub viridian_env: Vec<String>,
    /// How many times each VMM runs the jobs on each file (0 counts as 1).
    pub rounds: u32,
}

impl Settings {
    /// Whether `setting` is a `NAME=VALUE` the L1 script can carry unquoted: a `VIRIDIAN_`
    /// name, and a value of letters, digits and `_,.:-`.
    pub fn env_ok(setting: &str) -> bool {
        let Some((name, value)) = setting.split_once('=') else {
            return false;
        };
        name.starts_with("VIRIDIAN_")
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_,.:-".contains(&b))
    }

    /// The jobs this run runs, in [`JOBS`]' order.
    pub fn selected(&self) -> impl Iterator<Item = &'static Job> + '_ {
        JOBS.iter()
            .filter(|j| self.jobs.is_empty() || self.jobs.iter().any(|n| n == j.name))
    }

    /// [`Settings::rounds`], at least 1.
    pub fn rounds(&self) -> u32 {
        self.rounds.max(1)
    }
}

/// L1's side of one fio scenario: the shared RAM disk and files, made by whichever scenario
/// runs first, then the VM, `exec`ed so that the scenario's timeout reaches it (when
/// profiled, run under `perf` instead).
fn l1_script(vmm: Vmm, format: Format, round: u32, settings: &Settings) -> String {
    let rd_kib = (2 * FILE_MIB + 64) * 1024;
    let mut cmdline = format!(
        "console=ttyS0 panic=-1 quiet viridian.scenario={GUEST} viridian.fio_seconds={}",
        settings.seconds
    );
    if !settings.jobs.is_empty() {
        cmdline.push_str(&format!(" viridian.fio_jobs={}", settings.jobs.join(",")));
    }
    let file = format!("$B/{}", format.file());
    let vm = match vmm {
        Vmm::Viridian => format!(
            "viridian run --kernel /l2/vmlinuz-cloud --initrd /l2/fio-initrd.cpio --cpus 1 --memory {GUEST_MIB}M --disk {file} --cmdline '{cmdline}'"
        ),
        Vmm::QemuPc | Vmm::QemuMicrovm => format!(
            "qemu-system-x86_64 -L /usr/share/qemu -enable-kvm -cpu host -M pc -m {GUEST_MIB} -smp 1 -name fio,debug-threads=on -nodefaults -no-user-config -display none -serial stdio -no-reboot \
             -kernel /l2/vmlinuz-cloud -initrd /l2/fio-initrd.cpio -append '{cmdline}' \
             -object iothread,id=io0 -drive file={file},format={fmt},if=none,id=d0,cache=none,aio=$(cat $B/aio) -device virtio-blk-pci,drive=d0,iothread=io0",
            fmt = format.qemu_format()
        ),
    };
    let exports: String = match vmm {
        Vmm::Viridian => settings
            .viridian_env
            .iter()
            .filter(|e| Settings::env_ok(e))
            .map(|e| format!("export {e}; "))
            .collect(),
        _ => String::new(),
    };
    let vm = if settings.profile {
        let jobs = settings.selected().count() as u32;
        crate::profile::wrap(
            &scenario_name(vmm, format, round),
            &vm,
            "fio_dev=",
            jobs * (settings.seconds + 1),
        )
    } else {
        format!("exec {vm}")
    };
    format!(
        "B=/bench; \
         if [ ! -e $B/ready ]; then \
           insmod /{L1_RAM_DISK_PATH} rd_nr=1 rd_size={rd_kib} || echo LAB-ERROR insmod brd failed; \
           i=0; while [ ! -b /dev/ram0 ] && [ $i -lt 50 ]; do usleep 100000; i=$((i+1)); done; \
           mkdir -p $B; mke2fs -q -m 0 -b 4096 /dev/ram0 >/dev/null && mount -t ext2 /dev/ram0 $B || echo LAB-ERROR no file system on the RAM disk; \
           dd if=/dev/urandom of=$B/raw.img bs=1M count={FILE_MIB} 2>/dev/null; \
           viridian vhd convert $B/raw.img $B/dyn.vhdx >/dev/null 2>&1 || echo LAB-ERROR vhd convert failed; \
           echo native > $B/aio; \
           if command -v qemu-system-x86_64 >/dev/null; then \
             echo quit | qemu-system-x86_64 -machine none -accel kvm -nodefaults -display none -monitor stdio -drive file=$B/raw.img,format=raw,if=none,id=p,cache=none,aio=io_uring >/dev/null 2>&1 && echo io_uring > $B/aio; \
           fi; \
           touch $B/ready; \
         fi; \
         sync; echo 3 > /proc/sys/vm/drop_caches; \
         echo VIRIDIAN-GUEST host_aio=$(cat $B/aio) host_file_kib=$(du -k {file} | cut -f1); \
         {exports}{vm}"
    )
}

/// The fio scenarios of each round: Viridian and QEMU on the raw image, then on the VHDX;
/// QEMU goes first in odd rounds, so neither VMM always runs on the files the other has just
/// used.
pub fn scenarios(settings: &Settings) -> Vec<Scenario> {
    let jobs = settings.selected().count();
    let mut out = vec![];
    for round in 0..settings.rounds() {
        for format in [Format::Raw, Format::Vhdx] {
            let mut vmms = [Vmm::Viridian, Vmm::QemuPc];
            if round % 2 == 1 {
                vmms.reverse();
            }
            for vmm in vmms {
                let name = scenario_name(vmm, format, round);
                let mut s = Scenario::new(&name, vmm, Flavor::Cloud, 1, GUEST);
                s.memory_mib = GUEST_MIB;
                s.timeout_seconds = 180 + jobs as u32 * (settings.seconds + 5);
                s.script = Some(l1_script(vmm, format, round, settings));
                out.push(s);
            }
        }
    }
    out
}

/// One job on one file over the rounds: each VMM's [`Job::value`] per round, `None` where a
/// run gave no result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub viridian: Vec<Option<f64>>,
    pub qemu: Vec<Option<f64>>,
}

impl Row {
    /// Viridian / QEMU of each round that has both.
    pub fn ratios(&self) -> Vec<f64> {
        self.viridian
            .iter()
            .zip(&self.qemu)
            .filter_map(|(v, q)| Some(v.as_ref()? / q.as_ref()?))
            .collect()
    }

    /// Whether a round lacks a result of either VMM.
    pub fn incomplete(&self) -> bool {
        self.viridian.iter().chain(&self.qemu).any(Option::is_none)
    }
}

/// The median of `values` (the mean of the middle two of an even count); `None` for none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Every selected job's [`Row`] on each format, from a run of [`scenarios`]`(settings)`.
pub fn table(run: &LabRun, settings: &Settings) -> Vec<(&'static Job, Format, Row)> {
    let value = |vmm, format, round, job: &Job| {
        run.scenario(&scenario_name(vmm, format, round))
            .and_then(|s| results(s).get(job.name).map(|r| job.value(r)))
    };
    let mut out = vec![];
    for job in settings.selected() {
        for format in [Format::Raw, Format::Vhdx] {
            let rounds = 0..settings.rounds();
            let row = Row {
                viridian: rounds
                    .clone()
                    .map(|r| value(Vmm::Viridian, format, r, job))
                    .collect(),
                qemu: rounds.map(|r| value(Vmm::QemuPc, format, r, job)).collect(),
            };
            out.push((job, format, row));
        }
    }
    out
}

/// Debian's fio, unpacked into the cache. Its libraries come from this host, where
/// `scripts/setup.sh` installs them.
pub(crate) fn fio(cache: &Cache) -> Result<PathBuf> {
    Ok(debian::unpack(cache, "fio")?.join("usr/bin/fio"))
}

/// One job's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FioResult {
    pub iops: f64,
    pub kib_per_second: f64,
}

impl FioResult {
    pub fn mib_per_second(&self) -> f64 {
        self.kib_per_second / 1024.0
    }
}

/// Field numbers (from 1) of fio's terse format, version 3.
const TERSE_NAME: usize = 3;
const TERSE_READ_BW: usize = 7;
const TERSE_READ_IOPS: usize = 8;
const TERSE_WRITE_BW: usize = 48;
const TERSE_WRITE_IOPS: usize = 49;

/// The job name and result (reads and writes added up) of a line of fio's terse output.
pub fn parse_terse(line: &str) -> Option<(String, FioResult)> {
    let f: Vec<&str> = line.trim().split(';').collect();
    if f.first() != Some(&"3") || f.len() <= TERSE_WRITE_IOPS {
        return None;
    }
    let num = |i: usize| f[i - 1].parse::<f64>().ok();
    Some((
        f[TERSE_NAME - 1].to_string(),
        FioResult {
            iops: num(TERSE_READ_IOPS)? + num(TERSE_WRITE_IOPS)?,
            kib_per_second: num(TERSE_READ_BW)? + num(TERSE_WRITE_BW)?,
        },
    ))
}

/// The results of a fio scenario, by job name.
pub fn results(r: &ScenarioResult) -> BTreeMap<String, FioResult> {
    r.console
        .lines()
        .filter_map(|l| l.find("FIO-TERSE ").map(|at| &l[at + "FIO-TERSE ".len()..]))
        .filter_map(parse_terse)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines fio 3.33 printed (`--minimal`) for a 4 KiB random read and a 1 MiB write.
    const RANDREAD: &str = "3;fio-3.33;randread_qd1;0;0;113352;113238;28309;1001;0;682;6.294036;8.738869;0;8602;28.434941;246.832430;1.000000%=0;5.000000%=0;10.000000%=0;20.000000%=0;30.000000%=0;40.000000%=0;50.000000%=20;60.000000%=22;70.000000%=24;80.000000%=25;90.000000%=29;95.000000%=34;99.000000%=77;99.500000%=197;99.900000%=4554;99.950000%=5472;99.990000%=7700;0%=0;0%=0;0%=0;1;8608;34.728977;247.604600;124344;124344;100.000000%;124344.000000;0.000000;0;0;0;0;0;0;0.000000;0.000000;0;0;0.000000;0.000000;1.000000%=0;5.000000%=0;10.000000%=0;20.000000%=0;30.000000%=0;40.000000%=0;50.000000%=0;60.000000%=0;70.000000%=0;80.000000%=0;90.000000%=0;95.000000%=0;99.000000%=0;99.500000%=0;99.900000%=0;99.950000%=0;99.990000%=0;0%=0;0%=0;0%=0;0;0;0.000000;0.000000;0;0;0.000000%;0.000000;0.000000;4.500000%;20.700000%;15280;0;2;100.0%;0.0%;0.0%;0.0%;0.0%;0.0%;0.0%;45.91%;0.15%;0.05%;2.03%;50.23%;0.85%;0.34%;0.05%;0.02%;0.01%;0.08%;0.14%;0.14%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;vda;14437;0;0;0;445;0;445;38.74%";
    const WRITE: &str = "3;fio-3.33;write_1m;0;0;0;0;0;0;0;0;0.000000;0.000000;0;0;0.000000;0.000000;1.000000%=0;5.000000%=0;10.000000%=0;20.000000%=0;30.000000%=0;40.000000%=0;50.000000%=0;60.000000%=0;70.000000%=0;80.000000%=0;90.000000%=0;95.000000%=0;99.000000%=0;99.500000%=0;99.900000%=0;99.950000%=0;99.990000%=0;0%=0;0%=0;0%=0;0;0;0.000000;0.000000;0;0;0.000000%;0.000000;0.000000;1191936;1189556;1161;1002;53;12340;213.422167;718.952597;803;22571;6635.415166;2961.556884;1.000000%=1826;5.000000%=2834;10.000000%=3489;20.000000%=4423;30.000000%=4947;40.000000%=5537;50.000000%=6062;60.000000%=6848;70.000000%=7831;80.000000%=8454;90.000000%=10027;95.000000%=12124;99.000000%=17432;99.500000%=21364;99.900000%=22413;99.950000%=22675;99.990000%=22675;0%=0;0%=0;0%=0;952;23036;6848.837332;3105.777571;1110016;1259520;99.597497%;1184768.000000;105715.292215;9.690310%;8.491508%;253;0;1;0.1%;0.2%;0.3%;99.4%;0.0%;0.0%;0.0%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.17%;1.20%;13.75%;74.66%;9.62%;0.60%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;0.00%;vda;2;1588;22;10481;6;6142;6155;70.14%";

    #[test]
    fn reads_fio_terse_lines() {
        let (name, r) = parse_terse(RANDREAD).unwrap();
        assert_eq!(name, "randread_qd1");
        assert_eq!(r.iops, 28309.0);
        assert_eq!(r.kib_per_second, 113238.0);
        let (name, w) = parse_terse(WRITE).unwrap();
        assert_eq!(name, "write_1m");
        assert_eq!(w.iops, 1161.0);
        assert!((w.mib_per_second() - 1161.67).abs() < 0.01);
        // Not terse version 3, cut short, or not numbers: nothing.
        assert_eq!(parse_terse("fio: pid=0, err=5/file:io_u.c"), None);
        assert_eq!(parse_terse(&RANDREAD[..200]), None);
        assert_eq!(parse_terse(&RANDREAD.replace(";28309;", ";x;")), None);
        assert_eq!(parse_terse(""), None);
    }

    #[test]
    fn results_come_from_the_console() {
        let r = ScenarioResult {
            console: format!(
                "[ 1.0] sd 0:0:0:0: [sda] 524288 512-byte logical blocks\nFIO-TERSE {RANDREAD}\nVIRIDIAN-GUEST fio_failed=x\n\rFIO-TERSE {WRITE}\n"
            ),
            ..Default::default()
        };
        let got = results(&r);
        assert_eq!(got.keys().collect::<Vec<_>>(), ["randread_qd1", "write_1m"]);
    }

    #[test]
    fn both_vmms_use_the_same_files_and_qemu_its_fastest_settings() {
        let all = scenarios(&Settings {
            seconds: 10,
            ..Default::default()
        });
        assert_eq!(all.len(), 4);
        for s in &all {
            let c = s.command();
            assert_eq!(s.guest, GUEST);
            assert!(c.contains("viridian.fio_seconds=10"), "{c}");
            assert!(!c.contains("viridian.fio_jobs"), "{c}");
            assert!(
                c.contains("exec viridian run") || c.contains("exec qemu-system"),
                "{c}"
            );
            let file = if s.name.contains("-raw-") {
                "$B/raw.img"
            } else {
                "$B/dyn.vhdx"
            };
            if s.vmm == Vmm::Viridian {
                assert!(c.contains(&format!("--disk {file} ")), "{c}");
            } else {
                assert!(
                    c.contains(&format!("-drive file={file},format="))
                        && c.contains("cache=none,aio=$(cat $B/aio)")
                        && c.contains("iothread=io0"),
                    "{c}"
                );
            }
        }
        let g = guest_script();
        for j in JOBS {
            assert!(g.contains(&format!("\"{} {} {} {}\"", j.name, j.rw, j.bs, j.iodepth)));
        }
    }

    #[test]
    fn rounds_take_turns_and_their_ratios_pair_up() {
        let settings = Settings {
            seconds: 5,
            jobs: vec!["read_1m_qd8".into()],
            rounds: 3,
            ..Default::default()
        };
        let names: Vec<String> = scenarios(&settings).into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                "fio-viridian-raw-0",
                "fio-qemu-raw-0",
                "fio-viridian-vhdx-0",
                "fio-qemu-vhdx-0",
                "fio-qemu-raw-1",
                "fio-viridian-raw-1",
                "fio-qemu-vhdx-1",
                "fio-viridian-vhdx-1",
                "fio-viridian-raw-2",
                "fio-qemu-raw-2",
                "fio-viridian-vhdx-2",
                "fio-qemu-vhdx-2",
            ]
        );
        // A 1 MiB read line per scenario, with the MiB/s given; QEMU's raw run of round 2
        // printed nothing.
        let line = |mib: u32| {
            let mut f: Vec<String> = WRITE.split(';').map(str::to_string).collect();
            f[TERSE_NAME - 1] = "read_1m_qd8".into();
            f[TERSE_WRITE_BW - 1] = (mib * 1024).to_string();
            format!("FIO-TERSE {}\n", f.join(";"))
        };
        let mibs = [
            ("fio-viridian-raw-0", 100),
            ("fio-qemu-raw-0", 200),
            ("fio-viridian-vhdx-0", 90),
            ("fio-qemu-vhdx-0", 60),
            ("fio-qemu-raw-1", 100),
            ("fio-viridian-raw-1", 150),
            ("fio-qemu-vhdx-1", 90),
            ("fio-viridian-vhdx-1", 90),
            ("fio-viridian-raw-2", 300),
            ("fio-viridian-vhdx-2", 30),
            ("fio-qemu-vhdx-2", 60),
        ];
        let run = LabRun {
            scenarios: mibs
                .iter()
                .map(|(name, mib)| ScenarioResult {
                    name: name.to_string(),
                    console: line(*mib),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let t = table(&run, &settings);
        assert_eq!(t.len(), 2);
        let (job, format, raw) = &t[0];
        assert_eq!((job.name, *format), ("read_1m_qd8", Format::Raw));
        assert_eq!(raw.viridian, [Some(100.0), Some(150.0), Some(300.0)]);
        assert_eq!(raw.qemu, [Some(200.0), Some(100.0), None]);
        assert!(raw.incomplete());
        assert_eq!(raw.ratios(), [0.5, 1.5]);
        assert_eq!(median(&raw.ratios()), Some(1.0));
        let (_, format, vhdx) = &t[1];
        assert_eq!(*format, Format::Vhdx);
        assert!(!vhdx.incomplete());
        assert_eq!(vhdx.ratios(), [1.5, 1.0, 0.5]);
        assert_eq!(median(&vhdx.ratios()), Some(1.0));
        assert_eq!(
            median(&vhdx.viridian.iter().flatten().copied().collect::<Vec<_>>()),
            Some(90.0)
        );
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 2.0]), Some(2.0));
    }

    #[test]
    fn viridian_alone_gets_the_settings_it_was_given() {
        assert!(Settings::env_ok("VIRIDIAN_COPIERS=0"));
        assert!(Settings::env_ok("VIRIDIAN_NO_IO_URING=1"));
        for bad in [
            "COPIERS=0",
            "VIRIDIAN_X",
            "VIRIDIAN_X=1;reboot",
            "VIRIDIAN_X=$(id)",
            "VIRIDIAN_x=1",
            "VIRIDIAN_X=a b",
        ] {
            assert!(!Settings::env_ok(bad), "{bad}");
        }
        let all = scenarios(&Settings {
            seconds: 5,
            viridian_env: vec!["VIRIDIAN_COPIERS=0".into(), "VIRIDIAN_X=1;reboot".into()],
            ..Default::default()
        });
        for s in &all {
            let c = s.command();
            assert_eq!(
                c.contains("export VIRIDIAN_COPIERS=0; exec viridian run"),
                s.vmm == Vmm::Viridian,
                "{c}"
            );
            assert!(!c.contains("VIRIDIAN_X"), "{c}");
        }
    }

    #[test]
    fn a_profiled_run_of_some_jobs() {
        let all = scenarios(&Settings {
            seconds: 5,
            jobs: vec!["read_1m_qd8".into(), "write_1m_qd8".into()],
            profile: true,
            ..Default::default()
        });
        for s in &all {
            let c = s.command();
            assert!(
                c.contains("viridian.fio_jobs=read_1m_qd8,write_1m_qd8"),
                "{c}"
            );
            assert!(crate::profile::used_by(s.script.as_deref()), "{c}");
            assert!(
                !c.contains("exec viridian") && !c.contains("exec qemu"),
                "{c}"
            );
            // Two jobs' time, not six.
            assert_eq!(s.timeout_seconds, 180 + 2 * 10);
        }
    }
}
