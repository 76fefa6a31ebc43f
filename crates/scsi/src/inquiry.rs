//! INQUIRY data: the standard page and the vital product data pages (SPC-4 6.6, 7.8; SBC-3 6.6).

use crate::sense::Sense;

pub const VENDOR: &[u8; 8] = b"Msft    ";
pub const REVISION: &[u8; 4] = b"1.0 ";
/// Microsoft's IEEE OUI (00-22-48), as in the NAA designators of Hyper-V and Azure disks.
pub const MICROSOFT_OUI: u32 = 0x00_22_48;

pub const TYPE_DISK: u8 = 0x00;
pub const TYPE_CDROM: u8 = 0x05;
/// Peripheral qualifier 3, device type 1Fh: no logical unit here.
pub const NO_LUN: u8 = 0x7F;

/// Who a logical unit says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub peripheral: u8,
    pub removable: bool,
    pub product: [u8; 16],
    /// The stable identifier from which the serial number and designators derive.
    pub id: [u8; 16],
}

/// Pads or cuts `s` to a space-filled 16-byte product identification.
pub fn product(s: &str) -> [u8; 16] {
    let mut p = [b' '; 16];
    for (d, c) in p.iter_mut().zip(s.bytes()) {
        *d = if c.is_ascii_graphic() || c == b' ' {
            c
        } else {
            b'_'
        };
    }
    p
}

/// Standard INQUIRY data, 36 bytes.
pub fn standard(identity: &Identity) -> [u8; 36] {
    let mut b = [0u8; 36];
    b[0] = identity.peripheral;
    b[1] = if identity.removable { 0x80 } else { 0 };
    b[2] = 0x05; // SPC-3, as Hyper-V reports
    b[3] = 0x02; // response data format 2
    b[4] = 36 - 5; // additional length
    b[7] = 0x02; // CMDQUE
    b[8..16].copy_from_slice(VENDOR);
    b[16..32].copy_from_slice(&identity.product);
    b[32..36].copy_from_slice(REVISION);
    b
}

/// The unit serial number: the identifier in upper-case hex, 32 characters.
pub fn serial(id: &[u8; 16]) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = [0u8; 32];
    for (i, b) in id.iter().enumerate() {
        s[2 * i] = HEX[usize::from(b >> 4)];
        s[2 * i + 1] = HEX[usize::from(b & 0xF)];
    }
    s
}

/// An NAA IEEE Registered Extended (type 6) name: Microsoft's OUI and 100 bits folded from
/// all 128 bits of the identifier, so distinct identifiers rarely collide.
pub fn naa(id: &[u8; 16]) -> [u8; 16] {
    let mut n = [0u8; 16];
    n[0] = 0x60 | ((MICROSOFT_OUI >> 20) & 0xF) as u8;
    n[1] = (MICROSOFT_OUI >> 12) as u8;
    n[2] = (MICROSOFT_OUI >> 4) as u8;
    n[3] = (((MICROSOFT_OUI & 0xF) as u8) << 4) | ((id[0] >> 4) ^ (id[0] & 0xF));
    for i in 0..12 {
        n[4 + i] = id[1 + i] ^ if i < 3 { id[13 + i] } else { 0 };
    }
    n
}

/// Block limits reported in VPD page B0h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimits {
    pub max_transfer_blocks: u32,
    pub optimal_granularity: u16,
    /// Zero when UNMAP is not supported.
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    pub unmap_granularity: u32,
    pub max_write_same_blocks: u64,
}

/// Parameters of the VPD pages a target serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VpdParams<'a> {
    pub identity: &'a Identity,
    /// Block limits, characteristics and provisioning pages (direct-access devices only).
    pub limits: Option<BlockLimits>,
    pub lbpu: bool,
    pub lbprz: bool,
}

