//! Wire formats and constants of the Hyper-V guest interface: TLFS CPUID leaves, synthetic
//! MSRs, hypercall codes and statuses, SynIC layouts, VMBus channel messages, ring packets and
//! device protocol structures. Definitions only; no logic.
#![forbid(unsafe_code)]
#![no_std]

pub mod hv;
pub mod ic;
pub mod netvsp;
pub mod rndis;
pub mod storvsp;
pub mod vmbus;
