//! Offline operations: resize, finding and dropping reclaimable blocks, compaction, merge.

use super::format::*;
use super::{lock, Meta, Vhdx};
use crate::{Disk, Error, Result};
use std::path::Path;
use std::sync::atomic::Ordering;
use uuid::Uuid;

/// What [`Vhdx::resize`] may do with data past a smaller new size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShrinkPolicy {
    /// Refuse to shrink when any byte past the new size is non-zero.
    KeepData,
    /// Drop whatever lies past the new size.
    DropData,
}

/// Why a block is listed by [`Vhdx::reclaimable_blocks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reclaim {
    /// Allocated (FULLY_PRESENT) but every byte is zero.
    ZeroData,
    /// ZERO/UNMAPPED/UNDEFINED state that still names file space.
    Unmapped,
}

/// Result of [`Vhdx::compact`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactStats {
    pub old_file_size: u64,
    pub new_file_size: u64,
    pub blocks_moved: u64,
}

impl Vhdx {
    fn meta_log_patch(&self, meta: &mut Meta, offset: u64, bytes: &[u8]) -> Result<()> {
        self.flush_meta(meta)?;
        let first = offset / LOG_SECTOR as u64;
        let last = (offset + bytes.len() as u64 - 1) / LOG_SECTOR as u64;
        let mut sectors = Vec::new();
        for s in first..=last {
            let so = s * LOG_SECTOR as u64;
            let mut b = vec![0u8; LOG_SECTOR];
            self.file.read_at(&mut b, so)?;
            for (i, v) in bytes.iter().enumerate() {
                let fo = offset + i as u64;
                if fo >= so && fo < so + LOG_SECTOR as u64 {
                    b[(fo - so) as usize] = *v;
                }
            }
            sectors.push((so, b));
        }
        self.log_write(meta, &sectors)?;
        self.sync_meta(meta)
    }

