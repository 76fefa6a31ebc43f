//! Opening any disk image by probing its format.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::raw::RawDisk;
use crate::vhd::{Vhd, VhdOpenOptions};
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

/// Identifies a file's format from its contents: the VHDX file identifier at offset 0, a VHD
/// footer at the end (or its copy at offset 0), else raw.
pub fn probe(path: impl AsRef<Path>) -> Result<Format> {
    let path = path.as_ref();
    let io = |op, source| Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let file = File::open(path).map_err(|e| io("open", e))?;
    let len = file.metadata().map_err(|e| io("stat", e))?.len();
    let mut sig = [0u8; 8];
    if len >= 8 {
        file.read_exact_at(&mut sig, 0).map_err(|e| io("read", e))?;
        if &sig == b"vhdxfile" {
            return Ok(Format::Vhdx);
        }
        if &sig == b"conectix" {
            return Ok(Format::Vhd);
        }
    }
    if len >= 512 {
        file.read_exact_at(&mut sig, len - 512)
            .map_err(|e| io("read", e))?;
        if &sig == b"conectix" {
            return Ok(Format::Vhd);
        }
    }
    Ok(Format::Raw)
}

/// An open image of any format.
pub enum Image {
    Vhd(Box<Vhd>),
    Raw(RawDisk),
}

impl Image {
    pub fn format(&self) -> Format {
        match self {
            Image::Vhd(_) => Format::Vhd,
            Image::Raw(_) => Format::Raw,
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Image::Vhd(d) => d.path(),
            Image::Raw(d) => d.path(),
        }
    }

    fn disk(&self) -> &dyn Disk {
        match self {
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

/// Opens an image in a known format.
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
        Format::Vhdx => Err(Error::Invalid(format!(
            "{}: VHDX images are not supported yet",
            path.display()
        ))),
    }
}

/// Opens an image as a boxed disk.
pub fn open_disk(path: impl AsRef<Path>, read_only: bool) -> Result<Box<dyn Disk>> {
    Ok(match open(path, read_only)? {
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
}
