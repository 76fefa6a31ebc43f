//! Many requests in flight per channel: READ and WRITE whose every byte lies in an image
//! file's allocated extents ([`vhdx::Extent::File`]: raw files, fixed VHDs, allocated blocks
//! of dynamic VHD and VHDX) go to the channel's own io_uring as readv/writev straight into
//! guest pages, and complete to the guest when all their pieces are done. Everything else
//! (block allocation, sector bitmaps, zero or parent extents, flushes, UNMAP) stays
//! synchronous on the worker thread.
//!
//! Ordering: a SYNCHRONIZE CACHE (or a FUA write's flush) runs after the writes the guest has
//! seen complete, and those are in the file by then (a request completes only after its
//! kernel operations), so the flush covers them; writes still in flight when it arrives are
//! not the guest's to expect covered (SBC-3).
//!
//! A request in the ring is in the channel's inflight registry without a completion, so
//! a save sees it and a restore executes it again; a hot-removed disk's file stays open
//! while its requests hold it; closing the channel waits for the kernel (the ring's drop).

use crate::buffer::{aligned, window};
use guestmem::uring::GuestRing;
use guestmem::GuestMemory;
use protocol::Srb;
use scsi::{BlockIo, Medium, MediumError, ScsiDisk};
use std::collections::HashMap;
use std::sync::Arc;
use vhdx::{Disk, Extent};

use crate::protocol;

/// Operations one channel's ring holds (Linux queues about 350 requests per channel; a
/// request that finds the ring full is served synchronously).
pub const RING_ENTRIES: u32 = 512;

