//! An io_uring whose reads and writes go between files and guest RAM: a storage device's
//! channel queues many requests at once and learns of their completion through an eventfd.
//!
//! Each operation is a positional vectored read or write (`IORING_OP_READV`/`WRITEV`) of
//! guest ranges. The ring keeps, until the kernel has completed an operation, the iovec array
//! it points at and a clone of the guest memory its buffers lie in; dropping the ring waits
//! for every operation still in the kernel. A short transfer is finished synchronously, so a
//! completion always covers the whole operation.
//!
//! Where the kernel does a file's large reads inline (it had the completion ready when
//! `io_uring_enter` returned), later ones of that file go to the ring's [`copiers`] while
//! one is free, so that one queue's copies run on several CPUs.

mod copiers;

use crate::GuestMemory;
use copiers::{Copiers, Job};
use io_uring::{opcode, types, IoUring};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Transfers this long and longer may go to a copier.
pub const COPIER_MIN_BYTES: usize = 256 * 1024;

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
    /// With a copier, not in the kernel's ring.
    copier: bool,
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
    /// Signalled by the kernel on each completion, and by the copiers.
    event: Arc<OwnedFd>,
    /// Entries are queued that the kernel has not taken yet.
    unsubmitted: bool,
    copiers: Copiers,
    /// Per descriptor: whether its last large read in the ring completed inline.
    inline: HashMap<RawFd, bool>,
    /// Completions taken from the kernel's queue by `submit`, for the next reap.
    early: Vec<(u64, i32)>,
    /// Transfers given to the copiers so far.
    copied: u64,
}

impl std::fmt::Debug for GuestRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRing")
            .field("in_flight", &self.ops.len())
            .finish()
    }
}

