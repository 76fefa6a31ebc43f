//! The channel API devices use: a pair of rings over the channel's ring GPADL, packet
//! send/receive, and signalling.

use crate::packet::{self, Packet, PacketError};
use crate::ring::{RingConsumer, RingError, RingMemory, RingProducer};
use guestmem::GuestMemory;
use hvdef::vmbus::{packet_type, PACKET_FLAG_COMPLETION_REQUESTED};
use std::sync::Arc;
use zerocopy::IntoBytes;

/// Which end of the channel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The host device: reads the guest-to-host ring (pages before the downstream offset),
    /// writes the host-to-guest ring.
    Host,
    /// The guest driver (the test client): the other way round.
    Guest,
}

/// Callback that interrupts the other side (host: set the relid bit in the target VP's
/// SIEF and inject SINT2; guest: HvSignalEvent with the offer's connection id).
pub type SignalFn = Arc<dyn Fn() + Send + Sync>;

/// Channel errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    /// The ring is full: retry after the other side signals.
    #[error("ring full")]
    Full,
    /// The packet can never fit.
    #[error("packet of {len} bytes exceeds the ring ({ring} bytes)")]
    TooLarge { len: usize, ring: u32 },
    /// The other side corrupted the ring; the channel is now closed for I/O.
    #[error("channel broken: {0}")]
    Broken(String),
    /// The ring layout given at open is unusable.
    #[error("invalid ring: {0}")]
    InvalidRing(String),
}

/// Channel health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelState {
    Open,
    /// Ring corruption was detected; no further I/O is done.
    Broken(String),
}

/// One end of an open channel.
pub struct Channel {
    inbound: RingConsumer,
    outbound: RingProducer,
    signal: Option<SignalFn>,
    signal_pending: bool,
    /// While held ([`Channel::hold_signals`]): whether a send wanted to signal.
    held: Option<bool>,
    signals: u64,
    state: ChannelState,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("state", &self.state)
            .field("inbound_len", &self.inbound.memory().data_len())
            .field("outbound_len", &self.outbound.memory().data_len())
            .finish()
    }
}

/// Splits the ring GPADL's pages at `downstream_offset`: (guest-to-host, host-to-guest).
fn split(pfns: &[u64], downstream_offset: u32) -> Result<(&[u64], &[u64]), ChannelError> {
    let off = downstream_offset as usize;
    if off < 2 || off > pfns.len().saturating_sub(2) {
        return Err(ChannelError::InvalidRing(
            "downstream offset leaves a ring without a data page".into(),
        ));
    }
    let mut sorted = pfns.to_vec();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(ChannelError::InvalidRing("ring pages overlap".into()));
    }
    Ok(pfns.split_at(off))
}

impl Channel {
    /// Opens one end over the ring GPADL's pages. Validates the layout (each ring has a
    /// control page and at least one data page, no page used twice, all pages guest RAM)
    /// and the current indices.
    pub fn new(
        mem: &GuestMemory,
        ring_pfns: &[u64],
        downstream_offset: u32,
        side: Side,
        signal: Option<SignalFn>,
    ) -> Result<Self, ChannelError> {
        let (up, down) = split(ring_pfns, downstream_offset)?;
        let (inb, outb) = match side {
            Side::Host => (up, down),
            Side::Guest => (down, up),
        };
        let bad = |e: RingError| ChannelError::InvalidRing(e.to_string());
        let inbound = RingMemory::new(mem, inb).map_err(bad)?;
        let outbound = RingMemory::new(mem, outb).map_err(bad)?;
        Ok(Self {
            inbound: RingConsumer::new(inbound).map_err(bad)?,
            outbound: RingProducer::new(outbound).map_err(bad)?,
            signal,
            signal_pending: false,
            held: None,
            signals: 0,
            state: ChannelState::Open,
            scratch: Vec::new(),
        })
    }

    /// Guest side: zeroes both control pages and sets the feature bits, as Linux does
    /// before it opens a channel.
    pub fn initialize_rings(
        mem: &GuestMemory,
        ring_pfns: &[u64],
        downstream_offset: u32,
    ) -> Result<(), ChannelError> {
        let (up, down) = split(ring_pfns, downstream_offset)?;
        for pages in [up, down] {
            RingMemory::new(mem, pages)
                .and_then(|r| r.initialize())
                .map_err(|e| ChannelError::InvalidRing(e.to_string()))?;
        }
        Ok(())
    }

