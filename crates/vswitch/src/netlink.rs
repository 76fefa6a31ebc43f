//! The kernel side: links, bridge VLANs, addresses and routes over rtnetlink.
//!
//! `rtnetlink` is asynchronous; this wraps one connection in a current-thread tokio runtime so
//! the rest of the crate (and its callers, the CLI and the VMM) stay synchronous. Do not call it
//! from inside another tokio runtime (use `spawn_blocking`).

use crate::cidr::Cidr;
use crate::vlan::VlanEntry;
use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    AfSpecBridge, AfSpecInet6, AfSpecUnspec, BridgeFlag, BridgeVlanInfo, BridgeVlanInfoFlags,
    In6AddrGenMode, InfoBridge, InfoData, InfoKind, LinkAttribute, LinkExtentMask, LinkFlags,
    LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const ESRCH: i32 = 3;
const EADDRNOTAVAIL: i32 = 99;
const EOPNOTSUPP: i32 = 95;
const EAFNOSUPPORT: i32 = 97;

/// A netlink failure, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct NetlinkError {
    pub what: String,
    #[source]
    pub source: rtnetlink::Error,
}

/// The kernel's errno in a netlink error answer, if that is what it was.
fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
        _ => None,
    }
}

type Result<T> = std::result::Result<T, NetlinkError>;

fn ctx(what: impl FnOnce() -> String) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |source| NetlinkError {
        what: what(),
        source,
    }
}

/// One network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    /// The bridge (or bond) this interface is a port of.
    pub master: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
    /// A bridge with VLAN filtering on.
    pub vlan_filtering: bool,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            master: None,
            mac: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            vlan_filtering: false,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Controller(m) if *m != 0 => link.master = Some(*m),
                LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => link.kind = Some(kind.clone()),
                            LinkInfo::Data(InfoData::Bridge(opts)) => {
                                link.vlan_filtering =
                                    opts.contains(&InfoBridge::VlanFiltering(true));
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    pub fn is_bridge(&self) -> bool {
        self.kind == Some(InfoKind::Bridge)
    }
}

/// An address on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub cidr: Cidr,
    /// Link-local (fe80::/10, 169.254/16) or host scope: these belong to the interface and are
    /// never moved.
    pub link_scope: bool,
    message: AddressMessage,
}

/// A route whose gateway is on a given interface (moved with an External switch's adapter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRoute {
    pub destination: Option<Cidr>,
    pub gateway: IpAddr,
    pub metric: Option<u32>,
    message: RouteMessage,
}

