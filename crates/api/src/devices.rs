//! A VM's drives and network adapters as settings (Get-/Add-/Remove-VMHardDiskDrive,
//! -VMDvdDrive, -VMNetworkAdapter).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// SCSI controllers per VM (Hyper-V's limit).
pub const MAX_CONTROLLERS: u8 = 4;
/// Locations per SCSI controller.
pub const MAX_LOCATIONS: u8 = 64;

/// A disk on one of the VM's SCSI controllers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HardDisk {
    /// A VHDX, VHD or raw image on the host.
    pub path: String,
    #[schema(maximum = 3)]
    pub controller: u8,
    #[schema(maximum = 63)]
    pub location: u8,
    pub read_only: bool,
    /// `none` also for disks stored before the service knew cache modes.
    #[serde(default)]
    pub cache: DiskCache,
}

/// Whether a disk's data goes through the host's page cache (`viridian run --disk
/// PATH,cache=...`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// Unbuffered (`O_DIRECT`), as Hyper-V: the guest's writes are on the disk when it is told
    /// they are done.
    #[default]
    None,
    /// Through the host's page cache.
    Writeback,
}

impl DiskCache {
    /// The worker's spelling (`--disk PATH,cache=NAME`).
    pub fn name(self) -> &'static str {
        match self {
            DiskCache::None => "none",
            DiskCache::Writeback => "writeback",
        }
    }
}

/// A disk to attach. Without `controller` and `location` it goes on controller 0 at the
/// lowest free location.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewHardDisk {
    /// An existing VHDX, VHD or raw image (absolute path), not another VM's writable disk.
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    #[schema(maximum = 3)]
    pub controller: Option<u8>,
    #[serde(default)]
    #[schema(maximum = 63)]
    pub location: Option<u8>,
    #[serde(default)]
    pub cache: DiskCache,
}

/// A new dynamic VHDX the service creates for the VM (`vm new --new-disk PATH --size SIZE`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDiskFile {
    /// Where to create it: absolute, or relative to the VM's folder. Must not exist.
    pub path: String,
    /// Virtual size with a unit, e.g. `20G`.
    pub size: String,
}

/// A DVD drive, empty or holding an ISO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DvdDrive {
    pub path: Option<String>,
    #[schema(maximum = 3)]
    pub controller: u8,
    #[schema(maximum = 63)]
    pub location: u8,
}

/// A DVD drive to add; placed after the disks unless given a place.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDvdDrive {
    /// An ISO on the host (absolute path); absent for an empty drive.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    #[schema(maximum = 3)]
    pub controller: Option<u8>,
    #[serde(default)]
    #[schema(maximum = 63)]
    pub location: Option<u8>,
}

/// The medium of a DVD drive (Set-VMDvdDrive): an ISO, or none to eject.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DvdMedia {
    #[serde(default)]
    pub path: Option<String>,
}

/// Most VLAN ids a trunk allows (every usable id once).
pub const MAX_TRUNK_IDS: usize = 4094;

/// A network adapter's VLAN (Set-VMNetworkAdapterVlan): an access VLAN id (`-Access
/// -VlanId`), or a trunk (`-Trunk -AllowedVlanIdList -NativeVlanId`). Absent (null) means
/// untagged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum AdapterVlan {
    /// An access VLAN id (1 to 4094): the guest's frames are untagged, in this VLAN.
    Access(u16),
    Trunk(VlanTrunk),
}

/// `10`, or `trunk:10,20;native=20` as `viridian run --nic ...,vlan=` takes it.
impl std::fmt::Display for AdapterVlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = match self {
            AdapterVlan::Access(id) => return write!(f, "{id}"),
            AdapterVlan::Trunk(t) => t,
        };
        let ids: Vec<String> = t.allowed.iter().map(u16::to_string).collect();
        write!(f, "trunk:{}", ids.join(","))?;
        match t.native {
            Some(n) => write!(f, ";native={n}"),
            None => Ok(()),
        }
    }
}

/// A trunk port: the guest tags its frames with the allowed VLAN ids; the native VLAN's
/// frames go untagged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VlanTrunk {
    /// VLAN ids 1 to 4094, each at most once.
    #[schema(min_items = 1, max_items = 4094, inline)]
    pub allowed: Vec<u16>,
    /// One of the allowed ids, carried untagged.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 4094)]
    pub native: Option<u16>,
}

