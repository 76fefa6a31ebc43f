//! The disk backend trait shared by raw files, VHDX and VHD, and used by storage devices.

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use crate::direct::DirectFd;

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

    /// Where the first bytes of `[offset, offset + len)` live: an extent of at least one
    /// sector and at most `len` bytes. With `write`, a [`Extent::File`] extent may be written
    /// in place (its block is allocated and needs no metadata change). The default sends
    /// everything through [`Disk::read_at`]/[`Disk::write_at`].
    fn extent(&self, offset: u64, len: u64, write: bool) -> Result<Extent<'_>> {
        let _ = (offset, write);
        Ok(Extent::Indirect { len })
    }

    /// Reads `buf.len()` bytes at `offset` straight into `buf`'s memory where the disk's
    /// [`Disk::extent`]s allow it (through a bounce buffer elsewhere).
    fn read_vectored(&self, buf: &mut dyn IoBuffer, offset: u64) -> Result<()> {
        read_extents(self, buf, offset)
    }

    /// Writes `buf` at `offset` straight from its memory where the disk's extents allow it.
    fn write_vectored(&self, buf: &dyn IoBuffer, offset: u64) -> Result<()> {
        write_extents(self, buf, offset)
    }
}

/// Where the bytes of a disk range live in a host file, for I/O that goes straight between the
/// file and a caller's memory (see [`Disk::extent`]).
#[derive(Debug, Clone, Copy)]
pub enum Extent<'a> {
    /// The next `len` bytes of the disk are `len` bytes of `fd` from `offset`.
    File {
        /// The buffered descriptor.
        fd: BorrowedFd<'a>,
        /// The same file's unbuffered descriptor, for aligned transfers of callers that want
        /// them ([`IoBuffer::unbuffered`]).
        direct: &'a DirectFd,
        /// The file, for error messages.
        path: &'a Path,
        offset: u64,
        len: u64,
    },
    /// The next `len` bytes read as zeros (never returned for a write).
    Zero { len: u64 },
    /// The next `len` bytes need the disk's own [`Disk::read_at`]/[`Disk::write_at`]
    /// (unallocated blocks being written, sector bitmaps, in-memory log replays).
    Indirect { len: u64 },
}

impl Extent<'_> {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::File { len, .. } | Extent::Zero { len } | Extent::Indirect { len } => len,
        }
    }

    /// Whether the extent is empty (an implementation error, refused by the callers).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The memory of one vectored request: [`IoBuffer::len`] bytes addressed from 0, for example
/// guest RAM scattered over pages. The buffer moves bytes between itself and a file, so the
/// disk never copies them (a guest-memory buffer does `preadv`/`pwritev` into its pages).
/// Positions and lengths the disks pass lie within `0..len()`.
pub trait IoBuffer {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the buffer's owner wants unbuffered (`O_DIRECT`) I/O where it is aligned.
    fn unbuffered(&self) -> bool {
        false
    }
    /// Whether every piece of memory holding bytes `[at, at + len)` starts and ends on a
    /// multiple of `align` (what unbuffered I/O needs).
    fn aligned(&self, at: usize, len: usize, align: u32) -> bool {
        let _ = (at, len, align);
        false
    }
    /// Told before `len` bytes move through an unbuffered descriptor (for statistics).
    fn note_unbuffered(&self, len: usize) {
        let _ = len;
    }
    /// Reads `len` bytes of `fd` at `file_offset` into bytes `[at, at + len)`; the end of the
    /// file before that is an `UnexpectedEof` error.
    fn read_from(
        &mut self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        at: usize,
        len: usize,
    ) -> std::io::Result<()>;
    /// Writes bytes `[at, at + len)` to `fd` at `file_offset`.
    fn write_to(
        &self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        at: usize,
        len: usize,
    ) -> std::io::Result<()>;
    /// Copies `src` into bytes `[at, at + src.len())`.
    fn copy_from(&mut self, at: usize, src: &[u8]) -> std::io::Result<()>;
    /// Copies bytes `[at, at + dst.len())` into `dst`.
    fn copy_to(&self, at: usize, dst: &mut [u8]) -> std::io::Result<()>;
    /// Fills bytes `[at, at + len)` with zeros.
    fn zero(&mut self, at: usize, len: usize) -> std::io::Result<()> {
        let zeros = [0u8; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len());
            self.copy_from(at + done, &zeros[..n])?;
            done += n;
        }
        Ok(())
    }
}

/// Largest bounce buffer the provided vectored methods allocate for an indirect extent.
const BOUNCE: u64 = 1 << 20;

fn buffer_error(op: &'static str, source: std::io::Error) -> Error {
    Error::Io {
        path: PathBuf::from("<buffer>"),
        op,
        source,
    }
}

