//! Hyper-V-style virtual switches on Linux bridges.
//!
//! A switch is a kernel bridge with VLAN filtering, made and changed over rtnetlink, and a
//! definition file under the state directory (`STATE_DIR/switches/NAME.json`) from which
//! [`apply`] re-creates it after a reboot. The kinds are Hyper-V's:
//!
//! - **Private**: VMs on this host only. The bridge has no address (not even an IPv6
//!   link-local one) and the bridge device itself is in no VLAN, so no frame reaches the host.
//! - **Internal**: VMs and the host. The bridge device is the host's interface (`vs-NAME`),
//!   in the untagged VLAN, with the optional host address.
//! - **External**: bridged to a physical adapter. The adapter becomes a trunk port (untagged
//!   VLAN as PVID, VLANs 2-4094 tagged); the bridge takes its MAC address, its addresses and
//!   its gateway routes (Hyper-V's AllowManagementOS); removing the switch gives them back.
//! - **Default**: like Hyper-V's Default Switch, an Internal switch named `default` on
//!   172.30.254.1/24 ([`DEFAULT_HOST_ADDRESS`]) with NAT to the host's uplink (nftables table
//!   `inet viridian`) and DHCP and DNS for guests (one dnsmasq, bound to the bridge only).
//!
//! VM interfaces (TAPs) join a switch with [`attach`] and leave with [`detach`].
//!
//! On a kernel built without bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING unset) the
//! bridges are made without it: they carry untagged traffic, only [`Vlan::Untagged`] ports
//! can be attached, and a Private switch keeps the host off by having no address at all.
//!
//! Every function here opens its own netlink socket in the calling thread's network
//! namespace and blocks; call them from a thread that is not running a tokio runtime.
#![forbid(unsafe_code)]

mod cidr;
mod dnsmasq;
mod error;
mod mac;
mod name;
mod nat;
mod netlink;
mod reconcile;
mod store;
#[cfg(feature = "test-util")]
pub mod testing;
mod vlan;

pub use cidr::Cidr;
pub use error::{Error, Result};
pub use mac::{stable_mac, HYPERV_OUI};
pub use name::{bridge_name, check_switch_name, BRIDGE_PREFIX, DEFAULT_SWITCH, MAX_NAME_LEN};
pub use nat::TABLE as NAT_TABLE;
pub use netlink::NetlinkError;
pub use store::{SwitchDef, SwitchKind};
pub use vlan::{PortSettings, Vlan, MAX_VID, UNTAGGED_VID};

use netlink::Netlink;
use std::path::{Path, PathBuf};
use store::Store;

/// The state directory when none is given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/viridian";

/// The Default Switch's host address (and so its subnet, 172.30.254.0/24): in the
/// 172.16.0.0/12 private range but away from the low 172.17-172.2x networks that Docker and
/// similar tools hand out first.
pub const DEFAULT_HOST_ADDRESS: &str = "172.30.254.1/24";

fn open() -> Result<Netlink> {
    Netlink::open().map_err(Error::Socket)
}

/// A switch as defined, and what the kernel has of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SwitchStatus {
    #[serde(flatten)]
    pub def: SwitchDef,
    pub bridge: String,
    /// Whether the bridge exists in the kernel.
    pub present: bool,
    /// Whether the bridge filters by VLAN (false where the kernel cannot: then only untagged
    /// ports can be attached).
    pub vlan_filtering: bool,
    /// The VMs' interfaces on the switch (the External adapter not counted).
    pub ports: Vec<String>,
    /// Default Switch: whether its dnsmasq runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dhcp_running: Option<bool>,
}

/// Defines a switch and creates it in the kernel. A Default Switch without a host address
/// gets [`DEFAULT_HOST_ADDRESS`]. If the kernel part fails, whatever was made is taken down
/// again and the definition is not kept.
pub fn create(state_dir: &Path, mut def: SwitchDef) -> Result<SwitchDef> {
    if def.kind == SwitchKind::Default && def.host_address.is_none() {
        def.host_address = DEFAULT_HOST_ADDRESS.parse().ok();
    }
    def.check()?;
    let store = Store::open(state_dir)?;
    let _lock = store.lock()?;
    create_locked(&store, def)
}

fn create_locked(store: &Store, def: SwitchDef) -> Result<SwitchDef> {
    if store.load(&def.name)?.is_some() {
        return Err(Error::Exists(def.name));
    }
    let nl = open()?;
    let bridge = def.bridge();
    if nl.link(&bridge)?.is_some() {
        return Err(Error::BridgeNameTaken {
            switch: def.name,
            ifname: bridge,
        });
    }
    if let Some(adapter) = def.adapter.as_deref() {
        reconcile::check_adapter(&nl, adapter, None)?;
        if let Some(other) = store
            .list()?
            .into_iter()
            .find(|d| d.adapter.as_deref() == Some(adapter))
        {
            return Err(Error::AdapterInUse {
                adapter: adapter.to_string(),
                reason: format!("is the adapter of switch {:?}", other.name),
            });
        }
    }
    store.save(&def)?;
    if let Err(e) = reconcile::apply(&nl, store.dir(), &def) {
        if let Err(undo) = reconcile::teardown(&nl, store.dir(), &def) {
            tracing::warn!(
                "taking switch {} down again after a failed create: {undo}",
                def.name
            );
        }
        store.delete(&def.name)?;
        return Err(e);
    }
    Ok(def)
}

