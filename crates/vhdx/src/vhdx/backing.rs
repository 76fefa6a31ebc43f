//! The image file as seen by the parser: positional I/O plus, for read-only opens of a file
//! with a pending log, an in-memory overlay of the replayed writes.

use super::log::LogWrite;
use crate::{Error, Result};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub struct Backing {
    pub path: PathBuf,
    pub file: File,
    /// The unbuffered descriptor of `file`, for [`crate::Extent::File`].
    pub direct: crate::DirectFd,
    /// Replayed log writes not applied to the file (read-only opens), in replay order.
    patches: Vec<LogWrite>,
    /// Length of the file as the parser sees it (after an in-memory replay's extension).
    pub view_len: u64,
}

impl Backing {
    pub fn new(path: &Path, file: File) -> Result<Backing> {
        let len = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
        Ok(Backing {
            path: path.to_path_buf(),
            file,
            direct: crate::DirectFd::default(),
            patches: Vec::new(),
            view_len: len,
        })
    }

    pub fn set_patches(&mut self, patches: Vec<LogWrite>, view_len: u64) {
        self.patches = patches;
        self.view_len = self.view_len.max(view_len);
    }

    /// Whether replayed log writes are held in memory (the host file lacks them).
    pub fn has_patches(&self) -> bool {
        !self.patches.is_empty()
    }

    pub fn io(&self, op: &'static str, e: std::io::Error) -> Error {
        io_err(&self.path, op, e)
    }

    pub fn corrupt(
        &self,
        structure: &'static str,
        offset: u64,
        problem: impl Into<String>,
    ) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            structure,
            offset,
            problem: problem.into(),
        }
    }

    /// Reads `buf.len()` bytes; bytes past the end of the file read as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io("read", e)),
            }
        }
        let end = offset + buf.len() as u64;
        for p in &self.patches {
            let (po, pl) = p.range();
            let s = po.max(offset);
            let e = (po + pl).min(end);
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match p {
                LogWrite::Data { data, .. } => {
                    dst.copy_from_slice(&data[(s - po) as usize..(e - po) as usize])
                }
                LogWrite::Zero { .. } => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Reads a structure that must lie inside the file.
    pub fn read_struct(&self, offset: u64, len: usize, structure: &'static str) -> Result<Vec<u8>> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > self.view_len)
        {
            return Err(self.corrupt(
                structure,
                offset,
                format!(
                    "{len} bytes at this offset lie past the end of the file ({} bytes); truncated?",
                    self.view_len
                ),
            ));
        }
        let mut v = vec![0u8; len];
        self.read_at(&mut v, offset)?;
        Ok(v)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io("write", e))
    }

    /// Writes `len` zero bytes at `offset`.
    pub fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    /// Gives the space of `len` bytes at `offset` back to the host file system (they read as
    /// zeros). Where hole punching is unsupported, writes zeros.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        if len == 0 {
            return Ok(());
        }
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zeros(offset, len),
        }
    }

    /// Makes the file's data durable; then, with unbuffered I/O in use, drops its cached
    /// pages (see [`crate::DirectFd::drop_cached`]).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io("flush", e))?;
        self.direct.drop_cached(self.file.as_fd());
        Ok(())
    }

    pub fn file_len(&self) -> Result<u64> {
        Ok(self.file.metadata().map_err(|e| self.io("stat", e))?.len())
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(|e| self.io("set length", e))
    }
}

pub fn io_err(path: &Path, op: &'static str, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}
