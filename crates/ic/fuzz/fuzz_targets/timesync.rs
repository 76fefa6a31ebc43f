//! Arbitrary guest packets and answers against the timesync service. Panics are bugs.
#![no_main]

mod common;

use common::{GuestOp, Pair};
use ic::{Ic, TimeSource};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

struct Clock;

impl TimeSource for Clock {
    fn host_time_100ns(&self) -> u64 {
        1 << 60
    }
    fn guest_reference_time(&self) -> u64 {
        12345
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    Guest(GuestOp),
    Process,
    Sample { sync: bool },
    Reopen,
    SaveRestore,
}

fuzz_target!(|ops: Vec<Op>| {
    let mut p = Pair::new();
    let mut ic = Ic::timesync(Box::new(Clock));
    let _ = ic.open(&mut p.host);
    let t0 = Instant::now();
    for (i, op) in ops.into_iter().take(256).enumerate() {
        let now = t0 + Duration::from_millis(i as u64);
        match op {
            Op::Guest(g) => g.run(&mut p),
            Op::Process => {
                let _ = ic.process_report(&mut p.host, now);
            }
            Op::Sample { sync } => {
                let _ = ic.send_timesync(&mut p.host, sync);
            }
            Op::Reopen => {
                ic.close();
                let _ = ic.open(&mut p.host);
            }
            Op::SaveRestore => {
                let s = ic.save();
                let mut fresh = Ic::timesync(Box::new(Clock));
                fresh.restore(&s).expect("own saved state restores");
                assert_eq!(fresh.save(), s);
                ic = fresh;
            }
        }
    }
});