/// The Default Switch's definition, creating the switch first if it is not defined yet (what
/// a VM's first NIC on `default` does). A defined one is brought up if it is not.
pub fn ensure_default(state_dir: &Path) -> Result<SwitchDef> {
    let store = Store::open(state_dir)?;
    let _lock = store.lock()?;
    ensure_locked(&store, DEFAULT_SWITCH)
}

fn ensure_locked(store: &Store, name: &str) -> Result<SwitchDef> {
    let def = match store.load(name)? {
        Some(def) => def,
        None if name == DEFAULT_SWITCH => {
            return create_locked(
                store,
                SwitchDef {
                    name: DEFAULT_SWITCH.into(),
                    kind: SwitchKind::Default,
                    adapter: None,
                    host_address: DEFAULT_HOST_ADDRESS.parse().ok(),
                },
            )
        }
        None => return Err(Error::NotFound(name.to_string())),
    };
    reconcile::apply(&open()?, store.dir(), &def)?;
    Ok(def)
}

/// The definition of switch `name`, if it is defined (the kernel is not asked).
pub fn definition(state_dir: &Path, name: &str) -> Result<Option<SwitchDef>> {
    check_switch_name(name)?;
    Store::at(state_dir).load(name)
}

/// Every defined switch and its state in the kernel, by name.
pub fn list(state_dir: &Path) -> Result<Vec<SwitchStatus>> {
    let store = Store::at(state_dir);
    let defs = store.list()?;
    if defs.is_empty() {
        return Ok(vec![]);
    }
    let nl = open()?;
    let mut out = Vec::with_capacity(defs.len());
    for def in defs {
        let bridge_name = def.bridge();
        let bridge = nl.link(&bridge_name)?.filter(|l| l.is_bridge());
        let ports = match &bridge {
            Some(b) => reconcile::vm_ports(&nl, &def, b)?
                .into_iter()
                .map(|p| p.name)
                .collect(),
            None => vec![],
        };
        let dhcp_running =
            (def.kind == SwitchKind::Default).then(|| dnsmasq::is_running(store.dir(), &def.name));
        out.push(SwitchStatus {
            present: bridge.is_some(),
            vlan_filtering: bridge.as_ref().is_some_and(|b| b.vlan_filtering),
            bridge: bridge_name,
            ports,
            dhcp_running,
            def,
        });
    }
    Ok(out)
}

/// Deletes a switch: its bridge (an External adapter gets its addresses and routes back;
/// the Default Switch's dnsmasq stops, its leases and NAT table go) and its definition. A
/// switch with VM ports attached is refused unless `force`; forced, the bridge's deletion
/// releases those ports, which stay as they are but connected to nothing.
pub fn remove(state_dir: &Path, name: &str, force: bool) -> Result<()> {
    check_switch_name(name)?;
    let store = Store::open(state_dir)?;
    let _lock = store.lock()?;
    let def = store
        .load(name)?
        .ok_or_else(|| Error::NotFound(name.to_string()))?;
    let nl = open()?;
    if let Some(bridge) = nl.link(&def.bridge())?.filter(|l| l.is_bridge()) {
        let ports = reconcile::vm_ports(&nl, &def, &bridge)?;
        if !ports.is_empty() && !force {
            return Err(Error::HasPorts {
                switch: def.name,
                ports: ports.into_iter().map(|p| p.name).collect(),
            });
        }
    }
    reconcile::teardown(&nl, store.dir(), &def)?;
    if def.kind == SwitchKind::Default {
        let leases = dnsmasq::lease_file(store.dir(), &def.name);
        match std::fs::remove_file(&leases) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(error::io_err(leases)(e))
            }
            _ => {}
        }
    }
    store.delete(name)
}

/// The outcome of re-creating one switch.
#[derive(Debug)]
pub struct Applied {
    pub name: String,
    pub result: Result<()>,
}

/// Re-creates every defined switch (after a reboot, or to repair one): existing bridges are
/// reconciled, missing ones made. One switch failing does not stop the others.
pub fn apply(state_dir: &Path) -> Result<Vec<Applied>> {
    let store = Store::open(state_dir)?;
    let _lock = store.lock()?;
    let names = store.names()?;
    if names.is_empty() {
        return Ok(vec![]);
    }
    let nl = open()?;
    Ok(names
        .into_iter()
        .map(|name| {
            let result = store
                .load(&name)
                .and_then(|d| d.ok_or_else(|| Error::NotFound(name.clone())))
                .and_then(|def| reconcile::apply(&nl, store.dir(), &def).map(drop));
            Applied { name, result }
        })
        .collect())
}

