//! Ring throughput: one producer (the host end of a channel, on one thread) and one consumer
//! (the guest end, on another), with signalling as the protocol requires: the producer
//! signals only when the consumer's ring was empty and unmasked, the consumer signals only
//! when a read lifts free space above pending_send_sz. Signals wake the other thread.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use guestmem::GuestMemory;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmbus::{Channel, ChannelError, Side};

/// A sticky wake-up flag.
#[derive(Default)]
struct Event {
    set: Mutex<bool>,
    cv: Condvar,
    count: AtomicU64,
}

impl Event {
    fn signal(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        *self.set.lock().unwrap() = true;
        self.cv.notify_one();
    }

    fn wait(&self) {
        let mut s = self.set.lock().unwrap();
        while !*s {
            s = self.cv.wait(s).unwrap();
        }
        *s = false;
    }
}

struct Rig {
    host: Channel,
    guest: Channel,
    to_guest: Arc<Event>,
    to_host: Arc<Event>,
}

/// Two rings of `pages` pages each (control page included).
fn rig(pages: u64) -> Rig {
    let mem = GuestMemory::new(&[(0, 16 << 20)]).unwrap();
    let pfns: Vec<u64> = (256..256 + 2 * pages).collect();
    Channel::initialize_rings(&mem, &pfns, pages as u32).unwrap();
    let to_guest = Arc::new(Event::default());
    let to_host = Arc::new(Event::default());
    let tg = to_guest.clone();
    let th = to_host.clone();
    let host = Channel::new(
        &mem,
        &pfns,
        pages as u32,
        Side::Host,
        Some(Arc::new(move || tg.signal())),
    )
    .unwrap();
    let guest = Channel::new(
        &mem,
        &pfns,
        pages as u32,
        Side::Guest,
        Some(Arc::new(move || th.signal())),
    )
    .unwrap();
    Rig {
        host,
        guest,
        to_guest,
        to_host,
    }
}

/// Host sends `n` packets of `size` bytes; the guest receives them. Returns elapsed time.
fn run(r: &mut Rig, n: u64, size: usize) -> Duration {
    let payload = vec![0xa5u8; size];
    let start = Instant::now();
    std::thread::scope(|s| {
        let guest = &mut r.guest;
        let to_guest = &r.to_guest;
        s.spawn(move || {
            let mut buf = Vec::with_capacity(size + 64);
            let mut got = 0;
            while got < n {
                match guest.try_recv(&mut buf) {
                    Ok(Some(p)) => {
                        debug_assert_eq!(p.payload().len(), size.next_multiple_of(8));
                        got += 1;
                    }
                    Ok(None) => to_guest.wait(),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        for i in 0..n {
            loop {
                match r.host.send_inband(i, &payload, false) {
                    Ok(()) => break,
                    Err(ChannelError::Full) => r.to_host.wait(),
                    Err(e) => panic!("{e}"),
                }
            }
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_1p1c");
    for size in [64usize, 4096] {
        g.throughput(Throughput::Elements(1));
        // 256 KiB rings, like a storvsc/netvsc channel.
        let mut r = rig(64);
        g.bench_with_input(BenchmarkId::new("packets", size), &size, |b, &size| {
            b.iter_custom(|iters| run(&mut r, iters, size))
        });
        eprintln!(
            "size {size}: signals host->guest {}, guest->host {}",
            r.to_guest.count.load(Ordering::Relaxed),
            r.to_host.count.load(Ordering::Relaxed)
        );
    }
    g.finish();

    // The raw cost of one packet through the ring, without threads or wake-ups: send one,
    // receive one, on the same thread.
    let mut g = c.benchmark_group("ring_same_thread");
    for size in [64usize, 4096] {
        g.throughput(Throughput::Elements(1));
        let mut r = rig(64);
        let payload = vec![0x5au8; size];
        let mut buf = Vec::with_capacity(size + 64);
        g.bench_with_input(BenchmarkId::new("send_recv", size), &size, |b, _| {
            b.iter(|| {
                r.host.send_inband(1, &payload, false).unwrap();
                r.guest
                    .try_recv(&mut buf)
                    .unwrap()
                    .unwrap()
                    .transaction_id()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
