//! Doorbells (eventfds) and the port table that maps a channel's connection id to its
//! doorbell. HvSignalEvent reads the table from the vCPU thread that made the hypercall;
//! readers never wait for each other, and only channel open and close write to it.

use hvdef::hv::HvStatus;
use rustix::event::{eventfd, EventfdFlags};
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// An eventfd that wakes one worker. The host rings it from HvSignalEvent's exit path, and the
/// hypervisor may ring it directly (a KVM ioeventfd, see [`super::Synic::route_signal`]).
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
    taken: AtomicU64,
}

impl Doorbell {
    pub fn new() -> std::io::Result<Self> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self {
            fd,
            taken: AtomicU64::new(0),
        })
    }

    /// Wakes the waiter.
    pub fn ring(&self) {
        // A full counter (2^64 - 2 unread rings) still wakes the reader; nothing to do on
        // EAGAIN.
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Consumes pending rings; returns how many there were.
    pub fn clear(&self) -> u64 {
        let mut buf = [0u8; 8];
        match rustix::io::read(&self.fd, &mut buf) {
            Ok(8) => {
                let n = u64::from_ne_bytes(buf);
                self.taken.fetch_add(n, Ordering::Relaxed);
                n
            }
            _ => 0,
        }
    }

    /// Rings consumed so far, whoever rang them (inspection).
    pub fn count(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Connection id → doorbell of the open channel.
#[derive(Debug, Default)]
pub(crate) struct Ports {
    map: RwLock<HashMap<u32, Arc<Doorbell>>>,
}

impl Ports {
    pub fn insert(&self, connection_id: u32, doorbell: Arc<Doorbell>) {
        support::lock_write(&self.map).insert(connection_id, doorbell);
    }

    pub fn remove(&self, connection_id: u32) {
        support::lock_write(&self.map).remove(&connection_id);
    }

    /// HvSignalEvent: rings the channel's doorbell, or says the id is unknown.
    pub fn signal(&self, connection_id: u32) -> HvStatus {
        match support::lock_read(&self.map).get(&connection_id) {
            Some(d) => {
                d.ring();
                HvStatus::SUCCESS
            }
            None => HvStatus::INVALID_CONNECTION_ID,
        }
    }

    pub fn len(&self) -> usize {
        support::lock_read(&self.map).len()
    }
}
