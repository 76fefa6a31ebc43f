//! When a worker keeps polling the guest's ring with the guest's interrupt masked
//! ([`vmbus::Progress::Polling`]): a guest that streams packets then writes them without a
//! signal, that is without a VM exit each.
//!
//! The worker polls after every pass that took packets from the guest, again after an
//! interval of [`GAPS_PER_POLL`] times the mean gap between the guest's packets (between
//! [`MIN_POLL_INTERVAL`] and [`MAX_POLL_INTERVAL`]), so that a poll finds a few packets and a
//! packet waits at most about that long; it stops after an interval without packets, and at
//! once after a pass that gave the guest received frames but took nothing from it: a guest
//! answering what it just received (a request and response) should signal its answer, not
//! wait for the next poll.

use std::time::{Duration, Instant};

/// Shortest interval between polls.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_micros(50);
/// Longest interval between polls, and so the longest a packet waits while polling.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Packets a poll should find, in mean gaps.
const GAPS_PER_POLL: u32 = 4;

#[derive(Debug, Default)]
pub(crate) struct Poll {
    /// While polling: when to look at the ring again.
    until: Option<Instant>,
    /// The last pass that took packets.
    last_take: Option<Instant>,
    /// Mean gap between the guest's packets (exponentially weighted, 1/8 per sample), also
    /// across the times the worker did not poll, so that it learns a slow guest's pace.
    gap: Duration,
}

impl Poll {
    /// After a pass at `now` that took `taken` packets and gave the guest received frames or
    /// not: whether to keep polling.
    pub fn after_pass(&mut self, taken: usize, delivered: bool, now: Instant) -> bool {
        if taken > 0 {
            if let Some(last) = self.last_take {
                // A gap across an idle time counts as the longest interval: it says the
                // guest is slow, not how slow.
                let sample =
                    (now.saturating_duration_since(last) / taken as u32).min(MAX_POLL_INTERVAL);
                self.gap = (self.gap * 7 + sample) / 8;
            }
            self.last_take = Some(now);
            let interval = (self.gap * GAPS_PER_POLL).clamp(MIN_POLL_INTERVAL, MAX_POLL_INTERVAL);
            self.until = Some(now + interval);
        } else if delivered || self.until.is_some_and(|d| now >= d) {
            self.stop();
        }
        self.until.is_some()
    }

    /// Ends polling (the guest's interrupt gets unmasked).
    pub fn stop(&mut self) {
        self.until = None;
    }

    /// When to look at the ring again, while polling.
    pub fn deadline(&self) -> Option<Instant> {
        self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn the_interval_follows_the_guests_gaps_within_bounds() {
        let t0 = Instant::now();
        let mut p = Poll::default();
        // A packet every 100 us: polls every 400 us once the mean has settled.
        for i in 0..200 {
            assert!(p.after_pass(1, false, t0 + us(100 * i)));
        }
        let d = p.deadline().unwrap() - (t0 + us(100 * 199));
        assert!((us(390)..=us(400)).contains(&d), "{d:?}");
        // A packet every 10 ms: capped at the longest interval.
        let t1 = t0 + us(100 * 199);
        for i in 1..100 {
            // Each pass is a poll at its deadline that found one packet.
            assert!(p.after_pass(1, false, t1 + us(10_000 * i)));
        }
        let last = t1 + us(10_000 * 99);
        assert_eq!(p.deadline(), Some(last + MAX_POLL_INTERVAL));
        // Back-to-back packets: no shorter than the shortest interval.
        let mut p = Poll::default();
        for i in 0..100 {
            p.after_pass(8, false, t0 + us(i));
        }
        assert_eq!(p.deadline(), Some(t0 + us(99) + MIN_POLL_INTERVAL));
    }

    #[test]
    fn polling_stops_after_an_empty_interval_or_after_a_delivery() {
        let t0 = Instant::now();
        let mut p = Poll::default();
        assert!(
            !p.after_pass(0, false, t0),
            "nothing taken, nothing to poll for"
        );
        assert!(p.after_pass(1, false, t0));
        let d = p.deadline().unwrap();
        // Woken before the deadline (the TAP had frames for the guest, none delivered):
        // still polling, same deadline.
        assert!(p.after_pass(0, false, d - us(1)));
        assert_eq!(p.deadline(), Some(d));
        // The poll at the deadline finds nothing: stop.
        assert!(!p.after_pass(0, false, d));
        assert_eq!(p.deadline(), None);
        // Frames given to the guest in a pass that took nothing: stop at once.
        assert!(p.after_pass(3, false, d + us(10)));
        assert!(!p.after_pass(0, true, d + us(20)));
        assert_eq!(p.deadline(), None);
        // A pass that took packets keeps polling even if it delivered too.
        assert!(p.after_pass(1, true, d + us(30)));
    }

    #[test]
    fn a_guest_slower_than_the_first_polls_is_learnt() {
        // A packet every 300 us, each signalled while the worker is not polling: the mean
        // grows from zero until a poll interval covers the gap and the worker keeps polling.
        let t0 = Instant::now();
        let mut p = Poll::default();
        let mut polling_at = None;
        for i in 0..100u64 {
            let now = t0 + us(300 * i);
            // The poll at the deadline, if it came before this packet, found nothing.
            if p.deadline().is_some_and(|d| d < now) {
                p.after_pass(0, false, p.deadline().unwrap());
            }
            let was_polling = p.deadline().is_some();
            p.after_pass(1, false, now);
            if was_polling && polling_at.is_none() {
                polling_at = Some(i);
            }
        }
        assert!(polling_at.is_some_and(|i| i < 20), "{polling_at:?}");
        assert_eq!(p.deadline(), Some(t0 + us(300 * 99) + MAX_POLL_INTERVAL));
    }
}
