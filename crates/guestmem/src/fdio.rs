//! I/O between a file descriptor and guest RAM with no copy in between: `readv` into a
//! network device's receive sections, and positional `preadv`/`pwritev` between a disk
//! image and the pages of a storage request.

use crate::{Error, GuestMemory};
use std::os::fd::{AsRawFd, BorrowedFd};
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Most pieces one [`GuestMemory::read_fd_vectored`] takes (the kernel's IOV_MAX is 1024).
pub const MAX_PIECES: usize = 1023;

impl GuestMemory {
    /// One `readv(2)` from `fd`: the first `head.len()` bytes into `head`, the rest into the
    /// guest ranges `pieces` (`(gpa, len)`, in order). Every piece is checked to be guest
    /// RAM first. Returns the bytes read (a datagram longer than the buffers is cut).
    pub fn read_fd_vectored(
        &self,
        fd: BorrowedFd<'_>,
        head: &mut [u8],
        pieces: &[(u64, usize)],
    ) -> std::io::Result<usize> {
        if pieces.len() > MAX_PIECES {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        let mut iov = Vec::with_capacity(pieces.len() + 1);
        iov.push(libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        });
        for &(gpa, len) in pieces {
            let out = || {
                std::io::Error::other(Error::OutOfRange {
                    gpa,
                    len: len as u64,
                })
            };
            let slice = self
                .mem
                .get_slice(GuestAddress(gpa), len)
                .map_err(|_| out())?;
            if slice.len() != len {
                return Err(out());
            }
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: len,
            });
        }
        // SAFETY: every iovec points at memory that stays valid for the call: `head` is
        // borrowed mutably, and each guest piece lies inside one mapping that `self` keeps
        // alive (get_slice checked the whole length). Guest RAM may be written concurrently
        // by the guest; the kernel's copy does not care, and callers treat the bytes as
        // untrusted.
        let n = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Which way a positional vectored transfer goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// File to guest RAM (`preadv`).
    Read,
    /// Guest RAM to file (`pwritev`).
    Write,
}

impl GuestMemory {
    /// Host iovecs for the guest ranges `pieces` (`(gpa, len)`), each checked to lie inside
    /// one mapping of guest RAM. A piece that goes on where the one before it ended, in the
    /// guest and in the host, extends that iovec: a storage request names its buffer page by
    /// page, and the kernel's direct I/O costs less per segment when it gets fewer, longer
    /// ones (virtio-blk's scatter lists arrive merged the same way).
    pub(crate) fn iovecs(&self, pieces: &[(u64, usize)]) -> std::io::Result<Vec<libc::iovec>> {
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(pieces.len());
        let mut next_gpa = None;
        for &(gpa, len) in pieces {
            let out = || {
                std::io::Error::other(Error::OutOfRange {
                    gpa,
                    len: len as u64,
                })
            };
            let slice = self
                .mem
                .get_slice(GuestAddress(gpa), len)
                .map_err(|_| out())?;
            if slice.len() != len {
                return Err(out());
            }
            let base: *mut libc::c_void = slice.ptr_guard_mut().as_ptr().cast();
            match iov.last_mut() {
                Some(last)
                    if next_gpa == Some(gpa)
                        && last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == base.cast() =>
                {
                    last.iov_len += len;
                }
                _ => iov.push(libc::iovec {
                    iov_base: base,
                    iov_len: len,
                }),
            }
            next_gpa = gpa.checked_add(len as u64);
        }
        Ok(iov)
    }

