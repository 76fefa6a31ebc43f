//! Per-VP SynIC state and message/event delivery.
//!
//! Message slot protocol (shared with the guest, which frees a slot by compare-exchanging its
//! message_type back to 0 and writes EOM only if it saw msg_pending):
//!
//! 1. If the slot's type is non-zero, atomically OR msg_pending into the header and look at
//!    the type returned by that same atomic operation. If it was non-zero the slot is still
//!    taken: the message waits in the host queue and the guest will write EOM. If it was 0 the
//!    guest freed the slot in the meantime, and we go on.
//! 2. Write bytes 4..256 (size, flags, sender, payload), then store message_type last with
//!    release ordering. The flags carry msg_pending when more messages wait behind this one.
//! 3. Inject the SINT's vector unless the SINT polls.
//!
//! The type field of an occupied slot is never written by the host.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use guestmem::GuestMemory;
use hvdef::hv::{self, HvMessage, HvMessageHeader, HV_MESSAGE_PAYLOAD_SIZE, SINT_COUNT};
use zerocopy::IntoBytes;

use crate::{Interrupt, Partition};

/// Messages that may wait per (VP, SINT) while the slot is busy or the SINT cannot deliver.
pub const MESSAGE_QUEUE_DEPTH: usize = 64;

/// msg_pending as a bit of the first little-endian u64 of a slot (flags is byte 5).
const PENDING_BIT_IN_U64: u64 = (hv::HV_MESSAGE_FLAG_PENDING as u64) << (8 * 5);

/// Errors from posting messages and signalling events. They are host-side usage errors or
/// back-pressure, never guest-visible.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SynicError {
    #[error("no VP with index {0}")]
    InvalidVp(u32),
    #[error("SINT {0} is not in 0..16")]
    InvalidSint(u8),
    #[error("message payload of {0} bytes is larger than 240")]
    PayloadTooLarge(usize),
    #[error("message type 0 marks an empty slot and cannot be posted")]
    InvalidMessageType,
    #[error("event flag {0} is not in 0..2048")]
    InvalidFlag(u32),
    #[error("message queue of VP {vp} SINT {sint} is full")]
    QueueFull { vp: u32, sint: u8 },
}

/// Result of [`Partition::post_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Inject this interrupt: a message was written into the slot and the SINT does not poll.
    pub interrupt: Option<Interrupt>,
    /// The message waits in the host queue (slot busy, SINT masked, SIMP or SynIC disabled). It
    /// is delivered on EOM, or when the SINT becomes able to deliver; the interrupt for it is
    /// then returned by the MSR write that caused it.
    pub queued: bool,
}

/// Result of [`Partition::signal_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventDelivery {
    /// The flag was newly set. Inject the interrupt if there is one (none when the SINT is
    /// masked or polls; unmasking it later raises the interrupt if any flag is set).
    Signalled(Option<Interrupt>),
    /// The flag was already set; the guest has not scanned it yet, so no new interrupt.
    AlreadySet,
    /// SCONTROL or SIEFP is disabled: there is no event page, and the event is lost, as on
    /// Hyper-V.
    Dropped,
}

/// SynIC state of one VP.
#[derive(Debug)]
pub(crate) struct VpState {
    pub vp_assist_page: u64,
    pub scontrol: u64,
    pub simp: u64,
    pub siefp: u64,
    pub sints: [u64; SINT_COUNT],
    queues: [VecDeque<HvMessage>; SINT_COUNT],
}

impl VpState {
    pub fn new() -> Self {
        Self {
            vp_assist_page: 0,
            scontrol: 0,
            simp: 0,
            siefp: 0,
            sints: [hv::SINT_RESET; SINT_COUNT],
            queues: Default::default(),
        }
    }

    fn enabled(&self) -> bool {
        self.scontrol & hv::SCONTROL_ENABLE != 0
    }

    fn simp_gpa(&self) -> Option<u64> {
        (self.enabled() && self.simp & hv::OVERLAY_ENABLE != 0)
            .then_some(self.simp & hv::OVERLAY_GPA_MASK)
    }

    fn siefp_gpa(&self) -> Option<u64> {
        (self.enabled() && self.siefp & hv::OVERLAY_ENABLE != 0)
            .then_some(self.siefp & hv::OVERLAY_GPA_MASK)
    }

    fn masked(&self, sint: usize) -> bool {
        self.sints[sint] & hv::SINT_MASKED != 0
    }

