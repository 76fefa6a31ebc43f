//! Loading an x86-64 ELF vmlinux: its PT_LOAD segments go to their physical addresses.
//!
//! The image can arrive in pieces (blocks of an LZ4 frame, unpacked in parallel), so loading is
//! split in two: [`Segments::parse`] reads the program headers from the start of the image, and
//! [`Segments::scatter`] copies any piece of the image to wherever the segments put it.

use guestmem::GuestMemory;

const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;
const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;

/// One PT_LOAD segment: `file` bytes at `offset` in the image go to `paddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Load {
    offset: u64,
    file: u64,
    paddr: u64,
}

/// Where a vmlinux's segments go, and where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segments {
    loads: Vec<Load>,
    /// The physical entry point (`phys_startup_64` in Linux).
    pub entry: u64,
    /// The end of the highest segment in memory, including its zero-filled part.
    pub end: u64,
}

/// Whether `head` starts like an ELF file.
pub fn is_elf(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF")
}

/// Checks that `head` starts a 64-bit little-endian x86 ELF file.
pub fn check_ident(head: &[u8]) -> Result<(), String> {
    if head.len() < EHDR_LEN || !is_elf(head) {
        return Err("not an ELF file".into());
    }
    if head[4] != 2 || head[5] != 1 || u16::from_le_bytes([head[18], head[19]]) != EM_X86_64 {
        return Err("not a 64-bit x86 ELF file (little-endian)".into());
    }
    Ok(())
}

