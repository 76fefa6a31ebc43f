//! Legacy VHD images: fixed, dynamic and differencing.
//!
//! Concurrency: all I/O methods take `&self`. The block allocation table is an array of atomics
//! (lock-free lookups); block allocation takes one short mutex; sector-bitmap updates of a
//! differencing disk take a striped per-block mutex. Data moves with positioned reads and writes.
//!
//! Crash safety: a new block is appended where the footer was, after the footer has been
//! rewritten at the new end of the file. BAT entries of new or freed blocks are written to the
//! file only in [`Disk::flush`], after a first `fdatasync` has made the blocks' data, bitmaps and
//! the footer durable; a second `fdatasync` then makes the BAT durable. A crash therefore loses at
//! most unflushed writes and leaks (never corrupts) space.

pub mod format;
mod ops;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use uuid::Uuid;

use crate::{Disk, Error, Extent, Result};
use format::*;
pub use format::{DiskType, Geometry};
use std::os::fd::AsFd;

const STRIPES: usize = 64;
/// Deepest differencing chain we follow.
pub const MAX_CHAIN_DEPTH: usize = 256;
/// Longest parent locator we read (UTF-16 path).
const MAX_LOCATOR_LEN: u32 = 64 * 1024;

/// How to open a VHD.
#[derive(Clone, Debug, Default)]
pub struct VhdOpenOptions {
    pub read_only: bool,
    /// Open a differencing disk without opening its parent (reads of parent data then fail).
    pub no_parent: bool,
}

/// What to create.
#[derive(Clone, Debug)]
pub struct VhdCreateOptions {
    pub disk_type: DiskType,
    /// Virtual size in bytes (a multiple of 512). Ignored for differencing disks (parent's size).
    pub size: u64,
    /// Block size for dynamic and differencing disks (power of two, 512 B..256 MiB).
    pub block_size: u32,
    /// The parent of a differencing disk.
    pub parent: Option<PathBuf>,
}

impl Default for VhdCreateOptions {
    fn default() -> Self {
        VhdCreateOptions {
            disk_type: DiskType::Dynamic,
            size: 0,
            block_size: 2 << 20,
            parent: None,
        }
    }
}

/// Properties of an open VHD.
#[derive(Clone, Debug)]
pub struct VhdInfo {
    pub disk_type: DiskType,
    pub size: u64,
    pub block_size: Option<u32>,
    pub unique_id: Uuid,
    pub geometry: Geometry,
    pub creator_app: String,
    pub parent_unique_id: Option<Uuid>,
    /// The parent file we resolved (differencing disks opened with their parent).
    pub parent_path: Option<PathBuf>,
    /// The paths the parent locators name.
    pub parent_locators: Vec<String>,
    pub allocated_blocks: u64,
    pub total_blocks: u64,
}

struct Alloc {
    /// Offset of the footer at the end of the file; new blocks go here.
    footer_offset: u64,
    /// BAT entries changed in memory and not yet written to the file.
    dirty: BTreeSet<u32>,
}

struct Sparse {
    header: DynHeader,
    block_size: u64,
    bitmap_size: u64,
    bat: Vec<AtomicU32>,
    alloc: Mutex<Alloc>,
    stripes: Vec<Mutex<()>>,
    /// Serializes BAT write-back.
    flush_lock: Mutex<()>,
    parent: Option<Box<Vhd>>,
    parent_path: Option<PathBuf>,
}

/// An open VHD file.
pub struct Vhd {
    path: PathBuf,
    file: File,
    /// The unbuffered descriptor of `file`, for [`Extent::File`].
    direct: crate::DirectFd,
    read_only: bool,
    footer: Footer,
    sparse: Option<Sparse>,
    /// Problems found at open that did not prevent it (e.g. a damaged end footer).
    warnings: Vec<String>,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn corrupt(path: &Path, structure: &'static str, offset: u64, problem: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        structure,
        offset,
        problem: problem.into(),
    }
}

/// Reads exactly `buf.len()` bytes or reports a truncated structure.
fn read_struct(
    file: &File,
    path: &Path,
    structure: &'static str,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(corrupt(path, structure, offset, "file is truncated"))
        }
        Err(e) => Err(io_err(path, "read")(e)),
    }
}

