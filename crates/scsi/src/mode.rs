//! MODE SENSE and MODE SELECT (SPC-4 6.11-6.14, 7.5) with the pages the targets have.
//!
//! No parameter is changeable: the changeable values are all zeros, and MODE SELECT accepts a
//! page only when it repeats the current values.

use crate::cdb::PageControl;
use crate::sense::Sense;

pub const PAGE_CACHING: u8 = 0x08;
pub const PAGE_CONTROL: u8 = 0x0A;
pub const PAGE_MM_CAPABILITIES: u8 = 0x2A;
pub const PAGE_ALL: u8 = 0x3F;

/// What a target puts in its mode parameter data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeParams<'a> {
    /// Supported pages, ascending.
    pub pages: &'a [u8],
    /// Device-specific parameter (WP 80h, DPOFUA 10h for disks).
    pub device_specific: u8,
    /// (blocks, block length) for a block descriptor; `None` for devices without one.
    pub block_descriptor: Option<(u64, u32)>,
    /// Current PREVENT state, reported in page 2Ah.
    pub prevented: bool,
}

fn page(code: u8, pc: PageControl, p: &ModeParams) -> Vec<u8> {
    let changeable = pc == PageControl::Changeable;
    let mut v = match code {
        PAGE_CACHING => {
            let mut v = vec![0u8; 20];
            v[2] = 0x04; // WCE
            v
        }
        PAGE_CONTROL => {
            let mut v = vec![0u8; 12];
            v[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
            v
        }
        _ => {
            // PAGE_MM_CAPABILITIES (MMC-3 6.3.11, the part Linux's sr reads).
            let mut v = vec![0u8; 22];
            v[2] = 0x08 | 0x02 | 0x01; // reads DVD-ROM, CD-RW, CD-R
            v[6] = 0x20 | 0x08 | 0x01 | if p.prevented { 0x02 } else { 0 }; // tray, eject, lock
            v[8..10].copy_from_slice(&4224u16.to_be_bytes()); // 24x CD (obsolete field)
            v[14..16].copy_from_slice(&4224u16.to_be_bytes());
            v
        }
    };
    if changeable {
        v.iter_mut().skip(2).for_each(|b| *b = 0);
    }
    v[0] = code;
    v[1] = (v.len() - 2) as u8;
    v
}

/// MODE SENSE parameter data (before allocation-length truncation).
pub fn sense(
    ten: bool,
    dbd: bool,
    llbaa: bool,
    pc: PageControl,
    code: u8,
    subpage: u8,
    p: &ModeParams,
) -> Result<Vec<u8>, Sense> {
    if pc == PageControl::Saved {
        return Err(Sense::saving_not_supported());
    }
    let mut body = Vec::new();
    if code == PAGE_ALL {
        if subpage != 0 && subpage != 0xFF {
            return Err(Sense::invalid_cdb_field(3, None));
        }
        for &c in p.pages {
            body.extend_from_slice(&page(c, pc, p));
        }
    } else if p.pages.contains(&code) {
        if subpage != 0 {
            return Err(Sense::invalid_cdb_field(3, None));
        }
        body = page(code, pc, p);
    } else {
        return Err(Sense::invalid_cdb_field(2, Some(5)));
    }
    let mut desc = Vec::new();
    let long = ten && llbaa;
    if let (false, Some((blocks, len))) = (dbd, p.block_descriptor) {
        if long {
            desc.extend_from_slice(&blocks.to_be_bytes());
            desc.extend_from_slice(&[0; 4]);
            desc.extend_from_slice(&len.to_be_bytes());
        } else {
            desc.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
            desc.push(0);
            desc.extend_from_slice(&len.to_be_bytes()[1..]);
        }
    }
    let mut out = Vec::with_capacity(8 + desc.len() + body.len());
    if ten {
        let total = 8 + desc.len() + body.len();
        out.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        out.push(0);
        out.push(p.device_specific);
        out.push(if long && !desc.is_empty() { 1 } else { 0 });
        out.push(0);
        out.extend_from_slice(&(desc.len() as u16).to_be_bytes());
    } else {
        let total = 4 + desc.len() + body.len();
        out.push((total - 1).min(255) as u8);
        out.push(0);
        out.push(p.device_specific);
        out.push(desc.len() as u8);
    }
    out.extend_from_slice(&desc);
    out.extend_from_slice(&body);
    Ok(out)
}

/// MODE SELECT: accepts a parameter list whose block descriptor keeps the block length and
/// whose pages repeat the current values; refuses anything that would change a setting.
pub fn select(ten: bool, pf: bool, sp: bool, list: &[u8], p: &ModeParams) -> Result<(), Sense> {
    if !pf {
        return Err(Sense::invalid_cdb_field(1, Some(4)));
    }
    if sp {
        return Err(Sense::invalid_cdb_field(1, Some(0)));
    }
    if list.is_empty() {
        return Ok(());
    }
    let header = if ten { 8 } else { 4 };
    if list.len() < header {
        return Err(Sense::parameter_list_length_error());
    }
    let bdl = if ten {
        usize::from(u16::from_be_bytes([list[6], list[7]]))
    } else {
        usize::from(list[3])
    };
    let long = ten && list[4] & 1 != 0;
    let dlen = if long { 16 } else { 8 };
    let pages_at = header
        .checked_add(bdl)
        .filter(|&e| e <= list.len())
        .ok_or_else(Sense::parameter_list_length_error)?;
    if bdl % dlen != 0 {
        return Err(Sense::invalid_param_field(if ten { 6 } else { 3 }));
    }
    for (i, d) in list[header..pages_at].chunks_exact(dlen).enumerate() {
        let len_at = if long { 12 } else { 5 };
        let len = d[len_at..]
            .iter()
            .fold(0u32, |a, &b| (a << 8) | u32::from(b));
        let ours = p.block_descriptor.map(|(_, l)| l);
        if ours != Some(len) {
            return Err(Sense::invalid_param_field(
                (header + i * dlen + len_at) as u16,
            ));
        }
    }
    let mut at = pages_at;
    while at < list.len() {
        let rest = &list[at..];
        if rest.len() < 2 {
            return Err(Sense::parameter_list_length_error());
        }
        let code = rest[0] & 0x3F;
        if rest[0] & 0x40 != 0 || !p.pages.contains(&code) {
            return Err(Sense::invalid_param_field(at as u16));
        }
        let current = page(code, PageControl::Current, p);
        let len = 2 + usize::from(rest[1]);
        if len != current.len() {
            return Err(Sense::invalid_param_field(at as u16 + 1));
        }
        let Some(given) = rest.get(..len) else {
            return Err(Sense::parameter_list_length_error());
        };
        if let Some(i) = (2..len).find(|&i| given[i] != current[i]) {
            return Err(Sense::invalid_param_field((at + i) as u16));
        }
        at += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: ModeParams = ModeParams {
        pages: &[PAGE_CACHING, PAGE_CONTROL],
        device_specific: 0x10,
        block_descriptor: Some((0x1_0000_0000, 512)),
        prevented: false,
    };

    #[test]
    fn mode_sense6_caching_with_descriptor() {
        let d = sense(false, false, false, PageControl::Current, 8, 0, &DISK).unwrap();
        assert_eq!(d.len(), 4 + 8 + 20);
        assert_eq!(&d[..4], &[31, 0, 0x10, 8]);
        assert_eq!(&d[4..12], &[0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x02, 0x00]);
        assert_eq!(&d[12..15], &[0x08, 0x12, 0x04]);
    }

    #[test]
    fn mode_sense10_long_descriptor_and_all_pages() {
        let d = sense(true, false, true, PageControl::Current, 0x3F, 0xFF, &DISK).unwrap();
        assert_eq!(&d[..8], &[0, 6 + 16 + 20 + 12, 0, 0x10, 1, 0, 0, 16]);
        assert_eq!(&d[8..16], &0x1_0000_0000u64.to_be_bytes());
        assert_eq!(&d[20..24], &512u32.to_be_bytes());
        assert_eq!(d[24], 0x08);
        assert_eq!(d[44], 0x0A);
        assert_eq!(d[47], 0x10);
    }

    #[test]
    fn changeable_is_zero_saved_refused_unknown_refused() {
        let d = sense(false, true, false, PageControl::Changeable, 8, 0, &DISK).unwrap();
        assert_eq!(&d[..4], &[23, 0, 0x10, 0]);
        assert_eq!(&d[4..6], &[0x08, 0x12]);
        assert!(d[6..].iter().all(|&b| b == 0));
        let e = sense(false, true, false, PageControl::Saved, 8, 0, &DISK).unwrap_err();
        assert_eq!((e.asc, e.ascq), (0x39, 0));
        assert_eq!(
            sense(false, true, false, PageControl::Current, 0x1C, 0, &DISK)
                .unwrap_err()
                .asc,
            0x24
        );
        assert_eq!(
            sense(false, true, false, PageControl::Current, 8, 1, &DISK)
                .unwrap_err()
                .asc,
            0x24
        );
    }

    #[test]
    fn mode_select_accepts_current_refuses_changes() {
        let cur = sense(false, true, false, PageControl::Current, 8, 0, &DISK).unwrap();
        let mut list = cur.clone();
        list[0] = 0;
        select(false, true, false, &list, &DISK).unwrap();
        select(false, true, false, &[], &DISK).unwrap();
        list[6] = 0; // clear WCE
        assert_eq!(
            select(false, true, false, &list, &DISK),
            Err(Sense::invalid_param_field(6))
        );
        assert_eq!(
            select(false, false, false, &cur, &DISK).unwrap_err().asc,
            0x24
        );
        assert_eq!(
            select(false, true, true, &cur, &DISK).unwrap_err().asc,
            0x24
        );
        // Truncated and hostile lists.
        assert_eq!(
            select(false, true, false, &[0, 0, 0], &DISK),
            Err(Sense::parameter_list_length_error())
        );
        assert_eq!(
            select(false, true, false, &[0, 0, 0, 200, 0], &DISK),
            Err(Sense::parameter_list_length_error())
        );
        assert_eq!(
            select(false, true, false, &[0, 0, 0, 0, 0x08, 0x12, 0x04], &DISK),
            Err(Sense::parameter_list_length_error())
        );
        // A block descriptor that changes the block length.
        let bd = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x10, 0];
        assert_eq!(
            select(false, true, false, &bd, &DISK),
            Err(Sense::invalid_param_field(9))
        );
        let bd = [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x02, 0];
        select(false, true, false, &bd, &DISK).unwrap();
    }
}
