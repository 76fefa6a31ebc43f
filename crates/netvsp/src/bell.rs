//! An eventfd that only this process rings, which knows whether it was rung: clearing it
//! costs a syscall only then (a worker clears its bells on every pass).

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use vmbus::host::Doorbell;

#[derive(Debug)]
pub(crate) struct Bell {
    doorbell: Doorbell,
    rung: AtomicBool,
}

impl Bell {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            doorbell: Doorbell::new()?,
            rung: AtomicBool::new(false),
        })
    }

    /// Wakes the waiter. The flag is set after the write: a clear that sees it set then
    /// reads at least that write, and a write whose flag is not set yet is read by the
    /// clear after it (the eventfd stays readable meanwhile, so nothing sleeps through it).
    pub fn ring(&self) {
        self.doorbell.ring();
        self.rung.store(true, Ordering::Release);
    }

    /// Consumes the rings, if any.
    pub fn clear(&self) {
        if self.rung.swap(false, Ordering::AcqRel) {
            self.doorbell.clear();
        }
    }
}

impl AsFd for Bell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.doorbell.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{poll, PollFd, PollFlags, Timespec};

    fn readable(b: &Bell) -> bool {
        let mut fds = [PollFd::new(b, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        poll(&mut fds, Some(&zero)).unwrap() == 1
    }

    #[test]
    fn clear_consumes_what_was_rung_and_nothing_is_left_readable() {
        let b = Bell::new().unwrap();
        assert!(!readable(&b));
        b.clear();
        b.ring();
        b.ring();
        assert!(readable(&b));
        b.clear();
        assert!(!readable(&b), "still readable after clear");
        // Rings racing clears from another thread: once both stop, it is not readable
        // after a last clear, and readable after a last ring.
        let b = std::sync::Arc::new(b);
        let r = {
            let b = b.clone();
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    b.ring();
                }
            })
        };
        for _ in 0..20_000 {
            b.clear();
        }
        r.join().unwrap();
        b.clear();
        assert!(!readable(&b));
        b.ring();
        assert!(readable(&b));
    }
}
