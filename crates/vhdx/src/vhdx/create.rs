//! Creating VHDX files: fixed, dynamic and differencing.

use super::backing::io_err;
use super::format::*;
use super::Vhdx;
use crate::{Disk, Error, Result};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use uuid::Uuid;

/// Options for a new VHDX file. Defaults: dynamic, 32 MiB blocks (2 MiB for differencing),
/// 512-byte logical and 4096-byte physical sectors, a 1 MiB log, a random disk id.
#[derive(Clone, Debug)]
pub struct VhdxBuilder {
    size: Option<u64>,
    block_size: Option<u32>,
    logical_sector_size: Option<u32>,
    physical_sector_size: Option<u32>,
    fixed: bool,
    parent: Option<PathBuf>,
    disk_id: Option<Uuid>,
    log_size: u32,
}

impl VhdxBuilder {
    /// A new dynamic disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        VhdxBuilder {
            size: Some(size),
            block_size: None,
            logical_sector_size: None,
            physical_sector_size: None,
            fixed: false,
            parent: None,
            disk_id: None,
            log_size: MIB as u32,
        }
    }

    /// A new differencing disk over `parent` (a VHDX file); size, sector sizes and disk id
    /// come from the parent.
    pub fn differencing(parent: impl AsRef<Path>) -> Self {
        VhdxBuilder {
            size: None,
            parent: Some(parent.as_ref().to_path_buf()),
            ..VhdxBuilder::new(0)
        }
    }

    /// Fixed: every block allocated (FULLY_PRESENT) and LeaveBlocksAllocated set.
    pub fn fixed(mut self, fixed: bool) -> Self {
        self.fixed = fixed;
        self
    }

    /// Block size: a power of two from 1 MiB to 256 MiB.
    pub fn block_size(mut self, bytes: u32) -> Self {
        self.block_size = Some(bytes);
        self
    }

    pub fn logical_sector_size(mut self, bytes: u32) -> Self {
        self.logical_sector_size = Some(bytes);
        self
    }

    pub fn physical_sector_size(mut self, bytes: u32) -> Self {
        self.physical_sector_size = Some(bytes);
        self
    }

    /// The page 83 disk identifier (differencing disks inherit the parent's).
    pub fn disk_id(mut self, id: Uuid) -> Self {
        self.disk_id = Some(id);
        self
    }

    /// Log size: a non-zero multiple of 1 MiB.
    pub fn log_size(mut self, bytes: u32) -> Self {
        self.log_size = bytes;
        self
    }

    /// Creates the file (which must not exist) and opens it read-write.
    pub fn create(&self, path: impl AsRef<Path>) -> Result<Vhdx> {
        let path = path.as_ref();
        let mut size = self.size.unwrap_or(0);
        let mut lss = self.logical_sector_size.unwrap_or(512);
        let mut pss = self.physical_sector_size.unwrap_or(4096);
        let mut disk_id = self.disk_id.unwrap_or_else(Uuid::new_v4);
        let mut locator = None;
        if let Some(pp) = &self.parent {
            // Opened as a chain member: refused while someone has the parent open for writing.
            let parent = Vhdx::open_as_parent(pp)?;
            if self.size.is_some_and(|s| s != parent.size()) {
                return Err(Error::Invalid(
                    "a differencing disk has its parent's size".into(),
                ));
            }
            size = parent.size();
            if self
                .logical_sector_size
                .is_some_and(|l| l != parent.logical_sector_size())
            {
                return Err(Error::Invalid(
                    "a differencing disk has its parent's logical sector size".into(),
                ));
            }
            lss = parent.logical_sector_size();
            pss = self
                .physical_sector_size
                .unwrap_or(parent.physical_sector_size());
            disk_id = parent.disk_id();
            locator = Some(make_locator(path, pp, &parent)?);
        }
        let block_size = self.block_size.unwrap_or(if self.parent.is_some() {
            2 << 20
        } else {
            32 << 20
        });
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::Invalid(format!(
                "block size {block_size} is not a power of two from 1 MiB to 256 MiB"
            )));
        }
        for (what, v) in [("logical", lss), ("physical", pss)] {
            if v != 512 && v != 4096 {
                return Err(Error::Invalid(format!(
                    "{what} sector size {v} is neither 512 nor 4096"
                )));
            }
        }
        if size == 0 || size > MAX_VIRTUAL_SIZE || !size.is_multiple_of(u64::from(lss)) {
            return Err(Error::Invalid(format!(
                "size {size} is not a non-zero multiple of {lss} up to 64 TiB"
            )));
        }
        if self.log_size == 0 || !u64::from(self.log_size).is_multiple_of(MIB) {
            return Err(Error::Invalid(format!(
                "log size {} is not a non-zero multiple of 1 MiB",
                self.log_size
            )));
        }
        let fixed = self.fixed && self.parent.is_none();
        let geo = Geometry {
            block_size,
            logical_sector_size: lss,
            has_parent: self.parent.is_some(),
        };

        let log_offset = MIB;
        let meta_offset = log_offset + u64::from(self.log_size);
        let bat_offset = meta_offset + MIB;
        let entries = geo.bat_entries(size);
        let bat_len = (entries * 8).div_ceil(MIB).max(1) * MIB;
        let payload_start = bat_offset + bat_len;
        let bs = u64::from(block_size);
        let data_blocks = geo.data_blocks(size);
        let file_end = if fixed {
            payload_start + data_blocks * bs
        } else {
            payload_start
        };

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| io_err(path, "create", e))?;
        let w = |buf: &[u8], off: u64| {
            file.write_all_at(buf, off)
                .map_err(|e| io_err(path, "write", e))
        };
        let result = (|| -> Result<()> {
            // File identifier.
            let mut id = vec![0u8; 64 * 1024];
            id[..8].copy_from_slice(b"vhdxfile");
            for (i, u) in "Viridian".encode_utf16().enumerate() {
                put16(&mut id, 8 + 2 * i, u);
            }
            w(&id, 0)?;
            // Headers.
            let mut h = Header {
                sequence_number: 0,
                file_write_guid: Uuid::new_v4(),
                data_write_guid: Uuid::new_v4(),
                log_guid: Uuid::nil(),
                log_version: 0,
                version: 1,
                log_length: self.log_size,
                log_offset,
            };
            w(&h.serialize(), HEADER_OFFSETS[0])?;
            h.sequence_number = 1;
            w(&h.serialize(), HEADER_OFFSETS[1])?;
            // Region tables.
            let rt = serialize_region_table(&[
                RegionEntry {
                    guid: BAT_REGION,
                    file_offset: bat_offset,
                    length: bat_len as u32,
                    required: true,
                },
                RegionEntry {
                    guid: METADATA_REGION,
                    file_offset: meta_offset,
                    length: MIB as u32,
                    required: true,
                },
            ]);
            w(&rt, REGION_TABLE_OFFSETS[0])?;
            w(&rt, REGION_TABLE_OFFSETS[1])?;
            // Metadata.
            let mut items: Vec<(Uuid, u32, Vec<u8>)> = Vec::new();
            let mut fp = vec![0u8; 8];
            put32(&mut fp, 0, block_size);
            put32(
                &mut fp,
                4,
                u32::from(fixed) | (u32::from(self.parent.is_some()) << 1),
            );
            items.push((ITEM_FILE_PARAMETERS, META_FLAG_IS_REQUIRED, fp));
            let vd = META_FLAG_IS_REQUIRED | META_FLAG_IS_VIRTUAL_DISK;
            items.push((ITEM_VIRTUAL_DISK_SIZE, vd, size.to_le_bytes().to_vec()));
            items.push((ITEM_PAGE83, vd, disk_id.to_bytes_le().to_vec()));
            items.push((ITEM_LOGICAL_SECTOR, vd, lss.to_le_bytes().to_vec()));
            items.push((ITEM_PHYSICAL_SECTOR, vd, pss.to_le_bytes().to_vec()));
            if let Some(l) = &locator {
                items.push((ITEM_PARENT_LOCATOR, META_FLAG_IS_REQUIRED, l.clone()));
            }
            let mut table = Vec::new();
            let mut region = vec![0u8; MIB as usize];
            let mut off = METADATA_TABLE_SIZE;
            for (id, flags, data) in &items {
                if off + data.len() > region.len() {
                    return Err(Error::Invalid("parent locator too large".into()));
                }
                region[off..off + data.len()].copy_from_slice(data);
                table.push(MetadataEntry {
                    item_id: *id,
                    offset: off as u32,
                    length: data.len() as u32,
                    flags: *flags,
                });
                off = (off + data.len()).div_ceil(8) * 8;
            }
            region[..METADATA_TABLE_SIZE].copy_from_slice(&serialize_metadata_table(&table));
            w(&region, meta_offset)?;
            // BAT. A dynamic or differencing disk's BAT is all zeros: the file extension
            // provides them (sparse), so a 64 TiB disk is created instantly.
            let chunk_entries = (MIB / 8) as usize;
            let mut i = 0u64;
            while fixed && i < entries {
                let n = (entries - i).min(chunk_entries as u64);
                let mut buf = vec![0u8; (n * 8) as usize];
                {
                    for k in 0..n {
                        let idx = i + k;
                        let cr = geo.chunk_ratio();
                        if (idx + 1).is_multiple_of(cr + 1) {
                            continue;
                        }
                        let block = idx - idx / (cr + 1);
                        let e = bat_entry(PAYLOAD_FULLY_PRESENT, payload_start + block * bs);
                        put64(&mut buf, (k * 8) as usize, e);
                    }
                }
                w(&buf, bat_offset + i * 8)?;
                i += n;
            }
            file.set_len(file_end)
                .map_err(|e| io_err(path, "set length", e))?;
            if fixed {
                preallocate(&file, payload_start, file_end - payload_start)
                    .map_err(|e| io_err(path, "preallocate", e))?;
            }
            file.sync_all().map_err(|e| io_err(path, "flush", e))
        })();
        drop(file);
        if let Err(e) = result {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Vhdx::open(path, false).inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
    }
}

