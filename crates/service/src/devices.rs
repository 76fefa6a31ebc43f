//! Drives and network adapters as VM settings: placement on the SCSI controllers, checks of
//! the files and switches they name, and the worker's command-line arguments for them.

use crate::db::{Settings, VmRow};
use crate::error::ApiError;
use api::{
    AdapterVlan, DvdDrive, HardDisk, NetworkAdapter, NewDvdDrive, NewHardDisk, NewNetworkAdapter,
    MAX_CONTROLLERS, MAX_LOCATIONS, MAX_TRUNK_IDS,
};
use std::path::Path;

/// Most network adapters per VM (Hyper-V allows 8 synthetic adapters on a generation 1 VM,
/// 64 on generation 2; a VMBus offer each).
pub const MAX_NICS: usize = 64;

/// Locations in use: disks and DVD drives share the controllers.
fn used(s: &Settings) -> impl Iterator<Item = (u8, u8)> + '_ {
    s.disks
        .iter()
        .map(|d| (d.controller, d.location))
        .chain(s.dvds.iter().map(|d| (d.controller, d.location)))
}

/// Where a new drive goes: the given place if it is free, else the lowest free location (on
/// the given controller, or on controller 0 and then the next ones).
pub fn place(
    s: &Settings,
    field: &str,
    controller: Option<u8>,
    location: Option<u8>,
) -> Result<(u8, u8), ApiError> {
    if let Some(c) = controller.filter(|&c| c >= MAX_CONTROLLERS) {
        return Err(ApiError::invalid(format!(
            "{field}.controller: {c} is out of range; use 0 to {}",
            MAX_CONTROLLERS - 1
        )));
    }
    if let Some(l) = location.filter(|&l| l >= MAX_LOCATIONS) {
        return Err(ApiError::invalid(format!(
            "{field}.location: {l} is out of range; use 0 to {}",
            MAX_LOCATIONS - 1
        )));
    }
    let taken: Vec<(u8, u8)> = used(s).collect();
    let controllers: Vec<u8> = match controller {
        Some(c) => vec![c],
        None => (0..MAX_CONTROLLERS).collect(),
    };
    if let Some(l) = location {
        let c = controllers[0];
        if taken.contains(&(c, l)) {
            return Err(ApiError::conflict(format!(
                "{field}: controller {c} location {l} is in use; pick another location or leave it out"
            )));
        }
        return Ok((c, l));
    }
    controllers
        .iter()
        .find_map(|&c| {
            (0..MAX_LOCATIONS)
                .find(|l| !taken.contains(&(c, *l)))
                .map(|l| (c, l))
        })
        .ok_or_else(|| ApiError::conflict(format!("{field}: every SCSI location is in use")))
}

/// Checks a disk to attach to VM `vm_id`: an existing image of a format the worker opens,
/// not written by another VM (a read-only disk may be shared with other read-only users).
pub fn disk(
    req: &NewHardDisk,
    vm_id: &str,
    s: &Settings,
    all: &[VmRow],
) -> Result<HardDisk, ApiError> {
    let path = crate::validate::file("disks.path", &req.path)?;
    vhdx::open::probe(&path).map_err(|e| ApiError::invalid(format!("disks.path: {e}")))?;
    let canonical = std::fs::canonicalize(&path)
        .map_err(|e| ApiError::invalid(format!("disks.path: '{path}': {e}")))?;
    for row in all {
        let settings = if row.id == vm_id { s } else { &row.settings };
        for d in &settings.disks {
            let same = std::fs::canonicalize(&d.path).is_ok_and(|p| p == canonical);
            if same && (row.id == vm_id || !(d.read_only && req.read_only)) {
                return Err(ApiError::conflict(format!(
                    "disks.path: '{path}' is already a disk of VM '{}'{}",
                    row.name,
                    if row.id == vm_id {
                        ""
                    } else {
                        "; a disk can be shared only read-only by every VM"
                    }
                )));
            }
        }
    }
    let (controller, location) = place(s, "disks", req.controller, req.location)?;
    Ok(HardDisk {
        path,
        controller,
        location,
        read_only: req.read_only,
        cache: req.cache,
    })
}

