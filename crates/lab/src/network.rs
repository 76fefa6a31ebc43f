//! Network scenarios: Debian guests with their own `hv_netvsc` on Viridian's synthetic NICs,
//! plugged into virtual switches inside L1 (Linux bridges; L1 loads `bridge`, `tun` and
//! `veth`). Each scenario starts several guests at once and plays both sides:
//!
//! - [`private`]: two guests on a Private switch ping each other and move data over TCP
//!   (busybox `nc`, MD5 on both ends); one also has a NIC on an Internal switch and pings L1's
//!   address there (and L1 pings it); the host disconnects and reconnects the other's cable
//!   (`viridian vm nic --disconnect|--connect`) and the guest watches its carrier; the first
//!   then sends from a foreign source MAC (a bridge in the guest with its own address) and
//!   the peer must see nothing of it, while the host's counters show the drops.
//! - [`vlan`]: a guest on VLAN 10 cannot reach one on VLAN 20; a NIC hot-added on VLAN 20
//!   (`viridian vm nic add`) reaches it; the NIC is hot-removed (`viridian vm nic remove`)
//!   and goes away in the guest and on the switch. The guest on VLAN 20 also has a NIC on the
//!   Default Switch (`switch=default` creates it: dnsmasq and nft, from Debian's packages, run
//!   in L1) and gets its address, router and DNS server by DHCP; the router answers its ping
//!   and dnsmasq resolves the guest's own name to that address.
//!
//! Guests print `VIRIDIAN-GUEST ID_key=value` lines (ID is `a`, `b`, `c` or `d`); the host
//! side prints `LAB-NIC-ID <viridian vm nic list --json>`, `LAB-MEASURE-ID <viridian vm
//! measure --json>` and `LAB-PORTS-WHEN <viridian switch list --json>` lines.

use crate::{debian, Cache, Flavor, Result, Scenario, Vmm};
use std::path::PathBuf;

/// The guest scenario (`viridian.scenario=`) of every network scenario.
pub const GUEST: &str = "net";

/// L1 modules the switches, the TAPs and the Default Switch's NAT need (with their
/// dependencies), loaded when a network scenario runs.
pub const L1_MODULES: &[&str] = &[
    "bridge",
    "tun",
    "veth",
    "nf_tables",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
    "vhost_net",
];

/// The Default Switch's helpers for L1, from Debian's packages (their libraries come from this
/// host, where `scripts/setup.sh` installs the same packages): (path in the image, file).
pub(crate) fn l1_tools(cache: &Cache) -> Result<Vec<(String, PathBuf)>> {
    Ok(vec![
        (
            "bin/dnsmasq".into(),
            debian::unpack(cache, "dnsmasq-base")?.join("usr/sbin/dnsmasq"),
        ),
        (
            "bin/nft".into(),
            debian::unpack(cache, "nftables")?.join("usr/sbin/nft"),
        ),
    ])
}

/// L2 modules for the network scenarios: the NIC driver, a bridge to send from a foreign MAC
/// address, and QEMU's virtio-net for the benchmark ([`crate::netbench`]).
pub const L2_MODULES: &[&str] = &["hv_netvsc", "bridge", "virtio_pci", "virtio_net"];

