//! Arbitrary guest packets and answers against the shutdown service. Panics are bugs.
#![no_main]

mod common;

use common::{GuestOp, Pair};
use ic::{Ic, ShutdownKind};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

#[derive(Debug, Arbitrary)]
enum Op {
    Guest(GuestOp),
    Process,
    Request { kind: u8, force: bool, reason: String },
    Reopen,
    SaveRestore,
}

fuzz_target!(|ops: Vec<Op>| {
    let mut p = Pair::new();
    let mut ic = Ic::shutdown();
    let _ = ic.open(&mut p.host);
    let t0 = Instant::now();
    for (i, op) in ops.into_iter().take(256).enumerate() {
        let now = t0 + Duration::from_millis(i as u64);
        match op {
            Op::Guest(g) => g.run(&mut p),
            Op::Process => {
                let _ = ic.process_report(&mut p.host, now);
            }
            Op::Request { kind, force, reason } => {
                let kind = match kind % 3 {
                    0 => ShutdownKind::PowerOff,
                    1 => ShutdownKind::Reboot,
                    _ => ShutdownKind::Hibernate,
                };
                let _ = ic.request_shutdown(&mut p.host, kind, force, &reason);
            }
            Op::Reopen => {
                ic.close();
                let _ = ic.open(&mut p.host);
            }
            Op::SaveRestore => {
                let s = ic.save();
                let mut fresh = Ic::shutdown();
                fresh.restore(&s).expect("own saved state restores");
                assert_eq!(fresh.save(), s);
                ic = fresh;
            }
        }
    }
    let _ = ic.process(&mut p.host, t0);
});
