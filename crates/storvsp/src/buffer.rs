//! An SRB's data buffer in guest memory as a `vhdx` crate [`IoBuffer`]: the disk reads and
//! writes the guest pages with `preadv`/`pwritev`, with no copy in between (and, for a disk
//! with cache mode `none`, with no page cache either where the pieces are aligned).

use guestmem::GuestMemory;
use std::os::fd::BorrowedFd;
use vhdx::IoBuffer;

/// The first `len` bytes of an SRB's data pieces (`(gpa, len)`, each already checked to be
/// guest RAM by [`crate::data_pieces`]).
pub struct GuestBuffer<'a> {
    mem: &'a GuestMemory,
    pieces: &'a [(u64, usize)],
    len: usize,
    /// Whether aligned transfers use the file's unbuffered descriptor.
    unbuffered: bool,
    /// Bytes that went through one.
    unbuffered_bytes: std::cell::Cell<usize>,
    /// The pieces of the window last asked for (reused between calls).
    window: Vec<(u64, usize)>,
}

impl<'a> GuestBuffer<'a> {
    /// The buffer over `pieces`, cut to `len` bytes (the pieces hold at least that many);
    /// `unbuffered`: aligned transfers bypass the host's page cache.
    pub fn new(
        mem: &'a GuestMemory,
        pieces: &'a [(u64, usize)],
        len: usize,
        unbuffered: bool,
    ) -> Self {
        let held: usize = pieces.iter().map(|p| p.1).sum();
        Self {
            mem,
            pieces,
            len: len.min(held),
            unbuffered,
            unbuffered_bytes: std::cell::Cell::new(0),
            window: Vec::with_capacity(pieces.len()),
        }
    }

    /// Bytes moved through an unbuffered descriptor so far.
    pub fn unbuffered_bytes(&self) -> usize {
        self.unbuffered_bytes.get()
    }

    /// The guest ranges holding bytes `[at, at + len)` of the buffer, in order; an error if
    /// that runs past the buffer.
    fn window(&self, at: usize, len: usize, out: &mut Vec<(u64, usize)>) -> std::io::Result<()> {
        if at.checked_add(len).is_none_or(|end| end > self.len) {
            out.clear();
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        window(self.pieces, at, len, out);
        Ok(())
    }

    /// Runs `f(gpa, range in the caller's slice)` over the window `[at, at + len)`.
    fn each(
        &self,
        at: usize,
        len: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> guestmem::Result<()>,
    ) -> std::io::Result<()> {
        let mut w = Vec::new();
        self.window(at, len, &mut w)?;
        let mut done = 0;
        for (gpa, n) in w {
            f(gpa, done..done + n).map_err(std::io::Error::other)?;
            done += n;
        }
        Ok(())
    }
}

/// Whether every guest range of `window` starts and ends on a multiple of `align`. Guest
/// RAM is mapped in whole pages, so for an `align` of up to a page the host addresses are
/// aligned the same.
pub fn aligned(window: &[(u64, usize)], align: u32) -> bool {
    let a = u64::from(align);
    window
        .iter()
        .all(|&(gpa, n)| gpa.is_multiple_of(a) && (n as u64).is_multiple_of(a))
}

/// The parts of `pieces` (`(gpa, len)`, in order) that hold bytes `[at, at + len)` of the
/// buffer they make up, into `out` (cut short where the pieces end).
pub fn window(pieces: &[(u64, usize)], at: usize, len: usize, out: &mut Vec<(u64, usize)>) {
    out.clear();
    let (mut skip, mut left) = (at, len);
    for &(gpa, n) in pieces {
        if left == 0 {
            break;
        }
        if skip >= n {
            skip -= n;
            continue;
        }
        let take = (n - skip).min(left);
        out.push((gpa + skip as u64, take));
        left -= take;
        skip = 0;
    }
}

impl IoBuffer for GuestBuffer<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn unbuffered(&self) -> bool {
        self.unbuffered
    }

