//! Disk images as SCSI media: a `vhdx` crate image (VHDX, VHD or raw, detected from the
//! content) behind [`scsi::Medium`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use scsi::{Medium, MediumError};
use vhdx::Disk;

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenDiskError {
    /// A raw or VHD image another writer holds.
    #[error("disk {}: lock for writing (the file is in use): {source}", path.display())]
    InUse {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image could not be opened (missing, in use, not an image, ...).
    #[error("disk {}: {reason}", path.display())]
    Image {
        path: PathBuf,
        /// The image error without the path it repeats.
        reason: String,
        #[source]
        source: vhdx::Error,
    },
}

/// An open image as a medium. Keeps the image (and with it the VHDX file lock) until dropped.
pub struct ImageMedium {
    image: vhdx::open::Image,
    /// The advisory lock on raw and VHD files (the vhdx crate locks VHDX files itself).
    _lock: Option<std::fs::File>,
    id: [u8; 16],
    read_only: bool,
}

impl std::fmt::Debug for ImageMedium {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageMedium")
            .field("path", &self.image.path())
            .field("format", &self.image.format())
            .finish()
    }
}

/// A stable 16-byte id for images without one of their own (raw files): FNV-1a of the
/// canonical path, so the guest's /dev/disk/by-id names survive a reboot.
fn path_id(path: &Path) -> [u8; 16] {
    let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = [0u8; 16];
    for (half, seed) in [
        (0usize, 0xcbf2_9ce4_8422_2325u64),
        (8, 0x8422_2325_cbf2_9ce4),
    ] {
        let mut h = seed;
        for b in p.as_os_str().as_encoded_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        out[half..half + 8].copy_from_slice(&h.to_le_bytes());
    }
    out
}

/// The same policy as the vhdx crate's for VHDX files: one writer, or any number of readers;
/// a read-only open of a file in use still proceeds.
fn lock(path: &Path, read_only: bool) -> Result<Option<std::fs::File>, OpenDiskError> {
    use rustix::fs::{flock, FlockOperation};
    let in_use = |source: std::io::Error| OpenDiskError::InUse {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(in_use)?;
    if read_only {
        return Ok(flock(&file, FlockOperation::NonBlockingLockShared)
            .ok()
            .map(|()| file));
    }
    flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|e| in_use(e.into()))?;
    Ok(Some(file))
}

impl ImageMedium {
    /// Opens `path` in `format`, or probed from the content and checked against the name
    /// (`vhdx::open::probe`) when `None`. A VHDX opened for writing holds its file lock, so a
    /// second writer fails with an error naming the file.
    pub fn open(
        path: &Path,
        format: Option<vhdx::open::Format>,
        read_only: bool,
    ) -> Result<Self, OpenDiskError> {
        let image = match format {
            Some(f) => vhdx::open::open_as(path, f, read_only),
            None => vhdx::open::open(path, read_only),
        }
        .map_err(|source| {
            let text = source.to_string();
            let prefix = format!("{}: ", path.display());
            let reason = text.strip_prefix(&prefix).unwrap_or(&text).to_string();
            OpenDiskError::Image {
                path: path.to_path_buf(),
                reason,
                source,
            }
        })?;
        let lock = match image.format() {
            vhdx::open::Format::Vhdx => None,
            _ => lock(path, read_only)?,
        };
        let id = match &image {
            vhdx::open::Image::Vhdx(d) => *d.disk_id().as_bytes(),
            vhdx::open::Image::Vhd(d) => *d.unique_id().as_bytes(),
            vhdx::open::Image::Raw(_) => path_id(path),
        };
        Ok(Self {
            image,
            _lock: lock,
            id,
            read_only,
        })
    }

    pub fn path(&self) -> &Path {
        self.image.path()
    }

    pub fn format(&self) -> vhdx::open::Format {
        self.image.format()
    }
}

impl Medium for ImageMedium {
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), MediumError> {
        self.image
            .read_at(buf, off)
            .map_err(|e| MediumError::io(off, e))
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<(), MediumError> {
        if self.read_only {
            return Err(MediumError::read_only(off));
        }
        self.image
            .write_at(buf, off)
            .map_err(|e| MediumError::io(off, e))
    }
    fn flush(&self) -> Result<(), MediumError> {
        self.image.flush().map_err(|e| MediumError::io(0, e))
    }
    fn unmap(&self, off: u64, len: u64) -> Result<(), MediumError> {
        self.image
            .unmap(off, len)
            .map_err(|e| MediumError::io(off, e))
    }
    fn size(&self) -> u64 {
        self.image.size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.image.logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.image.physical_sector_size()
    }
    fn is_read_only(&self) -> bool {
        self.read_only || self.image.is_read_only()
    }
    fn disk_id(&self) -> [u8; 16] {
        self.id
    }
    fn supports_unmap(&self) -> bool {
        !self.is_read_only()
    }
}

/// A disk for the controller: a medium and what inspection shows about it.
#[derive(Clone)]
pub struct DiskSpec {
    pub medium: Arc<dyn Medium>,
    /// The file, for logs and inspection.
    pub path: PathBuf,
    /// "VHDX", "VHD", "raw", or whatever the caller's medium is.
    pub format: String,
}

impl std::fmt::Debug for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskSpec")
            .field("path", &self.path)
            .field("format", &self.format)
            .finish()
    }
}

impl DiskSpec {
    /// Opens an image file, in `format` or (`None`) the one its content and name agree on.
    pub fn open(
        path: &Path,
        format: Option<vhdx::open::Format>,
        read_only: bool,
    ) -> Result<Self, OpenDiskError> {
        let m = ImageMedium::open(path, format, read_only)?;
        Ok(Self {
            path: m.path().to_path_buf(),
            format: m.format().name().to_string(),
            medium: Arc::new(m),
        })
    }

    /// Opens an ISO image for a DVD drive: raw, read-only, and shared with other readers
    /// (it takes no write lock, so several VMs can load the same ISO).
    pub fn open_iso(path: &Path) -> Result<Self, OpenDiskError> {
        let mut spec = Self::open(path, Some(vhdx::open::Format::Raw), true)?;
        spec.format = "ISO".into();
        Ok(spec)
    }

    /// Any medium (tests use a failing one).
    pub fn from_medium(medium: Arc<dyn Medium>, path: impl Into<PathBuf>, format: &str) -> Self {
        Self {
            medium,
            path: path.into(),
            format: format.into(),
        }
    }
}
