//! Per-queue counters (atomics, one set per queue, so no queue waits for another) and the
//! totals a NIC reports.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$m:meta])* $f:ident),* $(,)?) => {
        /// Live counters of one queue.
        #[derive(Debug, Default)]
        pub struct QueueCounters { $($(#[$m])* pub $f: AtomicU64),* }

        /// A snapshot of counters (one queue or the sum over all).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        pub struct Counters { $($(#[$m])* pub $f: u64),* }

        impl QueueCounters {
            pub fn snapshot(&self) -> Counters {
                Counters { $($f: self.$f.load(Ordering::Relaxed)),* }
            }
        }

        impl std::ops::AddAssign for Counters {
            fn add_assign(&mut self, o: Self) { $(self.$f += o.$f;)* }
        }
    };
}

counters!(
    /// Frames from the guest handed to the backend.
    tx_packets,
    tx_bytes,
    /// Frames given to the guest.
    rx_packets,
    rx_bytes,
    /// Transfer-page packets sent.
    rx_batches,
    /// Interrupts raised in the guest: at most one per pass of the worker, whatever it sent
    /// (receive batches, send completions, control answers).
    guest_interrupts,
    /// Frames dropped because the guest held every receive section.
    drop_no_receive_section,
    /// Frames dropped by the packet filter, a down link or an uninitialized device.
    drop_filtered,
    /// Guest frames whose source MAC was not the NIC's.
    drop_spoofed_mac,
    /// Guest frames stopped by DHCP or router guard.
    drop_guard,
    /// Malformed NVSP or RNDIS messages and frames.
    drop_malformed,
    /// Frames the backend failed to take or give.
    drop_backend_error,
    /// RNDIS control requests answered.
    control_requests,
);

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
