//! The worker thread of one open channel.

use super::ports::Doorbell;
use crate::channel::Channel;
use crate::device::{ChannelWorker, Progress};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Counters of one channel's worker (inspection, and the tests that prove it does not spin).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Times the worker woke up from its wait.
    pub wakeups: AtomicU64,
    /// Times `process` ran.
    pub passes: AtomicU64,
    /// Set once the channel broke (ring corruption or a device error).
    pub broken: AtomicBool,
}

impl WorkerStats {
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "wakeups": self.wakeups.load(Ordering::Relaxed),
            "passes": self.passes.load(Ordering::Relaxed),
            "broken": self.broken.load(Ordering::Relaxed),
        })
    }
}

/// A running worker; [`WorkerHandle::stop`] ends it.
pub(crate) struct WorkerHandle {
    stop: Arc<Doorbell>,
    thread: Option<JoinHandle<()>>,
    pub stats: Arc<WorkerStats>,
    pub doorbell: Arc<Doorbell>,
}

impl WorkerHandle {
    /// Stops the worker and waits until its thread has ended: after this returns, nothing
    /// touches the channel's rings.
    pub fn stop(mut self) {
        self.stop.ring();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(crate) fn spawn(
    name: String,
    channel: Channel,
    worker: Box<dyn ChannelWorker>,
    doorbell: Arc<Doorbell>,
) -> std::io::Result<WorkerHandle> {
    let stop = Arc::new(Doorbell::new()?);
    let stats = Arc::new(WorkerStats::default());
    let thread = {
        let (stop, stats, doorbell) = (stop.clone(), stats.clone(), doorbell.clone());
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || run(&name, channel, worker, &doorbell, &stop, &stats))?
    };
    Ok(WorkerHandle {
        stop,
        thread: Some(thread),
        stats,
        doorbell,
    })
}

static BROKEN_LOG: support::RateLimit = support::RateLimit::guest();

fn run(
    name: &str,
    mut ch: Channel,
    mut worker: Box<dyn ChannelWorker>,
    doorbell: &Doorbell,
    stop: &Doorbell,
    stats: &WorkerStats,
) {
    let result = (|| -> Result<(), crate::device::WorkerError> {
        worker.start(&mut ch)?;
        loop {
            stats.passes.fetch_add(1, Ordering::Relaxed);
            ch.set_interrupt_mask(true)?;
            // One clock read per pass (a system call where the host's clock source has no
            // vDSO); the wait's timeout counts from it too.
            let now = Instant::now();
            let progress = worker.process(&mut ch, now)?;
            ch.set_interrupt_mask(false)?;
            // A packet that arrived after the drain but before the unmask sent no interrupt.
            if progress == Progress::Idle && ch.has_packet()? {
                continue;
            }
            if wait(&mut *worker, now, doorbell, stop, stats) {
                return Ok(());
            }
        }
    })();
    if let Err(e) = result {
        stats.broken.store(true, Ordering::Relaxed);
        support::limited!(BROKEN_LOG, warn, "vmbus: channel {name} stopped: {e}");
        // The guest gets a dead channel, never a host crash; wait for the close.
        while !wait_stop(stop) {}
    }
}

/// Blocks until something may need the worker; true when it must stop. The device's
/// deadline counts from `now`.
fn wait(
    worker: &mut dyn ChannelWorker,
    now: Instant,
    doorbell: &Doorbell,
    stop: &Doorbell,
    stats: &WorkerStats,
) -> bool {
    let timeout = worker.deadline().map(|d| {
        let left = d.saturating_duration_since(now);
        Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        })
    });
    let (woke, readable) = {
        let fds = worker.fds();
        let mut polled: Vec<PollFd<'_>> = Vec::with_capacity(2 + fds.len());
        polled.push(PollFd::new(stop, PollFlags::IN));
        polled.push(PollFd::new(doorbell, PollFlags::IN));
        polled.extend(
            fds.into_iter()
                .map(|fd| PollFd::from_borrowed_fd(fd, PollFlags::IN)),
        );
        loop {
            match poll(&mut polled, timeout.as_ref()) {
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => break,
            }
        }
        let woke = |p: &PollFd<'_>| !p.revents().is_empty();
        (
            [woke(&polled[0]), woke(&polled[1])],
            polled[2..].iter().map(woke).collect::<Vec<bool>>(),
        )
    };
    stats.wakeups.fetch_add(1, Ordering::Relaxed);
    let [stopped, rung] = woke;
    if stopped {
        return true;
    }
    if rung {
        doorbell.clear();
    }
    worker.woken(&readable);
    false
}

/// Waits for the stop event only (a broken channel); true once it is set.
fn wait_stop(stop: &Doorbell) -> bool {
    let mut polled = [PollFd::new(stop, PollFlags::IN)];
    matches!(poll(&mut polled, None), Ok(n) if n > 0)
}
