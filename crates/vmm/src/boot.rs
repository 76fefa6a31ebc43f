//! Linux direct boot through the 64-bit boot protocol: load the bzImage's protected-mode kernel,
//! place the initrd and command line, fill the zero page (with its e820 map and the RSDP
//! address), and build the identity page tables and GDT the 64-bit entry point expects.

use crate::layout;
use crate::payload;
use crate::vmlinux;
use guestmem::GuestMemory;
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use vm_memory::GuestAddress;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a bzImage Linux kernel ({why})")]
    NotBzImage { path: PathBuf, why: String },
    #[error("{path}: the kernel has no 64-bit entry point (boot protocol {version:#x}); use an x86-64 kernel")]
    No64BitEntry { path: PathBuf, version: u16 },
    #[error("{path}: the kernel ({size} MiB once loaded) does not fit in {memory} MiB of guest memory; raise --memory")]
    KernelTooLarge {
        path: PathBuf,
        size: u64,
        memory: u64,
    },
    #[error("{path}: the initrd ({size} MiB) does not fit in guest memory next to the kernel ({available} MiB free below 4 GiB); raise --memory")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        available: u64,
    },
    #[error("{path}: {why} (at file offset {file_offset:#x}); the kernel file is damaged")]
    CorruptPayload {
        path: PathBuf,
        file_offset: u64,
        why: String,
    },
    #[error("{path}: the vmlinux does not load: {why}")]
    BadVmlinux { path: PathBuf, why: String },
    #[error("the kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: u64 },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("guest memory: {0}")]
    Memory(#[from] guestmem::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where the loaded kernel starts executing and what the boot CPU's registers need.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// The 64-bit entry point.
    pub rip: u64,
    /// The zero page, passed in RSI.
    pub zero_page: u64,
}

// Setup header fields, as offsets into the zero page (Documentation/arch/x86/boot.rst).
const HDR_START: usize = 0x1f1;
const HDR_JUMP_LEN: usize = 0x201;
const VID_MODE: usize = 0x1fa;
const BOOT_VERSION: usize = 0x206;
const TYPE_OF_LOADER: usize = 0x210;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21c;
const CMD_LINE_PTR: usize = 0x228;
const XLOADFLAGS: usize = 0x236;
const E820_ENTRIES: usize = 0x1e8;
const E820_TABLE: usize = 0x2d0;
const E820_MAX: usize = 128;
const ACPI_RSDP_ADDR: usize = 0x70;
const XLF_KERNEL_64: u16 = 1;

/// What kind of kernel file `--kernel` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelKind {
    BzImage,
    /// An uncompressed ELF vmlinux (as Firecracker and cloud-hypervisor also accept).
    Vmlinux,
}

/// Opens `kernel` and checks that it is an x86-64 bzImage or an ELF vmlinux; returns the file,
/// its kind, and the setup header to put in the zero page (the bzImage's own first 1 KiB, or one
/// made up for a vmlinux).
fn read_header(kernel: &Path) -> Result<(File, KernelKind, [u8; 0x400], usize)> {
    let read_err = |source| Error::Read {
        path: kernel.to_path_buf(),
        source,
    };
    let mut file = File::open(kernel).map_err(read_err)?;
    let mut head = [0u8; 0x400];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]).map_err(read_err)? {
            0 => break,
            k => n += k,
        }
    }
    if vmlinux::is_elf(&head[..n]) {
        vmlinux::check_ident(&head[..n]).map_err(|why| Error::NotBzImage {
            path: kernel.to_path_buf(),
            why,
        })?;
        return Ok((file, KernelKind::Vmlinux, vmlinux_setup_header(), 0x400));
    }
    if n < 0x260 || &head[0x202..0x206] != b"HdrS" {
        return Err(Error::NotBzImage {
            path: kernel.to_path_buf(),
            why: "no 'HdrS' boot header at offset 0x202, and not an ELF vmlinux".into(),
        });
    }
    let version = u16::from_le_bytes([head[BOOT_VERSION], head[BOOT_VERSION + 1]]);
    let xloadflags = u16::from_le_bytes([head[XLOADFLAGS], head[XLOADFLAGS + 1]]);
    if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::No64BitEntry {
            path: kernel.to_path_buf(),
            version,
        });
    }
    Ok((file, KernelKind::BzImage, head, n))
}

