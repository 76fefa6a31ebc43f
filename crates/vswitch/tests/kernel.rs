//! Switches in the real kernel, each test in a fresh network namespace of its own (the host's
//! interfaces and routes are never touched), with the state read back over netlink.

use std::net::IpAddr;
use std::path::Path;
use vswitch::testing::{in_netns, Net, VlanEntry};
use vswitch::{Error, PortSettings, SwitchDef, SwitchKind, Vlan};

fn def(name: &str, kind: SwitchKind) -> SwitchDef {
    SwitchDef {
        name: name.into(),
        kind,
        adapter: None,
        host_address: None,
    }
}

/// Whether the bridges of the switches in `dir` filter by VLAN, as the kernel reports them
/// (build.rs only decides which tests are marked ignored).
fn filtering(dir: &Path) -> bool {
    let list = vswitch::list(dir).unwrap();
    assert!(!list.is_empty());
    list.iter().all(|s| s.vlan_filtering)
}

/// The VLAN entries of an untagged port: VLAN 1 as PVID, untagged; none without filtering.
fn untagged_port(dir: &Path) -> Vec<VlanEntry> {
    if filtering(dir) {
        vec![VlanEntry::access(1)]
    } else {
        vec![]
    }
}

fn port(vlan: Vlan) -> PortSettings {
    PortSettings { vlan }
}

fn cidrs(list: &[&str]) -> Vec<vswitch::Cidr> {
    list.iter().map(|c| c.parse().unwrap()).collect()
}

fn tagged(vids: std::ops::RangeInclusive<u16>) -> impl Iterator<Item = VlanEntry> {
    vids.map(|vid| VlanEntry {
        vid,
        pvid: false,
        untagged: false,
    })
}

#[test]
fn private_switch_keeps_the_host_off_and_ports_in_their_vlans() {
    in_netns(|| {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let net = Net::open();
        vswitch::create(dir, def("p1", SwitchKind::Private)).unwrap();
        let br = net.link("vs-p1").expect("bridge made");
        assert!(br.is_bridge && br.up);
        assert_eq!(br.vlans, vec![], "the bridge itself is in no VLAN");
        assert_eq!(br.addresses, vec![]);
        assert_eq!(br.link_local, vec![], "no IPv6 link-local address either");

        net.add_port("tap0");
        net.add_port("tap1");
        vswitch::attach(dir, "p1", "tap0", PortSettings::default()).unwrap();
        vswitch::attach(dir, "p1", "tap1", PortSettings::default()).unwrap();
        let t0 = net.link("tap0").unwrap();
        assert_eq!(t0.master.as_deref(), Some("vs-p1"));
        assert!(t0.up);
        assert_eq!(t0.vlans, untagged_port(dir));
        assert_eq!(net.link("tap1").unwrap().vlans, untagged_port(dir));

        vswitch::detach(dir, "p1", "tap0").unwrap();
        assert_eq!(net.link("tap0").unwrap().master, None);
        // Detaching an interface that is gone is fine; one on no switch is not.
        vswitch::detach(dir, "p1", "gone0").unwrap();
        let err = vswitch::detach(dir, "p1", "tap0").unwrap_err();
        assert!(matches!(err, Error::NotAPort { .. }), "{err}");

        let list = vswitch::list(dir).unwrap();
        assert_eq!(list.len(), 1);
        assert!(list[0].present);
        assert_eq!(list[0].ports, ["tap1"]);

        let err = vswitch::remove(dir, "p1", false).unwrap_err();
        assert!(err.to_string().contains("tap1"), "{err}");
        assert!(
            net.link("vs-p1").is_some(),
            "refused removal leaves the switch"
        );
        vswitch::remove(dir, "p1", true).unwrap();
        assert!(net.link("vs-p1").is_none());
        let tap1 = net
            .link("tap1")
            .expect("a forced removal leaves the port interface");
        assert_eq!(tap1.master, None);
        assert!(!dir.join("switches/p1.json").exists());
    });
}