/// Copier threads per channel for large transfers the kernel does inline
/// ([`guestmem::uring`]): one per host CPU besides the worker's own, at most 3.
fn copiers() -> usize {
    if let Some(n) = std::env::var("VIRIDIAN_COPIERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    std::thread::available_parallelism()
        .map_or(0, |n| n.get() - 1)
        .min(3)
}

/// Whether channels use io_uring: yes unless `VIRIDIAN_NO_IO_URING=1`.
pub fn enabled_by_env() -> bool {
    std::env::var_os("VIRIDIAN_NO_IO_URING").is_none_or(|v| v != "1")
}

/// A request whose transfers are in the ring.
pub struct Pending {
    pub transaction_id: u64,
    pub srb: Srb,
    pub io: BlockIo,
    pub unit: Arc<ScsiDisk>,
    /// Kernel operations not yet completed.
    left: usize,
    error: Option<std::io::Error>,
    /// Keep the file (and a raw or VHD file's lock) open until the last operation is done.
    _disk: Arc<dyn Disk>,
    _medium: Arc<dyn Medium>,
}

/// A channel's ring and the requests in it.
pub struct Queue {
    /// Declared first: dropped (waiting for the kernel) before the files below close.
    ring: GuestRing,
    pending: HashMap<u64, Pending>,
    reaped: Vec<(u64, std::io::Result<()>)>,
    window: Vec<(u64, usize)>,
}

/// What [`Queue::submit`] made of a request.
pub enum Submitted {
    /// In the ring; [`Queue::reap`] returns it when done. `unbuffered`: some of it through
    /// the file's unbuffered descriptor; `copied`: some of it with the ring's copiers.
    InFlight { unbuffered: bool, copied: bool },
    /// Not for the ring (an extent needs the disk's own I/O, or no room): do it synchronously.
    Declined,
}

impl Queue {
    /// The channel's queue, or why there is none (no io_uring here).
    pub fn new(mem: &GuestMemory) -> std::io::Result<Self> {
        Ok(Self {
            ring: GuestRing::new(mem, RING_ENTRIES, copiers())?,
            pending: HashMap::new(),
            reaped: Vec::new(),
            window: Vec::new(),
        })
    }

    pub fn event_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ring.event_fd()
    }

    /// Whether `reap` should run again without a wake-up.
    pub fn needs_poll(&self) -> bool {
        self.ring.pending_submission()
    }

    /// Puts the transfer of request `seq` (`io`, its data in guest `pieces`) in the ring
    /// when every extent of it is in a file; with `unbuffered`, the aligned ones through
    /// the file's unbuffered descriptor. `others_waiting`: more requests wait behind this
    /// one, so a copier may take this one's transfers ([`GuestRing::submit`]).
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        seq: u64,
        transaction_id: u64,
        srb: Srb,
        io: BlockIo,
        unit: Arc<ScsiDisk>,
        disk: Arc<dyn Disk>,
        medium: Arc<dyn Medium>,
        (pieces, unbuffered): (&[(u64, usize)], bool),
        others_waiting: bool,
    ) -> Result<Submitted, scsi::Completion> {
        let len = io.len as u64;
        let mut extents = Vec::new();
        let mut any_unbuffered = false;
        let mut done = 0u64;
        while done < len {
            let e = match disk.extent(io.offset + done, len - done, io.write) {
                Ok(e) => e,
                Err(e) => return Err(unit.complete_io(io, Err(crate::medium_error(io.offset, e)))),
            };
            let n = e.len();
            match e {
                Extent::File {
                    fd,
                    direct,
                    path,
                    offset,
                    ..
                } if n > 0 && n <= len - done => {
                    let at = done as usize;
                    let direct = direct.choose(unbuffered, fd, path, (offset, n), |a| {
                        window(pieces, at, n as usize, &mut self.window);
                        aligned(&self.window, a)
                    });
                    any_unbuffered |= direct.is_some();
                    extents.push((direct.unwrap_or(fd), offset, at, n as usize));
                }
                _ => return Ok(Submitted::Declined),
            }
            done += n;
        }
        if self.ring.in_flight() + extents.len() > RING_ENTRIES as usize {
            return Ok(Submitted::Declined);
        }
        let copied_before = self.ring.copied();
        let mut p = Pending {
            transaction_id,
            srb,
            io,
            unit: unit.clone(),
            left: 0,
            error: None,
            _disk: disk.clone(),
            _medium: medium,
        };
        for (fd, offset, at, n) in extents {
            window(pieces, at, n, &mut self.window);
            match self
                .ring
                .submit(seq, fd, offset, &self.window, io.write, others_waiting)
            {
                Ok(()) => p.left += 1,
                Err(e) => {
                    p.error = Some(e);
                    break;
                }
            }
        }
        if p.left == 0 {
            let e = p
                .error
                .take()
                .unwrap_or_else(|| std::io::ErrorKind::Other.into());
            return Err(unit.complete_io(io, Err(MediumError::io(io.offset, e))));
        }
        self.pending.insert(seq, p);
        Ok(Submitted::InFlight {
            unbuffered: any_unbuffered,
            copied: self.ring.copied() > copied_before,
        })
    }

    /// The requests whose every operation has completed, each with how its medium access went.
    /// With `completed_only`, only what is already in the completion queue (no system
    /// call; see [`GuestRing::reap_completed`]).
    pub fn reap(&mut self, completed_only: bool) -> Vec<(u64, Pending, Result<(), MediumError>)> {
        let mut out = Vec::new();
        if completed_only {
            self.ring.reap_completed(&mut self.reaped);
        } else {
            self.ring.reap(&mut self.reaped);
        }
        for (seq, r) in self.reaped.drain(..) {
            let Some(p) = self.pending.get_mut(&seq) else {
                continue;
            };
            p.left = p.left.saturating_sub(1);
            if let Err(e) = r {
                p.error.get_or_insert(e);
            }
            if p.left == 0 {
                if let Some(mut p) = self.pending.remove(&seq) {
                    let r = match p.error.take() {
                        None => Ok(()),
                        Some(e) => Err(MediumError::io(p.io.offset, e)),
                    };
                    out.push((seq, p, r));
                }
            }
        }
        out
    }
}
