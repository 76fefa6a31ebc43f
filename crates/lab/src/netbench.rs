//! The network benchmark: Debian's iperf3 between two guests with 1 vCPU each, guest to host
//! (L1's address on an Internal switch) and guest to guest (a Private switch), with the
//! guests' NICs on Viridian (hv_netvsc on netvsp) or on QEMU (virtio-net on a TAP in the same
//! bridge, its data path in QEMU's thread or in the kernel's vhost-net). Each [`iperf`]
//! scenario measures TCP with 1 and 4 streams and 64-byte UDP; the lab test puts the
//! scenarios of every VMM into one L1 boot so that their ratios compare like with like.
//!
//! Guest `a` prints `a_host_tcp1`, `a_host_tcp4` (Mbit/s the receiver counted),
//! `a_host_udp_pps` (64-byte datagrams the receiver got per second), the same with `peer_`,
//! and its NIC interrupts during each (`a_host_tcp1_irqs`, ...: the `HYP` line of
//! /proc/interrupts on Viridian, the virtio lines on QEMU). On Viridian the host side prints
//! `LAB-NIC-A` and `LAB-NIC-B` (`viridian vm nic list --json`: netvsp's counters) at the end;
//! on QEMU `LAB-PORTS-connected` (QEMU's TAPs `qneta0`, `qneta1` and `qnetb0` are ports, put
//! there by `viridian switch connect`), then `viridian switch disconnect lab qneta1` and
//! `LAB-PORTS-disconnected`.

use crate::network::{prelude, scenario, HOST_ADDRESS, PRIVATE_A, PRIVATE_B};
use crate::{debian, Cache, Result, Scenario, Vmm};
use std::path::PathBuf;

/// Debian's iperf3 (package `iperf3`) and the directories of the libraries this host lacks
/// (`libiperf0`, `libsctp1`; libssl3 and libc are the host's, as for dnsmasq and nft).
#[derive(Debug, Clone)]
pub(crate) struct Iperf3 {
    pub program: PathBuf,
    pub lib_dirs: Vec<PathBuf>,
}

pub(crate) fn iperf3(cache: &Cache) -> Result<Iperf3> {
    let lib = |p: &str| -> Result<PathBuf> {
        Ok(debian::unpack(cache, p)?.join("usr/lib/x86_64-linux-gnu"))
    };
    Ok(Iperf3 {
        program: debian::unpack(cache, "iperf3")?.join("usr/bin/iperf3"),
        lib_dirs: vec![lib("libiperf0")?, lib("libsctp1")?],
    })
}

/// Whether a scenario runs iperf3 (so L1 and L2 carry it).
pub(crate) fn uses_iperf3(s: &Scenario) -> bool {
    s.script.as_deref().is_some_and(|c| c.contains(ROLE_CLIENT))
}

const ROLE_CLIENT: &str = "viridian.role=iperf-client";

