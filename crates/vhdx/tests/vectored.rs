//! Vectored I/O through `Disk::extent`: every backend reads and writes an `IoBuffer`
//! the same as `read_at`/`write_at` (checked against a model under seeded random requests
//! that cross block boundaries), and allocated data moves straight between the file and the
//! buffer with no bounce copy.

mod common;

use std::cell::Cell;
use std::os::fd::BorrowedFd;

use common::vhd;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use vhdx::raw::RawDisk;
use vhdx::vhd::format::DiskType;
use vhdx::vhd::{Vhd, VhdOpenOptions};
use vhdx::vhdx::{Vhdx, VhdxBuilder};
use vhdx::{Disk, Extent, IoBuffer};

const MIB: u64 = 1 << 20;

/// A byte buffer that counts how its bytes were moved.
#[derive(Default)]
struct Counting {
    bytes: Vec<u8>,
    direct: Cell<usize>,
    copied: Cell<usize>,
}

impl Counting {
    fn new(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            ..Self::default()
        }
    }
}

impl IoBuffer for Counting {
    fn len(&self) -> usize {
        self.bytes.len()
    }
    fn read_from(
        &mut self,
        fd: BorrowedFd<'_>,
        off: u64,
        at: usize,
        len: usize,
    ) -> std::io::Result<()> {
        self.direct.set(self.direct.get() + len);
        self.bytes.read_from(fd, off, at, len)
    }
    fn write_to(&self, fd: BorrowedFd<'_>, off: u64, at: usize, len: usize) -> std::io::Result<()> {
        self.direct.set(self.direct.get() + len);
        self.bytes.write_to(fd, off, at, len)
    }
    fn copy_from(&mut self, at: usize, src: &[u8]) -> std::io::Result<()> {
        self.copied.set(self.copied.get() + src.len());
        self.bytes.copy_from(at, src)
    }
    fn copy_to(&self, at: usize, dst: &mut [u8]) -> std::io::Result<()> {
        self.copied.set(self.copied.get() + dst.len());
        self.bytes.copy_to(at, dst)
    }
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

/// Seeded random vectored and plain writes, unmaps and vectored reads, checked against
/// `model` (the disk's current contents).
fn exercise(d: &dyn Disk, model: &mut [u8], seed: u64, what: &str) {
    let mut rng = StdRng::seed_from_u64(seed);
    let ss = u64::from(d.logical_sector_size());
    let sectors = d.size() / ss;
    for i in 0..80 {
        let n = rng.random_range(1..=(MIB / ss).min(sectors));
        let lba = rng.random_range(0..=sectors - n);
        let (off, len) = (lba * ss, (n * ss) as usize);
        let range = off as usize..off as usize + len;
        match rng.random_range(0..10) {
            0..=3 => {
                let mut data = vec![0u8; len];
                rng.fill_bytes(&mut data);
                d.write_vectored(&data, off).unwrap();
                model[range].copy_from_slice(&data);
            }
            4 => {
                let data = vec![rng.random::<u8>() | 1; len];
                d.write_at(&data, off).unwrap();
                model[range].copy_from_slice(&data);
            }
            5 if i % 3 == 0 => {
                d.unmap(off, len as u64).unwrap();
                // A differencing disk's unmapped sectors read the parent's data or zeros:
                // take what the plain read says as the model.
                d.read_at(&mut model[range], off).unwrap();
            }
            _ => {
                let mut buf = vec![0xEEu8; len];
                d.read_vectored(&mut buf, off).unwrap();
                if buf[..] != model[range.clone()] {
                    let p = buf.iter().zip(&model[range]).position(|(a, b)| a != b);
                    panic!("{what}: request {i} ({off:#x}+{len:#x}) differs at {p:?}");
                }
            }
        }
    }
    let mut all = vec![0u8; d.size() as usize];
    d.read_vectored(&mut all, 0).unwrap();
    assert!(all == model, "{what}: final contents");
}

#[test]
fn raw_reads_and_writes_straight_between_file_and_buffer() {
    let dir = scratch();
    let d = RawDisk::create(dir.path().join("a.raw"), 8 * MIB).unwrap();
    let mut model = vec![0u8; 8 * MIB as usize];
    exercise(&d, &mut model, 1, "raw");
    let w = Counting::new(vec![7; 64 << 10]);
    d.write_vectored(&w, 4096).unwrap();
    let mut r = Counting::new(vec![0; 64 << 10]);
    d.read_vectored(&mut r, 4096).unwrap();
    assert_eq!(r.bytes, w.bytes);
    assert_eq!((w.direct.get(), w.copied.get()), (64 << 10, 0));
    assert_eq!((r.direct.get(), r.copied.get()), (64 << 10, 0));
    // Out of range and misaligned requests are refused, never clamped.
    let mut big = vec![0u8; 8192];
    assert!(d.read_vectored(&mut big, 8 * MIB - 4096).is_err());
    let mut odd = vec![0u8; 100];
    assert!(d.read_vectored(&mut odd, 0).is_err());
    let ro = RawDisk::open(dir.path().join("a.raw"), true).unwrap();
    assert!(matches!(
        ro.write_vectored(&vec![0u8; 512], 0),
        Err(vhdx::Error::ReadOnly)
    ));
}

#[test]
fn vhd_fixed_dynamic_and_differencing_match_the_model() {
    let dir = scratch();
    let size = 6 * MIB;
    let fixed = vhd(&dir.path().join("f.vhd"), DiskType::Fixed, size, None);
    exercise(&fixed, &mut vec![0u8; size as usize], 2, "fixed VHD");

    let base_path = dir.path().join("base.vhd");
    let base = vhd(&base_path, DiskType::Dynamic, size, None);
    let mut model = vec![0u8; size as usize];
    exercise(&base, &mut model, 3, "dynamic VHD");
    // An allocated block reads straight from the file; an unallocated one is zero filled.
    let w = Counting::new(vec![9; 512 << 10]);
    base.write_vectored(&w, 0).unwrap();
    model[..512 << 10].fill(9);
    let mut r = Counting::new(vec![0; 512 << 10]);
    base.read_vectored(&mut r, 0).unwrap();
    assert_eq!((r.direct.get(), r.copied.get()), (512 << 10, 0));
    drop(base);

    let child = vhd(
        &dir.path().join("child.vhd"),
        DiskType::Differencing,
        0,
        Some(&base_path),
    );
    // Reads of blocks the child lacks fall through to the parent's file.
    let mut r = Counting::new(vec![0; 512 << 10]);
    child.read_vectored(&mut r, 0).unwrap();
    assert!(r.bytes.iter().all(|&b| b == 9));
    assert_eq!(r.copied.get(), 0);
    exercise(&child, &mut model, 4, "differencing VHD");
    drop(child);
    let again = Vhd::open(dir.path().join("child.vhd"), &VhdOpenOptions::default()).unwrap();
    let mut all = vec![0u8; size as usize];
    again.read_at(&mut all, 0).unwrap();
    assert!(all == model, "differencing VHD after reopen");
}

#[test]
fn vhdx_dynamic_fixed_4k_and_differencing_match_the_model() {
    let dir = scratch();
    let size = 8 * MIB;
    let fixed = VhdxBuilder::new(size)
        .fixed(true)
        .create(dir.path().join("f.vhdx"))
        .unwrap();
    exercise(&fixed, &mut vec![0u8; size as usize], 5, "fixed VHDX");
    let k4 = VhdxBuilder::new(size)
        .block_size(MIB as u32)
        .logical_sector_size(4096)
        .create(dir.path().join("4k.vhdx"))
        .unwrap();
    exercise(&k4, &mut vec![0u8; size as usize], 6, "4Kn VHDX");

    let base_path = dir.path().join("base.vhdx");
    let base = VhdxBuilder::new(size)
        .block_size(MIB as u32)
        .create(&base_path)
        .unwrap();
    let mut model = vec![0u8; size as usize];
    exercise(&base, &mut model, 7, "dynamic VHDX");
    let w = Counting::new(vec![3; MIB as usize]);
    base.write_vectored(&w, MIB).unwrap();
    model[MIB as usize..2 * MIB as usize].fill(3);
    // The block is allocated now: a second write and a read go straight to the file.
    let w2 = Counting::new(vec![3; MIB as usize]);
    base.write_vectored(&w2, MIB).unwrap();
    assert_eq!((w2.direct.get(), w2.copied.get()), (MIB as usize, 0));
    let mut r = Counting::new(vec![0; MIB as usize]);
    base.read_vectored(&mut r, MIB).unwrap();
    assert_eq!((r.direct.get(), r.copied.get()), (MIB as usize, 0));
    assert!(matches!(
        base.extent(MIB, MIB, true).unwrap(),
        Extent::File { .. }
    ));
    drop(base);

    let child = VhdxBuilder::differencing(&base_path)
        .create(dir.path().join("child.vhdx"))
        .unwrap();
    let mut r = Counting::new(vec![0; MIB as usize]);
    child.read_vectored(&mut r, MIB).unwrap();
    assert!(r.bytes.iter().all(|&b| b == 3));
    assert_eq!(
        r.copied.get(),
        0,
        "parent data is read from the parent's file"
    );
    exercise(&child, &mut model, 8, "differencing VHDX");
    drop(child);
    let again = Vhdx::open(dir.path().join("child.vhdx"), true).unwrap();
    let mut all = vec![0u8; size as usize];
    again.read_at(&mut all, 0).unwrap();
    assert!(all == model, "differencing VHDX after reopen");
}

/// A disk with only the required methods gets working vectored I/O from the defaults.
#[test]
fn default_vectored_methods_bounce_through_read_at_and_write_at() {
    struct Plain(std::sync::Mutex<Vec<u8>>);
    impl Disk for Plain {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> vhdx::Result<()> {
            let g = self.0.lock().unwrap();
            buf.copy_from_slice(&g[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> vhdx::Result<()> {
            let mut g = self.0.lock().unwrap();
            g[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> vhdx::Result<()> {
            Ok(())
        }
        fn unmap(&self, _: u64, _: u64) -> vhdx::Result<()> {
            Ok(())
        }
        fn size(&self) -> u64 {
            4 * MIB
        }
        fn logical_sector_size(&self) -> u32 {
            512
        }
        fn physical_sector_size(&self) -> u32 {
            512
        }
        fn is_read_only(&self) -> bool {
            false
        }
    }
    let d = Plain(std::sync::Mutex::new(vec![0; 4 * MIB as usize]));
    let w = Counting::new((0..3 * MIB as usize).map(|i| i as u8).collect());
    d.write_vectored(&w, 512).unwrap();
    let mut r = Counting::new(vec![0; 3 * MIB as usize]);
    d.read_vectored(&mut r, 512).unwrap();
    assert_eq!(r.bytes, w.bytes);
    assert_eq!(r.direct.get(), 0);
    assert_eq!(r.copied.get(), 3 * MIB as usize);
}
