//! On-disk VHDX structures (MS-VHDX 2.2-2.6): constants, parsing and serialization.
//!
//! Parsers take fixed-size byte slices that the caller has already read, check signatures and
//! checksums, and return a description of what is wrong as a `String`; the caller wraps it into
//! [`crate::Error::Corrupt`] with the file path and offset.

use uuid::Uuid;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const FILE_ID_OFFSET: u64 = 0;
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const HEADER_SIZE: usize = 4096;
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
pub const SECTOR_BITMAP_BLOCK_SIZE: u64 = MIB;
pub const LOG_SECTOR: usize = 4096;
pub const MAX_REGION_ENTRIES: u32 = 2047;
pub const MAX_METADATA_ENTRIES: u16 = 2047;
pub const MAX_METADATA_ITEM: u32 = 1 << 20;

pub const BAT_REGION: Uuid = Uuid::from_u128(0x2DC27766_F623_4200_9D64_115E9BFD4A08);
pub const METADATA_REGION: Uuid = Uuid::from_u128(0x8B7CA206_4790_4B9A_B8FE_575F050F886E);

pub const ITEM_FILE_PARAMETERS: Uuid = Uuid::from_u128(0xCAA16737_FA36_4D43_B3B6_33F0AA44E76B);
pub const ITEM_VIRTUAL_DISK_SIZE: Uuid = Uuid::from_u128(0x2FA54224_CD1B_4876_B211_5DBED83BF4B8);
pub const ITEM_PAGE83: Uuid = Uuid::from_u128(0xBECA12AB_B2E6_4523_93EF_C309E000C746);
pub const ITEM_LOGICAL_SECTOR: Uuid = Uuid::from_u128(0x8141BF1D_A96F_4709_BA47_F233A8FAAB5F);
pub const ITEM_PHYSICAL_SECTOR: Uuid = Uuid::from_u128(0xCDA348C7_445D_4471_9CC9_E9885251C556);
pub const ITEM_PARENT_LOCATOR: Uuid = Uuid::from_u128(0xA8D35F2D_B30B_454D_ABF7_D3D84834AB0C);
pub const PARENT_LOCATOR_TYPE: Uuid = Uuid::from_u128(0xB04AEFB7_D19E_4A81_B789_25B8E9445913);

pub const META_FLAG_IS_USER: u32 = 1;
pub const META_FLAG_IS_VIRTUAL_DISK: u32 = 2;
pub const META_FLAG_IS_REQUIRED: u32 = 4;

/// BAT payload block states.
pub const PAYLOAD_NOT_PRESENT: u64 = 0;
pub const PAYLOAD_UNDEFINED: u64 = 1;
pub const PAYLOAD_ZERO: u64 = 2;
pub const PAYLOAD_UNMAPPED: u64 = 3;
pub const PAYLOAD_UNMAPPED_OLD: u64 = 5;
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
/// BAT sector-bitmap block states.
pub const SB_NOT_PRESENT: u64 = 0;
pub const SB_PRESENT: u64 = 6;

pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// CRC-32C of `data` with the 4 bytes at `field` treated as zero.
pub fn crc_with_zero_field(data: &[u8], field: usize) -> u32 {
    let c = crc32c::crc32c(&data[..field]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &data[field + 4..])
}

pub fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
pub fn guid(b: &[u8], o: usize) -> Uuid {
    Uuid::from_bytes_le(b[o..o + 16].try_into().unwrap())
}
pub fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn put_guid(b: &mut [u8], o: usize, g: &Uuid) {
    b[o..o + 16].copy_from_slice(&g.to_bytes_le());
}

pub fn bat_state(entry: u64) -> u64 {
    entry & 7
}
pub fn bat_offset(entry: u64) -> u64 {
    (entry >> 20) << 20
}
pub fn bat_entry(state: u64, file_offset: u64) -> u64 {
    debug_assert!(file_offset.is_multiple_of(MIB));
    (file_offset & !(MIB - 1)) | state
}

/// The VHDX header (MS-VHDX 2.2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_SIZE {
            return Err("short header".into());
        }
        let b = &b[..HEADER_SIZE];
        if &b[0..4] != b"head" {
            return Err("bad signature (expected \"head\")".into());
        }
        let stored = le32(b, 4);
        let computed = crc_with_zero_field(b, 4);
        if stored != computed {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let h = Header {
            sequence_number: le64(b, 8),
            file_write_guid: guid(b, 16),
            data_write_guid: guid(b, 32),
            log_guid: guid(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        };
        if h.version != 1 {
            return Err(format!("unsupported version {}", h.version));
        }
        if h.log_version != 0 {
            return Err(format!("unsupported log version {}", h.log_version));
        }
        if h.log_length == 0 || !u64::from(h.log_length).is_multiple_of(MIB) {
            return Err(format!(
                "log length {:#x} is not a non-zero multiple of 1 MiB",
                h.log_length
            ));
        }
        if h.log_offset < MIB || !h.log_offset.is_multiple_of(MIB) {
            return Err(format!(
                "log offset {:#x} is not a 1 MiB multiple >= 1 MiB",
                h.log_offset
            ));
        }
        if h.log_offset.checked_add(u64::from(h.log_length)).is_none() {
            return Err("log region overflows".into());
        }
        Ok(h)
    }

    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(b"head");
        put64(&mut b, 8, self.sequence_number);
        put_guid(&mut b, 16, &self.file_write_guid);
        put_guid(&mut b, 32, &self.data_write_guid);
        put_guid(&mut b, 48, &self.log_guid);
        put16(&mut b, 64, self.log_version);
        put16(&mut b, 66, self.version);
        put32(&mut b, 68, self.log_length);
        put64(&mut b, 72, self.log_offset);
        let c = crc32c(&b);
        put32(&mut b, 4, c);
        b
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Uuid,
    pub file_offset: u64,
    pub length: u32,
    pub required: bool,
}