/// A synthetic network adapter on a virtual switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkAdapter {
    pub switch: String,
    /// `00:15:5d:..` unless given.
    pub mac: String,
    /// Absent (null) means untagged.
    pub vlan: Option<AdapterVlan>,
    /// Whether the guest may send frames with other source MACs.
    pub mac_spoofing: bool,
    /// Whether DHCP server messages the guest sends are dropped (Set-VMNetworkAdapter
    /// -DhcpGuard).
    #[serde(default)]
    pub dhcp_guard: bool,
    /// Whether router advertisements and redirects the guest sends are dropped
    /// (Set-VMNetworkAdapter -RouterGuard).
    #[serde(default)]
    pub router_guard: bool,
    /// Whether the cable is in (Connect-/Disconnect-VMNetworkAdapter): the guest sees its
    /// carrier.
    #[serde(default = "yes")]
    pub connected: bool,
}

fn yes() -> bool {
    true
}

/// A network adapter with, while its VM runs, what its worker reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkAdapterStatus {
    #[serde(flatten)]
    pub adapter: NetworkAdapter,
    /// Absent while the VM has no worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<NicLive>,
}

/// A running VM's adapter as its worker has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NicLive {
    /// The VMBus slot.
    pub slot: u32,
    /// The TAP device (the switch port).
    pub tap: String,
    /// The VMBus instance GUID.
    pub instance_id: String,
    /// Whether the guest sees a carrier.
    pub link_up: bool,
    /// Whether the guest's driver has brought the adapter up.
    pub guest_ready: bool,
    pub queues: u16,
    pub subchannels: u16,
    /// Packets, bytes and drops by reason since the worker started (`tx_packets`,
    /// `rx_bytes`, `drop_spoofed_mac`, ...).
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// A change to a network adapter. The cable changes on a running VM too; the VLAN and the
/// guards change while the VM is Off (409 naming the field otherwise).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkAdapterPatch {
    /// Connect (true) or disconnect (false) the cable; a running guest sees its carrier change.
    #[serde(default)]
    pub connected: Option<bool>,
    /// A new VLAN; null makes the adapter untagged, absent leaves it.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable)]
    pub vlan: Option<Option<AdapterVlan>>,
    #[serde(default)]
    pub mac_spoofing: Option<bool>,
    #[serde(default)]
    pub dhcp_guard: Option<bool>,
    #[serde(default)]
    pub router_guard: Option<bool>,
}

/// A field that is there, null or not (absent stays `None` through `default`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A network adapter to add.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNetworkAdapter {
    /// A defined switch, or `default` (created when first used).
    pub switch: String,
    /// A unicast MAC like `00:15:5d:01:02:03`; default: derived from the VM and the index.
    #[serde(default)]
    pub mac: Option<String>,
    /// Absent (null): untagged.
    #[serde(default)]
    pub vlan: Option<AdapterVlan>,
    #[serde(default)]
    pub mac_spoofing: bool,
    #[serde(default)]
    pub dhcp_guard: bool,
    #[serde(default)]
    pub router_guard: bool,
}

/// Resource use of a running VM since it started (Measure-VM).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmMeasure {
    pub uptime_secs: u64,
    /// User and system CPU time of the worker (vCPUs and devices), in seconds.
    pub cpu_seconds: f64,
    /// Guest memory the VM was given.
    pub memory_bytes: u64,
    /// The worker's resident memory.
    pub resident_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_written_bytes: u64,
    pub network_received_bytes: u64,
    pub network_sent_bytes: u64,
}

/// An integration service (Get-VMIntegrationService).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IntegrationService {
    /// `Heartbeat`, `Key-Value Pair Exchange`, `Shutdown` or `Time Synchronization`.
    pub name: String,
    pub enabled: bool,
    /// On a running VM: `OK`, `No Contact` or `Lost Communication`; empty otherwise.
    pub status: String,
}

/// Enable-/Disable-VMIntegrationService.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntegrationChange {
    pub enabled: bool,
}

/// The integration services, by Hyper-V's name and the short one the CLI takes.
pub const INTEGRATION_SERVICES: [(&str, &str); 4] = [
    ("Heartbeat", "heartbeat"),
    ("Key-Value Pair Exchange", "kvp"),
    ("Shutdown", "shutdown"),
    ("Time Synchronization", "timesync"),
];

/// The short name of an integration service given by either name, in any case.
pub fn integration_service(s: &str) -> Option<&'static str> {
    INTEGRATION_SERVICES
        .iter()
        .find(|(long, short)| long.eq_ignore_ascii_case(s) || short.eq_ignore_ascii_case(s))
        .map(|(_, short)| *short)
}
