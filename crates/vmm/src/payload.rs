//! The compressed kernel inside a bzImage.
//!
//! A bzImage carries its vmlinux (an ELF file) compressed, followed by the 4-byte little-endian
//! size of the uncompressed data, and a small program that unpacks it inside the guest. Under
//! nested virtualization or emulation that program is slow, so when the payload is LZ4 (as in
//! Debian's cloud kernel) the VMM unpacks it on the host and enters the vmlinux directly.

/// How a bzImage payload is compressed, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Lz4,
    Gzip,
    Xz,
    Zstd,
    Other,
}

impl Compression {
    pub fn detect(head: &[u8]) -> Self {
        match head {
            [0x02, 0x21, 0x4c, 0x18, ..] => Self::Lz4,
            [0x1f, 0x8b, ..] => Self::Gzip,
            [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Self::Xz,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Self::Zstd,
            _ => Self::Other,
        }
    }
}

/// A malformed payload: what is wrong and where, as an offset into the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("compressed kernel at payload offset {offset:#x}: {why}")]
pub struct PayloadError {
    pub offset: usize,
    pub why: String,
}

fn fail<T>(offset: usize, why: impl Into<String>) -> Result<T, PayloadError> {
    Err(PayloadError {
        offset,
        why: why.into(),
    })
}

/// The LZ4 legacy frame magic (stored little-endian).
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Each block of a legacy frame unpacks to at most this many bytes.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Unpacks an LZ4 legacy-frame payload (with the kernel's trailing size word) whose output may
/// be at most `max_output` bytes, and checks that the result is a 64-bit ELF file.
pub fn unpack_lz4(payload: &[u8], max_output: usize) -> Result<Vec<u8>, PayloadError> {
    let word = |at: usize| -> Option<u32> {
        let b = payload.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    };
    if payload.len() < 12 {
        return fail(0, format!("only {} bytes long", payload.len()));
    }
    let end = payload.len() - 4;
    let size = word(end).expect("length checked") as usize;
    if size > max_output {
        return fail(
            end,
            format!("declares {size} bytes unpacked, more than the {max_output} that fit in guest memory"),
        );
    }
    let mut out = vec![0u8; size];
    let mut filled = 0;
    let mut at = 0;
    while at < end {
        let n = match word(at) {
            Some(n) if at + 4 <= end => n,
            _ => return fail(at, "block header cut short"),
        };
        if n == LZ4_LEGACY_MAGIC {
            // A frame starts (the first one, or another concatenated one).
            at += 4;
            continue;
        }
        let n = n as usize;
        let body = at + 4;
        if n > end - body {
            return fail(at, format!("block of {n} bytes runs past the end"));
        }
        let room = (size - filled).min(LZ4_LEGACY_BLOCK);
        let written = lz4_flex::block::decompress_into(
            &payload[body..body + n],
            &mut out[filled..filled + room],
        )
        .or_else(|e| fail(at, format!("LZ4 block does not decode: {e}")))?;
        filled += written;
        at = body + n;
    }
    if filled != size {
        return fail(
            end,
            format!("unpacks to {filled} bytes, but the size word says {size}"),
        );
    }
    if out.get(..5) != Some(b"\x7fELF\x02") {
        return fail(0, "does not unpack to a 64-bit ELF vmlinux");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload as the kernel's build makes it: legacy frame, blocks, size word.
    fn pack(data: &[u8]) -> Vec<u8> {
        let mut p = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let block = lz4_flex::block::compress(chunk);
            p.extend_from_slice(&(block.len() as u32).to_le_bytes());
            p.extend_from_slice(&block);
        }
        p.extend_from_slice(&(data.len() as u32).to_le_bytes());
        p
    }

    fn elf_like(len: usize) -> Vec<u8> {
        let mut d: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        d[..5].copy_from_slice(b"\x7fELF\x02");
        d
    }

    #[test]
    fn detects_the_kernel_compressions() {
        assert_eq!(Compression::detect(&pack(b"x")), Compression::Lz4);
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::detect(b"\xfd7zXZ\x00\x00"), Compression::Xz);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"\x5d\x00\x00"), Compression::Other);
        assert_eq!(Compression::detect(b""), Compression::Other);
    }

    #[test]
    fn unpacks_multi_block_payloads() {
        let data = elf_like(LZ4_LEGACY_BLOCK * 2 + 12345);
        assert_eq!(unpack_lz4(&pack(&data), 64 << 20).unwrap(), data);
        // A second concatenated frame is accepted too.
        let mut two = pack(&data[..LZ4_LEGACY_BLOCK]);
        two.truncate(two.len() - 4);
        let rest = pack(&data[LZ4_LEGACY_BLOCK..]);
        two.extend_from_slice(&rest[..rest.len() - 4]);
        two.extend_from_slice(&(data.len() as u32).to_le_bytes());
        assert_eq!(unpack_lz4(&two, 64 << 20).unwrap(), data);
    }

    #[test]
    fn rejects_malformed_payloads_with_their_offset() {
        let data = elf_like(100_000);
        let good = pack(&data);
        // Too large for the guest.
        let e = unpack_lz4(&good, 1000).unwrap_err();
        assert_eq!(e.offset, good.len() - 4);
        // A size word that disagrees with the data.
        let mut wrong = good.clone();
        let n = wrong.len();
        wrong[n - 4..].copy_from_slice(&99_999u32.to_le_bytes());
        assert!(unpack_lz4(&wrong, 1 << 20).is_err());
        wrong[n - 4..].copy_from_slice(&100_001u32.to_le_bytes());
        assert!(unpack_lz4(&wrong, 1 << 20)
            .unwrap_err()
            .why
            .contains("size word"));
        // A block length past the end.
        let mut long = good.clone();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(unpack_lz4(&long, 1 << 20).unwrap_err().offset, 4);
        // Garbage inside a block.
        let mut garbage = good.clone();
        for b in &mut garbage[8..40] {
            *b = 0xff;
        }
        assert!(unpack_lz4(&garbage, 1 << 20).is_err());
        // Not an ELF file.
        let plain = pack(&vec![0u8; 4096]);
        assert!(unpack_lz4(&plain, 1 << 20).unwrap_err().why.contains("ELF"));
        // Truncated anywhere: an error, never a panic.
        for cut in 0..good.len().min(200) {
            let _ = unpack_lz4(&good[..cut], 1 << 20);
        }
        assert!(unpack_lz4(&[], 1 << 20).is_err());
    }
}