    fn block_is_zero(&self, block: u64) -> Result<bool> {
        let bs = u64::from(self.geo.block_size);
        let size = self.size();
        let start = block * bs;
        let end = (start + bs).min(size);
        let mut buf = vec![0u8; (1 << 20).min(end - start) as usize];
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            self.read_at(&mut buf[..n], pos)?;
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            pos += n as u64;
        }
        Ok(true)
    }

    /// Changes the virtual size. Growing adds unallocated (or, for fixed disks, allocated)
    /// blocks, moving the BAT to the end of the file when its region is too small. Shrinking is
    /// refused for differencing disks, and with [`ShrinkPolicy::KeepData`] when data past the
    /// new size is non-zero.
    pub fn resize(&mut self, new_size: u64, policy: ShrinkPolicy) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let lss = u64::from(self.geo.logical_sector_size);
        if new_size == 0 || new_size > MAX_VIRTUAL_SIZE || !new_size.is_multiple_of(lss) {
            return Err(Error::Invalid(format!(
                "size {new_size} is not a non-zero multiple of {lss} up to 64 TiB"
            )));
        }
        let old_size = self.size();
        if new_size == old_size {
            return Ok(());
        }
        let bs = u64::from(self.geo.block_size);
        if new_size < old_size {
            if self.geo.has_parent {
                return Err(Error::Invalid("a differencing disk cannot shrink".into()));
            }
            // Check (or drop) data past the new size.
            let first_gone = new_size.div_ceil(bs);
            let old_blocks = self.geo.data_blocks(old_size);
            if policy == ShrinkPolicy::KeepData {
                for b in first_gone..old_blocks {
                    let s = bat_state(self.bat.read().unwrap()[self.geo.payload_index(b) as usize]);
                    if s == PAYLOAD_FULLY_PRESENT && !self.block_is_zero(b)? {
                        return Err(Error::Invalid(format!(
                            "block {b} past the new size holds data; shrinking would drop it"
                        )));
                    }
                }
                if !new_size.is_multiple_of(bs) {
                    let tail_end = (first_gone * bs).min(old_size);
                    let mut buf = vec![0u8; (tail_end - new_size) as usize];
                    self.read_at(&mut buf, new_size)?;
                    if buf.iter().any(|&b| b != 0) {
                        return Err(Error::Invalid(
                            "data past the new size would be dropped".into(),
                        ));
                    }
                }
            }
            if !new_size.is_multiple_of(bs) {
                let tail_end = (first_gone * bs).min(old_size);
                self.unmap(new_size, tail_end - new_size)?;
                // Zero what remains allocated, so growing again reads zeros.
                let b = new_size / bs;
                let e = self.bat.read().unwrap()[self.geo.payload_index(b) as usize];
                if bat_state(e) == PAYLOAD_FULLY_PRESENT {
                    let o = bat_offset(e) + new_size % bs;
                    self.file.write_zeros(o, tail_end - new_size)?;
                }
            }
            let mut meta = lock(&self.meta);
            self.begin_session_locked(&mut meta, true)?;
            let mut changes = Vec::new();
            {
                let bat = self.bat.read().unwrap();
                let keep = self.geo.bat_entries(new_size) as usize;
                for (i, &e) in bat.iter().enumerate().skip(keep) {
                    if e != 0 {
                        changes.push((i as u64, 0));
                    }
                }
            }
            self.commit_bat(&mut meta, &changes)?;
            let off = meta.vsize_item_offset;
            self.meta_log_patch(&mut meta, off, &new_size.to_le_bytes())?;
            self.bat
                .write()
                .unwrap()
                .truncate(self.geo.bat_entries(new_size) as usize);
            self.virtual_size.store(new_size, Ordering::Release);
            return Ok(());
        }

        // Grow.
        let mut meta = lock(&self.meta);
        self.begin_session_locked(&mut meta, true)?;
        let old_entries = self.geo.bat_entries(old_size);
        let new_entries = self.geo.bat_entries(new_size);
        if new_entries * 8 > meta.bat_length {
            // Move the BAT to the end of the file.
            let new_len = (new_entries * 8).div_ceil(MIB) * MIB;
            if new_len > u64::from(u32::MAX) / MIB * MIB {
                return Err(Error::Invalid("BAT would exceed 4 GiB".into()));
            }
            let new_off = meta.alloc_end;
            self.file.set_len(new_off + new_len)?;
            {
                let bat = self.bat.read().unwrap();
                let mut buf = Vec::with_capacity(bat.len() * 8);
                for e in bat.iter() {
                    buf.extend_from_slice(&e.to_le_bytes());
                }
                self.file.write_at(&buf, new_off)?;
            }
            self.file.sync()?;
            let mut regions = meta.regions.clone();
            for r in &mut regions {
                if r.guid == BAT_REGION {
                    r.file_offset = new_off;
                    r.length = new_len as u32;
                }
            }
            let rt = serialize_region_table(&regions);
            for off in REGION_TABLE_OFFSETS {
                self.file.write_at(&rt, off)?;
                self.file.sync()?;
            }
            meta.regions = regions;
            meta.bat_offset = new_off;
            meta.bat_length = new_len;
            meta.alloc_end = new_off + new_len;
        } else {
            // Clear stale bytes past the old entries in the existing region.
            let start = old_entries * 8;
            let end = (new_entries * 8).div_ceil(LOG_SECTOR as u64) * LOG_SECTOR as u64;
            let end = end.min(meta.bat_length);
            let mut s = start / LOG_SECTOR as u64 * LOG_SECTOR as u64;
            let mut dirty = Vec::new();
            while s < end {
                let mut b = vec![0u8; LOG_SECTOR];
                self.file.read_at(&mut b, meta.bat_offset + s)?;
                let keep = start.saturating_sub(s).min(LOG_SECTOR as u64) as usize;
                if b[keep..].iter().any(|&x| x != 0) {
                    b[keep..].fill(0);
                    dirty.push((meta.bat_offset + s, b));
                }
                s += LOG_SECTOR as u64;
            }
            self.log_write(&mut meta, &dirty)?;
        }
        self.bat.write().unwrap().resize(new_entries as usize, 0);
        if self.leave_allocated {
            let mut changes = Vec::new();
            let first = self.geo.data_blocks(old_size);
            let last = self.geo.data_blocks(new_size);
            for b in first..last {
                changes.push((
                    self.geo.payload_index(b),
                    bat_entry(PAYLOAD_FULLY_PRESENT, meta.alloc_end),
                ));
                meta.alloc_end += bs;
            }
            self.file.set_len(meta.alloc_end)?;
            self.commit_bat(&mut meta, &changes)?;
        }
        let off = meta.vsize_item_offset;
        self.meta_log_patch(&mut meta, off, &new_size.to_le_bytes())?;
        self.virtual_size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Blocks whose file space can be given back: allocated blocks that read as all zeros and
    /// zero/unmapped blocks that still name file space. Reads every allocated block.
    pub fn reclaimable_blocks(&self) -> Result<Vec<(u64, Reclaim)>> {
        let mut v = Vec::new();
        for b in 0..self.geo.data_blocks(self.size()) {
            let e = self.bat.read().unwrap()[self.geo.payload_index(b) as usize];
            match bat_state(e) {
                // In a differencing disk zero data still hides the parent's; it can become a
                // ZERO block.
                PAYLOAD_FULLY_PRESENT if self.block_is_zero(b)? => v.push((b, Reclaim::ZeroData)),
                PAYLOAD_ZERO | PAYLOAD_UNMAPPED | PAYLOAD_UNMAPPED_OLD | PAYLOAD_UNDEFINED
                    if bat_offset(e) != 0 =>
                {
                    v.push((b, Reclaim::Unmapped))
                }
                _ => {}
            }
        }
        Ok(v)
    }

    /// Releases the listed blocks: they become NOT_PRESENT (ZERO in a differencing disk) and
    /// read as zeros. Their file space is reclaimed by [`Vhdx::compact`]. Refused for fixed
    /// disks, whose blocks stay allocated.
    pub fn discard_blocks(&self, blocks: &[u64]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if self.leave_allocated {
            return Err(Error::Invalid(
                "a fixed disk keeps every block allocated".into(),
            ));
        }
        let nblocks = self.geo.data_blocks(self.size());
        let new_state = if self.geo.has_parent {
            PAYLOAD_ZERO
        } else {
            PAYLOAD_NOT_PRESENT
        };
        let mut changes = Vec::new();
        for &b in blocks {
            if b >= nblocks {
                return Err(Error::Invalid(format!(
                    "block {b} is past the end of the disk"
                )));
            }
            changes.push((self.geo.payload_index(b), bat_entry(new_state, 0)));
        }
        let mut meta = lock(&self.meta);
        self.begin_session_locked(&mut meta, true)?;
        let old: Vec<u64> = {
            let bat = self.bat.read().unwrap();
            changes.iter().map(|&(i, _)| bat[i as usize]).collect()
        };
        self.commit_bat(&mut meta, &changes)?;
        self.flush_all(&mut meta)?;
        for e in old {
            let s = bat_state(e);
            if s == PAYLOAD_FULLY_PRESENT || s == PAYLOAD_PARTIALLY_PRESENT {
                self.file
                    .punch_hole(bat_offset(e), u64::from(self.geo.block_size))?;
            }
        }
        Ok(())
    }

    /// Moves blocks down into holes and truncates the file. Needs exclusive access (no I/O
    /// may run concurrently, which `&mut self` guarantees). Each move is copied, flushed and
    /// committed through the log before its old space can be reused.
    pub fn compact(&mut self) -> Result<CompactStats> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut meta = lock(&self.meta);
        self.begin_session_locked(&mut meta, false)?;
        // Zero/unmapped entries may still name file space (other writers reuse it); that
        // space is about to be handed to moved blocks, so forget it first.
        let stale: Vec<(u64, u64)> = {
            let bat = self.bat.read().unwrap();
            let cr = self.geo.chunk_ratio();
            bat.iter()
                .enumerate()
                .filter(|&(i, &e)| {
                    let s = bat_state(e);
                    !(i as u64 + 1).is_multiple_of(cr + 1)
                        && bat_offset(e) != 0
                        && s != PAYLOAD_FULLY_PRESENT
                        && s != PAYLOAD_PARTIALLY_PRESENT
                })
                .map(|(i, &e)| (i as u64, bat_entry(bat_state(e), 0)))
                .collect()
        };
        self.commit_bat(&mut meta, &stale)?;
        self.flush_all(&mut meta)?;
        let old_file_size = self.file.file_len()?;
        let mut fixed: Vec<(u64, u64)> = vec![
            (0, MIB),
            (meta.header.log_offset, u64::from(meta.header.log_length)),
        ];
        for r in &meta.regions {
            fixed.push((r.file_offset, u64::from(r.length)));
        }
        fixed.sort_unstable();
        let bs = u64::from(self.geo.block_size);
        let mut blocks: Vec<(u64, u64, u64)> = Vec::new(); // (offset, len, bat index)
        {
            let bat = self.bat.read().unwrap();
            let cr = self.geo.chunk_ratio();
            for (i, &e) in bat.iter().enumerate() {
                let i = i as u64;
                let is_bitmap = (i + 1).is_multiple_of(cr + 1);
                let s = bat_state(e);
                if is_bitmap {
                    if self.geo.has_parent && s == SB_PRESENT {
                        blocks.push((bat_offset(e), SECTOR_BITMAP_BLOCK_SIZE, i));
                    }
                } else if s == PAYLOAD_FULLY_PRESENT || s == PAYLOAD_PARTIALLY_PRESENT {
                    blocks.push((bat_offset(e), bs, i));
                }
            }
        }
        blocks.sort_unstable();
        let mut cursor = MIB;
        let mut moved = 0;
        let skip_fixed = |mut c: u64, len: u64| loop {
            match fixed.iter().find(|&&(o, l)| c < o + l && c + len > o) {
                Some(&(o, l)) => c = (o + l).div_ceil(MIB) * MIB,
                None => return c,
            }
        };
        let mut buf = vec![0u8; MIB as usize];
        let mut end = fixed.iter().map(|&(o, l)| o + l).max().unwrap_or(MIB);
        for &(off, len, idx) in &blocks {
            cursor = skip_fixed(cursor, len);
            if cursor + len <= off {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(MIB) as usize;
                    self.file.read_at(&mut buf[..n], off + done)?;
                    self.file.write_at(&buf[..n], cursor + done)?;
                    done += n as u64;
                }
                let e = self.bat.read().unwrap()[idx as usize];
                self.commit_bat(&mut meta, &[(idx, bat_entry(bat_state(e), cursor))])?;
                // The old location may be reused by the next move: commit durably first.
                self.flush_all(&mut meta)?;
                moved += 1;
                end = end.max(cursor + len);
                cursor += len;
            } else {
                end = end.max(off + len);
                cursor = cursor.max(off + len);
            }
        }
        if end < old_file_size {
            self.file.set_len(end)?;
            self.file.sync()?;
        }
        meta.alloc_end = end.div_ceil(MIB) * MIB;
        Ok(CompactStats {
            old_file_size,
            new_file_size: self.file.file_len()?,
            blocks_moved: moved,
        })
    }
}

