//! VHDX (MS-VHDX v1): open, validate, read, write, create, differencing chains, resize and
//! compaction.
//!
//! Concurrency: [`Vhdx`] implements [`Disk`] with `&self` methods. Reads and writes to allocated
//! blocks take only a read lock on the in-memory BAT and do positional I/O. Block allocation, BAT
//! updates (through the log) and header updates are serialized by one metadata mutex; sector
//! bitmap read-modify-writes by a small bitmap mutex.

mod alloc;
mod backing;
mod create;
pub mod format;
mod io;
pub mod log;
mod ops;

pub use create::VhdxBuilder;
pub use ops::{merge_into_parent, set_parent, CompactStats, Reclaim, ShrinkPolicy};

use backing::Backing;
use format::*;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use uuid::Uuid;

use crate::{Disk, Error, Result};

/// The deepest differencing chain [`Vhdx::open`] follows.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// The kind of VHDX file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VhdxKind {
    /// LeaveBlocksAllocated set: every block allocated at creation.
    Fixed,
    Dynamic,
    Differencing,
}

/// A summary of an open VHDX file (for `Get-VHD`-like output).
#[derive(Clone, Debug)]
pub struct VhdxInfo {
    pub path: PathBuf,
    pub kind: VhdxKind,
    pub virtual_size: u64,
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Page 83 disk identifier.
    pub disk_id: Uuid,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    /// Bytes the image file occupies (its length).
    pub file_size: u64,
    /// Payload blocks in FULLY_PRESENT or PARTIALLY_PRESENT state.
    pub allocated_blocks: u64,
    /// Total payload blocks (ceil(virtual size / block size)).
    pub data_blocks: u64,
    /// Parent locator key/value pairs (differencing disks).
    pub parent_locator: Vec<(String, String)>,
    /// The parent file actually opened (differencing disks).
    pub parent_path: Option<PathBuf>,
    /// Whether a pending log was replayed on open (in memory for read-only opens).
    pub log_replayed: bool,
}

struct Meta {
    header: Header,
    current_slot: usize,
    regions: Vec<RegionEntry>,
    bat_offset: u64,
    bat_length: u64,
    metadata_offset: u64,
    metadata_length: u64,
    /// File offset of the virtual disk size item.
    vsize_item_offset: u64,
    log_head: u64,
    log_seq: u64,
    /// Log offset of the first entry whose in-place writes are not yet flushed.
    log_tail: Option<u64>,
    /// BAT sectors (index within the BAT) changed in memory but not yet logged.
    dirty_bat: std::collections::BTreeSet<u64>,
    /// Where the next block is allocated (1 MiB aligned, at or past the end of the file).
    alloc_end: u64,
    file_guid_changed: bool,
    data_guid_changed: bool,
    closed: bool,
}

/// An open VHDX file.
pub struct Vhdx {
    file: Backing,
    read_only: bool,
    geo: Geometry,
    physical_sector_size: u32,
    leave_allocated: bool,
    disk_id: Uuid,
    locator: Option<ParentLocator>,
    parent: Option<Arc<Vhdx>>,
    parent_path: Option<PathBuf>,
    log_replayed: bool,
    virtual_size: AtomicU64,
    bat: RwLock<Vec<u64>>,
    meta: Mutex<Meta>,
    session_started: AtomicBool,
    bitmap_lock: Mutex<()>,
}

/// Whether `path` starts with the VHDX file identifier.
pub fn is_vhdx_file(path: impl AsRef<Path>) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let path = path.as_ref();
    let f = std::fs::File::open(path).map_err(|e| backing::io_err(path, "open", e))?;
    let mut sig = [0u8; 8];
    match f.read_exact_at(&mut sig, 0) {
        Ok(()) => Ok(&sig == b"vhdxfile"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(backing::io_err(path, "read", e)),
    }
}

use support::lock;

