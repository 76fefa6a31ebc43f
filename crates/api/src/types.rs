//! Request and response bodies. Field names are snake_case; enum values use Hyper-V's names.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A VM's state, as Get-VM names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum VmState {
    Off,
    Starting,
    Running,
    Stopping,
    Saved,
    Paused,
    Saving,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "Off",
            Self::Starting => "Starting",
            Self::Running => "Running",
            Self::Stopping => "Stopping",
            Self::Saved => "Saved",
            Self::Paused => "Paused",
            Self::Saving => "Saving",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Off,
            Self::Starting,
            Self::Running,
            Self::Stopping,
            Self::Saved,
            Self::Paused,
            Self::Saving,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// Whether a worker process exists in this state.
    pub fn has_worker(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Running | Self::Stopping | Self::Paused | Self::Saving
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The guest's heartbeat integration service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Heartbeat {
    /// The guest answered within the timeout.
    #[serde(rename = "OK")]
    Ok,
    /// Answers stopped arriving.
    Lost,
    /// No answer yet (or the VM is not running, or has no heartbeat service).
    NoContact,
}

/// What the service does with the VM when the service starts (AutomaticStartAction).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum AutoStart {
    #[default]
    Nothing,
    Start,
    /// Start the VM if it was running when the service last stopped.
    StartIfRunning,
}

/// What the service does with a running VM when the service is told to stop its VMs
/// (AutomaticStopAction).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum AutoStop {
    /// Shut down through the guest's shutdown service within the timeout, then turn off.
    #[default]
    ShutDown,
    TurnOff,
}

/// What happens when the worker dies without being asked to (a crash, `kill -9`, a triple
/// fault, a guest reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Recovery {
    /// The VM stays Off.
    #[default]
    None,
    /// The service starts the VM again (at most 3 times a minute).
    Restart,
}

/// A new VM (New-VM).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVm {
    /// 1 to 100 characters, no `/`, not `.` or `..`; unique.
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// Virtual processors, 1 up to the host's count.
    #[serde(default = "default_cpus")]
    #[schema(minimum = 1)]
    pub cpus: u32,
    /// Guest memory with a unit, e.g. `512M` or `2G` (a plain number means MiB); 32M up to
    /// the host's memory.
    #[serde(default = "default_memory")]
    pub memory: String,
    /// Path to the guest kernel (bzImage or ELF vmlinux) on the host; must exist.
    pub kernel: String,
    /// Path to an initrd on the host; must exist.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Present Hyper-V to the guest (default true).
    #[serde(default)]
    pub hyperv: Option<bool>,
    /// CPU limit in percent of the VM's processors, 1..=100 (Set-VMProcessor -Maximum).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    pub cpu_limit: Option<u32>,
    /// CPU reserve in percent, 0..=100 (Set-VMProcessor -Reserve).
    #[serde(default)]
    #[schema(maximum = 100)]
    pub cpu_reserve: Option<u32>,
    /// Relative CPU weight, 1..=10000, default 100 (Set-VMProcessor -RelativeWeight).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10000)]
    pub cpu_weight: Option<u32>,
    #[serde(default)]
    pub auto_start: Option<AutoStart>,
    #[serde(default)]
    pub auto_stop: Option<AutoStop>,
    #[serde(default)]
    pub recovery: Option<Recovery>,
    /// Existing images to attach (Add-VMHardDiskDrive).
    #[serde(default)]
    pub disks: Vec<crate::NewHardDisk>,
    /// New dynamic VHDXs to create and attach, after `disks`.
    #[serde(default)]
    pub new_disks: Vec<crate::NewDiskFile>,
    /// DVD drives, after the disks.
    #[serde(default)]
    pub dvds: Vec<crate::NewDvdDrive>,
    /// Network adapters.
    #[serde(default)]
    pub nics: Vec<crate::NewNetworkAdapter>,
}

fn default_cpus() -> u32 {
    1
}

fn default_memory() -> String {
    "512M".into()
}

/// Changes to a VM (Set-VM, Set-VMProcessor, Set-VMMemory). Absent fields stay as they are.
/// Processors, memory, kernel, initrd, command line and name change only while the VM is Off;
/// CPU limit and weight apply to a running VM at once.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    #[serde(default)]
    #[schema(min_length = 1, max_length = 100)]
    pub name: Option<String>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub cpus: Option<u32>,
    #[serde(default)]
    pub memory: Option<String>,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub hyperv: Option<bool>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    pub cpu_limit: Option<u32>,
    #[serde(default)]
    #[schema(maximum = 100)]
    pub cpu_reserve: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10000)]
    pub cpu_weight: Option<u32>,
    #[serde(default)]
    pub auto_start: Option<AutoStart>,
    #[serde(default)]
    pub auto_stop: Option<AutoStop>,
    #[serde(default)]
    pub recovery: Option<Recovery>,
}

/// A VM as the service knows it (Get-VM).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub name: String,
    /// Stable identifier (a UUID), also the name of the VM's folder.
    pub id: String,
    pub state: VmState,
    /// What is going on, or why the VM last stopped.
    pub status: String,
    pub heartbeat: Heartbeat,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: String,
    pub hyperv: bool,
    /// Percent of the VM's processors, 1..=100.
    pub cpu_limit: u32,
    pub cpu_reserve: u32,
    pub cpu_weight: u32,
    pub auto_start: AutoStart,
    pub auto_stop: AutoStop,
    pub recovery: Recovery,
    /// The VM's folder under the service's state directory (console log, worker log).
    pub folder: String,
    /// The worker's process id while one runs.
    pub pid: Option<u32>,
    /// Seconds since the worker started, 0 when off.
    pub uptime_secs: u64,
    /// The worker's CPU use since the previous sample, in percent of the host's processors.
    pub cpu_usage_percent: f64,
    /// Memory given to the running guest, 0 when off.
    pub memory_assigned_bytes: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    pub disks: Vec<crate::HardDisk>,
    pub dvds: Vec<crate::DvdDrive>,
    pub nics: Vec<crate::NetworkAdapter>,
}

/// Options of `POST /vms/{name}/stop` and `/restart`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StopParams {
    /// Power off at once instead of asking the guest (Stop-VM -TurnOff).
    #[serde(default)]
    pub turn_off: Option<bool>,
    /// Seconds to wait for the guest's shutdown before turning it off (default 30, at most
    /// 3600).
    #[serde(default)]
    #[param(maximum = 3600)]
    pub timeout: Option<u64>,
}

/// A state change, as sent on `/events`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmEvent {
    pub name: String,
    pub id: String,
    pub state: VmState,
    pub status: String,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
}

/// The service itself (`viridian service status`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceInfo {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub state_dir: String,
    pub socket: String,
    /// The `viridian` binary that runs each VM.
    pub worker: String,
    pub vms_defined: u64,
    pub vms_running: u64,
    /// `enabled: PATH` or `disabled: why`.
    pub cgroups: String,
    pub host_cpus: u32,
    pub host_memory_bytes: u64,
}

/// A new API token for remote callers (`viridian token new NAME`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// 1 to 100 characters, no `/`; unique.
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
}

/// A token just made: the secret is shown this once; the service keeps only its hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub name: String,
    /// Present it as `Authorization: Bearer TOKEN` (or `VIRIDIAN_TOKEN` for the CLI).
    pub token: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

/// A token as listed (without its secret).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub name: String,
    pub created_at: u64,
}