fn page(peripheral: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + body.len());
    v.push(peripheral);
    v.push(code);
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// One VPD page, or INVALID FIELD IN CDB for a page this target does not have.
pub fn vpd(code: u8, p: &VpdParams) -> Result<Vec<u8>, Sense> {
    let pt = p.identity.peripheral;
    let id = &p.identity.id;
    let mut pages = vec![0x00, 0x80, 0x83];
    if p.limits.is_some() {
        pages.extend_from_slice(&[0xB0, 0xB1, 0xB2]);
    }
    if !pages.contains(&code) {
        return Err(Sense::invalid_cdb_field(2, None));
    }
    Ok(match code {
        0x00 => page(pt, code, &pages),
        0x80 => page(pt, code, &serial(id)),
        0x83 => {
            let mut body = Vec::new();
            // NAA, binary, associated with the logical unit.
            body.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
            body.extend_from_slice(&naa(id));
            // T10 vendor ID, ASCII: vendor then serial.
            body.extend_from_slice(&[0x02, 0x01, 0x00, 8 + 32]);
            body.extend_from_slice(VENDOR);
            body.extend_from_slice(&serial(id));
            page(pt, code, &body)
        }
        0xB0 => {
            let l = p.limits.unwrap_or(BlockLimits {
                max_transfer_blocks: 0,
                optimal_granularity: 0,
                max_unmap_blocks: 0,
                max_unmap_descriptors: 0,
                unmap_granularity: 0,
                max_write_same_blocks: 0,
            });
            let mut b = [0u8; 0x3C];
            b[0] = 0x01; // WSNZ: WRITE SAME with zero blocks is refused
            b[2..4].copy_from_slice(&l.optimal_granularity.to_be_bytes());
            b[4..8].copy_from_slice(&l.max_transfer_blocks.to_be_bytes());
            b[16..20].copy_from_slice(&l.max_unmap_blocks.to_be_bytes());
            b[20..24].copy_from_slice(&l.max_unmap_descriptors.to_be_bytes());
            if l.max_unmap_blocks != 0 {
                b[24..28].copy_from_slice(&l.unmap_granularity.to_be_bytes());
                b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, 0
            }
            b[32..40].copy_from_slice(&l.max_write_same_blocks.to_be_bytes());
            page(pt, code, &b)
        }
        0xB1 => {
            let mut b = [0u8; 0x3C];
            b[1] = 0x01; // medium rotation rate: non-rotating
            page(pt, code, &b)
        }
        _ => {
            // 0xB2: logical block provisioning.
            let mut b = [0u8; 4];
            if p.lbpu {
                b[1] = 0x80 | 0x40 | if p.lbprz { 0x04 } else { 0 }; // LBPU, LBPWS, LBPRZ
                b[2] = 0x02; // thin provisioned
            }
            page(pt, code, &b)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident() -> Identity {
        Identity {
            peripheral: TYPE_DISK,
            removable: false,
            product: product("Virtual Disk"),
            id: [
                0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0xDE, 0xF0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xAB,
                0xCD, 0xEF,
            ],
        }
    }

    #[test]
    fn standard_data_bytes() {
        let b = standard(&Identity {
            peripheral: TYPE_CDROM,
            removable: true,
            product: product("Virtual DVD-ROM"),
            id: [0; 16],
        });
        assert_eq!(&b[..8], &[0x05, 0x80, 0x05, 0x02, 31, 0, 0, 0x02]);
        assert_eq!(&b[8..36], b"Msft    Virtual DVD-ROM 1.0 ");
    }

    #[test]
    fn serial_and_device_id_derive_from_id() {
        let id = ident();
        let p = VpdParams {
            identity: &id,
            limits: None,
            lbpu: false,
            lbprz: false,
        };
        let s = vpd(0x80, &p).unwrap();
        assert_eq!(&s[..4], &[0, 0x80, 0, 32]);
        assert_eq!(&s[4..], b"123456789ABCDEF00123456789ABCDEF");
        let d = vpd(0x83, &p).unwrap();
        assert_eq!(&d[..4], &[0, 0x83, 0, 20 + 44]);
        assert_eq!(&d[4..8], &[0x01, 0x03, 0x00, 16]);
        assert_eq!(&d[8..12], &[0x60, 0x02, 0x24, 0x83]);
        assert_eq!(d[12], 0x34 ^ 0xAB);
        assert_eq!(&d[24..28], &[0x02, 0x01, 0x00, 40]);
        assert_eq!(&d[28..36], b"Msft    ");
        // Same id, same answer; another id, another designator.
        let mut other = id;
        other.id[15] ^= 1;
        let p2 = VpdParams {
            identity: &other,
            ..p
        };
        assert_eq!(vpd(0x83, &p).unwrap(), d);
        assert_ne!(vpd(0x83, &p2).unwrap()[8..24], d[8..24]);
        // A DVD has no block pages.
        assert_eq!(vpd(0xB0, &p).unwrap_err().asc, 0x24);
        assert_eq!(vpd(0x00, &p).unwrap(), [0, 0, 0, 3, 0x00, 0x80, 0x83]);
    }
}