/// Merges a differencing disk into its immediate parent: every sector the child holds is
/// written to the parent (opened read-write), and the child's zeroed blocks are unmapped in
/// the parent. Afterwards the child (and any other child of the parent) is stale; the caller
/// deletes it. Returns the parent's path.
pub fn merge_into_parent(child: impl AsRef<Path>) -> Result<std::path::PathBuf> {
    // Open with the chain once to find (and check) the parent, then without it so that no
    // read-only handle of the parent stays open while it is opened for writing.
    let pp = Vhdx::open(child.as_ref(), true)?
        .parent_path
        .clone()
        .ok_or_else(|| Error::Invalid("not a differencing disk".into()))?;
    let c = Vhdx::open_without_parent(child.as_ref())?;
    let geo = c.geo;
    let size = c.size();
    let parent = Vhdx::open(&pp, false)?;
    let bs = u64::from(geo.block_size);
    let lss = u64::from(geo.logical_sector_size);
    let psize = parent.size();
    let mut buf = vec![0u8; bs as usize];
    for b in 0..geo.data_blocks(size) {
        let start = b * bs;
        let end = (start + bs).min(size).min(psize);
        if start >= end {
            break;
        }
        let e = c.bat.read().unwrap()[geo.payload_index(b) as usize];
        let len = (end - start) as usize;
        match bat_state(e) {
            PAYLOAD_FULLY_PRESENT => {
                c.read_at(&mut buf[..len], start)?;
                parent.write_at(&buf[..len], start)?;
            }
            PAYLOAD_PARTIALLY_PRESENT => {
                let sb = c.bat.read().unwrap()[geo.bitmap_index(b / geo.chunk_ratio()) as usize];
                let bit0 = (b % geo.chunk_ratio()) * geo.sectors_per_block();
                let nbits = len as u64 / lss;
                let mut bits = vec![0u8; nbits.div_ceil(8) as usize + 1];
                c.file.read_at(&mut bits, bat_offset(sb) + bit0 / 8)?;
                // Straight from the child's file: only the present sectors are used.
                c.file.read_at(&mut buf[..len], bat_offset(e))?;
                let mut i = 0;
                while i < nbits {
                    let present = |k: u64| bits[(k / 8) as usize] >> (k % 8) & 1 == 1;
                    if !present(i) {
                        i += 1;
                        continue;
                    }
                    let mut j = i;
                    while j < nbits && present(j) {
                        j += 1;
                    }
                    let r = (i * lss) as usize..(j * lss) as usize;
                    parent.write_at(&buf[r], start + i * lss)?;
                    i = j;
                }
            }
            PAYLOAD_ZERO | PAYLOAD_UNMAPPED | PAYLOAD_UNMAPPED_OLD | PAYLOAD_UNDEFINED => {
                parent.unmap(start, end - start)?;
            }
            _ => {}
        }
    }
    parent.flush()?;
    parent.close()?;
    Ok(pp)
}

