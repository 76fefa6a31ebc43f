//! The backend a SCSI target reads and writes: a byte-addressed medium.
//!
//! Shaped after `vhdx::Disk`, so the storage device adapts a disk image in a few lines:
//!
//! ```
//! # mod vhdx { // stands in for the vhdx crate's `Disk` (crates/vhdx/src/disk.rs)
//! #     pub type Error = std::io::Error;
//! #     pub trait Disk: Send + Sync {
//! #         fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error>;
//! #         fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error>;
//! #         fn flush(&self) -> Result<(), Error>;
//! #         fn unmap(&self, offset: u64, len: u64) -> Result<(), Error>;
//! #         fn size(&self) -> u64;
//! #         fn logical_sector_size(&self) -> u32;
//! #         fn physical_sector_size(&self) -> u32;
//! #         fn is_read_only(&self) -> bool;
//! #     }
//! # }
//! use std::sync::Arc;
//! use scsi::{Medium, MediumError};
//!
//! struct VhdMedium {
//!     disk: Arc<dyn vhdx::Disk>,
//!     id: [u8; 16], // the VHDX page-83 id
//! }
//!
//! impl Medium for VhdMedium {
//!     fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), MediumError> {
//!         self.disk.read_at(buf, off).map_err(|e| MediumError::io(off, e))
//!     }
//!     fn write_at(&self, buf: &[u8], off: u64) -> Result<(), MediumError> {
//!         self.disk.write_at(buf, off).map_err(|e| MediumError::io(off, e))
//!     }
//!     fn flush(&self) -> Result<(), MediumError> {
//!         self.disk.flush().map_err(|e| MediumError::io(0, e))
//!     }
//!     fn unmap(&self, off: u64, len: u64) -> Result<(), MediumError> {
//!         self.disk.unmap(off, len).map_err(|e| MediumError::io(off, e))
//!     }
//!     fn size(&self) -> u64 { self.disk.size() }
//!     fn logical_sector_size(&self) -> u32 { self.disk.logical_sector_size() }
//!     fn physical_sector_size(&self) -> u32 { self.disk.physical_sector_size() }
//!     fn is_read_only(&self) -> bool { self.disk.is_read_only() }
//!     fn disk_id(&self) -> [u8; 16] { self.id }
//!     fn supports_unmap(&self) -> bool { true }
//! }
//! ```

use std::sync::{Arc, Mutex};

/// What went wrong in a [`MediumError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediumErrorKind {
    /// The host I/O failed (reported to the guest as MEDIUM ERROR).
    Io,
    /// The medium refused a write because it is read-only (reported as DATA PROTECT).
    ReadOnly,
}

/// A failed backend operation, with the byte offset at which it failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op} at byte offset {offset:#x}: {source}")]
pub struct MediumError {
    pub kind: MediumErrorKind,
    /// Byte offset of the failing request (or of the failing part of it, when known).
    pub offset: u64,
    /// Filled in by the target: "read", "write", "flush", "unmap" or "allocation".
    pub op: &'static str,
    #[source]
    pub source: Arc<dyn std::error::Error + Send + Sync>,
}

impl MediumError {
    /// An I/O error at `offset`.
    pub fn io(offset: u64, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            kind: MediumErrorKind::Io,
            offset,
            op: "I/O",
            source: Arc::new(source),
        }
    }

    /// A write refused because the medium is read-only.
    pub fn read_only(offset: u64) -> Self {
        Self {
            kind: MediumErrorKind::ReadOnly,
            offset,
            op: "write",
            source: Arc::new(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
        }
    }
}

/// Provisioning state of a run of blocks (GET LBA STATUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// The next `len` bytes are mapped.
    Mapped(u64),
    /// The next `len` bytes are deallocated.
    Deallocated(u64),
}

/// A byte-addressed medium. Offsets and lengths passed by the targets are multiples of the
/// target's block size and lie within [`Medium::size`]. All methods take `&self`: several
/// queues may issue I/O at once.
pub trait Medium: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), MediumError>;
    /// Writes `buf` at `offset`; durable after [`Medium::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), MediumError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), MediumError>;
    /// Deallocates a range (only called when [`Medium::supports_unmap`]).
    fn unmap(&self, offset: u64, len: u64) -> Result<(), MediumError>;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Logical sector size in bytes (a power of two, 512..=65536).
    fn logical_sector_size(&self) -> u32;
    /// Physical sector size in bytes (a power-of-two multiple of the logical size).
    fn physical_sector_size(&self) -> u32;
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;
    /// A stable identifier of this disk (for example a VHDX's page-83 id), from which the
    /// targets derive the VPD serial number and device identification designators.
    fn disk_id(&self) -> [u8; 16];
    /// Whether [`Medium::unmap`] does anything; advertises logical block provisioning.
    fn supports_unmap(&self) -> bool {
        false
    }
    /// Whether unmapped blocks read back as zeros (LBPRZ). A differencing disk's unmapped
    /// blocks read from its parent, so this defaults to `false`.
    fn unmap_reads_zero(&self) -> bool {
        false
    }
    /// Provisioning state of the run starting at `offset`, looking no further than `len`
    /// bytes. The returned length must be at least one block and at most `len`.
    fn allocation(&self, offset: u64, len: u64) -> Result<Allocation, MediumError> {
        let _ = offset;
        Ok(Allocation::Mapped(len))
    }
}