impl GuestRing {
    /// A ring for operations on `mem`, with up to `copiers` threads for large transfers
    /// the kernel would do inline (see the module docs); fails where the kernel has no
    /// io_uring (or forbids it), for the caller to fall back to synchronous I/O.
    pub fn new(mem: &GuestMemory, entries: u32, copiers: usize) -> std::io::Result<Self> {
        let ring = IoUring::new(entries)?;
        // SAFETY: eventfd(2) with valid flags returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let event = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Self {
            ring,
            mem: mem.clone(),
            ops: HashMap::new(),
            next: 0,
            entries: entries as usize,
            copiers: Copiers::new(mem, event.clone(), copiers),
            event,
            unsubmitted: false,
            inline: HashMap::new(),
            early: Vec::new(),
            copied: 0,
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

    /// Transfers given to the copiers so far.
    pub fn copied(&self) -> u64 {
        self.copied
    }

    /// Whether another operation fits.
    pub fn has_room(&self) -> bool {
        self.ops.len() < self.entries
    }

    /// Queues and submits a read of `fd` at `offset` into the guest ranges `pieces` (with
    /// `write`, a write of them to `fd`). Every piece is checked to be guest RAM first. The
    /// caller keeps `fd` open until the completion carrying `tag` is reaped. With
    /// `may_copy` (the caller has other requests to go on with), a large transfer the
    /// kernel would do inline goes to a free copier instead.
    pub fn submit(
        &mut self,
        tag: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        pieces: &[(u64, usize)],
        write: bool,
        may_copy: bool,
    ) -> std::io::Result<()> {
        if !self.has_room() || pieces.len() > crate::MAX_PIECES {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let iov = IoVecs(self.mem.iovecs(pieces)?);
        let len = pieces.iter().map(|p| p.1).sum();
        self.next += 1;
        let key = self.next;
        let raw = fd.as_raw_fd();
        // The ring's own operations keep their pieces, to finish a short transfer; a
        // copier's job has them instead.
        let op = |iov, pieces, copier| Op {
            tag,
            _iov: iov,
            pieces,
            fd: raw,
            offset,
            write,
            len,
            copier,
        };
        // Reads only: a file system may serialise direct writes to one file (ext2 and
        // ext4 take the inode's lock for them), so copiers would only wait for each other.
        let large = len >= COPIER_MIN_BYTES && !write;
        if may_copy && large && self.inline.get(&raw) == Some(&true) {
            let job = Job {
                key,
                fd: raw,
                offset,
                pieces: pieces.to_vec(),
            };
            if self.copiers.start(job).is_ok() {
                self.copied += 1;
                self.ops
                    .insert(key, op(IoVecs(Vec::new()), Vec::new(), true));
                return Ok(());
            }
        }
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
        self.ops.insert(key, op(iov, pieces.to_vec(), false));
        // Should the kernel not take the entry now (EAGAIN, EBUSY), it stays queued: the
        // operation is in flight either way, and `pending_submission` tells the caller to
        // come back and `reap` submits it.
        self.push();
        if large && !self.unsubmitted {
            let before = self.early.len();
            self.early
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            let inline = self.early[before..].iter().any(|c| c.0 == key);
            self.inline.insert(raw, inline);
        }
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
        let mut done = std::mem::take(&mut self.early);
        done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for (key, res) in done {
            if let Some(op) = self.ops.remove(&key) {
                out.push((op.tag, self.finish(&op, res)));
            }
        }
        let mut copied = Vec::new();
        self.copiers.take_done(&mut copied);
        for (key, r) in copied {
            if let Some(op) = self.ops.remove(&key) {
                out.push((op.tag, r));
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
        // The copiers first: they finish what they do, and the kernel's operations are left.
        self.copiers.stop();
        self.ops.retain(|_, op| !op.copier);
        for (key, _) in self.early.drain(..) {
            self.ops.remove(&key);
        }
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
        match GuestRing::new(mem, 8, 0) {
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
        r.submit(11, file.as_fd(), 512, &pieces, false, true)
            .unwrap();
        let done = wait(&mut r, 1);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0, 11);
        assert!(done[0].1.is_ok());
        let mut a = vec![0u8; 3000];
        mem.read(0x2100, &mut a).unwrap();
        assert_eq!(a, data[512..3512]);
        r.submit(12, file.as_fd(), 20000, &pieces, true, true)
            .unwrap();
        // Past the end of the file: a read that gets nothing fails.
        r.submit(13, file.as_fd(), 1 << 30, &[(0x9000, 512)], false, true)
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
            .submit(14, file.as_fd(), 0, &[(0xff00, 512)], false, true)
            .is_err());
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn large_reads_the_kernel_does_inline_go_to_free_copiers() {
        const MIB: usize = 1 << 20;
        let mem = GuestMemory::new(&[(0, 8 << 20)]).unwrap();
        let mut r = match GuestRing::new(&mem, 8, 2) {
            Ok(r) => r,
            Err(e) => return eprintln!("SKIPPED: no io_uring here ({e})"),
        };
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..4 * MIB as u32).map(|i| (i / 4093) as u8).collect();
        file.write_all(&data).unwrap();
        // Page by page, as a storage request names its buffer.
        let pages =
            |gpa: u64| -> Vec<(u64, usize)> { (0..256).map(|i| (gpa + i * 4096, 4096)).collect() };
        r.submit(1, file.as_fd(), 0, &pages(0), false, true)
            .unwrap();
        if r.inline.get(&file.as_raw_fd()) != Some(&true) {
            wait(&mut r, 1);
            return eprintln!("SKIPPED: this file system's page cache reads are not inline");
        }
        for i in 1..4u64 {
            let at = i * MIB as u64;
            r.submit(10 + i, file.as_fd(), at, &pages(at), false, true)
                .unwrap();
        }
        // Two copiers: two of the three went to them, the third to the ring.
        assert_eq!(r.copied(), 2);
        let mut done = wait(&mut r, 4);
        done.sort_by_key(|d| d.0);
        assert_eq!(
            done.iter().map(|d| d.0).collect::<Vec<_>>(),
            [1, 11, 12, 13]
        );
        assert!(done.iter().all(|d| d.1.is_ok()));
        let mut back = vec![0u8; 4 * MIB];
        mem.read(0, &mut back).unwrap();
        assert!(back == data, "guest pages differ from the file");
        // A write stays in the ring, and lands in the file.
        mem.write(4 << 20, &data[..MIB]).unwrap();
        r.submit(
            20,
            file.as_fd(),
            4 * MIB as u64,
            &pages(4 << 20),
            true,
            true,
        )
        .unwrap();
        assert_eq!(r.copied(), 2);
        let done = wait(&mut r, 1);
        assert_eq!(done[0].0, 20);
        assert!(done[0].1.is_ok());
        let mut written = vec![0u8; MIB];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut written, 4 * MIB as u64).unwrap();
        assert!(
            written == data[..MIB],
            "the file differs from the guest pages"
        );
        // Not when the caller has nothing else to do: the ring.
        r.submit(21, file.as_fd(), 0, &pages(0), false, false)
            .unwrap();
        assert_eq!(r.copied(), 2);
        assert_eq!(wait(&mut r, 1)[0].0, 21);
        // A copier's failure is the request's: reading past the end of the file.
        r.submit(30, file.as_fd(), 1 << 30, &pages(0), false, true)
            .unwrap();
        assert_eq!(r.copied(), 3);
        let done = wait(&mut r, 1);
        assert_eq!(
            done[0].1.as_ref().unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
        // Dropped with transfers at the copiers and in the kernel: waits for them.
        for i in 0..4u64 {
            let at = i * MIB as u64;
            r.submit(40 + i, file.as_fd(), at, &pages(at), false, true)
                .unwrap();
        }
        drop(r);
    }

    #[test]
    fn dropping_the_ring_waits_for_operations_in_flight() {
        let mem = GuestMemory::new(&[(0, 0x100000)]).unwrap();
        let Some(mut r) = ring(&mem) else { return };
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        for i in 0..8u64 {
            r.submit(
                i,
                file.as_fd(),
                i * 65536,
                &[(i * 65536, 65536)],
                false,
                true,
            )
            .unwrap();
        }
        assert!(!r.has_room());
        assert!(r
            .submit(9, file.as_fd(), 0, &[(0, 512)], false, true)
            .is_err());
        drop(r);
    }
}
