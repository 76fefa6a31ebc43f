//! Virtual switches as a resource of the service (New-, Get-, Remove-VMSwitch).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Hyper-V's kinds of switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SwitchType {
    /// VMs on this host only.
    Private,
    /// VMs and this host, through the host interface `vs-NAME`.
    Internal,
    /// Bridged to a physical adapter; the host keeps its connectivity through the switch.
    External,
    /// The Default Switch (named `default`): internal, NAT to the uplink, DHCP and DNS.
    Default,
}

/// A switch as defined, with what the kernel has of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Switch {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: SwitchType,
    /// External: the physical adapter.
    pub adapter: Option<String>,
    /// Internal and Default: the host's address on the switch, ADDRESS/PREFIX.
    pub host_address: Option<String>,
    /// The kernel bridge, `vs-NAME`.
    pub bridge: String,
    /// Whether the bridge exists in the kernel.
    pub present: bool,
    /// Whether the bridge filters by VLAN (without it only untagged adapters attach).
    pub vlan_filtering: bool,
    /// The VM interfaces (TAPs) on the bridge now.
    pub ports: Vec<String>,
    /// The VMs of the inventory with a network adapter on this switch.
    pub vms: Vec<String>,
    /// Default Switch: whether its DHCP and DNS server runs.
    pub dhcp_running: Option<bool>,
}

/// A switch to create (New-VMSwitch).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSwitch {
    /// 1 to 12 letters, digits, `-` or `_`; `default` is the Default Switch.
    #[schema(min_length = 1, max_length = 12)]
    pub name: String,
    /// Implied by `adapter` (external) and by the name `default`; needed otherwise.
    #[serde(default, rename = "type")]
    pub kind: Option<SwitchType>,
    /// External: the host's physical adapter; its addresses and routes move to the switch.
    #[serde(default)]
    pub adapter: Option<String>,
    /// Internal or Default: the host's address on the switch, e.g. `192.168.50.1/24`.
    #[serde(default)]
    pub host_address: Option<String>,
}

/// Options of `DELETE /switches/{name}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SwitchRemoveParams {
    /// Remove it even while VMs' adapters use it: running VMs' interfaces stay, connected to
    /// nothing; adapters in the inventory keep the name (their VMs start again once a switch
    /// of that name is defined).
    #[serde(default)]
    pub force: Option<bool>,
}
