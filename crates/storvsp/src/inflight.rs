//! Requests in flight on each channel, kept where save can see them.
//!
//! A request is *in flight* from the moment its worker takes it off the ring until its
//! completion is in the ring. Each channel's registry lists them: the packet as the guest
//! sent it and, once executed, the completion. The worker takes a packet and records it in
//! one step under the registry's lock, and sends a completion and forgets the request in
//! another, so a save (which takes the same lock after pausing the controller) sees every
//! request the ring no longer holds and no request the guest already has an answer for.
//!
//! On restore, a request saved with its completion gets that completion again; one saved
//! while it was executing is executed once more. The data path is safe to replay: a read
//! fills the same guest pages again, a write stores the same bytes at the same place (the
//! guest does not touch an in-flight buffer), and UNMAP and SYNCHRONIZE CACHE are idempotent.

use hvdef::storvsp::VstorPacket;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use vmbus::host::Doorbell;

/// Most requests one channel may hold in a saved state (a 1 MiB ring of 64-byte-minimum
/// packets holds fewer than this).
pub const MAX_SAVED_REQUESTS: usize = 1 << 15;

/// One in-flight request in a saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedRequest {
    /// The whole VMBus packet (descriptor, GPA_DIRECT ranges, payload) as the guest sent it.
    pub packet: Vec<u8>,
    /// The completion's VSTOR packet, if the request had been executed; `None`: execute it
    /// again.
    pub completion: Option<Vec<u8>>,
}

/// The in-flight requests of one channel in a saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedChannel {
    pub index: u16,
    pub requests: Vec<SavedRequest>,
}

pub(crate) struct Entry {
    pub seq: u64,
    pub packet: Vec<u8>,
    pub completion: Option<VstorPacket>,
}

/// One channel's in-flight requests (see the module docs).
#[derive(Default)]
pub(crate) struct Requests {
    next: u64,
    pub entries: Vec<Entry>,
    /// Host-initiated packets (ENUMERATE_BUS) queued but not in the ring yet.
    pub notices: u32,
}

impl Requests {
    /// Records a request taken off the ring; returns its handle.
    pub fn taken(&mut self, packet: &[u8]) -> u64 {
        self.next += 1;
        self.entries.push(Entry {
            seq: self.next,
            packet: packet.to_vec(),
            completion: None,
        });
        self.next
    }

    /// The request has been executed: this is its completion.
    pub fn executed(&mut self, seq: u64, completion: VstorPacket) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.seq == seq) {
            e.completion = Some(completion);
        }
    }

    /// The request's completion is in the ring (or it needs none).
    pub fn done(&mut self, seq: u64) {
        self.entries.retain(|e| e.seq != seq);
    }

    pub fn save(&self) -> Vec<SavedRequest> {
        use zerocopy::IntoBytes;
        self.entries
            .iter()
            .map(|e| SavedRequest {
                packet: e.packet.clone(),
                completion: e.completion.map(|c| c.as_bytes().to_vec()),
            })
            .collect()
    }
}

/// A channel's registry and the doorbell that wakes its worker when the controller resumes.
pub(crate) struct Registry {
    pub index: u16,
    requests: Mutex<Requests>,
    pub wake: Doorbell,
}

impl Registry {
    pub fn new(index: u16) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            index,
            requests: Mutex::default(),
            wake: Doorbell::new()?,
        }))
    }

    /// The requests, locked; `None` while the controller is paused (the worker then leaves
    /// the ring alone).
    pub fn lock_unless<'a>(&'a self, paused: &AtomicBool) -> Option<MutexGuard<'a, Requests>> {
        let r = support::lock(&self.requests);
        (!paused.load(std::sync::atomic::Ordering::SeqCst)).then_some(r)
    }

    pub fn lock(&self) -> MutexGuard<'_, Requests> {
        support::lock(&self.requests)
    }
}