/// One rtnetlink connection.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace.
    pub fn open() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let handle = rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            Ok::<_, std::io::Error>(handle)
        })?;
        Ok(Netlink { rt, handle })
    }

    pub fn links(&self) -> Result<Vec<Link>> {
        self.rt.block_on(async {
            let msgs: Vec<LinkMessage> = self
                .handle
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(ctx(|| "listing interfaces".into()))?;
            Ok(msgs.iter().map(Link::from_message).collect())
        })
    }

    /// The interface with this name, or None.
    pub fn link(&self, name: &str) -> Result<Option<Link>> {
        self.rt.block_on(async {
            let mut stream = self.handle.link().get().match_name(name).execute();
            match stream.try_next().await {
                Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
                Ok(None) => Ok(None),
                Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
                Err(e) => Err(ctx(|| format!("looking up interface {name}"))(e)),
            }
        })
    }

    /// The interface with this index, or None.
    pub fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        self.rt.block_on(async {
            let mut stream = self.handle.link().get().match_index(index).execute();
            match stream.try_next().await {
                Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
                Ok(None) => Ok(None),
                Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
                Err(e) => Err(ctx(|| format!("looking up interface {index}"))(e)),
            }
        })
    }

    /// The ports of a bridge.
    pub fn ports(&self, bridge: u32) -> Result<Vec<Link>> {
        Ok(self
            .links()?
            .into_iter()
            .filter(|l| l.master == Some(bridge))
            .collect())
    }

    /// Creates a bridge, down.
    pub fn create_bridge(&self, name: &str) -> Result<()> {
        let msg = LinkMessageBuilder::<LinkBridge>::new(name).build();
        self.rt.block_on(async {
            self.handle
                .link()
                .add(msg)
                .execute()
                .await
                .map_err(ctx(|| format!("creating bridge {name}")))
        })
    }

    /// Turns VLAN filtering on with no default PVID (so neither the bridge itself nor a new
    /// port is in any VLAN until we say so). Returns false, changing nothing, if the kernel
    /// was built without bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING).
    pub fn set_vlan_filtering(&self, name: &str) -> Result<bool> {
        let msg = LinkMessageBuilder::<LinkBridge>::new(name)
            .vlan_filtering(true)
            .vlan_default_pvid(0)
            .build();
        match self.change(msg, || {
            format!("turning on VLAN filtering on bridge {name}")
        }) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e.source) == Some(EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Stops the kernel from giving the interface IPv6 addresses of its own (a link-local
    /// one when it comes up). Without IPv6 in the kernel this does nothing.
    pub fn set_no_ipv6_addresses(&self, link: &Link) -> Result<()> {
        let mut msg = LinkUnspec::new_with_index(link.index).build();
        msg.attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]));
        match self.change(msg, || {
            format!("turning off IPv6 address generation on {}", link.name)
        }) {
            // IPv6 is off in this kernel (ipv6.disable=1): there is nothing to turn off.
            Err(e) if errno(&e.source) == Some(EAFNOSUPPORT) => Ok(()),
            r => r,
        }
    }

    fn change(&self, msg: LinkMessage, what: impl FnOnce() -> String) -> Result<()> {
        self.rt.block_on(async {
            self.handle
                .link()
                .change(msg)
                .execute()
                .await
                .map_err(ctx(what))
        })
    }

    pub fn set_master(&self, port: &Link, bridge: &Link) -> Result<()> {
        let msg = LinkUnspec::new_with_index(port.index)
            .controller(bridge.index)
            .build();
        self.change(msg, || {
            format!("making {} a port of {}", port.name, bridge.name)
        })
    }

    /// Takes a port off its bridge; one that has gone away meanwhile (a VM's TAP closing) is
    /// not an error.
    pub fn set_nomaster(&self, port: &Link) -> Result<()> {
        let msg = LinkUnspec::new_with_index(port.index)
            .nocontroller()
            .build();
        match self.change(msg, || format!("releasing {} from its bridge", port.name)) {
            Err(e) if errno(&e.source) == Some(ENODEV) => Ok(()),
            r => r,
        }
    }

    pub fn set_up(&self, link: &Link) -> Result<()> {
        let msg = LinkUnspec::new_with_index(link.index).up().build();
        self.change(msg, || format!("bringing {} up", link.name))
    }

    pub fn set_mac(&self, link: &Link, mac: [u8; 6]) -> Result<()> {
        let msg = LinkUnspec::new_with_index(link.index)
            .address(mac.to_vec())
            .build();
        self.change(msg, || format!("setting the MAC address of {}", link.name))
    }

    /// Deletes an interface; one that is already gone is not an error.
    pub fn delete_link(&self, link: &Link) -> Result<()> {
        self.rt.block_on(async {
            match self.handle.link().del(link.index).execute().await {
                Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
                r => r.map_err(ctx(|| format!("deleting {}", link.name))),
            }
        })
    }

    /// Sends a prepared link message as a new link (test setup: dummy and veth interfaces).
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    pub fn add_link(&self, msg: LinkMessage, what: impl FnOnce() -> String) -> Result<()> {
        self.rt.block_on(async {
            self.handle
                .link()
                .add(msg)
                .execute()
                .await
                .map_err(ctx(what))
        })
    }

    /// Sends a prepared link change (test setup: moving an interface to another namespace).
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    pub fn change_link(&self, msg: LinkMessage, what: impl FnOnce() -> String) -> Result<()> {
        self.change(msg, what)
    }

    /// The VLAN entries of every bridge port and bridge, by interface index.
    pub fn all_vlans(&self) -> Result<Vec<(u32, Vec<VlanEntry>)>> {
        self.rt.block_on(async {
            let msgs: Vec<LinkMessage> = self
                .handle
                .link()
                .get()
                .set_filter_mask(
                    AddressFamily::Bridge,
                    vec![LinkExtentMask::BrvlanCompressed],
                )
                .execute()
                .try_collect()
                .await
                .map_err(ctx(|| "listing bridge VLANs".into()))?;
            Ok(msgs.iter().map(|m| (m.header.index, vlans_of(m))).collect())
        })
    }

    /// The VLAN entries of one port (or of a bridge itself).
    pub fn vlans(&self, link: &Link) -> Result<Vec<VlanEntry>> {
        Ok(self
            .all_vlans()?
            .into_iter()
            .find(|(i, _)| *i == link.index)
            .map(|(_, v)| v)
            .unwrap_or_default())
    }

    /// Adds (or updates the flags of) VLAN entries on a port, or on the bridge itself when
    /// `bridge_self`.
    pub fn add_vlans(&self, link: &Link, entries: &[VlanEntry], bridge_self: bool) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let msg = vlan_message(link.index, entries, bridge_self);
        self.rt.block_on(async {
            self.handle
                .link()
                .set(msg)
                .execute()
                .await
                .map_err(ctx(|| format!("adding VLANs to {}", link.name)))
        })
    }

    pub fn del_vlans(&self, link: &Link, entries: &[VlanEntry], bridge_self: bool) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let msg = vlan_message(link.index, entries, bridge_self);
        self.rt.block_on(async {
            self.handle
                .link()
                .del_with_message(msg)
                .execute()
                .await
                .map_err(ctx(|| format!("removing VLANs from {}", link.name)))
        })
    }

    pub fn addresses(&self, link: &Link) -> Result<Vec<Address>> {
        self.rt.block_on(async {
            let msgs: Vec<AddressMessage> = self
                .handle
                .address()
                .get()
                .set_link_index_filter(link.index)
                .execute()
                .try_collect()
                .await
                .map_err(ctx(|| format!("listing the addresses of {}", link.name)))?;
            Ok(msgs
                .into_iter()
                .filter(|m| m.header.index == link.index)
                .filter_map(address_of)
                .collect())
        })
    }

    /// Adds an address; one that is already there is not an error.
    pub fn add_address(&self, link: &Link, cidr: Cidr) -> Result<()> {
        self.rt.block_on(async {
            let req = self
                .handle
                .address()
                .add(link.index, cidr.addr(), cidr.prefix());
            match req.execute().await {
                Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
                r => r.map_err(ctx(|| format!("adding address {cidr} to {}", link.name))),
            }
        })
    }

    pub fn del_address(&self, link: &Link, addr: &Address) -> Result<()> {
        self.rt.block_on(async {
            match self
                .handle
                .address()
                .del(addr.message.clone())
                .execute()
                .await
            {
                Err(e) if errno(&e) == Some(EADDRNOTAVAIL) => Ok(()),
                r => r.map_err(ctx(|| {
                    format!("removing address {} from {}", addr.cidr, link.name)
                })),
            }
        })
    }

    /// Routes in the main table that go through a gateway out of this interface (the default
    /// route among them). Multipath routes are not included.
    pub fn gateway_routes(&self, link: &Link) -> Result<Vec<GatewayRoute>> {
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut filter = RouteMessage::default();
            filter.header.address_family = family;
            let msgs: Vec<RouteMessage> = self.rt.block_on(async {
                self.handle
                    .route()
                    .get(filter)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(ctx(|| "listing routes".into()))
            })?;
            routes.extend(
                msgs.into_iter()
                    .filter_map(|m| gateway_route(m, link.index)),
            );
        }
        Ok(routes)
    }

    /// Adds a copy of `route` that leaves through `link`; one that is already there is fine.
    pub fn add_route_via(&self, route: &GatewayRoute, link: &Link) -> Result<()> {
        let msg = route_on(&route.message, link.index);
        self.rt.block_on(async {
            match self.handle.route().add(msg).execute().await {
                Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
                r => r.map_err(ctx(|| {
                    format!("adding the route via {} to {}", route.gateway, link.name)
                })),
            }
        })
    }

    /// A default route through `gateway` out of `link` (test setup).
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    pub fn add_default_route(&self, link: &Link, gateway: IpAddr, metric: u32) -> Result<()> {
        let msg = match gateway {
            IpAddr::V4(g) => RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(g)
                .output_interface(link.index)
                .priority(metric)
                .build(),
            IpAddr::V6(g) => RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(g)
                .output_interface(link.index)
                .priority(metric)
                .build(),
        };
        self.rt.block_on(async {
            self.handle
                .route()
                .add(msg)
                .execute()
                .await
                .map_err(ctx(|| format!("adding a default route via {gateway}")))
        })
    }

    pub fn del_route(&self, route: &GatewayRoute) -> Result<()> {
        self.rt.block_on(async {
            match self
                .handle
                .route()
                .del(route.message.clone())
                .execute()
                .await
            {
                Err(e) if errno(&e) == Some(ESRCH) => Ok(()),
                r => r.map_err(ctx(|| format!("removing the route via {}", route.gateway))),
            }
        })
    }
}

