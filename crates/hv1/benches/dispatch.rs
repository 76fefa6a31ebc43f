//! Cost of the user-space side of the hot paths: hypercall dispatch, the clock MSR, and a
//! SynIC message round trip (post, guest consumes, EOM) and event signal.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use guestmem::GuestMemory;
use hv1::{HypercallRegs, ManualTime, Partition, PartitionConfig};

fn booted() -> (Partition, GuestMemory) {
    let mem = GuestMemory::new(&[(0, 0x10_0000)]).unwrap();
    let p = Partition::new(
        PartitionConfig {
            vp_count: 2,
            invariant_tsc: true,
            apic_assist: false,
        },
        mem.clone(),
        Arc::new(ManualTime::new(2_500_000_000)),
    )
    .unwrap();
    p.msr_write(0, 0x4000_0000, 1 << 63).unwrap();
    p.msr_write(0, 0x4000_0001, 0x1001).unwrap();
    p.msr_write(0, 0x4000_0083, 0x5001).unwrap();
    p.msr_write(0, 0x4000_0082, 0x6001).unwrap();
    p.msr_write(0, 0x4000_0092, 0xF3).unwrap();
    p.msr_write(0, 0x4000_0080, 1).unwrap();
    (p, mem)
}

fn bench(c: &mut Criterion) {
    let (p, mem) = booted();
    c.bench_function("hypercall SignalEvent (fast)", |b| {
        b.iter(|| {
            p.hypercall(
                0,
                HypercallRegs {
                    rcx: 0x1005D,
                    rdx: 0x2002,
                    r8: 0,
                },
            )
        })
    });
    // HvPostMessage with a 240-byte payload.
    let mut input = [0u8; 256];
    input[0] = 4;
    input[8] = 1;
    input[12] = 240;
    mem.write(0x2000, &input).unwrap();
    c.bench_function("hypercall PostMessage (slow, 240 B)", |b| {
        b.iter(|| {
            p.hypercall(
                0,
                HypercallRegs {
                    rcx: 0x5C,
                    rdx: 0x2000,
                    r8: 0,
                },
            )
        })
    });
    c.bench_function("rdmsr TIME_REF_COUNT", |b| {
        b.iter(|| p.msr_read(0, 0x4000_0020))
    });
    c.bench_function("post_message + guest clear", |b| {
        b.iter(|| {
            let d = p.post_message(0, 2, 1, &[0u8; 64]).unwrap();
            mem.store_u32(0x5000 + 2 * 256, 0, Ordering::SeqCst)
                .unwrap();
            d
        })
    });
    c.bench_function("signal_event + guest clear", |b| {
        b.iter(|| {
            let d = p.signal_event(0, 2, 5).unwrap();
            mem.store_u64(0x6000 + 2 * 256, 0, Ordering::SeqCst)
                .unwrap();
            d
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
