//! Unbuffered (O_DIRECT) vectored I/O: every backend, through a buffer that asks for it,
//! matches a model under seeded random requests that cross block boundaries; aligned
//! transfers take the unbuffered descriptor, unaligned ones the buffered one; and the two
//! descriptors of one file never show each other stale data.
//!
//! The images live on a file system that takes O_DIRECT (/var/tmp, else the build
//! directory); a test says so and skips where there is none.

mod common;

use std::cell::Cell;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;

use common::vhd;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rustix::fs::OFlags;
use vhdx::raw::RawDisk;
use vhdx::vhd::format::DiskType;
use vhdx::vhdx::VhdxBuilder;
use vhdx::{Disk, IoBuffer};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

/// A directory on a file system that opens files with O_DIRECT, or `None` (printed why).
fn direct_dir() -> Option<tempfile::TempDir> {
    let candidates = [
        PathBuf::from("/var/tmp"),
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    ];
    for base in &candidates {
        let Ok(dir) = tempfile::tempdir_in(base) else {
            continue;
        };
        let probe = dir.path().join("probe");
        if std::fs::write(&probe, [0u8; 4096]).is_err() {
            continue;
        }
        match rustix::fs::open(
            &probe,
            OFlags::RDWR | OFlags::DIRECT,
            rustix::fs::Mode::empty(),
        ) {
            Ok(_) => return Some(dir),
            Err(e) => eprintln!("{}: no O_DIRECT ({e})", base.display()),
        }
    }
    eprintln!("skipped: no file system here takes O_DIRECT");
    None
}

/// Page-aligned memory (a `Vec` with room to slide to a page boundary), starting `skew`
/// bytes past the boundary, that asks for unbuffered I/O and counts the bytes each kind of
/// descriptor moved.
struct Aligned {
    store: Vec<u8>,
    start: usize,
    len: usize,
    unbuffered: Cell<usize>,
    buffered: Cell<usize>,
    copied: Cell<usize>,
}

impl Aligned {
    fn new(len: usize, skew: usize) -> Self {
        let store = vec![0u8; len + skew + PAGE];
        let start = (PAGE - store.as_ptr() as usize % PAGE) % PAGE + skew;
        Self {
            store,
            start,
            len,
            unbuffered: Cell::new(0),
            buffered: Cell::new(0),
            copied: Cell::new(0),
        }
    }
    fn from(data: &[u8], skew: usize) -> Self {
        let mut a = Self::new(data.len(), skew);
        a.bytes_mut().copy_from_slice(data);
        a
    }
    fn bytes(&self) -> &[u8] {
        &self.store[self.start..self.start + self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.store[self.start..self.start + self.len]
    }
    fn count(&self, fd: BorrowedFd<'_>, len: usize) {
        let flags = rustix::fs::fcntl_getfl(fd).unwrap();
        let c = if flags.contains(OFlags::DIRECT) {
            &self.unbuffered
        } else {
            &self.buffered
        };
        c.set(c.get() + len);
    }
    fn moved(&self) -> (usize, usize, usize) {
        (
            self.unbuffered.get(),
            self.buffered.get(),
            self.copied.get(),
        )
    }
}

impl IoBuffer for Aligned {
    fn len(&self) -> usize {
        self.len
    }
    fn unbuffered(&self) -> bool {
        true
    }
    fn aligned(&self, at: usize, len: usize, align: u32) -> bool {
        let a = align as usize;
        (self.bytes().as_ptr() as usize + at).is_multiple_of(a) && len.is_multiple_of(a)
    }
    fn read_from(
        &mut self,
        fd: BorrowedFd<'_>,
        off: u64,
        at: usize,
        len: usize,
    ) -> std::io::Result<()> {
        self.count(fd, len);
        let buf = &mut self.bytes_mut()[at..at + len];
        let mut done = 0;
        while done < len {
            match rustix::io::pread(fd, &mut buf[done..], off + done as u64)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => done += n,
            }
        }
        Ok(())
    }
    fn write_to(&self, fd: BorrowedFd<'_>, off: u64, at: usize, len: usize) -> std::io::Result<()> {
        self.count(fd, len);
        let buf = &self.bytes()[at..at + len];
        let mut done = 0;
        while done < len {
            match rustix::io::pwrite(fd, &buf[done..], off + done as u64)? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                n => done += n,
            }
        }
        Ok(())
    }
    fn copy_from(&mut self, at: usize, src: &[u8]) -> std::io::Result<()> {
        self.copied.set(self.copied.get() + src.len());
        self.bytes_mut()[at..at + src.len()].copy_from_slice(src);
        Ok(())
    }
    fn copy_to(&self, at: usize, dst: &mut [u8]) -> std::io::Result<()> {
        self.copied.set(self.copied.get() + dst.len());
        dst.copy_from_slice(&self.bytes()[at..at + dst.len()]);
        Ok(())
    }
}

