//! Partition reference time: 100 ns ticks derived from the guest TSC, shared by the
//! TIME_REF_COUNT MSR and the reference TSC page so the two always agree.

use std::sync::atomic::{AtomicU64, Ordering};

use hvdef::hv::HV_REFERENCE_TIME_HZ;

/// Where the guest TSC comes from. The KVM layer implements it from the host TSC and the
/// guest's TSC offset/scaling; tests use [`ManualTime`].
pub trait TimeSource: Send + Sync {
    /// The guest's current TSC value.
    fn guest_tsc(&self) -> u64;
    /// The guest TSC frequency in Hz. Must be constant for the life of the partition.
    fn tsc_frequency(&self) -> u64;
}

/// Lowest TSC frequency we accept: below 10 MHz the reference TSC scale does not fit in 64
/// bits (scale = 2^64 * 10^7 / hz).
pub const MIN_TSC_HZ: u64 = HV_REFERENCE_TIME_HZ;

/// The reference TSC page scale for a TSC frequency: floor(2^64 * 10^7 / tsc_hz). `None` when
/// `tsc_hz` is below [`MIN_TSC_HZ`].
pub fn reference_tsc_scale(tsc_hz: u64) -> Option<u64> {
    if tsc_hz < MIN_TSC_HZ {
        return None;
    }
    let scale = ((HV_REFERENCE_TIME_HZ as u128) << 64) / tsc_hz as u128;
    u64::try_from(scale).ok()
}

/// Reference time for a TSC value, exactly as the guest computes it from the TSC page:
/// `((tsc * scale) >> 64) + offset`.
pub fn reference_time(tsc: u64, scale: u64, offset: i64) -> u64 {
    (((tsc as u128 * scale as u128) >> 64) as u64).wrapping_add(offset as u64)
}

/// A time source whose TSC the caller sets (for tests and replay).
#[derive(Debug)]
pub struct ManualTime {
    tsc: AtomicU64,
    hz: u64,
}

impl ManualTime {
    pub fn new(tsc_hz: u64) -> Self {
        Self {
            tsc: AtomicU64::new(0),
            hz: tsc_hz,
        }
    }

    pub fn set_tsc(&self, tsc: u64) {
        self.tsc.store(tsc, Ordering::SeqCst);
    }

    pub fn advance(&self, ticks: u64) {
        self.tsc.fetch_add(ticks, Ordering::SeqCst);
    }
}

impl TimeSource for ManualTime {
    fn guest_tsc(&self) -> u64 {
        self.tsc.load(Ordering::SeqCst)
    }

    fn tsc_frequency(&self) -> u64 {
        self.hz
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_matches_the_formula() {
        // 1 GHz: 10^7 / 10^9 = 1/100 of 2^64.
        assert_eq!(
            reference_tsc_scale(1_000_000_000),
            Some(0x028F_5C28_F5C2_8F5C)
        );
        // 10 MHz is exactly 2^64, which does not fit.
        assert_eq!(reference_tsc_scale(10_000_000), None);
        assert_eq!(
            reference_tsc_scale(10_000_001),
            Some(((10_000_000u128 << 64) / 10_000_001) as u64)
        );
        assert_eq!(reference_tsc_scale(0), None);
        assert_eq!(reference_tsc_scale(9_999_999), None);
    }

    #[test]
    fn reference_time_counts_100ns() {
        let hz = 2_500_000_000;
        let scale = reference_tsc_scale(hz).unwrap();
        // One second of TSC is 10^7 ticks, give or take the floor in the scale.
        let t = reference_time(hz, scale, 0);
        assert!((9_999_999..=10_000_000).contains(&t), "{t}");
        // An hour.
        let t = reference_time(hz * 3600, scale, 0);
        assert!((36_000_000_000 - 1..=36_000_000_000).contains(&t), "{t}");
        assert_eq!(reference_time(0, scale, 5), 5);
        assert_eq!(reference_time(u64::MAX, u64::MAX, 0), u64::MAX - 1);
    }
}
