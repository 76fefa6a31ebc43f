//! An io_uring whose reads and writes go between files and guest RAM: a storage device's
//! channel queues many requests at once and learns of their completion through an eventfd.
//!
//! Each operation is a positional vectored read or write (`IORING_OP_READV`/`WRITEV`) of
//! guest ranges. The ring keeps, until the kernel has completed an operation, the iovec array
//! it points at and a clone of the guest memory its buffers lie in; dropping the ring waits
//! for every operation still in the kernel. A short transfer is finished synchronously, so a
//! completion always covers the whole operation.

use crate::GuestMemory;
use io_uring::{opcode, types, IoUring};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// One operation in the kernel.
struct Op {
    /// The caller's tag, returned with the completion.
    tag: u64,
    /// What the kernel reads or writes through; not moved or freed until the completion.
    _iov: IoVecs,
    pieces: Vec<(u64, usize)>,
    fd: RawFd,
    offset: u64,
    write: bool,
    len: usize,
}

/// An operation's iovec array, owned by the ring until the kernel is done with it.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the iovecs point into guest RAM, which any thread may access (the mappings are
// shared by design and kept alive by the ring's GuestMemory clone); the array itself is
// owned and only read by the kernel.
unsafe impl Send for IoVecs {}

/// A ring of at most `entries` operations in flight (see the module docs).
pub struct GuestRing {
    ring: IoUring,
    /// Keeps the mappings the operations' buffers lie in alive.
    mem: GuestMemory,
    ops: HashMap<u64, Op>,
    next: u64,
    entries: usize,
    /// Signalled by the kernel on each completion.
    event: OwnedFd,
    /// Entries are queued that the kernel has not taken yet.
    unsubmitted: bool,
}

impl std::fmt::Debug for GuestRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRing")
            .field("in_flight", &self.ops.len())
            .finish()
    }
}