impl Segments {
    /// Reads the ELF and program headers from `head` (the first bytes of an image of
    /// `image_len` bytes). Every segment must fit in guest RAM between `min_paddr` and
    /// `max_paddr`, and the entry point must be in one of them.
    pub fn parse(
        head: &[u8],
        image_len: u64,
        min_paddr: u64,
        max_paddr: u64,
    ) -> Result<Self, String> {
        let u16_at = |at: usize| u16::from_le_bytes([head[at], head[at + 1]]);
        let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap());
        check_ident(head)?;
        let entry = u64_at(24);
        let phoff = u64_at(32);
        let phentsize = usize::from(u16_at(54));
        let phnum = usize::from(u16_at(56));
        if phentsize != PHDR_LEN {
            return Err(format!(
                "program headers of {phentsize} bytes, not {PHDR_LEN}"
            ));
        }
        let table = usize::try_from(phoff)
            .ok()
            .and_then(|o| Some(o..o.checked_add(phnum * PHDR_LEN)?))
            .filter(|r| r.end <= head.len())
            .ok_or_else(|| {
                format!(
                    "program headers at {phoff:#x} are outside the image's first {} bytes",
                    head.len()
                )
            })?;
        let mut loads = Vec::new();
        let mut end = 0;
        for ph in head[table].chunks_exact(PHDR_LEN) {
            let at = |off: usize| u64::from_le_bytes(ph[off..off + 8].try_into().unwrap());
            if u32::from_le_bytes(ph[..4].try_into().unwrap()) != PT_LOAD {
                continue;
            }
            let (offset, paddr, file, mem) = (at(8), at(24), at(32), at(40));
            let mem_end = paddr.checked_add(mem);
            if file > mem || offset.checked_add(file).is_none_or(|e| e > image_len) {
                return Err(format!(
                    "segment at file offset {offset:#x} runs past the image"
                ));
            }
            if paddr < min_paddr || mem_end.is_none_or(|e| e > max_paddr) {
                return Err(format!(
                    "segment at {paddr:#x} ({mem:#x} bytes) is outside guest RAM {min_paddr:#x}..{max_paddr:#x}"
                ));
            }
            end = end.max(mem_end.unwrap_or(0));
            if file > 0 {
                loads.push(Load {
                    offset,
                    file,
                    paddr,
                });
            }
        }
        let entry_ok = loads
            .iter()
            .any(|l| (l.paddr..l.paddr + l.file).contains(&entry));
        if !entry_ok {
            return Err(format!("entry point {entry:#x} is in no loaded segment"));
        }
        Ok(Self { loads, entry, end })
    }

    /// Copies `data`, the image bytes at `offset`, to wherever the segments put them.
    pub fn scatter(&self, mem: &GuestMemory, offset: u64, data: &[u8]) -> guestmem::Result<()> {
        let data_end = offset + data.len() as u64;
        for l in &self.loads {
            let lo = offset.max(l.offset);
            let hi = data_end.min(l.offset + l.file);
            if lo < hi {
                let piece = &data[(lo - offset) as usize..(hi - offset) as usize];
                mem.write(l.paddr + (lo - l.offset), piece)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An image with one PT_LOAD per `(paddr, bytes, memsz)`, entered at the first segment.
    pub(crate) fn image(segments: &[(u64, &[u8], u64)]) -> Vec<u8> {
        let phnum = segments.len() + 1; // plus a PT_NOTE, which is skipped
        let mut elf = vec![0u8; EHDR_LEN + phnum * PHDR_LEN];
        elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        elf[16..18].copy_from_slice(&2u16.to_le_bytes());
        elf[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        elf[24..32].copy_from_slice(&segments[0].0.to_le_bytes());
        elf[32..40].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes());
        elf[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        elf[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        let note = EHDR_LEN + segments.len() * PHDR_LEN;
        elf[note..note + 4].copy_from_slice(&4u32.to_le_bytes());
        for (i, &(paddr, bytes, memsz)) in segments.iter().enumerate() {
            let offset = elf.len() as u64;
            let ph = EHDR_LEN + i * PHDR_LEN;
            elf[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            elf[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
            elf[ph + 16..ph + 24].copy_from_slice(&(paddr | 0xffff_ffff_8000_0000).to_le_bytes());
            elf[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
            elf[ph + 32..ph + 40].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            elf[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
            elf.extend_from_slice(bytes);
        }
        elf
    }

    #[test]
    fn pieces_land_at_their_segments_in_any_order() {
        let a: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let b = vec![0xabu8; 5000];
        let img = image(&[(0x100_0000, &a, 0x4000), (0x120_0000, &b, 0x10_0000)]);
        let seg = Segments::parse(&img[..300], img.len() as u64, 0x10_0000, 64 << 20).unwrap();
        assert_eq!(seg.entry, 0x100_0000);
        assert_eq!(seg.end, 0x130_0000);
        let mem = GuestMemory::new(&[(0, 64 << 20)]).unwrap();
        // Pieces of 777 bytes, last first.
        let pieces: Vec<(usize, &[u8])> = img.chunks(777).enumerate().collect();
        for &(i, p) in pieces.iter().rev() {
            seg.scatter(&mem, (i * 777) as u64, p).unwrap();
        }
        let mut got = vec![0u8; a.len()];
        mem.read(0x100_0000, &mut got).unwrap();
        assert_eq!(got, a);
        let mut got = vec![0u8; b.len() + 1];
        mem.read(0x120_0000, &mut got).unwrap();
        assert_eq!(&got[..b.len()], &b[..]);
        assert_eq!(got[b.len()], 0, "bytes past p_filesz stay zero");
        // The ELF headers themselves are not loaded anywhere.
        assert_eq!(mem.read_obj::<u32>(0).unwrap(), 0);
    }

    #[test]
    fn hostile_headers_are_refused() {
        let code = [0x90u8; 64];
        let good = image(&[(0x100_0000, &code, 0x1000)]);
        let parse = |img: &[u8]| Segments::parse(img, img.len() as u64, 0x10_0000, 32 << 20);
        assert!(parse(&good).is_ok());
        let patch = |at: usize, bytes: &[u8]| {
            let mut img = good.clone();
            img[at..at + bytes.len()].copy_from_slice(bytes);
            parse(&img).unwrap_err()
        };
        let ph = EHDR_LEN;
        assert!(patch(0, b"\x7fELG").contains("not an ELF"));
        assert!(patch(4, &[1]).contains("64-bit"));
        assert!(patch(18, &183u16.to_le_bytes()).contains("x86"));
        assert!(patch(54, &32u16.to_le_bytes()).contains("program headers"));
        assert!(patch(32, &u64::MAX.to_le_bytes()).contains("outside"));
        assert!(patch(56, &u16::MAX.to_le_bytes()).contains("outside"));
        // Segment bytes past the image, memory past RAM or below 1 MiB, filesz > memsz.
        assert!(patch(ph + 8, &u64::MAX.to_le_bytes()).contains("past the image"));
        assert!(patch(ph + 32, &(1u64 << 40).to_le_bytes()).contains("past the image"));
        assert!(
            patch(ph + 24, &((32u64 << 20) - 0x800).to_le_bytes()).contains("outside guest RAM")
        );
        assert!(patch(ph + 24, &0x1000u64.to_le_bytes()).contains("outside guest RAM"));
        assert!(patch(ph + 40, &u64::MAX.to_le_bytes()).contains("outside guest RAM"));
        assert!(patch(ph + 40, &1u64.to_le_bytes()).contains("past the image"));
        // An entry point outside every segment.
        assert!(patch(24, &0x200_0000u64.to_le_bytes()).contains("entry point"));
        // Truncated headers never panic.
        for cut in 0..good.len() {
            let _ = Segments::parse(&good[..cut], good.len() as u64, 0x10_0000, 32 << 20);
        }
    }
}
