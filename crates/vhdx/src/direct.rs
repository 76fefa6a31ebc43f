//! Unbuffered I/O: a second descriptor of an image file, opened with `O_DIRECT` on first use,
//! for data that moves straight between a caller's memory and the file without the host's
//! page cache (as Hyper-V's unbuffered I/O and QEMU's `cache=none`). Everything else
//! (allocation, metadata, bitmaps, the VHDX log, unaligned requests) keeps the buffered one.
//!
//! Coherence between the two is the kernel's: before a direct read or write it writes back
//! the dirty page-cache pages of the range, and after a direct write it drops them, so
//! neither path reads what the other has overwritten.
//!
//! A file with any page in the page cache costs every direct write more: Linux then invalidates
//! the written range after each one, and its older direct-I/O code (ext2 on Linux 6.1) hands
//! each asynchronous write's completion to a workqueue. The buffered descriptor's metadata I/O
//! (a VHDX's headers and BAT read at open, the log, a VHD's BAT) leaves such pages behind, so
//! once the unbuffered descriptor is in use the file's pages are dropped: when it opens (after
//! writing back what is dirty), and after each flush ([`DirectFd::drop_cached`]).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::OnceLock;

use rustix::fs::{AtFlags, Mode, OFlags, StatxFlags};

static LOG: support::RateLimit = support::RateLimit::guest();

/// Largest alignment used: guest RAM is mapped page by page, so a guest address aligned to
/// at most a page is a host address aligned the same.
const MAX_ALIGN: u32 = 4096;

/// What [`DirectFd::get`] found.
struct Opened {
    fd: OwnedFd,
    align: u32,
}

/// The unbuffered descriptor of one image file, opened when first asked for.
#[derive(Default)]
pub struct DirectFd {
    cell: OnceLock<Option<Opened>>,
}

/// An open unbuffered descriptor and the alignment its I/O needs.
#[derive(Debug, Clone, Copy)]
pub struct Direct<'a> {
    pub fd: BorrowedFd<'a>,
    /// File offsets, lengths and memory addresses of direct I/O are multiples of this.
    pub align: u32,
}

impl Direct<'_> {
    /// Whether a transfer of `len` bytes at file offset `offset` is aligned for this file
    /// (the memory is the caller's to check).
    pub fn fits(&self, offset: u64, len: u64) -> bool {
        let a = u64::from(self.align);
        offset.is_multiple_of(a) && len.is_multiple_of(a) && len > 0
    }
}

impl std::fmt::Debug for DirectFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.cell.get() {
            None => "not opened",
            Some(None) => "refused",
            Some(Some(_)) => "open",
        };
        f.write_str(state)
    }
}

impl DirectFd {
    /// The unbuffered descriptor of `file` (opened on the first call, with the same access
    /// mode), or `None` where the file system refuses `O_DIRECT` (logged once per file).
    pub fn get(&self, file: BorrowedFd<'_>, path: &Path) -> Option<Direct<'_>> {
        self.cell
            .get_or_init(|| match open_direct(file) {
                Ok(o) => Some(o),
                Err(why) => {
                    support::limited!(
                        LOG,
                        info,
                        "{}: no unbuffered I/O ({why}); the page cache serves it",
                        path.display()
                    );
                    None
                }
            })
            .as_ref()
            .map(|o| Direct {
                fd: o.fd.as_fd(),
                align: o.align,
            })
    }

    /// Drops the clean page-cache pages of `file` (the whole file) if its unbuffered
    /// descriptor is open: called after a flush, when the buffered metadata writes before it
    /// are on the device. Pages still dirty stay; nothing fails (it is advice).
    pub fn drop_cached(&self, file: BorrowedFd<'_>) {
        if matches!(self.cell.get(), Some(Some(_))) {
            drop_clean_pages(file);
        }
    }

    /// The unbuffered descriptor for `len` bytes at `offset` of `file`, when `unbuffered`,
    /// the file system takes it, the range is aligned and so is the memory
    /// (`memory_aligned(alignment)`); `None`: use `file` itself.
    pub fn choose(
        &self,
        unbuffered: bool,
        file: BorrowedFd<'_>,
        path: &Path,
        (offset, len): (u64, u64),
        memory_aligned: impl FnOnce(u32) -> bool,
    ) -> Option<BorrowedFd<'_>> {
        if !unbuffered {
            return None;
        }
        self.get(file, path)
            .filter(|d| d.fits(offset, len) && memory_aligned(d.align))
            .map(|d| d.fd)
    }
}

/// Opens `file` again with `O_DIRECT` and finds the alignment it needs.
fn open_direct(file: BorrowedFd<'_>) -> Result<Opened, String> {
    let flags = rustix::fs::fcntl_getfl(file).map_err(|e| format!("fcntl: {e}"))?;
    let access = flags & OFlags::RWMODE;
    // The same open file through /proc: the same inode even if the path was renamed.
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    let fd = rustix::fs::open(
        proc.as_str(),
        access | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open with O_DIRECT: {e}"))?;
    let align = alignment(fd.as_fd())?;
    if !align.is_power_of_two() || align > MAX_ALIGN {
        return Err(format!("direct I/O alignment {align} is not supported"));
    }
    // What went through the buffered descriptor before (headers and BAT read at open, a raw
    // image just written through the page cache) need not stay cached: written back once
    // (dirty pages are not dropped), then dropped.
    let _ = rustix::fs::fdatasync(file);
    drop_clean_pages(file);
    Ok(Opened { fd, align })
}

/// `POSIX_FADV_DONTNEED` on the whole file: the kernel drops the pages that are not dirty.
fn drop_clean_pages(file: BorrowedFd<'_>) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
}

/// The direct-I/O alignment of `fd`: `statx` `STATX_DIOALIGN` (Linux 6.1 for ext4, f2fs,
/// xfs and block devices), else the logical block size of the file system's device
/// (sysfs), else 512.
fn alignment(fd: BorrowedFd<'_>) -> Result<u32, String> {
    let st = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN)
        .map_err(|e| format!("statx: {e}"))?;
    if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::DIOALIGN) {
        if st.stx_dio_offset_align == 0 {
            return Err("the file system does not support direct I/O on it".into());
        }
        return Ok(st.stx_dio_offset_align.max(st.stx_dio_mem_align));
    }
    Ok(device_block_size(st.stx_dev_major, st.stx_dev_minor).unwrap_or(512))
}

/// The logical block size of block device `major:minor` (or of the disk a partition is on).
fn device_block_size(major: u32, minor: u32) -> Option<u32> {
    let dev = format!("/sys/dev/block/{major}:{minor}");
    ["queue/logical_block_size", "../queue/logical_block_size"]
        .iter()
        .find_map(|f| std::fs::read_to_string(format!("{dev}/{f}")).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &u32| n >= 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_checks_offset_and_length() {
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let d = Direct {
            fd: f.as_fd(),
            align: 512,
        };
        assert!(d.fits(1024, 4096));
        assert!(!d.fits(1000, 4096));
        assert!(!d.fits(1024, 100));
        assert!(!d.fits(0, 0));
    }

    #[test]
    fn a_missing_device_has_no_block_size() {
        assert_eq!(device_block_size(u32::MAX, u32::MAX), None);
    }
}
