//! Ring packet parsing and building.

use hvdef::vmbus::{
    packet_type, GpaDirectHeader, GpaRange, PacketDescriptor, XferPageRange, XferPagesHeader,
    PACKET_FLAG_COMPLETION_REQUESTED,
};
use zerocopy::{FromBytes, IntoBytes};

/// Packet parse errors. The packet is skipped, or the channel closed, by the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("packet shorter than its descriptor")]
    Truncated,
    #[error("packet type {0} has no such header")]
    WrongType(u16),
    #[error("range list does not fit the packet header")]
    BadRanges,
}

/// A range of guest memory given as a byte offset into the first page, a byte count and the
/// page frame numbers it covers (used by GPADLs and GPA_DIRECT packets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedRange {
    pub byte_offset: u32,
    pub byte_count: u32,
    pub pfns: Vec<u64>,
}

impl PagedRange {
    /// Number of PFNs a range with this offset and count must carry.
    pub fn pfn_count(byte_offset: u32, byte_count: u32) -> u64 {
        (byte_offset as u64 + byte_count as u64).div_ceil(4096)
    }

    /// Parses `count` ranges from `data`; returns the ranges and the bytes consumed.
    /// Ranges must have byte_offset < 4096; every PFN must be present in `data`.
    pub fn parse_list(data: &[u8], count: u32) -> Result<(Vec<PagedRange>, usize), PacketError> {
        let mut at = 0usize;
        // Each range takes at least 8 bytes: bound the allocation by the data length.
        if count as usize > data.len() / 8 {
            return Err(PacketError::BadRanges);
        }
        let mut out = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let (r, _) =
                GpaRange::read_from_prefix(&data[at..]).map_err(|_| PacketError::BadRanges)?;
            at += 8;
            if r.byte_offset >= 4096 {
                return Err(PacketError::BadRanges);
            }
            let n = Self::pfn_count(r.byte_offset, r.byte_count);
            let bytes = n.checked_mul(8).ok_or(PacketError::BadRanges)?;
            if bytes > (data.len() - at) as u64 {
                return Err(PacketError::BadRanges);
            }
            let pfns = data[at..at + bytes as usize]
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            at += bytes as usize;
            out.push(PagedRange {
                byte_offset: r.byte_offset,
                byte_count: r.byte_count,
                pfns,
            });
        }
        Ok((out, at))
    }

    /// Serializes ranges in wire format.
    pub fn write_list(ranges: &[PagedRange], out: &mut Vec<u8>) {
        for r in ranges {
            out.extend_from_slice(
                GpaRange {
                    byte_count: r.byte_count,
                    byte_offset: r.byte_offset,
                }
                .as_bytes(),
            );
            for p in &r.pfns {
                out.extend_from_slice(&p.to_le_bytes());
            }
        }
    }
}

/// A received packet, borrowed from the caller's buffer (descriptor included).
#[derive(Debug, Clone, Copy)]
pub struct Packet<'a> {
    pub descriptor: PacketDescriptor,
    data: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Wraps a packet as read from a ring (already length-checked by the ring reader).
    pub fn parse(data: &'a [u8]) -> Result<Self, PacketError> {
        let (descriptor, _) =
            PacketDescriptor::read_from_prefix(data).map_err(|_| PacketError::Truncated)?;
        let off = descriptor.offset8 as usize * 8;
        let len = descriptor.len8 as usize * 8;
        if off < 16 || off > len || len > data.len() {
            return Err(PacketError::Truncated);
        }
        Ok(Self {
            descriptor,
            data: &data[..len],
        })
    }

    pub fn packet_type(&self) -> u16 {
        self.descriptor.packet_type
    }

    pub fn transaction_id(&self) -> u64 {
        self.descriptor.transaction_id
    }

    pub fn completion_requested(&self) -> bool {
        self.descriptor.flags & PACKET_FLAG_COMPLETION_REQUESTED != 0
    }

    /// The payload after the header (offset8), padding included.
    pub fn payload(&self) -> &'a [u8] {
        &self.data[self.descriptor.offset8 as usize * 8..]
    }

    /// The type-specific header between the descriptor and the payload.
    pub fn type_header(&self) -> &'a [u8] {
        &self.data[16..self.descriptor.offset8 as usize * 8]
    }

    /// The whole packet.
    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }

    /// Ranges of a GPA_DIRECT packet.
    pub fn gpa_direct_ranges(&self) -> Result<Vec<PagedRange>, PacketError> {
        if self.packet_type() != packet_type::DATA_USING_GPA_DIRECT {
            return Err(PacketError::WrongType(self.packet_type()));
        }
        let h = self.type_header();
        let (hdr, rest) =
            GpaDirectHeader::read_from_prefix(h).map_err(|_| PacketError::BadRanges)?;
        Ok(PagedRange::parse_list(rest, hdr.range_count)?.0)
    }

    /// Transfer-page set id and ranges of an XFER_PAGES packet.
    pub fn xfer_page_ranges(&self) -> Result<(u16, Vec<XferPageRange>), PacketError> {
        if self.packet_type() != packet_type::DATA_USING_XFER_PAGES {
            return Err(PacketError::WrongType(self.packet_type()));
        }
        let h = self.type_header();
        let (hdr, rest) =
            XferPagesHeader::read_from_prefix(h).map_err(|_| PacketError::BadRanges)?;
        let n = hdr.range_count as usize;
        if n > rest.len() / 8 {
            return Err(PacketError::BadRanges);
        }
        let ranges = <[XferPageRange]>::ref_from_bytes(&rest[..n * 8])
            .map_err(|_| PacketError::BadRanges)?
            .to_vec();
        Ok((hdr.xfer_pageset_id, ranges))
    }
}

/// Builds the descriptor for a packet with `header_len` bytes of type-specific header and
/// `payload_len` bytes of payload. Returns the descriptor and the padding needed after the
/// payload.
pub fn descriptor(
    packet_type: u16,
    flags: u16,
    transaction_id: u64,
    header_len: usize,
    payload_len: usize,
) -> Option<(PacketDescriptor, usize)> {
    if !header_len.is_multiple_of(8) {
        return None;
    }
    let off = 16 + header_len;
    let len = (off + payload_len).next_multiple_of(8);
    let offset8 = u16::try_from(off / 8).ok()?;
    let len8 = u16::try_from(len / 8).ok()?;
    Some((
        PacketDescriptor {
            packet_type,
            offset8,
            len8,
            flags,
            transaction_id,
        },
        len - off - payload_len,
    ))
}

/// Owned copy of a GPA_DIRECT type header for sending.
pub fn gpa_direct_header(ranges: &[PagedRange]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(
        GpaDirectHeader {
            reserved: 0,
            range_count: ranges.len() as u32,
        }
        .as_bytes(),
    );
    PagedRange::write_list(ranges, &mut v);
    v
}
