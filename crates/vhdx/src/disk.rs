//! The disk backend trait shared by raw files, VHDX and VHD, and used by storage devices.

use std::path::PathBuf;

/// Errors from opening or doing I/O on a disk image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host file system failed.
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid image: names the structure and its file offset.
    #[error("{path}: {structure} at offset {offset:#x}: {problem}")]
    Corrupt {
        path: PathBuf,
        structure: &'static str,
        offset: u64,
        problem: String,
    },
    /// The caller asked for something the image or the format does not allow.
    #[error("{0}")]
    Invalid(String),
    /// A write or unmap on a disk opened read-only.
    #[error("the disk is read-only")]
    ReadOnly,
}

pub type Result<T> = std::result::Result<T, Error>;

/// A virtual disk. All methods take `&self` so several queues can issue I/O at once;
/// implementations must not serialize all I/O behind one lock.
///
/// Offsets and lengths are in bytes and must be multiples of [`Disk::logical_sector_size`];
/// requests past [`Disk::size`] fail with [`Error::Invalid`].
pub trait Disk: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`. Durable only after [`Disk::flush`] returns.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every write that completed before this call durable.
    fn flush(&self) -> Result<()>;
    /// Tells the disk that the range's contents are no longer needed; it then reads as zeros
    /// (or, for a differencing disk, as whatever the format defines).
    fn unmap(&self, offset: u64, len: u64) -> Result<()>;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Logical sector size in bytes (512 or 4096).
    fn logical_sector_size(&self) -> u32;
    /// Physical sector size in bytes (512 or 4096).
    fn physical_sector_size(&self) -> u32;
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;
}