/// Splits `[offset, offset + len)` into the disk's extents, calling `f(extent, position in
/// the request)` for each; an extent of length 0 or longer than asked is refused, so a wrong
/// implementation cannot loop or overrun.
fn for_each_extent<D: Disk + ?Sized>(
    disk: &D,
    offset: u64,
    len: u64,
    write: bool,
    mut f: impl FnMut(Extent<'_>, u64) -> Result<()>,
) -> Result<()> {
    let mut done = 0;
    while done < len {
        let e = disk.extent(offset + done, len - done, write)?;
        let n = e.len();
        if n == 0 || n > len - done {
            return Err(Error::Invalid(format!(
                "the disk mapped {offset:#x}+{:#x} to an extent of {n:#x} bytes",
                len - done
            )));
        }
        f(e, done)?;
        done += n;
    }
    Ok(())
}

/// The descriptor a transfer of `len` bytes of `buf` from `at` to or from `fd` at file offset
/// `fo` uses: the file's unbuffered one where the buffer wants it and file range and memory are
/// aligned for it (counted with [`IoBuffer::note_unbuffered`]), else `fd` itself.
fn file_fd<'a>(
    buf: &dyn IoBuffer,
    at: usize,
    (fd, direct, path): (BorrowedFd<'a>, &'a DirectFd, &Path),
    fo: u64,
    len: u64,
) -> BorrowedFd<'a> {
    let unbuffered = direct.choose(buf.unbuffered(), fd, path, (fo, len), |a| {
        buf.aligned(at, len as usize, a)
    });
    if unbuffered.is_some() {
        buf.note_unbuffered(len as usize);
    }
    unbuffered.unwrap_or(fd)
}

fn file_error<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Calls `f(done, n)` for consecutive pieces `[done, done + n)` of `[0, len)`, each at most
/// [`BOUNCE`] bytes, with `bounce` resized to `n` bytes.
fn through_bounce(
    len: u64,
    bounce: &mut Vec<u8>,
    mut f: impl FnMut(u64, &mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(BOUNCE) as usize;
        bounce.resize(n, 0);
        f(done, bounce)?;
        done += n as u64;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset` into `buf` through the disk's extents.
fn read_extents<D: Disk + ?Sized>(disk: &D, buf: &mut dyn IoBuffer, offset: u64) -> Result<()> {
    let len = buf.len() as u64;
    let mut bounce = Vec::new();
    for_each_extent(disk, offset, len, false, |e, at| {
        let at = at as usize;
        match e {
            Extent::File {
                fd,
                direct,
                path,
                offset: fo,
                len,
            } => {
                let fd = file_fd(buf, at, (fd, direct, path), fo, len);
                buf.read_from(fd, fo, at, len as usize)
                    .map_err(file_error(path, "read"))
            }
            Extent::Zero { len } => buf
                .zero(at, len as usize)
                .map_err(|e| buffer_error("zero", e)),
            Extent::Indirect { len } => through_bounce(len, &mut bounce, |done, b| {
                disk.read_at(b, offset + at as u64 + done)?;
                buf.copy_from(at + done as usize, b)
                    .map_err(|e| buffer_error("copy", e))
            }),
        }
    })
}

/// Writes `buf` at `offset` through the disk's extents.
fn write_extents<D: Disk + ?Sized>(disk: &D, buf: &dyn IoBuffer, offset: u64) -> Result<()> {
    if disk.is_read_only() {
        return Err(Error::ReadOnly);
    }
    let len = buf.len() as u64;
    let mut bounce = Vec::new();
    for_each_extent(disk, offset, len, true, |e, at| {
        let at = at as usize;
        match e {
            Extent::File {
                fd,
                direct,
                path,
                offset: fo,
                len,
            } => {
                let fd = file_fd(buf, at, (fd, direct, path), fo, len);
                buf.write_to(fd, fo, at, len as usize)
                    .map_err(file_error(path, "write"))
            }
            Extent::Zero { len } | Extent::Indirect { len } => {
                through_bounce(len, &mut bounce, |done, b| {
                    buf.copy_to(at + done as usize, b)
                        .map_err(|e| buffer_error("copy", e))?;
                    disk.write_at(b, offset + at as u64 + done)
                })
            }
        }
    })
}

/// A plain byte buffer (tests, and callers whose data is already in host memory).
impl IoBuffer for Vec<u8> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn read_from(
        &mut self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        at: usize,
        len: usize,
    ) -> std::io::Result<()> {
        let buf = self
            .get_mut(at..at.saturating_add(len))
            .ok_or(std::io::ErrorKind::InvalidInput)?;
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pread(fd, &mut buf[done..], file_offset + done as u64) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn write_to(
        &self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        at: usize,
        len: usize,
    ) -> std::io::Result<()> {
        let buf = self
            .get(at..at.saturating_add(len))
            .ok_or(std::io::ErrorKind::InvalidInput)?;
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pwrite(fd, &buf[done..], file_offset + done as u64) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn copy_from(&mut self, at: usize, src: &[u8]) -> std::io::Result<()> {
        self.get_mut(at..at.saturating_add(src.len()))
            .ok_or(std::io::ErrorKind::InvalidInput)?
            .copy_from_slice(src);
        Ok(())
    }

    fn copy_to(&self, at: usize, dst: &mut [u8]) -> std::io::Result<()> {
        dst.copy_from_slice(
            self.get(at..at.saturating_add(dst.len()))
                .ok_or(std::io::ErrorKind::InvalidInput)?,
        );
        Ok(())
    }
}