#[test]
fn internal_switch_gives_the_host_an_address_in_the_untagged_vlan() {
    in_netns(|| {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let net = Net::open();
        let mut d = def("lab", SwitchKind::Internal);
        d.host_address = Some("198.51.100.1/24".parse().unwrap());
        vswitch::create(dir, d.clone()).unwrap();
        let br = net.link("vs-lab").unwrap();
        assert_eq!(br.addresses, cidrs(&["198.51.100.1/24"]));
        assert_eq!(
            br.mac.unwrap()[..3],
            vswitch::HYPERV_OUI,
            "a stable MAC in Hyper-V's range"
        );
        assert_eq!(
            br.vlans,
            untagged_port(dir),
            "the host is in the untagged VLAN"
        );
        let saved: SwitchDef =
            serde_json::from_slice(&std::fs::read(dir.join("switches/lab.json")).unwrap()).unwrap();
        assert_eq!(saved, d);

        net.add_port("tap0");
        vswitch::attach(dir, "lab", "tap0", port(Vlan::Untagged)).unwrap();
        assert_eq!(net.link("tap0").unwrap().vlans, untagged_port(dir));
        // The host reaches a guest on the switch through the bridge.
        net.add_port("tap1");
        vswitch::attach(dir, "lab", "tap1", port(Vlan::Untagged)).unwrap();
        assert!(guest::host_reaches(&net, "tap1p", "198.51.100.2/24"));
        // A VM interface may not join a second switch while on the first.
        vswitch::create(dir, def("other", SwitchKind::Private)).unwrap();
        let err = vswitch::attach(dir, "other", "tap0", PortSettings::default()).unwrap_err();
        assert!(
            err.to_string().contains("already a port of vs-lab"),
            "{err}"
        );
    });
}

#[test]
#[cfg_attr(
    no_bridge_vlan,
    ignore = "this kernel's bridge has no VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)"
)]
fn ports_get_access_and_trunk_vlans() {
    in_netns(|| {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let net = Net::open();
        vswitch::create(dir, def("v", SwitchKind::Private)).unwrap();
        let status = &vswitch::list(dir).unwrap()[0];
        assert!(status.vlan_filtering);
        net.add_port("tap0");
        net.add_port("tap1");
        vswitch::attach(dir, "v", "tap0", port(Vlan::Access(10))).unwrap();
        assert_eq!(net.link("tap0").unwrap().vlans, vec![VlanEntry::access(10)]);
        let trunk = Vlan::Trunk {
            allowed: vec![20, 30, 31, 32],
            native: Some(10),
        };
        vswitch::attach(dir, "v", "tap1", port(trunk)).unwrap();
        let want: Vec<_> = [VlanEntry::access(10), VlanEntry::tagged(20)]
            .into_iter()
            .chain(tagged(30..=32))
            .collect();
        assert_eq!(net.link("tap1").unwrap().vlans, want);
        // Attaching again with other settings replaces them exactly.
        vswitch::attach(dir, "v", "tap1", port(Vlan::Access(7))).unwrap();
        assert_eq!(net.link("tap1").unwrap().vlans, vec![VlanEntry::access(7)]);
        let trunk = Vlan::Trunk {
            allowed: vec![5],
            native: None,
        };
        vswitch::attach(dir, "v", "tap0", port(trunk)).unwrap();
        assert_eq!(net.link("tap0").unwrap().vlans, vec![VlanEntry::tagged(5)]);
        // The bridge itself stays in no VLAN.
        assert_eq!(net.link("vs-v").unwrap().vlans, vec![]);
    });
}