/// What the guest's `/init` runs for `viridian.scenario=net` (as `/net.sh`), after loading
/// every module. Its parameters come from the kernel command line:
/// `viridian.id=` (key prefix), `viridian.role=tx|rx|vlan-c|vlan-d` (or a role of
/// [`crate::netbench::L2_BENCH`], `/bench.sh`), `viridian.ip=MAC=CIDR` (one per NIC, found by
/// MAC), `viridian.peer=`, `viridian.hostip=`, `viridian.mib=` (MiB to send),
/// `viridian.secs=` (seconds per benchmark run), `viridian.runs=` (the benchmark's
/// measurements to make, comma-separated; all when absent) and `viridian.hotmac=` (the MAC
/// of the NIC the host hot-adds).
pub const L2_NET: &str = r#"
ID=x; ROLE=; PEER=; HOSTIP=; MIB=16; SECS=5; RUNS=; NICS=; HOTMAC=; DHCPMAC=
for a in $(cat /proc/cmdline); do
  case "$a" in
    viridian.id=*) ID=${a#*=};;
    viridian.role=*) ROLE=${a#*=};;
    viridian.peer=*) PEER=${a#*=};;
    viridian.hostip=*) HOSTIP=${a#*=};;
    viridian.mib=*) MIB=${a#*=};;
    viridian.secs=*) SECS=${a#*=};;
    viridian.runs=*) RUNS=${a#*=};;
    viridian.hotmac=*) HOTMAC=${a#*=};;
    viridian.dhcp=*) DHCPMAC=${a#*=};;
    viridian.ip=*) NICS="$NICS ${a#viridian.ip=}";;
  esac
