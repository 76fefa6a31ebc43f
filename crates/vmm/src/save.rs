//! Save-VM and restore inside the worker, on the thread that runs the VM.
//!
//! Saving, with every vCPU thread stopped (each finished its last exit in KVM first):
//! 1. the VMBus devices save (storvsp stops taking requests and keeps those in flight), then
//!    the bus stops: no worker writes guest memory or raises an interrupt from here on, which
//!    is why a save that gets this far ends the VM whatever happens next;
//! 2. hv1 (SynIC, hypercall page, reference TSC), the in-kernel PIC/IOAPIC/PIT and clock, the
//!    chipset and each vCPU are captured;
//! 3. the file is written ([`crate::saved`]), RAM last, with progress.
//!
//! Room for the file is checked before the vCPUs stop, so the usual failure (a full disk)
//! leaves the VM running.

use crate::hyperv::KvmTime;
use crate::saved::{self, MachineState, SavedFile, WriteReport};
use crate::vmbus_host::Vmbus;
use chipset::Chipset;
use kvm::kvm_ioctls::VcpuFd;
use kvm::Partition;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What `VmControl::save` is asked to do.
pub struct SaveRequest {
    /// The file to write (made through `PATH.tmp`).
    pub path: PathBuf,
    /// The caller's configuration, kept in the file for the restore.
    pub config: Vec<u8>,
    /// Called as RAM is written: (bytes done, bytes in all).
    pub progress: Box<dyn FnMut(u64, u64) + Send>,
}

/// What a save did.
#[derive(Debug, Clone)]
pub struct SaveReport {
    pub path: PathBuf,
    pub written: WriteReport,
    pub elapsed: Duration,
}

/// Held by the caller of a successful save until it has told its own caller: the VM's
/// process waits for it (a few seconds at most) before it goes.
pub struct SaveAck {
    /// Never sent on: dropping it is the signal.
    _done: mpsc::Sender<()>,
}

/// Why a save did not happen, or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("the VM is not running")]
    NotRunning,
    #[error("the VM is being saved already")]
    InProgress,
    #[error("{}: {why}", path.display())]
    Preflight { path: PathBuf, why: String },
    /// The state could not be captured or written; the VM has been turned off.
    #[error("{what}; the VM was turned off")]
    Failed { what: String },
}

/// Space kept free beyond the worst case (every page of RAM written) plus the machine state.
const SPACE_MARGIN: u64 = 64 << 20;