#[test]
#[cfg_attr(
    no_bridge_vlan,
    ignore = "this kernel's bridge has no VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)"
)]
fn access_vlans_carry_traffic_within_a_vlan_only() {
    in_netns(|| {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let net = Net::open();
        vswitch::create(dir, def("v", SwitchKind::Private)).unwrap();
        for (a, b, va, vb, reaches) in [("a0", "b0", 10, 10, true), ("a1", "b1", 10, 20, false)] {
            net.add_port(a);
            net.add_port(b);
            vswitch::attach(dir, "v", a, port(Vlan::Access(va))).unwrap();
            vswitch::attach(dir, "v", b, port(Vlan::Access(vb))).unwrap();
            // The guests are the far ends of the veth pairs, each in a namespace of its own.
            let (ga, gb): (&'static str, &'static str) = match a {
                "a0" => ("a0p", "b0p"),
                _ => ("a1p", "b1p"),
            };
            assert_eq!(
                guest::udp_reaches(&net, ga, gb),
                reaches,
                "VLAN {va} to VLAN {vb}"
            );
            // The guests' namespaces are going away, and with them both veth pairs (the kernel
            // does that in the background); detaching one that is gone, or going, is fine.
            vswitch::detach(dir, "v", a).unwrap();
        }
        // The private bridge itself is in no VLAN: even given an address by hand, the host
        // cannot reach a guest on the switch.
        net.add_address("vs-v", "192.0.2.9/24");
        net.add_port("c0");
        vswitch::attach(dir, "v", "c0", PortSettings::default()).unwrap();
        assert!(!guest::host_reaches(&net, "c0p", "192.0.2.2/24"));
    });
}

#[test]
#[cfg_attr(not(no_bridge_vlan), ignore = "this kernel's bridge filters by VLAN")]
fn without_vlan_filtering_only_untagged_ports_attach() {
    in_netns(|| {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let net = Net::open();
        vswitch::create(dir, def("v", SwitchKind::Internal)).unwrap();
        assert!(!vswitch::list(dir).unwrap()[0].vlan_filtering);
        net.add_port("tap0");
        let err = vswitch::attach(dir, "v", "tap0", port(Vlan::Access(10))).unwrap_err();
        assert!(
            err.to_string().contains("CONFIG_BRIDGE_VLAN_FILTERING"),
            "{err}"
        );
        assert_eq!(
            net.link("tap0").unwrap().master,
            None,
            "a refused port is not attached"
        );
        vswitch::attach(dir, "v", "tap0", PortSettings::default()).unwrap();
        assert_eq!(net.link("tap0").unwrap().master.as_deref(), Some("vs-v"));
    });
}

/// A stand-in physical adapter with the host's configuration: IPv4 and IPv6 addresses and
/// default routes.
fn uplink(net: &Net, name: &str) {
    net.add_port(name);
    net.add_address(name, "203.0.113.5/24");
    net.add_address(name, "2001:db8::5/64");
    net.add_default_route(name, "203.0.113.1".parse().unwrap(), 100);
    net.add_default_route(name, "2001:db8::1".parse().unwrap(), 1024);
}

fn check_uplink_on(net: &Net, name: &str) {
    let l = net.link(name).unwrap();
    assert_eq!(
        l.addresses,
        cidrs(&["203.0.113.5/24", "2001:db8::5/64"]),
        "{name}"
    );
    let routes = net.gateway_routes(name);
    let gateways: Vec<IpAddr> = routes.iter().map(|r| r.gateway).collect();
    assert_eq!(
        gateways,
        [
            "203.0.113.1".parse::<IpAddr>().unwrap(),
            "2001:db8::1".parse().unwrap()
        ],
        "{routes:?}"
    );
    assert!(routes
        .iter()
        .all(|r| r.destination.is_none() || r.destination.unwrap().prefix() == 0));
    assert_eq!(routes[0].metric, Some(100));
}