fn bit(bitmap: &[u8], i: u64) -> bool {
    bitmap[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
}

fn set_bits(bitmap: &mut [u8], start: u64, count: u64, value: bool) {
    for i in start..start + count {
        let m = 0x80u8 >> (i % 8);
        if value {
            bitmap[(i / 8) as usize] |= m;
        } else {
            bitmap[(i / 8) as usize] &= !m;
        }
    }
}

impl Vhd {
    /// Opens a VHD read-write (or read-only), and for a differencing disk its parent chain.
    pub fn open(path: impl AsRef<Path>, opts: &VhdOpenOptions) -> Result<Vhd> {
        let mut visited = Vec::new();
        Self::open_chain(path.as_ref(), opts, &mut visited)
    }

    fn open_chain(path: &Path, opts: &VhdOpenOptions, visited: &mut Vec<PathBuf>) -> Result<Vhd> {
        let canon = std::fs::canonicalize(path).map_err(io_err(path, "open"))?;
        if visited.contains(&canon) {
            return Err(corrupt(
                path,
                "parent locator",
                0,
                "loop in the differencing chain",
            ));
        }
        if visited.len() >= MAX_CHAIN_DEPTH {
            return Err(corrupt(
                path,
                "parent locator",
                0,
                format!("differencing chain deeper than {MAX_CHAIN_DEPTH}"),
            ));
        }
        visited.push(canon);
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(io_err(path, "open"))?;
        let file_len = file.metadata().map_err(io_err(path, "stat"))?.len();
        let mut warnings = Vec::new();
        if file_len < FOOTER_SIZE as u64 {
            return Err(corrupt(path, "footer", 0, "file is shorter than a footer"));
        }
        // The footer lives in the last 512 bytes (very old files: 511). Dynamic disks keep a
        // copy at offset 0, used when the end footer is damaged.
        let end = file_len - FOOTER_SIZE as u64;
        let mut fb = [0u8; FOOTER_SIZE];
        read_struct(&file, path, "footer", &mut fb, end)?;
        let mut footer_offset = end;
        let footer = match Footer::parse(&fb) {
            Ok(f) => f,
            Err(end_problem) => {
                let mut fb0 = [0u8; FOOTER_SIZE];
                read_struct(&file, path, "footer", &mut fb0, 0)?;
                let mut alt = None;
                if file_len > FOOTER_SIZE as u64 {
                    let mut fb1 = [0u8; FOOTER_SIZE];
                    if file.read_exact_at(&mut fb1[..511], end + 1).is_ok() {
                        if let Ok(f) = Footer::parse(&fb1) {
                            footer_offset = end + 1;
                            alt = Some(f);
                        }
                    }
                }
                match (alt, Footer::parse(&fb0)) {
                    (Some(f), _) => f,
                    (None, Ok(f)) if f.disk_type != DiskType::Fixed => {
                        warnings.push(format!(
                            "footer at offset {end:#x}: {end_problem}; using the copy at offset 0"
                        ));
                        footer_offset = file_len.next_multiple_of(SECTOR);
                        f
                    }
                    _ => return Err(corrupt(path, "footer", end, end_problem)),
                }
            }
        };
        if footer.current_size % SECTOR != 0 {
            return Err(corrupt(
                path,
                "footer",
                footer_offset,
                format!(
                    "virtual size {} is not a multiple of 512",
                    footer.current_size
                ),
            ));
        }
        if footer.current_size > 2 << 40 {
            return Err(corrupt(
                path,
                "footer",
                footer_offset,
                format!("virtual size {} exceeds 2 TiB", footer.current_size),
            ));
        }
        let mut vhd = Vhd {
            path: path.to_path_buf(),
            file,
            direct: crate::DirectFd::default(),
            read_only: opts.read_only,
            footer: footer.clone(),
            sparse: None,
            warnings,
        };
        if footer.disk_type == DiskType::Fixed {
            if footer.current_size > footer_offset {
                return Err(corrupt(
                    path,
                    "footer",
                    footer_offset,
                    format!(
                        "virtual size {} exceeds the {} data bytes in the file",
                        footer.current_size, footer_offset
                    ),
                ));
            }
            return Ok(vhd);
        }
        vhd.sparse = Some(vhd.open_sparse(&footer, footer_offset, opts, visited)?);
        if !vhd.warnings.is_empty() && !opts.read_only {
            // Repair: put a valid footer back at the end of the file.
            let s = vhd.sparse.as_ref().unwrap();
            let off = s.alloc.lock().unwrap().footer_offset;
            vhd.write_footer_at(off)?;
            vhd.file.sync_data().map_err(io_err(path, "fsync"))?;
        }
        Ok(vhd)
    }

    fn open_sparse(
        &self,
        footer: &Footer,
        footer_offset: u64,
        opts: &VhdOpenOptions,
        visited: &mut Vec<PathBuf>,
    ) -> Result<Sparse> {
        let path = &self.path;
        let ho = footer.data_offset;
        if !ho.is_multiple_of(SECTOR)
            || ho < FOOTER_SIZE as u64
            || ho + DYN_HEADER_SIZE as u64 > footer_offset
        {
            return Err(corrupt(
                path,
                "footer",
                footer_offset,
                format!("dynamic header offset {ho:#x} is outside the file"),
            ));
        }
        let mut hb = [0u8; DYN_HEADER_SIZE];
        read_struct(&self.file, path, "dynamic header", &mut hb, ho)?;
        let header = DynHeader::parse(&hb).map_err(|p| corrupt(path, "dynamic header", ho, p))?;
        let bs = header.block_size;
        if !bs.is_power_of_two() || !(512..=256 << 20).contains(&bs) {
            return Err(corrupt(
                path,
                "dynamic header",
                ho,
                format!("block size {bs} is not a power of two between 512 B and 256 MiB"),
            ));
        }
        let needed = footer.current_size.div_ceil(bs as u64);
        if needed > header.max_table_entries as u64 {
            return Err(corrupt(
                path,
                "dynamic header",
                ho,
                format!(
                    "{} BAT entries cannot map {} bytes in {bs}-byte blocks",
                    header.max_table_entries, footer.current_size
                ),
            ));
        }
        let to = header.table_offset;
        let bat_bytes = needed * 4;
        if to.checked_add(bat_bytes).is_none_or(|e| e > footer_offset) {
            return Err(corrupt(
                path,
                "BAT",
                to,
                format!("{needed} entries do not fit in the file"),
            ));
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        read_struct(&self.file, path, "BAT", &mut raw, to)?;
        let bitmap_size = bitmap_size(bs);
        let block_bytes = bitmap_size + bs as u64;
        let meta_end = (ho + DYN_HEADER_SIZE as u64).max(to + bat_bytes);
        let mut bat = Vec::with_capacity(needed as usize);
        let mut extents = Vec::new();
        for (i, c) in raw.chunks_exact(4).enumerate() {
            let e = u32::from_be_bytes(c.try_into().unwrap());
            if e != UNALLOCATED {
                let start = e as u64 * SECTOR;
                if start + block_bytes > footer_offset {
                    return Err(corrupt(
                        path,
                        "BAT",
                        to + 4 * i as u64,
                        format!("block {i} at {start:#x} extends past the footer"),
                    ));
                }
                extents.push((start, i));
            }
            bat.push(AtomicU32::new(e));
        }
        extents.sort_unstable();
        for w in extents.windows(2) {
            if w[0].0 + block_bytes > w[1].0 {
                return Err(corrupt(
                    path,
                    "BAT",
                    to + 4 * w[1].1 as u64,
                    format!("blocks {} and {} overlap", w[0].1, w[1].1),
                ));
            }
        }
        for &(start, i) in &extents {
            let overlaps_header = start < ho + DYN_HEADER_SIZE as u64 && ho < start + block_bytes;
            let overlaps_bat = start < to + bat_bytes && to < start + block_bytes;
            if start < FOOTER_SIZE as u64 || overlaps_header || overlaps_bat {
                return Err(corrupt(
                    path,
                    "BAT",
                    to + 4 * i as u64,
                    format!("block {i} at {start:#x} overlaps the footer copy, header or BAT"),
                ));
            }
        }
        let _ = meta_end;
        let mut sparse = Sparse {
            header: header.clone(),
            block_size: bs as u64,
            bitmap_size,
            bat,
            alloc: Mutex::new(Alloc {
                footer_offset: footer_offset.next_multiple_of(SECTOR),
                dirty: BTreeSet::new(),
            }),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            flush_lock: Mutex::new(()),
            parent: None,
            parent_path: None,
        };
        if footer.disk_type == DiskType::Differencing && !opts.no_parent {
            let (parent, ppath) = self.open_parent(&header, visited)?;
            sparse.parent = Some(Box::new(parent));
            sparse.parent_path = Some(ppath);
        }
        Ok(sparse)
    }

    /// Reads the parent locators' paths (for differencing disks), resolved against the child's
    /// directory, in the order to try them: W2ru (relative), W2ku (absolute), ParentUnicodeName.
    fn locator_paths(&self, header: &DynHeader) -> Result<Vec<(String, PathBuf)>> {
        let path = &self.path;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let file_len = self.file.metadata().map_err(io_err(path, "stat"))?.len();
        let mut rel = Vec::new();
        let mut abs = Vec::new();
        for (i, l) in header.locators.iter().enumerate() {
            if l.platform != PLATFORM_W2RU && l.platform != PLATFORM_W2KU {
                continue;
            }
            let loc_off = self.footer.data_offset + 576 + 24 * i as u64;
            if l.data_length > MAX_LOCATOR_LEN
                || l.data_offset
                    .checked_add(l.data_length as u64)
                    .is_none_or(|e| e > file_len)
            {
                return Err(corrupt(
                    path,
                    "parent locator",
                    loc_off,
                    format!(
                        "locator data ({} bytes at {:#x}) lies outside the file",
                        l.data_length, l.data_offset
                    ),
                ));
            }
            let mut b = vec![0u8; l.data_length as usize];
            read_struct(&self.file, path, "parent locator", &mut b, l.data_offset)?;
            let s = from_utf16le(&b);
            let unix = s.replace('\\', "/");
            if l.platform == PLATFORM_W2RU {
                rel.push((s.clone(), dir.join(unix.trim_start_matches("./"))));
            } else if unix.starts_with('/') {
                abs.push((s, PathBuf::from(unix)));
            } else {
                // A Windows drive path: keep it for display; it resolves to nothing here.
                abs.push((s, PathBuf::new()));
            }
        }
        rel.extend(abs);
        if !header.parent_name.is_empty() {
            let name = header.parent_name.replace('\\', "/");
            let p = if name.starts_with('/') {
                PathBuf::from(&name)
            } else {
                dir.join(name.rsplit('/').next().unwrap_or(&name))
            };
            rel.push((header.parent_name.clone(), p));
        }
        Ok(rel)
    }

    fn open_parent(
        &self,
        header: &DynHeader,
        visited: &mut Vec<PathBuf>,
    ) -> Result<(Vhd, PathBuf)> {
        let cands = self.locator_paths(header)?;
        let ho = self.footer.data_offset;
        for (_, p) in &cands {
            if p.as_os_str().is_empty() || !p.is_file() {
                continue;
            }
            let opts = VhdOpenOptions {
                read_only: true,
                no_parent: false,
            };
            let parent = Self::open_chain(p, &opts, visited)?;
            if parent.footer.unique_id != header.parent_unique_id {
                return Err(corrupt(
                    &self.path,
                    "dynamic header",
                    ho,
                    format!(
                        "parent {} has unique id {}, the child expects {}",
                        p.display(),
                        parent.footer.unique_id,
                        header.parent_unique_id
                    ),
                ));
            }
            return Ok((parent, p.clone()));
        }
        let names: Vec<&str> = cands.iter().map(|(s, _)| s.as_str()).collect();
        Err(corrupt(
            &self.path,
            "parent locator",
            ho,
            format!("parent not found (tried {names:?})"),
        ))
    }

    /// Creates a new VHD and opens it read-write.
    pub fn create(path: impl AsRef<Path>, opts: &VhdCreateOptions) -> Result<Vhd> {
        let path = path.as_ref();
        let bs = opts.block_size;
        if opts.disk_type != DiskType::Fixed
            && (!bs.is_power_of_two() || !(512..=256 << 20).contains(&bs))
        {
            return Err(Error::Invalid(format!(
                "block size {bs} must be a power of two between 512 B and 256 MiB"
            )));
        }
        let (size, parent) = match (&opts.parent, opts.disk_type) {
            (Some(p), DiskType::Differencing) => {
                let parent = Vhd::open(
                    p,
                    &VhdOpenOptions {
                        read_only: true,
                        no_parent: false,
                    },
                )?;
                (parent.footer.current_size, Some(parent))
            }
            (None, DiskType::Differencing) => {
                return Err(Error::Invalid("a differencing disk needs a parent".into()))
            }
            (Some(_), _) => {
                return Err(Error::Invalid(
                    "only differencing disks have a parent".into(),
                ))
            }
            (None, _) => (opts.size, None),
        };
        if size == 0 || size % SECTOR != 0 || size > MAX_SIZE {
            return Err(Error::Invalid(format!(
                "size {size} must be a non-zero multiple of 512 up to 2040 GiB"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(path, "create"))?;
        let result = Self::write_new(path, &file, opts, size, parent.as_ref());
        if result.is_err() {
            let _ = std::fs::remove_file(path);
        }
        result?;
        drop(file);
        Vhd::open(path, &VhdOpenOptions::default())
    }

    fn new_footer(disk_type: DiskType, size: u64) -> Footer {
        Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: if disk_type == DiskType::Fixed {
                u64::MAX
            } else {
                FOOTER_SIZE as u64
            },
            timestamp: now_timestamp(),
            // "win " tells readers (qemu among them) to trust CurrentSize rather than the CHS
            // geometry, which is how Hyper-V reads every VHD.
            creator_app: *b"win ",
            creator_version: 0x000a_0000,
            creator_os: u32::from_be_bytes(*b"Wi2k"),
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type,
            unique_id: Uuid::new_v4(),
            saved_state: 0,
        }
    }

    fn write_new(
        path: &Path,
        file: &File,
        opts: &VhdCreateOptions,
        size: u64,
        parent: Option<&Vhd>,
    ) -> Result<()> {
        let w = |buf: &[u8], off: u64| file.write_all_at(buf, off).map_err(io_err(path, "write"));
        let footer = Self::new_footer(opts.disk_type, size);
        if opts.disk_type == DiskType::Fixed {
            file.set_len(size).map_err(io_err(path, "truncate"))?;
            w(&footer.to_bytes(), size)?;
            return file.sync_all().map_err(io_err(path, "fsync"));
        }
        let entries = size.div_ceil(opts.block_size as u64);
        if entries > u32::MAX as u64 {
            return Err(Error::Invalid("too many blocks".into()));
        }
        let table_offset = 1536u64;
        let bat_bytes = (entries * 4).next_multiple_of(SECTOR);
        let mut header = DynHeader {
            table_offset,
            header_version: 0x0001_0000,
            max_table_entries: entries as u32,
            block_size: opts.block_size,
            parent_unique_id: Uuid::nil(),
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: [Locator::default(); 8],
        };
        let mut next = table_offset + bat_bytes;
        let mut locator_data = Vec::new();
        if let Some(parent) = parent {
            let (abs, rel) = locator_strings(path, &parent.path)?;
            header.parent_unique_id = parent.footer.unique_id;
            header.parent_timestamp = parent_mtime(&parent.path);
            header.parent_name = abs.clone();
            for (i, (code, s)) in [(PLATFORM_W2RU, rel), (PLATFORM_W2KU, abs)]
                .into_iter()
                .enumerate()
            {
                let data = utf16le(&s);
                let space = (data.len() as u64).next_multiple_of(SECTOR).max(SECTOR);
                header.locators[i] = Locator {
                    platform: code,
                    data_space: (space / SECTOR) as u32,
                    data_length: data.len() as u32,
                    data_offset: next,
                };
                locator_data.push((next, data));
                next += space;
            }
        }
        w(&footer.to_bytes(), 0)?;
        w(&header.to_bytes(), FOOTER_SIZE as u64)?;
        w(&vec![0xFF; bat_bytes as usize], table_offset)?;
        for (off, data) in locator_data {
            w(&data, off)?;
        }
        w(&footer.to_bytes(), next)?;
        file.sync_all().map_err(io_err(path, "fsync"))
    }

    fn write_footer_at(&self, off: u64) -> Result<()> {
        self.file
            .write_all_at(&self.footer.to_bytes(), off)
            .map_err(io_err(&self.path, "write footer"))
    }

    /// The file this disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// The footer's UniqueId (children link to it).
    pub fn unique_id(&self) -> Uuid {
        self.footer.unique_id
    }

    /// The opened parent of a differencing disk.
    pub fn parent(&self) -> Option<&Vhd> {
        self.sparse.as_ref().and_then(|s| s.parent.as_deref())
    }

    /// Problems noticed at open that did not prevent it.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Block size of a dynamic or differencing disk.
    pub fn block_size(&self) -> Option<u32> {
        self.sparse.as_ref().map(|s| s.block_size as u32)
    }

    pub fn info(&self) -> VhdInfo {
        let s = self.sparse.as_ref();
        let allocated = s.map_or(0, |s| {
            s.bat
                .iter()
                .filter(|e| e.load(Ordering::Relaxed) != UNALLOCATED)
                .count() as u64
        });
        let locators = s
            .filter(|_| self.footer.disk_type == DiskType::Differencing)
            .and_then(|s| self.locator_paths(&s.header).ok())
            .map(|v| v.into_iter().map(|(s, _)| s).collect())
            .unwrap_or_default();
        VhdInfo {
            disk_type: self.footer.disk_type,
            size: self.footer.current_size,
            block_size: self.block_size(),
            unique_id: self.footer.unique_id,
            geometry: self.footer.geometry,
            creator_app: String::from_utf8_lossy(&self.footer.creator_app).into_owned(),
            parent_unique_id: s
                .filter(|_| self.footer.disk_type == DiskType::Differencing)
                .map(|s| s.header.parent_unique_id),
            parent_path: s.and_then(|s| s.parent_path.clone()),
            parent_locators: locators,
            allocated_blocks: allocated,
            total_blocks: s.map_or(0, |s| s.bat.len() as u64),
        }
    }

    /// File offsets of the allocated blocks (block index, offset of its sector bitmap).
    pub fn allocated_block_offsets(&self) -> Vec<(u64, u64)> {
        let Some(s) = &self.sparse else {
            return Vec::new();
        };
        s.bat
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let e = e.load(Ordering::Acquire);
                (e != UNALLOCATED).then_some((i as u64, e as u64 * SECTOR))
            })
            .collect()
    }

    /// Byte ranges of the virtual disk that this file (not its parents) holds data for:
    /// allocated blocks of a dynamic disk, sectors marked in the bitmaps of a differencing disk,
    /// everything for a fixed disk. Adjacent ranges are merged.
    pub fn allocated_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let size = self.footer.current_size;
        let Some(s) = &self.sparse else {
            return Ok(crate::raw::file_data_ranges(&self.file, size, SECTOR));
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |start: u64, len: u64| {
            let len = len.min(size.saturating_sub(start));
            if len == 0 {
                return;
            }
            match out.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += len,
                _ => out.push((start, len)),
            }
        };
        let mut bitmap = vec![0u8; s.bitmap_size as usize];
        let spb = s.block_size / SECTOR;
        for (i, e) in s.bat.iter().enumerate() {
            let e = e.load(Ordering::Acquire);
            if e == UNALLOCATED {
                continue;
            }
            let base = i as u64 * s.block_size;
            if self.footer.disk_type == DiskType::Dynamic {
                push(base, s.block_size);
                continue;
            }
            self.file
                .read_exact_at(&mut bitmap, e as u64 * SECTOR)
                .map_err(io_err(&self.path, "read bitmap"))?;
            let mut j = 0;
            while j < spb {
                let v = bit(&bitmap, j);
                let mut k = j + 1;
                while k < spb && bit(&bitmap, k) == v {
                    k += 1;
                }
                if v {
                    push(base + j * SECTOR, (k - j) * SECTOR);
                }
                j = k;
            }
        }
        Ok(out)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "offset {offset} and length {len} must be multiples of 512"
            )));
        }
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.footer.current_size)
        {
            return Err(Error::Invalid(format!(
                "range {offset}+{len} is past the end of the {}-byte disk",
                self.footer.current_size
            )));
        }
        Ok(())
    }

    fn pread(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, off)
            .map_err(io_err(&self.path, "read"))
    }

    fn pwrite(&self, buf: &[u8], off: u64) -> Result<()> {
        self.file
            .write_all_at(buf, off)
            .map_err(io_err(&self.path, "write"))
    }

    fn read_parent(&self, s: &Sparse, buf: &mut [u8], offset: u64) -> Result<()> {
        match &s.parent {
            Some(p) => {
                let psize = p.footer.current_size;
                let n = (psize.saturating_sub(offset)).min(buf.len() as u64) as usize;
                if n > 0 {
                    p.read_at(&mut buf[..n], offset)?;
                }
                buf[n..].fill(0);
                Ok(())
            }
            None => Err(Error::Invalid(format!(
                "{}: differencing disk opened without its parent",
                self.path.display()
            ))),
        }
    }

    /// Splits a request into per-block pieces: (block index, offset in block, range in buf).
    fn pieces(
        block_size: u64,
        offset: u64,
        len: usize,
    ) -> impl Iterator<Item = (usize, u64, usize, usize)> {
        let mut pos = 0usize;
        std::iter::from_fn(move || {
            if pos >= len {
                return None;
            }
            let off = offset + pos as u64;
            let blk = (off / block_size) as usize;
            let inb = off % block_size;
            let n = ((block_size - inb) as usize).min(len - pos);
            let r = (blk, inb, pos, pos + n);
            pos += n;
            Some(r)
        })
    }

    fn read_bitmap(
        &self,
        s: &Sparse,
        entry: u32,
        first_sector: u64,
        count: u64,
    ) -> Result<(Vec<u8>, u64)> {
        // Reads the bitmap bytes covering sectors first_sector..first_sector+count, rounded to
        // whole 512-byte sectors of the bitmap. Returns the bytes and the bit index of byte 0.
        let first_byte = (first_sector / 8) / SECTOR * SECTOR;
        let last_byte = ((first_sector + count).div_ceil(8)).next_multiple_of(SECTOR);
        let last_byte = last_byte.min(s.bitmap_size);
        let mut b = vec![0u8; (last_byte - first_byte) as usize];
        self.pread(&mut b, entry as u64 * SECTOR + first_byte)?;
        Ok((b, first_byte * 8))
    }

    fn read_block(&self, s: &Sparse, blk: usize, inb: u64, buf: &mut [u8]) -> Result<()> {
        let entry = s.bat[blk].load(Ordering::Acquire);
        let voff = blk as u64 * s.block_size + inb;
        if entry == UNALLOCATED {
            if self.footer.disk_type == DiskType::Differencing {
                return self.read_parent(s, buf, voff);
            }
            buf.fill(0);
            return Ok(());
        }
        let data = entry as u64 * SECTOR + s.bitmap_size;
        if self.footer.disk_type == DiskType::Dynamic {
            return self.pread(buf, data + inb);
        }
        let first = inb / SECTOR;
        let count = buf.len() as u64 / SECTOR;
        let (bm, base) = self.read_bitmap(s, entry, first, count)?;
        let mut j = 0;
        while j < count {
            let v = bit(&bm, first + j - base);
            let mut k = j + 1;
            while k < count && bit(&bm, first + k - base) == v {
                k += 1;
            }
            let part = &mut buf[(j * SECTOR) as usize..(k * SECTOR) as usize];
            if v {
                self.pread(part, data + inb + j * SECTOR)?;
            } else {
                self.read_parent(s, part, voff + j * SECTOR)?;
            }
            j = k;
        }
        Ok(())
    }

    /// Returns the BAT entry of block `blk`, allocating the block if needed.
    fn allocate(&self, s: &Sparse, blk: usize) -> Result<u32> {
        let e = s.bat[blk].load(Ordering::Acquire);
        if e != UNALLOCATED {
            return Ok(e);
        }
        let mut a = s.alloc.lock().unwrap();
        let e = s.bat[blk].load(Ordering::Acquire);
        if e != UNALLOCATED {
            return Ok(e);
        }
        // Place the block so that its data (after the bitmap) is 4 KiB aligned.
        let mut start = a.footer_offset;
        let misalign = (start + s.bitmap_size) % 4096;
        if misalign != 0 {
            start += 4096 - misalign;
        }
        let new_footer = start + s.bitmap_size + s.block_size;
        if new_footer / SECTOR > u32::MAX as u64 {
            return Err(Error::Invalid(format!(
                "{}: the file cannot grow past 2 TiB",
                self.path.display()
            )));
        }
        self.write_footer_at(new_footer)?;
        let fill = if self.footer.disk_type == DiskType::Dynamic {
            0xFF
        } else {
            0
        };
        // The gap before an aligned block and the bitmap are written explicitly: the old
        // footer there must not survive as stale bytes.
        let mut head = vec![0u8; (start - a.footer_offset + s.bitmap_size) as usize];
        let gap = (start - a.footer_offset) as usize;
        head[gap..].fill(fill);
        self.pwrite(&head, a.footer_offset)?;
        a.footer_offset = new_footer;
        let e = (start / SECTOR) as u32;
        s.bat[blk].store(e, Ordering::Release);
        a.dirty.insert(blk as u32);
        Ok(e)
    }

    fn write_block(&self, s: &Sparse, blk: usize, inb: u64, buf: &[u8]) -> Result<()> {
        let entry = self.allocate(s, blk)?;
        let data = entry as u64 * SECTOR + s.bitmap_size;
        if self.footer.disk_type == DiskType::Dynamic {
            return self.pwrite(buf, data + inb);
        }
        let _g = s.stripes[blk % STRIPES].lock().unwrap();
        // The block may have been freed and reallocated by an unmap racing with us.
        let entry2 = self.allocate(s, blk)?;
        let data = if entry2 == entry {
            data
        } else {
            entry2 as u64 * SECTOR + s.bitmap_size
        };
        self.pwrite(buf, data + inb)?;
        self.update_bitmap(s, entry2, inb / SECTOR, buf.len() as u64 / SECTOR, true)
    }

    fn update_bitmap(
        &self,
        s: &Sparse,
        entry: u32,
        first: u64,
        count: u64,
        value: bool,
    ) -> Result<()> {
        let (mut bm, base) = self.read_bitmap(s, entry, first, count)?;
        let before = bm.clone();
        set_bits(&mut bm, first - base, count, value);
        if bm != before {
            self.pwrite(&bm, entry as u64 * SECTOR + base / 8)?;
        }
        Ok(())
    }

    fn unmap_block(&self, s: &Sparse, blk: usize, inb: u64, len: u64) -> Result<()> {
        let entry = s.bat[blk].load(Ordering::Acquire);
        if entry == UNALLOCATED {
            return Ok(());
        }
        let block_end = (blk as u64 + 1) * s.block_size;
        let whole = inb == 0
            && (len == s.block_size
                || blk as u64 * s.block_size + len >= self.footer.current_size.min(block_end));
        if whole {
            let _g = s.stripes[blk % STRIPES].lock().unwrap();
            let mut a = s.alloc.lock().unwrap();
            s.bat[blk].store(UNALLOCATED, Ordering::Release);
            a.dirty.insert(blk as u32);
            return Ok(());
        }
        if self.footer.disk_type == DiskType::Differencing {
            let _g = s.stripes[blk % STRIPES].lock().unwrap();
            let entry = s.bat[blk].load(Ordering::Acquire);
            if entry == UNALLOCATED {
                return Ok(());
            }
            return self.update_bitmap(s, entry, inb / SECTOR, len / SECTOR, false);
        }
        let data = entry as u64 * SECTOR + s.bitmap_size;
        punch_zeros(&self.file, &self.path, data + inb, len)
    }

    /// Writes the dirty BAT entries (after making everything they point to durable).
    fn flush_bat(&self, s: &Sparse) -> Result<()> {
        let _serial = s.flush_lock.lock().unwrap();
        // Snapshot the changed entries: only these have their blocks (data, bitmap, footer)
        // written before the fsync below. Entries changed later wait for the next flush.
        let changes: Vec<(u32, u32)> = {
            let mut a = s.alloc.lock().unwrap();
            std::mem::take(&mut a.dirty)
                .into_iter()
                .map(|i| (i, s.bat[i as usize].load(Ordering::Acquire)))
                .collect()
        };
        self.file.sync_data().map_err(io_err(&self.path, "fsync"))?;
        if changes.is_empty() {
            return Ok(());
        }
        let to = s.header.table_offset;
        let res = (|| {
            let mut i = 0;
            while i < changes.len() {
                // One read-modify-write per BAT sector: other entries keep their on-disk value.
                let sec = changes[i].0 as u64 * 4 / SECTOR;
                let mut b = [0u8; SECTOR as usize];
                self.pread(&mut b, to + sec * SECTOR)?;
                while i < changes.len() && changes[i].0 as u64 * 4 / SECTOR == sec {
                    let o = (changes[i].0 as u64 * 4 % SECTOR) as usize;
                    b[o..o + 4].copy_from_slice(&changes[i].1.to_be_bytes());
                    i += 1;
                }
                self.pwrite(&b, to + sec * SECTOR)?;
            }
            self.file.sync_data().map_err(io_err(&self.path, "fsync"))
        })();
        if res.is_err() {
            s.alloc
                .lock()
                .unwrap()
                .dirty
                .extend(changes.iter().map(|c| c.0));
        }
        res
    }
}