/// Checks, before anything stops, that the file can be made and that its file system has
/// room for `memory` bytes of RAM and the rest.
pub(crate) fn preflight(path: &Path, memory: u64) -> Result<(), SaveError> {
    let fail = |why: String| SaveError::Preflight {
        path: path.to_path_buf(),
        why,
    };
    if path.is_dir() {
        return Err(fail(
            "is a directory; give the saved-state file's name".into(),
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let free = free_bytes(dir).map_err(|e| fail(format!("cannot use its directory: {e}")))?;
    let need = memory + SPACE_MARGIN;
    if free < need {
        return Err(fail(format!(
            "only {} MiB free on its file system; saving this VM may need {} MiB",
            free >> 20,
            need >> 20
        )));
    }
    Ok(())
}

fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The pieces of a VM that save and restore touch.
pub(crate) struct Parts<'a> {
    pub partition: &'a Partition,
    pub chipset: &'a Chipset,
    pub hv: Option<&'a hv1::Partition>,
    pub vmbus: Option<&'a Vmbus>,
    pub time: Option<&'a KvmTime>,
}

/// IA32_TSC.
const MSR_TSC: u32 = 0x10;

/// Saves a VM whose vCPU threads have stopped (see the module's steps). Any error ends the VM.
pub(crate) fn save(
    parts: &Parts<'_>,
    vcpus: &[VcpuFd],
    mut request: SaveRequest,
) -> Result<SaveReport, SaveError> {
    let started = Instant::now();
    let failed = |what: String| SaveError::Failed { what };
    let bus = match parts.vmbus {
        Some(v) => {
            let saved = v
                .host()
                .save()
                .map_err(|e| failed(format!("cannot save VMBus: {e}")))?;
            v.stop();
            Some(saved)
        }
        None => None,
    };
    let hv = parts.hv.map(|h| h.save());
    let partition = parts
        .partition
        .save_state()
        .map_err(|e| failed(format!("cannot save the interrupt controllers: {e}")))?;
    let chipset = parts.chipset.save();
    let indices = parts
        .partition
        .saved_msr_indices()
        .map_err(|e| failed(e.to_string()))?;
    let vcpus = vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| {
            kvm::state::save_vcpu(v, &indices).map_err(|e| failed(format!("vCPU {i}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let guest_tsc = vcpus
        .first()
        .and_then(|v| v.msrs.iter().find(|(i, _)| *i == MSR_TSC))
        .map(|&(_, tsc)| tsc)
        .unwrap_or(0);
    let machine = MachineState {
        vcpus,
        partition,
        chipset,
        hv,
        vmbus: bus,
        guest_tsc,
    };
    let written = saved::write(
        &request.path,
        &request.config,
        &machine,
        parts.partition.memory(),
        &mut request.progress,
    )
    .map_err(|e| failed(format!("cannot write {}: {e}", request.path.display())))?;
    Ok(SaveReport {
        path: request.path,
        written,
        elapsed: started.elapsed(),
    })
}

/// Restores a VM built for it (its RAM untouched, nothing running) from `file`, positioned
/// after the configuration section.
pub(crate) fn restore(
    parts: &Parts<'_>,
    vcpus: &[VcpuFd],
    file: &mut SavedFile,
    progress: saved::Progress<'_>,
) -> crate::Result<()> {
    let path = file.path().to_path_buf();
    let fail = |what: String| crate::Error::Restore {
        file: path.clone(),
        what,
    };
    let machine = file.machine()?;
    if machine.vcpus.len() != vcpus.len() {
        return Err(fail(format!(
            "the file has {} vCPUs, the VM {}",
            machine.vcpus.len(),
            vcpus.len()
        )));
    }
    if machine.hv.is_some() != parts.hv.is_some()
        || machine.vmbus.is_some() != parts.vmbus.is_some()
    {
        return Err(fail(
            "the file was saved with the Hyper-V interface set differently (--no-hyperv)".into(),
        ));
    }
    file.read_ram(parts.partition.memory(), progress)?;
    parts
        .partition
        .restore_state(&machine.partition)
        .map_err(|e| fail(e.to_string()))?;
    for (i, (vcpu, state)) in vcpus.iter().zip(&machine.vcpus).enumerate() {
        let refused = kvm::state::restore_vcpu(parts.partition, vcpu, state)
            .map_err(|e| fail(format!("vCPU {i}: {e}")))?;
        if !refused.is_empty() {
            tracing::warn!(
                "vCPU {i}: this host's KVM did not take {} saved MSRs: {:x?}",
                refused.len(),
                &refused[..refused.len().min(16)]
            );
        }
    }
    parts
        .chipset
        .restore(&machine.chipset)
        .map_err(|e| fail(e.to_string()))?;
    if let (Some(hv), Some(saved)) = (parts.hv, &machine.hv) {
        hv.restore(saved)
            .map_err(|e| fail(format!("Hyper-V state: {e}")))?;
    }
    if let Some(time) = parts.time {
        time.set_guest_tsc(machine.guest_tsc);
    }
    if let (Some(v), Some(bus)) = (parts.vmbus, machine.vmbus) {
        v.host()
            .restore(bus)
            .map_err(|e| fail(format!("VMBus: {e}")))?;
    }
    Ok(())
}

/// The waiting side of [`SaveAck`].
pub(crate) fn ack_pair() -> (SaveAck, mpsc::Receiver<()>) {
    let (tx, rx) = mpsc::channel();
    (SaveAck { _done: tx }, rx)
}

/// Holds the thread that runs the VM until the save's caller has answered (or `limit`).
pub(crate) fn wait_for_ack(rx: &mpsc::Receiver<()>, limit: Duration) {
    let _ = rx.recv_timeout(limit);
}
