//! Ring buffers in guest memory, reached through a GPADL's page list.
//!
//! A ring is one 4 KiB control page followed by a data area. Each side keeps its own index
//! (the producer's write index, the consumer's read index) in host memory and only publishes
//! it to the control page; the other side's index is read from guest memory and validated
//! every time, so garbage written by the guest becomes [`RingError::Corrupt`], never an
//! out-of-bounds access. The same code serves both the host and the guest-side client: the
//! signalling rules are symmetric.

use guestmem::GuestMemory;
use hvdef::vmbus::{ring as ctl, PacketDescriptor, PAGE_SIZE};
use std::sync::atomic::{fence, Ordering};
use zerocopy::FromBytes;

const PAGE: u64 = PAGE_SIZE as u64;
/// Largest data area we accept for one ring (256 MiB).
pub const MAX_RING_DATA: u32 = 256 << 20;
const TRAILER: u32 = ctl::TRAILER_SIZE as u32;
const DESC: u32 = size_of::<PacketDescriptor>() as u32;

/// Errors from ring access.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    /// The other side wrote something impossible; the ring is unusable.
    #[error("ring corrupt: {0}")]
    Corrupt(&'static str),
    /// Not enough free space for the packet now; pending_send_sz is set and the consumer
    /// will signal when space frees up.
    #[error("ring full")]
    Full,
    /// The packet can never fit in this ring.
    #[error("packet of {len} bytes does not fit a ring of {ring} bytes")]
    TooLarge { len: usize, ring: u32 },
    /// A ring page is not guest RAM (or vanished).
    #[error("guest memory: {0}")]
    Memory(String),
    /// The ring geometry is invalid.
    #[error("invalid ring layout: {0}")]
    Layout(&'static str),
}

impl From<guestmem::Error> for RingError {
    fn from(e: guestmem::Error) -> Self {
        RingError::Memory(e.to_string())
    }
}

/// A contiguous piece of the data area in guest physical memory.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Offset in the data area.
    offset: u32,
    gpa: u64,
    len: u32,
}

/// The memory of one ring: control page plus data area.
#[derive(Debug, Clone)]
pub struct RingMemory {
    mem: GuestMemory,
    control: u64,
    runs: Vec<Run>,
    data_len: u32,
}

impl RingMemory {
    /// `pfns[0]` is the control page, the rest the data area. Every page must be guest RAM.
    pub fn new(mem: &GuestMemory, pfns: &[u64]) -> Result<Self, RingError> {
        if pfns.len() < 2 {
            return Err(RingError::Layout(
                "a ring needs a control page and a data page",
            ));
        }
        let data_pages = pfns.len() - 1;
        if data_pages as u64 * PAGE > MAX_RING_DATA as u64 {
            return Err(RingError::Layout("ring too large"));
        }
        let mut runs: Vec<Run> = Vec::new();
        for &pfn in pfns {
            if !pfn.checked_mul(PAGE).is_some_and(|g| mem.contains(g, PAGE)) {
                return Err(RingError::Layout("ring page is not guest RAM"));
            }
        }
        for (i, &pfn) in pfns[1..].iter().enumerate() {
            let gpa = pfn * PAGE;
            let offset = (i as u64 * PAGE) as u32;
            match runs.last_mut() {
                Some(r)
                    if r.gpa + r.len as u64 == gpa && mem.contains(r.gpa, r.len as u64 + PAGE) =>
                {
                    r.len += PAGE as u32
                }
                _ => runs.push(Run {
                    offset,
                    gpa,
                    len: PAGE as u32,
                }),
            }
        }
        Ok(Self {
            mem: mem.clone(),
            control: pfns[0] * PAGE,
            runs,
            data_len: (data_pages as u64 * PAGE) as u32,
        })
    }

    /// Size of the data area in bytes.
    pub fn data_len(&self) -> u32 {
        self.data_len
    }

    fn load(&self, field: u64) -> Result<u32, RingError> {
        Ok(self.mem.load_u32(self.control + field, Ordering::Acquire)?)
    }

    fn store(&self, field: u64, v: u32) -> Result<(), RingError> {
        Ok(self
            .mem
            .store_u32(self.control + field, v, Ordering::Release)?)
    }

    fn run_index(&self, offset: u32) -> usize {
        // Runs are sorted by offset; find the last run starting at or before `offset`.
        self.runs.partition_point(|r| r.offset <= offset) - 1
    }

