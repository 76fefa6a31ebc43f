//! The saved-state file (Save-VM): one file holding a whole VM.
//!
//! ```text
//! offset 0   magic "VIRIDSAV" (8 bytes), format version (u32 LE), header length 16 (u32 LE)
//! then three sections, each: tag (4 bytes), CRC-32C of the payload (u32), length (u64), payload
//!   "CONF"  the configuration the VM was started with (JSON, the caller's own layout)
//!   "MACH"  everything but RAM: vCPUs, in-kernel irqchip/PIT/clock, chipset, hv1, VMBus (JSON)
//!   "RAM "  guest RAM, region by region in address order, in chunks of up to 512 pages: a
//!           bitmap of the chunk's non-zero pages (one bit per page), then those pages
//! ```
//!
//! The file is input from outside: every length is checked against the file and against a
//! limit before anything is allocated, every payload against its checksum, and each error names
//! the file and the offset where it was found.

use guestmem::GuestMemory;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The first eight bytes of every saved-state file.
pub const MAGIC: [u8; 8] = *b"VIRIDSAV";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
const HEADER_LEN: u32 = 16;
const SECTION_HEADER_LEN: u64 = 16;
const PAGE: usize = guestmem::PAGE_SIZE as usize;
/// Pages per RAM chunk (one 64-byte bitmap each).
const CHUNK_PAGES: usize = 512;
/// Largest configuration section accepted.
const MAX_CONFIG: u64 = 1 << 20;
/// Largest machine section accepted.
const MAX_MACHINE: u64 = 64 << 20;

const TAG_CONFIG: [u8; 4] = *b"CONF";
const TAG_MACHINE: [u8; 4] = *b"MACH";
const TAG_RAM: [u8; 4] = *b"RAM ";

/// Everything of a VM but its RAM and its configuration.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    /// One per vCPU, in index order.
    pub vcpus: Vec<kvm::state::VcpuState>,
    pub partition: kvm::state::VmState,
    pub chipset: chipset::SavedChipset,
    /// The Hyper-V enlightenments (None for a VM without them).
    pub hv: Option<hv1::SavedState>,
    pub vmbus: Option<vmbus::host::SavedBus>,
    /// vCPU 0's TSC when saved: the reference time continues from it.
    pub guest_tsc: u64,
}

/// A saved-state file that cannot be read or used.
#[derive(Debug, thiserror::Error)]
#[error("{}: offset {offset}: {what}", path.display())]
pub struct FileError {
    pub path: PathBuf,
    pub offset: u64,
    pub what: String,
}

/// What writing a saved state did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteReport {
    /// Bytes in the file.
    pub file_bytes: u64,
    /// Guest RAM, and how much of it was not zero (written out).
    pub ram_bytes: u64,
    pub nonzero_bytes: u64,
}

/// Progress of a long step: (bytes done, bytes in all).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Writes a saved state to `path` (through `PATH.tmp`, renamed into place once complete and
/// on disk, so a failed save leaves no half file under the name).
pub fn write(
    path: &Path,
    config: &[u8],
    machine: &MachineState,
    memory: &GuestMemory,
    progress: Progress<'_>,
) -> std::io::Result<WriteReport> {
    let tmp = tmp_path(path);
    let result = write_to(&tmp, config, machine, memory, progress).and_then(|report| {
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(report)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    name.into()
}

fn write_to(
    path: &Path,
    config: &[u8],
    machine: &MachineState,
    memory: &GuestMemory,
    progress: Progress<'_>,
) -> std::io::Result<WriteReport> {
    let file = File::create(path)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())?;
    w.write_all(&HEADER_LEN.to_le_bytes())?;
    write_section(&mut w, TAG_CONFIG, config)?;
    let json = serde_json::to_vec(machine).map_err(std::io::Error::other)?;
    write_section(&mut w, TAG_MACHINE, &json)?;

    // RAM: a placeholder section header, the chunks, then the real length and checksum.
    let ram_header = w.stream_position()?;
    w.write_all(&[0; SECTION_HEADER_LEN as usize])?;
    let total: u64 = memory.regions().iter().map(|r| r.len).sum();
    let mut crc = 0u32;
    let mut len = 0u64;
    let mut done = 0u64;
    let mut nonzero = 0u64;
    let mut buf = vec![0u8; CHUNK_PAGES * PAGE];
    let mut emit = |w: &mut BufWriter<File>, bytes: &[u8]| -> std::io::Result<()> {
        crc = crc32c::crc32c_append(crc, bytes);
        len += bytes.len() as u64;
        w.write_all(bytes)
    };
    for region in memory.regions() {
        let mut gpa = region.gpa;
        let end = region.gpa + region.len;
        while gpa < end {
            let n = ((end - gpa) as usize).min(buf.len());
            let chunk = &mut buf[..n];
            memory
                .read(gpa, chunk)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let pages = n / PAGE;
            let mut bitmap = [0u8; CHUNK_PAGES / 8];
            for (i, page) in chunk.chunks_exact(PAGE).enumerate() {
                if page.iter().fold(0u8, |a, &b| a | b) != 0 {
                    bitmap[i / 8] |= 1 << (i % 8);
                }
            }
            emit(&mut w, &bitmap[..pages.div_ceil(8)])?;
            for (i, page) in chunk.chunks_exact(PAGE).enumerate() {
                if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                    emit(&mut w, page)?;
                    nonzero += PAGE as u64;
                }
            }
            gpa += n as u64;
            done += n as u64;
            progress(done, total);
        }
    }
    let mut file = w.into_inner().map_err(|e| e.into_error())?;
    let file_bytes = file.stream_position()?;
    file.seek(SeekFrom::Start(ram_header))?;
    file.write_all(&section_header(TAG_RAM, crc, len))?;
    file.sync_all()?;
    Ok(WriteReport {
        file_bytes,
        ram_bytes: total,
        nonzero_bytes: nonzero,
    })
}

