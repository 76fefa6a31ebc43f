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
# The three measurements against $2, keys prefixed $1_.
bench() {
  x=$(irqs); perf $2; k $1_tcp1=$(mbits); y=$(irqs); k $1_tcp1_irqs=$((y - x))
  perf $2 -P 4; k $1_tcp4=$(mbits); x=$(irqs); k $1_tcp4_irqs=$((x - y))
  perf $2 -u -l 64 -b 0; k $1_udp_pps=$(pps); y=$(irqs); k $1_udp_irqs=$((y - x))
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
const EOI_COUNT_START: &str = "T=/sys/kernel/tracing; [ -e $T/trace ] || mount -t tracefs nodev $T; \
    echo 'hist:keys=vector' > $T/events/kvm/kvm_pv_eoi/trigger; \
    echo 'hist:keys=ecx,write if ecx == 0x80b || ecx == 0x40000070' > $T/events/kvm/kvm_msr/trigger; ";
const EOI_COUNT_END: &str = "echo \"LAB-EOI pv_eoi=$(sed -n 's/^ *Hits: *//p' $T/events/kvm/kvm_pv_eoi/hist) \
    msr=$(grep '^{' $T/events/kvm/kvm_msr/hist | tr -s ' ' | tr '\\n' ';')\"; \
    echo '!hist:keys=vector' > $T/events/kvm/kvm_pv_eoi/trigger; \
    echo '!hist:keys=ecx,write if ecx == 0x80b || ecx == 0x40000070' > $T/events/kvm/kvm_msr/trigger; ";

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
/// run lasts `seconds`. With `profile`, L1 is sampled ([`crate::profile`]) from guest `a`'s
/// first ping of the host to the end of its last iperf3 run.
pub fn iperf(name: &str, vmm: NetVmm, seconds: u32, profile: bool) -> Scenario {
    let (a0, a1, b0) = (PRIVATE_A[0], PRIVATE_A[1], PRIVATE_B);
    let a = format!("viridian.id=a {ROLE_CLIENT} viridian.ip={a0}=10.9.0.10/24 viridian.ip={a1}=10.8.0.10/24 viridian.peer=10.9.0.11 viridian.hostip={HOST_ADDRESS} viridian.secs={seconds}");
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
         {EOI_COUNT_START}\
         {start_b}; {start_a}; {record}\
         await neta a_bench_done 400 && {{ {counters}}}; {report}\
         {EOI_COUNT_END}\
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
            let s = iperf("b", vmm, 5, false);
            assert!(!crate::profile::used_by(s.script.as_deref()));
            let p = iperf("b", vmm, 5, true).command();
            parses(&p);
            assert!(p.contains("await neta a_ping_host 400; echo 0"), "{p}");
            assert!(uses_iperf3(&s));
            assert_eq!(s.vmm == Vmm::QemuPc, vmm != NetVmm::Viridian);
            let c = s.command();
            parses(&c);
            assert!(c.contains("viridian.secs=5") && c.contains("iperf3 -s -B 10.8.0.1"));
        }
        let q = iperf("b", NetVmm::Qemu { vhost: true }, 5, false).command();
        assert!(
            q.contains("qstart neta 1 on priv=00:15:5d:4e:00:0a lab=00:15:5d:4e:01:0a --"),
            "{q}"
        );
        assert!(q.contains("switch disconnect lab qneta1"), "{q}");
        let v = iperf("b", NetVmm::Viridian, 5, false).command();
        assert!(v.contains("LAB-NIC-A") && !q.contains("LAB-NIC-A"), "{v}");
        assert!(!uses_iperf3(&crate::network::private("p", 1)));
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
