//! On-disk structures of the legacy VHD format (Virtual Hard Disk Image Format Specification
//! 1.0): the footer, the dynamic disk header, parent locators and CHS geometry. All big-endian.

use uuid::Uuid;

pub const SECTOR: u64 = 512;
pub const FOOTER_SIZE: usize = 512;
pub const DYN_HEADER_SIZE: usize = 1024;
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// The largest virtual size the VHD format allows (2040 GiB).
pub const MAX_SIZE: u64 = 2040 << 30;
/// Seconds from 1970-01-01 to 2000-01-01, the VHD epoch.
pub const VHD_EPOCH: u64 = 946_684_800;

pub const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");

/// The disk types the footer names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// One's complement of the byte sum, with the checksum field (4 bytes at `field`) skipped.
pub fn checksum(bytes: &[u8], field: usize) -> u32 {
    let mut sum: u32 = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if i < field || i >= field + 4 {
            sum = sum.wrapping_add(b as u32);
        }
    }
    !sum
}

/// CHS geometry from the VHD specification's algorithm (Appendix: CHS calculation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

impl Geometry {
    pub fn for_size(size: u64) -> Geometry {
        let mut total = size / SECTOR;
        if total > 65535 * 16 * 255 {
            total = 65535 * 16 * 255;
        }
        let (spt, heads, cth);
        if total >= 65535 * 16 * 63 {
            spt = 255;
            heads = 16;
            cth = total / spt;
        } else {
            let mut s = 17u64;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                c = total / s;
            }
            if c >= h * 1024 {
                s = 63;
                h = 16;
                c = total / s;
            }
            spt = s;
            heads = h;
            cth = c;
        }
        Geometry {
            cylinders: (cth / heads) as u16,
            heads: heads as u8,
            sectors: spt as u8,
        }
    }

    /// Bytes addressed by this geometry.
    pub fn size(self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors as u64 * SECTOR
    }
}

/// The 512-byte footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub version: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: DiskType,
    pub unique_id: Uuid,
    pub saved_state: u8,
}

/// Why a footer or header failed to parse.
pub type ParseError = String;

impl Footer {
    pub fn parse(b: &[u8; FOOTER_SIZE]) -> Result<Footer, ParseError> {
        if &b[0..8] != FOOTER_COOKIE {
            return Err("bad cookie (expected \"conectix\")".into());
        }
        let stored = be32(b, 64);
        let computed = checksum(b, 64);
        if stored != computed {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let version = be32(b, 12);
        if version >> 16 != 1 {
            return Err(format!("unsupported version {version:#x}"));
        }
        let code = be32(b, 60);
        let disk_type =
            DiskType::from_code(code).ok_or_else(|| format!("unsupported disk type {code}"))?;
        Ok(Footer {
            features: be32(b, 8),
            version,
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: b[28..32].try_into().unwrap(),
            creator_version: be32(b, 32),
            creator_os: be32(b, 36),
            original_size: be64(b, 40),
            current_size: be64(b, 48),
            geometry: Geometry {
                cylinders: be16(b, 56),
                heads: b[58],
                sectors: b[59],
            },
            disk_type,
            unique_id: Uuid::from_bytes(b[68..84].try_into().unwrap()),
            saved_state: b[84],
        })
    }

    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&self.version.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_os.to_be_bytes());
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors;
        b[60..64].copy_from_slice(&self.disk_type.code().to_be_bytes());
        b[68..84].copy_from_slice(self.unique_id.as_bytes());
        b[84] = self.saved_state;
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

/// One of the eight parent locator entries of a dynamic header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Locator {
    pub platform: u32,
    pub data_space: u32,
    pub data_length: u32,
    pub data_offset: u64,
}

/// The 1024-byte dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub header_version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: Uuid,
    pub parent_timestamp: u32,
    /// ParentUnicodeName, decoded from UTF-16 big-endian.
    pub parent_name: String,
    pub locators: [Locator; 8],
}