    /// The interrupt for `sint`, or `None` if it is masked or polls.
    fn interrupt(&self, vp: u32, sint: usize) -> Option<Interrupt> {
        let v = self.sints[sint];
        (v & (hv::SINT_MASKED | hv::SINT_POLLING) == 0).then_some(Interrupt {
            vp,
            vector: (v & hv::SINT_VECTOR_MASK) as u8,
        })
    }

    /// Number of queued messages for `sint`.
    pub fn queued(&self, sint: usize) -> usize {
        self.queues[sint].len()
    }

    /// The queued messages of `sint`, oldest first.
    pub fn queue(&self, sint: usize) -> impl Iterator<Item = &HvMessage> {
        self.queues[sint].iter()
    }

    /// Appends to `sint`'s queue (restore; the caller checks the depth).
    pub fn push(&mut self, sint: usize, msg: HvMessage) {
        self.queues[sint].push_back(msg);
    }

    /// Drops every queued message; returns how many there were.
    pub fn drop_queues(&mut self) -> usize {
        self.queues
            .iter_mut()
            .map(|q| {
                let n = q.len();
                q.clear();
                n
            })
            .sum()
    }

    /// Tries to move the head of `sint`'s queue into its slot. Returns the interrupt to inject
    /// when a message was delivered to a non-polling SINT. Delivers at most one message: the
    /// slot is busy afterwards, and that message carries msg_pending if more wait.
    pub fn flush(&mut self, mem: &GuestMemory, vp: u32, sint: usize) -> Option<Interrupt> {
        if self.queues[sint].is_empty() || self.masked(sint) {
            return None;
        }
        let base = self.simp_gpa()?;
        let more = self.queues[sint].len() > 1;
        let msg = self.queues[sint].front()?;
        match write_slot(mem, base, sint, msg, more) {
            Ok(true) => {
                self.queues[sint].pop_front();
                self.interrupt(vp, sint)
            }
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(vp, sint, error = %e, "SynIC message page is not guest RAM");
                None
            }
        }
    }

    /// Flushes every SINT; returns the interrupts to inject.
    pub fn flush_all(&mut self, mem: &GuestMemory, vp: u32, out: &mut Vec<Interrupt>) {
        for sint in 0..SINT_COUNT {
            out.extend(self.flush(mem, vp, sint));
        }
    }

    /// If any event flag of `sint` is set and the SINT can interrupt, returns the interrupt
    /// (used when a SINT is unmasked or the SynIC enabled, so that events signalled while
    /// masked are not lost).
    pub fn pending_events(&self, mem: &GuestMemory, vp: u32, sint: usize) -> Option<Interrupt> {
        let base = self.siefp_gpa()?;
        let interrupt = self.interrupt(vp, sint)?;
        let mut flags = [0u8; hv::HV_EVENT_FLAGS_BYTES];
        let gpa = base + (sint * hv::HV_EVENT_FLAGS_BYTES) as u64;
        match mem.read(gpa, &mut flags) {
            Ok(()) => flags.iter().any(|&b| b != 0).then_some(interrupt),
            Err(e) => {
                tracing::warn!(vp, sint, error = %e, "SynIC event page is not guest RAM");
                None
            }
        }
    }

    /// Everything that became deliverable: queued messages and pending event flags.
    pub fn kick_all(&mut self, mem: &GuestMemory, vp: u32) -> Vec<Interrupt> {
        let mut out = Vec::new();
        self.flush_all(mem, vp, &mut out);
        for sint in 0..SINT_COUNT {
            out.extend(self.pending_events(mem, vp, sint));
        }
        out.sort_by_key(|i| i.vector);
        out.dedup();
        out
    }
}

/// Writes `msg` into slot `sint` of the message page at `base` if the slot is free (see the
/// module docs). Returns `Ok(false)` if the slot is busy; msg_pending is then set in it.
fn write_slot(
    mem: &GuestMemory,
    base: u64,
    sint: usize,
    msg: &HvMessage,
    more_pending: bool,
) -> Result<bool, guestmem::Error> {
    let slot = base + (sint * hv::HV_MESSAGE_SIZE) as u64;
    if mem.load_u32(slot, Ordering::Acquire)? != hv::HVMSG_NONE {
        let old = mem.fetch_or_u64(slot, PENDING_BIT_IN_U64)?;
        if old as u32 != hv::HVMSG_NONE {
            return Ok(false);
        }
    }
    let mut m = *msg;
    m.header.flags = if more_pending {
        hv::HV_MESSAGE_FLAG_PENDING
    } else {
        0
    };
    mem.write(slot + 4, &m.as_bytes()[4..])?;
    mem.store_u32(slot, m.header.message_type, Ordering::Release)?;
    Ok(true)
}