#[test]
fn external_switch_moves_the_hosts_addresses_and_routes_and_gives_them_back() {
    in_netns(|| {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let net = Net::open();
        uplink(&net, "phys0");
        check_uplink_on(&net, "phys0");
        let mac = net.link("phys0").unwrap().mac;
        let mut d = def("ext", SwitchKind::External);
        d.adapter = Some("phys0".into());
        vswitch::create(dir, d.clone()).unwrap();

        let br = net.link("vs-ext").unwrap();
        check_uplink_on(&net, "vs-ext");
        assert_eq!(br.mac, mac, "the bridge takes the adapter's MAC address");
        assert_eq!(br.vlans, untagged_port(dir));
        let phys = net.link("phys0").unwrap();
        assert_eq!(phys.master.as_deref(), Some("vs-ext"));
        assert_eq!(phys.addresses, vec![]);
        assert_eq!(net.gateway_routes("phys0"), vec![]);
        if filtering(dir) {
            let trunk: Vec<_> = std::iter::once(VlanEntry::access(1))
                .chain(tagged(2..=4094))
                .collect();
            assert_eq!(phys.vlans, trunk, "the adapter is a trunk");
        } else {
            assert_eq!(phys.vlans, vec![]);
        }

        // Applying again changes nothing.
        let before = comparable(&net, &["vs-ext", "phys0"]);
        for a in vswitch::apply(dir).unwrap() {
            a.result.unwrap();
        }
        let after = comparable(&net, &["vs-ext", "phys0"]);
        for (now, then) in after.iter().zip(&before) {
            assert!(
                now == then,
                "now {} {:?}\nbefore {} {:?}",
                brief(&now.0),
                now.1,
                brief(&then.0),
                then.1
            );
        }

        // The adapter cannot serve a second switch, nor be attached as a VM port.
        let mut d2 = def("ext2", SwitchKind::External);
        d2.adapter = Some("phys0".into());
        let err = vswitch::create(dir, d2).unwrap_err();
        assert!(err.to_string().contains("phys0"), "{err}");
        assert!(net.link("vs-ext2").is_none());
        vswitch::create(dir, def("p", SwitchKind::Private)).unwrap();
        let err = vswitch::attach(dir, "p", "phys0", PortSettings::default()).unwrap_err();
        assert!(
            err.to_string().contains("adapter of switch \"ext\""),
            "{err}"
        );

        vswitch::remove(dir, "ext", false).unwrap();
        assert!(net.link("vs-ext").is_none());
        check_uplink_on(&net, "phys0");
        let phys = net.link("phys0").unwrap();
        assert_eq!(phys.master, None);
        assert!(phys.up);
    });
}

/// The links' states and their gateway routes, for comparing before and after an apply:
/// without interface indexes (a re-created bridge has a new one) and IPv6 link-local
/// addresses (the kernel adds them on its own once a bridge has carrier; when is not ours).
fn comparable(
    net: &Net,
    names: &[&str],
) -> Vec<(
    Option<vswitch::testing::LinkState>,
    Vec<vswitch::testing::RouteState>,
)> {
    names
        .iter()
        .map(|n| {
            let link = net.link(n).map(|mut l| {
                l.index = 0;
                l.link_local.clear();
                l
            });
            let routes = if link.is_some() {
                net.gateway_routes(n)
            } else {
                vec![]
            };
            (link, routes)
        })
        .collect()
}

/// A link's state for a failure message, with at most the first few of its VLAN entries.
fn brief(l: &Option<vswitch::testing::LinkState>) -> String {
    match l {
        None => "absent".into(),
        Some(l) => {
            let mut short = l.clone();
            short.vlans.truncate(3);
            format!("{short:?} ({} VLAN entries)", l.vlans.len())
        }
    }
}

