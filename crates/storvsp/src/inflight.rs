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
//!
//! Nothing else is ([`replay_safe`]): PERSISTENT RESERVE OUT (a REGISTER with a new key,
//! RESERVE, RELEASE, PREEMPT, CLEAR) changes the reservations, so a second run answers
//! RESERVATION CONFLICT or moves the generation on twice; MODE SELECT, START STOP UNIT (a
//! DVD eject), PREVENT ALLOW MEDIUM REMOVAL, the handshake's control messages, and every
//! command that reports (and so clears) a unit attention or a DVD media event answer
//! differently the second time. Such a request executes while its worker holds the
//! registry's lock, and its completion is recorded before the lock is let go; a worker that
//! finds the controller paused leaves it unexecuted until resume. So a save sees it either
//! not started (it runs once, after resume or after restore) or with its completion (which
//! is sent, not executed again), and the disks' reservations, saved after the channels, are
//! as the commands before it left them.
//!
//! What remains: a READ or WRITE that reports a unit attention (a reservation preempted, a
//! capacity change) and is saved before its completion is recorded runs again without it.

use crate::protocol::{self, Request};
use hvdef::storvsp::VstorPacket;
use hvdef::vmbus::packet_type;
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

/// Whether executing a guest packet twice does what executing it once did (see the module
/// docs): the data path's SRBs and the guest's completions of host packets.
pub(crate) fn replay_safe(ptype: u16, payload: &[u8]) -> bool {
    use scsi::Command as C;
    if ptype == packet_type::COMPLETION {
        return true;
    }
    let Ok(Request::ExecuteSrb(srb)) = protocol::parse(payload) else {
        return false;
    };
    srb.cdb().is_some_and(|cdb| {
        matches!(
            C::decode(cdb),
            Ok(C::Read { .. }
                | C::Write { .. }
                | C::Verify { .. }
                | C::WriteSame16 { .. }
                | C::Unmap { .. }
                | C::SyncCache { .. })
        )
    })
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