/// Reserves disk space for a fixed disk's blocks (fallocate). File systems without fallocate
/// leave the blocks sparse; they read as zeros either way.
fn preallocate(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    match fallocate(file, FallocateFlags::KEEP_SIZE, offset, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn make_locator(child: &Path, parent_path: &Path, parent: &Vhdx) -> Result<Vec<u8>> {
    let parent_abs = parent_path
        .canonicalize()
        .map_err(|e| io_err(parent_path, "open", e))?;
    let child_dir = child
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let child_dir = child_dir
        .canonicalize()
        .map_err(|e| io_err(child_dir, "open", e))?;
    let abs = parent_abs
        .to_str()
        .ok_or_else(|| Error::Invalid("parent path is not UTF-8".into()))?
        .to_string();
    let mut entries = vec![(
        "parent_linkage".to_string(),
        guid_braced(&parent.data_write_guid()),
    )];
    if let Some(rel) = relative_path(&child_dir, &parent_abs) {
        entries.push(("relative_path".into(), rel));
    }
    entries.push(("absolute_win32_path".into(), abs));
    Ok(ParentLocator { entries }.serialize())
}

/// `to` relative to the directory `from`, with Windows separators (`.\a\b`, `..\a`).
fn relative_path(from: &Path, to: &Path) -> Option<String> {
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    if common == f.len() {
        parts.push(".".into());
    }
    for _ in common..f.len() {
        parts.push("..".into());
    }
    for c in &t[common..] {
        parts.push(c.as_os_str().to_str()?.to_string());
    }
    Some(parts.join("\\"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/p.vhdx")).unwrap(),
            ".\\p.vhdx"
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/c/p.vhdx")).unwrap(),
            "..\\c\\p.vhdx"
        );
    }
}
