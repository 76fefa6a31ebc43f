//! Making the kernel match a switch definition, and taking a switch down again.

use crate::error::{Error, Result};
use crate::netlink::{Link, Netlink};
use crate::store::{SwitchDef, SwitchKind};
use crate::vlan::{self, VlanEntry};
use crate::{dnsmasq, nat};
use std::path::Path;

/// Brings one switch to its defined state: the bridge (created, or reconciled if it exists),
/// the bridge's own VLAN membership, the host address, the External adapter and the host's
/// addresses and gateway routes moved from it to the bridge, and for the Default Switch its
/// NAT table and dnsmasq. Running it again changes nothing.
pub fn apply(nl: &Netlink, dir: &Path, def: &SwitchDef) -> Result<Link> {
    let name = def.bridge();
    let bridge = match nl.link(&name)? {
        Some(l) if l.is_bridge() => l,
        Some(_) => return Err(Error::NotABridge(name)),
        None => {
            nl.create_bridge(&name)?;
            nl.link(&name)?
                .ok_or_else(|| Error::NoInterface(name.clone()))?
        }
    };
    if def.kind != SwitchKind::External {
        let mac = crate::mac::switch_mac(&def.name);
        if bridge.mac != Some(mac) {
            nl.set_mac(&bridge, mac)?;
        }
    }
    let vlans = nl.set_vlan_filtering(&name)?;
    if vlans {
        // Private: the bridge itself is in no VLAN, so no frame reaches the host. The others:
        // the bridge (the host's interface) is in the untagged VLAN.
        let self_vlans = match def.kind {
            SwitchKind::Private => vec![],
            _ => vec![VlanEntry::access(vlan::UNTAGGED_VID)],
        };
        set_vlans(nl, &bridge, &self_vlans, true)?;
    }
    match def.kind {
        SwitchKind::Private => {
            // No address of any kind on the host's side, IPv6 link-local included.
            nl.set_no_ipv6_addresses(&bridge)?;
            for a in nl.addresses(&bridge)? {
                nl.del_address(&bridge, &a)?;
            }
            nl.set_up(&bridge)?;
        }
        SwitchKind::Internal | SwitchKind::Default => {
            nl.set_up(&bridge)?;
            if let Some(a) = def.host_address {
                nl.add_address(&bridge, a)?;
            }
        }
        SwitchKind::External => {
            let adapter = def.adapter.as_deref().unwrap_or_default();
            attach_uplink(nl, &bridge, adapter, vlans)?;
        }
    }
    if def.kind == SwitchKind::Default {
        if let Some(host) = def.host_address {
            nat::apply(&name, host)?;
            dnsmasq::ensure(dir, &def.name, &name, host)?;
        }
    }
    Ok(bridge)
}

/// Makes a port's VLAN entries exactly `wanted`.
pub fn set_vlans(nl: &Netlink, link: &Link, wanted: &[VlanEntry], bridge_self: bool) -> Result<()> {
    let current = nl.vlans(link)?;
    let (remove, add) = vlan::diff(&current, wanted);
    nl.del_vlans(link, &remove, bridge_self)?;
    nl.add_vlans(link, &add, bridge_self)?;
    Ok(())
}

/// The checks an External switch's adapter must pass before it is enslaved.
pub fn check_adapter(nl: &Netlink, adapter: &str, bridge: Option<&Link>) -> Result<Link> {
    let link = nl
        .link(adapter)?
        .ok_or_else(|| Error::UnknownAdapter(adapter.to_string()))?;
    let in_use = |reason: String| Error::AdapterInUse {
        adapter: adapter.to_string(),
        reason,
    };
    if link.name == "lo" {
        return Err(in_use("is the loopback interface".into()));
    }
    if link.is_bridge() {
        return Err(in_use("is a bridge; give the physical adapter".into()));
    }
    match link.master {
        Some(m) if Some(m) == bridge.map(|b| b.index) => {}
        Some(m) => {
            let owner = nl
                .link_by_index(m)?
                .map(|l| l.name)
                .unwrap_or_else(|| m.to_string());
            return Err(in_use(format!("is already a port of {owner}")));
        }
        None => {}
    }
    Ok(link)
}

/// Enslaves the adapter (with VLAN filtering, a trunk: untagged VLAN as PVID, every other VLAN
/// tagged), gives the
/// bridge the adapter's MAC address (the host keeps its identity on the wire: DHCP leases,
/// neighbours' ARP caches) and moves the host's addresses and gateway routes to the bridge.
fn attach_uplink(nl: &Netlink, bridge: &Link, adapter: &str, vlans: bool) -> Result<()> {
    let port = check_adapter(nl, adapter, Some(bridge))?;
    if port.master != Some(bridge.index) {
        nl.set_master(&port, bridge)?;
    }
    if vlans {
        set_vlans(nl, &port, &vlan::uplink_entries(), false)?;
    }
    if let Some(mac) = port.mac {
        if bridge.mac != Some(mac) {
            nl.set_mac(bridge, mac)?;
        }
    }
    nl.set_up(&port)?;
    nl.set_up(bridge)?;
    move_host_config(nl, &port, bridge)
}

/// Moves every address that is not link-local, and every main-table route through a
/// gateway, from one interface to another. Each route is removed before its copy is added,
/// since the kernel counts the same destination and metric on another interface as the same
/// route.
pub fn move_host_config(nl: &Netlink, from: &Link, to: &Link) -> Result<()> {
    let addrs: Vec<_> = nl
        .addresses(from)?
        .into_iter()
        .filter(|a| !a.link_scope)
        .collect();
    let routes = nl.gateway_routes(from)?;
    for a in &addrs {
        nl.add_address(to, a.cidr)?;
    }
    for r in &routes {
        nl.del_route(r)?;
        nl.add_route_via(r, to)?;
    }
    for a in &addrs {
        nl.del_address(from, a)?;
    }
    Ok(())
}

/// The ports of a switch's bridge other than its External adapter: the VMs' interfaces.
pub fn vm_ports(nl: &Netlink, def: &SwitchDef, bridge: &Link) -> Result<Vec<Link>> {
    Ok(nl
        .ports(bridge.index)?
        .into_iter()
        .filter(|p| Some(p.name.as_str()) != def.adapter.as_deref())
        .collect())
}

/// Takes a switch out of the kernel: stops its dnsmasq and NAT, gives an External adapter
/// back its addresses and routes, and deletes the bridge (which releases any ports left).
pub fn teardown(nl: &Netlink, dir: &Path, def: &SwitchDef) -> Result<()> {
    if def.kind == SwitchKind::Default {
        dnsmasq::stop(dir, &def.name)?;
        nat::remove()?;
    }
    let Some(bridge) = nl.link(&def.bridge())? else {
        return Ok(());
    };
    if !bridge.is_bridge() {
        return Err(Error::NotABridge(bridge.name));
    }
    if let Some(adapter) = def.adapter.as_deref() {
        if let Some(port) = nl.link(adapter)?.filter(|p| p.master == Some(bridge.index)) {
            nl.set_nomaster(&port)?;
            nl.set_up(&port)?;
            move_host_config(nl, &bridge, &port)?;
        }
    }
    nl.delete_link(&bridge)?;
    Ok(())
}
