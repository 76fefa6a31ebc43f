//! Opening any disk image by probing its format.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::raw::RawDisk;
use crate::vhd::{Vhd, VhdOpenOptions};
use crate::vhdx::{ShrinkPolicy, Vhdx, VhdxBuilder, VhdxKind};
use crate::{Disk, Error, Result};

/// The image formats this crate reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Vhdx,
    Vhd,
    Raw,
}

impl Format {
    /// The format a file name's extension implies (.vhdx, .vhd, .img/.raw/.bin).
    pub fn from_extension(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "vhdx" | "avhdx" => Some(Format::Vhdx),
            "vhd" | "avhd" => Some(Format::Vhd),
            "img" | "raw" | "bin" => Some(Format::Raw),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Vhdx => "VHDX",
            Format::Vhd => "VHD",
            Format::Raw => "raw",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "vhdx" => Ok(Format::Vhdx),
            "vhd" | "vpc" => Ok(Format::Vhd),
            "raw" | "img" => Ok(Format::Raw),
            _ => Err(format!("unknown format {s:?} (vhdx, vhd or raw)")),
        }
    }
}

/// What a file's bytes say it is: the VHDX file identifier at offset 0, a VHD footer at the
/// end (or its copy at offset 0), else nothing (raw data).
fn content_format(file: &File, len: u64) -> std::io::Result<Format> {
    let mut sig = [0u8; 8];
    if len >= 8 {
        file.read_exact_at(&mut sig, 0)?;
        if &sig == b"vhdxfile" {
            return Ok(Format::Vhdx);
        }
        if &sig == b"conectix" {
            return Ok(Format::Vhd);
        }
    }
    if len >= 512 {
        file.read_exact_at(&mut sig, len - 512)?;
        if &sig == b"conectix" {
            return Ok(Format::Vhd);
        }
    }
    Ok(Format::Raw)
}

fn found(content: Format) -> &'static str {
    match content {
        Format::Vhdx => "the file is a VHDX image",
        Format::Vhd => "the file is a VHD image",
        Format::Raw => "the file holds neither VHDX nor VHD structures",
    }
}

/// Identifies a file's format from its contents (see [`content_format`]) and checks it
/// against the name: a `.vhdx`/`.avhdx` file must carry the VHDX file identifier
/// ("vhdxfile" at offset 0), a `.vhd`/`.avhd` file the VHD footer cookie ("conectix" in its
/// last 512 bytes). A file with neither is raw only if its size is a whole number of 512-byte
/// sectors; anything else is refused with an error naming the file, the missing signature and
/// its offset. Opening a file explicitly as raw ([`open_as`] with [`Format::Raw`]) skips these
/// checks.
pub fn probe(path: impl AsRef<Path>) -> Result<Format> {
    let path = path.as_ref();
    let io = |op, source| Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let file = File::open(path).map_err(|e| io("open", e))?;
    let len = file.metadata().map_err(|e| io("stat", e))?.len();
    let content = content_format(&file, len).map_err(|e| io("read", e))?;
    let refuse = |structure, offset, problem: String| {
        Err(Error::Corrupt {
            path: path.to_path_buf(),
            structure,
            offset,
            problem,
        })
    };
    match (Format::from_extension(path), content) {
        (Some(Format::Vhdx), c) if c != Format::Vhdx => refuse(
            "VHDX file identifier",
            0,
            format!(
                "signature \"vhdxfile\" missing: the name says VHDX but {}",
                found(c)
            ),
        ),
        (Some(Format::Vhd), c) if c != Format::Vhd => {
            let (offset, problem) = if len < 512 {
                (
                    0,
                    format!("the file is {len} bytes, too short for the 512-byte VHD footer"),
                )
            } else {
                (
                    len - 512,
                    format!(
                        "cookie \"conectix\" missing (here and in the copy at offset 0): the \
                         name says VHD but {}",
                        found(c)
                    ),
                )
            };
            refuse("VHD footer", offset, problem)
        }
        (_, Format::Raw) if !len.is_multiple_of(512) => refuse(
            "raw image",
            len,
            format!(
                "{len} bytes is not a whole number of 512-byte sectors, and there is no VHDX \
                 signature (\"vhdxfile\" at offset 0) or VHD footer (\"conectix\"); open it \
                 explicitly as raw (format=raw) to use its first {} bytes",
                len / 512 * 512
            ),
        ),
        (_, c) => Ok(c),
    }
}

