//! Pausing the vCPUs (Suspend-VM / Resume-VM): the guest's state stays in memory while its
//! vCPU threads wait outside KVM_RUN.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

/// Where the vCPU threads park while the VM is paused.
#[derive(Default)]
pub(crate) struct PauseGate {
    /// Checked by each vCPU before every entry to the guest.
    requested: AtomicBool,
    state: Mutex<Parked>,
    changed: Condvar,
}

#[derive(Default)]
struct Parked {
    paused: bool,
    parked: u32,
}

impl PauseGate {
    /// Whether the vCPUs are told to stay out of the guest.
    pub fn is_paused(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Tells the vCPUs to park. They notice at their next exit, so the caller kicks them.
    pub fn pause(&self) {
        support::lock(&self.state).paused = true;
        self.requested.store(true, Ordering::Release);
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.requested.store(false, Ordering::Release);
        support::lock(&self.state).paused = false;
        self.changed.notify_all();
    }

    /// How many vCPUs are parked now.
    pub fn parked(&self) -> u32 {
        support::lock(&self.state).parked
    }

    /// Called by a vCPU thread outside KVM_RUN: waits while the VM is paused, unless `stopping`.
    pub fn park_while_paused(&self, stopping: &AtomicBool) {
        let mut state = support::lock(&self.state);
        state.parked += 1;
        while state.paused && !stopping.load(Ordering::SeqCst) {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.parked -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn wait_for(what: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !what() {
            assert!(Instant::now() < end, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn threads_park_until_resumed_or_stopped() {
        let gate = Arc::new(PauseGate::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let steps = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (gate, stopping, steps) = (gate.clone(), stopping.clone(), steps.clone());
                std::thread::spawn(move || {
                    while !stopping.load(Ordering::SeqCst) {
                        if gate.is_paused() {
                            gate.park_while_paused(&stopping);
                            continue;
                        }
                        steps.fetch_add(1, Ordering::Relaxed);
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        wait_for(|| steps.load(Ordering::Relaxed) > 100);
        gate.pause();
        wait_for(|| gate.parked() == 2);
        let frozen = steps.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(steps.load(Ordering::Relaxed), frozen, "a parked vCPU ran");
        gate.resume();
        wait_for(|| steps.load(Ordering::Relaxed) > frozen + 100);
        assert_eq!(gate.parked(), 0);
        gate.pause();
        wait_for(|| gate.parked() == 2);
        // Stopping a paused VM: the threads leave the gate once woken.
        stopping.store(true, Ordering::SeqCst);
        gate.resume();
        for t in threads {
            t.join().unwrap();
        }
    }
}
