//! Reads from a file descriptor straight into guest RAM (a network device's receive
//! sections), so a frame crosses from the kernel to the guest in one copy.

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
