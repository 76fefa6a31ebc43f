//! The one interface between VMBus (and its devices) and the hypervisor: host-to-guest
//! messages and event flags through hv1's SynIC, turned into interrupts on the KVM vCPUs.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vmbus::host::Doorbell;
use vmbus::PostFailure;

/// Injects the interrupts hv1 asks for (VP index = APIC ID here).
pub fn inject(partition: &kvm::Partition, interrupts: &[hv1::Interrupt]) {
    static LOG: support::RateLimit = support::RateLimit::guest();
    for i in interrupts {
        if let Err(e) = partition.signal_msi(i.vp, i.vector) {
            support::limited!(
                LOG,
                warn,
                "cannot inject vector {:#x} into VP {}: {e}",
                i.vector,
                i.vp
            );
        }
    }
}

/// [`vmbus::Synic`] over hv1's SynIC state and KVM's MSI injection. The guest's fast
/// HvSignalEvent on an open channel rings the channel's doorbell through a KVM ioeventfd on the
/// hypercall page's 4-byte `OUT` (see [`hv1::HYPERCALL_CODE`]).
pub struct HvSynic {
    hv: Arc<hv1::Partition>,
    kvm: Arc<kvm::Partition>,
    /// The ioeventfd of each open channel, by connection id.
    routes: Mutex<HashMap<u32, kvm::PioEventFd>>,
    /// A registration failed once (logged once; signals then take the user-space exit).
    route_failed: AtomicBool,
}

impl HvSynic {
    pub fn new(hv: Arc<hv1::Partition>, kvm: Arc<kvm::Partition>) -> Self {
        Self {
            hv,
            kvm,
            routes: Mutex::default(),
            route_failed: AtomicBool::new(false),
        }
    }

    /// Connection ids whose signals KVM delivers without an exit (inspection, tests).
    pub fn routed(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = support::lock(&self.routes).keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}

impl vmbus::Synic for HvSynic {
    fn post_message(&self, vp: u32, sint: u8, message: &[u8]) -> Result<(), PostFailure> {
        match self
            .hv
            .post_message(vp, sint, hvdef::vmbus::SYNIC_MESSAGE_TYPE_VMBUS, message)
        {
            Ok(d) => {
                inject(&self.kvm, d.interrupt.as_slice());
                Ok(())
            }
            Err(hv1::SynicError::QueueFull { .. }) => Err(PostFailure::QueueFull),
            Err(e) => Err(PostFailure::Undeliverable(e.to_string())),
        }
    }

    fn signal_event(&self, vp: u32, sint: u8, flag: u32) {
        if let Ok(hv1::EventDelivery::Signalled(Some(i))) = self.hv.signal_event(vp, sint, flag) {
            inject(&self.kvm, &[i]);
        }
    }

    fn route_signal(&self, connection_id: u32, doorbell: &Arc<Doorbell>) {
        let port = u16::from(hv1::HYPERCALL_PORT);
        match self
            .kvm
            .add_pio_eventfd(port, connection_id, doorbell.as_fd())
        {
            Ok(event) => {
                support::lock(&self.routes).insert(connection_id, event);
            }
            Err(e) => {
                if !self.route_failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "VMBus signals take a user-space exit (no KVM ioeventfd for connection \
                         {connection_id:#x}: {e})"
                    );
                }
            }
        }
    }

    fn unroute_signal(&self, connection_id: u32) {
        static LOG: support::RateLimit = support::RateLimit::guest();
        let Some(event) = support::lock(&self.routes).remove(&connection_id) else {
            return;
        };
        if let Err(e) = self.kvm.remove_pio_eventfd(event) {
            support::limited!(
                LOG,
                warn,
                "cannot remove the ioeventfd of connection {connection_id:#x}: {e}"
            );
        }
    }
}
