//! Whole-file operations on a VHD: resize, re-parenting, disk id, structural check, compaction.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use uuid::Uuid;

use super::format::*;
use super::{io_err, locator_strings, parent_mtime, Sparse, Vhd, VhdOpenOptions};
use crate::{Disk, Error, Result};

/// Smallest offset >= `x` at which a block's data (after its bitmap) is 4 KiB aligned.
fn align_block(x: u64, bitmap: u64) -> u64 {
    let m = (x + bitmap) % 4096;
    if m == 0 {
        x
    } else {
        x + 4096 - m
    }
}

impl Vhd {
    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io_err(&self.path, "fsync"))
    }

    fn footer_offset(&self) -> u64 {
        match &self.sparse {
            Some(s) => s.alloc.lock().unwrap().footer_offset,
            None => self.footer.current_size,
        }
    }

    /// Writes the footer at the end (and its copy at offset 0 for dynamic disks), then syncs.
    fn write_footers(&self) -> Result<()> {
        self.write_footer_at(self.footer_offset())?;
        if self.sparse.is_some() {
            self.write_footer_at(0)?;
        }
        self.sync()
    }

    fn write_header(&self, s: &Sparse) -> Result<()> {
        self.file
            .write_all_at(&s.header.to_bytes(), self.footer.data_offset)
            .map_err(io_err(&self.path, "write header"))?;
        self.sync()
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Changes the virtual size. Growing reads zeros in the new area; shrinking drops the data
    /// past the new end. The BAT moves to the end of the file when it has no room.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.writable()?;
        if new_size == 0 || !new_size.is_multiple_of(SECTOR) || new_size > MAX_SIZE {
            return Err(Error::Invalid(format!(
                "size {new_size} must be a non-zero multiple of 512 up to 2040 GiB"
            )));
        }
        let old = self.footer.current_size;
        if new_size == old {
            return Ok(());
        }
        if self.sparse.is_none() {
            self.write_footer_at_size(new_size)?;
            if new_size > old {
                super::write_zeros(&self.file, &self.path, old, FOOTER_SIZE as u64)?;
            }
            self.file
                .set_len(new_size + FOOTER_SIZE as u64)
                .map_err(io_err(&self.path, "truncate"))?;
            self.footer.current_size = new_size;
            self.footer.geometry = Geometry::for_size(new_size);
            return self.write_footers();
        }
        self.flush()?;
        let s = self.sparse.as_ref().unwrap();
        let bs = s.block_size;
        // Growing: the tail of a partial last block must read as zeros (or the parent).
        if new_size > old && !old.is_multiple_of(bs) {
            let tail = (old.next_multiple_of(bs)).min(new_size) - old;
            let blk = (old / bs) as usize;
            let e = s.bat[blk].load(Ordering::Acquire);
            if e != UNALLOCATED {
                if self.footer.disk_type == DiskType::Differencing {
                    self.update_bitmap(s, e, (old % bs) / SECTOR, tail / SECTOR, false)?;
                } else {
                    let data = e as u64 * SECTOR + s.bitmap_size;
                    super::write_zeros(&self.file, &self.path, data + old % bs, tail)?;
                }
            }
        }
        let new_entries = new_size.div_ceil(bs);
        let s = self.sparse.as_mut().unwrap();
        let cur = s.bat.len() as u64;
        if new_entries > s.header.max_table_entries as u64 {
            // Move the BAT to the end of the file.
            let mut a = s.alloc.lock().unwrap();
            let new_to = a.footer_offset;
            let bytes = (new_entries * 4).next_multiple_of(SECTOR);
            let mut b = vec![0xFFu8; bytes as usize];
            for (i, e) in s.bat.iter().enumerate() {
                b[4 * i..4 * i + 4].copy_from_slice(&e.load(Ordering::Acquire).to_be_bytes());
            }
            self.file
                .write_all_at(&b, new_to)
                .map_err(io_err(&self.path, "write BAT"))?;
            a.footer_offset = new_to + bytes;
            self.file
                .write_all_at(&self.footer.to_bytes(), a.footer_offset)
                .map_err(io_err(&self.path, "write footer"))?;
            drop(a);
            self.file.sync_data().map_err(io_err(&self.path, "fsync"))?;
            s.header.table_offset = new_to;
            s.header.max_table_entries =
                u32::try_from(new_entries).map_err(|_| Error::Invalid("too many blocks".into()))?;
            let s = self.sparse.as_ref().unwrap();
            self.write_header(s)?;
        } else if new_entries != cur {
            // Entries entering or leaving the table become "unallocated" on disk.
            let (from, to) = (cur.min(new_entries), cur.max(new_entries));
            let b = vec![0xFFu8; ((to - from) * 4) as usize];
            self.file
                .write_all_at(&b, s.header.table_offset + from * 4)
                .map_err(io_err(&self.path, "write BAT"))?;
            self.sync()?;
        }
        let s = self.sparse.as_mut().unwrap();
        s.bat.truncate(new_entries as usize);
        while (s.bat.len() as u64) < new_entries {
            s.bat.push(AtomicU32::new(UNALLOCATED));
        }
        s.alloc
            .lock()
            .unwrap()
            .dirty
            .retain(|&i| (i as u64) < new_entries);
        self.footer.current_size = new_size;
        self.footer.geometry = Geometry::for_size(new_size);
        self.write_footers()
    }

    fn write_footer_at_size(&self, size: u64) -> Result<()> {
        let mut f = self.footer.clone();
        f.current_size = size;
        f.geometry = Geometry::for_size(size);
        self.file
            .write_all_at(&f.to_bytes(), size)
            .map_err(io_err(&self.path, "write footer"))
    }

    /// Gives the disk a new UniqueId (children of this disk then no longer match it).
    pub fn set_unique_id(&mut self, id: Uuid) -> Result<()> {
        self.writable()?;
        self.flush()?;
        self.footer.unique_id = id;
        self.write_footers()
    }

    /// Points a differencing disk at a (moved) parent. The parent's UniqueId must match unless
    /// `ignore_id_mismatch`, in which case the child adopts it.
    pub fn set_parent(&mut self, parent: &Path, ignore_id_mismatch: bool) -> Result<()> {
        self.writable()?;
        if self.footer.disk_type != DiskType::Differencing {
            return Err(Error::Invalid(format!(
                "{}: not a differencing disk",
                self.path.display()
            )));
        }
        let p = Vhd::open(
            parent,
            &VhdOpenOptions {
                read_only: true,
                no_parent: false,
            },
        )?;
        self.flush()?;
        let s = self.sparse.as_mut().unwrap();
        if p.footer.unique_id != s.header.parent_unique_id && !ignore_id_mismatch {
            return Err(Error::Invalid(format!(
                "{}: unique id {} does not match the id {} that {} expects",
                parent.display(),
                p.footer.unique_id,
                s.header.parent_unique_id,
                self.path.display()
            )));
        }
        let (abs, rel) = locator_strings(&self.path, parent)?;
        let mut a = s.alloc.lock().unwrap();
        let mut next = a.footer_offset;
        for l in s.header.locators.iter_mut() {
            if l.platform == PLATFORM_W2RU || l.platform == PLATFORM_W2KU {
                *l = Locator::default();
            }
        }
        let free: Vec<usize> = (0..8)
            .filter(|&i| s.header.locators[i].platform == 0)
            .take(2)
            .collect();
        if free.len() < 2 {
            return Err(Error::Invalid("no free parent locator entries".into()));
        }
        for (slot, (code, text)) in free
            .into_iter()
            .zip([(PLATFORM_W2RU, rel), (PLATFORM_W2KU, abs.clone())])
        {
            let data = utf16le(&text);
            let space = (data.len() as u64).next_multiple_of(SECTOR).max(SECTOR);
            let mut padded = data.clone();
            padded.resize(space as usize, 0);
            self.file
                .write_all_at(&padded, next)
                .map_err(io_err(&self.path, "write locator"))?;
            s.header.locators[slot] = Locator {
                platform: code,
                data_space: (space / SECTOR) as u32,
                data_length: data.len() as u32,
                data_offset: next,
            };
            next += space;
        }
        a.footer_offset = next;
        drop(a);
        self.file
            .write_all_at(&self.footer.to_bytes(), next)
            .map_err(io_err(&self.path, "write footer"))?;
        self.file.sync_data().map_err(io_err(&self.path, "fsync"))?;
        s.header.parent_unique_id = p.footer.unique_id;
        s.header.parent_timestamp = parent_mtime(parent);
        s.header.parent_name = abs;
        s.parent = Some(Box::new(p));
        s.parent_path = Some(parent.to_path_buf());
        let s = self.sparse.as_ref().unwrap();
        self.write_header(s)
    }

    /// A full structural check beyond what opening verifies: the footer copy, locator ranges,
    /// block placement, and the parent chain. Returns the problems found (empty = healthy).
    pub fn check(&self) -> Vec<String> {
        let mut problems: Vec<String> = self.warnings.clone();
        let file_len = match self.file.metadata() {
            Ok(m) => m.len(),
            Err(e) => return vec![format!("{}: stat: {e}", self.path.display())],
        };
        let Some(s) = &self.sparse else {
            if file_len != self.footer.current_size + FOOTER_SIZE as u64 {
                problems.push(format!(
                    "file is {file_len} bytes, expected {} for a fixed disk",
                    self.footer.current_size + FOOTER_SIZE as u64
                ));
            }
            return problems;
        };
        let mut b = [0u8; FOOTER_SIZE];
        match self.file.read_exact_at(&mut b, 0) {
            Ok(()) => match Footer::parse(&b) {
                Ok(f) if f == self.footer => {}
                Ok(_) => problems.push("footer copy at offset 0 differs from the footer".into()),
                Err(e) => problems.push(format!("footer copy at offset 0: {e}")),
            },
            Err(e) => problems.push(format!("footer copy at offset 0: {e}")),
        }
        let bb = s.bitmap_size + s.block_size;
        let blocks = self.allocated_block_offsets();
        if self.footer.disk_type == DiskType::Differencing {
            for (i, l) in s.header.locators.iter().enumerate() {
                if l.platform == 0 {
                    continue;
                }
                let (ls, le) = (
                    l.data_offset,
                    l.data_offset.saturating_add(l.data_length as u64),
                );
                if le > file_len {
                    problems.push(format!("parent locator {i} lies outside the file"));
                }
                if let Some((bi, _)) = blocks.iter().find(|&&(_, o)| o < le && ls < o + bb) {
                    problems.push(format!("parent locator {i} overlaps block {bi}"));
                }
            }
            match &s.parent {
                Some(p) => {
                    for pr in p.check() {
                        problems.push(format!("parent {}: {pr}", p.path.display()));
                    }
                }
                None => problems.push("parent not opened".into()),
            }
        }
        problems
    }

    /// Frees blocks that hold only zeros (dynamic) or no sectors (differencing), then moves the
    /// last blocks into the holes and truncates the file. Each move is made durable before the
    /// BAT points at it. `progress(done, total)` is called as blocks are examined and moved.
    /// Returns the file size before and after.
    pub fn compact(&mut self, progress: &mut dyn FnMut(u64, u64)) -> Result<(u64, u64)> {
        self.writable()?;
        let before = self
            .file
            .metadata()
            .map_err(io_err(&self.path, "stat"))?
            .len();
        let Some(s) = &self.sparse else {
            return Ok((before, before));
        };
        self.flush()?;
        let bb = s.bitmap_size + s.block_size;
        let blocks = self.allocated_block_offsets();
        let total = blocks.len() as u64 * 2;
        let mut buf = vec![0u8; s.block_size as usize];
        for (n, &(i, off)) in blocks.iter().enumerate() {
            let empty = if self.footer.disk_type == DiskType::Differencing {
                let mut bm = vec![0u8; s.bitmap_size as usize];
                self.pread(&mut bm, off)?;
                bm.iter().all(|&x| x == 0)
            } else {
                self.pread(&mut buf, off + s.bitmap_size)?;
                buf.iter().all(|&x| x == 0)
            };
            if empty {
                s.bat[i as usize].store(UNALLOCATED, Ordering::Release);
                s.alloc.lock().unwrap().dirty.insert(i as u32);
            }
            progress(n as u64, total);
        }
        self.flush()?;
        // Where metadata ends: header, BAT, locators.
        let mut meta_end = (self.footer.data_offset + DYN_HEADER_SIZE as u64)
            .max(s.header.table_offset + s.header.max_table_entries as u64 * 4);
        for l in &s.header.locators {
            if l.platform != 0 {
                meta_end = meta_end
                    .max(l.data_offset + (l.data_space as u64 * SECTOR).max(l.data_length as u64));
            }
        }
        let meta_end = meta_end.next_multiple_of(SECTOR);
        let mut live: VecDeque<(u64, u64)> = self
            .allocated_block_offsets()
            .into_iter()
            .map(|(i, o)| (o, i))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut p = align_block(meta_end, s.bitmap_size);
        let mut end = meta_end;
        let mut chunk = vec![0u8; (bb as usize).min(4 << 20)];
        let mut moved = 0u64;
        while let Some(&(front, _)) = live.front() {
            if front < p + bb {
                end = end.max(front + bb);
                p = align_block(p.max(front + bb), s.bitmap_size);
                live.pop_front();
                continue;
            }
            let (src, idx) = live.pop_back().unwrap();
            let mut done = 0;
            while done < bb {
                let n = (bb - done).min(chunk.len() as u64) as usize;
                self.pread(&mut chunk[..n], src + done)?;
                self.pwrite(&chunk[..n], p + done)?;
                done += n as u64;
            }
            self.sync()?;
            s.bat[idx as usize].store((p / SECTOR) as u32, Ordering::Release);
            s.alloc.lock().unwrap().dirty.insert(idx as u32);
            self.flush()?;
            end = end.max(p + bb);
            p = align_block(p + bb, s.bitmap_size);
            moved += 1;
            progress(blocks.len() as u64 + moved, total);
        }
        let new_footer = end.next_multiple_of(SECTOR);
        s.alloc.lock().unwrap().footer_offset = new_footer;
        self.write_footer_at(new_footer)?;
        self.sync()?;
        self.file
            .set_len(new_footer + FOOTER_SIZE as u64)
            .map_err(io_err(&self.path, "truncate"))?;
        self.sync()?;
        progress(total, total);
        Ok((before, new_footer + FOOTER_SIZE as u64))
    }
}