/// The guest's side of the benchmark, sourced by `/net.sh` (its helpers `k`, `nic_up`,
/// `reach`, `send_to` and `listen`) for the roles `iperf-client` and `iperf-server`.
pub const L2_BENCH: &str = r#"
# iperf3 to $1 for $SECS s with the options after it; the summary in /tmp/perf, retried while
# the server is not listening yet.
perf() {
  to=$1; shift; i=0
  until timeout $((SECS + 40)) iperf3 -c $to -t $SECS -f m "$@" > /tmp/perf 2>&1 || [ $i -ge 3 ]; do sleep 2; i=$((i+1)); done
  grep -E 'sender|receiver|error' /tmp/perf | sed "s/^/GUEST-IPERF $to $* /"
}
# Interrupts of the NICs so far: VMBus (HYP) or virtio.
irqs() { awk '/HYP:|virtio/ {for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i} END {print s + 0}' /proc/interrupts; }
# The receiver's Mbit/s (the sum over streams comes last).
mbits() { awk '/receiver/ {for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") v = $(i - 1)} END {print v}' /tmp/perf; }
# Datagrams the receiver got per second: (total - lost) / its interval.
pps() { awk '/receiver/ {for (i = 1; i <= NF; i++) {if ($i ~ /^-?[0-9]+\/[0-9]+$/) {split($i, d, "/"); n = d[2] - d[1]} if ($i ~ /^[0-9.]+-[0-9.]+$/) {split($i, t, "-"); s = t[2] - t[1]}}} END {if (s > 0) printf "%d", n / s}' /tmp/perf; }
# Whether measurement $1 is wanted (viridian.runs=, all when empty).
want() { [ -z "$RUNS" ] || case ",$RUNS," in *",$1,"*) true;; *) false;; esac; }
# The CPU's ticks so far: user (with nice), system, idle (with iowait), irq, softirq.
ticks() { awk '/^cpu / {print $2 + $3, $4, $5 + $6, $7, $8}' /proc/stat; }
# One measurement: its key, how to read it (mbits or pps), then iperf3's options; with the
# NIC interrupts and the CPU's ticks (user/system/idle/irq/softirq) during it, and the
# transmit queues' byte limits (BQL) after it.
measure() {
  key=$1; how=$2; shift 2
  want $key || return 0
  t0=$(ticks); x=$(irqs); perf "$@"; k $key=$($how); y=$(irqs); t1=$(ticks)
  k ${key%_pps}_irqs=$((y - x))
  k ${key%_pps}_ticks=$(echo $t0 $t1 | awk '{printf "%d/%d/%d/%d/%d", $6 - $1, $7 - $2, $8 - $3, $9 - $4, $10 - $5}')
  k ${key%_pps}_bql=$(cat /sys/class/net/*/queues/tx-*/byte_queue_limits/limit 2>/dev/null | tr '\n' ,)
}
# The three measurements against $2, keys prefixed $1_.
bench() {
  measure $1_tcp1 mbits $2
  measure $1_tcp4 mbits $2 -P 4
  measure $1_udp_pps pps $2 -u -l 64 -b 0
}
case "$ROLE" in
iperf-client)
  d0=$(nic_up $1); d1=$(nic_up $2)
  k up=$d0,$d1
  k driver=$(basename $(readlink /sys/class/net/$d0/device/driver))
  reach $PEER 60 ping_peer
  reach $HOSTIP 30 ping_host
  bench host $HOSTIP
  bench peer $PEER
  k bench_done
  # The host reads the NICs' counters while both guests still run.
  sleep 5
  echo done | send_to $PEER 5009 30
  ;;
iperf-server)
  d0=$(nic_up $1)
  k up=$d0
  iperf3 -s > /tmp/iperf.log 2>&1 &
  k msg=$(listen 5009)
  ;;
esac
"#;

/// L1's count of how its KVM ended the guests' interrupts (kernel hist triggers, no trace
/// buffer): `kvm_pv_eoi`, an EOI KVM did for a guest that skipped it (KVM's PV EOI, or the VP
/// assist page's lazy EOI), and `kvm_msr` writes of the x2APIC EOI (0x80b) or Hyper-V's EOI MSR
/// (0x40000070), an exit each. Printed as `LAB-EOI`.
///
/// Also every exit of the guests to L1's KVM by vCPU thread and SVM exit code (`kvm_exit`),
/// and the exits KVM passed on to the VMM by `KVM_EXIT_*` reason (`kvm_userspace_exit`),
/// printed as `LAB-EXITS` and `LAB-USER-EXITS` lines (one `{ key: value, ... } hitcount: N`
/// entry each), and L1's system calls by thread and call (`raw_syscalls:sys_enter`, the 40
/// most frequent) as `LAB-SYSCALLS` lines.
const KVM_COUNT_START: &str = "T=/sys/kernel/tracing; [ -e $T/trace ] || mount -t tracefs nodev $T; \
    echo 'hist:keys=vector' > $T/events/kvm/kvm_pv_eoi/trigger; \
    echo 'hist:keys=ecx,write if ecx == 0x80b || ecx == 0x40000070' > $T/events/kvm/kvm_msr/trigger; \
    echo 'hist:keys=common_pid,exit_reason' > $T/events/kvm/kvm_exit/trigger; \
    echo 'hist:keys=reason' > $T/events/kvm/kvm_userspace_exit/trigger; \
    echo 'hist:keys=common_pid.execname,id.syscall:sort=hitcount.descending' > $T/events/raw_syscalls/sys_enter/trigger; ";
