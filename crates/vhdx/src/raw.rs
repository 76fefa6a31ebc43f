//! Raw disk images: the file's bytes are the disk's bytes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{DirectFd, Disk, Error, Extent, Result};
use std::os::fd::AsFd;

/// A raw image file. Its size is the file length rounded down to the logical sector size.
pub struct RawDisk {
    path: PathBuf,
    file: File,
    /// The unbuffered descriptor of `file`, for [`Extent::File`].
    direct: DirectFd,
    size: u64,
    read_only: bool,
    logical: u32,
    physical: u32,
}

fn io(path: &Path, op: &'static str, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn check_sector_size(n: u32) -> Result<()> {
    if n == 512 || n == 4096 {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "sector size {n} must be 512 or 4096"
        )))
    }
}

impl RawDisk {
    /// Opens a raw file with 512-byte sectors.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<RawDisk> {
        Self::open_with_sectors(path, read_only, 512, 512)
    }

    /// Opens a raw file presenting the given logical and physical sector sizes.
    pub fn open_with_sectors(
        path: impl AsRef<Path>,
        read_only: bool,
        logical: u32,
        physical: u32,
    ) -> Result<RawDisk> {
        let path = path.as_ref();
        check_sector_size(logical)?;
        check_sector_size(physical)?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| io(path, "open", e))?;
        let len = file.metadata().map_err(|e| io(path, "stat", e))?.len();
        Ok(RawDisk {
            path: path.to_path_buf(),
            file,
            direct: DirectFd::default(),
            size: len / logical as u64 * logical as u64,
            read_only,
            logical,
            physical,
        })
    }

    /// Creates a sparse raw file of `size` bytes (fails if the file exists).
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<RawDisk> {
        let path = path.as_ref();
        if size == 0 || !size.is_multiple_of(512) {
            return Err(Error::Invalid(format!(
                "size {size} must be a non-zero multiple of 512"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| io(path, "create", e))?;
        file.set_len(size).map_err(|e| io(path, "truncate", e))?;
        drop(file);
        Self::open(path, false)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes the size (grow with zeros or truncate).
    pub fn resize(&mut self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        if size == 0 || !size.is_multiple_of(self.logical as u64) {
            return Err(Error::Invalid(format!(
                "size {size} must be a non-zero multiple of {}",
                self.logical
            )));
        }
        self.file
            .set_len(size)
            .map_err(|e| io(&self.path, "truncate", e))?;
        self.size = size;
        Ok(())
    }

    /// Bytes the file occupies on the host file system.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    /// Byte ranges that hold data in the host file (`SEEK_DATA`/`SEEK_HOLE`); everything else
    /// is a hole and reads as zeros. The whole disk when the file system cannot tell.
    pub fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        Ok(file_data_ranges(&self.file, self.size, self.logical as u64))
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let ss = self.logical as u64;
        if !offset.is_multiple_of(ss) || !len.is_multiple_of(ss) {
            return Err(Error::Invalid(format!(
                "offset {offset} and length {len} must be multiples of {ss}"
            )));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::Invalid(format!(
                "range {offset}+{len} is past the end of the {}-byte disk",
                self.size
            )));
        }
        Ok(())
    }
}

impl Disk for RawDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| io(&self.path, "read", e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| io(&self.path, "write", e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| io(&self.path, "fsync", e))?;
        self.direct.drop_cached(self.file.as_fd());
        Ok(())
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, len)?;
        crate::vhd::punch_zeros(&self.file, &self.path, offset, len)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn logical_sector_size(&self) -> u32 {
        self.logical
    }

    fn physical_sector_size(&self) -> u32 {
        self.physical
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn extent(&self, offset: u64, len: u64, write: bool) -> Result<Extent<'_>> {
        if write && self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check(offset, len)?;
        Ok(Extent::File {
            fd: self.file.as_fd(),
            direct: &self.direct,
            path: &self.path,
            offset,
            len,
        })
    }
}

/// Ranges of `file` below `size` that hold data (`SEEK_DATA`/`SEEK_HOLE`), rounded out to
/// `ss`-byte sectors and merged; `[(0, size)]` when the file system cannot tell.
pub(crate) fn file_data_ranges(file: &File, size: u64, ss: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{seek, SeekFrom};
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut off = 0;
    while off < size {
        let data = match seek(file, SeekFrom::Data(off)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return vec![(0, size)],
        };
        if data >= size {
            break;
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(size),
            Err(_) => return vec![(0, size)],
        };
        if hole <= data {
            return vec![(0, size)];
        }
        let (a, b) = (data / ss * ss, hole.next_multiple_of(ss).min(size));
        match out.last_mut() {
            Some((s, l)) if *s + *l >= a => *l = b - *s,
            _ => out.push((a, b - a)),
        }
        off = hole;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_roundtrip_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        let d = RawDisk::create(&p, 1 << 20).unwrap();
        assert_eq!(d.size(), 1 << 20);
        d.write_at(&[7u8; 4096], 8192).unwrap();
        let mut b = [0u8; 4096];
        d.read_at(&mut b, 8192).unwrap();
        assert_eq!(b, [7u8; 4096]);
        d.unmap(8192, 512).unwrap();
        d.write_at(&vec![9u8; 1 << 18], 512 << 10).unwrap();
        d.unmap(512 << 10, 1 << 17).unwrap();
        let r = d.data_ranges().unwrap();
        assert!(!r.is_empty() && r.iter().all(|&(s, l)| s % 512 == 0 && s + l <= 1 << 20));
        assert!(r.iter().any(|&(s, l)| s <= 8192 && s + l >= 8192 + 4096));
        let mut big = vec![1u8; 1 << 18];
        d.read_at(&mut big, 512 << 10).unwrap();
        assert!(big[..1 << 17].iter().all(|&x| x == 0) && big[1 << 17..].iter().all(|&x| x == 9));
        d.read_at(&mut b, 8192).unwrap();
        assert_eq!(&b[..512], &[0u8; 512]);
        assert_eq!(&b[512..], &[7u8; 3584]);
        assert!(matches!(
            d.read_at(&mut b, (1 << 20) - 512),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(d.write_at(&b[..100], 0), Err(Error::Invalid(_))));
        drop(d);
        let r = RawDisk::open(&p, true).unwrap();
        assert!(matches!(r.write_at(&b, 0), Err(Error::ReadOnly)));
    }
}
