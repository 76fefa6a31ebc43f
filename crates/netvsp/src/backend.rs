//! The packet endpoint behind a NIC: one queue per channel, each with a descriptor to poll
//! for received frames, a read straight into guest memory and a write of one frame, both
//! with a virtio-net header. [`crate::tap`] implements it over a TAP device;
//! [`MemoryBackend`] over in-process queues for loopback tests.

use crate::vnet::{VirtioNetHdr, VNET_HDR_LEN};
use guestmem::GuestMemory;
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use vmbus::host::Doorbell;
use zerocopy::FromBytes;

/// A set of queues.
pub trait Backend: Send + 'static {
    /// Every queue, index 0 first.
    fn into_queues(self) -> Vec<Box<dyn BackendQueue>>;
}

/// One queue of a backend, owned by one channel worker at a time.
pub trait BackendQueue: Send {
    /// Readable when a frame is waiting.
    fn rx_fd(&self) -> BorrowedFd<'_>;
    /// Largest frame (without the virtio-net header) [`BackendQueue::recv`] can return.
    fn max_frame(&self) -> usize;
    /// Reads one frame: its header into `hdr` and its bytes into the guest `pieces`.
    /// Returns the frame length (header excluded; a frame longer than the pieces is cut to
    /// their length), or `None` when nothing is waiting.
    fn recv(
        &mut self,
        mem: &GuestMemory,
        hdr: &mut [u8; VNET_HDR_LEN],
        pieces: &[(u64, usize)],
    ) -> std::io::Result<Option<usize>>;
    /// Drops the next waiting frame; false when nothing was waiting.
    fn discard(&mut self) -> std::io::Result<bool>;
    /// Sends one frame.
    fn send(&mut self, hdr: &VirtioNetHdr, frame: &[u8]) -> std::io::Result<()>;
    /// Whether the queue should receive (a TAP queue is attached or detached); queues whose
    /// channel is not open are disabled.
    fn set_enabled(&mut self, _enabled: bool) -> std::io::Result<()> {
        Ok(())
    }
}

type Frames = Arc<Mutex<VecDeque<(VirtioNetHdr, Vec<u8>)>>>;

/// An in-memory backend: the test's [`MemoryPort`] for each queue injects frames toward the
/// guest and collects what the guest sent.
pub struct MemoryBackend {
    queues: Vec<MemoryQueue>,
}

/// The far end of one in-memory queue.
#[derive(Clone)]
pub struct MemoryPort {
    to_guest: Frames,
    from_guest: Frames,
    ready: Arc<Doorbell>,
    enabled: Arc<std::sync::atomic::AtomicBool>,
    /// Microseconds each send takes (a backend as slow as a host's network stack).
    send_micros: Arc<std::sync::atomic::AtomicU64>,
    /// Reads that found no frame.
    empty_reads: Arc<std::sync::atomic::AtomicU64>,
}

struct MemoryQueue {
    port: MemoryPort,
    max_frame: usize,
}

impl MemoryBackend {
    /// `queues` queues taking frames up to `max_frame` bytes.
    pub fn new(queues: u16, max_frame: usize) -> (Self, Vec<MemoryPort>) {
        let ports: Vec<MemoryPort> = (0..queues)
            .map(|_| MemoryPort {
                to_guest: Frames::default(),
                from_guest: Frames::default(),
                ready: Arc::new(Doorbell::new().expect("eventfd")),
                enabled: Arc::default(),
                send_micros: Arc::default(),
                empty_reads: Arc::default(),
            })
            .collect();
        let queues = ports
            .iter()
            .map(|p| MemoryQueue {
                port: p.clone(),
                max_frame,
            })
            .collect();
        (Self { queues }, ports)
    }
}

impl Backend for MemoryBackend {
    fn into_queues(self) -> Vec<Box<dyn BackendQueue>> {
        self.queues
            .into_iter()
            .map(|q| Box::new(q) as Box<dyn BackendQueue>)
            .collect()
    }
}

impl MemoryPort {
    /// Queues a frame for the guest.
    pub fn inject(&self, hdr: VirtioNetHdr, frame: &[u8]) {
        support::lock(&self.to_guest).push_back((hdr, frame.to_vec()));
        self.ready.ring();
    }

    /// Frames waiting for the guest.
    pub fn pending(&self) -> usize {
        support::lock(&self.to_guest).len()
    }

    /// Takes what the guest has sent so far.
    pub fn take_sent(&self) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        support::lock(&self.from_guest).drain(..).collect()
    }

    /// Waits up to `timeout` until the guest has sent `n` frames, then takes them.
    pub fn wait_sent(
        &self,
        n: usize,
        timeout: std::time::Duration,
    ) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let deadline = std::time::Instant::now() + timeout;
        while support::lock(&self.from_guest).len() < n && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.take_sent()
    }

    /// Frames the guest has sent and nobody took yet.
    pub fn sent(&self) -> usize {
        support::lock(&self.from_guest).len()
    }

    /// Reads (and discards) of the queue that found no frame so far.
    pub fn empty_reads(&self) -> u64 {
        self.empty_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes every send from now on take `d` (zero: none).
    pub fn slow_sends(&self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.send_micros
            .store(us, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the queue's channel has it enabled.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl MemoryQueue {
    fn pop(&mut self) -> Option<(VirtioNetHdr, Vec<u8>)> {
        let mut q = support::lock(&self.port.to_guest);
        let f = q.pop_front();
        if q.is_empty() {
            self.port.ready.clear();
        }
        if f.is_none() {
            self.port
                .empty_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        f
    }
}

impl BackendQueue for MemoryQueue {
    fn rx_fd(&self) -> BorrowedFd<'_> {
        self.port.ready.as_fd()
    }

    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn recv(
        &mut self,
        mem: &GuestMemory,
        hdr: &mut [u8; VNET_HDR_LEN],
        pieces: &[(u64, usize)],
    ) -> std::io::Result<Option<usize>> {
        let Some((h, frame)) = self.pop() else {
            return Ok(None);
        };
        hdr.copy_from_slice(zerocopy::IntoBytes::as_bytes(&h));
        let mut at = 0;
        for &(gpa, n) in pieces {
            let n = n.min(frame.len() - at);
            mem.write(gpa, &frame[at..at + n])
                .map_err(std::io::Error::other)?;
            at += n;
            if at == frame.len() {
                break;
            }
        }
        Ok(Some(at))
    }

    fn discard(&mut self) -> std::io::Result<bool> {
        Ok(self.pop().is_some())
    }

    fn send(&mut self, hdr: &VirtioNetHdr, frame: &[u8]) -> std::io::Result<()> {
        let h = VirtioNetHdr::read_from_bytes(zerocopy::IntoBytes::as_bytes(hdr))
            .map_err(|_| std::io::Error::other("header"))?;
        let us = self
            .port
            .send_micros
            .load(std::sync::atomic::Ordering::Relaxed);
        if us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
        support::lock(&self.port.from_guest).push_back((h, frame.to_vec()));
        Ok(())
    }

    fn set_enabled(&mut self, enabled: bool) -> std::io::Result<()> {
        self.port
            .enabled
            .store(enabled, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
