//! Test helpers (feature `test-util`): a fresh network namespace per test, interfaces to play
//! the physical adapter and the VMs' TAPs, and the kernel's state read back over netlink.

use crate::netlink::{Link, Netlink};
use crate::Cidr;
use netlink_packet_route::link::LinkMessage;
use rtnetlink::{LinkUnspec, LinkVeth};
use std::net::IpAddr;
use std::os::fd::AsRawFd;

pub use crate::vlan::VlanEntry;

/// Runs `f` on a thread of its own that first moves into a new, empty network namespace, so
/// nothing it does touches the host's interfaces or routes. Child processes it starts
/// (dnsmasq, nft, the `viridian` binary) inherit that namespace. Any process still in the
/// namespace when `f` returns or panics (a dnsmasq left behind by a failed test) is killed.
/// Panics from `f` are passed on.
pub fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let joined = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): tests need root (CAP_SYS_ADMIN)");
        let me = netns_id("thread-self").expect("reading /proc/thread-self/ns/net");
        // The safety check of the whole approach: the namespace has nothing but loopback.
        let links = Netlink::open().unwrap().links().unwrap();
        assert!(
            links.iter().all(|l| l.name == "lo"),
            "not a fresh namespace: {links:?}"
        );
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        kill_namespace_processes(me);
        out
    });
    match joined.join().expect("test thread") {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

fn netns_id(task: &str) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{task}/ns/net")).ok()
}

fn kill_namespace_processes(ns: std::path::PathBuf) {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| *n != me)
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if netns_id(&pid.to_string()).as_ref() == Some(&ns) {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
    }
}

/// An interface's state as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub index: u32,
    pub is_bridge: bool,
    pub up: bool,
    pub mac: Option<[u8; 6]>,
    /// The name of its bridge.
    pub master: Option<String>,
    pub vlans: Vec<VlanEntry>,
    /// Addresses other than link-local ones.
    pub addresses: Vec<Cidr>,
    /// Link-local addresses (IPv6 fe80::/10).
    pub link_local: Vec<Cidr>,
}

/// A route through a gateway, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteState {
    pub destination: Option<Cidr>,
    pub gateway: IpAddr,
    pub metric: Option<u32>,
}

/// Reads and sets up the kernel's state in the current thread's namespace.
pub struct Net {
    nl: Netlink,
}

impl Net {
    pub fn open() -> Net {
        Net {
            nl: Netlink::open().expect("netlink socket"),
        }
    }

    fn get(&self, name: &str) -> Link {
        self.nl
            .link(name)
            .unwrap()
            .unwrap_or_else(|| panic!("no interface {name}"))
    }

    /// The interface's state, or None if there is no such interface.
    pub fn link(&self, name: &str) -> Option<LinkState> {
        let l = self.nl.link(name).unwrap()?;
        let master = l.master.map(|m| {
            self.nl
                .link_by_index(m)
                .unwrap()
                .map(|b| b.name)
                .unwrap_or_default()
        });
        let addrs = self.nl.addresses(&l).unwrap();
        Some(LinkState {
            name: l.name.clone(),
            index: l.index,
            is_bridge: l.is_bridge(),
            up: l.up,
            mac: l.mac,
            master,
            vlans: self.nl.vlans(&l).unwrap(),
            addresses: addrs
                .iter()
                .filter(|a| !a.link_scope)
                .map(|a| a.cidr)
                .collect(),
            link_local: addrs
                .iter()
                .filter(|a| a.link_scope)
                .map(|a| a.cidr)
                .collect(),
        })
    }

    /// Routes through a gateway out of `name`, in the main table.
    pub fn gateway_routes(&self, name: &str) -> Vec<RouteState> {
        let l = self.get(name);
        self.nl
            .gateway_routes(&l)
            .unwrap()
            .into_iter()
            .map(|r| RouteState {
                destination: r.destination,
                gateway: r.gateway,
                metric: r.metric,
            })
            .collect()
    }

    /// An interface, up, with carrier: one end of a veth pair whose other end is `{name}p`
    /// (a stand-in for a VM's TAP or a physical adapter; veth rather than dummy, which not
    /// every kernel has).
    pub fn add_port(&self, name: &str) {
        self.add_veth(name, &format!("{name}p"));
    }

    /// A veth pair, both ends up.
    pub fn add_veth(&self, name: &str, peer: &str) {
        let msg: LinkMessage = LinkVeth::new(name, peer).up().build();
        self.nl
            .add_link(msg, || format!("adding veth {name}/{peer}"))
            .unwrap();
        self.up(peer);
    }

    pub fn up(&self, name: &str) {
        let l = self.get(name);
        self.nl.set_up(&l).unwrap();
    }

    pub fn add_address(&self, name: &str, cidr: &str) {
        let l = self.get(name);
        self.nl.add_address(&l, cidr.parse().unwrap()).unwrap();
    }

    /// A default route through `gateway` (which must be on one of `name`'s subnets).
    pub fn add_default_route(&self, name: &str, gateway: IpAddr, metric: u32) {
        let l = self.get(name);
        self.nl.add_default_route(&l, gateway, metric).unwrap();
    }

    /// Makes `name` a port of `bridge` by hand (what another program might have done).
    pub fn enslave(&self, name: &str, bridge: &str) {
        let (l, b) = (self.get(name), self.get(bridge));
        self.nl.set_master(&l, &b).unwrap();
    }

    pub fn add_bridge(&self, name: &str) {
        self.nl.create_bridge(name).unwrap();
    }

    pub fn delete(&self, name: &str) {
        let l = self.get(name);
        self.nl.delete_link(&l).unwrap();
    }

    /// Moves `name` into the network namespace open as `ns` (a `/proc/.../ns/net` file).
    pub fn move_to(&self, name: &str, ns: &std::fs::File) {
        let l = self.get(name);
        let msg = LinkUnspec::new_with_index(l.index)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        self.nl
            .change_link(msg, || format!("moving {name} to another namespace"))
            .unwrap();
    }
}
