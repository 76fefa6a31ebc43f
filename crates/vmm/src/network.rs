//! The VM's network adapters (Add-, Remove-, Get-VMNetworkAdapter): each NIC is a TAP device
//! made a port of a virtual switch ([`vswitch`]), behind a synthetic NIC ([`netvsp`]) offered
//! on VMBus. NICs are added when the VM is built and hot-added and removed while it runs.
//!
//! A NIC's slot (0 to [`MAX_NICS`] - 1) gives its VMBus instance GUID and, unless a MAC is
//! given, its MAC address (`vswitch::stable_mac(vm_name, slot)`), so both are the same on
//! every boot. The TAP is named by the kernel (`vif0`, `vif1`, ...), has one queue per vCPU
//! (at most [`MAX_QUEUES`]) and uses the virtio-net header offloads.

use hvdef::vmbus::Guid;
use netvsp::tap::{Tap, TapConfig};
pub use netvsp::{Counters, PortPolicy};
use netvsp::{NetvspDevice, NicConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmbus::host::DeviceId;
use vmbus::VmbusHost;
use vswitch::{PortSettings, Vlan};

/// Synthetic NICs a VM may have (Hyper-V's limit).
pub const MAX_NICS: u32 = 8;
/// Most queues (channels) a NIC gets, whatever the vCPU count.
pub const MAX_QUEUES: u16 = 8;
/// Every NIC's MTU.
const MTU: u32 = 1500;
/// The kernel picks the TAP's name from this template.
const TAP_TEMPLATE: &str = "vif%d";
/// How long a hot remove waits for the TAP to close (the guest releasing the channel).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// One NIC as asked for (`--nic`, `vm nic add`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// The switch's name (`default` is created when missing).
    pub switch: String,
    /// `None`: `vswitch::stable_mac(vm_name, slot)`.
    pub mac: Option<[u8; 6]>,
    pub vlan: Vlan,
    pub policy: PortPolicy,
}

impl NicSpec {
    /// An untagged NIC on `switch` with the default policy (MAC spoofing protection on).
    pub fn on(switch: &str) -> Self {
        Self {
            switch: switch.to_string(),
            mac: None,
            vlan: Vlan::Untagged,
            policy: PortPolicy::default(),
        }
    }
}

/// The network part of a VM's configuration.
#[derive(Debug, Clone, Default)]
pub struct NetworkConfig {
    /// The VM's name, for the NICs' stable MAC addresses.
    pub vm_name: String,
    /// The switches' state directory (see `vswitch::state_dir`).
    pub state_dir: PathBuf,
    /// NICs at start, in slot order.
    pub nics: Vec<NicSpec>,
}

/// Why a NIC could not be added, changed or removed.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("{what}: creating a TAP device needs root (CAP_NET_ADMIN); run viridian as root")]
    NotRoot { what: String },
    #[error("{what}: /dev/net/tun is missing; load the tun module (modprobe tun)")]
    NoTun { what: String },
    #[error("{what}: cannot create a TAP device: {source}")]
    Tap {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: no switch named {switch:?}; create it with `viridian switch new {switch} --type private|internal|external`, or use switch=default")]
    UnknownSwitch { what: String, switch: String },
    #[error("{what}: {source}")]
    Switch {
        what: String,
        #[source]
        source: vswitch::Error,
    },
    #[error("{what}: {source}")]
    Device {
        what: String,
        #[source]
        source: netvsp::NicError,
    },
    #[error("{what}: cannot offer it on VMBus: {source}")]
    Offer {
        what: String,
        #[source]
        source: vmbus::HostError,
    },
    #[error("MAC {mac} is already NIC {slot}'s; give another with mac=")]
    MacInUse { mac: String, slot: u32 },
    #[error("the VM has {MAX_NICS} NICs already, the most it can have")]
    TooMany,
    #[error("no NIC has MAC {0}")]
    NoSuchNic(String),
    #[error(
        "this VM has no VMBus (it runs without Hyper-V enlightenments), so no network adapter"
    )]
    NoVmbus,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The VMBus instance GUID of the NIC in `slot` (stable, so the guest sees the same adapter
/// on every boot).
pub fn nic_instance_id(slot: u32) -> Guid {
    Guid::from_u128(0x5649_5249_4449_414e_0000_0000_4e1c_0000 + u128::from(slot))
}

/// One NIC as it is now (`vm nic list`, `vm status`, `vm inspect`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct NicInfo {
    pub slot: u32,
    pub mac: String,
    pub switch: String,
    pub vlan: Vlan,
    /// The TAP device (the switch port).
    pub tap: String,
    pub instance_id: String,
    pub link_up: bool,
    pub queues: u16,
    pub policy: PortPolicy,
    /// Whether the guest's driver has brought the NIC up (RNDIS initialized).
    pub guest_ready: bool,
    pub subchannels: u16,
    pub counters: Counters,
}