    /// Current state.
    pub fn state(&self) -> &ChannelState {
        &self.state
    }

    /// Whether ring corruption closed the channel.
    pub fn is_broken(&self) -> bool {
        matches!(self.state, ChannelState::Broken(_))
    }

    /// Returns and clears "the other side must be interrupted", for users without a signal
    /// callback.
    pub fn take_signal(&mut self) -> bool {
        std::mem::take(&mut self.signal_pending)
    }

    /// Interrupts this end has raised on the other side so far.
    pub fn signals_sent(&self) -> u64 {
        self.signals
    }

    /// Holds back the interrupts that sending packets raises until
    /// [`Self::release_signals`], which raises at most one: a burst of packets interrupts the
    /// other side once, after its last packet. Reads still signal at once (the other side
    /// may be waiting for room).
    pub fn hold_signals(&mut self) {
        self.held.get_or_insert(false);
    }

    /// Ends [`Self::hold_signals`]: signals once if any send in between wanted to and the
    /// other side has not read everything since (a reader that polled the ring needs no
    /// interrupt for what it already took).
    pub fn release_signals(&mut self) {
        if self.held.take() == Some(true) {
            self.notify_if_unread();
        }
    }

    fn notify_if_unread(&mut self) {
        // A read index that makes no sense is the ring check's to report; signal anyway.
        if self.outbound.has_unread().unwrap_or(true) {
            self.notify();
        }
    }

    /// Raises the signal held so far, if any send wanted it, and goes on holding: a long
    /// burst can interrupt the other side part way through, so that it need not wait for the
    /// burst's end to see the packets already sent.
    pub fn flush_signals(&mut self) {
        if let Some(wanted) = self.held.as_mut() {
            if std::mem::take(wanted) {
                self.notify_if_unread();
            }
        }
    }

    /// Whether a send since [`Self::hold_signals`] wanted to signal (the signal is owed).
    pub fn signal_held(&self) -> bool {
        self.held == Some(true)
    }

    /// Whether the other side has not read everything this end wrote.
    pub fn peer_has_unread(&mut self) -> Result<bool, ChannelError> {
        self.check_open()?;
        self.outbound.has_unread().map_err(|e| self.fail(e))
    }

