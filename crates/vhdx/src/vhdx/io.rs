//! Guest I/O: reads, writes with block allocation, and unmap.

use super::format::*;
use super::{lock, Vhdx};
use crate::{Disk, Error, Extent, Result};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

/// What a block's BAT state means for a read.
enum Source {
    Zero,
    Parent,
    File(u64),
    Partial { data: u64, bitmap: u64 },
}

impl Vhdx {
    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let lss = u64::from(self.geo.logical_sector_size);
        let size = self.virtual_size.load(Ordering::Acquire);
        if !offset.is_multiple_of(lss) || !len.is_multiple_of(lss) {
            return Err(Error::Invalid(format!(
                "request {offset:#x}+{len:#x} is not aligned to the {lss}-byte sector size"
            )));
        }
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::Invalid(format!(
                "request {offset:#x}+{len:#x} is past the end of the disk ({size} bytes)"
            )));
        }
        Ok(())
    }

    fn bat_entry(&self, index: u64) -> u64 {
        let bat = self.bat.read().unwrap_or_else(|e| e.into_inner());
        bat.get(index as usize).copied().unwrap_or(0)
    }

    fn source(&self, block: u64) -> Source {
        let e = self.bat_entry(self.geo.payload_index(block));
        match bat_state(e) {
            PAYLOAD_FULLY_PRESENT => Source::File(bat_offset(e)),
            PAYLOAD_PARTIALLY_PRESENT => {
                let sb = self.bat_entry(self.geo.bitmap_index(block / self.geo.chunk_ratio()));
                Source::Partial {
                    data: bat_offset(e),
                    bitmap: bat_offset(sb),
                }
            }
            PAYLOAD_NOT_PRESENT if self.geo.has_parent => Source::Parent,
            _ => Source::Zero,
        }
    }

    /// Calls `f(block, offset_in_block, range_in_buf)` for each block piece of a request.
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let bs = u64::from(self.geo.block_size);
        let mut done = 0;
        while done < len {
            let pos = offset + done;
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (len - done).min(bs - in_block);
            f(block, in_block, done as usize..(done + n) as usize)?;
            done += n;
        }
        Ok(())
    }

    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(parent) = self.parent.as_ref() else {
            return Err(Error::Invalid(format!(
                "{}: opened without its parent; parent data is not readable",
                self.file.path.display()
            )));
        };
        let psize = parent.size();
        if offset >= psize {
            buf.fill(0);
            return Ok(());
        }
        let n = ((psize - offset).min(buf.len() as u64)) as usize;
        parent.read_at(&mut buf[..n], offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Bit index, in its chunk's sector bitmap, of the first sector of `block` + `in_block`.
    fn bitmap_bit(&self, block: u64, in_block: u64) -> u64 {
        (block % self.geo.chunk_ratio()) * self.geo.sectors_per_block()
            + in_block / u64::from(self.geo.logical_sector_size)
    }

    pub(super) fn read_impl(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let lss = self.geo.logical_sector_size as usize;
        self.for_each_piece(offset, buf.len() as u64, |block, in_block, r| {
            let pos = offset + r.start as u64;
            let out = &mut buf[r];
            match self.source(block) {
                Source::Zero => {
                    out.fill(0);
                    Ok(())
                }
                Source::Parent => self.read_parent(out, pos),
                Source::File(o) => self.file.read_at(out, o + in_block),
                Source::Partial { data, bitmap } => {
                    let bit0 = self.bitmap_bit(block, in_block);
                    let nbits = (out.len() / lss) as u64;
                    let first_byte = bit0 / 8;
                    let mut bits = vec![0u8; ((bit0 + nbits).div_ceil(8) - first_byte) as usize];
                    self.file.read_at(&mut bits, bitmap + first_byte)?;
                    let bit = |i: u64| {
                        let b = bit0 + i - first_byte * 8;
                        bits[(b / 8) as usize] >> (b % 8) & 1 == 1
                    };
                    let mut i = 0;
                    while i < nbits {
                        let present = bit(i);
                        let mut j = i + 1;
                        while j < nbits && bit(j) == present {
                            j += 1;
                        }
                        let sub = &mut out[i as usize * lss..j as usize * lss];
                        let sub_in_block = in_block + i * lss as u64;
                        if present {
                            self.file.read_at(sub, data + sub_in_block)?;
                        } else {
                            self.read_parent(sub, pos + i * lss as u64)?;
                        }
                        i = j;
                    }
                    Ok(())
                }
            }
        })
    }

    /// The first extent of `[offset, offset + len)` (see [`Disk::extent`]): a fully present
    /// block maps to the file for reads and writes; a block that reads as zeros or from the
    /// parent does so for reads; everything else (allocation, sector bitmaps, an in-memory
    /// log replay) goes through the disk's own read and write.
    pub(super) fn extent_impl(&self, offset: u64, len: u64, write: bool) -> Result<Extent<'_>> {
        if write {
            // Also starts the write session before the first in-place write.
            self.begin_session(true)?;
        }
        self.check_range(offset, len)?;
        let bs = u64::from(self.geo.block_size);
        let (block, in_block) = (offset / bs, offset % bs);
        let n = len.min(bs - in_block);
        let patched = self.file.has_patches();
        Ok(match self.source(block) {
            Source::File(o) if !patched => Extent::File {
                fd: self.file.file.as_fd(),
                direct: &self.file.direct,
                path: &self.file.path,
                offset: o + in_block,
                len: n,
            },
            Source::Zero if !write => Extent::Zero { len: n },
            Source::Parent if !write => match self.parent.as_ref() {
                Some(p) if offset < p.size() => {
                    p.extent(offset, n.min(p.size() - offset), false)?
                }
                Some(_) => Extent::Zero { len: n },
                None => Extent::Indirect { len: n },
            },
            _ => Extent::Indirect { len: n },
        })
    }

    /// Sets (or, with `replace_block`, rewrites the whole block's bits to just) the bitmap bits
    /// for `len` bytes at `in_block` of `block`.
    fn mark_present(
        &self,
        bitmap: u64,
        block: u64,
        in_block: u64,
        len: u64,
        replace_block: bool,
    ) -> Result<()> {
        let lss = u64::from(self.geo.logical_sector_size);
        let (start, count) = if replace_block {
            (self.bitmap_bit(block, 0), self.geo.sectors_per_block())
        } else {
            (self.bitmap_bit(block, in_block), len / lss)
        };
        let set0 = self.bitmap_bit(block, in_block);
        let set1 = set0 + len / lss;
        let first_byte = start / 8;
        let nbytes = ((start + count).div_ceil(8) - first_byte) as usize;
        let _g = lock(&self.bitmap_lock);
        let mut bits = vec![0u8; nbytes];
        if !replace_block {
            self.file.read_at(&mut bits, bitmap + first_byte)?;
        }
        for b in set0..set1 {
            let rel = b - first_byte * 8;
            bits[(rel / 8) as usize] |= 1 << (rel % 8);
        }
        self.file.write_at(&bits, bitmap + first_byte)
    }

    pub(super) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.begin_session(true)?;
        self.for_each_piece(offset, buf.len() as u64, |block, in_block, r| {
            self.write_piece(block, in_block, &buf[r])
        })
    }

    fn write_piece(&self, block: u64, in_block: u64, data: &[u8]) -> Result<()> {
        loop {
            let pi = self.geo.payload_index(block);
            let e = self.bat_entry(pi);
            match bat_state(e) {
                PAYLOAD_FULLY_PRESENT => return self.file.write_at(data, bat_offset(e) + in_block),
                PAYLOAD_PARTIALLY_PRESENT => {
                    self.file.write_at(data, bat_offset(e) + in_block)?;
                    let sb = self.bat_entry(self.geo.bitmap_index(block / self.geo.chunk_ratio()));
                    return self.mark_present(
                        bat_offset(sb),
                        block,
                        in_block,
                        data.len() as u64,
                        false,
                    );
                }
                _ => {
                    if self.allocate_and_write(block, in_block, data)? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Allocates `block` at the end of the file and writes `data` into it. Returns false when
    /// another thread allocated the block first (the caller retries).
    fn allocate_and_write(&self, block: u64, in_block: u64, data: &[u8]) -> Result<bool> {
        let mut meta = lock(&self.meta);
        if meta.closed {
            return Err(Error::Invalid("the disk is closed".into()));
        }
        let pi = self.geo.payload_index(block);
        let state = bat_state(self.bat_entry(pi));
        if state == PAYLOAD_FULLY_PRESENT || state == PAYLOAD_PARTIALLY_PRESENT {
            return Ok(false);
        }
        let bs = u64::from(self.geo.block_size);
        let whole = in_block == 0 && data.len() as u64 == bs;
        // In a differencing disk, a NOT_PRESENT block's other sectors still come from the
        // parent: the new block is partially present. ZERO/UNMAPPED blocks read zeros, which
        // the freshly extended file provides.
        let partial = self.geo.has_parent && state == PAYLOAD_NOT_PRESENT && !whole;
        let mut changes = Vec::new();
        let new_off = meta.alloc_end;
        let mut end = new_off + bs;
        let mut bitmap = 0;
        if partial {
            let si = self.geo.bitmap_index(block / self.geo.chunk_ratio());
            let sb = self.bat_entry(si);
            if bat_state(sb) == SB_PRESENT {
                bitmap = bat_offset(sb);
            } else {
                bitmap = end;
                end += SECTOR_BITMAP_BLOCK_SIZE;
                changes.push((si, bat_entry(SB_PRESENT, bitmap)));
            }
        }
        if self.file.file_len()? < end {
            self.file.set_len(end)?;
        }
        meta.alloc_end = end;
        self.file.write_at(data, new_off + in_block)?;
        if partial {
            self.mark_present(bitmap, block, in_block, data.len() as u64, true)?;
        }
        let new_state = if partial {
            PAYLOAD_PARTIALLY_PRESENT
        } else {
            PAYLOAD_FULLY_PRESENT
        };
        changes.push((pi, bat_entry(new_state, new_off)));
        self.commit_bat(&mut meta, &changes)?;
        Ok(true)
    }

    pub(super) fn unmap_impl(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.begin_session(true)?;
        let size = self.virtual_size.load(Ordering::Acquire);
        let bs = u64::from(self.geo.block_size);
        let diff = self.geo.has_parent;
        let mut changes = Vec::new();
        self.for_each_piece(offset, len, |block, in_block, r| {
            let n = r.len() as u64;
            let pos = offset + r.start as u64;
            let whole = in_block == 0 && (n == bs || pos + n == size);
            let pi = self.geo.payload_index(block);
            let state = bat_state(self.bat_entry(pi));
            let allocated = state == PAYLOAD_FULLY_PRESENT || state == PAYLOAD_PARTIALLY_PRESENT;
            let reads_zero = !allocated && (!diff || state != PAYLOAD_NOT_PRESENT);
            if whole && !self.leave_allocated {
                if !reads_zero {
                    let new = if diff {
                        PAYLOAD_ZERO
                    } else {
                        PAYLOAD_NOT_PRESENT
                    };
                    changes.push((pi, bat_entry(new, 0)));
                }
                Ok(())
            } else if !reads_zero {
                if state == PAYLOAD_FULLY_PRESENT && !self.leave_allocated {
                    // Zero the range by punching the 4 KiB-aligned middle out of the file.
                    let e = self.bat_entry(pi);
                    let start = bat_offset(e) + in_block;
                    let a = start.next_multiple_of(4096);
                    let b = ((start + n) / 4096 * 4096).max(a);
                    if b > a {
                        self.write_zeros(block, in_block, a - start)?;
                        self.file.punch_hole(a, b - a)?;
                        return self.write_zeros(block, in_block + (b - start), start + n - b);
                    }
                }
                self.write_zeros(block, in_block, n)
            } else {
                Ok(())
            }
        })?;
        if changes.is_empty() {
            return Ok(());
        }
        let mut meta = lock(&self.meta);
        if meta.closed {
            return Err(Error::Invalid("the disk is closed".into()));
        }
        // Give the dropped blocks' space back to the host. A crash before the BAT change is
        // durable leaves the old entry pointing at zeros, which is what an unmap reads as.
        let old: Vec<u64> = {
            let bat = self.bat.read().unwrap_or_else(|e| e.into_inner());
            changes.iter().map(|&(i, _)| bat[i as usize]).collect()
        };
        self.commit_bat(&mut meta, &changes)?;
        drop(meta);
        for e in old {
            if bat_state(e) == PAYLOAD_FULLY_PRESENT || bat_state(e) == PAYLOAD_PARTIALLY_PRESENT {
                self.file.punch_hole(bat_offset(e), bs)?;
            }
        }
        Ok(())
    }

    fn write_zeros(&self, block: u64, in_block: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_piece(block, in_block + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}