#[test]
fn apply_recreates_every_switch_after_a_reboot_without_duplicates() {
    in_netns(|| {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let net = Net::open();
        uplink(&net, "phys0");
        let mut ext = def("ext", SwitchKind::External);
        ext.adapter = Some("phys0".into());
        let mut lab = def("lab", SwitchKind::Internal);
        lab.host_address = Some("198.51.100.1/24".parse().unwrap());
        for d in [ext, lab, def("iso", SwitchKind::Private)] {
            vswitch::create(dir, d).unwrap();
        }
        let snapshot = || comparable(&net, &["vs-ext", "vs-lab", "vs-iso", "phys0"]);
        let before = snapshot();

        // A reboot: the bridges are gone, the adapter comes back with the host's settings.
        for b in ["vs-ext", "vs-lab", "vs-iso"] {
            net.delete(b);
        }
        net.up("phys0");
        net.add_address("phys0", "203.0.113.5/24");
        net.add_address("phys0", "2001:db8::5/64");
        net.add_default_route("phys0", "203.0.113.1".parse().unwrap(), 100);
        net.add_default_route("phys0", "2001:db8::1".parse().unwrap(), 1024);

        for _ in 0..2 {
            let applied = vswitch::apply(dir).unwrap();
            let names: Vec<_> = applied.iter().map(|a| a.name.as_str()).collect();
            assert_eq!(names, ["ext", "iso", "lab"]);
            for a in applied {
                a.result.unwrap();
            }
            for (now, then) in snapshot().iter().zip(&before) {
                assert!(
                    now == then,
                    "now {} {:?}\nbefore {} {:?}",
                    brief(&now.0),
                    now.1,
                    brief(&then.0),
                    then.1
                );
            }
            check_uplink_on(&net, "vs-ext");
        }
    });
}

#[test]
fn bad_input_is_refused_naming_what_is_wrong() {
    in_netns(|| {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path();
        let net = Net::open();
        let msg = |r: vswitch::Result<SwitchDef>| r.unwrap_err().to_string();

        assert!(msg(vswitch::create(
            dir,
            def("much-too-long", SwitchKind::Private)
        ))
        .contains("switch name"));
        let mut ext = def("ext", SwitchKind::External);
        ext.adapter = Some("nosuch0".into());
        assert_eq!(
            msg(vswitch::create(dir, ext.clone())),
            "no network adapter named \"nosuch0\""
        );
        ext.adapter = None;
        assert!(msg(vswitch::create(dir, ext)).contains("adapter"));
        let mut p = def("p", SwitchKind::Private);
        p.host_address = Some("198.51.100.1/24".parse().unwrap());
        assert!(msg(vswitch::create(dir, p)).contains("host address"));
        assert!(
            msg(vswitch::create(dir, def("default", SwitchKind::Internal)))
                .contains("Default Switch")
        );

        vswitch::create(dir, def("dup", SwitchKind::Private)).unwrap();
        assert_eq!(
            msg(vswitch::create(dir, def("dup", SwitchKind::Internal))),
            "switch \"dup\" already exists"
        );

        net.add_port("vs-taken");
        assert!(msg(vswitch::create(dir, def("taken", SwitchKind::Private)))
            .contains("vs-taken already exists"));
        assert!(!dir.join("switches/taken.json").exists());

        // An adapter that is a port of some other bridge is refused, and nothing is left over.
        net.add_bridge("br9");
        net.add_port("phys1");
        net.enslave("phys1", "br9");
        let mut ext = def("ext", SwitchKind::External);
        ext.adapter = Some("phys1".into());
        assert!(msg(vswitch::create(dir, ext)).contains("already a port of br9"));
        assert!(net.link("vs-ext").is_none());
        assert!(!dir.join("switches/ext.json").exists());

        let err = vswitch::attach(dir, "nosuch", "lo", PortSettings::default()).unwrap_err();
        assert_eq!(err.to_string(), "no switch named \"nosuch\"");
        let err = vswitch::attach(dir, "dup", "tap9", PortSettings::default()).unwrap_err();
        assert_eq!(err.to_string(), "no interface named \"tap9\"");
        net.add_port("tap0");
        let err = vswitch::attach(dir, "dup", "tap0", port(Vlan::Access(4095))).unwrap_err();
        assert!(err.to_string().contains("VLAN"), "{err}");
        assert_eq!(net.link("tap0").unwrap().master, None);
        let err = vswitch::remove(dir, "nosuch", false).unwrap_err();
        assert_eq!(err.to_string(), "no switch named \"nosuch\"");
    });
}