    /// Signals the other side if it has packets in its ring it has not read: a channel
    /// taken over (after a restore) may owe it the interrupt for them.
    pub fn signal_if_unread(&mut self) -> Result<(), ChannelError> {
        self.check_open()?;
        match self.outbound.has_unread() {
            Ok(true) => {
                self.notify();
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn notify(&mut self) {
        self.signals += 1;
        match &self.signal {
            Some(f) => f(),
            None => self.signal_pending = true,
        }
    }

    fn fail(&mut self, e: RingError) -> ChannelError {
        match e {
            RingError::Full => ChannelError::Full,
            RingError::TooLarge { len, ring } => ChannelError::TooLarge { len, ring },
            e => {
                let reason = e.to_string();
                static LOG: support::RateLimit = support::RateLimit::guest();
                support::limited!(LOG, warn, %reason, "vmbus channel broken");
                self.state = ChannelState::Broken(reason.clone());
                ChannelError::Broken(reason)
            }
        }
    }

    fn check_open(&self) -> Result<(), ChannelError> {
        match &self.state {
            ChannelState::Open => Ok(()),
            ChannelState::Broken(r) => Err(ChannelError::Broken(r.clone())),
        }
    }

    /// Receives the next packet into `buf`. `Ok(None)` means the ring is empty. A packet
    /// whose descriptor or length is impossible breaks the channel.
    pub fn try_recv<'a>(
        &mut self,
        buf: &'a mut Vec<u8>,
    ) -> Result<Option<Packet<'a>>, ChannelError> {
        self.check_open()?;
        match self.inbound.read(buf) {
            Ok(None) => Ok(None),
            Ok(Some(o)) => {
                if o.signal {
                    self.notify();
                }
                // The ring reader checked the descriptor; this cannot fail, but a failure
                // would still only break the channel.
                match Packet::parse(buf) {
                    Ok(p) => Ok(Some(p)),
                    Err(e) => Err(self.fail(RingError::Corrupt(match e {
                        PacketError::Truncated => "truncated packet",
                        _ => "bad packet",
                    }))),
                }
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Whether a packet is waiting.
    pub fn has_packet(&mut self) -> Result<bool, ChannelError> {
        self.check_open()?;
        match self.inbound.is_empty() {
            Ok(e) => Ok(!e),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Sets the inbound ring's interrupt_mask (1 = do not signal me). After unmasking, check
    /// [`Self::has_packet`] again before waiting.
    pub fn set_interrupt_mask(&mut self, masked: bool) -> Result<(), ChannelError> {
        self.check_open()?;
        self.inbound
            .set_interrupt_mask(masked)
            .map_err(|e| self.fail(e))
    }

    /// Sends one packet: descriptor, `type_header` (multiple of 8 bytes), `payload` (padded
    /// to 8). Signals the other side when the protocol requires it.
    pub fn try_send(
        &mut self,
        packet_type: u16,
        flags: u16,
        transaction_id: u64,
        type_header: &[u8],
        payload: &[u8],
    ) -> Result<(), ChannelError> {
        self.check_open()?;
        let too_large = ChannelError::TooLarge {
            len: 16 + type_header.len() + payload.len(),
            ring: self.outbound.memory().data_len(),
        };
        let Some((desc, pad)) = packet::descriptor(
            packet_type,
            flags,
            transaction_id,
            type_header.len(),
            payload.len(),
        ) else {
            return Err(too_large);
        };
        const ZEROS: [u8; 8] = [0; 8];
        let r = self
            .outbound
            .write(&[desc.as_bytes(), type_header, payload, &ZEROS[..pad]]);
        match r {
            Ok(o) => {
                match &mut self.held {
                    Some(wanted) => *wanted |= o.signal,
                    None if o.signal => self.notify(),
                    None => {}
                }
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Sends an in-band data packet.
    pub fn send_inband(
        &mut self,
        transaction_id: u64,
        payload: &[u8],
        completion_requested: bool,
    ) -> Result<(), ChannelError> {
        let flags = if completion_requested {
            PACKET_FLAG_COMPLETION_REQUESTED
        } else {
            0
        };
        self.try_send(
            packet_type::DATA_INBAND,
            flags,
            transaction_id,
            &[],
            payload,
        )
    }

    /// Sends a completion echoing `transaction_id`.
    pub fn send_completion(
        &mut self,
        transaction_id: u64,
        payload: &[u8],
    ) -> Result<(), ChannelError> {
        self.try_send(packet_type::COMPLETION, 0, transaction_id, &[], payload)
    }

    /// Sends a GPA_DIRECT packet describing `ranges`.
    pub fn send_gpa_direct(
        &mut self,
        transaction_id: u64,
        ranges: &[packet::PagedRange],
        payload: &[u8],
    ) -> Result<(), ChannelError> {
        let h = packet::gpa_direct_header(ranges);
        self.try_send(
            packet_type::DATA_USING_GPA_DIRECT,
            PACKET_FLAG_COMPLETION_REQUESTED,
            transaction_id,
            &h,
            payload,
        )
    }

    /// Receives into an internal buffer and returns an owned copy (convenience for
    /// low-rate devices such as the ICs).
    pub fn recv_owned(&mut self) -> Result<Option<OwnedPacket>, ChannelError> {
        let mut buf = std::mem::take(&mut self.scratch);
        let r = self.try_recv(&mut buf).map(|p| {
            p.map(|p| OwnedPacket {
                packet_type: p.packet_type(),
                flags: p.descriptor.flags,
                transaction_id: p.transaction_id(),
                payload: p.payload().to_vec(),
            })
        });
        self.scratch = buf;
        r
    }
}

/// An owned received packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedPacket {
    pub packet_type: u16,
    pub flags: u16,
    pub transaction_id: u64,
    /// Payload after the header, including padding to 8 bytes.
    pub payload: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvdef::vmbus::ring as ctl;
    use std::sync::atomic::Ordering;

    use crate::testing::Rng;

    /// Rings over scattered, non-contiguous pages in a shuffled order.
    fn pair(pages_each: usize) -> (GuestMemory, Vec<u64>, Channel, Channel) {
        let mem = GuestMemory::new(&[(0, 1 << 20)]).unwrap();
        let mut pfns: Vec<u64> = (0..2 * pages_each as u64).map(|i| 200 - 3 * i).collect();
        pfns.swap(1, 2);
        Channel::initialize_rings(&mem, &pfns, pages_each as u32).unwrap();
        let host = Channel::new(&mem, &pfns, pages_each as u32, Side::Host, None).unwrap();
        let guest = Channel::new(&mem, &pfns, pages_each as u32, Side::Guest, None).unwrap();
        (mem, pfns, host, guest)
    }

    #[test]
    fn packets_survive_wraparound_over_scattered_pages() {
        let (_mem, _pfns, mut host, mut guest) = pair(3);
        let mut rng = Rng(99);
        let mut buf = Vec::new();
        let mut queue = std::collections::VecDeque::new();
        let mut next_id = 0u64;
        for _ in 0..20_000 {
            if rng.next().is_multiple_of(2) {
                let len = (rng.next() % 3000) as usize;
                let byte = rng.next() as u8;
                match guest.send_inband(next_id, &vec![byte; len], false) {
                    Ok(()) => {
                        queue.push_back((next_id, len, byte));
                        next_id += 1;
                    }
                    Err(ChannelError::Full) => {}
                    Err(e) => panic!("{e}"),
                }
            } else {
                match host.try_recv(&mut buf).unwrap() {
                    Some(p) => {
                        let (id, len, byte) = queue.pop_front().expect("sent");
                        assert_eq!(p.transaction_id(), id);
                        assert_eq!(p.payload().len(), len.next_multiple_of(8));
                        assert!(p.payload()[..len].iter().all(|&b| b == byte));
                        assert!(p.payload()[len..].iter().all(|&b| b == 0));
                    }
                    None => assert!(queue.is_empty()),
                }
            }
        }
        assert!(next_id > 5000);
    }

    #[test]
    fn trailer_and_indices_follow_the_wire_format() {
        let (mem, pfns, mut host, _guest) = pair(2);
        // Host writes into the host-to-guest ring: pages[2] control, pages[3] data.
        host.send_inband(0x1122, b"abc", true).unwrap();
        let ctl_gpa = pfns[2] * 4096;
        let data_gpa = pfns[3] * 4096;
        assert_eq!(mem.load_u32(ctl_gpa, Ordering::SeqCst).unwrap(), 16 + 8 + 8);
        let d: hvdef::vmbus::PacketDescriptor = mem.read_obj(data_gpa).unwrap();
        assert_eq!({ d.packet_type }, 6);
        assert_eq!(({ d.offset8 }, { d.len8 }, { d.flags }), (2, 3, 1));
        assert_eq!({ d.transaction_id }, 0x1122);
        // Trailer: the packet's starting index in the upper half.
        assert_eq!(mem.read_obj::<u64>(data_gpa + 24).unwrap(), 0);
        host.send_inband(1, b"", false).unwrap();
        assert_eq!(
            mem.read_obj::<u64>(data_gpa + 32 + 16).unwrap(),
            32u64 << 32
        );
        assert_eq!(
            mem.load_u32(ctl_gpa + ctl::FEATURE_BITS, Ordering::SeqCst)
                .unwrap(),
            1
        );
    }

    #[test]
    fn signalling_rules() {
        let (mem, pfns, mut host, mut guest) = pair(2);
        let mut buf = Vec::new();
        // Empty ring, unmasked: signal. Non-empty: none.
        guest.send_inband(1, b"a", false).unwrap();
        assert!(guest.take_signal());
        guest.send_inband(2, b"b", false).unwrap();
        assert!(!guest.take_signal());
        // Host drains, then the guest's next write signals again.
        while host.try_recv(&mut buf).unwrap().is_some() {}
        assert!(!host.take_signal());
        // Host masks: no signal even into an empty ring.
        host.set_interrupt_mask(true).unwrap();
        guest.send_inband(3, b"c", false).unwrap();
        assert!(!guest.take_signal());
        host.set_interrupt_mask(false).unwrap();
        assert!(host.has_packet().unwrap());
        host.try_recv(&mut buf).unwrap().unwrap();
        // pending_send_sz: the reader signals when free space crosses it.
        for i in 0..3 {
            guest.send_inband(i, &[0; 1000], false).unwrap();
        }
        mem.store_u32(
            pfns[0] * 4096 + ctl::PENDING_SEND_SIZE,
            4000,
            Ordering::SeqCst,
        )
        .unwrap();
        guest.take_signal();
        host.try_recv(&mut buf).unwrap().unwrap();
        assert!(
            !host.take_signal(),
            "free space still below pending_send_sz"
        );
        host.try_recv(&mut buf).unwrap().unwrap();
        assert!(!host.take_signal());
        host.try_recv(&mut buf).unwrap().unwrap();
        assert!(host.take_signal(), "free space rose above pending_send_sz");
    }

    #[test]
    fn held_signals_are_raised_once_after_the_burst() {
        let (_mem, _pfns, mut host, mut guest) = pair(2);
        let mut buf = Vec::new();
        host.hold_signals();
        for i in 0..3 {
            host.send_inband(i, b"x", false).unwrap();
            assert!(!host.take_signal(), "signalled inside the burst");
        }
        host.release_signals();
        assert!(host.take_signal());
        assert_eq!(host.signals_sent(), 1);
        // A burst into a ring the guest has not read: the rule asks for no signal at all.
        host.hold_signals();
        host.send_inband(4, b"y", false).unwrap();
        host.release_signals();
        assert!(!host.take_signal());
        // Once read empty, an unheld send signals at once again.
        while guest.try_recv(&mut buf).unwrap().is_some() {}
        host.send_inband(5, b"z", false).unwrap();
        assert!(host.take_signal());
        assert_eq!(host.signals_sent(), 2);
    }

    #[test]
    fn held_signals_can_be_raised_part_way_through_a_burst() {
        let (_mem, _pfns, mut host, mut guest) = pair(2);
        let mut buf = Vec::new();
        host.hold_signals();
        host.send_inband(1, b"x", false).unwrap();
        host.flush_signals();
        assert!(
            host.take_signal(),
            "the first packet into an empty ring signals"
        );
        // Still held: the ring is not empty, so nothing more is wanted, now or at the end.
        host.send_inband(2, b"y", false).unwrap();
        host.flush_signals();
        assert!(!host.take_signal());
        // The guest reads the ring empty: the next packet wants a signal, and it waits for
        // the next flush or the release.
        while guest.try_recv(&mut buf).unwrap().is_some() {}
        host.send_inband(3, b"z", false).unwrap();
        assert!(!host.take_signal(), "signalled while held");
        host.release_signals();
        assert!(host.take_signal());
        assert_eq!(host.signals_sent(), 2);
        // Not held: flushing does nothing.
        host.flush_signals();
        assert!(!host.take_signal());
        assert!(!host.signal_held());
        host.hold_signals();
        assert!(!host.signal_held());
        // Unread packets: owed; read: not.
        host.send_inband(6, b"w", false).unwrap();
        assert!(!host.signal_held(), "the ring was not empty");
        host.signal_if_unread().unwrap();
        assert!(host.take_signal());
        while guest.try_recv(&mut buf).unwrap().is_some() {}
        host.signal_if_unread().unwrap();
        assert!(!host.take_signal());
        host.send_inband(7, b"v", false).unwrap();
        assert!(host.signal_held());
        assert!(host.peer_has_unread().unwrap());
        host.release_signals();
        assert!(host.take_signal());
        // Owed, but the guest polled the ring empty before the release: no interrupt.
        while guest.try_recv(&mut buf).unwrap().is_some() {}
        assert!(!host.peer_has_unread().unwrap());
        host.hold_signals();
        host.send_inband(8, b"u", false).unwrap();
        assert!(host.signal_held());
        while guest.try_recv(&mut buf).unwrap().is_some() {}
        host.release_signals();
        assert!(!host.take_signal());
    }

    #[test]
    fn layout_validation() {
        let mem = GuestMemory::new(&[(0, 1 << 20)]).unwrap();
        let pfns = [10, 11, 12, 13];
        for off in [0, 1, 3, 4, 100] {
            assert!(Channel::new(&mem, &pfns, off, Side::Host, None).is_err());
        }
        assert!(Channel::new(&mem, &[10, 11, 10, 12], 2, Side::Host, None).is_err());
        assert!(Channel::new(&mem, &[10, 11, 12, u64::MAX], 2, Side::Host, None).is_err());
        assert!(Channel::new(&mem, &[10, 11, 12, 256], 2, Side::Host, None).is_err());
        assert!(Channel::new(&mem, &pfns, 2, Side::Host, None).is_ok());
    }
}