/// The setup header a vmlinux gets in its zero page: what a boot loader fills in for a kernel
/// that brings none (boot protocol 2.12, loaded high, 16 MiB alignment).
fn vmlinux_setup_header() -> [u8; 0x400] {
    let mut h = [0u8; 0x400];
    put(&mut h, 0x1fe, &0xaa55u16.to_le_bytes());
    h[HDR_JUMP_LEN] = 0x66;
    put(&mut h, 0x202, b"HdrS");
    put(&mut h, BOOT_VERSION, &0x020cu16.to_le_bytes());
    h[0x211] = 1; // LOADED_HIGH
    put(&mut h, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut h, 0x230, &0x100_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut h, XLOADFLAGS, &XLF_KERNEL_64.to_le_bytes());
    put(
        &mut h,
        0x238,
        &((layout::CMDLINE_MAX - 1) as u32).to_le_bytes(),
    ); // cmdline_size
    h
}

/// Checks the kernel and initrd files before any VM resources exist, so a typo costs nothing.
pub fn preflight(kernel: &Path, initrd: Option<&Path>, mem_size: u64) -> Result<()> {
    read_header(kernel)?;
    if let Some(path) = initrd {
        let size = std::fs::metadata(path)
            .map_err(|source| Error::Read {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if size >= mem_size {
            return Err(Error::InitrdTooLarge {
                path: path.to_path_buf(),
                size: size.div_ceil(1 << 20),
                available: mem_size >> 20,
            });
        }
    }
    Ok(())
}

/// The setup-header fields the loader uses, read from the bzImage's first 1 KiB.
struct SetupHeader {
    setup_sects: u64,
    initrd_addr_max: u32,
    cmdline_size: u32,
    payload_offset: u32,
    payload_length: u32,
    pref_address: u64,
    init_size: u32,
}

impl SetupHeader {
    fn parse(head: &[u8; 0x400]) -> Self {
        let u32_at = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().unwrap());
        let setup_sects = match head[0x1f1] {
            0 => 4,
            n => u64::from(n),
        };
        Self {
            setup_sects,
            initrd_addr_max: u32_at(0x22c),
            cmdline_size: u32_at(0x238),
            payload_offset: u32_at(0x248),
            payload_length: u32_at(0x24c),
            pref_address: u64::from_le_bytes(head[0x258..0x260].try_into().unwrap()),
            init_size: u32_at(0x260),
        }
    }
}

/// Highest physical address a vmlinux segment may name before the RAM check (64 TiB).
const MAX_SEGMENT_END: u64 = 1 << 46;

/// The bzImage's LZ4 payload, when it has one (read into memory).
fn lz4_payload(
    kernel: &Path,
    file: &mut File,
    hdr: &SetupHeader,
) -> Result<Option<(u64, Vec<u8>)>> {
    use std::io::{Seek, SeekFrom};
    let read_err = |source| Error::Read {
        path: kernel.to_path_buf(),
        source,
    };
    let file_len = file.metadata().map_err(read_err)?.len();
    let start = (hdr.setup_sects + 1) * 512 + u64::from(hdr.payload_offset);
    let len = u64::from(hdr.payload_length);
    if len < 16 || start.saturating_add(len) > file_len {
        return Ok(None);
    }
    let mut magic = [0u8; 6];
    file.seek(SeekFrom::Start(start)).map_err(read_err)?;
    file.read_exact(&mut magic).map_err(read_err)?;
    if payload::Compression::detect(&magic) != payload::Compression::Lz4 {
        return Ok(None);
    }
    let mut data = vec![0u8; len as usize];
    file.seek(SeekFrom::Start(start)).map_err(read_err)?;
    file.read_exact(&mut data).map_err(read_err)?;
    Ok(Some((start, data)))
}

/// Unpacks an LZ4 payload (at file offset `start`) straight into guest memory: block 0 holds
/// the ELF headers; the other blocks are unpacked in parallel, each into a scratch buffer of its
/// thread, and copied to their segments.
fn load_lz4_vmlinux(
    kernel: &Path,
    mem: &GuestMemory,
    start: u64,
    payload: &[u8],
    max_size: u64,
) -> Result<vmlinux::Segments> {
    let corrupt = |e: payload::PayloadError| Error::CorruptPayload {
        path: kernel.to_path_buf(),
        file_offset: start + e.offset as u64,
        why: e.why,
    };
    let bad = |why: String| Error::BadVmlinux {
        path: kernel.to_path_buf(),
        why,
    };
    let started = std::time::Instant::now();
    let frame = payload::Lz4Frame::parse(payload, max_size.min(usize::MAX as u64) as usize)
        .map_err(corrupt)?;
    let mut scratch = vec![0u8; frame.block_len(0)];
    let n = frame.unpack_block(0, &mut scratch).map_err(corrupt)?;
    let segments = vmlinux::Segments::parse(
        &scratch[..n],
        frame.size() as u64,
        layout::HIGH_MEM,
        MAX_SEGMENT_END,
    )
    .map_err(bad)?;
    if segments.end > max_size {
        // Too large for guest RAM: load nothing; the caller reports the size.
        return Ok(segments);
    }
    segments.scatter(mem, 0, &scratch[..n])?;
    drop(scratch);
    let next = std::sync::atomic::AtomicUsize::new(1);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(frame.block_count().saturating_sub(1))
        .min(8);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut buf = vec![0u8; payload::LZ4_BLOCK];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= frame.block_count() {
                            return Ok::<(), Error>(());
                        }
                        let n = frame.unpack_block(i, &mut buf).map_err(corrupt)?;
                        segments.scatter(mem, (i * payload::LZ4_BLOCK) as u64, &buf[..n])?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("unpacking threads do not panic"))
    })?;
    tracing::debug!(
        "unpacked the LZ4 kernel ({} MiB) into guest memory in {:?} on {} threads",
        frame.size() >> 20,
        started.elapsed(),
        threads.max(1)
    );
    Ok(segments)
}

