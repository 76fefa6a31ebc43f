//! The guest's receive and send buffers: GPADLs of whole pages, mapped once when the guest
//! hands them over, and addressed by byte offset. The receive buffer is cut into sections of
//! one size, each holding one RNDIS message the host writes.

use guestmem::GuestMemory;
use vmbus::PagedRange;

const PAGE: u64 = 4096;

/// Why a buffer GPADL is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    #[error("GPADL {0} does not exist on this channel")]
    NoGpadl(u32),
    #[error("the GPADL's ranges do not start on page boundaries")]
    Unaligned,
    #[error("page {0:#x} is not guest RAM")]
    OutsideRam(u64),
    #[error("the buffer is {0} bytes, too small")]
    TooSmall(u64),
}

/// A buffer of guest pages.
#[derive(Debug)]
pub struct GuestBuffer {
    pub gpadl: u32,
    pub id: u16,
    pfns: Vec<u64>,
    len: u32,
}

impl GuestBuffer {
    /// Maps a GPADL's ranges (each starting at offset 0 of its first page) as one buffer.
    pub fn new(
        mem: &GuestMemory,
        gpadl: u32,
        id: u16,
        ranges: &[PagedRange],
    ) -> Result<Self, BufferError> {
        let mut pfns = Vec::new();
        let mut len = 0u64;
        for r in ranges {
            if r.byte_offset != 0 {
                return Err(BufferError::Unaligned);
            }
            let pages = u64::from(r.byte_count).div_ceil(PAGE) as usize;
            let list = r.pfns.get(..pages).ok_or(BufferError::Unaligned)?;
            if ranges.len() > 1 && !u64::from(r.byte_count).is_multiple_of(PAGE) {
                return Err(BufferError::Unaligned);
            }
            for &p in list {
                let gpa = p.checked_mul(PAGE).ok_or(BufferError::OutsideRam(p))?;
                if !mem.contains(gpa, PAGE) {
                    return Err(BufferError::OutsideRam(p));
                }
            }
            pfns.extend_from_slice(list);
            len += u64::from(r.byte_count);
        }
        let len = u32::try_from(len).map_err(|_| BufferError::TooSmall(0))?;
        Ok(Self {
            gpadl,
            id,
            pfns,
            len,
        })
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the guest pieces `(gpa, len)` of `offset..offset+len`, merging pages that are
    /// adjacent in guest memory. False if the range leaves the buffer.
    pub fn pieces(&self, offset: u32, len: u32, out: &mut Vec<(u64, usize)>) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        if end > self.len {
            return false;
        }
        let mut at = u64::from(offset);
        let end = u64::from(end);
        while at < end {
            let page = (at / PAGE) as usize;
            let in_page = at % PAGE;
            let n = (PAGE - in_page).min(end - at);
            let gpa = self.pfns[page] * PAGE + in_page;
            match out.last_mut() {
                Some((g, l)) if *g + *l as u64 == gpa => *l += n as usize,
                _ => out.push((gpa, n as usize)),
            }
            at += n;
        }
        true
    }

    /// Appends `len` bytes at `offset` to `out`. False if the range leaves the buffer.
    pub fn read(&self, mem: &GuestMemory, offset: u32, len: u32, out: &mut Vec<u8>) -> bool {
        let mut p = Vec::new();
        if !self.pieces(offset, len, &mut p) {
            return false;
        }
        for (gpa, n) in p {
            let at = out.len();
            out.resize(at + n, 0);
            if mem.read(gpa, &mut out[at..]).is_err() {
                return false;
            }
        }
        true
    }

    /// Writes `data` at `offset`. False if the range leaves the buffer.
    pub fn write(&self, mem: &GuestMemory, offset: u32, data: &[u8]) -> bool {
        let mut p = Vec::new();
        if !self.pieces(offset, data.len() as u32, &mut p) {
            return false;
        }
        let mut at = 0;
        for (gpa, n) in p {
            if mem.write(gpa, &data[at..at + n]).is_err() {
                return false;
            }
            at += n;
        }
        true
    }
}

/// The receive buffer and its sections.
#[derive(Debug)]
pub struct ReceiveBuffer {
    pub buf: GuestBuffer,
    pub section_size: u32,
    pub sections: u32,
}

/// The section size for frames up to `mtu` bytes of payload (plus Ethernet header and a
/// VLAN tag) after the RNDIS headers, rounded to 64 bytes.
pub fn section_size(mtu: u32) -> u32 {
    (crate::rndis::RX_HEADER_RESERVE as u32 + mtu + 18).next_multiple_of(64)
}

impl ReceiveBuffer {
    /// Cuts `buf` into sections for `mtu`; needs room for two.
    pub fn new(buf: GuestBuffer, mtu: u32) -> Result<Self, BufferError> {
        let section_size = section_size(mtu);
        let sections = buf.len() / section_size;
        if sections < 2 {
            return Err(BufferError::TooSmall(buf.len().into()));
        }
        Ok(Self {
            buf,
            section_size,
            sections,
        })
    }

    /// Byte offset of section `i`.
    pub fn offset(&self, i: u32) -> u32 {
        i * self.section_size
    }

    /// Frame bytes one section carries.
    pub fn data_per_section(&self) -> u32 {
        self.section_size - crate::rndis::RX_HEADER_RESERVE as u32
    }
}

/// The send buffer and its sections.
#[derive(Debug)]
pub struct SendBuffer {
    pub buf: GuestBuffer,
    pub section_size: u32,
    pub sections: u32,
}

/// The send section size the host asks for (Linux's default).
pub const SEND_SECTION_SIZE: u32 = 6144;

impl SendBuffer {
    pub fn new(buf: GuestBuffer) -> Result<Self, BufferError> {
        let sections = buf.len() / SEND_SECTION_SIZE;
        if sections == 0 {
            return Err(BufferError::TooSmall(buf.len().into()));
        }
        Ok(Self {
            buf,
            section_size: SEND_SECTION_SIZE,
            sections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_follow_scattered_pages_and_stay_inside() {
        let mem = GuestMemory::new(&[(0, 1 << 20)]).unwrap();
        let r = PagedRange {
            byte_offset: 0,
            byte_count: 3 * 4096,
            pfns: vec![10, 11, 40],
        };
        let b = GuestBuffer::new(&mem, 1, 0, &[r]).unwrap();
        let mut p = Vec::new();
        assert!(b.pieces(4000, 5000, &mut p));
        assert_eq!(p, vec![(10 * 4096 + 4000, 4192), (40 * 4096, 808)]);
        assert!(!b.pieces(12 * 1024, 1, &mut p));
        assert!(!b.pieces(u32::MAX, 2, &mut p));
        let bad = PagedRange {
            byte_offset: 0,
            byte_count: 4096,
            pfns: vec![1 << 40],
        };
        assert!(GuestBuffer::new(&mem, 1, 0, &[bad]).is_err());
    }
}
