//! Guest RAM: anonymous host mappings placed at guest physical addresses, with bounds-checked
//! reads and writes. Every access that a guest-supplied address drives goes through here, so an
//! address outside RAM is an error, never an out-of-bounds host access.
//!
//! The memory is shared with running vCPUs, so reads may race with guest writes; callers copy
//! data out once, validate the copy, and never re-read a field they have validated.
//!
//! `unsafe` is confined to [`mapping`], which creates the 2 MiB-aligned anonymous mappings,
//! [`fdio`], which moves bytes between a descriptor and guest pages, and [`uring`], which
//! does so asynchronously through io_uring.

mod fdio;
mod mapping;
pub mod uring;

pub use fdio::MAX_PIECES;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, VolatileMemory,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;

/// Errors from guest memory access.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest physical range {gpa:#x}+{len:#x} is not guest RAM")]
    OutOfRange { gpa: u64, len: u64 },
    #[error("cannot map {len:#x} bytes of guest RAM at {gpa:#x}: {reason}")]
    Map { gpa: u64, len: u64, reason: String },
    #[error("guest address {gpa:#x} is not aligned for a {size}-byte atomic access")]
    Unaligned { gpa: u64, size: usize },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One contiguous range of guest RAM, for registering with the hypervisor.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
}

/// Guest RAM. Cheap to clone; clones share the same memory.
#[derive(Clone)]
pub struct GuestMemory {
    mem: Arc<GuestMemoryMmap>,
    /// Owns the host mappings behind `mem`; declared after it so it is dropped last.
    _mappings: Arc<Vec<mapping::Mapping>>,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.regions()).finish()
    }
}