/// An open image of any format.
pub enum Image {
    Vhdx(Box<Vhdx>),
    Vhd(Box<Vhd>),
    Raw(RawDisk),
}

impl Image {
    pub fn format(&self) -> Format {
        match self {
            Image::Vhdx(_) => Format::Vhdx,
            Image::Vhd(_) => Format::Vhd,
            Image::Raw(_) => Format::Raw,
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Image::Vhdx(d) => d.path(),
            Image::Vhd(d) => d.path(),
            Image::Raw(d) => d.path(),
        }
    }

    fn disk(&self) -> &dyn Disk {
        match self {
            Image::Vhdx(d) => &**d,
            Image::Vhd(d) => &**d,
            Image::Raw(d) => d,
        }
    }
}

/// Opens an image whose format is probed from its contents, with its differencing chain.
pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Image> {
    let path = path.as_ref();
    open_as(path, probe(path)?, read_only)
}

/// Opens an image in a known format, without [`probe`]'s checks of the name and size: a raw
/// file of any length presents its whole 512-byte sectors.
pub fn open_as(path: impl AsRef<Path>, format: Format, read_only: bool) -> Result<Image> {
    let path = path.as_ref();
    match format {
        Format::Vhd => Ok(Image::Vhd(Box::new(Vhd::open(
            path,
            &VhdOpenOptions {
                read_only,
                no_parent: false,
            },
        )?))),
        Format::Raw => Ok(Image::Raw(RawDisk::open(path, read_only)?)),
        Format::Vhdx => Ok(Image::Vhdx(Box::new(Vhdx::open(path, read_only)?))),
    }
}

/// Opens an image as a boxed disk.
pub fn open_disk(path: impl AsRef<Path>, read_only: bool) -> Result<Box<dyn Disk>> {
    Ok(match open(path, read_only)? {
        Image::Vhdx(d) => d,
        Image::Vhd(d) => d,
        Image::Raw(d) => Box::new(d),
    })
}

impl Disk for Image {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.disk().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.disk().write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.disk().flush()
    }
    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.disk().unmap(offset, len)
    }
    fn size(&self) -> u64 {
        self.disk().size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.disk().logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.disk().physical_sector_size()
    }
    fn is_read_only(&self) -> bool {
        self.disk().is_read_only()
    }
    fn extent(&self, offset: u64, len: u64, write: bool) -> Result<crate::Extent<'_>> {
        self.disk().extent(offset, len, write)
    }
}

/// Allocation types, as Get-VHD's VhdType reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageType {
    Fixed,
    Dynamic,
    Differencing,
}

impl ImageType {
    pub fn name(self) -> &'static str {
        match self {
            ImageType::Fixed => "Fixed",
            ImageType::Dynamic => "Dynamic",
            ImageType::Differencing => "Differencing",
        }
    }
}

/// Format-independent properties of an image (Get-VHD's fields).
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub format: Format,
    pub image_type: ImageType,
    pub size: u64,
    pub file_size: u64,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// 0 for fixed and raw images.
    pub block_size: u32,
    pub parent_path: Option<std::path::PathBuf>,
    pub disk_id: Option<String>,
    /// Share of allocated blocks that do not follow their predecessor in the file.
    pub fragmentation_percent: Option<u32>,
}

/// What to create.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub format: Format,
    pub image_type: ImageType,
    pub size: u64,
    /// 0 = the format's default.
    pub block_size: u32,
    /// 0 = 512.
    pub logical_sector_size: u32,
    /// 0 = the format's default.
    pub physical_sector_size: u32,
    pub parent: Option<std::path::PathBuf>,
}