done
k() { say "${ID}_$*"; }
now() { cut -d' ' -f1 /proc/uptime; }
# The interface with MAC $1, waiting up to $2 seconds for it.
dev_of() {
  i=0
  while [ $i -le $2 ]; do
    for d in /sys/class/net/*; do
      [ "$(cat $d/address 2>/dev/null)" = "$1" ] && { basename $d; return 0; }
    done
    sleep 1; i=$((i+1))
  done
  return 1
}
# Waits up to $3 seconds until interface $1's carrier is $2.
carrier() {
  i=0
  while [ "$(cat /sys/class/net/$1/carrier 2>/dev/null)" != "$2" ] && [ $i -lt $3 ]; do sleep 1; i=$((i+1)); done
  [ "$(cat /sys/class/net/$1/carrier 2>/dev/null)" = "$2" ]
}
# Brings up the NIC of MAC=CIDR $1 and prints its name (what it says goes to stderr).
nic_up() {
  d=$(dev_of ${1%=*} 60) || { k missing=${1%=*} >&2; return 1; }
  ip addr add ${1##*=} dev $d
  ip link set $d up
  carrier $d 1 30 || k no_carrier=$d >&2
  echo $d
}
# Pings $1 until it answers (up to $2 tries of 2 s), then 3 times; says $3=ok or fail.
reach() {
  i=0; until ping -c 1 -w 2 $1 >/dev/null 2>&1 || [ $i -ge $2 ]; do i=$((i+1)); done
  if ping -c 3 -w 10 $1 > /tmp/ping 2>&1; then
    k $3=ok
    k $3_rtt_ms=$(sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p' /tmp/ping)
  else
    k $3=fail
  fi
}
# Connects to port $2 of $1 (retrying up to $3 s) and sends standard input.
send_to() {
  i=0; until nc $1 $2 || [ $i -ge $3 ]; do sleep 1; i=$((i+1)); done
}
# Listens on port $1 and prints what arrives (stdin stays open, so nc does not hang up first).
listen() { rm -f /tmp/hold$1; mkfifo /tmp/hold$1; nc -l -p $1 <>/tmp/hold$1; }
# Sends $MIB MiB of random data to port 5001 of the peer, timed.
transfer() {
  dd if=/dev/urandom of=/tmp/blob bs=1M count=$MIB 2>/dev/null
  k tx_md5=$(md5sum < /tmp/blob | cut -c1-32)
  t0=$(now)
  send_to $PEER 5001 30 < /tmp/blob && k tx_done=1
  t1=$(now)
  k tx_seconds=$(awk "BEGIN {print $t1 - $t0}")
  rm -f /tmp/blob
}
set -- $NICS
case "$ROLE" in
tx)
  d0=$(nic_up $1); d1=$(nic_up $2)
  k up=$d0,$d1
  k driver=$(basename $(readlink /sys/class/net/$d0/device/driver))
  k mtu=$(cat /sys/class/net/$d0/mtu)
  reach $PEER 60 ping_peer
  reach $HOSTIP 30 ping_host
  transfer
  # The peer says when its cable is back; then send from a foreign MAC through a bridge.
  echo go | send_to $PEER 5003 180
  ip addr del ${1##*=} dev $d0
  brctl addbr br0; brctl addif br0 $d0
  ip link set br0 address 00:15:5d:66:66:66
  ip addr add 10.9.0.99/24 dev br0; ip link set br0 up
  sleep 2
  if ping -c 3 -w 6 $PEER >/dev/null 2>&1; then k spoof_ping=ok; else k spoof_ping=fail; fi
  k spoof_done
  sleep 2
  ip link set br0 down; brctl delif br0 $d0; brctl delbr br0
  ip addr add ${1##*=} dev $d0
  echo done | send_to $PEER 5002 60 && k told_peer=1
  ;;
rx)
  d0=$(nic_up $1)
  k up=$d0
  k rx_md5=$(listen 5001 | md5sum | cut -c1-32)
  # The host pulls the cable and puts it back.
  k carrier_wait
  carrier $d0 0 60 && k carrier_down=1
  carrier $d0 1 60 && k carrier_up=1
  reach $PEER 30 ping_after_carrier
  k go=$(listen 5003)
  k msg=$(listen 5002)
  k saw_spoofer=$(grep -c '^10\.9\.0\.99 ' /proc/net/arp)
  k saw_spoof_mac=$(grep -ci '00:15:5d:66:66:66' /proc/net/arp)
  ;;
vlan-c)
  d0=$(nic_up $1)
  k ready=$d0
  d1=$(dev_of $HOTMAC 120) && k hot_added=$d1
  # Only the first NIC has an address: the peer on VLAN 20 is out of its reach.
  if ping -c 3 -w 6 $PEER >/dev/null 2>&1; then k isolated=0; else k isolated=1; fi
  ip addr del ${1##*=} dev $d0; ip link set $d0 down
  ip addr add ${1##*=} dev $d1; ip link set $d1 up
  carrier $d1 1 30 || k no_carrier=$d1
  reach $PEER 30 same_vlan_ping
  echo done | send_to $PEER 5004 30
  k remove_ready
  i=0; while [ -e /sys/class/net/$d1 ] && [ $i -lt 90 ]; do sleep 1; i=$((i+1)); done
  [ -e /sys/class/net/$d1 ] || k hot_removed=1
  ;;
vlan-d)
  d0=$(nic_up $1)
  k ready=$d0
  listen 5004 > /tmp/msg &
  if [ -n "$DHCPMAC" ]; then
    # The Default Switch: an address, router and DNS server by DHCP (busybox udhcpc, which
    # also sends this guest's name), then the router answers and resolves that name.
    printf '#!/bin/sh\n[ "$1" = bound ] && ip addr add $ip/$mask dev $interface && echo "$ip $router $dns" > /tmp/lease\nexit 0\n' > /tmp/dhcp.sh
    chmod +x /tmp/dhcp.sh
    d1=$(dev_of $DHCPMAC 60)
    ip link set $d1 up; carrier $d1 1 30
    udhcpc -i $d1 -s /tmp/dhcp.sh -q -n -t 5 -T 3 -x hostname:netd > /tmp/udhcpc.log 2>&1 || sed 's/^/GUEST-DHCP /' /tmp/udhcpc.log
    if [ -s /tmp/lease ]; then
      read lip lrouter ldns < /tmp/lease
      k dhcp_ip=$lip; k dhcp_router=$lrouter; k dhcp_dns=$ldns
      reach $lrouter 10 dhcp_ping_router
      k dns_self=$(nslookup netd $ldns 2>/dev/null | awk '/^Address: / {print $2}' | tail -n 1)
    fi
  fi
  wait
  k msg=$(cat /tmp/msg)
  ;;
iperf-*) . /bench.sh ;;
esac
"#;

pub(crate) const PRIVATE_A: [&str; 2] = ["00:15:5d:4e:00:0a", "00:15:5d:4e:01:0a"];
pub(crate) const PRIVATE_B: &str = "00:15:5d:4e:00:0b";
const VLAN_C: [&str; 2] = ["00:15:5d:4e:00:0c", "00:15:5d:4e:01:0c"];
const VLAN_D: [&str; 2] = ["00:15:5d:4e:00:0d", "00:15:5d:4e:01:0d"];
/// L1's address on the Internal switch.
pub const HOST_ADDRESS: &str = "10.8.0.1";

/// How often (seconds) `await` prints a `LAB-WAIT` line with the awaited guest's NIC state
/// while it waits: the guests' consoles go to files, and without these lines a long wait (a
/// slow or stalled transfer) would look to the lab like a hung L1 (`L1_SILENCE`), which is
/// killed before the scenario's own time-out can print its `LAB-TIMEOUT-NIC` lines.
const WAIT_REPORT: u32 = 60;

/// The L1 side's shell helpers: `start NAME CPUS NICS... -- CMDLINE` starts a guest in the
/// background (serial console in /tmp/NAME.log, its pid in $NAME); `qstart NAME CPUS
/// VHOST(on|off) SWITCH=MAC... -- CMDLINE` starts it under QEMU instead, each NIC a
/// virtio-net device on a TAP (`qNAMEi`) that `viridian switch connect` makes an untagged
/// port of the switch; `fresh SWITCH...` removes switches a scenario that ran out of time left
/// behind; `await NAME TEXT SECS` waits until the guest printed TEXT (or its VMM exited),
/// with a `LAB-WAIT` line every [`WAIT_REPORT`] s;
/// `reap NAME SECS` gives a guest SECS to finish, then stops it, and returns its VMM's exit
/// status; `show` prints every guest's console with its name in front (at the end, so the
/// consoles of guests running together do not interleave), also when the scenario's time
/// runs out.
pub(crate) fn prelude(memory_mib: u64, guests: &[&str]) -> String {
    let names = guests.join(" ");
    format!(
        "export VIRIDIAN_STATE_DIR=/tmp/vs; \
         start() {{ n=$1; cpus=$2; shift 2; nics=; while [ \"$1\" != -- ]; do nics=\"$nics --nic $1\"; shift; done; shift; rm -f /tmp/$n.log; \
           viridian run --name $n --serial /tmp/$n.log --kernel /l2/vmlinuz-cloud --initrd /l2/initrd.cpio --cpus $cpus --memory {memory_mib}M $nics \
           --cmdline \"console=ttyS0 panic=-1 quiet viridian.scenario=net $*\" >/dev/null 2>/tmp/$n.err & eval $n=$!; }}; \
         qstart() {{ n=$1; cpus=$2; vhost=$3; shift 3; nets=; taps=; j=0; \
           while [ \"$1\" != -- ]; do t=q$n$j; taps=\"$taps ${{1%%=*}}=$t\"; \
             nets=\"$nets -netdev tap,id=n$j,ifname=$t,script=no,downscript=no,vhost=$vhost -device virtio-net-pci,netdev=n$j,mac=${{1#*=}},romfile=\"; j=$((j+1)); shift; done; shift; rm -f /tmp/$n.log; \
           qemu-system-x86_64 -L /usr/share/qemu -enable-kvm -cpu host -M pc -m {memory_mib} -smp $cpus -name $n,debug-threads=on -nodefaults -no-user-config -display none \
           -serial file:/tmp/$n.log -no-reboot -kernel /l2/vmlinuz-cloud -initrd /l2/initrd.cpio -append \"console=ttyS0 panic=-1 quiet viridian.scenario=net $*\" \
           $nets >/dev/null 2>/tmp/$n.err & eval $n=$!; \
           for p in $taps; do t=${{p#*=}}; i=0; while [ ! -e /sys/class/net/$t ] && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done; \
             viridian switch connect ${{p%%=*}} $t >/dev/null || echo LAB-ERROR switch connect $t failed; done; }}; \
         faulted() {{ grep -qs '{TRIPLE_FAULT}' {errs} && {{ kill {names_pids} 2>/dev/null; true; }}; }}; \
         await() {{ i=0; until grep -q \"$2\" /tmp/$1.log 2>/dev/null || ! kill -0 $(eval echo \\$$1) 2>/dev/null || faulted || [ $i -ge $3 ]; do sleep 1; i=$((i+1)); \
           [ $((i % {WAIT_REPORT})) = 0 ] && echo \"LAB-WAIT $1 $2 ${{i}}s $(viridian vm nic list $1 --json 2>&1 | tr -d '\\n')\"; done; grep -q \"$2\" /tmp/$1.log 2>/dev/null; }}; \
         reap() {{ p=$(eval echo \\$$1); i=0; while kill -0 $p 2>/dev/null && [ $i -lt $2 ]; do sleep 1; i=$((i+1)); done; kill $p 2>/dev/null; wait $p; }}; \
         show() {{ for n in {names}; do sed \"s/^/[$n] /\" /tmp/$n.log 2>/dev/null; sed \"s/^/[$n] viridian: /\" /tmp/$n.err 2>/dev/null; done; }}; \
         fresh() {{ for s in \"$@\"; do viridian switch remove $s --force >/dev/null 2>&1; done; }}; \
         ports() {{ echo \"LAB-PORTS-$1 $(viridian switch list --json | tr -d '\\n')\"; }}; \
         trap 'for n in {names}; do p=$(eval echo \\$$n); if kill -0 $p 2>/dev/null; then echo \"LAB-TIMEOUT-NIC $n $(viridian vm nic list $n --json 2>&1 | tr -d \"\\n\")\"; else wait $p; echo \"LAB-EXIT $n rc=$?\"; fi; done; \
           dmesg | grep -i -E \"oom|killed process|segfault|traps:|general protection|kvm\" | tail -n 20 | sed \"s/^/LAB-DMESG /\"; kill {names_pids} 2>/dev/null; sleep 2; show; exit 124' TERM; ",
        names_pids = guests
            .iter()
            .map(|g| format!("${g}"))
            .collect::<Vec<_>>()
            .join(" "),
        errs = guests
            .iter()
            .map(|g| format!("/tmp/{g}.err"))
            .collect::<Vec<_>>()
            .join(" "),
        TRIPLE_FAULT = crate::TRIPLE_FAULT,
    )
}

/// How often L1 may run a network scenario (see [`Scenario::tries`]): each makes its own
/// switches and guests, and a guest that triple-faults ends its waits at once (`faulted`).
pub(crate) const TRIES: u32 = 3;

pub(crate) fn scenario(name: &str, script: String) -> Scenario {
    Scenario {
        script: Some(script),
        tries: TRIES,
        ..Scenario::new(name, Vmm::Viridian, Flavor::Cloud, 1, GUEST)
    }
}

/// Two guests on a Private switch (`a` sends `mib` MiB to `b`, which has 2 vCPUs and so a
/// vRSS subchannel and a two-queue TAP), `a` also on an Internal switch with L1 at
/// [`HOST_ADDRESS`]; the cable test on `b`, the spoofing test from `a`.
pub fn private(name: &str, mib: u32) -> Scenario {
    let (a0, a1, b0) = (PRIVATE_A[0], PRIVATE_A[1], PRIVATE_B);
    let script = format!(
        "{prelude}\
         fresh priv lab; viridian switch new priv --type private && viridian switch new lab --type internal --host-address {HOST_ADDRESS}/24 || echo LAB-ERROR no switches; \
         start neta 1 switch=priv,mac={a0} switch=lab,mac={a1} -- viridian.id=a viridian.role=tx viridian.ip={a0}=10.9.0.10/24 viridian.ip={a1}=10.8.0.10/24 viridian.peer=10.9.0.11 viridian.hostip={HOST_ADDRESS} viridian.mib={mib}; \
         start netb 2 switch=priv,mac={b0} -- viridian.id=b viridian.role=rx viridian.ip={b0}=10.9.0.11/24 viridian.peer=10.9.0.10; \
         await neta a_up= 120 && ports running; \
         await neta a_ping_host= 120 && {{ ping -c 3 -w 10 10.8.0.10 >/dev/null 2>&1 && echo VIRIDIAN-GUEST host_ping_a=ok || echo VIRIDIAN-GUEST host_ping_a=fail; }}; \
         await netb b_carrier_wait 400 && {{ echo \"LAB-MEASURE-B $(viridian vm measure netb --json | tr -d '\\n')\"; viridian vm nic netb --disconnect; }}; \
         kill -0 $netb 2>/dev/null || kill $neta 2>/dev/null; \
         await netb b_carrier_down 60; echo \"LAB-NIC-B-DOWN $(viridian vm nic list netb --json)\"; viridian vm nic netb --connect; \
         await neta a_spoof_done 180 && {{ echo \"LAB-NIC-A $(viridian vm nic list neta --json)\"; viridian vm status neta; }}; \
         wait $neta; ra=$?; wait $netb; rb=$?; echo \"LAB-EXIT neta rc=$ra netb rc=$rb\"; show; ports after; \
         viridian switch remove priv; viridian switch remove lab; exit $((ra | rb))",
        prelude = prelude(512, &["neta", "netb"]),
    );
    // The 100 MiB transfer took 100 to 200 s on a loaded 2-core host; room for slower.
    Scenario {
        timeout_seconds: 450,
        ..scenario(name, script)
    }
}

/// A guest on VLAN 10 and one on VLAN 20 of a Private switch; a NIC hot-added to the first on
/// VLAN 20, then hot-removed. Without `vlan_filtering` (L1's bridge cannot filter) every NIC is
/// untagged and the guests reach each other (`c_isolated=0`). The second guest also has a NIC
/// on the Default Switch (made by its `--nic switch=default`), configured by DHCP.
pub fn vlan(name: &str, vlan_filtering: bool) -> Scenario {
    let (c0, c1, d0, d1) = (VLAN_C[0], VLAN_C[1], VLAN_D[0], VLAN_D[1]);
    let (v10, v20, hot_vlan) = match vlan_filtering {
        true => (",vlan=10", ",vlan=20", " --vlan 20"),
        false => ("", "", ""),
    };
    let script = format!(
        "{prelude}\
         fresh vl default; viridian switch new vl --type private || echo LAB-ERROR no switch; \
         grep -q '^nobody:' /etc/passwd 2>/dev/null || echo 'nobody:x:65534:65534:nobody:/:/bin/false' >> /etc/passwd; \
         grep -q '^nogroup:' /etc/group 2>/dev/null || printf 'nogroup:x:65534:\\ndip:x:30:\\n' >> /etc/group; \
         start netc 1 switch=vl,mac={c0}{v10} -- viridian.id=c viridian.role=vlan-c viridian.ip={c0}=10.10.0.12/24 viridian.peer=10.10.0.13 viridian.hotmac={c1}; \
         start netd 1 switch=vl,mac={d0}{v20} switch=default,mac={d1} -- viridian.id=d viridian.role=vlan-d viridian.ip={d0}=10.10.0.13/24 viridian.dhcp={d1}; \
         await netc c_ready= 120 && await netd d_ready= 120 && viridian vm nic add netc --switch vl --mac {c1}{hot_vlan}; \
         ports added; echo \"LAB-NIC-C $(viridian vm nic list netc --json)\"; \
         await netc c_remove_ready 120 && viridian vm nic remove netc --mac {c1}; \
         ports removed; \
         wait $netc; rc=$?; wait $netd; rd=$?; show; ports after; \
         echo \"LAB-LEASES $(tr '\\n' ';' < $VIRIDIAN_STATE_DIR/switches/default.leases)\"; \
         viridian switch remove vl; viridian switch remove default; exit $((rc | rd))",
        prelude = prelude(384, &["netc", "netd"]),
    );
    scenario(name, script)
}

impl crate::Lab {
    /// Whether L1's kernel can filter bridge traffic by VLAN (CONFIG_BRIDGE_VLAN_FILTERING).
    pub fn bridge_vlan_filtering(&self) -> bool {
        self.l1_kernel
            .config("CONFIG_BRIDGE_VLAN_FILTERING")
            .as_deref()
            == Some("y")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `sh -n`: the scripts parse (busybox's ash runs them in the lab).
    pub(crate) fn parses(script: &str) {
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{script}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn scripts_parse() {
        parses(L2_NET);
        for s in [private("p", 100), vlan("v", true), vlan("v", false)] {
            let script = s.command();
            parses(&script);
            assert!(script.contains("viridian.scenario=net"), "{script}");
        }
        let v = vlan("v", true).command();
        assert!(v.contains(",vlan=10") && v.contains("--vlan 20"), "{v}");
        let untagged = vlan("v", false).command();
        assert!(
            !untagged.contains("vlan=") && !untagged.contains("--vlan"),
            "{untagged}"
        );
        assert!(private("p", 7).command().contains("viridian.mib=7"));
    }

    /// A guest that takes minutes to print what the host waits for: `await` reports each
    /// minute with its NIC state, so L1 never looks hung (silent) while its script is alive.
    #[test]
    fn a_long_wait_is_reported_each_minute() {
        use std::os::unix::fs::PermissionsExt;
        let fake = tempfile::tempdir().unwrap();
        for (name, body) in [
            ("viridian", "echo '[{\"rx\": 7}'; echo ']'"),
            ("sleep", "exit 0"),
        ] {
            let bin = fake.path().join(name);
            std::fs::write(&bin, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let guest = format!("unitwait{}", std::process::id());
        let script = format!(
            "{}{guest}=$$; await {guest} never 130 || echo gave-up",
            prelude(64, &[&guest])
        );
        let path = format!(
            "{}:{}",
            fake.path().display(),
            std::env::var("PATH").unwrap()
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .env("PATH", path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let waits: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("LAB-WAIT"))
            .collect();
        assert_eq!(
            waits,
            [
                format!("LAB-WAIT {guest} never 60s [{{\"rx\": 7}}]"),
                format!("LAB-WAIT {guest} never 120s [{{\"rx\": 7}}]"),
            ],
            "{stdout}"
        );
        assert!(stdout.ends_with("gave-up\n"), "{stdout}");
    }

    /// When one guest of a scenario triple-faults, waiting on the other ends at once and the
    /// other is stopped: the scenario finishes in seconds and L1 can run it again
    /// (`Scenario::tries`), instead of waiting out its time limit for a peer that is gone.
    #[test]
    fn a_triple_fault_ends_the_wait_for_the_other_guest() {
        let id = std::process::id();
        let (dead, alive) = (format!("unitdead{id}"), format!("unitalive{id}"));
        let err = format!("/tmp/{dead}.err");
        std::fs::write(&err, format!("viridian: vCPU 0 {}.\n", crate::TRIPLE_FAULT)).unwrap();
        let script = format!(
            "{}sleep 600 >/dev/null 2>&1 & {alive}=$!; true & {dead}=$!; wait ${dead}; \
             await {alive} never 600 || echo gave-up; \
             wait ${alive}; echo stopped $?",
            prelude(64, &[&dead, &alive])
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&err);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // 143: the sleeping guest got the TERM (a guest left running would exit 0 after 600 s).
        assert!(stdout.ends_with("gave-up\nstopped 143\n"), "{stdout}");
    }
}
