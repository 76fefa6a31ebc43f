//! The one interface between VMBus (and its devices) and the hypervisor: host-to-guest
//! messages and event flags through hv1's SynIC, turned into interrupts on the KVM vCPUs.

use std::sync::Arc;
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

/// [`vmbus::Synic`] over hv1's SynIC state and KVM's MSI injection.
pub struct HvSynic {
    hv: Arc<hv1::Partition>,
    kvm: Arc<kvm::Partition>,
}

impl HvSynic {
    pub fn new(hv: Arc<hv1::Partition>, kvm: Arc<kvm::Partition>) -> Self {
        Self { hv, kvm }
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
}
