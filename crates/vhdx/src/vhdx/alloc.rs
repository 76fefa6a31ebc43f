//! Allocation queries: which parts of the virtual disk a file (or its chain) holds data for,
//! and where its blocks lie in the file.

use super::format::*;
use super::{lock, Vhdx};
use crate::{Disk, Result};

/// A partially present block whose sector bitmap has more runs than this is reported whole.
const MAX_PIECES_PER_BLOCK: usize = 16;

/// Appends `(start, len)` to ascending `out`, merging with the last range when they touch.
fn push_range(out: &mut Vec<(u64, u64)>, start: u64, len: u64) {
    if len == 0 {
        return;
    }
    match out.last_mut() {
        Some(last) if last.0 + last.1 >= start => {
            last.1 = last.1.max(start + len - last.0);
        }
        _ => out.push((start, len)),
    }
}

impl Vhdx {
    /// `(block index, file offset)` of every FULLY_PRESENT or PARTIALLY_PRESENT payload block,
    /// in virtual-disk order.
    pub fn allocated_block_offsets(&self) -> Vec<(u64, u64)> {
        let bat = self.bat.read().unwrap_or_else(|e| e.into_inner());
        let blocks = self.geo.data_blocks(self.size());
        (0..blocks)
            .filter_map(|b| {
                let e = bat.get(self.geo.payload_index(b) as usize).copied()?;
                let s = bat_state(e);
                (s == PAYLOAD_FULLY_PRESENT || s == PAYLOAD_PARTIALLY_PRESENT)
                    .then_some((b, bat_offset(e)))
            })
            .collect()
    }

    /// Byte ranges of the virtual disk whose data this file itself holds (not its parents):
    /// FULLY_PRESENT blocks, and the present sectors of PARTIALLY_PRESENT blocks by their
    /// sector bitmap (the whole block when the bitmap has more than 16 runs). Ascending, merged, clipped to the disk size. Everything outside them
    /// reads as zeros or comes from the parent.
    ///
    /// For a disk without a parent, holes of the host file inside a block (space never
    /// written) are left out too, since they read as zeros; a differencing disk reports its
    /// present sectors whole, because its zeros hide the parent's data.
    pub fn allocated_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let size = self.size();
        let bs = u64::from(self.geo.block_size);
        let lss = u64::from(self.geo.logical_sector_size);
        // Host-file data ranges, when they can refine whole blocks (see above). Not with an
        // in-memory log replay, whose writes the host file does not hold.
        let file_data = if !self.geo.has_parent && !self.file.has_patches() {
            let len = self.file.file_len()?;
            Some(crate::raw::file_data_ranges(&self.file.file, len, lss))
        } else {
            None
        };
        // Partially present blocks: (block, bitmap offset), read after the BAT lock is dropped.
        let mut partial = Vec::new();
        let mut out = Vec::new();
        {
            let bat = self.bat.read().unwrap_or_else(|e| e.into_inner());
            for b in 0..self.geo.data_blocks(size) {
                let Some(&e) = bat.get(self.geo.payload_index(b) as usize) else {
                    break;
                };
                let start = b * bs;
                let len = bs.min(size - start);
                match bat_state(e) {
                    PAYLOAD_FULLY_PRESENT => match &file_data {
                        None => push_range(&mut out, start, len),
                        Some(fd) => {
                            // Intersect the block's file range with the host file's data.
                            let fo = bat_offset(e);
                            let fe = fo + len;
                            let mut i = fd.partition_point(|&(s, l)| s + l <= fo);
                            while let Some(&(s, l)) = fd.get(i) {
                                if s >= fe {
                                    break;
                                }
                                let a = s.max(fo);
                                let z = (s + l).min(fe);
                                push_range(&mut out, start + (a - fo), z - a);
                                i += 1;
                            }
                        }
                    },
                    PAYLOAD_PARTIALLY_PRESENT => {
                        let sb = bat
                            .get(self.geo.bitmap_index(b / self.geo.chunk_ratio()) as usize)
                            .copied()
                            .unwrap_or(0);
                        partial.push((b, bat_offset(sb)));
                    }
                    _ => {}
                }
            }
        }
        if partial.is_empty() {
            return Ok(out);
        }
        // Sector bitmaps: one bit per logical sector, least significant bit first.
        let spb = self.geo.sectors_per_block();
        let mut bits = vec![0u8; spb.div_ceil(8) as usize];
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        for &(b, bitmap) in &partial {
            let start = b * bs;
            let nsec = bs.min(size - start) / lss;
            let bit0 = (b % self.geo.chunk_ratio()) * spb;
            {
                let _g = lock(&self.bitmap_lock);
                self.file.read_at(&mut bits, bitmap + bit0 / 8)?;
            }
            let present = |i: u64| bits[(i / 8) as usize] >> (i % 8) & 1 == 1;
            let first = pieces.len();
            let mut i = 0;
            while i < nsec {
                if !present(i) {
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < nsec && present(j) {
                    j += 1;
                }
                pieces.push((start + i * lss, (j - i) * lss));
                i = j;
            }
            if pieces.len() - first > MAX_PIECES_PER_BLOCK {
                // A scattered bitmap: report the whole block, so the list stays small
                // (hostile bitmaps would otherwise cost 64 bytes of memory per byte).
                pieces.truncate(first);
                pieces.push((start, nsec * lss));
            }
        }
        out.extend(pieces);
        Ok(crate::open::merge_ranges(out, size))
    }

    /// Byte ranges any file of the chain (this one and its parents) holds data for: every
    /// other byte of the disk reads as zeros. Ascending, merged, clipped to this disk's size.
    pub fn chain_allocated_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let mut all = self.allocated_ranges()?;
        let mut p = self.parent();
        while let Some(v) = p {
            all.extend(v.allocated_ranges()?);
            p = v.parent();
        }
        Ok(crate::open::merge_ranges(all, self.size()))
    }
}