/// The Default Switch: NAT table, forwarding, and a dnsmasq that gives a guest in another
/// namespace a lease and resolves its name.
#[test]
fn default_switch_serves_dhcp_and_dns_behind_nat() {
    // The host's forwarding setting, read outside any test namespace.
    let host_forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    in_netns(|| {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().to_path_buf();
        let net = Net::open();
        let d = vswitch::ensure_default(&dir).unwrap();
        assert_eq!(d.kind, SwitchKind::Default);
        assert_eq!(
            d.host_address.unwrap().to_string(),
            vswitch::DEFAULT_HOST_ADDRESS
        );
        // Ensuring it again finds it.
        assert_eq!(vswitch::ensure_default(&dir).unwrap(), d);
        let br = net.link("vs-default").unwrap();
        assert_eq!(br.addresses, cidrs(&["172.30.254.1/24"]));
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
            "1\n"
        );
        let table = nft_table();
        assert!(
            table.contains("ip saddr 172.30.254.0/24 oifname != \"vs-default\" masquerade"),
            "{table}"
        );
        let status = vswitch::list(&dir).unwrap();
        assert_eq!(status[0].dhcp_running, Some(true));

        // The guest: one end of a veth on the switch, the other in a namespace of its own.
        net.add_veth("vm0", "guest0");
        vswitch::attach(&dir, "default", "vm0", PortSettings::default()).unwrap();
        let lease = guest::in_other_netns(&net, "guest0", |guest_mac| {
            let lease = guest::dhcp("guest0", guest_mac, "guest1");
            Net::open().add_address("guest0", &format!("{}/24", lease.address));
            let answer = guest::dns_a("guest1", lease.dns);
            (lease, answer, guest_mac)
        });
        let (lease, resolved, mac) = lease;
        let octets = lease.address.octets();
        assert_eq!(&octets[..3], &[172, 30, 254]);
        assert!((2..=254).contains(&octets[3]), "{:?}", lease.address);
        assert_eq!(lease.router.to_string(), "172.30.254.1");
        assert_eq!(lease.dns.to_string(), "172.30.254.1");
        assert_eq!(
            resolved,
            Some(lease.address),
            "dnsmasq resolves the guest's name"
        );
        let leases = std::fs::read_to_string(dir.join("switches/default.leases")).unwrap();
        let mac_text = mac.map(|b| format!("{b:02x}")).join(":");
        assert!(
            leases.contains(&mac_text) && leases.contains("guest1"),
            "{leases}"
        );

        let err = vswitch::remove(&dir, "default", false).unwrap_err();
        assert!(err.to_string().contains("vm0"), "{err}");
        vswitch::remove(&dir, "default", true).unwrap();
        assert!(net.link("vs-default").is_none());
        assert!(!nft_has_table(), "NAT table removed");
        assert!(!dir.join("switches/default.dnsmasq.pid").exists());
        assert!(!dir.join("switches/default.leases").exists());
        assert!(!dnsmasq_running(&dir));
    });
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        host_forwarding,
        "the host's own forwarding setting is untouched"
    );
}

fn nft_table() -> String {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "inet", "viridian"])
        .output()
        .expect("nft (apt-get install nftables)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn nft_has_table() -> bool {
    let out = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("inet viridian")
}

fn dnsmasq_running(dir: &Path) -> bool {
    let needle = format!(
        "--pid-file={}",
        dir.join("switches/default.dnsmasq.pid").display()
    );
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| c.split(|b| *b == 0).any(|a| a == needle.as_bytes()))
            .unwrap_or(false)
    })
}

/// A minimal DHCP and DNS client, for the guest's side of the Default Switch test.
mod guest {
    use super::Net;
    use nix::sys::socket::{setsockopt, sockopt};
    use std::ffi::OsString;
    use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
    use std::thread::JoinHandle;
    use std::time::Duration;