/// Points a differencing disk at a (moved or replaced) parent, like `Set-VHD -ParentPath`:
/// rewrites the parent locator with the new relative and absolute paths. The parent's
/// DataWriteGuid must match the child's linkage unless `ignore_id_mismatch` (then the linkage
/// is set to the new parent's). Refuses parents whose own chain contains the child.
pub fn set_parent(
    child: impl AsRef<Path>,
    parent: impl AsRef<Path>,
    ignore_id_mismatch: bool,
) -> Result<()> {
    let child = child.as_ref();
    let parent_path = parent.as_ref();
    let c = Vhdx::open_in_chain(child, false, &mut Vec::new(), false)?;
    if !c.geo.has_parent {
        return Err(Error::Invalid(format!(
            "{}: not a differencing disk",
            child.display()
        )));
    }
    let p = Vhdx::open(parent_path, true)?;
    let canon_child = child
        .canonicalize()
        .map_err(|e| super::backing::io_err(child, "open", e))?;
    let mut link = Some(&p);
    while let Some(l) = link {
        if l.path().canonicalize().ok().as_ref() == Some(&canon_child) {
            return Err(Error::Invalid(format!(
                "{} is in the parent's chain: that would make a loop",
                child.display()
            )));
        }
        link = l.parent().map(|a| &**a);
    }
    if p.geo.logical_sector_size != c.geo.logical_sector_size || p.size() != c.size() {
        return Err(Error::Invalid(
            "the new parent's size or sector size differs from the child's".into(),
        ));
    }
    let linkage = c
        .locator
        .as_ref()
        .and_then(|l| l.get("parent_linkage"))
        .and_then(parse_braced_guid);
    if linkage != Some(p.data_write_guid()) && !ignore_id_mismatch {
        return Err(Error::Invalid(format!(
            "{} has DataWriteGuid {} but {} links to {}; the parent changed or is another disk",
            parent_path.display(),
            guid_braced(&p.data_write_guid()),
            child.display(),
            linkage.map(|g| guid_braced(&g)).unwrap_or_default()
        )));
    }
    let bytes = super::create::make_locator(child, parent_path, &p)?;
    c.replace_locator(&bytes)?;
    c.close()
}

