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
    disk: Arc<dyn Disk>,
    path: PathBuf,
    /// The advisory lock on raw and VHD files (the vhdx crate locks VHDX files itself).
    _lock: Option<std::fs::File>,
    id: [u8; 16],
    read_only: bool,
}

impl std::fmt::Debug for ImageMedium {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageMedium")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
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
    use vhdx::lock_file;
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
    lock_file(&file, FlockOperation::NonBlockingLockExclusive).map_err(|e| in_use(e.into()))?;
    Ok(Some(file))
}

impl ImageMedium {
    /// Opens `path` in `format`, or probed from the content and checked against the name
    /// (`vhdx::open::probe`) when `None`. A VHDX opened for writing holds its file lock, so a
    /// second writer fails with an error naming the file. Returns the medium and the format
    /// it was opened in.
    pub fn open(
        path: &Path,
        format: Option<vhdx::open::Format>,
        read_only: bool,
    ) -> Result<(Self, vhdx::open::Format), OpenDiskError> {
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
        let format = image.format();
        let medium = Self {
            path: image.path().to_path_buf(),
            disk: Arc::new(image),
            _lock: lock,
            id,
            read_only,
        };
        Ok((medium, format))
    }

    /// Any disk as a medium (tests use failing and stalling ones), with `id` for its VPD
    /// pages.
    pub fn from_disk(disk: Arc<dyn Disk>, path: impl Into<PathBuf>, id: [u8; 16]) -> Self {
        Self {
            read_only: disk.is_read_only(),
            disk,
            path: path.into(),
            _lock: None,
            id,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disk behind the medium, for vectored I/O on guest memory.
    pub fn disk(&self) -> &Arc<dyn Disk> {
        &self.disk
    }
}

impl Medium for ImageMedium {
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), MediumError> {
        self.disk
            .read_at(buf, off)
            .map_err(|e| MediumError::io(off, e))
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<(), MediumError> {
        if self.read_only {
            return Err(MediumError::read_only(off));
        }
        self.disk
            .write_at(buf, off)
            .map_err(|e| MediumError::io(off, e))
    }
    fn flush(&self) -> Result<(), MediumError> {
        self.disk.flush().map_err(|e| MediumError::io(0, e))
    }
    fn unmap(&self, off: u64, len: u64) -> Result<(), MediumError> {
        self.disk
            .unmap(off, len)
            .map_err(|e| MediumError::io(off, e))
    }
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn logical_sector_size(&self) -> u32 {
        self.disk.logical_sector_size()
    }
    fn physical_sector_size(&self) -> u32 {
        self.disk.physical_sector_size()
    }
    fn is_read_only(&self) -> bool {
        self.read_only || self.disk.is_read_only()
    }
    fn disk_id(&self) -> [u8; 16] {
        self.id
    }
    fn supports_unmap(&self) -> bool {
        !self.is_read_only()
    }
}

/// Whether a disk's data goes through the host's page cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Unbuffered, as Hyper-V: aligned READ and WRITE move between guest pages and the file
    /// with `O_DIRECT` (where the file system takes it); everything else is buffered.
    #[default]
    None,
    /// Through the host's page cache (QEMU's default).
    Writeback,
}

impl CacheMode {
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
        }
    }
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(CacheMode::None),
            "writeback" => Ok(CacheMode::Writeback),
            _ => Err(format!("cache={s:?} is not none or writeback")),
        }
    }
}

/// A disk for the controller: a medium and what inspection shows about it.
#[derive(Clone)]
pub struct DiskSpec {
    pub medium: Arc<dyn Medium>,
    /// The same disk as a `vhdx` crate [`Disk`], when it has one: READ and WRITE then move
    /// data straight between its file and guest memory. `None`: every command goes through
    /// the medium and a bounce buffer.
    pub disk: Option<Arc<dyn Disk>>,
    /// The file, for logs and inspection.
    pub path: PathBuf,
    /// "VHDX", "VHD", "raw", or whatever the caller's medium is.
    pub format: String,
    /// Whether direct READ and WRITE bypass the host's page cache.
    pub cache: CacheMode,
}

impl std::fmt::Debug for DiskSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskSpec")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("direct", &self.disk.is_some())
            .field("cache", &self.cache)
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
        let (m, format) = ImageMedium::open(path, format, read_only)?;
        Ok(Self::from_image(Arc::new(m), format.name()))
    }

    /// An image medium, with its disk for direct I/O.
    pub fn from_image(medium: Arc<ImageMedium>, format: &str) -> Self {
        Self {
            path: medium.path().to_path_buf(),
            format: format.into(),
            disk: Some(medium.disk().clone()),
            medium,
            cache: CacheMode::default(),
        }
    }

    /// The same disk with cache mode `cache`.
    pub fn with_cache(mut self, cache: CacheMode) -> Self {
        self.cache = cache;
        self
    }

    /// Opens an ISO image for a DVD drive: raw, read-only, and shared with other readers
    /// (it takes no write lock, so several VMs can load the same ISO).
    pub fn open_iso(path: &Path) -> Result<Self, OpenDiskError> {
        let mut spec = Self::open(path, Some(vhdx::open::Format::Raw), true)?;
        spec.format = "ISO".into();
        Ok(spec)
    }

    /// Any medium (tests use a failing one); its commands all go through the medium.
    pub fn from_medium(medium: Arc<dyn Medium>, path: impl Into<PathBuf>, format: &str) -> Self {
        Self {
            medium,
            disk: None,
            path: path.into(),
            format: format.into(),
            cache: CacheMode::default(),
        }
    }
}
