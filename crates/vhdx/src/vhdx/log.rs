//! The VHDX metadata log (MS-VHDX 2.3): finding the active sequence, and building entries.

use super::format::{crc_with_zero_field, guid, le32, le64, put32, put64, put_guid, LOG_SECTOR};
use uuid::Uuid;

/// One write a log replay performs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogWrite {
    /// A full 4 KiB sector.
    Data { offset: u64, data: Vec<u8> },
    /// `len` zero bytes.
    Zero { offset: u64, len: u64 },
}

impl LogWrite {
    pub fn range(&self) -> (u64, u64) {
        match self {
            LogWrite::Data { offset, .. } => (*offset, LOG_SECTOR as u64),
            LogWrite::Zero { offset, len } => (*offset, *len),
        }
    }
}

/// What replaying the active sequence does.
#[derive(Clone, Debug, Default)]
pub struct ReplayPlan {
    pub writes: Vec<LogWrite>,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub last_sequence: u64,
}

#[derive(Clone, Debug)]
struct Entry {
    offset: u64,
    length: u64,
    tail: u64,
    seq: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    writes: Vec<LogWrite>,
}

fn read_wrapped(log: &[u8], offset: u64, len: u64) -> Vec<u8> {
    let n = log.len() as u64;
    let mut v = Vec::with_capacity(len as usize);
    let mut pos = offset % n;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(n - pos);
        v.extend_from_slice(&log[pos as usize..(pos + chunk) as usize]);
        left -= chunk;
        pos = (pos + chunk) % n;
    }
    v
}

fn parse_entry(log: &[u8], offset: u64, log_guid: &Uuid) -> Option<Entry> {
    let n = log.len() as u64;
    let o = offset as usize;
    if &log[o..o + 4] != b"loge" {
        return None;
    }
    let length = u64::from(le32(log, o + 8));
    let tail = u64::from(le32(log, o + 12));
    let seq = le64(log, o + 16);
    let dcount = u64::from(le32(log, o + 24));
    if length == 0 || !length.is_multiple_of(LOG_SECTOR as u64) || length > n {
        return None;
    }
    if !tail.is_multiple_of(LOG_SECTOR as u64) || tail >= n || seq == 0 {
        return None;
    }
    if guid(log, o + 32) != *log_guid {
        return None;
    }
    let desc_sectors = (64 + 32 * dcount).div_ceil(LOG_SECTOR as u64);
    if desc_sectors * LOG_SECTOR as u64 > length {
        return None;
    }
    let entry = read_wrapped(log, offset, length);
    if le32(&entry, 4) != crc_with_zero_field(&entry, 4) {
        return None;
    }
    let mut data_sector = desc_sectors as usize;
    let mut writes = Vec::with_capacity(dcount as usize);
    for i in 0..dcount as usize {
        let d = 64 + i * 32;
        if le64(&entry, d + 24) != seq {
            return None;
        }
        let file_offset = le64(&entry, d + 16);
        if !file_offset.is_multiple_of(LOG_SECTOR as u64) {
            return None;
        }
        match &entry[d..d + 4] {
            b"zero" => {
                let len = le64(&entry, d + 8);
                if len == 0 || !len.is_multiple_of(LOG_SECTOR as u64) {
                    return None;
                }
                file_offset.checked_add(len)?;
                writes.push(LogWrite::Zero {
                    offset: file_offset,
                    len,
                });
            }
            b"desc" => {
                let s = data_sector * LOG_SECTOR;
                if s + LOG_SECTOR > entry.len() {
                    return None;
                }
                let sec = &entry[s..s + LOG_SECTOR];
                if &sec[0..4] != b"data"
                    || u64::from(le32(sec, 4)) != seq >> 32
                    || u64::from(le32(sec, 4092)) != seq & 0xffff_ffff
                {
                    return None;
                }
                let mut data = vec![0u8; LOG_SECTOR];
                data[0..8].copy_from_slice(&entry[d + 8..d + 16]);
                data[8..4092].copy_from_slice(&sec[8..4092]);
                data[4092..4096].copy_from_slice(&entry[d + 4..d + 8]);
                file_offset.checked_add(LOG_SECTOR as u64)?;
                writes.push(LogWrite::Data {
                    offset: file_offset,
                    data,
                });
                data_sector += 1;
            }
            _ => return None,
        }
    }
    if (data_sector * LOG_SECTOR) as u64 != length {
        return None;
    }
    Some(Entry {
        offset,
        length,
        tail,
        seq,
        flushed_file_offset: le64(&entry, 48),
        last_file_offset: le64(&entry, 56),
        writes,
    })
}