fn section_header(tag: [u8; 4], crc: u32, len: u64) -> [u8; SECTION_HEADER_LEN as usize] {
    let mut h = [0u8; SECTION_HEADER_LEN as usize];
    h[..4].copy_from_slice(&tag);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    h[8..].copy_from_slice(&len.to_le_bytes());
    h
}

fn write_section(w: &mut impl Write, tag: [u8; 4], payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&section_header(
        tag,
        crc32c::crc32c(payload),
        payload.len() as u64,
    ))?;
    w.write_all(payload)
}

/// A saved-state file being read, section by section, in the order they were written.
pub struct SavedFile {
    path: PathBuf,
    reader: BufReader<File>,
    offset: u64,
    size: u64,
}

fn tag_name(tag: [u8; 4]) -> String {
    String::from_utf8_lossy(&tag).trim_end().to_string()
}

impl SavedFile {
    /// Opens the file and checks its header.
    pub fn open(path: &Path) -> Result<Self, FileError> {
        let fail = |what: String| FileError {
            path: path.to_path_buf(),
            offset: 0,
            what,
        };
        let file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
        let size = file
            .metadata()
            .map_err(|e| fail(format!("cannot read its size: {e}")))?
            .len();
        let mut f = Self {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 20, file),
            offset: 0,
            size,
        };
        let mut header = [0u8; HEADER_LEN as usize];
        f.read_exact(&mut header, "the file header")?;
        if header[..8] != MAGIC {
            return Err(f.error_at(0, "not a Viridian saved-state file (wrong magic)".into()));
        }
        let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if version != VERSION {
            return Err(f.error_at(
                8,
                format!("saved-state format version {version} is not supported (this viridian reads version {VERSION})"),
            ));
        }
        let header_len = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        if header_len != HEADER_LEN {
            return Err(f.error_at(
                12,
                format!("header length {header_len}, expected {HEADER_LEN}"),
            ));
        }
        Ok(f)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error_at(&self, offset: u64, what: String) -> FileError {
        FileError {
            path: self.path.clone(),
            offset,
            what,
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), FileError> {
        self.reader.read_exact(buf).map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the file ends".to_string()
            } else {
                e.to_string()
            };
            self.error_at(self.offset, format!("cannot read {what}: {why}"))
        })?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Reads a section header: checks the tag and the length; returns (crc, length).
    fn section(&mut self, tag: [u8; 4], max: u64) -> Result<(u32, u64), FileError> {
        let at = self.offset;
        let mut h = [0u8; SECTION_HEADER_LEN as usize];
        self.read_exact(&mut h, &format!("the {} section header", tag_name(tag)))?;
        if h[..4] != tag {
            return Err(self.error_at(
                at,
                format!(
                    "expected the {} section, found {:?}",
                    tag_name(tag),
                    String::from_utf8_lossy(&h[..4])
                ),
            ));
        }
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let len = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let left = self.size.saturating_sub(self.offset);
        if len > left {
            return Err(self.error_at(
                at + 8,
                format!(
                    "the {} section's length {len} runs past the end of the file ({left} bytes left)",
                    tag_name(tag)
                ),
            ));
        }
        if len > max {
            return Err(self.error_at(
                at + 8,
                format!(
                    "the {} section's length {len} is more than the {max} allowed",
                    tag_name(tag)
                ),
            ));
        }
        Ok((crc, len))
    }

    fn small_section(&mut self, tag: [u8; 4], max: u64) -> Result<(u64, Vec<u8>), FileError> {
        let (crc, len) = self.section(tag, max)?;
        let start = self.offset;
        let mut payload = vec![0u8; len as usize];
        self.read_exact(&mut payload, &format!("the {} section", tag_name(tag)))?;
        if crc32c::crc32c(&payload) != crc {
            return Err(self.error_at(
                start,
                format!(
                    "the {} section is corrupt (checksum mismatch)",
                    tag_name(tag)
                ),
            ));
        }
        Ok((start, payload))
    }

    /// The configuration section (first after the header).
    pub fn config(&mut self) -> Result<Vec<u8>, FileError> {
        self.small_section(TAG_CONFIG, MAX_CONFIG).map(|(_, p)| p)
    }

    /// The machine section (after the configuration).
    pub fn machine(&mut self) -> Result<MachineState, FileError> {
        let (start, payload) = self.small_section(TAG_MACHINE, MAX_MACHINE)?;
        serde_json::from_slice(&payload)
            .map_err(|e| self.error_at(start, format!("the machine state is invalid: {e}")))
    }

    /// Reads guest RAM into `memory`, which must be fresh (all zero): zero pages are skipped.
    /// The section must hold exactly `memory`'s regions.
    pub fn read_ram(
        &mut self,
        memory: &GuestMemory,
        progress: Progress<'_>,
    ) -> Result<(), FileError> {
        let (crc, len) = self.section(TAG_RAM, u64::MAX)?;
        let start = self.offset;
        let end = start + len;
        let total: u64 = memory.regions().iter().map(|r| r.len).sum();
        let mut sum = 0u32;
        let mut done = 0u64;
        let mut page = vec![0u8; PAGE];
        for region in memory.regions() {
            let mut gpa = region.gpa;
            let region_end = region.gpa + region.len;
            while gpa < region_end {
                let pages = (((region_end - gpa) as usize) / PAGE).min(CHUNK_PAGES);
                let mut bitmap = [0u8; CHUNK_PAGES / 8];
                let bitmap = &mut bitmap[..pages.div_ceil(8)];
                self.ram_bytes(bitmap, end)?;
                sum = crc32c::crc32c_append(sum, bitmap);
                for i in 0..pages {
                    if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                        self.ram_bytes(&mut page, end)?;
                        sum = crc32c::crc32c_append(sum, &page);
                        let at = gpa + (i * PAGE) as u64;
                        memory.write(at, &page).map_err(|e| {
                            self.error_at(self.offset, format!("guest RAM at {at:#x}: {e}"))
                        })?;
                    }
                }
                gpa += (pages * PAGE) as u64;
                done += (pages * PAGE) as u64;
                progress(done, total);
            }
        }
        if self.offset != end {
            return Err(self.error_at(
                start - 8,
                format!(
                    "the RAM section is {len} bytes but holds {} for {} MiB of RAM",
                    self.offset - start,
                    total >> 20
                ),
            ));
        }
        if sum != crc {
            return Err(self.error_at(
                start,
                "the RAM section is corrupt (checksum mismatch)".into(),
            ));
        }
        Ok(())
    }

    fn ram_bytes(&mut self, buf: &mut [u8], end: u64) -> Result<(), FileError> {
        if self.offset + buf.len() as u64 > end {
            return Err(self.error_at(
                self.offset,
                "the RAM section ends before the VM's RAM does (is the memory size the saved one?)"
                    .into(),
            ));
        }
        self.read_exact(buf, "guest RAM")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineState {
        let chipset = chipset::Chipset::new(
            chipset::serial::Serial::new(Box::new(std::io::sink())).unwrap(),
            chipset::cmos::Cmos::new(4 << 20, 0),
        );
        MachineState {
            vcpus: vec![kvm::state::VcpuState {
                mp_state: Default::default(),
                regs: kvm::kvm_bindings::kvm_regs {
                    rip: 0x1234,
                    ..Default::default()
                },
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debug_regs: Default::default(),
                lapic: Default::default(),
                msrs: vec![(0x10, 99)],
                events: Default::default(),
                tsc_khz: 1000,
            }],
            partition: kvm::state::VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            chipset: chipset.save(),
            hv: None,
            vmbus: None,
            guest_tsc: 99,
        }
    }

    fn memory() -> GuestMemory {
        GuestMemory::new(&[(0, 3 << 20), (1 << 32, 1 << 20)]).unwrap()
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("viridian-saved-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A file of a VM with a few non-zero pages; returns its bytes.
    fn sample(name: &str) -> (PathBuf, Vec<u8>) {
        let mem = memory();
        mem.write(0x1000, b"page one").unwrap();
        mem.write(0x2f_f000 + 4095, &[7]).unwrap();
        mem.write((1 << 32) + 0x5000, b"high").unwrap();
        let path = dir().join(name);
        let mut calls = 0;
        let report = write(&path, b"{\"cpus\":1}", &machine(), &mem, &mut |d, t| {
            assert!(d <= t);
            calls += 1;
        })
        .unwrap();
        assert_eq!(report.ram_bytes, 4 << 20);
        assert_eq!(report.nonzero_bytes, 3 * 4096, "zero pages are skipped");
        assert!(calls >= 2, "progress is reported per chunk");
        assert!(!tmp_path(&path).exists());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(report.file_bytes, bytes.len() as u64);
        (path, bytes)
    }

    fn load(path: &Path) -> Result<(Vec<u8>, MachineState, GuestMemory), FileError> {
        let mut f = SavedFile::open(path)?;
        let config = f.config()?;
        let machine = f.machine()?;
        let mem = memory();
        f.read_ram(&mem, &mut |_, _| {})?;
        Ok((config, machine, mem))
    }

    #[test]
    fn round_trip() {
        let (path, _) = sample("round-trip");
        let (config, machine, mem) = load(&path).unwrap();
        assert_eq!(config, b"{\"cpus\":1}");
        assert_eq!(machine.vcpus[0].regs.rip, 0x1234);
        assert_eq!(machine.vcpus[0].msrs, vec![(0x10, 99)]);
        assert_eq!(machine.guest_tsc, 99);
        let mut b = [0u8; 8];
        mem.read(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"page one");
        mem.read(0x2f_f000 + 4095, &mut b[..1]).unwrap();
        assert_eq!(b[0], 7);
        mem.read((1 << 32) + 0x5000, &mut b[..4]).unwrap();
        assert_eq!(&b[..4], b"high");
    }

    fn expect_error(path: &Path, bytes: &[u8], wanted: &str) -> String {
        std::fs::write(path, bytes).unwrap();
        let e = load(path)
            .err()
            .expect("a broken file is refused")
            .to_string();
        assert!(
            e.starts_with(&format!("{}: offset ", path.display())),
            "{e}"
        );
        assert!(e.contains(wanted), "{e} (wanted {wanted:?})");
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    #[test]
    fn hostile_files_are_refused_with_file_and_offset() {
        let (_, good) = sample("hostile-source");
        let path = dir().join("hostile");
        let mut bad = good.clone();
        bad[0] = b'X';
        expect_error(&path, &bad, "wrong magic");
        let mut bad = good.clone();
        bad[8] = 2;
        let e = expect_error(&path, &bad, "version 2 is not supported");
        assert!(e.contains("offset 8"), "{e}");
        // Truncated anywhere: a clear error, never a panic.
        for len in (0..good.len())
            .step_by(997)
            .chain([15, 16, 31, 32, good.len() - 1])
        {
            expect_error(&path, &good[..len], "");
        }
        // Bit flips in each section's length, and in the payloads.
        let config_len = 16 + 8;
        let machine_header = 16 + 16 + 10;
        let machine_len = machine_header + 8;
        let machine_end = machine_header
            + 16
            + u64::from_le_bytes(good[machine_len..machine_len + 8].try_into().unwrap()) as usize;
        let ram_len = machine_end + 8;
        for (at, bit) in [
            (config_len, 0),
            (config_len, 3),
            (config_len + 7, 7),
            (machine_len, 1),
            (machine_len + 2, 4),
            (ram_len, 0),
            (ram_len + 1, 2),
            (ram_len + 7, 6),
        ] {
            let mut bad = good.clone();
            bad[at] ^= 1 << bit;
            expect_error(&path, &bad, "");
        }
        for at in [
            config_len + 9,
            machine_header + 20,
            machine_end + 20,
            good.len() - 1,
        ] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            expect_error(&path, &bad, "");
        }
        let mut bad = good.clone();
        bad[machine_header + 16] ^= 0x40;
        expect_error(&path, &bad, "checksum mismatch");
        let mut bad = good.clone();
        bad[16..20].copy_from_slice(b"MACH");
        expect_error(&path, &bad, "expected the CONF section");
        // A length past the end of the file, and a huge one.
        let mut bad = good.clone();
        bad[config_len..config_len + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        expect_error(&path, &bad, "runs past the end of the file");
    }

    #[test]
    fn ram_of_another_size_is_refused() {
        let (path, _) = sample("other-size");
        let mut f = SavedFile::open(&path).unwrap();
        f.config().unwrap();
        f.machine().unwrap();
        let bigger = GuestMemory::new(&[(0, 8 << 20)]).unwrap();
        let e = f.read_ram(&bigger, &mut |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("memory size"), "{e}");
        let mut f = SavedFile::open(&path).unwrap();
        f.config().unwrap();
        f.machine().unwrap();
        let smaller = GuestMemory::new(&[(0, 1 << 20)]).unwrap();
        let e = f
            .read_ram(&smaller, &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds"), "{e}");
    }
}