    fn aligned(&self, at: usize, len: usize, align: u32) -> bool {
        let mut w = Vec::with_capacity(self.pieces.len());
        self.window(at, len, &mut w).is_ok() && aligned(&w, align)
    }

    fn note_unbuffered(&self, len: usize) {
        self.unbuffered_bytes
            .set(self.unbuffered_bytes.get().saturating_add(len));
    }

    fn read_from(
        &mut self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        at: usize,
        len: usize,
    ) -> std::io::Result<()> {
        let mut w = std::mem::take(&mut self.window);
        let r = self
            .window(at, len, &mut w)
            .and_then(|()| self.mem.read_fd_at(fd, file_offset, &w));
        self.window = w;
        r
    }

    fn write_to(
        &self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        at: usize,
        len: usize,
    ) -> std::io::Result<()> {
        let mut w = Vec::with_capacity(self.pieces.len());
        self.window(at, len, &mut w)?;
        self.mem.write_fd_at(fd, file_offset, &w)
    }

    fn copy_from(&mut self, at: usize, src: &[u8]) -> std::io::Result<()> {
        self.each(at, src.len(), |gpa, r| self.mem.write(gpa, &src[r]))
    }

    fn copy_to(&self, at: usize, dst: &mut [u8]) -> std::io::Result<()> {
        self.each(at, dst.len(), |gpa, r| self.mem.read(gpa, &mut dst[r]))
    }

    fn zero(&mut self, at: usize, len: usize) -> std::io::Result<()> {
        self.each(at, len, |gpa, r| self.mem.zero(gpa, r.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cut_across_pieces_and_refuse_overruns() {
        let mem = GuestMemory::new(&[(0, 0x10000)]).unwrap();
        let pieces = [(0x1f00, 0x100), (0x5000, 0x1000), (0x9000, 0x80)];
        let mut b = GuestBuffer::new(&mem, &pieces, 0x1100, false);
        assert_eq!(b.len(), 0x1100);
        let data: Vec<u8> = (0..0x1100u32).map(|i| (i % 251) as u8).collect();
        b.copy_from(0, &data).unwrap();
        // The third piece is past the buffer's length and stays untouched.
        assert_eq!(mem.read_obj::<u8>(0x9000).unwrap(), 0);
        let mut back = vec![0u8; 0x200];
        b.copy_to(0xf0, &mut back).unwrap();
        assert_eq!(back, data[0xf0..0x2f0]);
        let mut w = Vec::new();
        b.window(0xf0, 0x20, &mut w).unwrap();
        assert_eq!(w, vec![(0x1ff0, 0x10), (0x5000, 0x10)]);
        b.zero(0x100, 0x10).unwrap();
        assert_eq!(mem.read_obj::<u128>(0x5000).unwrap(), 0);
        assert!(b.copy_to(0x10ff, &mut [0u8; 2]).is_err());
        assert!(b.zero(usize::MAX, 2).is_err());
    }

    #[test]
    fn alignment_is_every_piece_s_start_and_length() {
        let mem = GuestMemory::new(&[(0, 0x10000)]).unwrap();
        let pieces = [(0x1e00, 0x200), (0x5000, 0x1000), (0x9000, 0x80)];
        let b = GuestBuffer::new(&mem, &pieces, 0x1280, true);
        assert!(b.unbuffered());
        assert!(b.aligned(0, 0x1200, 512));
        assert!(
            !b.aligned(0, 0x1200, 4096),
            "the first piece starts mid-page"
        );
        assert!(b.aligned(0x200, 0x1000, 4096));
        assert!(!b.aligned(0, 0x1280, 512), "the last piece is 128 bytes");
        assert!(!b.aligned(0x100, 0x200, 512));
        assert!(!b.aligned(0x1200, 0x200, 512), "past the buffer");
        assert!(!GuestBuffer::new(&mem, &pieces, 0x200, false).unbuffered());
    }
}