/// Seeded random unbuffered writes (aligned or skewed memory), buffered writes, unmaps and
/// unbuffered reads, checked against `model`; returns the bytes moved unbuffered.
fn exercise(d: &dyn Disk, model: &mut [u8], seed: u64, what: &str) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let ss = u64::from(d.logical_sector_size());
    let sectors = d.size() / ss;
    let mut unbuffered = 0;
    for i in 0..80 {
        let n = rng.random_range(1..=(MIB / ss).min(sectors));
        let lba = rng.random_range(0..=sectors - n);
        let (off, len) = (lba * ss, (n * ss) as usize);
        let range = off as usize..off as usize + len;
        // Mostly page-aligned memory; sometimes 8 bytes off, which must fall back.
        let skew = if rng.random_range(0..4) == 0 { 8 } else { 0 };
        match rng.random_range(0..10) {
            0..=3 => {
                let mut data = vec![0u8; len];
                rng.fill_bytes(&mut data);
                let b = Aligned::from(&data, skew);
                d.write_vectored(&b, off).unwrap();
                model[range].copy_from_slice(&data);
                if skew != 0 {
                    assert_eq!(b.moved().0, 0, "{what}: skewed memory went unbuffered");
                }
                unbuffered += b.moved().0;
            }
            4 => {
                let data = vec![rng.random::<u8>() | 1; len];
                d.write_at(&data, off).unwrap();
                model[range].copy_from_slice(&data);
            }
            5 if i % 3 == 0 => {
                d.unmap(off, len as u64).unwrap();
                d.read_at(&mut model[range], off).unwrap();
            }
            _ => {
                let mut b = Aligned::new(len, skew);
                b.bytes_mut().fill(0xEE);
                d.read_vectored(&mut b, off).unwrap();
                if b.bytes() != &model[range.clone()] {
                    let p = b
                        .bytes()
                        .iter()
                        .zip(&model[range])
                        .position(|(a, b)| a != b);
                    panic!("{what}: request {i} ({off:#x}+{len:#x}) differs at {p:?}");
                }
                if skew != 0 {
                    assert_eq!(b.moved().0, 0, "{what}: skewed memory went unbuffered");
                }
                unbuffered += b.moved().0;
            }
        }
    }
    let mut all = Aligned::new(d.size() as usize, 0);
    d.read_vectored(&mut all, 0).unwrap();
    assert!(all.bytes() == model, "{what}: final contents");
    unbuffered
}

