//! Random, hostile sequences of MSR accesses, hypercalls, host posts and guest-memory
//! scribbles: nothing panics, every interrupt is valid, queues stay bounded.

use std::sync::Arc;

use guestmem::GuestMemory;
use hv1::{
    EventDelivery, HvStatus, HypercallRegs, ManualTime, MsrAction, MsrError, Partition,
    PartitionConfig, MESSAGE_QUEUE_DEPTH,
};
use proptest::prelude::*;

const RAM: u64 = 0x10000;
const VPS: u32 = 2;

#[derive(Debug, Clone)]
enum Op {
    Read(u32, u32),
    Write(u32, u32, u64),
    Hypercall(u32, u64, u64, u64),
    Post(u32, u8, u32, Vec<u8>),
    Signal(u32, u8, u32),
    Scribble(u64, Vec<u8>),
}

fn gpa() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..RAM + 0x2000,
        any::<u64>(),
        (0..16u64).prop_map(|p| p << 12 | 1),
    ]
}

fn msr() -> impl Strategy<Value = u32> {
    prop_oneof![
        0x4000_0000..=0x4000_0001u32,
        0x4000_0020..=0x4000_0023u32,
        Just(0x4000_0073u32),
        0x4000_0080..=0x4000_009Fu32,
        0x4000_0100..=0x4000_0105u32,
        Just(0x4000_0118u32),
        0x4000_0000..=0x4000_0200u32,
    ]
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        gpa(),
        any::<u64>(),
        (0..256u64).prop_map(|v| v | if v & 1 == 0 { 1 << 16 } else { 0 }),
        Just(1u64),
        Just(0u64),
        Just(3u64 << 62),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..VPS + 1, msr()).prop_map(|(v, m)| Op::Read(v, m)),
        (0..VPS + 1, msr(), value()).prop_map(|(v, m, x)| Op::Write(v, m, x)),
        (
            0..VPS + 1,
            prop_oneof![
                (0..0x60u64, any::<u16>(), any::<u16>())
                    .prop_map(|(c, a, b)| c | (a as u64) << 16 | (b as u64) << 32),
                any::<u64>(),
                Just(0x5C),
                Just(0x1005D),
                Just(0x50 | 1 << 32),
            ],
            gpa(),
            gpa()
        )
            .prop_map(|(v, c, d, r)| Op::Hypercall(v, c, d, r)),
        (
            0..VPS + 1,
            0..17u8,
            0..3u32,
            proptest::collection::vec(any::<u8>(), 0..250)
        )
            .prop_map(|(v, s, t, p)| Op::Post(v, s, t, p)),
        (0..VPS + 1, 0..17u8, 0..2100u32).prop_map(|(v, s, f)| Op::Signal(v, s, f)),
        (0..RAM, proptest::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(g, b)| Op::Scribble(g, b)),
    ]
}

fn setup() -> (Partition, GuestMemory) {
    let mem = GuestMemory::new(&[(0, RAM)]).unwrap();
    let p = Partition::new(
        PartitionConfig {
            vp_count: VPS,
            invariant_tsc: true,
            apic_assist: false,
        },
        mem.clone(),
        Arc::new(ManualTime::new(3_000_000_000)),
    )
    .unwrap();
    // Start from a booted state so that deeper paths are reachable.
    p.msr_write(0, 0x4000_0000, 1 << 63).unwrap();
    p.msr_write(0, 0x4000_0001, 0x1001).unwrap();
    for vp in 0..VPS {
        p.msr_write(vp, 0x4000_0083, (0x2000 + vp as u64 * 0x2000) | 1)
            .unwrap();
        p.msr_write(vp, 0x4000_0082, (0x3000 + vp as u64 * 0x2000) | 1)
            .unwrap();
        p.msr_write(vp, 0x4000_0092, 0xF3).unwrap();
        p.msr_write(vp, 0x4000_0080, 1).unwrap();
    }
    (p, mem)
}

fn check_interrupts(a: &Option<MsrAction>) {
    if let Some(MsrAction::Interrupts(v)) = a {
        for i in v {
            assert!(i.vp < VPS && i.vector >= 16, "{i:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn hostile_sequences(ops in proptest::collection::vec(op(), 1..60)) {
        let (p, mem) = setup();
        for op in ops {
            match op {
                Op::Read(vp, msr) => match p.msr_read(vp, msr) {
                    Ok(_) | Err(MsrError::Gp) => prop_assert!(vp < VPS),
                    Err(MsrError::InvalidVp(v)) => prop_assert_eq!(v, vp),
                    Err(MsrError::NotSynthetic) => prop_assert!(msr > 0x4000_01FF),
                },
                Op::Write(vp, msr, value) => {
                    if let Ok(a) = p.msr_write(vp, msr, value) {
                        check_interrupts(&a);
                    }
                }
                Op::Hypercall(vp, rcx, rdx, r8) => {
                    if let Some(o) = p.hypercall(vp, HypercallRegs { rcx, rdx, r8 }) {
                        prop_assert!(vp < VPS);
                        if o.action.is_some() {
                            prop_assert_eq!(o.status, HvStatus::SUCCESS);
                        }
                        let _ = o.rax();
                    }
                }
                Op::Post(vp, sint, ty, payload) => {
                    if let Ok(d) = p.post_message(vp, sint, ty, &payload) {
                        if let Some(i) = d.interrupt {
                            prop_assert!(i.vp == vp && i.vector >= 16);
                        }
                    }
                }
                Op::Signal(vp, sint, flag) => {
                    if let Ok(EventDelivery::Signalled(Some(i))) = p.signal_event(vp, sint, flag) {
                        prop_assert!(i.vp == vp && i.vector >= 16);
                    }
                }
                Op::Scribble(gpa, bytes) => {
                    let _ = mem.write(gpa, &bytes);
                }
            }
            for vp in 0..VPS {
                for sint in 0..16 {
                    prop_assert!(p.queued_messages(vp, sint) <= MESSAGE_QUEUE_DEPTH);
                }
                prop_assert_eq!(p.msr_read(vp, 0x4000_0002), Ok(vp as u64));
            }
        }
        // Save/restore of whatever state we reached round-trips.
        let saved = p.save();
        let (q, _) = setup();
        q.restore(&saved).unwrap();
        prop_assert_eq!(q.save(), saved);
    }
}