impl GuestRing {
    /// A ring for operations on `mem`; fails where the kernel has no io_uring (or forbids
    /// it), for the caller to fall back to synchronous I/O.
    pub fn new(mem: &GuestMemory, entries: u32) -> std::io::Result<Self> {
        let ring = IoUring::new(entries)?;
        // SAFETY: eventfd(2) with valid flags returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let event = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Self {
            ring,
            mem: mem.clone(),
            ops: HashMap::new(),
            next: 0,
            entries: entries as usize,
            event,
            unsubmitted: false,
        })
    }

    /// Readable when completions are waiting (poll it, then [`GuestRing::reap`]).
    pub fn event_fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }

    /// Operations in the kernel.
    pub fn in_flight(&self) -> usize {
        self.ops.len()
    }

    /// Whether another operation fits.
    pub fn has_room(&self) -> bool {
        self.ops.len() < self.entries
    }

    /// Queues and submits a read of `fd` at `offset` into the guest ranges `pieces` (with
    /// `write`, a write of them to `fd`). Every piece is checked to be guest RAM first. The
    /// caller keeps `fd` open until the completion carrying `tag` is reaped.
    pub fn submit(
        &mut self,
        tag: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        pieces: &[(u64, usize)],
        write: bool,
    ) -> std::io::Result<()> {
        if !self.has_room() || pieces.len() > crate::MAX_PIECES {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let iov = IoVecs(self.mem.iovecs(pieces)?);
        let len = pieces.iter().map(|p| p.1).sum();
        self.next += 1;
        let key = self.next;
        let raw = fd.as_raw_fd();
        let entry = if write {
            opcode::Writev::new(types::Fd(raw), iov.0.as_ptr(), iov.0.len() as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(types::Fd(raw), iov.0.as_ptr(), iov.0.len() as u32)
                .offset(offset)
                .build()
        }
        .user_data(key);
        // SAFETY: the entry points at `iov`, whose heap array is stored in `self.ops` below
        // and neither moved nor freed until the kernel's completion for `key` is reaped (or
        // the ring is dropped, which waits for it). The iovecs point into guest RAM mappings
        // that `self.mem` keeps alive and that iovecs() checked. The kernel may race with the
        // guest on those pages; no Rust reference aliases them.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.ops.insert(
            key,
            Op {
                tag,
                _iov: iov,
                pieces: pieces.to_vec(),
                fd: raw,
                offset,
                write,
                len,
            },
        );
        // Should the kernel not take the entry now (EAGAIN, EBUSY), it stays queued: the
        // operation is in flight either way, and `pending_submission` tells the caller to
        // come back and `reap` submits it.
        self.push();
        Ok(())
    }

    /// Hands queued entries to the kernel.
    fn push(&mut self) {
        let _ = self.ring.submit();
        self.unsubmitted = !self.ring.submission().is_empty();
    }

    /// Whether queued entries still wait for the kernel to take them (call
    /// [`GuestRing::reap`] again soon).
    pub fn pending_submission(&self) -> bool {
        self.unsubmitted
    }

    /// The completions that have arrived, as `(tag, result)`; clears the eventfd first.
    pub fn reap(&mut self, out: &mut Vec<(u64, std::io::Result<()>)>) {
        if self.unsubmitted {
            self.push();
        }
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer from the ring's own eventfd.
        let _ = unsafe { libc::read(self.event.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        self.reap_completed(out);
    }

    /// The completions already in the completion queue, without a system call: for a
    /// caller that just submitted to a backend that may finish inline. The eventfd stays
    /// signalled, so the next wake-up may find nothing.
    pub fn reap_completed(&mut self, out: &mut Vec<(u64, std::io::Result<()>)>) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (key, res) in done {
            if let Some(op) = self.ops.remove(&key) {
                out.push((op.tag, self.finish(&op, res)));
            }
        }
    }

    /// The result of `op` given the kernel's `res`, finishing a short transfer in place.
    fn finish(&self, op: &Op, res: i32) -> std::io::Result<()> {
        if res < 0 {
            return Err(std::io::Error::from_raw_os_error(-res));
        }
        let done = res as usize;
        if done >= op.len {
            return Ok(());
        }
        if done == 0 && !op.write {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        // The rest of the pieces after `done` bytes, synchronously.
        let mut rest = Vec::with_capacity(op.pieces.len());
        let mut skip = done;
        for &(gpa, n) in &op.pieces {
            if skip >= n {
                skip -= n;
                continue;
            }
            rest.push((gpa + skip as u64, n - skip));
            skip = 0;
        }
        // SAFETY: the caller keeps the descriptor open until this completion is reaped
        // (submit's contract); it is only borrowed for the call.
        let fd = unsafe { BorrowedFd::borrow_raw(op.fd) };
        let at = op.offset + done as u64;
        if op.write {
            self.mem.write_fd_at(fd, at, &rest)
        } else {
            self.mem.read_fd_at(fd, at, &rest)
        }
    }
}

impl Drop for GuestRing {
    fn drop(&mut self) {
        // The kernel may still write through the iovecs into guest RAM: wait for it.
        while !self.ops.is_empty() {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let keys: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for k in keys {
                self.ops.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ring(mem: &GuestMemory) -> Option<GuestRing> {
        match GuestRing::new(mem, 8) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("SKIPPED: no io_uring here ({e})");
                None
            }
        }
    }

    fn wait(r: &mut GuestRing, n: usize) -> Vec<(u64, std::io::Result<()>)> {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while out.len() < n {
            assert!(std::time::Instant::now() < deadline, "no completion");
            r.reap(&mut out);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        out
    }

    #[test]
    fn reads_and_writes_guest_pieces_and_reports_each_tag() {
        let mem = GuestMemory::new(&[(0, 0x10000)]).unwrap();
        let Some(mut r) = ring(&mem) else { return };
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        file.write_all(&data).unwrap();
        let pieces = [(0x2100, 3000), (0x7000, 1096)];
        r.submit(11, file.as_fd(), 512, &pieces, false).unwrap();
        let done = wait(&mut r, 1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0, 11);
        assert!(done[0].1.is_ok());
        let mut a = vec![0u8; 3000];
        mem.read(0x2100, &mut a).unwrap();
        assert_eq!(a, data[512..3512]);
        r.submit(12, file.as_fd(), 20000, &pieces, true).unwrap();
        // Past the end of the file: a read that gets nothing fails.
        r.submit(13, file.as_fd(), 1 << 30, &[(0x9000, 512)], false)
            .unwrap();
        let mut done = wait(&mut r, 2);
        done.sort_by_key(|d| d.0);
        assert!(done[0].1.is_ok());
        assert_eq!(
            done[1].1.as_ref().unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
        let mut back = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 20000).unwrap();
        assert_eq!(back, data[512..4608]);
        // Outside RAM: refused before anything reaches the kernel.
        assert!(r
            .submit(14, file.as_fd(), 0, &[(0xff00, 512)], false)
            .is_err());
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn dropping_the_ring_waits_for_operations_in_flight() {
        let mem = GuestMemory::new(&[(0, 0x100000)]).unwrap();
        let Some(mut r) = ring(&mem) else { return };
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        for i in 0..8u64 {
            r.submit(i, file.as_fd(), i * 65536, &[(i * 65536, 65536)], false)
                .unwrap();
        }
        assert!(!r.has_room());
        assert!(r.submit(9, file.as_fd(), 0, &[(0, 512)], false).is_err());
        drop(r);
    }
}
