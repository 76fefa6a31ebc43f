//! Arbitrary guest packets and answers against the heartbeat service. Panics are bugs.
#![no_main]

mod common;

use common::{GuestOp, Pair};
use ic::Ic;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

#[derive(Debug, Arbitrary)]
enum Op {
    Guest(GuestOp),
    Process { advance_ms: u16 },
    Beat,
    Reopen,
    SaveRestore,
}

fuzz_target!(|ops: Vec<Op>| {
    let mut p = Pair::new();
    let mut ic = Ic::heartbeat(Duration::from_secs(10));
    let _ = ic.open(&mut p.host);
    let mut now = Instant::now();
    for op in ops.into_iter().take(256) {
        match op {
            Op::Guest(g) => g.run(&mut p),
            Op::Process { advance_ms } => {
                now += Duration::from_millis(advance_ms.into());
                let _ = ic.process_report(&mut p.host, now);
                let _ = ic.heartbeat_state(now);
            }
            Op::Beat => {
                let _ = ic.send_heartbeat(&mut p.host);
            }
            Op::Reopen => {
                ic.close();
                let _ = ic.open(&mut p.host);
            }
            Op::SaveRestore => {
                let s = ic.save();
                let mut fresh = Ic::heartbeat(Duration::from_secs(10));
                fresh.restore(&s).expect("own saved state restores");
                assert_eq!(fresh.save(), s);
                ic = fresh;
            }
        }
    }
});