/// Loads `kernel` (and `initrd`) into `mem` and writes the zero page. `rsdp` is the guest
/// address of the ACPI RSDP.
///
/// An LZ4-compressed bzImage is unpacked here and its vmlinux entered at its 64-bit entry point
/// (`phys_startup_64`) with the same zero page the bzImage's own decompressor would pass on;
/// any other bzImage is loaded at 1 MiB and unpacks itself.
pub fn load_linux(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<BootEntry> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Read { path, source }
    };
    let (mut file, kind, head, n) = read_header(kernel)?;
    let hdr = SetupHeader::parse(&head);
    let not_bz = |why: &str| Error::NotBzImage {
        path: kernel.to_path_buf(),
        why: why.to_string(),
    };
    let too_large = |size: u64| Error::KernelTooLarge {
        path: kernel.to_path_buf(),
        size: size.div_ceil(1 << 20),
        memory: mem_size >> 20,
    };
    // The kernel ends up in `init_size` bytes from its preferred (or our 1 MiB) load address.
    let low_end = layout::ram_ranges(mem_size)[0].1;
    let mut kernel_end = hdr
        .pref_address
        .max(layout::HIGH_MEM)
        .saturating_add(u64::from(hdr.init_size));
    if kernel_end > low_end {
        return Err(too_large(u64::from(hdr.init_size)));
    }
    let segments = match kind {
        KernelKind::BzImage => match lz4_payload(kernel, &mut file, &hdr)? {
            Some((start, payload)) => {
                Some(load_lz4_vmlinux(kernel, mem, start, &payload, low_end)?)
            }
            None => None,
        },
        KernelKind::Vmlinux => {
            let image = std::fs::read(kernel).map_err(read_err(kernel))?;
            let segments = vmlinux::Segments::parse(
                &image,
                image.len() as u64,
                layout::HIGH_MEM,
                MAX_SEGMENT_END,
            )
            .map_err(|why| Error::BadVmlinux {
                path: kernel.to_path_buf(),
                why,
            })?;
            // Loaded only if it fits; below, a kernel that does not is refused with its size.
            if segments.end <= low_end {
                segments.scatter(mem, 0, &image)?;
            }
            Some(segments)
        }
    };
    let rip = match segments {
        Some(segments) => {
            kernel_end = kernel_end.max(segments.end);
            if kernel_end > low_end {
                return Err(too_large(kernel_end - layout::HIGH_MEM));
            }
            segments.entry
        }
        None => {
            // The protected-mode kernel always goes at 1 MiB (our layout).
            let loaded = BzImage::load(
                mem.vm_memory(),
                Some(GuestAddress(layout::HIGH_MEM)),
                &mut file,
                Some(GuestAddress(layout::HIGH_MEM)),
            )
            .map_err(|e| match e {
                linux_loader::loader::Error::Bzimage(
                    linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
                ) => too_large(file.metadata().map(|m| m.len()).unwrap_or(0)),
                other => not_bz(&other.to_string()),
            })?;
            loaded.kernel_load.0 + 0x200
        }
    };

    // Command line.
    if cmdline.contains('\0') {
        return Err(Error::CmdlineNul);
    }
    let cmdline_max = u64::from(hdr.cmdline_size).min(layout::CMDLINE_MAX - 1);
    if cmdline.len() as u64 > cmdline_max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: cmdline_max,
        });
    }
    mem.write(layout::CMDLINE_ADDR, cmdline.as_bytes())?;
    mem.write(layout::CMDLINE_ADDR + cmdline.len() as u64, &[0])?;

    // Initrd: as high as possible in low memory, below the kernel's limit, above the kernel.
    let mut ramdisk = (0u64, 0u64);
    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(read_err(path))?;
        let size = data.len() as u64;
        let limit = low_end.min(u64::from(hdr.initrd_addr_max) + 1);
        let available = limit.saturating_sub(kernel_end);
        let too_large = || Error::InitrdTooLarge {
            path: path.to_path_buf(),
            size: size.div_ceil(1 << 20),
            available: available >> 20,
        };
        let start = limit.checked_sub(size).ok_or_else(too_large)? & !(guestmem::PAGE_SIZE - 1);
        if start < kernel_end {
            return Err(too_large());
        }
        mem.write(start, &data)?;
        ramdisk = (start, size);
    }

    // Zero page: the kernel's own setup header, then what the loader fills in.
    let mut zp = vec![0u8; 4096];
    let hdr_end = (0x202 + usize::from(head[HDR_JUMP_LEN])).min(n).min(0x290);
    zp[HDR_START..hdr_end].copy_from_slice(&head[HDR_START..hdr_end]);
    put(&mut zp, VID_MODE, &0xffffu16.to_le_bytes());
    zp[TYPE_OF_LOADER] = 0xff;
    put(&mut zp, RAMDISK_IMAGE, &(ramdisk.0 as u32).to_le_bytes());
    put(&mut zp, RAMDISK_SIZE, &(ramdisk.1 as u32).to_le_bytes());
    put(
        &mut zp,
        CMD_LINE_PTR,
        &(layout::CMDLINE_ADDR as u32).to_le_bytes(),
    );
    put(&mut zp, ACPI_RSDP_ADDR, &rsdp.to_le_bytes());
    let e820 = layout::e820_map(mem_size);
    zp[E820_ENTRIES] = e820.len().min(E820_MAX) as u8;
    for (i, (addr, len, kind)) in e820.iter().take(E820_MAX).enumerate() {
        let at = E820_TABLE + i * 20;
        put(&mut zp, at, &addr.to_le_bytes());
        put(&mut zp, at + 8, &len.to_le_bytes());
        put(&mut zp, at + 16, &kind.to_le_bytes());
    }
    mem.write(layout::ZERO_PAGE, &zp)?;

    write_boot_structures(mem)?;
    Ok(BootEntry {
        rip,
        zero_page: layout::ZERO_PAGE,
    })
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Writes the identity page tables and the GDT that [`crate::cpu::set_boot_state`] points at.
pub fn write_boot_structures(mem: &GuestMemory) -> Result<()> {
    write_page_tables(mem)?;
    write_gdt(mem)
}