/// Parses a region table; returns its entries (signature, checksum and counts checked).
pub fn parse_region_table(b: &[u8]) -> Result<Vec<RegionEntry>, String> {
    if b.len() < REGION_TABLE_SIZE {
        return Err("short region table".into());
    }
    let b = &b[..REGION_TABLE_SIZE];
    if &b[0..4] != b"regi" {
        return Err("bad signature (expected \"regi\")".into());
    }
    let stored = le32(b, 4);
    let computed = crc_with_zero_field(b, 4);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let count = le32(b, 8);
    if count > MAX_REGION_ENTRIES {
        return Err(format!("entry count {count} exceeds {MAX_REGION_ENTRIES}"));
    }
    let mut v = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let o = 16 + i * 32;
        v.push(RegionEntry {
            guid: guid(b, o),
            file_offset: le64(b, o + 16),
            length: le32(b, o + 24),
            required: le32(b, o + 28) & 1 != 0,
        });
    }
    Ok(v)
}

pub fn serialize_region_table(entries: &[RegionEntry]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b[0..4].copy_from_slice(b"regi");
    put32(&mut b, 8, entries.len() as u32);
    for (i, e) in entries.iter().enumerate() {
        let o = 16 + i * 32;
        put_guid(&mut b, o, &e.guid);
        put64(&mut b, o + 16, e.file_offset);
        put32(&mut b, o + 24, e.length);
        put32(&mut b, o + 28, u32::from(e.required));
    }
    let c = crc32c(&b);
    put32(&mut b, 4, c);
    b
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    pub item_id: Uuid,
    pub offset: u32,
    pub length: u32,
    pub flags: u32,
}

pub fn parse_metadata_table(b: &[u8]) -> Result<Vec<MetadataEntry>, String> {
    if b.len() < METADATA_TABLE_SIZE {
        return Err("short metadata table".into());
    }
    if &b[0..8] != b"metadata" {
        return Err("bad signature (expected \"metadata\")".into());
    }
    let count = le16(b, 10);
    if count > MAX_METADATA_ENTRIES {
        return Err(format!(
            "entry count {count} exceeds {MAX_METADATA_ENTRIES}"
        ));
    }
    let mut v = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let o = 32 + i * 32;
        v.push(MetadataEntry {
            item_id: guid(b, o),
            offset: le32(b, o + 16),
            length: le32(b, o + 20),
            flags: le32(b, o + 24),
        });
    }
    Ok(v)
}

pub fn serialize_metadata_table(entries: &[MetadataEntry]) -> Vec<u8> {
    let mut b = vec![0u8; METADATA_TABLE_SIZE];
    b[0..8].copy_from_slice(b"metadata");
    put16(&mut b, 10, entries.len() as u16);
    for (i, e) in entries.iter().enumerate() {
        let o = 32 + i * 32;
        put_guid(&mut b, o, &e.item_id);
        put32(&mut b, o + 16, e.offset);
        put32(&mut b, o + 20, e.length);
        put32(&mut b, o + 24, e.flags);
    }
    b
}

