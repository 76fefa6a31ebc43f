//! VM assembly: builds a partition from a [`VmConfig`] (memory layout, ACPI tables, Linux direct
//! boot, vCPUs, chipset wiring) and runs it until the guest powers off or fails.
#![forbid(unsafe_code)]

pub mod acpi;
pub mod boot;
pub mod console;
pub mod cpu;
pub mod hyperv;
pub mod integration;
pub mod kvp;
pub mod layout;
pub mod measure;
pub mod network;
mod pause;
pub mod payload;
mod save;
pub mod saved;
pub mod synic;
pub mod vcpu;
mod vm;
pub mod vmbus_host;
pub mod vmlinux;

pub use save::{SaveAck, SaveError, SaveReport, SaveRequest};
pub use vm::{DiskError, ExitReason, PauseError, StopHandle, Vm, VmConfig, VmControl};

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kvm(#[from] kvm::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error("guest memory: {0}")]
    Memory(#[from] guestmem::Error),
    #[error("--memory {requested} MiB is below the minimum of {minimum} MiB")]
    MemoryTooSmall { requested: u64, minimum: u64 },
    #[error("--memory {requested} MiB is more than this host's {host} MiB of RAM")]
    MemoryTooLarge { requested: u64, host: u64 },
    #[error("--cpus {requested} is out of range: this host's KVM allows 1 to {maximum}")]
    BadCpuCount { requested: u32, maximum: u32 },
    #[error("vCPU {vcpu}: {op} failed: {source}")]
    Vcpu {
        vcpu: u32,
        op: &'static str,
        #[source]
        source: kvm::kvm_ioctls::Error,
    },
    #[error("Hyper-V enlightenments: {0}")]
    Hv(#[source] hv1::Error),
    #[error("console: {0}")]
    Console(#[source] std::io::Error),
    #[error("cannot start VMBus: {0}")]
    Vmbus(#[source] std::io::Error),
    #[error(transparent)]
    Network(#[from] network::NicError),
    #[error(transparent)]
    SavedFile(#[from] saved::FileError),
    #[error("{}: cannot restore: {what}", file.display())]
    Restore {
        file: std::path::PathBuf,
        what: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