const KVM_COUNT_END: &str = "echo \"LAB-EOI pv_eoi=$(sed -n 's/^ *Hits: *//p' $T/events/kvm/kvm_pv_eoi/hist) \
    msr=$(grep '^{' $T/events/kvm/kvm_msr/hist | tr -s ' ' | tr '\\n' ';')\"; \
    grep '^{' $T/events/kvm/kvm_exit/hist | tr -s ' ' | sed 's/^/LAB-EXITS /'; \
    grep '^{' $T/events/kvm/kvm_userspace_exit/hist | tr -s ' ' | sed 's/^/LAB-USER-EXITS /'; \
    grep '^{' $T/events/raw_syscalls/sys_enter/hist | head -40 | tr -s ' ' | sed 's/^/LAB-SYSCALLS /'; \
    echo '!hist:keys=vector' > $T/events/kvm/kvm_pv_eoi/trigger; \
    echo '!hist:keys=ecx,write if ecx == 0x80b || ecx == 0x40000070' > $T/events/kvm/kvm_msr/trigger; \
    echo '!hist:keys=common_pid,exit_reason' > $T/events/kvm/kvm_exit/trigger; \
    echo '!hist:keys=reason' > $T/events/kvm/kvm_userspace_exit/trigger; \
    echo '!hist:keys=common_pid.execname,id.syscall:sort=hitcount.descending' > $T/events/raw_syscalls/sys_enter/trigger; ";

/// The benchmark's measurements: the guest's key (after `a_`) and what it is.
pub const METRICS: &[(&str, &str)] = &[
    ("host_tcp1", "guest to host, TCP 1 stream, Mbit/s"),
    ("host_tcp4", "guest to host, TCP 4 streams, Mbit/s"),
    ("host_udp_pps", "guest to host, UDP 64 B, received pps"),
    ("peer_tcp1", "guest to guest, TCP 1 stream, Mbit/s"),
    ("peer_tcp4", "guest to guest, TCP 4 streams, Mbit/s"),
    ("peer_udp_pps", "guest to guest, UDP 64 B, received pps"),
];

/// What runs the guests of [`iperf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetVmm {
    /// Viridian, the guests' hv_netvsc on netvsp.
    Viridian,
    /// QEMU with virtio-net on a TAP, its data path in QEMU's own thread (vhost=off) or in
    /// the host kernel (vhost=on).
    Qemu { vhost: bool },
}

impl NetVmm {
    /// Short names for tables and scenario names.
    pub fn tag(self) -> &'static str {
        match self {
            NetVmm::Viridian => "viridian",
            NetVmm::Qemu { vhost: false } => "qemu-vhost-off",
            NetVmm::Qemu { vhost: true } => "qemu-vhost-on",
        }
    }
}