impl GuestMemory {
    /// Maps anonymous memory for each `(gpa, len)` range. Ranges must not overlap and must be
    /// page aligned.
    pub fn new(ranges: &[(u64, u64)]) -> Result<Self> {
        let mut regions = Vec::with_capacity(ranges.len());
        let mut mappings = Vec::with_capacity(ranges.len());
        for &(gpa, len) in ranges {
            let map_err = |reason: String| Error::Map { gpa, len, reason };
            if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
                return Err(map_err("not page aligned".into()));
            }
            let size = usize::try_from(len).map_err(|_| map_err("too large".into()))?;
            let map = mapping::Mapping::new(size).map_err(|e| map_err(e.to_string()))?;
            let mmap = map.region().map_err(|e| map_err(e.to_string()))?;
            let region = GuestRegionMmap::<()>::new(mmap, GuestAddress(gpa))
                .ok_or_else(|| map_err("address overflow".into()))?;
            regions.push(region);
            mappings.push(map);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Map {
            gpa: 0,
            len: 0,
            reason: e.to_string(),
        })?;
        Ok(Self {
            mem: Arc::new(mem),
            _mappings: Arc::new(mappings),
        })
    }

    /// The RAM ranges with their host addresses.
    pub fn regions(&self) -> Vec<Region> {
        self.mem
            .iter()
            .map(|r| Region {
                gpa: r.start_addr().raw_value(),
                len: r.len(),
                host_addr: r.as_ptr() as u64,
            })
            .collect()
    }

    /// The vm-memory view, for loaders (linux-loader) that take vm-memory types.
    pub fn vm_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Test aid: makes the whole pages `gpa..gpa+len` inaccessible to the host, so that any
    /// later access to them (for example a device worker touching a ring after its close)
    /// kills the process instead of passing unnoticed. The pages stay revoked until the
    /// memory is dropped.
    #[cfg(feature = "test-util")]
    pub fn revoke(&self, gpa: u64, len: u64) -> Result<()> {
        let out = Error::OutOfRange { gpa, len };
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(out);
        }
        let r = self.mem.find_region(GuestAddress(gpa)).ok_or(out)?;
        let offset = gpa - r.start_addr().raw_value();
        if offset.checked_add(len).is_none_or(|end| end > r.len()) {
            return Err(Error::OutOfRange { gpa, len });
        }
        mapping::protect_none(r.as_ptr() as usize + offset as usize, len as usize).map_err(|e| {
            Error::Map {
                gpa,
                len,
                reason: e.to_string(),
            }
        })
    }

    /// Total bytes of RAM.
    pub fn total_size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }

    /// Whether `gpa..gpa+len` lies entirely in RAM (possibly across adjacent regions).
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let mut at = gpa;
        while at < end {
            match self.mem.find_region(GuestAddress(at)) {
                Some(r) => at = r.last_addr().raw_value() + 1,
                None => return false,
            }
        }
        true
    }

    fn check(&self, gpa: u64, len: usize) -> Result<()> {
        if self.contains(gpa, len as u64) {
            Ok(())
        } else {
            Err(Error::OutOfRange {
                gpa,
                len: len as u64,
            })
        }
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.check(gpa, buf.len())?;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| Error::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// Copies `buf` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<()> {
        self.check(gpa, buf.len())?;
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| Error::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// Fills `len` bytes at `gpa` with zeros.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<()> {
        const CHUNK: [u8; 4096] = [0; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK.len() as u64);
            self.write(gpa + done, &CHUNK[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// Reads a plain-data value.
    pub fn read_obj<T: FromBytes + IntoBytes>(&self, gpa: u64) -> Result<T> {
        let mut v = T::new_zeroed();
        self.read(gpa, v.as_mut_bytes())?;
        Ok(v)
    }

    /// Writes a plain-data value.
    pub fn write_obj<T: IntoBytes + Immutable>(&self, gpa: u64, value: &T) -> Result<()> {
        self.write(gpa, value.as_bytes())
    }

    fn check_atomic(&self, gpa: u64, size: usize) -> Result<()> {
        if !gpa.is_multiple_of(size as u64) {
            return Err(Error::Unaligned { gpa, size });
        }
        self.check(gpa, size)
    }

    /// Atomically loads a naturally aligned u32 (for ring indices shared with the guest).
    pub fn load_u32(&self, gpa: u64, order: Ordering) -> Result<u32> {
        self.check_atomic(gpa, 4)?;
        self.mem
            .load(GuestAddress(gpa), order)
            .map_err(|_| Error::OutOfRange { gpa, len: 4 })
    }

    /// Atomically stores a naturally aligned u32.
    pub fn store_u32(&self, gpa: u64, value: u32, order: Ordering) -> Result<()> {
        self.check_atomic(gpa, 4)?;
        self.mem
            .store(value, GuestAddress(gpa), order)
            .map_err(|_| Error::OutOfRange { gpa, len: 4 })
    }

    /// Atomically loads a naturally aligned u64.
    pub fn load_u64(&self, gpa: u64, order: Ordering) -> Result<u64> {
        self.check_atomic(gpa, 8)?;
        self.mem
            .load(GuestAddress(gpa), order)
            .map_err(|_| Error::OutOfRange { gpa, len: 8 })
    }

    /// Atomically stores a naturally aligned u64.
    pub fn store_u64(&self, gpa: u64, value: u64, order: Ordering) -> Result<()> {
        self.check_atomic(gpa, 8)?;
        self.mem
            .store(value, GuestAddress(gpa), order)
            .map_err(|_| Error::OutOfRange { gpa, len: 8 })
    }

    /// Atomically ORs `mask` into a naturally aligned u64 (event flag bits shared with the
    /// guest) and returns the previous value.
    pub fn fetch_or_u64(&self, gpa: u64, mask: u64) -> Result<u64> {
        self.check_atomic(gpa, 8)?;
        let slice = self
            .mem
            .get_slice(GuestAddress(gpa), 8)
            .map_err(|_| Error::OutOfRange { gpa, len: 8 })?;
        let atomic = slice
            .get_atomic_ref::<std::sync::atomic::AtomicU64>(0)
            .map_err(|_| Error::Unaligned { gpa, size: 8 })?;
        Ok(atomic.fetch_or(mask, Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_writes_and_rejects_out_of_range() {
        let mem = GuestMemory::new(&[(0, 0x10000), (0x20000, 0x1000)]).unwrap();
        mem.write(0xfff0, &[1, 2, 3, 4]).unwrap();
        let mut buf = [0u8; 4];
        mem.read(0xfff0, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        // Straddles the end of the first region into the hole.
        assert!(mem.write(0xfffe, &[0; 4]).is_err());
        assert!(mem.read(0x10000, &mut buf).is_err());
        assert!(mem.read(u64::MAX - 1, &mut buf).is_err());
        assert!(mem.contains(0x20000, 0x1000));
        assert!(!mem.contains(0x20000, 0x1001));
        assert_eq!(mem.total_size(), 0x11000);
    }

    #[test]
    fn objects_and_atomics() {
        let mem = GuestMemory::new(&[(0, 0x2000)]).unwrap();
        mem.write_obj(0x100, &0x1122_3344_5566_7788u64).unwrap();
        assert_eq!(mem.read_obj::<u64>(0x100).unwrap(), 0x1122_3344_5566_7788);
        mem.store_u32(0x200, 7, Ordering::Release).unwrap();
        assert_eq!(mem.load_u32(0x200, Ordering::Acquire).unwrap(), 7);
        assert!(mem.load_u32(0x201, Ordering::Acquire).is_err());
        assert_eq!(mem.fetch_or_u64(0x208, 0b10).unwrap(), 0);
        assert_eq!(mem.fetch_or_u64(0x208, 0b01).unwrap(), 0b10);
        assert_eq!(mem.load_u64(0x208, Ordering::SeqCst).unwrap(), 0b11);
        assert!(mem.store_u64(0x1ffc, 0, Ordering::SeqCst).is_err());
    }
}