fn vlan_message(index: u32, entries: &[VlanEntry], bridge_self: bool) -> LinkMessage {
    let mut spec = Vec::new();
    if bridge_self {
        spec.push(AfSpecBridge::Flags(BridgeFlag::LowerDev));
    }
    for run in crate::vlan::runs(entries) {
        let mut flags = BridgeVlanInfoFlags::empty();
        flags.set(BridgeVlanInfoFlags::Pvid, run.pvid);
        flags.set(BridgeVlanInfoFlags::Untagged, run.untagged);
        if run.first == run.last {
            spec.push(AfSpecBridge::VlanInfo(BridgeVlanInfo {
                flags,
                vid: run.first,
            }));
        } else {
            spec.push(AfSpecBridge::VlanInfo(BridgeVlanInfo {
                flags: flags | BridgeVlanInfoFlags::RangeBegin,
                vid: run.first,
            }));
            spec.push(AfSpecBridge::VlanInfo(BridgeVlanInfo {
                flags: flags | BridgeVlanInfoFlags::RangeEnd,
                vid: run.last,
            }));
        }
    }
    let mut msg = LinkMessage::default();
    msg.header.interface_family = AddressFamily::Bridge;
    msg.header.index = index;
    msg.attributes.push(LinkAttribute::AfSpecBridge(spec));
    msg
}