/// Largest log this implementation scans (the scan is quadratic in the number of entries for
/// hostile logs; real logs are 1 MiB).
pub const MAX_REPLAY_LOG: u64 = 32 << 20;

/// Finds the active sequence of `log` (the whole log region) for `log_guid`. `None` when there is
/// no valid sequence (nothing to replay).
pub fn find_replay(log: &[u8], log_guid: &Uuid) -> Option<ReplayPlan> {
    let n = log.len() as u64;
    let mut entries = std::collections::HashMap::new();
    let mut off = 0;
    while off < n {
        if let Some(e) = parse_entry(log, off, log_guid) {
            entries.insert(off, e);
        }
        off += LOG_SECTOR as u64;
    }
    // Candidates for the last entry, newest first; the first whose tail starts a consecutive
    // chain that reaches it is the active sequence.
    let mut lasts: Vec<&Entry> = entries.values().collect();
    lasts.sort_by_key(|e| std::cmp::Reverse(e.seq));
    for last in lasts {
        let Some(mut cur) = entries.get(&last.tail) else {
            continue;
        };
        if cur.seq > last.seq {
            continue;
        }
        let mut chain = vec![cur];
        let mut ok = cur.offset == last.offset;
        while !ok && chain.len() <= entries.len() {
            let next = (cur.offset + cur.length) % n;
            match entries.get(&next) {
                Some(e) if e.seq == cur.seq + 1 => {
                    chain.push(e);
                    cur = e;
                    ok = e.offset == last.offset;
                }
                _ => break,
            }
        }
        if !ok {
            continue;
        }
        let mut plan = ReplayPlan {
            flushed_file_offset: last.flushed_file_offset,
            last_file_offset: last.last_file_offset,
            last_sequence: last.seq,
            writes: Vec::new(),
        };
        for e in chain {
            plan.writes.extend(e.writes.iter().cloned());
        }
        return Some(plan);
    }
    None
}

/// Builds one log entry writing the given full 4 KiB sectors.
pub fn build_entry(
    log_guid: &Uuid,
    seq: u64,
    tail: u32,
    flushed_file_offset: u64,
    last_file_offset: u64,
    sectors: &[(u64, Vec<u8>)],
) -> Vec<u8> {
    let desc_sectors = (64 + 32 * sectors.len()).div_ceil(LOG_SECTOR);
    let len = (desc_sectors + sectors.len()) * LOG_SECTOR;
    let mut b = vec![0u8; len];
    b[0..4].copy_from_slice(b"loge");
    put32(&mut b, 8, len as u32);
    put32(&mut b, 12, tail);
    put64(&mut b, 16, seq);
    put32(&mut b, 24, sectors.len() as u32);
    put_guid(&mut b, 32, log_guid);
    put64(&mut b, 48, flushed_file_offset);
    put64(&mut b, 56, last_file_offset);
    for (i, (off, data)) in sectors.iter().enumerate() {
        debug_assert_eq!(data.len(), LOG_SECTOR);
        let d = 64 + i * 32;
        b[d..d + 4].copy_from_slice(b"desc");
        b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        b[d + 8..d + 16].copy_from_slice(&data[0..8]);
        put64(&mut b, d + 16, *off);
        put64(&mut b, d + 24, seq);
        let s = (desc_sectors + i) * LOG_SECTOR;
        b[s..s + 4].copy_from_slice(b"data");
        put32(&mut b, s + 4, (seq >> 32) as u32);
        b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        put32(&mut b, s + 4092, seq as u32);
    }
    let c = super::format::crc32c(&b);
    put32(&mut b, 4, c);
    b
}

