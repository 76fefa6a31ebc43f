//! Resource use of a running VM since it started (Measure-VM): the worker's CPU time and
//! memory, and the bytes its disks and network adapters moved.

use serde::Serialize;

/// What `viridian vm measure` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Measure {
    pub uptime_secs: u64,
    /// User and system CPU time of the worker process (vCPUs and devices), in seconds.
    pub cpu_seconds: f64,
    /// Guest memory the VM was given.
    pub memory_bytes: u64,
    /// The worker's resident memory (guest pages it touched, plus its own).
    pub resident_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_written_bytes: u64,
    pub network_received_bytes: u64,
    pub network_sent_bytes: u64,
}

/// Clock ticks per second in /proc (USER_HZ, 100 on every Linux architecture we run on).
const USER_HZ: f64 = 100.0;

/// The CPU seconds and resident bytes of this process, from /proc/self.
pub fn own_usage() -> (f64, u64) {
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // utime and stime: fields 14 and 15, the 12th and 13th after the command name.
            let rest = stat.rsplit(')').next()?;
            let mut f = rest.split_whitespace().skip(11);
            let utime: u64 = f.next()?.parse().ok()?;
            let stime: u64 = f.next()?.parse().ok()?;
            Some((utime + stime) as f64 / USER_HZ)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0);
    (cpu, rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_usage_grows_with_work() {
        let (before, rss) = own_usage();
        assert!(rss > 0);
        let end = std::time::Instant::now() + std::time::Duration::from_millis(300);
        let mut x = 0u64;
        while std::time::Instant::now() < end {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let (after, _) = own_usage();
        assert!(after > before, "{before} -> {after}");
    }
}