/// The VLAN entries in a compressed AF_BRIDGE dump message, ranges expanded.
fn vlans_of(msg: &LinkMessage) -> Vec<VlanEntry> {
    let mut out = Vec::new();
    let mut range_start: Option<u16> = None;
    for attr in &msg.attributes {
        let LinkAttribute::AfSpecBridge(spec) = attr else {
            continue;
        };
        for item in spec {
            let AfSpecBridge::VlanInfo(info) = item else {
                continue;
            };
            let pvid = info.flags.contains(BridgeVlanInfoFlags::Pvid);
            let untagged = info.flags.contains(BridgeVlanInfoFlags::Untagged);
            if info.flags.contains(BridgeVlanInfoFlags::RangeBegin) {
                range_start = Some(info.vid);
            } else if info.flags.contains(BridgeVlanInfoFlags::RangeEnd) {
                let first = range_start.take().unwrap_or(info.vid).min(info.vid);
                out.extend((first..=info.vid).map(|vid| VlanEntry {
                    vid,
                    pvid,
                    untagged,
                }));
            } else {
                out.push(VlanEntry {
                    vid: info.vid,
                    pvid,
                    untagged,
                });
            }
        }
    }
    out
}

fn address_of(msg: AddressMessage) -> Option<Address> {
    // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS otherwise.
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            _ => {}
        }
    }
    let ip = local.or(address)?;
    let cidr = Cidr::new(ip, msg.header.prefix_len).ok()?;
    let link_scope = matches!(msg.header.scope, AddressScope::Link | AddressScope::Host);
    Some(Address {
        cidr,
        link_scope,
        message: msg,
    })
}

fn ip_of(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn gateway_route(msg: RouteMessage, oif: u32) -> Option<GatewayRoute> {
    let mut gateway = None;
    let mut out = None;
    let mut destination = None;
    let mut metric = None;
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Gateway(a) => gateway = ip_of(a),
            RouteAttribute::Oif(i) => out = Some(*i),
            RouteAttribute::Destination(a) => destination = ip_of(a),
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    if out != Some(oif) || table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let gateway = gateway?;
    let destination = match destination {
        Some(d) => Some(Cidr::new(d, msg.header.destination_prefix_length).ok()?),
        None => None,
    };
    Some(GatewayRoute {
        destination,
        gateway,
        metric,
        message: msg,
    })
}

/// A route message for adding `route` again with another output interface: the header and
/// the attributes that say where the route goes, without the kernel's read-only ones.
fn route_on(route: &RouteMessage, oif: u32) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header = route.header.clone();
    msg.header.flags = Default::default();
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Destination(_)
            | RouteAttribute::Gateway(_)
            | RouteAttribute::Priority(_)
            | RouteAttribute::Table(_)
            | RouteAttribute::PrefSource(_)
            | RouteAttribute::Preference(_)
            | RouteAttribute::Metrics(_) => msg.attributes.push(attr.clone()),
            _ => {}
        }
    }
    msg.attributes.push(RouteAttribute::Oif(oif));
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_messages_compress_runs_and_mark_self() {
        let entries: Vec<VlanEntry> = std::iter::once(VlanEntry {
            vid: 1,
            pvid: true,
            untagged: true,
        })
        .chain((2..=4094).map(|vid| VlanEntry {
            vid,
            pvid: false,
            untagged: false,
        }))
        .collect();
        let msg = vlan_message(7, &entries, true);
        assert_eq!(msg.header.index, 7);
        assert_eq!(msg.header.interface_family, AddressFamily::Bridge);
        let LinkAttribute::AfSpecBridge(spec) = &msg.attributes[0] else {
            panic!("no AF_SPEC")
        };
        assert_eq!(spec.len(), 4, "{spec:?}");
        assert_eq!(spec[0], AfSpecBridge::Flags(BridgeFlag::LowerDev));
        // Read back as the kernel would report it: the same entries.
        assert_eq!(vlans_of(&msg), entries);
    }
}
