//! A threaded stand-in for the hypervisor, for tests and benchmarks of the run-time host:
//! [`GuestSynic`] receives what the host sends to the guest (messages into a bounded inbox,
//! event flags as one eventfd per relid), and [`ThreadedTransport`] is the guest's side of
//! the hypercalls, so the guest-side [`crate::client::Client`] runs on its own thread against
//! the real control thread and device workers.

use crate::client::Transport;
use crate::host::{Doorbell, PostFailure, Synic, VmbusHost};
use hvdef::hv::HvStatus;
use hvdef::vmbus::MAX_RELID;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The guest's SynIC as the host sees it.
pub struct GuestSynic {
    inbox: Mutex<VecDeque<Vec<u8>>>,
    arrived: Condvar,
    /// Messages the inbox holds before the host gets QueueFull (the SynIC queue depth).
    pub capacity: usize,
    events: Mutex<HashMap<u32, Arc<Doorbell>>>,
    /// Host-to-guest interrupts, all channels.
    pub interrupts: AtomicU64,
}

impl GuestSynic {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            inbox: Mutex::default(),
            arrived: Condvar::new(),
            capacity,
            events: Mutex::default(),
            interrupts: AtomicU64::new(0),
        })
    }

    /// The eventfd that channel `relid`'s host-to-guest interrupts ring.
    pub fn event(&self, relid: u32) -> Arc<Doorbell> {
        support::lock(&self.events)
            .entry(relid)
            .or_insert_with(|| Arc::new(Doorbell::new().expect("eventfd")))
            .clone()
    }

    /// Waits up to `timeout` for the next message.
    pub fn next_message(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut inbox = support::lock(&self.inbox);
        loop {
            if let Some(m) = inbox.pop_front() {
                return Some(m);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            inbox = self
                .arrived
                .wait_timeout(inbox, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Messages waiting.
    pub fn queued(&self) -> usize {
        support::lock(&self.inbox).len()
    }
}

impl Synic for GuestSynic {
    fn post_message(&self, _vp: u32, _sint: u8, message: &[u8]) -> Result<(), PostFailure> {
        let mut inbox = support::lock(&self.inbox);
        if inbox.len() >= self.capacity {
            return Err(PostFailure::QueueFull);
        }
        inbox.push_back(message.to_vec());
        self.arrived.notify_all();
        Ok(())
    }

    fn signal_event(&self, _vp: u32, _sint: u8, flag: u32) {
        if flag <= MAX_RELID {
            self.interrupts.fetch_add(1, Ordering::Relaxed);
            self.event(flag).ring();
        }
    }
}

/// The guest's hypercalls, against a running [`VmbusHost`].
pub struct ThreadedTransport {
    pub host: VmbusHost,
    pub synic: Arc<GuestSynic>,
    /// How long `next_message` waits.
    pub timeout: Duration,
    /// HvPostMessage calls answered INSUFFICIENT_BUFFERS (and retried, as Linux does).
    pub retries: u64,
}

impl ThreadedTransport {
    pub fn new(host: VmbusHost, synic: Arc<GuestSynic>) -> Self {
        Self {
            host,
            synic,
            timeout: Duration::from_secs(10),
            retries: 0,
        }
    }
}

impl Transport for ThreadedTransport {
    fn post_message(&mut self, connection_id: u32, data: &[u8]) -> Result<(), u16> {
        // Linux retries HV_STATUS_INSUFFICIENT_BUFFERS with a growing delay.
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.host.post_message(connection_id, 0, data) {
                HvStatus::INSUFFICIENT_BUFFERS if Instant::now() < deadline => {
                    self.retries += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                HvStatus::SUCCESS => return Ok(()),
                s => return Err(s.0),
            }
        }
    }

    fn next_message(&mut self) -> Option<Vec<u8>> {
        self.synic.next_message(self.timeout)
    }

    fn signal_event(&mut self, connection_id: u32) -> Result<(), u16> {
        match self.host.signal_event(connection_id) {
            HvStatus::SUCCESS => Ok(()),
            s => Err(s.0),
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes; true if readable. Clears it.
pub fn wait_event(event: &Doorbell, timeout: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(event, PollFlags::IN)];
    let ts = Timespec::try_from(timeout).ok();
    let ready = matches!(poll(&mut fds, ts.as_ref()), Ok(n) if n > 0);
    if ready {
        event.clear();
    }
    ready
}