/// Key/value pairs of a parent locator item (MS-VHDX 2.6.2.6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentLocator {
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn parse(b: &[u8]) -> Result<ParentLocator, String> {
        if b.len() < 20 {
            return Err("parent locator shorter than its header".into());
        }
        let ty = guid(b, 0);
        if ty != PARENT_LOCATOR_TYPE {
            return Err(format!("unknown parent locator type {ty}"));
        }
        let count = le16(b, 18) as usize;
        if 20 + count * 12 > b.len() {
            return Err(format!(
                "key/value count {count} does not fit the item ({} bytes)",
                b.len()
            ));
        }
        let mut entries = Vec::with_capacity(count);
        let s = |off: u32, len: u16| -> Result<String, String> {
            let (off, len) = (off as usize, len as usize);
            if len % 2 != 0 || off.checked_add(len).is_none_or(|e| e > b.len()) {
                return Err(format!("string at {off:#x}+{len:#x} outside the item"));
            }
            let units: Vec<u16> = b[off..off + len]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).map_err(|_| "string is not valid UTF-16".to_string())
        };
        for i in 0..count {
            let o = 20 + i * 12;
            let key = s(le32(b, o), le16(b, o + 8))?;
            let value = s(le32(b, o + 4), le16(b, o + 10))?;
            if key.is_empty() {
                return Err("empty key".into());
            }
            if entries.iter().any(|(k, _): &(String, String)| *k == key) {
                return Err(format!("duplicate key {key:?}"));
            }
            entries.push((key, value));
        }
        Ok(ParentLocator { entries })
    }

    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; 20 + 12 * self.entries.len()];
        put_guid(&mut b, 0, &PARENT_LOCATOR_TYPE);
        put16(&mut b, 18, self.entries.len() as u16);
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let mut enc = |s: &str| -> (u32, u16) {
                let off = b.len() as u32;
                for u in s.encode_utf16() {
                    b.extend_from_slice(&u.to_le_bytes());
                }
                (off, (b.len() as u32 - off) as u16)
            };
            let (ko, kl) = enc(k);
            let (vo, vl) = enc(v);
            let o = 20 + i * 12;
            put32(&mut b, o, ko);
            put32(&mut b, o + 4, vo);
            put16(&mut b, o + 8, kl);
            put16(&mut b, o + 10, vl);
        }
        b
    }
}

/// Formats a GUID the way parent locators store it: `{lowercase-hyphenated}`.
pub fn guid_braced(g: &Uuid) -> String {
    format!("{{{}}}", g.as_hyphenated())
}

/// Parses `{xxxxxxxx-...}` (braces optional, any case).
pub fn parse_braced_guid(s: &str) -> Option<Uuid> {
    let t = s.trim();
    let t = t.strip_prefix('{').unwrap_or(t);
    let t = t.strip_suffix('}').unwrap_or(t);
    Uuid::parse_str(t).ok()
}

/// The number of payload blocks and BAT entries for a geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub has_parent: bool,
}

impl Geometry {
    pub fn chunk_ratio(&self) -> u64 {
        ((1u64 << 23) * u64::from(self.logical_sector_size)) / u64::from(self.block_size)
    }
    pub fn data_blocks(&self, virtual_size: u64) -> u64 {
        virtual_size.div_ceil(u64::from(self.block_size))
    }
    pub fn bat_entries(&self, virtual_size: u64) -> u64 {
        let db = self.data_blocks(virtual_size);
        let cr = self.chunk_ratio();
        if self.has_parent {
            db.div_ceil(cr) * (cr + 1)
        } else if db == 0 {
            0
        } else {
            db + (db - 1) / cr
        }
    }
    /// BAT index of payload block `i`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio()
    }
    /// BAT index of the sector-bitmap block of chunk `c`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio() + 1) + self.chunk_ratio()
    }
    pub fn sectors_per_block(&self) -> u64 {
        u64::from(self.block_size / self.logical_sector_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ratio_and_entries() {
        let g = Geometry {
            block_size: 16 << 20,
            logical_sector_size: 512,
            has_parent: false,
        };
        assert_eq!(g.chunk_ratio(), 256);
        assert_eq!(g.bat_entries(10 << 30), 642);
        let g1 = Geometry {
            block_size: 1 << 20,
            ..g
        };
        assert_eq!(g1.chunk_ratio(), 4096);
        let g32 = Geometry {
            block_size: 32 << 20,
            ..g
        };
        assert_eq!(g32.chunk_ratio(), 128);
        let d = Geometry {
            has_parent: true,
            ..g32
        };
        assert_eq!(d.bat_entries(1 << 30), 129);
        assert_eq!(d.payload_index(128), 129);
        assert_eq!(d.bitmap_index(0), 128);
    }

    #[test]
    fn header_roundtrip_and_crc() {
        let h = Header {
            sequence_number: 7,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let mut b = h.serialize();
        assert_eq!(Header::parse(&b).unwrap(), h);
        b[100] ^= 1;
        assert!(Header::parse(&b).unwrap_err().contains("checksum"));
    }

    #[test]
    fn locator_roundtrip() {
        let l = ParentLocator {
            entries: vec![
                ("parent_linkage".into(), "{abc}".into()),
                ("relative_path".into(), ".\\p.vhdx".into()),
            ],
        };
        let b = l.serialize();
        assert_eq!(ParentLocator::parse(&b).unwrap(), l);
        assert!(ParentLocator::parse(&b[..30]).is_err());
    }

    #[test]
    fn guid_le_layout() {
        // The BAT region GUID as stored on disk (mixed endian).
        let b = BAT_REGION.to_bytes_le();
        assert_eq!(&b[..4], &[0x66, 0x77, 0xC2, 0x2D]);
        assert_eq!(
            guid_braced(&BAT_REGION),
            "{2dc27766-f623-4200-9d64-115e9bfd4a08}"
        );
    }
}