/// Two guests with 1 vCPU and 512 MiB each (see the module's documentation): `a` on the
/// Private switch `priv` (10.9.0.10) and the Internal switch `lab` (10.8.0.10, L1 at
/// [`HOST_ADDRESS`] runs `iperf3 -s`), `b` on `priv` (10.9.0.11, `iperf3 -s`). Each iperf3
/// run lasts `seconds`. `runs` names the [`METRICS`] to measure (all when empty). With
/// `profile`, L1 is sampled ([`crate::profile`]) from guest `a`'s first ping of the host to
/// the end of its last iperf3 run.
pub fn iperf(name: &str, vmm: NetVmm, seconds: u32, runs: &[&str], profile: bool) -> Scenario {
    assert!(
        runs.iter().all(|r| METRICS.iter().any(|(m, _)| m == r)),
        "unknown measurement in {runs:?}"
    );
    let runs = if runs.is_empty() {
        String::new()
    } else {
        format!(" viridian.runs={}", runs.join(","))
    };
    let (a0, a1, b0) = (PRIVATE_A[0], PRIVATE_A[1], PRIVATE_B);
    let a = format!("viridian.id=a {ROLE_CLIENT} viridian.ip={a0}=10.9.0.10/24 viridian.ip={a1}=10.8.0.10/24 viridian.peer=10.9.0.11 viridian.hostip={HOST_ADDRESS} viridian.secs={seconds}{runs}");
    let b = format!("viridian.id=b viridian.role=iperf-server viridian.ip={b0}=10.9.0.11/24");
    let (start_a, start_b, counters) = match vmm {
        NetVmm::Viridian => (
            format!("start neta 1 switch=priv,mac={a0} switch=lab,mac={a1} -- {a}"),
            format!("start netb 1 switch=priv,mac={b0} -- {b}"),
            "echo \"LAB-NIC-A $(viridian vm nic list neta --json | tr -d '\\n')\"; \
             echo \"LAB-NIC-B $(viridian vm nic list netb --json | tr -d '\\n')\"; "
                .to_string(),
        ),
        NetVmm::Qemu { vhost } => {
            let v = if vhost { "on" } else { "off" };
            (
                format!("qstart neta 1 {v} priv={a0} lab={a1} -- {a}"),
                format!("qstart netb 1 {v} priv={b0} -- {b}"),
                // The host part is over: QEMU's TAP on the Internal switch can go.
                "ports connected; viridian switch disconnect lab qneta1 >/dev/null && ports disconnected; "
                    .to_string(),
            )
        }
    };
    let (record, report) = if profile {
        (
            format!(
                "await neta a_ping_host 400; {}",
                crate::profile::record(name, None)
            ),
            crate::profile::report(name),
        )
    } else {
        Default::default()
    };
    let script = format!(
        "{prelude}\
         fresh priv lab; viridian switch new priv --type private >/dev/null && viridian switch new lab --type internal --host-address {HOST_ADDRESS}/24 >/dev/null || echo LAB-ERROR no switches; \
         iperf3 -s -B {HOST_ADDRESS} >/tmp/iperf-l1.log 2>&1 & srv=$!; \
         {KVM_COUNT_START}\
         {start_b}; {start_a}; {record}\
         await neta a_bench_done 400 && {{ {counters}}}; {report}\
         {KVM_COUNT_END}\
         wait $neta; ra=$?; reap netb 60; rb=$?; kill $srv; show; \
         fresh priv lab; exit $((ra | rb))",
        prelude = prelude(512, &["neta", "netb"]),
    );
    let mut s = scenario(name, script);
    // Six iperf3 runs, each retried up to 3 times while its server is not answering.
    s.timeout_seconds = 300 + 20 * seconds;
    if vmm != NetVmm::Viridian {
        // So that L1 carries QEMU and its firmware.
        s.vmm = Vmm::QemuPc;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::tests::parses;

    #[test]
    fn scripts_parse() {
        parses(L2_BENCH);
        for vmm in [
            NetVmm::Viridian,
            NetVmm::Qemu { vhost: false },
            NetVmm::Qemu { vhost: true },
        ] {
            let s = iperf("b", vmm, 5, &[], false);
            assert!(!crate::profile::used_by(s.script.as_deref()));
            let p = iperf("b", vmm, 5, &[], true).command();
            parses(&p);
            assert!(p.contains("await neta a_ping_host 400; echo 0"), "{p}");
            assert!(uses_iperf3(&s));
            assert_eq!(s.vmm == Vmm::QemuPc, vmm != NetVmm::Viridian);
            let c = s.command();
            parses(&c);
            assert!(c.contains("viridian.secs=5") && c.contains("iperf3 -s -B 10.8.0.1"));
        }
        let q = iperf("b", NetVmm::Qemu { vhost: true }, 5, &[], false).command();
        assert!(
            q.contains("qstart neta 1 on priv=00:15:5d:4e:00:0a lab=00:15:5d:4e:01:0a --"),
            "{q}"
        );
        assert!(q.contains("switch disconnect lab qneta1"), "{q}");
        let v = iperf("b", NetVmm::Viridian, 5, &[], false).command();
        assert!(v.contains("LAB-NIC-A") && !q.contains("LAB-NIC-A"), "{v}");
        assert!(!uses_iperf3(&crate::network::private("p", 1)));
        assert!(!v.contains("viridian.runs="));
        let u = iperf(
            "b",
            NetVmm::Viridian,
            5,
            &["host_udp_pps", "peer_tcp1"],
            false,
        );
        assert!(u
            .command()
            .contains("viridian.secs=5 viridian.runs=host_udp_pps,peer_tcp1"));
    }

    #[test]
    #[should_panic(expected = "unknown measurement")]
    fn an_unknown_measurement_is_refused() {
        iperf("b", NetVmm::Viridian, 5, &["host_udp"], false);
    }

    /// `viridian.runs=` picks the measurements; each gets its value and interrupt count.
    #[test]
    fn only_the_wanted_measurements_run() {
        let fns: String = L2_BENCH
            .lines()
            .skip_while(|l| !l.starts_with("want()"))
            .take_while(|l| !l.starts_with("case "))
            .collect::<Vec<_>>()
            .join("\n");
        let run = |runs: &str| {
            let stubs = "k() { echo \"a_$*\"; }; perf() { echo \"perf $*\"; c=$((c + 1)); }; \
                         irqs() { echo $((c * 3)); }; mbits() { echo 7; }; pps() { echo 9; }; c=0";
            let o = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{stubs}\n{fns}\nRUNS={runs}\nbench host 10.8.0.1"))
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        };
        let udp = run("host_udp_pps,peer_tcp1");
        let lines: Vec<&str> = udp.lines().collect();
        assert_eq!(
            lines[..3],
            [
                "perf 10.8.0.1 -u -l 64 -b 0",
                "a_host_udp_pps=9",
                "a_host_udp_irqs=3"
            ],
            "{udp}"
        );
        assert_eq!(lines.len(), 5, "{udp}");
        let ticks = lines[3].strip_prefix("a_host_udp_ticks=").expect(&udp);
        let ticks: Vec<i64> = ticks.split('/').map(|t| t.parse().unwrap()).collect();
        assert!(ticks.len() == 5 && ticks.iter().all(|&t| t >= 0), "{udp}");
        assert!(lines[4].starts_with("a_host_udp_bql="), "{udp}");
        let all = run("");
        assert!(
            all.starts_with("perf 10.8.0.1\na_host_tcp1=7\na_host_tcp1_irqs=3\n"),
            "{all}"
        );
        assert_eq!(all.lines().count(), 15, "{all}");
    }

    /// The parsers of iperf3 3.12's summaries, on its real output.
    #[test]
    fn summaries_parse() {
        let dir = tempfile::tempdir().unwrap();
        let tcp4 = "[  5]   0.00-5.00   sec  1.25 MBytes  2.10 Mbits/sec    0             sender\n\
                    [  5]   0.00-5.10   sec  1.12 MBytes  1.85 Mbits/sec                  receiver\n\
                    [SUM]   0.00-5.00   sec  5.00 MBytes  8.39 Mbits/sec    0             sender\n\
                    [SUM]   0.00-5.10   sec  4.75 MBytes  7.81 Mbits/sec                  receiver\n";
        let udp = "[ ID] Interval           Transfer     Bitrate         Jitter    Lost/Total Datagrams\n\
                   [  5]   0.00-5.00   sec   625 KBytes  1.02 Mbits/sec  0.000 ms  0/10000 (0%)  sender\n\
                   [  5]   0.00-4.00   sec   562 KBytes   921 Kbits/sec  0.120 ms  1000/10000 (10%)  receiver\n";
        let run = |out: &str, f: &str| {
            std::fs::write(dir.path().join("perf"), out).unwrap();
            let fns: String = L2_BENCH
                .lines()
                .filter(|l| l.starts_with("mbits()") || l.starts_with("pps()"))
                .collect::<Vec<_>>()
                .join("\n")
                .replace("/tmp/perf", &dir.path().join("perf").display().to_string());
            let o = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{fns}\n{f}"))
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        };
        assert_eq!(run(tcp4, "mbits"), "7.81");
        assert_eq!(run(udp, "pps"), "2250");
    }
}