impl Vhdx {
    /// The metadata table of the region at `region`, as it is in the file now.
    fn metadata_table(&self, region: u64) -> Result<Vec<MetadataEntry>> {
        let t = self
            .file
            .read_struct(region, METADATA_TABLE_SIZE, "metadata table")?;
        parse_metadata_table(&t).map_err(|e| self.file.corrupt("metadata table", region, e))
    }

    /// The index of item `id` in `entries`, or a corruption error saying `missing`.
    fn metadata_item(
        &self,
        entries: &[MetadataEntry],
        region: u64,
        id: Uuid,
        missing: &str,
    ) -> Result<usize> {
        entries
            .iter()
            .position(|e| e.item_id == id)
            .ok_or_else(|| self.file.corrupt("metadata table", region, missing))
    }

    fn replace_locator(&self, bytes: &[u8]) -> Result<()> {
        let mut meta = lock(&self.meta);
        self.begin_session_locked(&mut meta, true)?;
        let region = meta.metadata_offset;
        let entries = self.metadata_table(region)?;
        let i = self.metadata_item(&entries, region, ITEM_PARENT_LOCATOR, "no parent locator")?;
        let old = entries[i];
        let offset = if bytes.len() as u32 <= old.length {
            old.offset
        } else {
            let end = entries
                .iter()
                .map(|e| e.offset + e.length)
                .max()
                .unwrap_or(METADATA_TABLE_SIZE as u32);
            end.div_ceil(8) * 8
        };
        if u64::from(offset) + bytes.len() as u64 > meta.metadata_length {
            return Err(Error::Invalid("no room for the parent locator".into()));
        }
        let mut entry = [0u8; 8];
        put32(&mut entry, 0, offset);
        put32(&mut entry, 4, bytes.len() as u32);
        // The item first, then the table entry that points at it.
        self.meta_log_patch(&mut meta, region + u64::from(offset), bytes)?;
        self.meta_log_patch(&mut meta, region + 32 + 32 * i as u64 + 16, &entry)
    }
}

impl Vhdx {
    /// Gives the disk a new Page 83 identifier (`Set-VHD -ResetDiskIdentifier`), written
    /// through the log like every metadata update. The FileWriteGuid changes; the
    /// DataWriteGuid does not (the disk's contents are unchanged, so children stay linked).
    pub fn set_disk_id(&mut self, id: Uuid) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut meta = lock(&self.meta);
        self.begin_session_locked(&mut meta, false)?;
        let region = meta.metadata_offset;
        let entries = self.metadata_table(region)?;
        let item = entries[self.metadata_item(&entries, region, ITEM_PAGE83, "no page 83 item")?];
        // Checked on open: the item lies inside the region and holds at least 16 bytes.
        if item.length < 16 || u64::from(item.offset) + 16 > meta.metadata_length {
            return Err(self.file.corrupt(
                "page 83 data",
                region + u64::from(item.offset),
                "item does not fit the metadata region",
            ));
        }
        let off = region + u64::from(item.offset);
        self.meta_log_patch(&mut meta, off, &id.to_bytes_le())?;
        drop(meta);
        self.disk_id = id;
        Ok(())
    }
}