/// Identity-maps the first 4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemory) -> Result<()> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(layout::PML4_ADDR, &(layout::PDPT_ADDR | PRESENT_RW))?;
    for pd in 0..4u64 {
        let pd_addr = layout::PD_ADDR + pd * 0x1000;
        mem.write_obj(layout::PDPT_ADDR + pd * 8, &(pd_addr | PRESENT_RW))?;
        let mut entries = [0u8; 4096];
        for (i, e) in entries.chunks_exact_mut(8).enumerate() {
            let addr = ((pd << 9) + i as u64) << 21;
            e.copy_from_slice(&(addr | PRESENT_RW | HUGE).to_le_bytes());
        }
        mem.write(pd_addr, &entries)?;
    }
    Ok(())
}

/// GDT entries: null, null, code (selector 0x10, __BOOT_CS), data (0x18, __BOOT_DS), TSS (0x20).
pub const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
pub const CODE_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn write_gdt(mem: &GuestMemory) -> Result<()> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(layout::GDT_ADDR + i as u64 * 8, e)?;
    }
    mem.write_obj(layout::IDT_ADDR, &0u64)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        // 64-bit code: present, DPL 0, type 0xb, L=1, G=1, limit 0xfffff.
        assert_eq!(GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[3], 0x00cf_9300_0000_ffff);
    }

    fn fake_kernel(dir: &Path, version: u16, xloadflags: u16, payload: usize) -> PathBuf {
        let setup_sects = 4u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512 + payload];
        img[0x1f1] = setup_sects;
        img[0x201] = 0x6a;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = 1; // LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&0x40_0000u32.to_le_bytes());
        let path = dir.join(format!("k-{version:x}-{xloadflags}-{payload}"));
        std::fs::write(&path, img).unwrap();
        path
    }

    fn tmpdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-boot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn loads_a_kernel_and_fills_the_zero_page() {
        let dir = tmpdir("ok");
        let kernel = fake_kernel(&dir, 0x20f, 1, 4096);
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![0x5a; 10_000]).unwrap();
        let size = 64 << 20;
        let mem = GuestMemory::new(&layout::ram_ranges(size)).unwrap();
        let entry =
            load_linux(&mem, size, &kernel, Some(&initrd), "console=ttyS0", 0xe0000).unwrap();
        assert_eq!(entry.rip, 0x10_0200);
        let zp_u32 = |off: u64| mem.read_obj::<u32>(layout::ZERO_PAGE + off).unwrap();
        let (start, len) = (zp_u32(0x218) as u64, zp_u32(0x21c) as u64);
        assert_eq!(len, 10_000);
        assert_eq!(start % 4096, 0);
        assert!(start + len <= size);
        assert_eq!(mem.read_obj::<u8>(start + 9_999).unwrap(), 0x5a);
        assert_eq!(zp_u32(0x228) as u64, layout::CMDLINE_ADDR);
        let mut cmd = [0u8; 14];
        mem.read(layout::CMDLINE_ADDR, &mut cmd).unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
        assert_eq!(mem.read_obj::<u8>(layout::ZERO_PAGE + 0x1e8).unwrap(), 3);
        assert_eq!(
            mem.read_obj::<u64>(layout::ZERO_PAGE + 0x70).unwrap(),
            0xe0000
        );
    }

    /// A minimal vmlinux: one PT_LOAD segment of `code` at 16 MiB, entered at its start.
    fn tiny_vmlinux(code: &[u8], memsz: u64) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        elf[ph + 16..ph + 24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        elf[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // p_paddr
        elf[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        elf[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        elf.extend_from_slice(code);
        elf
    }

    /// A bzImage whose payload is `vmlinux` packed the way the kernel build packs LZ4.
    fn lz4_kernel(dir: &Path, name: &str, vmlinux: &[u8], init_size: u32) -> PathBuf {
        let mut payload = 0x184c_2102u32.to_le_bytes().to_vec();
        for chunk in vmlinux.chunks(payload::LZ4_BLOCK) {
            let block = lz4_flex::block::compress(chunk);
            payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
            payload.extend_from_slice(&block);
        }
        payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
        let path = fake_kernel(dir, 0x20f, 1, 0x100 + payload.len());
        let mut img = std::fs::read(&path).unwrap();
        img[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes()); // payload_offset
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        let at = 5 * 512 + 0x100;
        img[at..at + payload.len()].copy_from_slice(&payload);
        let out = dir.join(name);
        std::fs::write(&out, img).unwrap();
        out
    }

    #[test]
    fn lz4_kernels_are_unpacked_on_the_host_and_entered_at_the_vmlinux() {
        let dir = tmpdir("lz4");
        // 17 MiB of code: three LZ4 blocks, unpacked in parallel.
        let code: Vec<u8> = (0..17u32 << 20).map(|i| (i % 251) as u8).collect();
        let kernel = lz4_kernel(&dir, "lz4", &tiny_vmlinux(&code, 0x120_0000), 0x80_0000);
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![0x5a; 10_000]).unwrap();
        let size = 64 << 20;
        let mem = GuestMemory::new(&layout::ram_ranges(size)).unwrap();
        let entry = load_linux(&mem, size, &kernel, Some(&initrd), "quiet", 0xe0000).unwrap();
        assert_eq!(entry.rip, 0x100_0000);
        let mut loaded = vec![0u8; code.len()];
        mem.read(0x100_0000, &mut loaded).unwrap();
        assert_eq!(loaded, code);
        // The zero page is the same as for a bzImage the guest unpacks.
        let zp_u32 = |off: u64| mem.read_obj::<u32>(layout::ZERO_PAGE + off).unwrap();
        assert_eq!(&zp_u32(0x202).to_le_bytes(), b"HdrS");
        assert_eq!(zp_u32(0x228) as u64, layout::CMDLINE_ADDR);
        let initrd_start = zp_u32(0x218) as u64;
        assert!(
            initrd_start >= 0x180_0000,
            "initrd overlaps the kernel's init_size"
        );

        // The same kernel in too little memory for its init_size.
        let small = 16 << 20;
        let mem = GuestMemory::new(&layout::ram_ranges(small)).unwrap();
        let e = load_linux(&mem, small, &kernel, None, "", 0).unwrap_err();
        assert!(matches!(e, Error::KernelTooLarge { .. }), "{e}");

        // A damaged payload names the file offset; a payload that is no ELF file is refused.
        let mut img = std::fs::read(&kernel).unwrap();
        let at = 5 * 512 + 0x100 + 8;
        for b in &mut img[at..at + 64] {
            *b = 0xff;
        }
        let broken = dir.join("broken");
        std::fs::write(&broken, &img).unwrap();
        let e = load_linux(&mem, size, &broken, None, "", 0).unwrap_err();
        assert!(
            matches!(e, Error::CorruptPayload { .. }) && e.to_string().contains("file offset"),
            "{e}"
        );
        let not_elf = lz4_kernel(&dir, "not-elf", &[0x90; 4096], 0x80_0000);
        let e = load_linux(&mem, size, &not_elf, None, "", 0).unwrap_err();
        assert!(e.to_string().contains("ELF"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn plain_vmlinux_files_boot_with_a_made_up_setup_header() {
        let dir = tmpdir("elf");
        let code = vec![0xf4u8; 300];
        let path = dir.join("vmlinux");
        std::fs::write(&path, tiny_vmlinux(&code, 0x20_0000)).unwrap();
        let initrd = dir.join("initrd");
        std::fs::write(&initrd, vec![0x5a; 4096]).unwrap();
        let size = 64 << 20;
        preflight(&path, Some(&initrd), size).unwrap();
        let mem = GuestMemory::new(&layout::ram_ranges(size)).unwrap();
        let entry = load_linux(&mem, size, &path, Some(&initrd), "console=ttyS0", 0).unwrap();
        assert_eq!(entry.rip, 0x100_0000);
        assert_eq!(mem.read_obj::<u8>(0x100_0000 + 299).unwrap(), 0xf4);
        let zp_u32 = |off: u64| mem.read_obj::<u32>(layout::ZERO_PAGE + off).unwrap();
        assert_eq!(&zp_u32(0x202).to_le_bytes(), b"HdrS");
        assert_eq!(zp_u32(0x1fe) & 0xffff, 0xaa55);
        assert_eq!(zp_u32(0x21c), 4096);
        assert!(
            u64::from(zp_u32(0x218)) >= 0x120_0000,
            "initrd overlaps the kernel"
        );

        // A 32-bit or non-x86 ELF file is refused before anything is loaded.
        let mut other = tiny_vmlinux(&code, 0x1000);
        other[18] = 183; // EM_AARCH64
        let arm = dir.join("arm");
        std::fs::write(&arm, other).unwrap();
        let e = preflight(&arm, None, size).unwrap_err();
        assert!(e.to_string().contains("not a 64-bit x86"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rejects_bad_kernels_and_oversized_input() {
        let dir = tmpdir("bad");
        let size = 64 << 20;
        let mem = GuestMemory::new(&layout::ram_ranges(size)).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, b"not a kernel at all").unwrap();
        let e = load_linux(&mem, size, &junk, None, "", 0).unwrap_err();
        assert!(matches!(e, Error::NotBzImage { .. }), "{e}");
        let missing = load_linux(&mem, size, &dir.join("nope"), None, "", 0).unwrap_err();
        assert!(matches!(missing, Error::Read { .. }), "{missing}");
        let old = fake_kernel(&dir, 0x20a, 0, 4096);
        let e = load_linux(&mem, size, &old, None, "", 0).unwrap_err();
        assert!(matches!(e, Error::No64BitEntry { .. }), "{e}");
        let kernel = fake_kernel(&dir, 0x20f, 1, 4096);
        let big = dir.join("big-initrd");
        std::fs::write(&big, vec![0u8; 70 << 20]).unwrap();
        let e = load_linux(&mem, size, &kernel, Some(&big), "", 0).unwrap_err();
        assert!(matches!(e, Error::InitrdTooLarge { .. }), "{e}");
        let e = load_linux(&mem, size, &kernel, None, &"x".repeat(3000), 0).unwrap_err();
        assert!(matches!(e, Error::CmdlineTooLong { max: 2047, .. }), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
