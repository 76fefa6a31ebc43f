//! Small helpers shared by every layer.
//!
//! * [`RateLimit`]: every log line a guest can trigger goes through one, so a hostile or
//!   broken guest cannot flood the host's log.
//! * [`lock`]: locks a mutex and recovers from poisoning.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Locks a mutex, recovering from poisoning. Code in this project does not panic while it
/// holds a lock, so the protected state is consistent even if another thread died.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks an `RwLock`, recovering from poisoning (see [`lock`]).
pub fn lock_read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks an `RwLock`, recovering from poisoning (see [`lock`]).
pub fn lock_write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Lets at most `burst` events through per `window`; the rest are counted and reported with
/// the next event that gets through. Lock-free and shareable (`&self`), so vCPU threads and
/// device workers can use one limiter together. Races at a window boundary may let a few
/// extra events through; the bound stays `burst` per window plus the number of threads.
#[derive(Debug)]
pub struct RateLimit {
    window_ns: u64,
    burst: u32,
    /// Start of the current window, in nanoseconds since the process's first limiter use.
    window_start: AtomicU64,
    count: AtomicU32,
    suppressed: AtomicU32,
}

/// What [`RateLimit::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` events were dropped since the last one logged.
    Log { suppressed: u32 },
    /// Drop it.
    Drop,
}

impl RateLimit {
    /// A limiter letting `burst` events through per `window`.
    pub const fn new(window: Duration, burst: u32) -> Self {
        Self {
            window_ns: window.as_nanos() as u64,
            burst,
            window_start: AtomicU64::new(0),
            count: AtomicU32::new(0),
            suppressed: AtomicU32::new(0),
        }
    }

    /// The default for guest-triggered messages: 20 per 5 seconds.
    pub const fn guest() -> Self {
        Self::new(Duration::from_secs(5), 20)
    }

    fn now_ns() -> u64 {
        // The epoch is taken on first use; add one so that 0 means "no window yet".
        epoch().elapsed().as_nanos() as u64 + 1
    }

    /// Counts one event and says whether to log it.
    pub fn check(&self) -> Verdict {
        self.check_at(Self::now_ns())
    }

    fn check_at(&self, now: u64) -> Verdict {
        let start = self.window_start.load(Ordering::Relaxed);
        if start == 0 || now.saturating_sub(start) >= self.window_ns {
            // One thread wins the new window; the others count into it.
            if self
                .window_start
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                self.count.store(0, Ordering::Relaxed);
            }
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < self.burst {
            Verdict::Log {
                suppressed: self.suppressed.swap(0, Ordering::Relaxed),
            }
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            Verdict::Drop
        }
    }

    /// Whether to log one more event now.
    pub fn allow(&self) -> bool {
        matches!(self.check(), Verdict::Log { .. })
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::guest()
    }
}

/// Logs through `tracing` at `level` when the limiter lets the event through, and mentions
/// how many were dropped before it:
/// `limited!(LIMIT, warn, "vmbus: message to VP {vp} lost: {e}")`.
#[macro_export]
macro_rules! limited {
    ($limit:expr, $level:ident, $($arg:tt)+) => {
        if let $crate::Verdict::Log { suppressed } = $limit.check() {
            if suppressed > 0 {
                tracing::$level!(suppressed, $($arg)+);
            } else {
                tracing::$level!($($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_per_window_and_counts_the_rest() {
        let r = RateLimit::new(Duration::from_secs(1), 3);
        let base = 10;
        let v: Vec<Verdict> = (0..5).map(|i| r.check_at(base + i)).collect();
        assert_eq!(&v[..3], &[Verdict::Log { suppressed: 0 }; 3]);
        assert_eq!(&v[3..], &[Verdict::Drop; 2]);
        // A new window: the first event reports the two dropped ones.
        assert_eq!(
            r.check_at(base + 1_000_000_000),
            Verdict::Log { suppressed: 2 }
        );
        assert_eq!(
            r.check_at(base + 1_000_000_001),
            Verdict::Log { suppressed: 0 }
        );
    }

    #[test]
    fn shared_between_threads_stays_bounded() {
        let r = std::sync::Arc::new(RateLimit::new(Duration::from_secs(3600), 10));
        let logged: u32 = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || (0..10_000).filter(|_| r.allow()).count() as u32)
            })
            .map(|t| t.join().unwrap())
            .sum();
        assert!((10..=14).contains(&logged), "{logged} logged");
    }

    #[test]
    fn lock_recovers_from_poison() {
        let m = std::sync::Arc::new(Mutex::new(5));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 5);
    }
}