    /// Reads from `fd` at `offset` straight into the guest ranges `pieces` (`(gpa, len)`, in
    /// order) with `preadv(2)`, repeated until every byte is in; the end of the file before
    /// that is an `UnexpectedEof` error. Every piece is checked to be guest RAM first.
    pub fn read_fd_at(
        &self,
        fd: BorrowedFd<'_>,
        offset: u64,
        pieces: &[(u64, usize)],
    ) -> std::io::Result<()> {
        let (done, total) = self.transfer_at(fd, offset, pieces, Dir::Read)?;
        if done < total {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Writes the guest ranges `pieces` (`(gpa, len)`, in order) to `fd` at `offset` with
    /// `pwritev(2)`, repeated until every byte is out. Every piece is checked first.
    pub fn write_fd_at(
        &self,
        fd: BorrowedFd<'_>,
        offset: u64,
        pieces: &[(u64, usize)],
    ) -> std::io::Result<()> {
        let (done, total) = self.transfer_at(fd, offset, pieces, Dir::Write)?;
        if done < total {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        Ok(())
    }

    /// Moves the bytes of `pieces` between guest RAM and `fd` from `offset`, at most
    /// [`MAX_PIECES`] iovecs per call, resuming after short transfers. Returns the bytes
    /// moved and the total; they differ only when a call moved nothing (end of file).
    fn transfer_at(
        &self,
        fd: BorrowedFd<'_>,
        offset: u64,
        pieces: &[(u64, usize)],
        dir: Dir,
    ) -> std::io::Result<(usize, usize)> {
        let mut iov = self.iovecs(pieces)?;
        let total: usize = pieces.iter().map(|p| p.1).sum();
        let mut done = 0usize;
        let mut first = 0usize;
        while first < iov.len() {
            if iov[first].iov_len == 0 {
                first += 1;
                continue;
            }
            let batch = &iov[first..iov.len().min(first + MAX_PIECES)];
            let pos = offset
                .checked_add(done as u64)
                .and_then(|p| i64::try_from(p).ok())
                .ok_or(std::io::ErrorKind::InvalidInput)?;
            // SAFETY: each iovec points into a guest RAM mapping that `self` keeps alive for
            // the call, and iovecs() checked that each lies wholly inside one mapping. The
            // guest may touch those pages concurrently; the kernel's copy does not care and
            // callers treat the bytes as untrusted. No Rust reference aliases guest RAM.
            let n = unsafe {
                match dir {
                    Dir::Read => libc::preadv(
                        fd.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as libc::c_int,
                        pos,
                    ),
                    Dir::Write => libc::pwritev(
                        fd.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as libc::c_int,
                        pos,
                    ),
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            let mut n = n as usize;
            done += n;
            // Skip what moved: whole iovecs, then part of the next one.
            while n > 0 && first < iov.len() {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok((done, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn pieces_that_follow_each_other_share_an_iovec() {
        let mem = GuestMemory::new(&[(0, 0x10000), (0x20000, 0x10000)]).unwrap();
        // Three pages in a row, then a gap, then a page in the second region, a piece that
        // repeats the one before (not a continuation), and an empty one.
        let pieces = [
            (0x1000, 0x1000),
            (0x2000, 0x1000),
            (0x3000, 0x800),
            (0x5000, 0x1000),
            (0x20000, 0x1000),
            (0x20000, 0x1000),
            (0x21000, 0),
        ];
        let iov = mem.iovecs(&pieces).unwrap();
        let lens: Vec<usize> = iov.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [0x2800, 0x1000, 0x1000, 0x1000]);
        // The data still lands piece by piece.
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..0x5800u32).map(|i| (i / 7) as u8).collect();
        file.write_all(&data).unwrap();
        mem.read_fd_at(file.as_fd(), 0, &pieces[..4]).unwrap();
        let mut back = vec![0u8; 0x2800];
        mem.read(0x1000, &mut back).unwrap();
        assert_eq!(back, data[..0x2800]);
        let mut last = vec![0u8; 0x1000];
        mem.read(0x5000, &mut last).unwrap();
        assert_eq!(last, data[0x2800..0x3800]);
        // A piece that runs past RAM is still refused.
        assert!(mem.iovecs(&[(0xf000, 0x1000), (0x10000, 0x1000)]).is_err());
    }

    #[test]
    fn positional_vectored_io_moves_pieces_in_order_and_checks_them() {
        let mem = GuestMemory::new(&[(0, 0x10000)]).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..6000u32).map(|i| i as u8).collect();
        file.write_all(&data).unwrap();
        // Two scattered pieces read 5000 bytes from file offset 100.
        let pieces = [(0x3010, 3000), (0x8000, 2000)];
        mem.read_fd_at(file.as_fd(), 100, &pieces).unwrap();
        let mut a = vec![0u8; 3000];
        mem.read(0x3010, &mut a).unwrap();
        assert_eq!(a, data[100..3100]);
        let mut b = vec![0u8; 2000];
        mem.read(0x8000, &mut b).unwrap();
        assert_eq!(b, data[3100..5100]);
        // Past the end of the file: an error, after what the file had.
        let e = mem
            .read_fd_at(file.as_fd(), 5900, &[(0x9000, 512)])
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        let mut c = vec![0u8; 100];
        mem.read(0x9000, &mut c).unwrap();
        assert_eq!(c, data[5900..]);
        // Writing the pieces back elsewhere puts the same bytes in the file.
        mem.write_fd_at(file.as_fd(), 10000, &pieces).unwrap();
        let mut back = vec![0u8; 5000];
        file.seek(std::io::SeekFrom::Start(0)).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 10000).unwrap();
        assert_eq!(back, data[100..5100]);
        // A piece outside RAM is refused before any I/O.
        let bad = [(0x1000, 16), (0xfff0, 32)];
        assert!(mem.read_fd_at(file.as_fd(), 0, &bad).is_err());
        assert!(mem.write_fd_at(file.as_fd(), 0, &bad).is_err());
        // More pieces than one call takes are split into several.
        let many: Vec<(u64, usize)> = (0..2000u64).map(|i| (i * 8, 3)).collect();
        mem.read_fd_at(file.as_fd(), 0, &many).unwrap();
        let mut one = [0u8; 3];
        mem.read(1999 * 8, &mut one).unwrap();
        assert_eq!(one, [data[5997], data[5998], data[5999]]);
    }
}