impl DynHeader {
    pub fn parse(b: &[u8; DYN_HEADER_SIZE]) -> Result<DynHeader, ParseError> {
        if &b[0..8] != DYN_COOKIE {
            return Err("bad cookie (expected \"cxsparse\")".into());
        }
        let stored = be32(b, 36);
        let computed = checksum(b, 36);
        if stored != computed {
            return Err(format!(
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ));
        }
        let header_version = be32(b, 24);
        if header_version >> 16 != 1 {
            return Err(format!("unsupported header version {header_version:#x}"));
        }
        let units: Vec<u16> = (0..256)
            .map(|i| be16(b, 64 + 2 * i))
            .take_while(|&u| u != 0)
            .collect();
        let parent_name = String::from_utf16_lossy(&units);
        let mut locators = [Locator::default(); 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let o = 576 + 24 * i;
            *l = Locator {
                platform: be32(b, o),
                data_space: be32(b, o + 4),
                data_length: be32(b, o + 8),
                data_offset: be64(b, o + 16),
            };
        }
        Ok(DynHeader {
            table_offset: be64(b, 16),
            header_version,
            max_table_entries: be32(b, 28),
            block_size: be32(b, 32),
            parent_unique_id: Uuid::from_bytes(b[40..56].try_into().unwrap()),
            parent_timestamp: be32(b, 56),
            parent_name,
            locators,
        })
    }

    pub fn to_bytes(&self) -> [u8; DYN_HEADER_SIZE] {
        let mut b = [0u8; DYN_HEADER_SIZE];
        b[0..8].copy_from_slice(DYN_COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.header_version.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(self.parent_unique_id.as_bytes());
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, u) in self.parent_name.encode_utf16().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        for (i, l) in self.locators.iter().enumerate() {
            let o = 576 + 24 * i;
            b[o..o + 4].copy_from_slice(&l.platform.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&l.data_space.to_be_bytes());
            b[o + 8..o + 12].copy_from_slice(&l.data_length.to_be_bytes());
            b[o + 16..o + 24].copy_from_slice(&l.data_offset.to_be_bytes());
        }
        let sum = checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }
}

/// Bytes of the sector bitmap that precedes each block's data, padded to a sector.
pub fn bitmap_size(block_size: u32) -> u64 {
    (block_size as u64 / SECTOR)
        .div_ceil(8)
        .next_multiple_of(SECTOR)
}

/// Seconds since 2000-01-01 UTC, as the VHD timestamp fields count them.
pub fn now_timestamp() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(VHD_EPOCH) as u32)
        .unwrap_or(0)
}

/// UTF-16LE encoding of a locator path.
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Decodes a UTF-16LE locator path (trailing NULs dropped).
pub fn from_utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
        .trim_end_matches('\0')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_qemu() {
        // The spec's algorithm rounds down: 100 MiB -> 1003/12/17. (qemu-img instead searches
        // upward for a geometry covering the size and gets 1004/12/17.)
        let g = Geometry::for_size(100 << 20);
        assert_eq!((g.cylinders, g.heads, g.sectors), (1003, 12, 17));
        assert!(g.size() <= 100 << 20);
        assert_eq!(Geometry::for_size(104_865_792).cylinders, 1004);
        // Above 127 GiB the geometry saturates at 65535/16/255.
        let g = Geometry::for_size(200 << 30);
        assert_eq!((g.cylinders, g.heads, g.sectors), (65535, 16, 255));
        // Small disks use at least 4 heads.
        let g = Geometry::for_size(1 << 20);
        assert_eq!((g.heads, g.sectors), (4, 17));
    }

    #[test]
    fn footer_roundtrip_and_checksum() {
        let f = Footer {
            features: 2,
            version: 0x10000,
            data_offset: 512,
            timestamp: 12345,
            creator_app: *b"win ",
            creator_version: 0xa0000,
            creator_os: 0x5769326b,
            original_size: 1 << 30,
            current_size: 1 << 30,
            geometry: Geometry::for_size(1 << 30),
            disk_type: DiskType::Dynamic,
            unique_id: Uuid::from_u128(0x1234),
            saved_state: 0,
        };
        let mut b = f.to_bytes();
        assert_eq!(Footer::parse(&b).unwrap(), f);
        b[100] ^= 1;
        assert!(Footer::parse(&b).unwrap_err().contains("checksum"));
    }

    #[test]
    fn dyn_header_roundtrip() {
        let mut h = DynHeader {
            table_offset: 1536,
            header_version: 0x10000,
            max_table_entries: 512,
            block_size: 2 << 20,
            parent_unique_id: Uuid::from_u128(7),
            parent_timestamp: 9,
            parent_name: "parent.vhd".into(),
            locators: [Locator::default(); 8],
        };
        h.locators[0] = Locator {
            platform: PLATFORM_W2RU,
            data_space: 1,
            data_length: 20,
            data_offset: 4096,
        };
        let b = h.to_bytes();
        assert_eq!(DynHeader::parse(&b).unwrap(), h);
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512 << 10), 512);
        assert_eq!(bitmap_size(256 << 20), 65536);
    }
}