/// Writes `len` zero bytes at `off`.
pub(crate) fn write_zeros(file: &File, path: &Path, mut off: u64, mut len: u64) -> Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    while len > 0 {
        let n = len.min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], off)
            .map_err(io_err(path, "write"))?;
        off += n;
        len -= n;
    }
    Ok(())
}

/// Makes `len` bytes at `off` read as zeros, punching a hole when the file system can (so the
/// space returns to the host), else writing zeros.
pub(crate) fn punch_zeros(file: &File, path: &Path, off: u64, len: u64) -> Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    if len == 0 {
        return Ok(());
    }
    match fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        off,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(_) => write_zeros(file, path, off, len),
    }
}

/// The absolute and relative (".\name") parent paths written into a child's locators.
fn locator_strings(child: &Path, parent: &Path) -> Result<(String, String)> {
    let abs = std::fs::canonicalize(parent).map_err(io_err(parent, "resolve"))?;
    let child_dir = child
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let child_dir = std::fs::canonicalize(child_dir).map_err(io_err(child_dir, "resolve"))?;
    let rel = relative_path(&child_dir, &abs);
    let rel = format!(".\\{}", rel.replace('/', "\\"));
    Ok((abs.to_string_lossy().into_owned(), rel))
}

/// `to` relative to the directory `from` (both absolute), with ".." components as needed.
pub(crate) fn relative_path(from: &Path, to: &Path) -> String {
    let f: Vec<_> = from.components().collect();
    let t: Vec<_> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".into(); f.len() - common];
    parts.extend(
        t[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

fn parent_mtime(p: &Path) -> u32 {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs().saturating_sub(VHD_EPOCH) as u32)
        .unwrap_or(0)
}

impl Disk for Vhd {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let Some(s) = &self.sparse else {
            return self.pread(buf, offset);
        };
        for (blk, inb, a, b) in Self::pieces(s.block_size, offset, buf.len()) {
            self.read_block(s, blk, inb, &mut buf[a..b])?;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, buf.len() as u64)?;
        let Some(s) = &self.sparse else {
            return self.pwrite(buf, offset);
        };
        for (blk, inb, a, b) in Self::pieces(s.block_size, offset, buf.len()) {
            self.write_block(s, blk, inb, &buf[a..b])?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        match &self.sparse {
            None => self.file.sync_data().map_err(io_err(&self.path, "fsync"))?,
            Some(s) => self.flush_bat(s)?,
        }
        self.direct.drop_cached(self.file.as_fd());
        Ok(())
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        let Some(s) = &self.sparse else {
            return punch_zeros(&self.file, &self.path, offset, len);
        };
        let len = usize::try_from(len).map_err(|_| Error::Invalid("unmap too long".into()))?;
        for (blk, inb, a, b) in Self::pieces(s.block_size, offset, len) {
            self.unmap_block(s, blk, inb, (b - a) as u64)?;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.footer.current_size
    }

    fn logical_sector_size(&self) -> u32 {
        512
    }

    fn physical_sector_size(&self) -> u32 {
        512
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// A fixed disk maps 1:1; a dynamic one by block (unallocated blocks read as zeros, or as
    /// the parent's data in a differencing disk). Writes to unallocated blocks and anything
    /// that needs a differencing disk's sector bitmap go through [`Disk::write_at`].
    fn extent(&self, offset: u64, len: u64, write: bool) -> Result<Extent<'_>> {
        if write && self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        let file = |offset, len| Extent::File {
            fd: self.file.as_fd(),
            direct: &self.direct,
            path: &self.path,
            offset,
            len,
        };
        let Some(s) = &self.sparse else {
            return Ok(file(offset, len));
        };
        let Some((blk, inb, a, b)) = Self::pieces(s.block_size, offset, len as usize).next() else {
            return Ok(Extent::Indirect { len });
        };
        let n = (b - a) as u64;
        let entry = s.bat[blk].load(Ordering::Acquire);
        let differencing = self.footer.disk_type == DiskType::Differencing;
        Ok(match (entry == UNALLOCATED, differencing, write) {
            (false, false, _) => file(entry as u64 * SECTOR + s.bitmap_size + inb, n),
            (true, false, false) => Extent::Zero { len: n },
            (true, true, false) => match &s.parent {
                Some(p) if offset < p.footer.current_size => {
                    p.extent(offset, n.min(p.footer.current_size - offset), false)?
                }
                Some(_) => Extent::Zero { len: n },
                None => Extent::Indirect { len: n },
            },
            _ => Extent::Indirect { len: n },
        })
    }
}

impl Drop for Vhd {
    fn drop(&mut self) {
        if !self.read_only {
            if let Some(s) = &self.sparse {
                let _ = self.flush_bat(s);
            }
        }
    }
}