/// Creates an image and opens it read-write.
pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Image> {
    use crate::vhd::{DiskType, VhdCreateOptions};
    let path = path.as_ref();
    let lss = if opts.logical_sector_size == 0 {
        512
    } else {
        opts.logical_sector_size
    };
    match opts.format {
        Format::Raw => {
            if opts.parent.is_some() {
                return Err(Error::Invalid("raw images have no parent".into()));
            }
            let pss = if opts.physical_sector_size == 0 {
                lss
            } else {
                opts.physical_sector_size
            };
            RawDisk::create(path, opts.size)?;
            Ok(Image::Raw(RawDisk::open_with_sectors(
                path, false, lss, pss,
            )?))
        }
        Format::Vhd => {
            if lss != 512 || !matches!(opts.physical_sector_size, 0 | 512) {
                return Err(Error::Invalid(
                    "VHD supports only 512-byte logical and physical sectors".into(),
                ));
            }
            let disk_type = match (opts.image_type, &opts.parent) {
                (_, Some(_)) => DiskType::Differencing,
                (ImageType::Fixed, None) => DiskType::Fixed,
                (ImageType::Dynamic, None) => DiskType::Dynamic,
                (ImageType::Differencing, None) => {
                    return Err(Error::Invalid("a differencing disk needs a parent".into()))
                }
            };
            let mut block_size = if opts.block_size == 0 {
                2 << 20
            } else {
                opts.block_size
            };
            if let (Some(p), 0) = (&opts.parent, opts.block_size) {
                if let Ok(parent) = Vhd::open(
                    p,
                    &VhdOpenOptions {
                        read_only: true,
                        no_parent: true,
                    },
                ) {
                    block_size = parent.block_size().unwrap_or(block_size);
                }
            }
            Ok(Image::Vhd(Box::new(Vhd::create(
                path,
                &VhdCreateOptions {
                    disk_type,
                    size: opts.size,
                    block_size,
                    parent: opts.parent.clone(),
                },
            )?)))
        }
        Format::Vhdx => {
            let mut b = match (&opts.parent, opts.image_type) {
                (Some(p), _) => VhdxBuilder::differencing(p),
                (None, ImageType::Differencing) => {
                    return Err(Error::Invalid("a differencing disk needs a parent".into()))
                }
                (None, t) => VhdxBuilder::new(opts.size).fixed(t == ImageType::Fixed),
            };
            if opts.block_size != 0 {
                b = b.block_size(opts.block_size);
            }
            if opts.parent.is_none() {
                b = b.logical_sector_size(lss);
                if opts.physical_sector_size != 0 {
                    b = b.physical_sector_size(opts.physical_sector_size);
                }
            }
            Ok(Image::Vhdx(Box::new(b.create(path)?)))
        }
    }
}

fn file_size(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            op: "stat",
            source,
        })
}

/// Percentage of allocated blocks (in virtual order) that do not start where the previous
/// allocated block ended in the file.
fn fragmentation(offsets: &[(u64, u64)], stride: u64) -> Option<u32> {
    if offsets.len() < 2 {
        return Some(0);
    }
    let mut breaks = 0u64;
    for w in offsets.windows(2) {
        let next = w[0].1 + stride;
        if w[1].1 < next || w[1].1 >= next + 4096 {
            breaks += 1;
        }
    }
    Some((breaks * 100 / (offsets.len() as u64 - 1)) as u32)
}