/// Builds an entry with zero descriptors (used by tests crafting logs).
pub fn build_zero_entry(
    log_guid: &Uuid,
    seq: u64,
    tail: u32,
    flushed_file_offset: u64,
    last_file_offset: u64,
    zeros: &[(u64, u64)],
) -> Vec<u8> {
    let desc_sectors = (64 + 32 * zeros.len()).div_ceil(LOG_SECTOR);
    let len = desc_sectors * LOG_SECTOR;
    let mut b = vec![0u8; len];
    b[0..4].copy_from_slice(b"loge");
    put32(&mut b, 8, len as u32);
    put32(&mut b, 12, tail);
    put64(&mut b, 16, seq);
    put32(&mut b, 24, zeros.len() as u32);
    put_guid(&mut b, 32, log_guid);
    put64(&mut b, 48, flushed_file_offset);
    put64(&mut b, 56, last_file_offset);
    for (i, (off, zl)) in zeros.iter().enumerate() {
        let d = 64 + i * 32;
        b[d..d + 4].copy_from_slice(b"zero");
        put64(&mut b, d + 8, *zl);
        put64(&mut b, d + 16, *off);
        put64(&mut b, d + 24, seq);
    }
    let c = super::format::crc32c(&b);
    put32(&mut b, 4, c);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sector(fill: u8) -> Vec<u8> {
        let mut v = vec![fill; LOG_SECTOR];
        v[0] = 0x11;
        v[4095] = 0x22;
        v
    }

    #[test]
    fn roundtrip_single_entry() {
        let g = Uuid::new_v4();
        let mut log = vec![0u8; 1 << 20];
        let e = build_entry(&g, 5, 0, 1 << 30, 1 << 30, &[(3 << 20, sector(7))]);
        log[..e.len()].copy_from_slice(&e);
        let p = find_replay(&log, &g).unwrap();
        assert_eq!(p.last_sequence, 5);
        assert_eq!(
            p.writes,
            vec![LogWrite::Data {
                offset: 3 << 20,
                data: sector(7)
            }]
        );
        // Another GUID: nothing.
        assert!(find_replay(&log, &Uuid::new_v4()).is_none());
        // A flipped bit: nothing.
        log[5000] ^= 1;
        assert!(find_replay(&log, &g).is_none());
    }

    #[test]
    fn newest_run_wins_and_tail_must_be_in_run() {
        let g = Uuid::new_v4();
        let mut log = vec![0u8; 1 << 20];
        let a = build_entry(&g, 1, 0, 0, 0, &[(2 << 20, sector(1))]);
        let b_off = a.len();
        let b = build_entry(&g, 2, 0, 0, 0, &[(2 << 20, sector(2))]);
        log[..a.len()].copy_from_slice(&a);
        log[b_off..b_off + b.len()].copy_from_slice(&b);
        let p = find_replay(&log, &g).unwrap();
        assert_eq!(p.last_sequence, 2);
        assert_eq!(p.writes.len(), 2);
        // An entry with a higher sequence whose tail points nowhere valid is ignored.
        let c_off = 512 * 1024;
        let c = build_entry(&g, 9, 4096 * 50, 0, 0, &[(2 << 20, sector(3))]);
        log[c_off..c_off + c.len()].copy_from_slice(&c);
        assert_eq!(find_replay(&log, &g).unwrap().last_sequence, 2);
    }

    #[test]
    fn wrapped_entry() {
        let g = Uuid::new_v4();
        let n = 1 << 20;
        let mut log = vec![0u8; n];
        let e = build_entry(&g, 3, (n - 4096) as u32, 0, 0, &[(4 << 20, sector(9))]);
        // Entry is 2 sectors: the first at the last log sector, the second wraps to 0.
        log[n - 4096..].copy_from_slice(&e[..4096]);
        log[..4096].copy_from_slice(&e[4096..]);
        let p = find_replay(&log, &g).unwrap();
        assert_eq!(p.writes.len(), 1);
    }
}