impl Partition {
    /// Posts a SynIC message to `sint` of VP `vp` (for example a VMBus message to SINT 2 with
    /// type 1).
    ///
    /// The message goes into the slot if the slot is free, the SynIC and SIMP are enabled, the
    /// SINT is unmasked and no older message waits; otherwise it is queued (at most
    /// [`MESSAGE_QUEUE_DEPTH`] per SINT, then [`SynicError::QueueFull`]). When a message
    /// waits behind a busy slot, msg_pending is set in that slot so the guest writes EOM.
    pub fn post_message(
        &self,
        vp: u32,
        sint: u8,
        message_type: u32,
        payload: &[u8],
    ) -> Result<Delivery, SynicError> {
        let s = sint as usize;
        if s >= SINT_COUNT {
            return Err(SynicError::InvalidSint(sint));
        }
        if payload.len() > HV_MESSAGE_PAYLOAD_SIZE {
            return Err(SynicError::PayloadTooLarge(payload.len()));
        }
        if message_type == hv::HVMSG_NONE {
            return Err(SynicError::InvalidMessageType);
        }
        let mut state = self.vp(vp).ok_or(SynicError::InvalidVp(vp))?;
        if state.queues[s].len() >= MESSAGE_QUEUE_DEPTH {
            return Err(SynicError::QueueFull { vp, sint });
        }
        let mut msg = HvMessage {
            header: HvMessageHeader {
                message_type,
                payload_size: payload.len() as u8,
                ..Default::default()
            },
            payload: [0; HV_MESSAGE_PAYLOAD_SIZE],
        };
        msg.payload[..payload.len()].copy_from_slice(payload);

        state.queues[s].push_back(msg);
        let was_alone = state.queues[s].len() == 1;
        let interrupt = state.flush(&self.mem, vp, s);
        // Delivered iff our message was the only one and it left the queue.
        let queued = !(was_alone && state.queues[s].is_empty());
        Ok(Delivery { interrupt, queued })
    }

    /// Sets event flag `flag` of `sint` in VP `vp`'s event page (atomically) and tells whether
    /// to inject the SINT's vector. VMBus uses SINT 2 and the channel's relid as the flag.
    pub fn signal_event(&self, vp: u32, sint: u8, flag: u32) -> Result<EventDelivery, SynicError> {
        let s = sint as usize;
        if s >= SINT_COUNT {
            return Err(SynicError::InvalidSint(sint));
        }
        if flag >= hv::HV_EVENT_FLAGS_COUNT {
            return Err(SynicError::InvalidFlag(flag));
        }
        let state = self.vp(vp).ok_or(SynicError::InvalidVp(vp))?;
        let Some(base) = state.siefp_gpa() else {
            return Ok(EventDelivery::Dropped);
        };
        let gpa = base + (s * hv::HV_EVENT_FLAGS_BYTES) as u64 + (flag / 64) as u64 * 8;
        let bit = 1u64 << (flag % 64);
        match self.mem.fetch_or_u64(gpa, bit) {
            Ok(old) if old & bit != 0 => Ok(EventDelivery::AlreadySet),
            Ok(_) => Ok(EventDelivery::Signalled(state.interrupt(vp, s))),
            Err(e) => {
                // Cannot happen: SIEFP writes outside RAM are refused with #GP.
                tracing::warn!(vp, sint, error = %e, "SynIC event page is not guest RAM");
                Ok(EventDelivery::Dropped)
            }
        }
    }

    /// Number of messages waiting for `sint` of VP `vp` (inspection).
    pub fn queued_messages(&self, vp: u32, sint: u8) -> usize {
        match self.vp(vp) {
            Some(s) if (sint as usize) < SINT_COUNT => s.queued(sint as usize),
            _ => 0,
        }
    }