impl Image {
    pub fn info(&self) -> Result<ImageInfo> {
        let file_size = file_size(self.path())?;
        Ok(match self {
            Image::Vhdx(d) => {
                let i = d.info()?;
                ImageInfo {
                    format: Format::Vhdx,
                    image_type: match i.kind {
                        VhdxKind::Fixed => ImageType::Fixed,
                        VhdxKind::Dynamic => ImageType::Dynamic,
                        VhdxKind::Differencing => ImageType::Differencing,
                    },
                    size: i.virtual_size,
                    file_size,
                    logical_sector_size: i.logical_sector_size,
                    physical_sector_size: i.physical_sector_size,
                    block_size: i.block_size,
                    parent_path: i.parent_path,
                    disk_id: Some(i.disk_id.to_string().to_uppercase()),
                    fragmentation_percent: fragmentation(
                        &d.allocated_block_offsets(),
                        u64::from(i.block_size),
                    ),
                }
            }
            Image::Raw(d) => ImageInfo {
                format: Format::Raw,
                image_type: ImageType::Fixed,
                size: d.size(),
                file_size,
                logical_sector_size: d.logical_sector_size(),
                physical_sector_size: d.physical_sector_size(),
                block_size: 0,
                parent_path: None,
                disk_id: None,
                fragmentation_percent: None,
            },
            Image::Vhd(d) => {
                let i = d.info();
                let stride = i.block_size.unwrap_or(0) as u64
                    + crate::vhd::format::bitmap_size(i.block_size.unwrap_or(512));
                ImageInfo {
                    format: Format::Vhd,
                    image_type: match i.disk_type {
                        crate::vhd::DiskType::Fixed => ImageType::Fixed,
                        crate::vhd::DiskType::Dynamic => ImageType::Dynamic,
                        crate::vhd::DiskType::Differencing => ImageType::Differencing,
                    },
                    size: i.size,
                    file_size,
                    logical_sector_size: 512,
                    physical_sector_size: 512,
                    block_size: i.block_size.unwrap_or(0),
                    parent_path: i.parent_path,
                    disk_id: Some(i.unique_id.to_string().to_uppercase()),
                    fragmentation_percent: match i.block_size {
                        Some(_) => fragmentation(&d.allocated_block_offsets(), stride),
                        None => Some(0),
                    },
                }
            }
        })
    }

    /// Byte ranges this file itself holds data for (not its parents), merged, ascending.
    pub fn allocated_ranges(&self) -> Result<Vec<(u64, u64)>> {
        match self {
            Image::Vhdx(d) => d.allocated_ranges(),
            Image::Raw(d) => d.data_ranges(),
            Image::Vhd(d) => d.allocated_ranges(),
        }
    }

    /// Byte ranges any file of the chain holds data for: everything else reads as zeros.
    pub fn chain_allocated_ranges(&self) -> Result<Vec<(u64, u64)>> {
        if let Image::Vhdx(d) = self {
            return d.chain_allocated_ranges();
        }
        let mut all = self.allocated_ranges()?;
        if let Image::Vhd(d) = self {
            let mut p = d.parent();
            while let Some(v) = p {
                all.extend(v.allocated_ranges()?);
                p = v.parent();
            }
        }
        Ok(merge_ranges(all, self.size()))
    }

    /// Structural check of the file and its chain: the problems found (empty = healthy).
    pub fn check(&self) -> Vec<String> {
        match self {
            Image::Raw(_) | Image::Vhdx(_) => Vec::new(),
            Image::Vhd(d) => d.check(),
        }
    }

    /// Paths of the chain, this file first.
    pub fn chain_paths(&self) -> Vec<std::path::PathBuf> {
        let mut v = vec![self.path().to_path_buf()];
        match self {
            Image::Vhd(d) => {
                let mut p = d.parent();
                while let Some(x) = p {
                    v.push(x.path().to_path_buf());
                    p = x.parent();
                }
            }
            Image::Vhdx(d) => {
                let mut p = d.parent();
                while let Some(x) = p {
                    v.push(x.path().to_path_buf());
                    p = x.parent();
                }
            }
            Image::Raw(_) => {}
        }
        v
    }

    pub fn resize(&mut self, size: u64) -> Result<()> {
        match self {
            Image::Raw(d) => d.resize(size),
            Image::Vhd(d) => d.resize(size),
            Image::Vhdx(d) => d.resize(size, ShrinkPolicy::KeepData),
        }
    }

    /// Gives the image a new disk identifier.
    pub fn reset_disk_id(&mut self) -> Result<()> {
        match self {
            Image::Vhd(d) => d.set_unique_id(uuid::Uuid::new_v4()),
            Image::Vhdx(d) => d.set_disk_id(uuid::Uuid::new_v4()),
            Image::Raw(_) => Err(Error::Invalid("raw images have no disk identifier".into())),
        }
    }

