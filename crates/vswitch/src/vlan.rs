//! Port VLAN settings and the bridge VLAN entries they turn into.
//!
//! Every switch bridge filters by VLAN. VLAN 1 is the switch's untagged VLAN: an `Untagged`
//! port and the host interface (for Internal, External and Default switches) are in it with
//! PVID and egress-untagged, so untagged frames between them flow. An `Access(id)` port is in
//! VLAN `id` only, untagged, like Hyper-V's `Set-VMNetworkAdapterVlan -Access -VlanId id`.
//! A `Trunk` port carries its allowed VLANs tagged and, if given, its native VLAN untagged.

use serde::{Deserialize, Serialize};

/// The highest usable 802.1Q VLAN id (4095 is reserved).
pub const MAX_VID: u16 = 4094;
/// The switch's untagged VLAN.
pub const UNTAGGED_VID: u16 = 1;

/// How a port takes part in VLANs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Vlan {
    /// In the switch's untagged VLAN (VLAN 1), with the host interface.
    #[default]
    Untagged,
    /// In one VLAN, untagged on the port.
    Access(u16),
    /// Several VLANs tagged on the port; `native`, if given, untagged.
    Trunk {
        allowed: Vec<u16>,
        native: Option<u16>,
    },
}

/// A port's configuration on its switch.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PortSettings {
    pub vlan: Vlan,
}

/// One VLAN membership of a bridge port (or of the bridge itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct VlanEntry {
    pub vid: u16,
    /// Untagged frames arriving on the port are put in this VLAN.
    pub pvid: bool,
    /// Frames of this VLAN leave the port without a tag.
    pub untagged: bool,
}

impl VlanEntry {
    pub fn access(vid: u16) -> Self {
        VlanEntry {
            vid,
            pvid: true,
            untagged: true,
        }
    }

    pub fn tagged(vid: u16) -> Self {
        VlanEntry {
            vid,
            pvid: false,
            untagged: false,
        }
    }
}

fn check_vid(vid: u16) -> Result<u16, String> {
    if (1..=MAX_VID).contains(&vid) {
        Ok(vid)
    } else {
        Err(format!("VLAN id {vid} is outside 1-{MAX_VID}"))
    }
}

impl Vlan {
    /// The entries a port with this setting has, sorted by VLAN id.
    pub fn entries(&self) -> Result<Vec<VlanEntry>, String> {
        let mut out = match self {
            Vlan::Untagged => vec![VlanEntry::access(UNTAGGED_VID)],
            Vlan::Access(vid) => vec![VlanEntry::access(check_vid(*vid)?)],
            Vlan::Trunk { allowed, native } => {
                if allowed.is_empty() && native.is_none() {
                    return Err("a trunk needs at least one allowed or native VLAN".into());
                }
                let mut out = Vec::with_capacity(allowed.len() + 1);
                for vid in allowed {
                    check_vid(*vid)?;
                    if Some(*vid) != *native {
                        out.push(VlanEntry::tagged(*vid));
                    }
                }
                if let Some(n) = native {
                    out.push(VlanEntry::access(check_vid(*n)?));
                }
                out
            }
        };
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The entries of an External switch's uplink: the untagged VLAN as PVID, every other VLAN
/// tagged, so VMs' VLANs reach the physical network.
pub fn uplink_entries() -> Vec<VlanEntry> {
    std::iter::once(VlanEntry::access(UNTAGGED_VID))
        .chain((UNTAGGED_VID + 1..=MAX_VID).map(VlanEntry::tagged))
        .collect()
}

/// Consecutive VLAN ids with the same flags, as one netlink range entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u16,
    pub last: u16,
    pub pvid: bool,
    pub untagged: bool,
}

/// Groups sorted entries into runs. The kernel refuses a PVID inside a range, so a PVID entry
/// is always a run of its own.
pub fn runs(entries: &[VlanEntry]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for e in entries {
        if let Some(last) = out.last_mut() {
            if !e.pvid
                && !last.pvid
                && last.untagged == e.untagged
                && last.last.checked_add(1) == Some(e.vid)
            {
                last.last = e.vid;
                continue;
            }
        }
        out.push(Run {
            first: e.vid,
            last: e.vid,
            pvid: e.pvid,
            untagged: e.untagged,
        });
    }
    out
}

/// What to remove and what to add to turn `current` into `wanted`: entries whose VLAN is not
/// wanted go; wanted entries that are missing or have other flags are (re)added.
pub fn diff(current: &[VlanEntry], wanted: &[VlanEntry]) -> (Vec<VlanEntry>, Vec<VlanEntry>) {
    let remove = current
        .iter()
        .filter(|c| !wanted.iter().any(|w| w.vid == c.vid))
        .copied()
        .collect();
    let add = wanted
        .iter()
        .filter(|w| !current.contains(w))
        .copied()
        .collect();
    (remove, add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_entries() {
        assert_eq!(
            Vlan::Untagged.entries().unwrap(),
            vec![VlanEntry::access(1)]
        );
        assert_eq!(
            Vlan::Access(42).entries().unwrap(),
            vec![VlanEntry::access(42)]
        );
        let trunk = Vlan::Trunk {
            allowed: vec![30, 10, 20, 10],
            native: Some(20),
        };
        assert_eq!(
            trunk.entries().unwrap(),
            vec![
                VlanEntry::tagged(10),
                VlanEntry::access(20),
                VlanEntry::tagged(30)
            ]
        );
        for bad in [
            Vlan::Access(0),
            Vlan::Access(4095),
            Vlan::Trunk {
                allowed: vec![],
                native: None,
            },
            Vlan::Trunk {
                allowed: vec![5000],
                native: None,
            },
            Vlan::Trunk {
                allowed: vec![2],
                native: Some(0),
            },
        ] {
            assert!(bad.entries().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn runs_keep_pvid_alone() {
        let r = runs(&uplink_entries());
        assert_eq!(
            r,
            vec![
                Run {
                    first: 1,
                    last: 1,
                    pvid: true,
                    untagged: true
                },
                Run {
                    first: 2,
                    last: 4094,
                    pvid: false,
                    untagged: false
                },
            ]
        );
        let r = runs(&[
            VlanEntry::tagged(5),
            VlanEntry::tagged(7),
            VlanEntry::tagged(8),
        ]);
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].first, r[1].last), (7, 8));
    }

    #[test]
    fn diff_updates_flags_and_drops_strays() {
        let current = [
            VlanEntry::access(1),
            VlanEntry::tagged(5),
            VlanEntry::tagged(9),
        ];
        let wanted = [
            VlanEntry::tagged(1),
            VlanEntry::tagged(5),
            VlanEntry::access(7),
        ];
        let (remove, add) = diff(&current, &wanted);
        assert_eq!(remove, vec![VlanEntry::tagged(9)]);
        assert_eq!(add, vec![VlanEntry::tagged(1), VlanEntry::access(7)]);
    }
}