struct Nic {
    spec: NicSpec,
    mac: [u8; 6],
    tap: String,
    device: Arc<NetvspDevice>,
    id: DeviceId,
}

impl Nic {
    fn info(&self, slot: u32) -> NicInfo {
        NicInfo {
            slot,
            mac: mac_string(&self.mac),
            switch: self.spec.switch.clone(),
            vlan: self.spec.vlan.clone(),
            tap: self.tap.clone(),
            instance_id: nic_instance_id(slot).to_string(),
            link_up: self.device.link_up(),
            queues: self.device.queue_stats().len() as u16,
            policy: self.spec.policy,
            guest_ready: self.device.rndis().initialized,
            subchannels: self.device.subchannels(),
            counters: self.device.stats(),
        }
    }
}

/// The VM's NICs.
pub struct Network {
    host: VmbusHost,
    mem: guestmem::GuestMemory,
    vm_name: String,
    state_dir: PathBuf,
    queues: u16,
    nics: Mutex<BTreeMap<u32, Nic>>,
    /// Bytes received and sent by NICs since removed.
    removed_bytes: Mutex<(u64, u64)>,
}

/// The VM's network when it has VMBus (`None` without), with the configured NICs offered.
pub fn start(
    config: &NetworkConfig,
    host: Option<&VmbusHost>,
    mem: &guestmem::GuestMemory,
    vcpus: u32,
) -> Result<Option<Arc<Network>>, NicError> {
    let Some(host) = host else {
        return match config.nics.is_empty() {
            true => Ok(None),
            false => Err(NicError::NoVmbus),
        };
    };
    let net = Network {
        host: host.clone(),
        mem: mem.clone(),
        vm_name: config.vm_name.clone(),
        state_dir: config.state_dir.clone(),
        queues: u16::try_from(vcpus)
            .unwrap_or(u16::MAX)
            .clamp(1, MAX_QUEUES),
        nics: Mutex::default(),
        removed_bytes: Mutex::default(),
    };
    for spec in &config.nics {
        net.add(spec.clone())?;
    }
    Ok(Some(Arc::new(net)))
}

fn tap_error(what: String, e: std::io::Error) -> NicError {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => NicError::NotRoot { what },
        Some(libc::ENOENT | libc::ENODEV) => NicError::NoTun { what },
        _ => NicError::Tap { what, source: e },
    }
}

fn switch_error(what: String, e: vswitch::Error) -> NicError {
    match e {
        vswitch::Error::NotFound(switch) => NicError::UnknownSwitch { what, switch },
        source => NicError::Switch { what, source },
    }
}

impl Network {
    /// Adds a NIC in the lowest free slot: creates its TAP, attaches it to the switch and
    /// offers the device (hot-plug when the guest is running). Returns the NIC.
    pub fn add(&self, spec: NicSpec) -> Result<NicInfo, NicError> {
        let mut nics = support::lock(&self.nics);
        let slot = (0..MAX_NICS)
            .find(|s| !nics.contains_key(s))
            .ok_or(NicError::TooMany)?;
        let mac = spec
            .mac
            .unwrap_or_else(|| vswitch::stable_mac(&self.vm_name, slot));
        if let Some((&other, _)) = nics.iter().find(|(_, n)| n.mac == mac) {
            return Err(NicError::MacInUse {
                mac: mac_string(&mac),
                slot: other,
            });
        }
        let what = format!("NIC {} on switch {}", mac_string(&mac), spec.switch);
        let tap = Tap::open(&TapConfig {
            name: Some(TAP_TEMPLATE.into()),
            queues: self.queues,
            offload: true,
            mtu: MTU,
        })
        .map_err(|e| tap_error(what.clone(), e))?;
        let tap_name = tap.name().to_string();
        vswitch::attach(
            &self.state_dir,
            &spec.switch,
            &tap_name,
            PortSettings {
                vlan: spec.vlan.clone(),
            },
        )
        .map_err(|e| switch_error(what.clone(), e))?;
        let device = NetvspDevice::new(
            NicConfig {
                instance_id: nic_instance_id(slot),
                mac,
                mtu: MTU,
                max_queues: self.queues,
                policy: spec.policy,
            },
            self.mem.clone(),
            tap,
        )
        .map_err(|source| NicError::Device {
            what: what.clone(),
            source,
        })?;
        let id = self
            .host
            .add_device(device.clone())
            .map_err(|source| NicError::Offer { what, source })?;
        let nic = Nic {
            spec,
            mac,
            tap: tap_name,
            device,
            id,
        };
        let info = nic.info(slot);
        nics.insert(slot, nic);
        tracing::info!(mac = %info.mac, tap = %info.tap, switch = %info.switch, "NIC added");
        Ok(info)
    }