    /// Returns unused space to the host: (file size before, after).
    pub fn compact(&mut self, progress: &mut dyn FnMut(u64, u64)) -> Result<(u64, u64)> {
        match self {
            Image::Vhd(d) => d.compact(progress),
            Image::Vhdx(d) => {
                progress(0, 2);
                if d.info()?.kind != VhdxKind::Fixed {
                    let blocks: Vec<u64> = d
                        .reclaimable_blocks()?
                        .into_iter()
                        .map(|(b, _)| b)
                        .collect();
                    d.discard_blocks(&blocks)?;
                }
                progress(1, 2);
                let st = d.compact()?;
                progress(2, 2);
                Ok((st.old_file_size, st.new_file_size))
            }
            Image::Raw(d) => {
                let s = file_size(d.path())?;
                Ok((s, s))
            }
        }
    }

    /// Smallest size that keeps every non-zero byte: the end of the last allocated range, less
    /// trailing zero sectors.
    pub fn minimum_size(&self) -> Result<u64> {
        let ranges = self.chain_allocated_ranges()?;
        let ss = self.logical_sector_size() as u64;
        let mut buf = vec![0u8; 1 << 20];
        for &(start, len) in ranges.iter().rev() {
            let mut end = start + len;
            while end > start {
                let n = (end - start).min(buf.len() as u64);
                let b = &mut buf[..n as usize];
                self.read_at(b, end - n)?;
                // Slice comparison is a memcmp: fast even in unoptimized builds.
                let zeros = [0u8; 4096];
                let mut k = b.len();
                while k > 0 {
                    let j = k.saturating_sub(zeros.len());
                    if b[j..k] != zeros[..k - j] {
                        let pos = b[j..k].iter().rposition(|&x| x != 0).unwrap() + j;
                        return Ok((end - n + pos as u64 + 1).next_multiple_of(ss));
                    }
                    k = j;
                }
                end -= n;
            }
        }
        Ok(0)
    }
}

/// Sorts and merges overlapping or adjacent ranges, clipped to `size`.
pub fn merge_ranges(mut v: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in v {
        let e = (s + l).min(size);
        if e <= s {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= s => {
                last.1 = last.1.max(e - last.0);
            }
            _ => out.push((s, e - s)),
        }
    }
    out
}

/// Opens an image without following its parent (to inspect a broken chain). VHD files open
/// read-write, VHDX files read-only.
pub fn open_without_parent(path: impl AsRef<Path>) -> Result<Image> {
    let path = path.as_ref();
    match probe(path)? {
        Format::Vhd => Ok(Image::Vhd(Box::new(Vhd::open(
            path,
            &VhdOpenOptions {
                read_only: false,
                no_parent: true,
            },
        )?))),
        Format::Vhdx => Ok(Image::Vhdx(Box::new(Vhdx::open_without_parent(path)?))),
        Format::Raw => open_as(path, Format::Raw, false),
    }
}

/// Points a differencing image at a (moved) parent (Set-VHD -ParentPath). The parent's
/// identity must match what the child recorded unless `ignore_id_mismatch`. The child must not
/// be open elsewhere.
pub fn set_parent(
    child: impl AsRef<Path>,
    parent: impl AsRef<Path>,
    ignore_id_mismatch: bool,
) -> Result<()> {
    let (child, parent) = (child.as_ref(), parent.as_ref());
    match probe(child)? {
        Format::Vhd => Vhd::open(
            child,
            &VhdOpenOptions {
                read_only: false,
                no_parent: true,
            },
        )?
        .set_parent(parent, ignore_id_mismatch),
        Format::Vhdx => crate::vhdx::set_parent(child, parent, ignore_id_mismatch),
        Format::Raw => Err(Error::Invalid(format!(
            "{}: raw images have no parent",
            child.display()
        ))),
    }
}