impl Vhdx {
    /// Opens a VHDX file (and, for a differencing disk, its parent chain, read-only). A pending
    /// log is replayed: into the file for read-write opens, in memory for read-only opens.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Vhdx> {
        let mut chain = Vec::new();
        Self::open_in_chain(path.as_ref(), read_only, &mut chain, true)
    }

    /// Opens a file read-only without following its parent locator: for inspecting (and
    /// repairing with [`set_parent`]) a differencing disk whose parent is missing. Reads of
    /// sectors that come from the parent fail with [`Error::Invalid`].
    pub fn open_without_parent(path: impl AsRef<Path>) -> Result<Vhdx> {
        Self::open_in_chain(path.as_ref(), true, &mut Vec::new(), false)
    }

    /// Opens `path` read-only the way a child's chain opens its parent.
    pub(crate) fn open_as_parent(path: &Path) -> Result<Vhdx> {
        // A placeholder first link marks this open as a parent's; it matches no real path.
        Self::open_in_chain(path, true, &mut vec![PathBuf::new()], true)
    }

    fn open_in_chain(
        path: &Path,
        read_only: bool,
        chain: &mut Vec<PathBuf>,
        with_parent: bool,
    ) -> Result<Vhdx> {
        let canon = path
            .canonicalize()
            .map_err(|e| backing::io_err(path, "open", e))?;
        if chain.contains(&canon) {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                structure: "parent locator",
                offset: 0,
                problem: format!(
                    "differencing chain loops back to {} (chain: {})",
                    canon.display(),
                    chain
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" -> ")
                ),
            });
        }
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                structure: "parent locator",
                offset: 0,
                problem: format!("differencing chain deeper than {MAX_CHAIN_DEPTH}"),
            });
        }
        let is_parent = !chain.is_empty();
        chain.push(canon);
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| backing::io_err(path, "open", e))?;
        // Advisory locks between our own handles and processes: one writer, or any number of
        // readers. A top-level read-only open of a file in use still proceeds (inspection);
        // a parent in use for writing does not (its data would change under the child).
        use crate::lock_file;
        use rustix::fs::FlockOperation;
        if !read_only {
            lock_file(&file, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
                backing::io_err(path, "lock for writing (the file is in use)", e.into())
            })?;
        } else if is_parent {
            lock_file(&file, FlockOperation::NonBlockingLockShared).map_err(|e| {
                backing::io_err(path, "lock parent (it is open for writing)", e.into())
            })?;
        } else {
            // A top-level read-only open proceeds even while a writer holds the file.
            let _ = rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared);
        }
        let backing = Backing::new(path, file)?;
        Self::parse(backing, read_only, chain, with_parent)
    }

    fn parse(
        mut f: Backing,
        read_only: bool,
        chain: &mut Vec<PathBuf>,
        with_parent: bool,
    ) -> Result<Vhdx> {
        let file_len = f.view_len;
        // File identifier.
        let id = f.read_struct(FILE_ID_OFFSET, 8, "file identifier")?;
        if &id[..] != b"vhdxfile" {
            return Err(f.corrupt(
                "file identifier",
                0,
                "not a VHDX file (signature is not \"vhdxfile\")",
            ));
        }
        if file_len < REGION_TABLE_OFFSETS[1] + REGION_TABLE_SIZE as u64 {
            return Err(f.corrupt(
                "file identifier",
                0,
                format!("file is {file_len} bytes, too short for the VHDX headers"),
            ));
        }

        // Headers.
        let mut headers = [None, None];
        let mut header_err = String::new();
        for (i, &off) in HEADER_OFFSETS.iter().enumerate() {
            let b = f.read_struct(off, HEADER_SIZE, "header")?;
            match Header::parse(&b) {
                Ok(h) => headers[i] = Some(h),
                Err(e) => {
                    header_err.push_str(&format!("header {}: {e}; ", i + 1));
                }
            }
        }
        let (current_slot, header) = match (&headers[0], &headers[1]) {
            (Some(a), Some(b)) => {
                if b.sequence_number > a.sequence_number {
                    (1, b.clone())
                } else {
                    (0, a.clone())
                }
            }
            (Some(a), None) => (0, a.clone()),
            (None, Some(b)) => (1, b.clone()),
            (None, None) => {
                return Err(f.corrupt(
                    "header",
                    HEADER_OFFSETS[0],
                    format!("no valid header: {}", header_err.trim_end_matches("; ")),
                ))
            }
        };
        let log_offset = header.log_offset;
        let log_length = u64::from(header.log_length);

        // Log replay.
        let mut log_replayed = false;
        let mut meta_header = header.clone();
        let mut meta_slot = current_slot;
        if !header.log_guid.is_nil() {
            if log_length > log::MAX_REPLAY_LOG {
                return Err(f.corrupt(
                    "log",
                    log_offset,
                    format!("log of {log_length} bytes needs replay; larger than supported"),
                ));
            }
            let logbuf = f.read_struct(log_offset, log_length as usize, "log")?;
            if let Some(plan) = log::find_replay(&logbuf, &header.log_guid) {
                if plan.flushed_file_offset > file_len {
                    return Err(f.corrupt(
                        "log",
                        log_offset,
                        format!(
                            "file is {file_len} bytes but the log says {} bytes were flushed: truncated",
                            plan.flushed_file_offset
                        ),
                    ));
                }
                if plan.last_file_offset > (1 << 47) {
                    return Err(f.corrupt(
                        "log",
                        log_offset,
                        format!("absurd LastFileOffset {:#x}", plan.last_file_offset),
                    ));
                }
                let limit = file_len.max(plan.last_file_offset);
                for w in &plan.writes {
                    let (o, l) = w.range();
                    let end = o.saturating_add(l);
                    if o < MIB {
                        return Err(f.corrupt(
                            "log",
                            log_offset,
                            format!("log entry writes into the header area at {o:#x}"),
                        ));
                    }
                    if o < log_offset + log_length && end > log_offset {
                        return Err(f.corrupt(
                            "log",
                            log_offset,
                            format!("log entry writes into the log itself at {o:#x}"),
                        ));
                    }
                    if end > limit {
                        return Err(f.corrupt(
                            "log",
                            log_offset,
                            format!("log entry writes past the end of the file at {o:#x}+{l:#x}"),
                        ));
                    }
                }
                log_replayed = true;
                if read_only {
                    f.set_patches(plan.writes, plan.last_file_offset);
                } else {
                    // New FileWriteGuid before the first write (the replay), keeping the log
                    // GUID so a crash during the replay replays again.
                    let mut meta = HeaderWriter {
                        header: meta_header.clone(),
                        slot: meta_slot,
                    };
                    meta.update(&f, |h| h.file_write_guid = Uuid::new_v4())?;
                    for w in &plan.writes {
                        match w {
                            log::LogWrite::Data { offset, data } => f.write_at(data, *offset)?,
                            log::LogWrite::Zero { offset, len } => {
                                let cur = f.file_len()?;
                                let end = (offset + len).min(cur);
                                if end > *offset {
                                    f.write_zeros(*offset, end - offset)?;
                                }
                            }
                        }
                    }
                    if f.file_len()? < plan.last_file_offset {
                        f.set_len(plan.last_file_offset)?;
                    }
                    f.sync()?;
                    meta.update(&f, |h| h.log_guid = Uuid::nil())?;
                    meta_header = meta.header;
                    meta_slot = meta.slot;
                    f.view_len = f.file_len()?;
                }
            } else if !read_only {
                // Nothing valid to replay: just clear the log GUID.
                let mut meta = HeaderWriter {
                    header: meta_header.clone(),
                    slot: meta_slot,
                };
                meta.update(&f, |h| {
                    h.file_write_guid = Uuid::new_v4();
                    h.log_guid = Uuid::nil();
                })?;
                meta_header = meta.header;
                meta_slot = meta.slot;
            }
        }
        let file_len = f.view_len;

        // Region tables: table 1, else table 2.
        let mut regions = None;
        let mut region_err = String::new();
        for (i, &off) in REGION_TABLE_OFFSETS.iter().enumerate() {
            let b = f.read_struct(off, REGION_TABLE_SIZE, "region table")?;
            match parse_region_table(&b)
                .and_then(|r| check_regions(&r, log_offset, log_length, file_len).map(|x| (r, x)))
            {
                Ok(r) => {
                    regions = Some(r);
                    break;
                }
                Err(e) => region_err.push_str(&format!("region table {}: {e}; ", i + 1)),
            }
        }
        let Some((regions, (bat_region, meta_region))) = regions else {
            return Err(f.corrupt(
                "region table",
                REGION_TABLE_OFFSETS[0],
                region_err.trim_end_matches("; ").to_string(),
            ));
        };

        // Metadata.
        let md = parse_metadata(&f, meta_region.file_offset, u64::from(meta_region.length))?;
        let geo = Geometry {
            block_size: md.block_size,
            logical_sector_size: md.logical_sector_size,
            has_parent: md.has_parent,
        };

        // BAT.
        let entries = geo.bat_entries(md.virtual_size);
        let bat_off = bat_region.file_offset;
        if entries * 8 > u64::from(bat_region.length) {
            return Err(f.corrupt(
                "BAT",
                bat_off,
                format!(
                    "region is {} bytes but {entries} entries ({} bytes) are needed",
                    bat_region.length,
                    entries * 8
                ),
            ));
        }
        let raw = f.read_struct(bat_off, (entries * 8) as usize, "BAT")?;
        let mut bat: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        drop(raw);
        // Entries for blocks past the end of the disk (padding of a differencing disk's last
        // chunk) are never validated or used: forget them, so a later grow starts clean.
        let data_blocks = geo.data_blocks(md.virtual_size);
        for b in data_blocks..(data_blocks.div_ceil(geo.chunk_ratio()) * geo.chunk_ratio()) {
            if let Some(e) = bat.get_mut(geo.payload_index(b) as usize) {
                *e = 0;
            }
        }
        let max_end = validate_bat(
            &f,
            &bat,
            &geo,
            md.virtual_size,
            bat_off,
            file_len,
            &[
                (0, MIB, "headers"),
                (log_offset, log_length, "log"),
                (bat_off, u64::from(bat_region.length), "BAT region"),
                (
                    meta_region.file_offset,
                    u64::from(meta_region.length),
                    "metadata region",
                ),
            ],
        )?;

        // Parent.
        let (parent, parent_path) = if md.has_parent && with_parent {
            let loc = md.locator.as_ref().expect("checked in parse_metadata");
            let (p, pp) = open_parent(&f, loc, md.locator_offset, chain)?;
            if p.geo.logical_sector_size != geo.logical_sector_size {
                return Err(f.corrupt(
                    "parent locator",
                    md.locator_offset,
                    format!(
                        "parent {} has {}-byte sectors, this disk {}",
                        pp.display(),
                        p.geo.logical_sector_size,
                        geo.logical_sector_size
                    ),
                ));
            }
            (Some(Arc::new(p)), Some(pp))
        } else {
            (None, None)
        };

        let alloc_end = file_len.max(max_end).div_ceil(MIB) * MIB;
        Ok(Vhdx {
            read_only,
            geo,
            physical_sector_size: md.physical_sector_size,
            leave_allocated: md.leave_allocated && !md.has_parent,
            disk_id: md.disk_id,
            locator: md.locator,
            parent,
            parent_path,
            log_replayed,
            virtual_size: AtomicU64::new(md.virtual_size),
            bat: RwLock::new(bat),
            meta: Mutex::new(Meta {
                header: meta_header,
                current_slot: meta_slot,
                regions,
                bat_offset: bat_off,
                bat_length: u64::from(bat_region.length),
                metadata_offset: meta_region.file_offset,
                metadata_length: u64::from(meta_region.length),
                vsize_item_offset: md.vsize_item_offset,
                log_head: 0,
                log_seq: 1,
                log_tail: None,
                dirty_bat: Default::default(),
                alloc_end,
                file_guid_changed: false,
                data_guid_changed: false,
                closed: false,
            }),
            session_started: AtomicBool::new(false),
            bitmap_lock: Mutex::new(()),
            file: f,
        })
    }

    /// The path this disk was opened from.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// The parent of a differencing disk.
    pub fn parent(&self) -> Option<&Arc<Vhdx>> {
        self.parent.as_ref()
    }

    pub fn kind(&self) -> VhdxKind {
        if self.geo.has_parent {
            VhdxKind::Differencing
        } else if self.leave_allocated {
            VhdxKind::Fixed
        } else {
            VhdxKind::Dynamic
        }
    }

    pub fn block_size(&self) -> u32 {
        self.geo.block_size
    }

    pub fn disk_id(&self) -> Uuid {
        self.disk_id
    }

    /// The current header's DataWriteGuid (what a child's parent_linkage must name).
    pub fn data_write_guid(&self) -> Uuid {
        lock(&self.meta).header.data_write_guid
    }

    pub fn info(&self) -> Result<VhdxInfo> {
        let meta = lock(&self.meta);
        let bat = self.bat.read().unwrap_or_else(|e| e.into_inner());
        let vsize = self.virtual_size.load(Ordering::Acquire);
        let data_blocks = self.geo.data_blocks(vsize);
        let allocated_blocks = (0..data_blocks)
            .filter(|&b| {
                let s = bat_state(bat[self.geo.payload_index(b) as usize]);
                s == PAYLOAD_FULLY_PRESENT || s == PAYLOAD_PARTIALLY_PRESENT
            })
            .count() as u64;
        Ok(VhdxInfo {
            path: self.file.path.clone(),
            kind: self.kind(),
            virtual_size: vsize,
            block_size: self.geo.block_size,
            logical_sector_size: self.geo.logical_sector_size,
            physical_sector_size: self.physical_sector_size,
            disk_id: self.disk_id,
            file_write_guid: meta.header.file_write_guid,
            data_write_guid: meta.header.data_write_guid,
            file_size: self.file.file_len()?,
            allocated_blocks,
            data_blocks,
            parent_locator: self
                .locator
                .as_ref()
                .map(|l| l.entries.clone())
                .unwrap_or_default(),
            parent_path: self.parent_path.clone(),
            log_replayed: self.log_replayed,
        })
    }

    /// Flushes, clears the log GUID if this session wrote, and closes the file. Dropping a
    /// [`Vhdx`] does the same but cannot report errors.
    pub fn close(self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut meta = lock(&self.meta);
        if meta.closed {
            return Ok(());
        }
        if !meta.header.log_guid.is_nil() {
            self.flush_all(&mut meta)?;
            self.update_header(&mut meta, |h| h.log_guid = Uuid::nil())?;
        }
        meta.closed = true;
        Ok(())
    }

    /// Writes the header into the non-current slot with the next sequence number, flushes, and
    /// repeats so both slots hold the new header.
    fn update_header(&self, meta: &mut Meta, f: impl FnOnce(&mut Header)) -> Result<()> {
        let mut w = HeaderWriter {
            header: meta.header.clone(),
            slot: meta.current_slot,
        };
        w.update(&self.file, f)?;
        meta.header = w.header;
        meta.current_slot = w.slot;
        Ok(())
    }

    /// Starts a write session: a new FileWriteGuid (and, for guest-visible changes, a new
    /// DataWriteGuid) and a fresh log GUID, written before any other change.
    fn begin_session(&self, guest_visible: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if guest_visible && self.session_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut meta = lock(&self.meta);
        self.begin_session_locked(&mut meta, guest_visible)
    }

    fn begin_session_locked(&self, meta: &mut Meta, guest_visible: bool) -> Result<()> {
        if meta.closed {
            return Err(Error::Invalid("the disk is closed".into()));
        }
        let need_file = !meta.file_guid_changed;
        let need_data = guest_visible && !meta.data_guid_changed;
        let need_log = meta.header.log_guid.is_nil();
        if !(need_file || need_data || need_log) {
            return Ok(());
        }
        self.update_header(meta, |h| {
            if need_file {
                h.file_write_guid = Uuid::new_v4();
            }
            if need_data {
                h.data_write_guid = Uuid::new_v4();
            }
            if need_log {
                h.log_guid = Uuid::new_v4();
            }
        })?;
        if need_log {
            meta.log_head = 0;
            meta.log_seq = 1;
            meta.log_tail = None;
        }
        meta.file_guid_changed = true;
        if guest_visible {
            meta.data_guid_changed = true;
            self.session_started.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Writes full 4 KiB sectors of metadata (BAT or metadata region) through the log: flush
    /// payload, write the entry, flush, apply in place. The flush that makes the in-place
    /// writes durable is the next one (a guest flush, a log wrap, or close); until then each
    /// new entry's Tail points at the first entry written since the last flush, so a replay
    /// after a crash re-applies all of them.
    fn log_write(&self, meta: &mut Meta, sectors: &[(u64, Vec<u8>)]) -> Result<()> {
        if sectors.is_empty() {
            return Ok(());
        }
        debug_assert!(!meta.header.log_guid.is_nil());
        let log_len = u64::from(meta.header.log_length);
        let log_sectors = (log_len / LOG_SECTOR as u64) as usize;
        let max_per_entry = log_sectors - (64 + 32 * log_sectors).div_ceil(LOG_SECTOR);
        self.sync_meta(meta)?;
        for batch in sectors.chunks(max_per_entry) {
            let file_len = self.file.file_len()?;
            let desc_sectors = (64 + 32 * batch.len()).div_ceil(LOG_SECTOR);
            let len = ((desc_sectors + batch.len()) * LOG_SECTOR) as u64;
            if meta.log_head + len > log_len {
                // Wrapping would overwrite entries still needed: make their writes durable.
                self.sync_meta(meta)?;
                meta.log_head = 0;
            }
            let tail = *meta.log_tail.get_or_insert(meta.log_head);
            let entry = log::build_entry(
                &meta.header.log_guid,
                meta.log_seq,
                tail as u32,
                file_len,
                file_len,
                batch,
            );
            self.file
                .write_at(&entry, meta.header.log_offset + meta.log_head)?;
            self.file.sync()?;
            for (off, data) in batch {
                self.file.write_at(data, *off)?;
            }
            meta.log_head += len;
            meta.log_seq += 1;
        }
        Ok(())
    }

    /// Flushes the file; every in-place metadata write before it is then durable.
    fn sync_meta(&self, meta: &mut Meta) -> Result<()> {
        self.file.sync()?;
        meta.log_tail = None;
        Ok(())
    }

    /// Changes BAT entries in memory and marks their sectors for the next metadata flush.
    fn commit_bat(&self, meta: &mut Meta, changes: &[(u64, u64)]) -> Result<()> {
        let per_sector = (LOG_SECTOR / 8) as u64;
        let mut bat = self.bat.write().unwrap_or_else(|e| e.into_inner());
        for &(idx, val) in changes {
            bat[idx as usize] = val;
            meta.dirty_bat.insert(idx / per_sector);
        }
        Ok(())
    }

    /// Writes the changed BAT sectors through the log (see [`Vhdx::log_write`]).
    fn flush_meta(&self, meta: &mut Meta) -> Result<()> {
        if meta.dirty_bat.is_empty() {
            return Ok(());
        }
        let per_sector = (LOG_SECTOR / 8) as u64;
        let list: Vec<(u64, Vec<u8>)> = {
            let bat = self.bat.read().unwrap_or_else(|e| e.into_inner());
            meta.dirty_bat
                .iter()
                .map(|&s| {
                    let mut b = vec![0u8; LOG_SECTOR];
                    let first = s * per_sector;
                    for i in 0..per_sector {
                        if let Some(e) = bat.get((first + i) as usize) {
                            put64(&mut b, (i * 8) as usize, *e);
                        }
                    }
                    (meta.bat_offset + s * LOG_SECTOR as u64, b)
                })
                .collect()
        };
        self.log_write(meta, &list)?;
        meta.dirty_bat.clear();
        Ok(())
    }

    /// Makes everything durable: staged BAT changes through the log, then a flush.
    fn flush_all(&self, meta: &mut Meta) -> Result<()> {
        self.flush_meta(meta)?;
        self.sync_meta(meta)
    }
}

impl Drop for Vhdx {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}

impl std::fmt::Debug for Vhdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhdx")
            .field("path", &self.file.path)
            .field("kind", &self.kind())
            .field("virtual_size", &self.virtual_size.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

struct HeaderWriter {
    header: Header,
    slot: usize,
}

impl HeaderWriter {
    fn update(&mut self, f: &Backing, change: impl FnOnce(&mut Header)) -> Result<()> {
        let mut h = self.header.clone();
        change(&mut h);
        for _ in 0..2 {
            h.sequence_number = self.header.sequence_number.checked_add(1).ok_or_else(|| {
                f.corrupt(
                    "header",
                    HEADER_OFFSETS[self.slot],
                    "sequence number would overflow",
                )
            })?;
            let slot = 1 - self.slot;
            f.write_at(&h.serialize(), HEADER_OFFSETS[slot])?;
            f.sync()?;
            self.header = h.clone();
            self.slot = slot;
        }
        Ok(())
    }
}

/// Checks the region entries; returns the BAT and metadata entries.
fn check_regions(
    r: &[RegionEntry],
    log_offset: u64,
    log_length: u64,
    file_len: u64,
) -> std::result::Result<(RegionEntry, RegionEntry), String> {
    let mut bat = None;
    let mut meta = None;
    let mut ranges = vec![
        (0, MIB, "headers".to_string()),
        (log_offset, log_length, "log".into()),
    ];
    for e in r {
        let name = if e.guid == BAT_REGION {
            if bat.replace(*e).is_some() {
                return Err("two BAT regions".into());
            }
            "BAT region".to_string()
        } else if e.guid == METADATA_REGION {
            if meta.replace(*e).is_some() {
                return Err("two metadata regions".into());
            }
            "metadata region".to_string()
        } else if e.required {
            return Err(format!("unknown required region {}", e.guid));
        } else {
            format!("region {}", e.guid)
        };
        let len = u64::from(e.length);
        if e.file_offset < MIB || !e.file_offset.is_multiple_of(MIB) {
            return Err(format!(
                "{name} offset {:#x} is not a 1 MiB multiple >= 1 MiB",
                e.file_offset
            ));
        }
        if len == 0 || !len.is_multiple_of(MIB) {
            return Err(format!(
                "{name} length {len:#x} is not a non-zero 1 MiB multiple"
            ));
        }
        if e.file_offset
            .checked_add(len)
            .is_none_or(|end| end > file_len)
        {
            return Err(format!(
                "{name} at {:#x}+{len:#x} lies past the end of the file ({file_len} bytes)",
                e.file_offset
            ));
        }
        ranges.push((e.file_offset, len, name));
    }
    if log_offset + log_length > file_len {
        return Err(format!(
            "log at {log_offset:#x}+{log_length:#x} lies past the end of the file ({file_len} bytes)"
        ));
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(format!("{} and {} overlap", w[0].2, w[1].2));
        }
    }
    match (bat, meta) {
        (Some(b), Some(m)) => Ok((b, m)),
        (None, _) => Err("no BAT region".into()),
        (_, None) => Err("no metadata region".into()),
    }
}

struct ParsedMetadata {
    block_size: u32,
    leave_allocated: bool,
    has_parent: bool,
    virtual_size: u64,
    vsize_item_offset: u64,
    disk_id: Uuid,
    logical_sector_size: u32,
    physical_sector_size: u32,
    locator: Option<ParentLocator>,
    locator_offset: u64,
}

fn parse_metadata(f: &Backing, region: u64, region_len: u64) -> Result<ParsedMetadata> {
    let t = f.read_struct(region, METADATA_TABLE_SIZE, "metadata table")?;
    let entries = parse_metadata_table(&t).map_err(|e| f.corrupt("metadata table", region, e))?;
    let mut ranges = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let eo = region + 32 + 32 * i as u64;
        let bad = |p: String| f.corrupt("metadata table", eo, p);
        if entries[..i].iter().any(|x| x.item_id == e.item_id) {
            return Err(bad(format!("item {} appears twice", e.item_id)));
        }
        if e.length == 0 {
            continue;
        }
        if u64::from(e.offset) < METADATA_TABLE_SIZE as u64 {
            return Err(bad(format!(
                "item {} offset {:#x} is inside the table",
                e.item_id, e.offset
            )));
        }
        if e.length > MAX_METADATA_ITEM || u64::from(e.offset) + u64::from(e.length) > region_len {
            return Err(bad(format!(
                "item {} at {:#x}+{:#x} does not fit the region",
                e.item_id, e.offset, e.length
            )));
        }
        ranges.push((e.offset, e.length));
    }
    ranges.sort();
    for w in ranges.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(f.corrupt(
                "metadata table",
                region,
                format!("items at {:#x} and {:#x} overlap", w[0].0, w[1].0),
            ));
        }
    }
    let known = [
        ITEM_FILE_PARAMETERS,
        ITEM_VIRTUAL_DISK_SIZE,
        ITEM_PAGE83,
        ITEM_LOGICAL_SECTOR,
        ITEM_PHYSICAL_SECTOR,
        ITEM_PARENT_LOCATOR,
    ];
    for e in &entries {
        if e.flags & META_FLAG_IS_REQUIRED != 0 && !known.contains(&e.item_id) {
            return Err(f.corrupt(
                "metadata table",
                region,
                format!("unknown required item {}", e.item_id),
            ));
        }
    }
    let item = |id: Uuid, name: &'static str, min: u32| -> Result<Option<(u64, Vec<u8>)>> {
        let Some(e) = entries.iter().find(|e| e.item_id == id) else {
            return Ok(None);
        };
        let off = region + u64::from(e.offset);
        if e.length < min {
            return Err(f.corrupt(
                name,
                off,
                format!("item is {} bytes, needs {min}", e.length),
            ));
        }
        Ok(Some((off, f.read_struct(off, e.length as usize, name)?)))
    };
    let need = |v: Option<(u64, Vec<u8>)>, name: &'static str| {
        v.ok_or_else(|| f.corrupt("metadata table", region, format!("no {name} item")))
    };
    let (fpo, fp) = need(
        item(ITEM_FILE_PARAMETERS, "file parameters", 8)?,
        "file parameters",
    )?;
    let block_size = le32(&fp, 0);
    let fp_flags = le32(&fp, 4);
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(f.corrupt(
            "file parameters",
            fpo,
            format!("block size {block_size:#x} is not a power of two in 1..256 MiB"),
        ));
    }
    let (lso, ls) = need(
        item(ITEM_LOGICAL_SECTOR, "logical sector size", 4)?,
        "logical sector size",
    )?;
    let lss = le32(&ls, 0);
    if lss != 512 && lss != 4096 {
        return Err(f.corrupt(
            "logical sector size",
            lso,
            format!("{lss} is neither 512 nor 4096"),
        ));
    }
    let (pso, ps) = need(
        item(ITEM_PHYSICAL_SECTOR, "physical sector size", 4)?,
        "physical sector size",
    )?;
    let pss = le32(&ps, 0);
    if pss != 512 && pss != 4096 {
        return Err(f.corrupt(
            "physical sector size",
            pso,
            format!("{pss} is neither 512 nor 4096"),
        ));
    }
    let (vso, vs) = need(
        item(ITEM_VIRTUAL_DISK_SIZE, "virtual disk size", 8)?,
        "virtual disk size",
    )?;
    let vsize = le64(&vs, 0);
    if vsize == 0 || vsize > MAX_VIRTUAL_SIZE || !vsize.is_multiple_of(u64::from(lss)) {
        return Err(f.corrupt(
            "virtual disk size",
            vso,
            format!("{vsize} is not a non-zero multiple of {lss} up to 64 TiB"),
        ));
    }
    let (_, p83) = need(item(ITEM_PAGE83, "page 83 data", 16)?, "page 83 data")?;
    let has_parent = fp_flags & 2 != 0;
    let (locator, locator_offset) = match item(ITEM_PARENT_LOCATOR, "parent locator", 20)? {
        Some((lo, lb)) if has_parent => {
            let l = ParentLocator::parse(&lb).map_err(|e| f.corrupt("parent locator", lo, e))?;
            let linkage = l.get("parent_linkage");
            if linkage.and_then(parse_braced_guid).is_none() {
                return Err(f.corrupt(
                    "parent locator",
                    lo,
                    format!("missing or invalid parent_linkage {linkage:?}"),
                ));
            }
            if !["relative_path", "volume_path", "absolute_win32_path"]
                .iter()
                .any(|k| l.get(k).is_some())
            {
                return Err(f.corrupt("parent locator", lo, "no parent path"));
            }
            (Some(l), lo)
        }
        None if has_parent => {
            return Err(f.corrupt(
                "metadata table",
                region,
                "differencing disk without a parent locator",
            ))
        }
        _ => (None, 0),
    };
    Ok(ParsedMetadata {
        block_size,
        leave_allocated: fp_flags & 1 != 0,
        has_parent,
        virtual_size: vsize,
        vsize_item_offset: vso,
        disk_id: guid(&p83, 0),
        logical_sector_size: lss,
        physical_sector_size: pss,
        locator,
        locator_offset,
    })
}