    /// Hot remove: rescinds the NIC's channels, takes its TAP off the switch and waits (a
    /// few seconds at most) for the TAP to close, which happens once the guest has released
    /// the channel. Returns the NIC as it was and whether its TAP is closed.
    pub fn remove(&self, mac: &[u8; 6]) -> Result<(NicInfo, bool), NicError> {
        let (slot, nic) = {
            let mut nics = support::lock(&self.nics);
            let slot = nics.iter().find(|(_, n)| &n.mac == mac).map(|(&s, _)| s);
            slot.and_then(|s| nics.remove(&s).map(|n| (s, n)))
                .ok_or_else(|| NicError::NoSuchNic(mac_string(mac)))?
        };
        let info = nic.info(slot);
        let what = format!("NIC {}", info.mac);
        if let Err(source) = self.host.remove_device(nic.id) {
            support::lock(&self.nics).insert(slot, nic);
            return Err(NicError::Offer { what, source });
        }
        if let Err(e) = vswitch::detach(&self.state_dir, &nic.spec.switch, &nic.tap) {
            tracing::warn!("{what}: cannot take {} off its switch: {e}", nic.tap);
        }
        drop(nic);
        let mut gone = support::lock(&self.removed_bytes);
        gone.0 += info.counters.rx_bytes;
        gone.1 += info.counters.tx_bytes;
        drop(gone);
        let sys = PathBuf::from("/sys/class/net").join(&info.tap);
        let deadline = Instant::now() + CLOSE_WAIT;
        while sys.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((info, !sys.exists()))
    }

    /// Connects (`up`) or disconnects the cable of the NIC with `mac`, or of every NIC; the
    /// guest gets a media connect or disconnect indication. Returns the NICs changed.
    pub fn set_link(&self, mac: Option<&[u8; 6]>, up: bool) -> Result<Vec<NicInfo>, NicError> {
        let nics = support::lock(&self.nics);
        let chosen: Vec<(&u32, &Nic)> = nics
            .iter()
            .filter(|(_, n)| mac.is_none_or(|m| &n.mac == m))
            .collect();
        if let (Some(m), true) = (mac, chosen.is_empty()) {
            return Err(NicError::NoSuchNic(mac_string(m)));
        }
        Ok(chosen
            .into_iter()
            .map(|(&slot, n)| {
                n.device.set_link(up);
                n.info(slot)
            })
            .collect())
    }

    /// Bytes the guest received and sent through every NIC it has had (Measure-VM).
    pub fn bytes(&self) -> (u64, u64) {
        let (mut rx, mut tx) = *support::lock(&self.removed_bytes);
        for n in support::lock(&self.nics).values() {
            let c = n.device.stats();
            rx += c.rx_bytes;
            tx += c.tx_bytes;
        }
        (rx, tx)
    }

    /// Every NIC, by slot.
    pub fn list(&self) -> Vec<NicInfo> {
        support::lock(&self.nics)
            .iter()
            .map(|(&slot, n)| n.info(slot))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_and_macs_are_stable_per_slot() {
        let ids: std::collections::BTreeSet<String> = (0..MAX_NICS)
            .map(|s| nic_instance_id(s).to_string())
            .collect();
        assert_eq!(ids.len(), MAX_NICS as usize);
        assert!(nic_instance_id(3).to_string().ends_with("4e1c0003"));
        assert_ne!(nic_instance_id(0), crate::vmbus_host::scsi_instance_id(0));
        assert_eq!(
            mac_string(&[0, 0x15, 0x5d, 1, 0xab, 0xff]),
            "00:15:5d:01:ab:ff"
        );
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = tap_error(
            "NIC x".into(),
            std::io::Error::from_raw_os_error(libc::EPERM),
        );
        assert!(e.to_string().contains("run viridian as root"), "{e}");
        let e = tap_error(
            "NIC x".into(),
            std::io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert!(e.to_string().contains("modprobe tun"), "{e}");
        let e = switch_error("NIC x".into(), vswitch::Error::NotFound("lab".into()));
        assert!(
            e.to_string().contains("viridian switch new lab --type"),
            "{e}"
        );
    }
}
