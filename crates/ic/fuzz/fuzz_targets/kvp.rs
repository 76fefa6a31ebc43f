//! Arbitrary guest packets and answers (including corrupted KVP answers: lengths, value
//! types, indices, strings) against the KVP service and its host queue. Panics are bugs;
//! so are more than one outstanding request or an unbounded queue or snapshot.
#![no_main]

mod common;

use common::{GuestOp, Pair};
use ic::kvp::{MAX_ADAPTERS, MAX_ITEMS_PER_POOL, MAX_QUEUE};
use ic::{Kvp, KvpPool};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

#[derive(Debug, Arbitrary)]
enum Op {
    Guest(GuestOp),
    Process { advance_ms: u16 },
    Poll { advance_ms: u16 },
    Set { pool: u8, key: String, value: String },
    Delete { pool: u8, key: String },
    Refresh { pool: u8 },
    IpInfo { mac: String },
    Reopen,
    SaveRestore,
}

fn pool(p: u8) -> KvpPool {
    KvpPool::ALL[usize::from(p) % KvpPool::ALL.len()]
}

fuzz_target!(|ops: Vec<Op>| {
    let mut p = Pair::new();
    let mut kvp = Kvp::with_timeout(Duration::from_secs(1));
    let _ = kvp.open(&mut p.host);
    let mut now = Instant::now();
    for op in ops.into_iter().take(256) {
        match op {
            Op::Guest(g) => g.run(&mut p),
            Op::Process { advance_ms } => {
                now += Duration::from_millis(advance_ms.into());
                let _ = kvp.process_report(&mut p.host, now);
            }
            Op::Poll { advance_ms } => {
                now += Duration::from_millis(advance_ms.into());
                let _ = kvp.poll(&mut p.host, now);
                let _ = kvp.deadline();
            }
            Op::Set { pool: p_, key, value } => {
                let _ = kvp.set(pool(p_), &key, &value);
            }
            Op::Delete { pool: p_, key } => {
                let _ = kvp.delete(pool(p_), &key);
            }
            Op::Refresh { pool: p_ } => {
                let _ = kvp.refresh_pool(pool(p_));
            }
            Op::IpInfo { mac } => {
                let _ = kvp.get_ip_info(&mac);
            }
            Op::Reopen => {
                kvp.close();
                let _ = kvp.open(&mut p.host);
            }
            Op::SaveRestore => {
                let s = kvp.save();
                let mut fresh = Kvp::with_timeout(Duration::from_secs(1));
                fresh.restore(&s, now).expect("own saved state restores");
                assert_eq!(fresh.save(), s);
                kvp = fresh;
            }
        }
        assert!(kvp.queued() <= MAX_QUEUE + 1);
        let items = kvp.items();
        assert!(items.guest.values().all(|m| m.len() <= MAX_ITEMS_PER_POOL));
        assert!(items.ip_info.len() <= MAX_ADAPTERS);
    }
});