    /// Moves `ifname` into a new namespace and runs `f` there (with the interface's MAC
    /// address) on a thread of its own, which is running when this returns.
    pub fn spawn<T: Send + 'static>(
        net: &Net,
        ifname: &'static str,
        f: impl FnOnce([u8; 6]) -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let (ns_tx, ns_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            ns_tx
                .send(std::fs::File::open("/proc/thread-self/ns/net").unwrap())
                .unwrap();
            go_rx.recv().unwrap();
            let net = Net::open();
            net.up(ifname);
            let mac = net.link(ifname).unwrap().mac.unwrap();
            f(mac)
        });
        let ns = ns_rx.recv().unwrap();
        net.move_to(ifname, &ns);
        go_tx.send(()).unwrap();
        t
    }

    /// `spawn` and wait for `f`'s result.
    pub fn in_other_netns<T: Send + 'static>(
        net: &Net,
        ifname: &'static str,
        f: impl FnOnce([u8; 6]) -> T + Send + 'static,
    ) -> T {
        spawn(net, ifname, f).join().unwrap()
    }

    /// A guest on `ifname` with address `cidr` waiting 3 s for a datagram "hello" on port
    /// 9999; the thread's result says whether one came.
    fn receiver(net: &Net, ifname: &'static str, cidr: &'static str) -> JoinHandle<bool> {
        spawn(net, ifname, move |_| {
            Net::open().add_address(ifname, cidr);
            let addr = cidr.split('/').next().unwrap();
            let sock = UdpSocket::bind((addr, 9999)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = [0u8; 16];
            matches!(sock.recv(&mut buf), Ok(5) if &buf[..5] == b"hello")
        })
    }

    /// Sends "hello" to `to` port 9999 for 2 s (before the neighbour is resolved a send may
    /// fail; it keeps trying).
    fn send_hello(sock: &UdpSocket, to: &str) {
        for _ in 0..20 {
            let _ = sock.send_to(b"hello", (to, 9999));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether a UDP datagram from guest `from` (192.0.2.1) reaches guest `to` (192.0.2.2)
    /// over the switch, each in a namespace of its own (TEST-NET-1 addresses).
    pub fn udp_reaches(net: &Net, from: &'static str, to: &'static str) -> bool {
        let rx = receiver(net, to, "192.0.2.2/24");
        let tx = spawn(net, from, move |_| {
            Net::open().add_address(from, "192.0.2.1/24");
            send_hello(&UdpSocket::bind("192.0.2.1:0").unwrap(), "192.0.2.2");
        });
        tx.join().unwrap();
        rx.join().unwrap()
    }

    /// Whether a UDP datagram from the host (this namespace) reaches a guest on `ifname`
    /// with address `cidr`.
    pub fn host_reaches(net: &Net, ifname: &'static str, cidr: &'static str) -> bool {
        let rx = receiver(net, ifname, cidr);
        send_hello(
            &UdpSocket::bind("0.0.0.0:0").unwrap(),
            cidr.split('/').next().unwrap(),
        );
        rx.join().unwrap()
    }

    #[derive(Debug)]
    pub struct Lease {
        pub address: Ipv4Addr,
        pub router: Ipv4Addr,
        pub dns: Ipv4Addr,
    }

    const XID: [u8; 4] = [0x56, 0x49, 0x52, 0x31];

    fn message(kind: u8, mac: [u8; 6], hostname: &str, extra: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut m = vec![0u8; 240];
        m[0] = 1; // BOOTREQUEST
        m[1] = 1; // Ethernet
        m[2] = 6;
        m[4..8].copy_from_slice(&XID);
        m[10] = 0x80; // broadcast the reply: we have no address yet
        m[28..34].copy_from_slice(&mac);
        m[236..240].copy_from_slice(&[99, 130, 83, 99]);
        let mut opt = |code: u8, data: &[u8]| {
            m.push(code);
            m.push(data.len() as u8);
            m.extend_from_slice(data);
        };
        opt(53, &[kind]);
        opt(12, hostname.as_bytes());
        opt(55, &[1, 3, 6]);
        for (code, data) in extra {
            opt(*code, data);
        }
        m.push(255);
        m
    }

    /// (yiaddr, message type, options) of a reply to us.
    type Options = Vec<(u8, Vec<u8>)>;

    fn parse(reply: &[u8]) -> Option<(Ipv4Addr, u8, Options)> {
        if reply.len() < 240
            || reply[0] != 2
            || reply[4..8] != XID
            || reply[236..240] != [99, 130, 83, 99]
        {
            return None;
        }
        let yiaddr = Ipv4Addr::new(reply[16], reply[17], reply[18], reply[19]);
        let mut opts = Vec::new();
        let mut kind = 0;
        let mut i = 240;
        while i < reply.len() && reply[i] != 255 {
            if reply[i] == 0 {
                i += 1;
                continue;
            }
            let len = *reply.get(i + 1)? as usize;
            let data = reply.get(i + 2..i + 2 + len)?.to_vec();
            if reply[i] == 53 {
                kind = *data.first()?;
            }
            opts.push((reply[i], data));
            i += 2 + len;
        }
        Some((yiaddr, kind, opts))
    }

    fn exchange(sock: &UdpSocket, msg: &[u8], want: u8) -> (Ipv4Addr, Options) {
        let server = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
        let mut buf = [0u8; 1500];
        for _ in 0..10 {
            sock.send_to(msg, server).unwrap();
            while let Ok(n) = sock.recv(&mut buf) {
                if let Some((yiaddr, kind, opts)) = parse(&buf[..n]) {
                    if kind == want {
                        return (yiaddr, opts);
                    }
                }
            }
        }
        panic!("no DHCP message of type {want} in 10 tries");
    }

    fn ip_opt(opts: &[(u8, Vec<u8>)], code: u8) -> Ipv4Addr {
        let d = &opts.iter().find(|(c, _)| *c == code).unwrap().1;
        Ipv4Addr::new(d[0], d[1], d[2], d[3])
    }

    /// DISCOVER, OFFER, REQUEST, ACK on `ifname`.
    pub fn dhcp(ifname: &str, mac: [u8; 6], hostname: &str) -> Lease {
        let sock = UdpSocket::bind("0.0.0.0:68").unwrap();
        sock.set_broadcast(true).unwrap();
        setsockopt(&sock, sockopt::BindToDevice, &OsString::from(ifname)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let (offered, opts) = exchange(&sock, &message(1, mac, hostname, &[]), 2);
        let server = ip_opt(&opts, 54);
        let request = message(
            3,
            mac,
            hostname,
            &[
                (50, offered.octets().to_vec()),
                (54, server.octets().to_vec()),
            ],
        );
        let (address, opts) = exchange(&sock, &request, 5);
        Lease {
            address,
            router: ip_opt(&opts, 3),
            dns: ip_opt(&opts, 6),
        }
    }

    /// The first A record for `name` from the DNS server `server`.
    pub fn dns_a(name: &str, server: Ipv4Addr) -> Option<Ipv4Addr> {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let mut buf = [0u8; 1500];
        for _ in 0..10 {
            sock.send_to(&q, (server, 53)).unwrap();
            let Ok(n) = sock.recv(&mut buf) else { continue };
            let r = &buf[..n];
            if n < q.len() || r[..2] != q[..2] {
                continue;
            }
            let answers = u16::from_be_bytes([r[6], r[7]]);
            let mut i = q.len();
            for _ in 0..answers {
                // A compressed name (2 bytes), type, class, TTL, length, data.
                let rtype = u16::from_be_bytes([r[i + 2], r[i + 3]]);
                let len = u16::from_be_bytes([r[i + 10], r[i + 11]]) as usize;
                if rtype == 1 && len == 4 {
                    return Some(Ipv4Addr::new(r[i + 12], r[i + 13], r[i + 14], r[i + 15]));
                }
                i += 12 + len;
            }
            return None;
        }
        panic!("no DNS answer from {server}");
    }
}
