//! Drives the Hyper-V state machines with arbitrary guest and host operations: synthetic MSR
//! reads and writes, hypercalls with arbitrary registers, host message posts and event
//! signals, and guest writes anywhere in RAM (including the SynIC pages while the host uses
//! them). Panics, hangs and invariant violations are bugs.
#![no_main]

use std::sync::Arc;

use guestmem::GuestMemory;
use hv1::{
    EventDelivery, HvStatus, HypercallRegs, ManualTime, MsrAction, MsrError, Partition,
    PartitionConfig, MESSAGE_QUEUE_DEPTH,
};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const RAM: u64 = 0x10000;
const VPS: u32 = 2;

#[derive(Debug, Arbitrary)]
enum Op {
    Read { vp: u8, msr: u16 },
    Write { vp: u8, msr: u16, value: u64 },
    Hypercall { vp: u8, rcx: u64, rdx: u64, r8: u64 },
    Post { vp: u8, sint: u8, message_type: u32, payload: Vec<u8> },
    Signal { vp: u8, sint: u8, flag: u16 },
    GuestWrite { gpa: u16, bytes: Vec<u8> },
    Tick { ticks: u32 },
}

#[derive(Debug, Arbitrary)]
struct Input {
    booted: bool,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mem = GuestMemory::new(&[(0, RAM)]).unwrap();
    let time = Arc::new(ManualTime::new(2_500_000_000));
    let p = Partition::new(
        PartitionConfig {
            vp_count: VPS,
            invariant_tsc: true,
            // So that VP assist page writes take the lazy-EOI path too.
            apic_assist: true,
        },
        mem.clone(),
        time.clone(),
    )
    .unwrap();
    if input.booted {
        p.msr_write(0, 0x4000_0000, 1 << 63).unwrap();
        p.msr_write(0, 0x4000_0001, 0x1001).unwrap();
        for vp in 0..VPS {
            let base = 0x2000 + vp as u64 * 0x2000;
            p.msr_write(vp, 0x4000_0083, base | 1).unwrap();
            p.msr_write(vp, 0x4000_0082, (base + 0x1000) | 1).unwrap();
            p.msr_write(vp, 0x4000_0092, 0xF3).unwrap();
            p.msr_write(vp, 0x4000_0080, 1).unwrap();
        }
    }
    for op in input.ops {
        match op {
            Op::Read { vp, msr } => {
                let (vp, msr) = (vp as u32 % (VPS + 1), 0x4000_0000 + (msr as u32 % 0x210));
                match p.msr_read(vp, msr) {
                    Ok(_) | Err(MsrError::Gp) => assert!(vp < VPS),
                    Err(MsrError::InvalidVp(v)) => assert_eq!(v, vp),
                    Err(MsrError::NotSynthetic) => assert!(msr > 0x4000_01FF),
                }
            }
            Op::Write { vp, msr, value } => {
                let (vp, msr) = (vp as u32 % (VPS + 1), 0x4000_0000 + (msr as u32 % 0x210));
                if let Ok(Some(MsrAction::Interrupts(v))) = p.msr_write(vp, msr, value) {
                    assert!(v.iter().all(|i| i.vp == vp && i.vector >= 16), "{v:?}");
                }
            }
            Op::Hypercall { vp, rcx, rdx, r8 } => {
                let vp = vp as u32 % (VPS + 1);
                if let Some(o) = p.hypercall(vp, HypercallRegs { rcx, rdx, r8 }) {
                    assert!(vp < VPS);
                    if o.action.is_some() {
                        assert_eq!(o.status, HvStatus::SUCCESS);
                    }
                    assert!(o.reps_completed <= 0xFFF);
                }
            }
            Op::Post {
                vp,
                sint,
                message_type,
                payload,
            } => {
                let vp = vp as u32 % (VPS + 1);
                if let Ok(d) = p.post_message(vp, sint % 17, message_type, &payload) {
                    if let Some(i) = d.interrupt {
                        assert!(i.vp == vp && i.vector >= 16);
                    }
                }
            }
            Op::Signal { vp, sint, flag } => {
                let vp = vp as u32 % (VPS + 1);
                if let Ok(EventDelivery::Signalled(Some(i))) =
                    p.signal_event(vp, sint % 17, flag as u32 % 2100)
                {
                    assert!(i.vp == vp && i.vector >= 16);
                }
            }
            Op::GuestWrite { gpa, bytes } => {
                let _ = mem.write(gpa as u64, &bytes);
            }
            Op::Tick { ticks } => time.advance(ticks as u64),
        }
        for vp in 0..VPS {
            for sint in 0..16 {
                assert!(p.queued_messages(vp, sint) <= MESSAGE_QUEUE_DEPTH);
            }
        }
    }
    let saved = p.save();
    p.restore(&saved).unwrap();
    assert_eq!(p.save(), saved);
});