/// Checks a DVD drive to add; it goes after the disks unless placed.
pub fn dvd(req: &NewDvdDrive, s: &Settings) -> Result<DvdDrive, ApiError> {
    let path = req
        .path
        .as_deref()
        .map(|p| crate::validate::file("dvds.path", p))
        .transpose()?;
    let (controller, location) = place(s, "dvds", req.controller, req.location)?;
    Ok(DvdDrive {
        path,
        controller,
        location,
    })
}

/// Checks an ISO for a DVD drive's medium.
pub fn media(path: Option<&str>) -> Result<Option<String>, ApiError> {
    path.map(|p| crate::validate::file("path", p)).transpose()
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with dashes) into a unicast MAC.
pub fn parse_mac(field: &str, m: &str) -> Result<[u8; 6], ApiError> {
    let parts: Vec<&str> = m.split([':', '-']).collect();
    let bad = || {
        ApiError::invalid(format!(
            "{field}: '{m}' is not a MAC address like 00:15:5d:01:02:03"
        ))
    };
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(ApiError::invalid(format!(
            "{field}: '{m}' is a multicast or zero address; give a unicast one"
        )));
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Checks a network adapter to add to VM `vm_id`: a switch defined on this host (or the
/// Default Switch), a free MAC (derived from the VM's id and a free index by default) and an
/// access VLAN in 1..=4094.
pub fn nic(
    req: &NewNetworkAdapter,
    vm_id: &str,
    s: &Settings,
    state_dir: &Path,
) -> Result<NetworkAdapter, ApiError> {
    if s.nics.len() >= MAX_NICS {
        return Err(ApiError::conflict(format!(
            "nics: a VM has at most {MAX_NICS} network adapters"
        )));
    }
    vswitch::check_switch_name(&req.switch)
        .map_err(|e| ApiError::invalid(format!("nics.switch: {e}")))?;
    let defined = vswitch::definition(state_dir, &req.switch)
        .map_err(|e| ApiError::conflict(format!("nics.switch: {e}")))?;
    if req.switch != vswitch::DEFAULT_SWITCH && defined.is_none() {
        return Err(ApiError::invalid(format!(
            "nics.switch: no switch '{}' is defined; create it with `viridian switch new {} --type private|internal|external` or use `default`",
            req.switch, req.switch
        )));
    }
    if let Some(v) = &req.vlan {
        check_vlan("nics.vlan", v)?;
    }
    let taken: Vec<&str> = s.nics.iter().map(|n| n.mac.as_str()).collect();
    let mac = match &req.mac {
        Some(m) => {
            let mac = format_mac(&parse_mac("nics.mac", m)?);
            if taken.contains(&mac.as_str()) {
                return Err(ApiError::conflict(format!(
                    "nics.mac: the VM already has an adapter with MAC {mac}"
                )));
            }
            mac
        }
        None => (0u32..)
            .map(|i| format_mac(&vswitch::stable_mac(vm_id, i)))
            .find(|m| !taken.contains(&m.as_str()))
            .expect("a free index among 2^32"),
    };
    Ok(NetworkAdapter {
        switch: req.switch.clone(),
        mac,
        vlan: req.vlan.clone(),
        mac_spoofing: req.mac_spoofing,
        dhcp_guard: req.dhcp_guard,
        router_guard: req.router_guard,
        connected: true,
    })
}

fn check_vid(field: &str, v: u16) -> Result<(), ApiError> {
    if (1..=vswitch::MAX_VID).contains(&v) {
        return Ok(());
    }
    Err(ApiError::invalid(format!(
        "{field}: {v} is not a VLAN id; use 1 to {}",
        vswitch::MAX_VID
    )))
}

/// Checks a VLAN setting: ids in 1..=4094; a trunk allows each id once, at least one, and
/// its native VLAN is one of them (as on Hyper-V).
pub fn check_vlan(field: &str, v: &AdapterVlan) -> Result<(), ApiError> {
    let t = match v {
        AdapterVlan::Access(id) => return check_vid(field, *id),
        AdapterVlan::Trunk(t) => t,
    };
    let allowed = format!("{field}.allowed");
    if t.allowed.is_empty() || t.allowed.len() > MAX_TRUNK_IDS {
        return Err(ApiError::invalid(format!(
            "{allowed}: a trunk allows 1 to {MAX_TRUNK_IDS} VLAN ids, not {}",
            t.allowed.len()
        )));
    }
    let mut seen = vec![false; usize::from(vswitch::MAX_VID) + 1];
    for &id in &t.allowed {
        check_vid(&allowed, id)?;
        if std::mem::replace(&mut seen[usize::from(id)], true) {
            return Err(ApiError::invalid(format!(
                "{allowed}: VLAN {id} is listed twice"
            )));
        }
    }
    if let Some(n) = t.native {
        check_vid(&format!("{field}.native"), n)?;
        if !seen[usize::from(n)] {
            return Err(ApiError::invalid(format!(
                "{field}.native: VLAN {n} is not among the allowed ids; add it to allowed"
            )));
        }
    }
    Ok(())
}

/// A network adapter as the worker's `--nic` value (and `nic-add` argument).
pub fn nic_spec(n: &NetworkAdapter) -> String {
    let mut a = format!("switch={},mac={}", n.switch, n.mac);
    if let Some(v) = &n.vlan {
        a.push_str(&format!(",vlan={v}"));
    }
    for (field, on) in [
        ("mac-spoofing", n.mac_spoofing),
        ("dhcp-guard", n.dhcp_guard),
        ("router-guard", n.router_guard),
    ] {
        if on {
            a.push_str(&format!(",{field}=on"));
        }
    }
    a
}

/// The worker's `--disk`, `--dvd` and `--nic` arguments for these settings.
pub fn worker_args(s: &Settings) -> Vec<String> {
    let mut args = Vec::new();
    for d in &s.disks {
        args.push(format!(
            "--disk={},controller={},location={},cache={}{}",
            d.path,
            d.controller,
            d.location,
            d.cache.name(),
            if d.read_only { ",readonly" } else { "" }
        ));
    }
    for d in &s.dvds {
        args.push(format!(
            "--dvd={},controller={},location={}",
            d.path.as_deref().unwrap_or("none"),
            d.controller,
            d.location
        ));
    }
    for i in &s.disabled_integration {
        args.push(format!("--disable-integration={i}"));
    }
    for n in &s.nics {
        args.push(format!("--nic={}", nic_spec(n)));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        serde_json::from_value(serde_json::json!({
            "cpus": 1, "memory": 67108864, "kernel": "/k", "initrd": null, "cmdline": "",
            "hyperv": true, "cpu_limit": 100, "cpu_reserve": 0, "cpu_weight": 100
        }))
        .unwrap()
    }

    #[test]
    fn drives_fill_controller_0_then_the_next() {
        let mut s = settings();
        assert_eq!(place(&s, "disks", None, None).unwrap(), (0, 0));
        for l in 0..MAX_LOCATIONS {
            s.disks.push(HardDisk {
                path: "/d".into(),
                controller: 0,
                location: l,
                read_only: false,
                cache: api::DiskCache::None,
            });
        }
        assert_eq!(place(&s, "dvds", None, None).unwrap(), (1, 0));
        assert_eq!(place(&s, "dvds", Some(2), None).unwrap(), (2, 0));
        let e = place(&s, "disks", Some(0), None).unwrap_err();
        assert_eq!(e.status.as_u16(), 409);
        let e = place(&s, "disks", Some(0), Some(5)).unwrap_err();
        assert!(e.message.contains("location 5 is in use"), "{}", e.message);
        let e = place(&s, "disks", Some(4), None).unwrap_err();
        assert!(
            e.message.contains("controller: 4 is out of range"),
            "{}",
            e.message
        );
        let e = place(&s, "disks", None, Some(64)).unwrap_err();
        assert!(
            e.message.contains("location: 64 is out of range"),
            "{}",
            e.message
        );
    }

    #[test]
    fn macs_are_parsed_and_checked() {
        assert_eq!(
            parse_mac("m", "00-15-5D-01-02-0a").unwrap(),
            [0, 0x15, 0x5d, 1, 2, 10]
        );
        for bad in [
            "",
            "00:15:5d:01:02",
            "00:15:5d:01:02:zz",
            "01:00:5e:00:00:01",
            "0:15:5d:1:2:3",
        ] {
            assert!(parse_mac("m", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn worker_arguments_place_every_drive_and_adapter() {
        let mut s = settings();
        s.disks.push(HardDisk {
            path: "/a.vhdx".into(),
            controller: 0,
            location: 0,
            read_only: true,
            cache: api::DiskCache::Writeback,
        });
        s.dvds.push(DvdDrive {
            path: None,
            controller: 0,
            location: 1,
        });
        s.nics.push(NetworkAdapter {
            switch: "lab".into(),
            mac: "00:15:5d:00:00:01".into(),
            vlan: Some(AdapterVlan::Access(10)),
            mac_spoofing: true,
            dhcp_guard: false,
            router_guard: false,
            connected: true,
        });
        s.nics.push(NetworkAdapter {
            switch: "t".into(),
            mac: "00:15:5d:00:00:02".into(),
            vlan: Some(AdapterVlan::Trunk(api::VlanTrunk {
                allowed: vec![10, 20],
                native: Some(20),
            })),
            mac_spoofing: false,
            dhcp_guard: true,
            router_guard: true,
            connected: true,
        });
        assert_eq!(
            worker_args(&s),
            [
                "--disk=/a.vhdx,controller=0,location=0,cache=writeback,readonly",
                "--dvd=none,controller=0,location=1",
                "--nic=switch=lab,mac=00:15:5d:00:00:01,vlan=10,mac-spoofing=on",
                "--nic=switch=t,mac=00:15:5d:00:00:02,vlan=trunk:10,20;native=20,dhcp-guard=on,router-guard=on"
            ]
        );
    }

    #[test]
    fn disks_stored_before_the_cache_mode_are_unbuffered() {
        let old: HardDisk = serde_json::from_value(serde_json::json!({
            "path": "/a.vhdx", "controller": 0, "location": 1, "read_only": false
        }))
        .unwrap();
        assert_eq!(old.cache, api::DiskCache::None);
    }

    #[test]
    fn settings_stored_before_trunks_and_guards_still_read() {
        let old: NetworkAdapter = serde_json::from_value(serde_json::json!({
            "switch": "lab", "mac": "00:15:5d:00:00:01", "vlan": 7, "mac_spoofing": false
        }))
        .unwrap();
        assert_eq!(old.vlan, Some(AdapterVlan::Access(7)));
        assert!(!old.dhcp_guard && !old.router_guard && old.connected);
        let untagged: NetworkAdapter = serde_json::from_value(serde_json::json!({
            "switch": "lab", "mac": "00:15:5d:00:00:01", "vlan": null, "mac_spoofing": false,
            "connected": false
        }))
        .unwrap();
        assert_eq!(untagged.vlan, None);
        assert_eq!(
            serde_json::to_value(&old).unwrap()["vlan"],
            7,
            "an access VLAN is still written as the bare id"
        );
    }

    #[test]
    fn vlans_are_checked_naming_the_field() {
        let trunk = |allowed: Vec<u16>, native: Option<u16>| {
            AdapterVlan::Trunk(api::VlanTrunk { allowed, native })
        };
        let msg = |v: AdapterVlan| check_vlan("nics.vlan", &v).unwrap_err().message;
        assert!(check_vlan("v", &AdapterVlan::Access(1)).is_ok());
        assert!(check_vlan("v", &AdapterVlan::Access(4094)).is_ok());
        assert!(check_vlan("v", &trunk(vec![10, 20], Some(10))).is_ok());
        assert!(check_vlan("v", &trunk((1..=4094).collect(), None)).is_ok());
        assert!(msg(AdapterVlan::Access(0)).starts_with("nics.vlan: 0 is not a VLAN id"));
        assert!(msg(AdapterVlan::Access(4095)).starts_with("nics.vlan: 4095"));
        assert!(msg(trunk(vec![], None)).starts_with("nics.vlan.allowed: a trunk allows"));
        let mut too_many: Vec<u16> = (1..=4094).collect();
        too_many.push(1);
        assert!(msg(trunk(too_many, None)).contains("not 4095"));
        assert!(msg(trunk(vec![10, 4095], None)).starts_with("nics.vlan.allowed: 4095"));
        assert!(msg(trunk(vec![10, 10], None)).contains("VLAN 10 is listed twice"));
        assert!(msg(trunk(vec![10, 20], Some(1))).starts_with("nics.vlan.native: VLAN 1 is not"));
        assert!(msg(trunk(vec![10], Some(0))).starts_with("nics.vlan.native: 0"));
    }
}
