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
/// Every block of a legacy frame but the last unpacks to exactly this many bytes.
pub const LZ4_BLOCK: usize = 8 << 20;

/// An LZ4 legacy frame, as the kernel build packs a vmlinux: the magic, blocks of `[u32 length]
/// [LZ4 block]`, then the 4-byte size of the unpacked data. Blocks are independent, so they can
/// be unpacked in any order and in parallel; block `i` unpacks to offset `i * LZ4_BLOCK`.
pub struct Lz4Frame<'a> {
    payload: &'a [u8],
    /// Where each block's compressed bytes are, with the offset of its length word.
    blocks: Vec<(usize, std::ops::Range<usize>)>,
    size: usize,
}

impl<'a> Lz4Frame<'a> {
    /// Walks the block headers of `payload`, whose unpacked size may be at most `max_output`.
    pub fn parse(payload: &'a [u8], max_output: usize) -> Result<Self, PayloadError> {
        let word = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().unwrap());
        if payload.len() < 12 || word(0) != LZ4_LEGACY_MAGIC {
            return fail(0, "not an LZ4 legacy frame");
        }
        let end = payload.len() - 4;
        let size = word(end) as usize;
        if size > max_output {
            return fail(
                end,
                format!("declares {size} bytes unpacked, more than the {max_output} that fit in guest memory"),
            );
        }
        let mut blocks = Vec::new();
        let mut at = 4;
        while at < end {
            if end - at < 4 {
                return fail(at, "block header cut short");
            }
            let n = word(at) as usize;
            let body = at + 4;
            if n > end - body {
                return fail(at, format!("block of {n} bytes runs past the end"));
            }
            blocks.push((at, body..body + n));
            at = body + n;
        }
        if size.div_ceil(LZ4_BLOCK) != blocks.len() {
            return fail(
                end,
                format!(
                    "{} blocks cannot unpack to the {size} bytes the size word says",
                    blocks.len()
                ),
            );
        }
        Ok(Self {
            payload,
            blocks,
            size,
        })
    }

    /// The unpacked size.
    pub fn size(&self) -> usize {
        self.size
    }

    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// How many bytes block `i` unpacks to.
    pub fn block_len(&self, i: usize) -> usize {
        (self.size - i * LZ4_BLOCK).min(LZ4_BLOCK)
    }

    /// Unpacks block `i` into `out` (at least [`Self::block_len`] bytes); returns its length.
    pub fn unpack_block(&self, i: usize, out: &mut [u8]) -> Result<usize, PayloadError> {
        let (header, ref input) = self.blocks[i];
        let want = self.block_len(i);
        let got = lz4_flex::block::decompress_into(&self.payload[input.clone()], &mut out[..want])
            .or_else(|e| fail(header, format!("LZ4 block {i} does not decode: {e}")))?;
        if got != want {
            return fail(
                header,
                format!("LZ4 block {i} unpacks to {got} bytes, not {want}"),
            );
        }
        Ok(got)
    }

    /// Unpacks the whole frame into one buffer.
    pub fn unpack(&self) -> Result<Vec<u8>, PayloadError> {
        let mut out = vec![0u8; self.size];
        for (i, chunk) in out.chunks_mut(LZ4_BLOCK).enumerate() {
            self.unpack_block(i, chunk)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload as the kernel's build makes it: legacy frame, blocks, size word.
    fn pack(data: &[u8]) -> Vec<u8> {
        let mut p = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(LZ4_BLOCK) {
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
        let data = elf_like(LZ4_BLOCK * 2 + 12345);
        let packed = pack(&data);
        let frame = Lz4Frame::parse(&packed, 64 << 20).unwrap();
        assert_eq!(frame.block_count(), 3);
        assert_eq!(frame.block_len(2), 12345);
        assert_eq!(frame.unpack().unwrap(), data);
        // Blocks unpack on their own, in any order.
        let mut last = vec![0u8; LZ4_BLOCK];
        assert_eq!(frame.unpack_block(2, &mut last).unwrap(), 12345);
        assert_eq!(&last[..12345], &data[2 * LZ4_BLOCK..]);
    }

    fn unpack_lz4(payload: &[u8], max: usize) -> Result<Vec<u8>, PayloadError> {
        Lz4Frame::parse(payload, max)?.unpack()
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
            .contains("unpacks to 100000 bytes"));
        wrong[n - 4..].copy_from_slice(&(9u32 << 20).to_le_bytes());
        assert!(unpack_lz4(&wrong, 10 << 20)
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
        // Truncated anywhere: an error, never a panic.
        for cut in 0..good.len().min(200) {
            let _ = unpack_lz4(&good[..cut], 1 << 20);
        }
        assert!(unpack_lz4(&[], 1 << 20).is_err());
    }
}
