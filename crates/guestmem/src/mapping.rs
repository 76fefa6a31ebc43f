//! Anonymous host mappings for guest RAM, aligned to 2 MiB and backed by transparent huge pages
//! where the host allows them, so that KVM can map the guest with 2 MiB pages (a guest 2 MiB
//! page needs a host range congruent to it modulo 2 MiB, backed by one host huge page). Debian's
//! kernels default to THP "madvise": without `MADV_HUGEPAGE` every guest page costs a 4 KiB
//! host page and a longer two-dimensional page walk on each TLB miss.

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::MmapRegion;

const ALIGN: usize = 2 << 20;

/// An owned `len`-byte anonymous mapping starting on a 2 MiB boundary; unmapped on drop.
pub struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    pub fn new(len: usize) -> std::io::Result<Self> {
        let total = len
            .checked_add(ALIGN)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
        // SAFETY: a fresh anonymous private mapping at an address of the kernel's choosing;
        // it aliases nothing.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let raw = raw as usize;
        let start = raw.next_multiple_of(ALIGN);
        let head = start - raw;
        let tail = total - head - len;
        // SAFETY: both ranges lie inside the mapping just created and outside [start, start+len),
        // which is all this object keeps; nothing else refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(raw as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        // SAFETY: advice on the range this object now owns; it changes how the kernel backs
        // the pages, never their contents or the mapping's bounds.
        let advised =
            unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        if advised != 0 {
            // A kernel without THP (or with it set to "never") refuses; 4 KiB pages still work.
            tracing::debug!(
                "guest RAM without huge pages: madvise(MADV_HUGEPAGE): {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { addr: start, len })
    }

    /// A vm-memory view of the mapping. It does not own the memory; `self` must outlive it.
    pub fn region(&self) -> Result<MmapRegion<()>, vm_memory::mmap::MmapRegionError> {
        // SAFETY: [addr, addr+len) is a live mapping owned by `self`, and `GuestMemory` keeps
        // `self` alive for as long as the region (it drops the regions first).
        unsafe {
            MmapRegionBuilder::new(self.len)
                .with_raw_mmap_pointer(self.addr as *mut u8)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
        }
    }
}

/// Removes all access to the page-aligned host range `[addr, addr+len)`, which lies inside a
/// guest RAM mapping (the caller checked).
#[cfg(feature = "test-util")]
pub fn protect_none(addr: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: changing the protection of pages inside a mapping this crate owns cannot break
    // Rust's memory model: every access to guest RAM goes through vm-memory's volatile
    // accessors, and an access to a revoked page faults the process (which is what the test
    // that asks for it wants to see), it never reads or writes other memory.
    let r = unsafe { libc::mprotect(addr as *mut libc::c_void, len, libc::PROT_NONE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range is the mapping this object owns, and no view of it outlives `self`.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_writable() {
        let m = Mapping::new(4 << 20).unwrap();
        assert_eq!(m.addr % ALIGN, 0);
        let r = m.region().unwrap();
        assert_eq!(r.size(), 4 << 20);
    }

    /// The mapping is eligible for transparent huge pages whenever the host offers them on
    /// request (THP "always" or "madvise").
    #[test]
    fn asks_for_huge_pages() {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !mode.contains("[always]") && !mode.contains("[madvise]") {
            eprintln!(
                "skipped: this host's transparent huge pages are off ({})",
                mode.trim()
            );
            return;
        }
        let m = Mapping::new(4 << 20).unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        // The VMA that holds the mapping (a neighbour with the same flags may have merged).
        let holds = |line: &str| {
            let range = line.split_whitespace().next().unwrap_or("");
            let Some((lo, hi)) = range.split_once('-') else {
                return false;
            };
            match (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                (Ok(lo), Ok(hi)) => lo <= m.addr && m.addr < hi,
                _ => false,
            }
        };
        let mut lines = smaps.lines().skip_while(|l| !holds(l));
        assert!(lines.next().is_some(), "the mapping is in /proc/self/smaps");
        let flags = lines
            .find(|l| l.starts_with("VmFlags:"))
            .expect("its VmFlags line");
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "no huge-page advice: {flags}"
        );
    }
}
