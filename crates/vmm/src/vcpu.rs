//! One vCPU exit, handled: the loop body every vCPU thread (and the host-KVM tests) runs.

use crate::cpu;
use crate::hyperv::HvExits;
use crate::vm::ExitReason;
use chipset::PowerRequest;
use kvm::kvm_ioctls::{VcpuExit, VcpuFd};

/// Port I/O devices as a vCPU sees them. The chipset is one; tests plug in recorders.
pub trait PortIo: Send + Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]) -> Option<PowerRequest>;
    /// A trapped MSR write reached the host (observation for tests; no-op by default).
    fn msr_written(&self, _vp: u32, _msr: u32, _value: u64) {}
}

impl PortIo for chipset::Chipset {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        chipset::Chipset::pio_read(self, port, data)
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> Option<PowerRequest> {
        chipset::Chipset::pio_write(self, port, data)
    }
}

/// Runs the vCPU until its next exit and handles it. `Some` means the VM must stop.
pub fn step(
    vcpu: &mut VcpuFd,
    index: u32,
    hv: Option<&HvExits>,
    ports: &dyn PortIo,
) -> Option<ExitReason> {
    let exit = match vcpu.run() {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return None,
        Err(e) => {
            return Some(ExitReason::InternalError {
                vcpu: index,
                what: format!("KVM_RUN failed: {e}"),
                registers: cpu::dump_registers(vcpu),
            })
        }
    };
    let mut hypercall = None;
    let mut pv_eoi = None;
    let reason = match exit {
        VcpuExit::IoOut(port, data) if port == u16::from(hv1::HYPERCALL_PORT) && hv.is_some() => {
            hypercall = Some(match <[u8; 4]>::try_from(data) {
                Ok(id) => HypercallExit::FastSignal(u32::from_le_bytes(id)),
                Err(_) => HypercallExit::General,
            });
            None
        }
        VcpuExit::X86Rdmsr(exit) => {
            match hv.and_then(|hv| hv.rdmsr(index, exit.index)) {
                Some(value) => *exit.data = value,
                None => *exit.error = 1,
            }
            None
        }
        VcpuExit::X86Wrmsr(exit) => {
            ports.msr_written(index, exit.index, exit.data);
            match hv.map(|hv| hv.wrmsr(index, exit.index, exit.data)) {
                Some(Ok(action)) => pv_eoi = action,
                Some(Err(_)) | None => *exit.error = 1,
            }
            None
        }
        VcpuExit::IoIn(port, data) => {
            ports.pio_read(port, data);
            None
        }
        VcpuExit::IoOut(port, data) => match ports.pio_write(port, data) {
            Some(PowerRequest::PowerOff) => Some(ExitReason::PowerOff),
            Some(PowerRequest::Reset) => Some(ExitReason::Reset),
            None => None,
        },
        VcpuExit::MmioRead(_, data) => {
            data.fill(0xff);
            None
        }
        VcpuExit::MmioWrite(..) | VcpuExit::Hlt | VcpuExit::IrqWindowOpen => None,
        VcpuExit::Shutdown => Some(ExitReason::TripleFault {
            vcpu: index,
            registers: String::new(),
        }),
        VcpuExit::SystemEvent(kind, _) => Some(match kind {
            kvm::kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
            kvm::kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
            other => internal(index, format!("system event {other}")),
        }),
        VcpuExit::FailEntry(reason, cpu) => Some(internal(
            index,
            format!("VM entry failed (hardware reason {reason:#x} on host CPU {cpu})"),
        )),
        VcpuExit::InternalError => Some(internal(
            index,
            "KVM internal error (emulation failure)".into(),
        )),
        other => Some(internal(index, format!("unexpected exit {other:?}"))),
    };
    if let Some(reason) = reason {
        return Some(with_registers(reason, vcpu));
    }
    if let Some(pv_eoi) = pv_eoi {
        pv_eoi.apply(vcpu);
    }
    if let (Some(call), Some(hv)) = (hypercall, hv) {
        let done = match call {
            HypercallExit::General => hv.hypercall(vcpu, index),
            HypercallExit::FastSignal(connection_id) => hv.fast_signal(vcpu, index, connection_id),
        };
        if let Err(e) = done {
            return Some(internal(index, format!("hypercall: {e}")));
        }
    }
    None
}

/// What the hypercall page's `OUT` asked for (see [`hv1::HYPERCALL_CODE`]).
#[derive(Clone, Copy)]
enum HypercallExit {
    /// `out 0x57, al`: any hypercall, registers as the ABI says.
    General,
    /// `out 0x57, eax`: a fast HvSignalEvent (flag 0) of this connection id that no ioeventfd
    /// took.
    FastSignal(u32),
}

fn internal(vcpu: u32, what: String) -> ExitReason {
    ExitReason::InternalError {
        vcpu,
        what,
        registers: String::new(),
    }
}

fn with_registers(reason: ExitReason, vcpu: &VcpuFd) -> ExitReason {
    match reason {
        ExitReason::TripleFault { vcpu: i, .. } => ExitReason::TripleFault {
            vcpu: i,
            registers: cpu::dump_registers(vcpu),
        },
        ExitReason::InternalError { vcpu: i, what, .. } => ExitReason::InternalError {
            vcpu: i,
            what,
            registers: cpu::dump_registers(vcpu),
        },
        other => other,
    }
}