    /// Calls `f(gpa, range_in_buf)` for each physical piece of `len` bytes at data
    /// offset `offset`, wrapping at the end of the data area. `offset < data_len` and
    /// `len <= data_len` must hold.
    fn for_each_piece(
        &self,
        offset: u32,
        len: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), RingError>,
    ) -> Result<(), RingError> {
        debug_assert!(offset < self.data_len && len <= self.data_len as usize);
        let mut at = offset;
        let mut done = 0usize;
        let mut ri = self.run_index(at);
        while done < len {
            let run = self.runs[ri];
            let in_run = at - run.offset;
            let n = ((run.len - in_run) as usize).min(len - done);
            f(run.gpa + in_run as u64, done..done + n)?;
            done += n;
            at += n as u32;
            ri += 1;
            if at == self.data_len {
                at = 0;
                ri = 0;
            }
        }
        Ok(())
    }

    fn read_data(&self, offset: u32, buf: &mut [u8]) -> Result<(), RingError> {
        self.for_each_piece(offset, buf.len(), |gpa, r| {
            Ok(self.mem.read(gpa, &mut buf[r])?)
        })
    }

    fn write_data(&self, offset: u32, buf: &[u8]) -> Result<(), RingError> {
        self.for_each_piece(offset, buf.len(), |gpa, r| {
            Ok(self.mem.write(gpa, &buf[r])?)
        })
    }

    fn checked_index(&self, v: u32, what: &'static str) -> Result<u32, RingError> {
        if v >= self.data_len || !v.is_multiple_of(8) {
            Err(RingError::Corrupt(what))
        } else {
            Ok(v)
        }
    }

    /// Zeroes the control page and sets the feature bits (what the guest does when it
    /// creates a ring).
    pub fn initialize(&self) -> Result<(), RingError> {
        self.mem.zero(self.control, PAGE)?;
        self.store(ctl::FEATURE_BITS, ctl::FEATURE_PENDING_SEND_SIZE)
    }

    fn used(&self, write: u32, read: u32) -> u32 {
        if write >= read {
            write - read
        } else {
            self.data_len - read + write
        }
    }
}

/// Outcome of a successful write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The consumer must be signalled.
    pub signal: bool,
}

/// The producing end of a ring.
#[derive(Debug)]
pub struct RingProducer {
    ring: RingMemory,
    write: u32,
    /// We set pending_send_sz and must clear it once we get space.
    pending_set: bool,
    /// The packet and its trailer, assembled for one copy into the ring.
    scratch: Vec<u8>,
}

impl RingProducer {
    /// Takes over a ring whose control page the guest initialized; validates the current
    /// write index.
    pub fn new(ring: RingMemory) -> Result<Self, RingError> {
        let write = ring.checked_index(ring.load(ctl::WRITE_INDEX)?, "initial write index")?;
        Ok(Self {
            ring,
            write,
            pending_set: false,
            scratch: Vec::new(),
        })
    }

    /// The ring memory.
    pub fn memory(&self) -> &RingMemory {
        &self.ring
    }

    /// Whether the consumer has not read everything written (validates its read index).
    pub fn has_unread(&self) -> Result<bool, RingError> {
        let read = self
            .ring
            .checked_index(self.ring.load(ctl::READ_INDEX)?, "read index")?;
        Ok(read != self.write)
    }

    /// Largest packet (descriptor and payload, trailer excluded) that can ever be written.
    pub fn max_packet_len(&self) -> usize {
        (self.ring.data_len - TRAILER - 8) as usize
    }

    /// Writes one packet given as pieces (descriptor first). The total must be a multiple of
    /// 8. Publishes the write index and applies the signalling rule.
    pub fn write(&mut self, pieces: &[&[u8]]) -> Result<WriteOutcome, RingError> {
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        debug_assert!(len.is_multiple_of(8));
        let data_len = self.ring.data_len;
        if len > self.max_packet_len() {
            return Err(RingError::TooLarge {
                len,
                ring: data_len,
            });
        }
        let total = len as u32 + TRAILER;
        let read = self
            .ring
            .checked_index(self.ring.load(ctl::READ_INDEX)?, "read index")?;
        let free = data_len - self.ring.used(self.write, read);
        if free <= total {
            // Ask the consumer to signal once enough space is free, then look again in
            // case it freed space in the meantime.
            self.ring.store(ctl::PENDING_SEND_SIZE, total)?;
            self.pending_set = true;
            fence(Ordering::SeqCst);
            let read = self
                .ring
                .checked_index(self.ring.load(ctl::READ_INDEX)?, "read index")?;
            if data_len - self.ring.used(self.write, read) <= total {
                return Err(RingError::Full);
            }
        }
        if self.pending_set {
            self.ring.store(ctl::PENDING_SEND_SIZE, 0)?;
            self.pending_set = false;
        }
        let old = self.write;
        // One copy into guest memory: packet pieces and trailer assembled first.
        self.scratch.clear();
        for p in pieces {
            self.scratch.extend_from_slice(p);
        }
        self.scratch
            .extend_from_slice(&((old as u64) << 32).to_le_bytes());
        self.ring.write_data(old, &self.scratch)?;
        let at = (old + total) % data_len;
        self.write = at;
        self.ring.store(ctl::WRITE_INDEX, at)?;
        fence(Ordering::SeqCst);
        let signal =
            self.ring.load(ctl::INTERRUPT_MASK)? == 0 && self.ring.load(ctl::READ_INDEX)? == old;
        Ok(WriteOutcome { signal })
    }
}