    /// Whether VP `vp` has its SynIC enabled (SCONTROL bit 0).
    pub fn synic_enabled(&self, vp: u32) -> bool {
        self.vp(vp).is_some_and(|s| s.enabled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::partition;
    use crate::{MsrAction, Partition};
    use hvdef::hv::*;
    use zerocopy::FromBytes;

    const SIMP: u64 = 0x5000;
    const SIEFP: u64 = 0x6000;
    const VECTOR: u64 = 0xF3;

    fn enable_synic(p: &Partition, vp: u32) {
        p.msr_write(vp, MSR_SIMP, (SIMP + (vp as u64) * 0x10000) | 1)
            .unwrap();
        p.msr_write(vp, MSR_SIEFP, (SIEFP + (vp as u64) * 0x10000) | 1)
            .unwrap();
        p.msr_write(vp, MSR_SINT0 + 2, VECTOR).unwrap();
        p.msr_write(vp, MSR_SCONTROL, 1).unwrap();
    }

    fn slot(mem: &GuestMemory, vp: u32, sint: usize) -> HvMessage {
        let mut buf = [0u8; 256];
        mem.read(SIMP + vp as u64 * 0x10000 + sint as u64 * 256, &mut buf)
            .unwrap();
        HvMessage::read_from_bytes(&buf).unwrap()
    }

    /// What the guest does after handling a message: clear the type, then EOM if pending.
    fn guest_consume(p: &Partition, mem: &GuestMemory, vp: u32, sint: usize) -> Vec<Interrupt> {
        let gpa = SIMP + vp as u64 * 0x10000 + sint as u64 * 256;
        mem.store_u32(gpa, 0, Ordering::SeqCst).unwrap();
        let pending = slot(mem, vp, sint).header.flags & HV_MESSAGE_FLAG_PENDING != 0;
        if pending {
            match p.msr_write(vp, MSR_EOM, 0).unwrap() {
                Some(MsrAction::Interrupts(v)) => v,
                None => vec![],
                Some(other) => panic!("{other:?}"),
            }
        } else {
            vec![]
        }
    }

    #[test]
    fn message_delivery_busy_pending_and_eom() {
        let (p, mem, _) = partition(2);
        enable_synic(&p, 1);
        let irq = Interrupt {
            vp: 1,
            vector: 0xF3,
        };

        let d = p.post_message(1, 2, 1, b"first").unwrap();
        assert_eq!(
            d,
            Delivery {
                interrupt: Some(irq),
                queued: false
            }
        );
        let m = slot(&mem, 1, 2);
        assert_eq!(m.header.message_type, 1);
        assert_eq!(m.header.payload_size, 5);
        assert_eq!(m.header.flags, 0);
        assert_eq!(&m.payload[..5], b"first");

        // Slot busy: queued, and msg_pending set on the occupant without touching its type.
        let d = p.post_message(1, 2, 1, b"second").unwrap();
        assert_eq!(
            d,
            Delivery {
                interrupt: None,
                queued: true
            }
        );
        let m = slot(&mem, 1, 2);
        assert_eq!(m.header.message_type, 1);
        assert_eq!(m.header.flags, HV_MESSAGE_FLAG_PENDING);
        assert_eq!(&m.payload[..5], b"first");
        let d = p.post_message(1, 2, 7, b"third").unwrap();
        assert!(d.queued && d.interrupt.is_none());
        assert_eq!(p.queued_messages(1, 2), 2);

        // Guest consumes "first", sees pending, EOMs: "second" arrives with pending set
        // because "third" still waits.
        assert_eq!(guest_consume(&p, &mem, 1, 2), vec![irq]);
        let m = slot(&mem, 1, 2);
        assert_eq!(&m.payload[..6], b"second");
        assert_eq!(m.header.flags, HV_MESSAGE_FLAG_PENDING);
        assert_eq!(guest_consume(&p, &mem, 1, 2), vec![irq]);
        let m = slot(&mem, 1, 2);
        assert_eq!(m.header.message_type, 7);
        assert_eq!(&m.payload[..5], b"third");
        assert_eq!(m.header.flags, 0);
        assert_eq!(p.queued_messages(1, 2), 0);
        // Last one: no pending, so no EOM and nothing more.
        assert_eq!(guest_consume(&p, &mem, 1, 2), vec![]);
        // The other VP's page is untouched.
        assert_eq!(slot(&mem, 0, 2).header.message_type, 0);
    }

    #[test]
    fn eom_without_queue_does_nothing() {
        let (p, _mem, _) = partition(1);
        enable_synic(&p, 0);
        assert_eq!(p.msr_write(0, MSR_EOM, 0).unwrap(), None);
    }

    #[test]
    fn slot_freed_between_check_and_or_is_used() {
        // The guest clears the type after we queued: the next post (or EOM) finds it free.
        let (p, mem, _) = partition(1);
        enable_synic(&p, 0);
        p.post_message(0, 2, 1, b"a").unwrap();
        p.post_message(0, 2, 1, b"b").unwrap();
        // Guest clears without EOM (ignoring pending); a later post retries the queue head.
        mem.store_u32(SIMP + 2 * 256, 0, Ordering::SeqCst).unwrap();
        let d = p.post_message(0, 2, 1, b"c").unwrap();
        assert!(d.queued);
        assert!(d.interrupt.is_some(), "head of queue was delivered");
        assert_eq!(&slot(&mem, 0, 2).payload[..1], b"b");
        assert_eq!(p.queued_messages(0, 2), 1);
    }

    #[test]
    fn masked_disabled_and_polling_sints() {
        let (p, mem, _) = partition(1);
        // SynIC disabled: queued.
        let d = p.post_message(0, 2, 1, b"x").unwrap();
        assert_eq!(
            d,
            Delivery {
                interrupt: None,
                queued: true
            }
        );
        p.msr_write(0, MSR_SIMP, SIMP | 1).unwrap();
        p.msr_write(0, MSR_SCONTROL, 1).unwrap();
        // SINT2 still masked (reset value): nothing delivered.
        assert_eq!(slot(&mem, 0, 2).header.message_type, 0);
        // Unmasking delivers the queued message and returns its interrupt.
        let a = p.msr_write(0, MSR_SINT0 + 2, VECTOR).unwrap();
        assert_eq!(
            a,
            Some(MsrAction::Interrupts(vec![Interrupt {
                vp: 0,
                vector: 0xF3
            }]))
        );
        assert_eq!(&slot(&mem, 0, 2).payload[..1], b"x");

        // Polling SINT 3: delivered into the slot, no interrupt.
        p.msr_write(0, MSR_SINT0 + 3, 0x50 | SINT_POLLING).unwrap();
        let d = p.post_message(0, 3, 5, b"poll").unwrap();
        assert_eq!(
            d,
            Delivery {
                interrupt: None,
                queued: false
            }
        );
        assert_eq!(slot(&mem, 0, 3).header.message_type, 5);
    }

    #[test]
    fn queue_is_bounded() {
        let (p, _mem, _) = partition(1);
        for _ in 0..MESSAGE_QUEUE_DEPTH {
            assert!(p.post_message(0, 2, 1, &[0; 240]).unwrap().queued);
        }
        assert_eq!(
            p.post_message(0, 2, 1, b""),
            Err(SynicError::QueueFull { vp: 0, sint: 2 })
        );
        // Other SINTs have their own queue.
        assert!(p.post_message(0, 3, 1, b"").is_ok());
    }

    #[test]
    fn post_message_argument_errors() {
        let (p, _mem, _) = partition(1);
        assert_eq!(p.post_message(1, 2, 1, b""), Err(SynicError::InvalidVp(1)));
        assert_eq!(
            p.post_message(0, 16, 1, b""),
            Err(SynicError::InvalidSint(16))
        );
        assert_eq!(
            p.post_message(0, 2, 0, b""),
            Err(SynicError::InvalidMessageType)
        );
        assert_eq!(
            p.post_message(0, 2, 1, &[0; 241]),
            Err(SynicError::PayloadTooLarge(241))
        );
    }

    #[test]
    fn simp_disable_drops_queue_and_enable_zeroes_page() {
        let (p, mem, _) = partition(1);
        enable_synic(&p, 0);
        p.post_message(0, 2, 1, b"a").unwrap();
        p.post_message(0, 2, 1, b"b").unwrap();
        assert_eq!(p.queued_messages(0, 2), 1);
        p.msr_write(0, MSR_SIMP, SIMP).unwrap();
        assert_eq!(p.queued_messages(0, 2), 0);
        // Re-enabling zeroes the page (stale "a" disappears).
        p.msr_write(0, MSR_SIMP, SIMP | 1).unwrap();
        assert_eq!(slot(&mem, 0, 2).header.message_type, 0);
        // Rewriting the same enabled value does not wipe a delivered message.
        p.post_message(0, 2, 1, b"c").unwrap();
        p.msr_write(0, MSR_SIMP, SIMP | 1).unwrap();
        assert_eq!(&slot(&mem, 0, 2).payload[..1], b"c");
    }

    #[test]
    fn event_flags() {
        let (p, mem, _) = partition(2);
        enable_synic(&p, 1);
        let irq = Interrupt {
            vp: 1,
            vector: 0xF3,
        };
        let region = SIEFP + 0x10000 + 2 * 256;
        assert_eq!(
            p.signal_event(1, 2, 5),
            Ok(EventDelivery::Signalled(Some(irq)))
        );
        assert_eq!(p.signal_event(1, 2, 5), Ok(EventDelivery::AlreadySet));
        assert_eq!(
            p.signal_event(1, 2, 2047),
            Ok(EventDelivery::Signalled(Some(irq)))
        );
        assert_eq!(mem.load_u64(region, Ordering::SeqCst).unwrap(), 1 << 5);
        assert_eq!(
            mem.load_u64(region + 31 * 8, Ordering::SeqCst).unwrap(),
            1 << 63
        );
        // Guest clears the bit (test-and-clear) and a new signal interrupts again.
        mem.store_u64(region, 0, Ordering::SeqCst).unwrap();
        assert_eq!(
            p.signal_event(1, 2, 5),
            Ok(EventDelivery::Signalled(Some(irq)))
        );
        assert_eq!(
            p.signal_event(1, 2, 2048),
            Err(SynicError::InvalidFlag(2048))
        );
        assert_eq!(p.signal_event(1, 16, 0), Err(SynicError::InvalidSint(16)));
        assert_eq!(p.signal_event(2, 2, 0), Err(SynicError::InvalidVp(2)));
        // VP 0 has no event page.
        assert_eq!(p.signal_event(0, 2, 1), Ok(EventDelivery::Dropped));
        assert_eq!(mem.load_u64(SIEFP + 2 * 256, Ordering::SeqCst).unwrap(), 0);
    }

    #[test]
    fn events_while_masked_interrupt_on_unmask() {
        let (p, _mem, _) = partition(1);
        enable_synic(&p, 0);
        p.msr_write(0, MSR_SINT0 + 2, VECTOR | SINT_MASKED).unwrap();
        assert_eq!(p.signal_event(0, 2, 9), Ok(EventDelivery::Signalled(None)));
        let a = p.msr_write(0, MSR_SINT0 + 2, VECTOR).unwrap();
        assert_eq!(
            a,
            Some(MsrAction::Interrupts(vec![Interrupt {
                vp: 0,
                vector: 0xF3
            }]))
        );
        // Unmasking with no flags set and no queue: nothing.
        p.msr_write(0, MSR_SINT0 + 4, 0x40 | SINT_MASKED).unwrap();
        assert_eq!(p.msr_write(0, MSR_SINT0 + 4, 0x40).unwrap(), None);
    }

    #[test]
    fn concurrent_posts_and_consumer_lose_nothing() {
        // A host thread posts while a "guest" thread consumes with the real protocol; every
        // message arrives exactly once and in order.
        let (p, mem, _) = partition(1);
        enable_synic(&p, 0);
        const N: u32 = 2000;
        let producer = {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut i = 0;
                while i < N {
                    match p.post_message(0, 2, 1, &i.to_le_bytes()) {
                        Ok(_) => i += 1,
                        Err(SynicError::QueueFull { .. }) => std::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        };
        let mut next = 0u32;
        let gpa = SIMP + 2 * 256;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while next < N {
            assert!(std::time::Instant::now() < deadline, "stuck at {next}");
            if mem.load_u32(gpa, Ordering::Acquire).unwrap() == 0 {
                std::thread::yield_now();
                continue;
            }
            let m = slot(&mem, 0, 2);
            assert_eq!(u32::from_le_bytes(m.payload[..4].try_into().unwrap()), next);
            next += 1;
            mem.store_u32(gpa, 0, Ordering::SeqCst).unwrap();
            let flags = slot(&mem, 0, 2).header.flags;
            if flags & HV_MESSAGE_FLAG_PENDING != 0 {
                p.msr_write(0, MSR_EOM, 0).unwrap();
            }
        }
        producer.join().unwrap();
        assert_eq!(p.queued_messages(0, 2), 0);
    }
}