/// Makes the existing interface `ifname` (a VM's TAP) a port of the switch with the given
/// VLAN settings, and brings it up. The switch is brought up first if it is not (the Default
/// Switch is created if it is not defined). An interface that is a port of another bridge,
/// or an External switch's adapter, is refused.
pub fn attach(state_dir: &Path, switch: &str, ifname: &str, port: PortSettings) -> Result<()> {
    check_switch_name(switch)?;
    name::check_ifname("interface", ifname)?;
    let entries = port.vlan.entries().map_err(|reason| Error::Invalid {
        field: "VLAN setting",
        value: format!("{:?}", port.vlan),
        reason,
    })?;
    let store = Store::open(state_dir)?;
    let _lock = store.lock()?;
    let def = ensure_locked(&store, switch)?;
    let nl = open()?;
    let bridge = nl
        .link(&def.bridge())?
        .ok_or_else(|| Error::NoInterface(def.bridge()))?;
    let link = nl
        .link(ifname)?
        .ok_or_else(|| Error::NoInterface(ifname.to_string()))?;
    if link.index == bridge.index || link.is_bridge() {
        return Err(Error::Invalid {
            field: "interface",
            value: ifname.to_string(),
            reason: "a bridge cannot be a switch port".into(),
        });
    }
    if let Some(owner) = store
        .list()?
        .into_iter()
        .find(|d| d.adapter.as_deref() == Some(ifname))
    {
        return Err(Error::AdapterInUse {
            adapter: ifname.to_string(),
            reason: format!("is the adapter of switch {:?}", owner.name),
        });
    }
    match link.master {
        Some(m) if m == bridge.index => {}
        Some(m) => {
            let owner = nl
                .link_by_index(m)?
                .map(|l| l.name)
                .unwrap_or_else(|| m.to_string());
            return Err(Error::Invalid {
                field: "interface",
                value: ifname.to_string(),
                reason: format!("it is already a port of {owner}"),
            });
        }
        None => {}
    }
    if !bridge.vlan_filtering && port.vlan != Vlan::Untagged {
        return Err(Error::NoVlans(def.name));
    }
    if link.master.is_none() {
        nl.set_master(&link, &bridge)?;
    }
    if bridge.vlan_filtering {
        reconcile::set_vlans(&nl, &link, &entries, false)?;
    }
    nl.set_up(&link)?;
    Ok(())
}

/// Takes `ifname` off the switch. An interface that no longer exists (its VM is gone) is not
/// an error; one on another bridge, or the switch's External adapter, is.
pub fn detach(state_dir: &Path, switch: &str, ifname: &str) -> Result<()> {
    check_switch_name(switch)?;
    name::check_ifname("interface", ifname)?;
    let store = Store::at(state_dir);
    let def = store
        .load(switch)?
        .ok_or_else(|| Error::NotFound(switch.to_string()))?;
    if def.adapter.as_deref() == Some(ifname) {
        return Err(Error::Invalid {
            field: "interface",
            value: ifname.to_string(),
            reason: format!("it is the adapter of switch {switch:?}; remove the switch instead"),
        });
    }
    let nl = open()?;
    let Some(link) = nl.link(ifname)? else {
        return Ok(());
    };
    let bridge = nl.link(&def.bridge())?;
    if bridge.is_none() || link.master != bridge.map(|b| b.index) {
        return Err(Error::NotAPort {
            switch: switch.to_string(),
            ifname: ifname.to_string(),
        });
    }
    nl.set_nomaster(&link)?;
    Ok(())
}

/// The state directory: the given one, else `$VIRIDIAN_STATE_DIR`, else
/// [`DEFAULT_STATE_DIR`].
pub fn state_dir(given: Option<PathBuf>) -> PathBuf {
    state_dir_from(given, std::env::var_os("VIRIDIAN_STATE_DIR"))
}

fn state_dir_from(given: Option<PathBuf>, env: Option<std::ffi::OsString>) -> PathBuf {
    given
        .or_else(|| env.filter(|e| !e.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_order() {
        let env = Some("/env".into());
        assert_eq!(
            state_dir_from(Some("/given".into()), env.clone()),
            Path::new("/given")
        );
        assert_eq!(state_dir_from(None, env), Path::new("/env"));
        assert_eq!(
            state_dir_from(None, Some("".into())),
            Path::new(DEFAULT_STATE_DIR)
        );
        assert_eq!(state_dir_from(None, None), Path::new(DEFAULT_STATE_DIR));
    }
}