#[test]
fn every_backend_matches_the_model_through_the_unbuffered_descriptor() {
    let Some(dir) = direct_dir() else { return };
    let p = |n: &str| dir.path().join(n);
    let size = 8 * MIB;
    let raw = RawDisk::create(p("a.raw"), size).unwrap();
    let fixed_vhd = vhd(&p("f.vhd"), DiskType::Fixed, size, None);
    let dyn_vhd = vhd(&p("d.vhd"), DiskType::Dynamic, size, None);
    let fixed_vhdx = VhdxBuilder::new(size)
        .fixed(true)
        .create(p("f.vhdx"))
        .unwrap();
    let k4 = VhdxBuilder::new(size)
        .block_size(MIB as u32)
        .logical_sector_size(4096)
        .create(p("4k.vhdx"))
        .unwrap();
    let dyn_vhdx = VhdxBuilder::new(size)
        .block_size(MIB as u32)
        .create(p("d.vhdx"))
        .unwrap();
    let disks: [(&dyn Disk, &str); 6] = [
        (&raw, "raw"),
        (&fixed_vhd, "fixed VHD"),
        (&dyn_vhd, "dynamic VHD"),
        (&fixed_vhdx, "fixed VHDX"),
        (&k4, "4Kn VHDX"),
        (&dyn_vhdx, "dynamic VHDX"),
    ];
    for (i, (d, what)) in disks.into_iter().enumerate() {
        let mut model = vec![0u8; size as usize];
        let n = exercise(d, &mut model, 10 + i as u64, what);
        assert!(n > 0, "{what}: nothing went unbuffered");
    }
    // A differencing child reads its parent's blocks through the parent's descriptor.
    drop(dyn_vhdx);
    let child = VhdxBuilder::differencing(p("d.vhdx"))
        .create(p("child.vhdx"))
        .unwrap();
    let mut model = vec![0u8; size as usize];
    child.read_at(&mut model, 0).unwrap();
    let mut r = Aligned::new(MIB as usize, 0);
    child.read_vectored(&mut r, MIB).unwrap();
    assert_eq!(r.bytes(), &model[MIB as usize..2 * MIB as usize]);
    exercise(&child, &mut model, 20, "differencing VHDX");
}

#[test]
fn aligned_transfers_go_unbuffered_and_unaligned_ones_buffered() {
    let Some(dir) = direct_dir() else { return };
    let d = RawDisk::create(dir.path().join("a.raw"), 4 * MIB).unwrap();
    let data: Vec<u8> = (0..MIB as usize).map(|i| (i % 253) as u8).collect();
    let w = Aligned::from(&data, 0);
    d.write_vectored(&w, MIB).unwrap();
    assert_eq!(w.moved(), (MIB as usize, 0, 0));
    // Memory 8 bytes past a page: the buffered descriptor.
    let mut r = Aligned::new(MIB as usize, 8);
    d.read_vectored(&mut r, MIB).unwrap();
    assert_eq!((r.bytes(), r.moved()), (&data[..], (0, MIB as usize, 0)));
    // A 512-byte sector at an odd sector: unbuffered only where the file system allows 512.
    let mut r = Aligned::new(512, 0);
    d.read_vectored(&mut r, MIB + 512).unwrap();
    assert_eq!(r.bytes(), &data[512..1024]);
    assert_eq!(r.moved().0 + r.moved().1, 512);
    // A buffer that does not ask for it stays buffered.
    let mut plain = vec![0u8; 4096];
    d.read_vectored(&mut plain, MIB).unwrap();
    assert_eq!(plain, data[..4096]);
}

#[test]
fn buffered_and_unbuffered_writes_are_seen_by_each_other() {
    let Some(dir) = direct_dir() else { return };
    let d = RawDisk::create(dir.path().join("a.raw"), 4 * MIB).unwrap();
    for round in 0..4u8 {
        // Buffered write (dirty in the page cache), then an unbuffered read of it.
        let a = vec![round * 2 + 1; 256 << 10];
        d.write_at(&a, MIB).unwrap();
        let mut r = Aligned::new(256 << 10, 0);
        d.read_vectored(&mut r, MIB).unwrap();
        assert_eq!(r.moved().0, 256 << 10);
        assert!(
            r.bytes() == a,
            "round {round}: unbuffered read after a buffered write"
        );
        // Unbuffered write over cached pages, then a buffered read of it.
        let mut cached = vec![0u8; 256 << 10];
        d.read_at(&mut cached, MIB).unwrap();
        let b = Aligned::from(&vec![round * 2 + 2; 256 << 10], 0);
        d.write_vectored(&b, MIB).unwrap();
        assert_eq!(b.moved().0, 256 << 10);
        d.read_at(&mut cached, MIB).unwrap();
        assert!(
            cached == b.bytes(),
            "round {round}: buffered read after an unbuffered write"
        );
    }

    // An allocating VHDX write (buffered, through the log and the BAT), then unbuffered
    // reads and writes of the block it allocated.
    let x = VhdxBuilder::new(8 * MIB)
        .block_size(MIB as u32)
        .create(dir.path().join("a.vhdx"))
        .unwrap();
    let a = Aligned::from(&vec![0x5a; MIB as usize], 0);
    x.write_vectored(&a, 2 * MIB).unwrap();
    assert_eq!(a.moved().0, 0, "the allocating write is not in place");
    let mut r = Aligned::new(MIB as usize, 0);
    x.read_vectored(&mut r, 2 * MIB).unwrap();
    assert_eq!(r.moved().0, MIB as usize);
    assert!(r.bytes().iter().all(|&b| b == 0x5a));
    let b = Aligned::from(&vec![0xa5; MIB as usize], 0);
    x.write_vectored(&b, 2 * MIB).unwrap();
    assert_eq!(b.moved().0, MIB as usize);
    let mut back = vec![0u8; MIB as usize];
    x.read_at(&mut back, 2 * MIB).unwrap();
    assert!(back.iter().all(|&v| v == 0xa5));
}

