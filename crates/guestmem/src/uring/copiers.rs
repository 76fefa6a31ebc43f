//! Threads that read large transfers from a file into guest RAM for a ring whose backend
//! would copy them inside `io_uring_enter` (the page cache, a RAM disk): there the ring
//! gives no concurrency, since the submitting thread does every copy itself, one after
//! another, while other CPUs idle. A copier takes one such read at a time with `preadv`;
//! the ring's own thread goes on with the next request (and copies that one itself when
//! every copier is busy), so the copies of one queue overlap. Writes stay in the ring (see
//! `GuestRing::submit`).
//!
//! Copiers start on first use, at most the number the ring was given, and each takes a
//! transfer only when it is free: nothing queues behind a busy copier. A finished transfer
//! is reported through the ring's eventfd like a kernel completion. Dropping the copiers
//! waits for the transfers they are doing (the caller keeps each descriptor open until its
//! completion is reaped or the ring is dropped).

use crate::GuestMemory;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A read for a copier: `fd` from `offset` into the guest ranges `pieces`.
pub(crate) struct Job {
    /// The ring's key for it, returned with the result.
    pub key: u64,
    pub fd: RawFd,
    pub offset: u64,
    pub pieces: Vec<(u64, usize)>,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    done: Vec<(u64, std::io::Result<()>)>,
    /// Copiers waiting for a job and not yet promised one.
    free: usize,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    mem: GuestMemory,
    /// The ring's eventfd, signalled after each finished transfer.
    event: Arc<OwnedFd>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A ring's copiers (see the module docs).
pub(crate) struct Copiers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    max: usize,
}

impl Copiers {
    /// At most `max` copiers for transfers into `mem`, reporting through `event`.
    pub fn new(mem: &GuestMemory, event: Arc<OwnedFd>, max: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::default(),
                work: Condvar::new(),
                mem: mem.clone(),
                event,
            }),
            threads: Vec::new(),
            max,
        }
    }

    /// Hands `job` to a free copier (starting one if fewer than the maximum run), or gives
    /// it back when every copier is busy.
    pub fn start(&mut self, job: Job) -> Result<(), Job> {
        let mut s = self.shared.lock();
        if s.free > 0 {
            s.free -= 1;
            s.jobs.push_back(job);
            drop(s);
            self.shared.work.notify_one();
            return Ok(());
        }
        if self.threads.len() >= self.max {
            return Err(job);
        }
        let shared = self.shared.clone();
        let worker = std::thread::current();
        let prefix: String = worker.name().unwrap_or("ring").chars().take(11).collect();
        let name = format!("{prefix}-cp");
        let spawned = std::thread::Builder::new()
            .name(name)
            .spawn(move || copier(&shared));
        match spawned {
            Ok(t) => {
                // The new copier takes this job before it ever counts itself free.
                s.jobs.push_back(job);
                self.threads.push(t);
                Ok(())
            }
            Err(_) => {
                // No thread to be had: never try again.
                self.max = self.threads.len();
                Err(job)
            }
        }
    }

    /// Moves the finished transfers' `(key, result)` to `out`.
    pub fn take_done(&self, out: &mut Vec<(u64, std::io::Result<()>)>) {
        if self.threads.is_empty() {
            return;
        }
        out.append(&mut self.shared.lock().done);
    }

    /// Stops the copiers once the transfers given to them are done.
    pub fn stop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Copiers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn copier(shared: &Shared) {
    let mut s = shared.lock();
    loop {
        let Some(job) = s.jobs.pop_front() else {
            if s.stop {
                return;
            }
            s.free += 1;
            while s.jobs.is_empty() && !s.stop {
                s = shared.work.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            continue;
        };
        drop(s);
        // SAFETY: the ring's caller keeps the descriptor open until this job's completion
        // is reaped or the ring (and with it these copiers, joined first) is dropped.
        let fd = unsafe { BorrowedFd::borrow_raw(job.fd) };
        let r = shared.mem.read_fd_at(fd, job.offset, &job.pieces);
        s = shared.lock();
        s.done.push((job.key, r));
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local buffer to the ring's eventfd, which `shared`
        // keeps open.
        let _ = unsafe { libc::write(shared.event.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}