/// Checks every BAT entry; returns the end of the last allocated block.
fn validate_bat(
    f: &Backing,
    bat: &[u64],
    geo: &Geometry,
    vsize: u64,
    bat_off: u64,
    file_len: u64,
    fixed_ranges: &[(u64, u64, &'static str)],
) -> Result<u64> {
    let cr = geo.chunk_ratio();
    let bs = u64::from(geo.block_size);
    let mut used: Vec<(u64, u64, u64)> = Vec::new();
    let data_blocks = geo.data_blocks(vsize);
    for (i, &e) in bat.iter().enumerate() {
        let i = i as u64;
        let eo = bat_off + i * 8;
        let is_bitmap = (i + 1).is_multiple_of(cr + 1);
        let state = bat_state(e);
        let off = bat_offset(e);
        let len = if is_bitmap {
            if !geo.has_parent {
                // Non-differencing files have no sector bitmaps; the entry is ignored.
                continue;
            }
            match state {
                SB_NOT_PRESENT => continue,
                SB_PRESENT => SECTOR_BITMAP_BLOCK_SIZE,
                s => {
                    return Err(f.corrupt(
                        "BAT",
                        eo,
                        format!("entry {i}: invalid sector bitmap state {s}"),
                    ))
                }
            }
        } else {
            let block = i - i / (cr + 1);
            if block >= data_blocks {
                continue;
            }
            match state {
                PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED
                | PAYLOAD_UNMAPPED_OLD => continue,
                PAYLOAD_FULLY_PRESENT => bs,
                PAYLOAD_PARTIALLY_PRESENT if geo.has_parent => {
                    let sb = bat
                        .get(geo.bitmap_index(block / cr) as usize)
                        .copied()
                        .unwrap_or(0);
                    if bat_state(sb) != SB_PRESENT {
                        return Err(f.corrupt(
                            "BAT",
                            eo,
                            format!(
                                "entry {i}: block {block} is partially present but its chunk has no sector bitmap"
                            ),
                        ));
                    }
                    bs
                }
                s => {
                    return Err(f.corrupt(
                        "BAT",
                        eo,
                        format!("entry {i}: invalid payload block state {s}"),
                    ))
                }
            }
        };
        if off < MIB || off.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(f.corrupt(
                "BAT",
                eo,
                format!(
                    "entry {i}: block at {off:#x}+{len:#x} lies outside the file ({file_len} bytes)"
                ),
            ));
        }
        used.push((off, len, i));
    }
    let mut max_end = 0;
    for &(o, l, _) in &used {
        max_end = max_end.max(o + l);
    }
    for &(o, l, name) in fixed_ranges {
        used.push((o, l, u64::MAX - name.len() as u64));
    }
    used.sort_unstable();
    for w in used.windows(2) {
        if w[0].0 + w[0].1 > w[1].0 {
            let describe = |x: &(u64, u64, u64)| {
                if x.2 >= u64::MAX - 64 {
                    format!("the structure at {:#x}", x.0)
                } else {
                    format!("BAT entry {}'s block at {:#x}", x.2, x.0)
                }
            };
            return Err(f.corrupt(
                "BAT",
                bat_off,
                format!("{} overlaps {}", describe(&w[0]), describe(&w[1])),
            ));
        }
    }
    Ok(max_end)
}

/// Candidate parent paths from a locator: relative, then volume, then absolute.
fn parent_candidates(child: &Path, loc: &ParentLocator) -> Vec<PathBuf> {
    let dir = child
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut v = Vec::new();
    let file_name_of = |p: &str| p.rsplit(['\\', '/']).next().map(str::to_string);
    if let Some(rel) = loc.get("relative_path") {
        let rel = rel.replace('\\', "/");
        if !rel.is_empty() {
            v.push(dir.join(rel.trim_start_matches("./")));
        }
    }
    for key in ["volume_path", "absolute_win32_path"] {
        if let Some(p) = loc.get(key) {
            if p.starts_with('/') {
                v.push(PathBuf::from(p));
            } else if let Some(name) = file_name_of(p) {
                // A Windows path: look for the file next to the child.
                if !name.is_empty() {
                    v.push(dir.join(name));
                }
            }
        }
    }
    v
}

fn open_parent(
    f: &Backing,
    loc: &ParentLocator,
    loc_offset: u64,
    chain: &mut Vec<PathBuf>,
) -> Result<(Vhdx, PathBuf)> {
    let linkage: Vec<Uuid> = ["parent_linkage", "parent_linkage2"]
        .iter()
        .filter_map(|k| loc.get(k).and_then(parse_braced_guid))
        .collect();
    let mut last_err = None;
    for cand in parent_candidates(&f.path, loc) {
        if !cand.exists() {
            continue;
        }
        let depth = chain.len();
        let p = Vhdx::open_in_chain(&cand, true, chain, true);
        chain.truncate(depth);
        let p = p?;
        let dwg = p.data_write_guid();
        if linkage.contains(&dwg) {
            return Ok((p, cand));
        }
        last_err = Some(f.corrupt(
            "parent locator",
            loc_offset,
            format!(
                "parent {} has DataWriteGuid {} but the child links to {} (the parent changed after the child was created)",
                cand.display(),
                guid_braced(&dwg),
                loc.get("parent_linkage").unwrap_or("")
            ),
        ));
    }
    Err(last_err.unwrap_or_else(|| {
        f.corrupt(
            "parent locator",
            loc_offset,
            format!(
                "parent not found (relative_path {:?}, volume_path {:?}, absolute_win32_path {:?})",
                loc.get("relative_path"),
                loc.get("volume_path"),
                loc.get("absolute_win32_path")
            ),
        )
    }))
}

impl Disk for Vhdx {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_impl(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_impl(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut meta = lock(&self.meta);
        if meta.dirty_bat.is_empty() {
            // Also makes earlier in-place metadata writes durable.
            self.sync_meta(&mut meta)
        } else {
            // The log entries are flushed; the in-place copies follow with the next flush.
            self.flush_meta(&mut meta)
        }
    }
    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.unmap_impl(offset, len)
    }
    fn extent(&self, offset: u64, len: u64, write: bool) -> Result<crate::Extent<'_>> {
        self.extent_impl(offset, len, write)
    }
    fn size(&self) -> u64 {
        self.virtual_size.load(Ordering::Acquire)
    }
    fn logical_sector_size(&self) -> u32 {
        self.geo.logical_sector_size
    }
    fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