/// How many of the file's pages are in the page cache (`mincore` of a shared mapping).
fn cached_pages(path: &std::path::Path) -> usize {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a new read-only shared mapping of an open file, never dereferenced and
    // unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let mut resident = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `p` maps `len` bytes and `resident` has a byte for each of their pages.
    let r = unsafe { libc::mincore(p, len, resident.as_mut_ptr()) };
    // SAFETY: the mapping made above, not used after this.
    unsafe { libc::munmap(p, len) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    resident.iter().filter(|&&b| b & 1 != 0).count()
}

#[test]
fn unbuffered_io_leaves_no_image_page_in_the_page_cache() {
    let Some(dir) = direct_dir() else { return };
    // A raw image written through the page cache: its first unbuffered transfer drops it.
    let raw = dir.path().join("a.raw");
    std::fs::write(&raw, vec![7u8; 4 * MIB as usize]).unwrap();
    let d = RawDisk::open(&raw, false).unwrap();
    assert!(cached_pages(&raw) > 0);
    let mut r = Aligned::new(64 << 10, 0);
    d.read_vectored(&mut r, MIB).unwrap();
    assert_eq!(r.moved().0, 64 << 10);
    assert_eq!(cached_pages(&raw), 0, "raw image after an unbuffered read");

    // A dynamic VHDX with 7 of its 8 blocks written through the page cache, reopened (its
    // headers and BAT read through the page cache too).
    let path = dir.path().join("a.vhdx");
    let x = VhdxBuilder::new(8 * MIB)
        .block_size(MIB as u32)
        .create(&path)
        .unwrap();
    x.write_at(&vec![0x33; 7 * MIB as usize], 0).unwrap();
    drop(x);
    let x = vhdx::vhdx::Vhdx::open(&path, false).unwrap();
    assert!(cached_pages(&path) > 0);
    let w = Aligned::from(&vec![0x44; 64 << 10], 0);
    x.write_vectored(&w, MIB).unwrap();
    assert_eq!(w.moved().0, 64 << 10);
    assert_eq!(cached_pages(&path), 0, "VHDX after an unbuffered write");
    // Allocating the last block goes through the page cache (data, log, BAT). The flush
    // after it drops what it made durable; the BAT sector it then writes in place stays
    // dirty until the next flush, which drops it too.
    let a = Aligned::from(&vec![0x55; MIB as usize], 0);
    x.write_vectored(&a, 7 * MIB).unwrap();
    assert_eq!(a.moved().0, 0);
    assert!(cached_pages(&path) > 1);
    x.flush().unwrap();
    assert_eq!(cached_pages(&path), 1, "VHDX after a flush");
    x.flush().unwrap();
    assert_eq!(cached_pages(&path), 0, "VHDX after the next flush");
    let mut back = Aligned::new(8 * MIB as usize, 0);
    x.read_vectored(&mut back, 0).unwrap();
    assert!(back.bytes()[..MIB as usize].iter().all(|&b| b == 0x33));
    assert!(back.bytes()[MIB as usize..][..64 << 10]
        .iter()
        .all(|&b| b == 0x44));
    assert!(back.bytes()[7 * MIB as usize..].iter().all(|&b| b == 0x55));
}