/// Where a packet was read from, parsed from its validated descriptor.
#[derive(Debug, Clone, Copy)]
pub struct ReadOutcome {
    /// Packet length (descriptor and payload, trailer excluded).
    pub len: usize,
    /// The producer waits for space that this read freed: signal it.
    pub signal: bool,
}

/// The consuming end of a ring.
#[derive(Debug)]
pub struct RingConsumer {
    ring: RingMemory,
    read: u32,
}

impl RingConsumer {
    /// Takes over a ring; validates the current read index.
    pub fn new(ring: RingMemory) -> Result<Self, RingError> {
        let read = ring.checked_index(ring.load(ctl::READ_INDEX)?, "initial read index")?;
        Ok(Self { ring, read })
    }

    /// The ring memory.
    pub fn memory(&self) -> &RingMemory {
        &self.ring
    }

    /// Whether a packet is waiting (validates the producer's write index).
    pub fn is_empty(&self) -> Result<bool, RingError> {
        let write = self
            .ring
            .checked_index(self.ring.load(ctl::WRITE_INDEX)?, "write index")?;
        Ok(write == self.read)
    }

    /// Sets or clears interrupt_mask. After clearing it, call [`Self::is_empty`] again
    /// before sleeping.
    pub fn set_interrupt_mask(&self, masked: bool) -> Result<(), RingError> {
        self.ring.store(ctl::INTERRUPT_MASK, masked as u32)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Reads the next packet (descriptor included, trailer excluded) into `buf`, replacing
    /// its contents. Returns `None` when the ring is empty.
    pub fn read(&mut self, buf: &mut Vec<u8>) -> Result<Option<ReadOutcome>, RingError> {
        let data_len = self.ring.data_len;
        let write = self
            .ring
            .checked_index(self.ring.load(ctl::WRITE_INDEX)?, "write index")?;
        if write == self.read {
            return Ok(None);
        }
        let avail = self.ring.used(write, self.read);
        if avail < DESC + TRAILER {
            return Err(RingError::Corrupt("partial packet"));
        }
        let mut d = [0u8; DESC as usize];
        self.ring.read_data(self.read, &mut d)?;
        let desc = PacketDescriptor::read_from_bytes(&d).expect("16 bytes");
        let len = desc.len8 as u32 * 8;
        let off = desc.offset8 as u32 * 8;
        if off < DESC || off > len {
            return Err(RingError::Corrupt("bad packet header length"));
        }
        if len + TRAILER > avail {
            return Err(RingError::Corrupt(
                "packet longer than the data in the ring",
            ));
        }
        buf.clear();
        buf.resize(len as usize, 0);
        self.ring.read_data(self.read, buf)?;
        self.read = (self.read + len + TRAILER) % data_len;
        self.ring.store(ctl::READ_INDEX, self.read)?;
        // pending_send_sz: signal if this read lifted free space from at most the
        // requested size to above it.
        fence(Ordering::SeqCst);
        let pending = self.ring.load(ctl::PENDING_SEND_SIZE)? & !7;
        let mut signal = false;
        if pending != 0 {
            let write_now = self
                .ring
                .checked_index(self.ring.load(ctl::WRITE_INDEX)?, "write index")?;
            let free_after = data_len - self.ring.used(write_now, self.read);
            let free_before = free_after.saturating_sub(len + TRAILER);
            signal = free_before <= pending && free_after > pending;
        }
        Ok(Some(ReadOutcome {
            len: len as usize,
            signal,
        }))
    }
}