/// A medium in RAM, for tests and fuzzing. Tracks unmapped sectors and can inject I/O errors.
#[derive(Debug)]
pub struct MemoryMedium {
    inner: Mutex<MemInner>,
    logical: u32,
    physical: u32,
    read_only: bool,
    unmap: bool,
    id: [u8; 16],
}

#[derive(Debug)]
struct MemInner {
    data: Vec<u8>,
    /// One flag per logical sector: `true` when deallocated.
    unmapped: Vec<bool>,
    /// Reads or writes touching `[start, end)` fail.
    fail: Option<(u64, u64)>,
    flushes: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("injected failure")]
struct Injected;

impl MemoryMedium {
    /// A zero-filled medium of `size` bytes with the given sector sizes.
    pub fn new(size: usize, logical: u32, physical: u32) -> Self {
        let sectors = size / logical.max(1) as usize;
        Self {
            inner: Mutex::new(MemInner {
                data: vec![0; size],
                unmapped: vec![false; sectors],
                fail: None,
                flushes: 0,
            }),
            logical,
            physical,
            read_only: false,
            unmap: false,
            id: [0x5A; 16],
        }
    }

    /// A medium holding `data` (its length is the size).
    pub fn from_vec(data: Vec<u8>, logical: u32, physical: u32) -> Self {
        let m = Self::new(0, logical, physical);
        {
            let mut g = m.lock();
            g.unmapped = vec![false; data.len() / logical.max(1) as usize];
            g.data = data;
        }
        m
    }

    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    pub fn with_unmap(mut self, unmap: bool) -> Self {
        self.unmap = unmap;
        self
    }

    pub fn with_id(mut self, id: [u8; 16]) -> Self {
        self.id = id;
        self
    }

    /// Makes I/O touching bytes `[start, end)` fail.
    pub fn fail_range(&self, start: u64, end: u64) {
        self.lock().fail = Some((start, end));
    }

    /// A copy of the bytes at `[offset, offset + len)` (clamped to the medium).
    pub fn contents(&self, offset: usize, len: usize) -> Vec<u8> {
        let g = self.lock();
        let start = offset.min(g.data.len());
        let end = offset.saturating_add(len).min(g.data.len());
        g.data[start..end].to_vec()
    }

    /// Number of completed flushes.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        support::lock(&self.inner)
    }

    fn range(g: &MemInner, offset: u64, len: usize) -> Result<std::ops::Range<usize>, MediumError> {
        let start = usize::try_from(offset).map_err(|_| MediumError::io(offset, Injected))?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= g.data.len())
            .ok_or_else(|| MediumError::io(offset, Injected))?;
        if let Some((fs, fe)) = g.fail {
            let (s, e) = (start as u64, end as u64);
            if s < fe && fs < e.max(s + 1) {
                return Err(MediumError::io(fs.max(s), Injected));
            }
        }
        Ok(start..end)
    }
}

impl Medium for MemoryMedium {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), MediumError> {
        let g = self.lock();
        let r = Self::range(&g, offset, buf.len())?;
        buf.copy_from_slice(&g.data[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), MediumError> {
        if self.read_only {
            return Err(MediumError::read_only(offset));
        }
        let mut g = self.lock();
        let r = Self::range(&g, offset, buf.len())?;
        let ls = self.logical.max(1) as usize;
        for s in r.start / ls..r.end.div_ceil(ls) {
            if let Some(u) = g.unmapped.get_mut(s) {
                *u = false;
            }
        }
        g.data[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), MediumError> {
        self.lock().flushes += 1;
        Ok(())
    }

    fn unmap(&self, offset: u64, len: u64) -> Result<(), MediumError> {
        if self.read_only {
            return Err(MediumError::read_only(offset));
        }
        let mut g = self.lock();
        let len = usize::try_from(len).map_err(|_| MediumError::io(offset, Injected))?;
        let r = Self::range(&g, offset, len)?;
        g.data[r.clone()].fill(0);
        let ls = self.logical.max(1) as usize;
        for s in r.start / ls..r.end / ls {
            if let Some(u) = g.unmapped.get_mut(s) {
                *u = true;
            }
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.lock().data.len() as u64
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

    fn disk_id(&self) -> [u8; 16] {
        self.id
    }

    fn supports_unmap(&self) -> bool {
        self.unmap
    }

    fn unmap_reads_zero(&self) -> bool {
        true
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Allocation, MediumError> {
        let g = self.lock();
        let ls = u64::from(self.logical.max(1));
        let first = offset / ls;
        let Some(&state) = g.unmapped.get(first as usize) else {
            return Err(MediumError::io(offset, Injected));
        };
        let max = (len / ls).max(1);
        let mut n = 1u64;
        while n < max && g.unmapped.get((first + n) as usize) == Some(&state) {
            n += 1;
        }
        Ok(if state {
            Allocation::Deallocated(n * ls)
        } else {
            Allocation::Mapped(n * ls)
        })
    }
}
