//! The direct-access target (SBC-3): a disk on a [`Medium`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::cdb::Command;
use crate::inquiry::{self, BlockLimits, Identity, VpdParams};
use crate::medium::{Allocation, Medium, MediumError, MediumErrorKind};
use crate::mode::{self, ModeParams};
use crate::reservation::{self, PrOutError, SharedReservations};
use crate::sense::Sense;
use crate::target;
use crate::{be32, Completion, Data, InitiatorId, LogicalUnit};

/// Largest buffer this crate allocates for itself (WRITE SAME patterns, VERIFY reads).
const CHUNK: usize = 1 << 20;
/// Most descriptors one GET LBA STATUS returns.
const MAX_LBA_STATUS_DESCRIPTORS: usize = 64;

/// Tunables of a [`ScsiDisk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Product identification (16 ASCII bytes, space padded).
    pub product: [u8; 16],
    /// Largest READ/WRITE/VERIFY in logical blocks (VPD B0h MAXIMUM TRANSFER LENGTH).
    pub max_transfer_blocks: u32,
    /// Largest range of one UNMAP descriptor, and of all of them together, in blocks.
    pub max_unmap_blocks: u32,
    /// Most UNMAP block descriptors in one command.
    pub max_unmap_descriptors: u32,
    /// Largest WRITE SAME in blocks. A WRITE SAME that cannot unmap writes its block this
    /// many times, synchronously, so keep it to what the medium writes well within the
    /// guest's command timeout.
    pub max_write_same_blocks: u32,
    /// Overrides [`Medium::disk_id`] for the serial number and designators.
    pub id: Option<[u8; 16]>,
}

impl Default for DiskConfig {
    fn default() -> Self {
        Self {
            product: inquiry::product("Virtual Disk"),
            max_transfer_blocks: 2048,
            max_unmap_blocks: 0x0040_0000,
            max_unmap_descriptors: 256,
            max_write_same_blocks: 0x0001_0000,
            id: None,
        }
    }
}

/// Why a target could not be built on a medium.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("logical sector size {0} is not a power of two between 512 and 65536")]
    LogicalSectorSize(u32),
    #[error("the maximum transfer length is zero")]
    ZeroMaxTransfer,
}

/// A validated block I/O: what a READ or WRITE asks the medium to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockIo {
    pub write: bool,
    pub lba: u64,
    pub offset: u64,
    pub len: usize,
    pub fua: bool,
}

/// Block geometry and the checks shared by the disk and the DVD.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub block: u32,
    pub max_transfer_blocks: u32,
}

impl Geometry {
    pub fn blocks(&self, medium: &dyn Medium) -> u64 {
        medium.size() / u64::from(self.block)
    }

    /// Checks `[lba, lba + blocks)` against the capacity; returns (offset, length) in bytes.
    pub fn range(&self, medium: &dyn Medium, lba: u64, blocks: u64) -> Result<(u64, u64), Sense> {
        let end = lba.checked_add(blocks).ok_or(Sense::lba_out_of_range())?;
        if end > self.blocks(medium) {
            return Err(Sense::lba_out_of_range());
        }
        // Cannot overflow: end * block <= medium.size().
        Ok((lba * u64::from(self.block), blocks * u64::from(self.block)))
    }

    /// Validates a READ/WRITE against the maximum transfer, the capacity and the buffer.
    pub fn io(
        &self,
        medium: &dyn Medium,
        cmd: &Command,
        buffer_len: usize,
    ) -> Result<Option<BlockIo>, Sense> {
        let (write, lba, blocks, fua) = match *cmd {
            Command::Read { lba, blocks, fua } => (false, lba, blocks, fua),
            Command::Write { lba, blocks, fua } => (true, lba, blocks, fua),
            _ => return Ok(None),
        };
        if blocks > self.max_transfer_blocks {
            return Err(Sense::invalid_cdb_field(7, None));
        }
        let (offset, len) = self.range(medium, lba, blocks.into())?;
        let len = usize::try_from(len).map_err(|_| Sense::invalid_cdb_field(7, None))?;
        if len > buffer_len {
            return Err(Sense::invalid_cdb_field(7, None));
        }
        Ok(Some(BlockIo {
            write,
            lba,
            offset,
            len,
            fua,
        }))
    }

    /// Runs a validated block I/O.
    pub fn run(&self, medium: &dyn Medium, io: BlockIo, data: &mut Data) -> Completion {
        let short = || Completion::check(Sense::invalid_cdb_field(7, None));
        let r = if io.write {
            match data.output().get(..io.len) {
                Some(buf) => medium.write_at(buf, io.offset),
                None => return short(),
            }
        } else {
            match data.input().get_mut(..io.len) {
                Some(buf) => medium.read_at(buf, io.offset),
                None => return short(),
            }
        };
        self.complete(io, r)
    }

    pub fn complete(&self, io: BlockIo, result: Result<(), MediumError>) -> Completion {
        match result {
            Ok(()) => Completion {
                fua: io.write && io.fua,
                ..Completion::good(io.len)
            },
            Err(e) => self.failed(e, io.offset, io.len as u64, io.write),
        }
    }

    /// The completion for a backend failure within `[offset, offset + len)`.
    pub fn failed(&self, mut e: MediumError, offset: u64, len: u64, write: bool) -> Completion {
        if e.op == "I/O" {
            e.op = if write { "write" } else { "read" };
        }
        let at = e
            .offset
            .clamp(offset, offset.saturating_add(len.saturating_sub(1)));
        let lba = at / u64::from(self.block);
        let sense = match e.kind {
            MediumErrorKind::ReadOnly => Sense::write_protected(),
            MediumErrorKind::Io => Sense::medium_error(lba, write),
        };
        Completion {
            error: Some(e),
            ..Completion::check(sense)
        }
    }

    /// READ CAPACITY (10) parameter data.
    pub fn capacity10(&self, medium: &dyn Medium) -> [u8; 8] {
        let last = self.blocks(medium).saturating_sub(1);
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&be32(u32::try_from(last).unwrap_or(u32::MAX)));
        b[4..].copy_from_slice(&be32(self.block));
        b
    }
}

/// A SCSI disk on a medium. Cheap to share: every method takes `&self`.
pub struct ScsiDisk {
    medium: Arc<dyn Medium>,
    config: DiskConfig,
    identity: Identity,
    geometry: Geometry,
    physical_exponent: u8,
    reservations: SharedReservations,
    capacity_changed: AtomicBool,
}

impl std::fmt::Debug for ScsiDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiDisk")
            .field("config", &self.config)
            .field("block", &self.geometry.block)
            .finish_non_exhaustive()
    }
}

impl ScsiDisk {
    /// A disk whose logical block is the medium's logical sector, with its own reservation
    /// state (see [`ScsiDisk::with_reservations`] to share one).
    pub fn new(medium: Arc<dyn Medium>, config: DiskConfig) -> Result<Self, ConfigError> {
        let block = medium.logical_sector_size();
        if !block.is_power_of_two() || !(512..=65536).contains(&block) {
            return Err(ConfigError::LogicalSectorSize(block));
        }
        if config.max_transfer_blocks == 0 {
            return Err(ConfigError::ZeroMaxTransfer);
        }
        let physical = medium.physical_sector_size();
        let physical_exponent = if physical > block
            && physical.is_power_of_two()
            && (physical / block).trailing_zeros() < 16
        {
            (physical / block).trailing_zeros() as u8
        } else {
            0
        };
        let identity = Identity {
            peripheral: inquiry::TYPE_DISK,
            removable: false,
            product: config.product,
            id: config.id.unwrap_or_else(|| medium.disk_id()),
        };
        Ok(Self {
            geometry: Geometry {
                block,
                max_transfer_blocks: config.max_transfer_blocks,
            },
            medium,
            config,
            identity,
            physical_exponent,
            reservations: SharedReservations::new(),
            capacity_changed: AtomicBool::new(false),
        })
    }

    /// Uses `reservations` (shared with every other target on the same medium).
    pub fn with_reservations(mut self, reservations: SharedReservations) -> Self {
        self.reservations = reservations;
        self
    }

    /// Tells the guest, through UNIT ATTENTION 2Ah/09h (CAPACITY DATA HAS CHANGED) on its next
    /// command, that the medium was resized.
    pub fn notify_capacity_changed(&self) {
        self.capacity_changed.store(true, Ordering::SeqCst);
    }

    /// Takes the unit attention pending for `initiator`, if any.
    fn take_unit_attention(&self, initiator: InitiatorId) -> Option<Sense> {
        if self.capacity_changed.swap(false, Ordering::SeqCst) {
            return Some(Sense::capacity_changed());
        }
        self.reservations.take_unit_attention(initiator)
    }

    /// Reports (and clears) a pending unit attention for `cmd`.
    fn unit_attention(&self, initiator: InitiatorId, cmd: &Command) -> Option<Completion> {
        if cmd.ignores_unit_attention() {
            return None;
        }
        self.take_unit_attention(initiator).map(Completion::check)
    }

    pub fn reservations(&self) -> &SharedReservations {
        &self.reservations
    }

    pub fn medium(&self) -> &Arc<dyn Medium> {
        &self.medium
    }

    pub fn block_size(&self) -> u32 {
        self.geometry.block
    }

    /// The sans-I/O half of READ and WRITE: checks reservations, write protection, the
    /// maximum transfer, the LBA range and the buffer length, and says what I/O the command
    /// asks for. `Ok(None)`: not a READ/WRITE, or zero blocks (complete it with
    /// [`Completion::good`]`(0)`). `Err`: the completion to return at once. A caller that
    /// does the I/O itself (asynchronously) then calls [`ScsiDisk::complete_io`].
    pub fn plan_io(
        &self,
        initiator: InitiatorId,
        cmd: &Command,
        buffer_len: usize,
    ) -> Result<Option<BlockIo>, Completion> {
        if let Some(c) = self.unit_attention(initiator, cmd) {
            return Err(c);
        }
        if !self
            .reservations
            .allows(initiator, reservation::access(cmd))
        {
            return Err(Completion::conflict());
        }
        if matches!(cmd, Command::Write { .. }) && self.medium.is_read_only() {
            return Err(Completion::check(Sense::write_protected()));
        }
        match self.geometry.io(&*self.medium, cmd, buffer_len) {
            Ok(Some(io)) if io.len == 0 => Ok(None),
            Ok(io) => Ok(io),
            Err(s) => Err(Completion::check(s)),
        }
    }

    /// The completion of a planned I/O, given how the medium access went.
    pub fn complete_io(&self, io: BlockIo, result: Result<(), MediumError>) -> Completion {
        self.geometry.complete(io, result)
    }

    fn unmap_supported(&self) -> bool {
        self.medium.supports_unmap() && !self.medium.is_read_only()
    }

    fn mode_params(&self) -> ModeParams<'static> {
        let wp = if self.medium.is_read_only() { 0x80 } else { 0 };
        ModeParams {
            pages: &[mode::PAGE_CACHING, mode::PAGE_CONTROL],
            device_specific: wp | 0x10, // DPOFUA
            block_descriptor: Some((self.geometry.blocks(&*self.medium), self.geometry.block)),
            prevented: false,
        }
    }

    fn vpd_params(&self) -> VpdParams<'_> {
        let unmap = self.unmap_supported();
        VpdParams {
            identity: &self.identity,
            limits: Some(BlockLimits {
                max_transfer_blocks: self.config.max_transfer_blocks,
                optimal_granularity: 1 << self.physical_exponent,
                max_unmap_blocks: if unmap {
                    self.config.max_unmap_blocks
                } else {
                    0
                },
                max_unmap_descriptors: if unmap {
                    self.config.max_unmap_descriptors
                } else {
                    0
                },
                unmap_granularity: 1 << self.physical_exponent,
                max_write_same_blocks: self.config.max_write_same_blocks.into(),
            }),
            lbpu: unmap,
            lbprz: unmap && self.medium.unmap_reads_zero(),
        }
    }

    fn capacity16(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        let last = self.geometry.blocks(&*self.medium).saturating_sub(1);
        b[..8].copy_from_slice(&last.to_be_bytes());
        b[8..12].copy_from_slice(&be32(self.geometry.block));
        b[13] = self.physical_exponent & 0x0F;
        if self.unmap_supported() {
            b[14] = 0x80; // LBPME
            if self.medium.unmap_reads_zero() {
                b[14] |= 0x40; // LBPRZ
            }
        }
        b
    }

    fn write_same(&self, lba: u64, blocks: u32, unmap: bool, data: &Data) -> Completion {
        if blocks == 0 || blocks > self.config.max_write_same_blocks {
            return Completion::check(Sense::invalid_cdb_field(10, None));
        }
        let (offset, len) = match self.geometry.range(&*self.medium, lba, blocks.into()) {
            Ok(r) => r,
            Err(s) => return Completion::check(s),
        };
        let bs = self.geometry.block as usize;
        let Some(pattern) = data.output().get(..bs) else {
            return Completion::check(Sense::invalid_cdb_field(10, None));
        };
        if unmap
            && self.unmap_supported()
            && self.medium.unmap_reads_zero()
            && pattern.iter().all(|&b| b == 0)
        {
            return match self.medium.unmap(offset, len) {
                Ok(()) => Completion::good(bs),
                Err(e) => self.geometry.failed(e, offset, len, true),
            };
        }
        let chunk_blocks = (CHUNK / bs).max(1) as u64;
        let mut buf = Vec::new();
        let mut done = 0u64;
        let total = u64::from(blocks);
        while done < total {
            let n = chunk_blocks.min(total - done);
            let bytes = n as usize * bs;
            if buf.len() < bytes {
                buf = pattern.repeat(n as usize);
            }
            let at = offset + done * bs as u64;
            if let Err(e) = self.medium.write_at(&buf[..bytes], at) {
                return self.geometry.failed(e, at, bytes as u64, true);
            }
            done += n;
        }
        Completion::good(bs)
    }

    fn unmap(&self, len: u32, data: &Data) -> Completion {
        if len == 0 {
            return Completion::good(0);
        }
        let list = match data.param_list(len, 7) {
            Ok(l) => l,
            Err(s) => return Completion::check(s),
        };
        if list.len() < 8 {
            return Completion::check(Sense::parameter_list_length_error());
        }
        let bddl = usize::from(u16::from_be_bytes([list[2], list[3]]));
        let descs = &list[8..8 + bddl.min(list.len() - 8)];
        let count = descs.len() / 16;
        if count > self.config.max_unmap_descriptors as usize {
            return Completion::check(Sense::invalid_param_field(2));
        }
        let mut ranges = Vec::with_capacity(count);
        let mut total = 0u64;
        for (i, d) in descs.chunks_exact(16).enumerate() {
            let mut l = [0u8; 8];
            l.copy_from_slice(&d[..8]);
            let lba = u64::from_be_bytes(l);
            let n = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
            total += u64::from(n);
            if n > self.config.max_unmap_blocks || total > u64::from(self.config.max_unmap_blocks) {
                return Completion::check(Sense::invalid_param_field((8 + i * 16 + 8) as u16));
            }
            match self.geometry.range(&*self.medium, lba, n.into()) {
                Ok((off, bytes)) if bytes > 0 => ranges.push((off, bytes)),
                Ok(_) => {}
                Err(s) => return Completion::check(s),
            }
        }
        for (off, bytes) in ranges {
            if let Err(e) = self.medium.unmap(off, bytes) {
                return self.geometry.failed(e, off, bytes, true);
            }
        }
        Completion::good(list.len())
    }

    fn get_lba_status(&self, lba: u64, alloc: u32, data: &mut Data) -> Completion {
        let blocks = self.geometry.blocks(&*self.medium);
        if lba >= blocks {
            return Completion::check(Sense::lba_out_of_range());
        }
        let bs = u64::from(self.geometry.block);
        let room = (alloc as usize).saturating_sub(8) / 16;
        let want = room.clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
        let mut out = vec![0u8; 8];
        let mut at = lba;
        while at < blocks && (out.len() - 8) / 16 < want {
            let remaining = (blocks - at).min(u64::from(u32::MAX));
            let r = self.medium.allocation(at * bs, remaining * bs);
            let (state, bytes) = match r {
                Ok(Allocation::Mapped(n)) => (0u8, n),
                Ok(Allocation::Deallocated(n)) => (1u8, n),
                Err(e) => return self.geometry.failed(e, at * bs, remaining * bs, false),
            };
            let n = (bytes / bs).clamp(1, remaining);
            out.extend_from_slice(&at.to_be_bytes());
            out.extend_from_slice(&be32(n as u32));
            out.extend_from_slice(&[state, 0, 0, 0]);
            at += n;
        }
        let plen = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&be32(plen));
        Completion::good(data.reply(&out, alloc))
    }

    fn verify(&self, lba: u64, blocks: u32, bytchk: bool, data: &Data) -> Completion {
        if blocks > self.geometry.max_transfer_blocks {
            return Completion::check(Sense::invalid_cdb_field(7, None));
        }
        let (offset, len) = match self.geometry.range(&*self.medium, lba, blocks.into()) {
            Ok(r) => r,
            Err(s) => return Completion::check(s),
        };
        if !bytchk {
            return Completion::good(0);
        }
        let Some(expected) = usize::try_from(len)
            .ok()
            .and_then(|l| data.output().get(..l))
        else {
            return Completion::check(Sense::invalid_cdb_field(7, None));
        };
        let mut buf = vec![0u8; expected.len().min(CHUNK)];
        for (i, want) in expected.chunks(CHUNK).enumerate() {
            let at = offset + (i * CHUNK) as u64;
            let got = &mut buf[..want.len()];
            if let Err(e) = self.medium.read_at(got, at) {
                return self.geometry.failed(e, at, want.len() as u64, false);
            }
            if let Some(p) = got.iter().zip(want).position(|(a, b)| a != b) {
                return Completion::check(Sense::miscompare((i * CHUNK + p) as u64));
            }
        }
        Completion::good(expected.len())
    }
}

impl LogicalUnit for ScsiDisk {
    fn execute_command(
        &self,
        initiator: InitiatorId,
        cmd: &Command,
        mut data: Data<'_>,
    ) -> Completion {
        if let Some(c) = self.unit_attention(initiator, cmd) {
            return c;
        }
        if !self
            .reservations
            .allows(initiator, reservation::access(cmd))
        {
            return Completion::conflict();
        }
        let writes = matches!(
            cmd,
            Command::Write { .. } | Command::WriteSame16 { .. } | Command::Unmap { .. }
        );
        if writes && self.medium.is_read_only() {
            return Completion::check(Sense::write_protected());
        }
        let m = &*self.medium;
        match *cmd {
            Command::TestUnitReady | Command::StartStop { .. } | Command::PreventAllow { .. } => {
                Completion::good(0)
            }
            Command::RequestSense { desc, alloc } => {
                if desc {
                    return Completion::check(Sense::invalid_cdb_field(1, Some(0)));
                }
                let sense = self
                    .take_unit_attention(initiator)
                    .unwrap_or(Sense::no_sense());
                Completion::good(data.reply(&sense.to_fixed(), alloc))
            }
            Command::Inquiry { evpd, page, alloc } => {
                let bytes = if evpd {
                    match inquiry::vpd(page, &self.vpd_params()) {
                        Ok(b) => b,
                        Err(s) => return Completion::check(s),
                    }
                } else {
                    inquiry::standard(&self.identity).to_vec()
                };
                Completion::good(data.reply(&bytes, alloc))
            }
            Command::ReportLuns { select, alloc } => {
                Completion::from_result(target::report_luns(&[0], select, alloc, &mut data))
            }
            Command::ReadCapacity10 => {
                Completion::good(data.reply(&self.geometry.capacity10(m), 8))
            }
            Command::ReadCapacity16 { alloc } => {
                Completion::good(data.reply(&self.capacity16(), alloc))
            }
            Command::ModeSense {
                ten,
                dbd,
                llbaa,
                pc,
                page,
                subpage,
                alloc,
            } => match mode::sense(ten, dbd, llbaa, pc, page, subpage, &self.mode_params()) {
                Ok(b) => Completion::good(data.reply(&b, alloc)),
                Err(s) => Completion::check(s),
            },
            Command::ModeSelect { ten, pf, sp, len } => {
                let r = data
                    .param_list(len, if ten { 7 } else { 4 })
                    .and_then(|l| mode::select(ten, pf, sp, l, &self.mode_params()).map(|()| l));
                Completion::from_result(r.map(<[u8]>::len))
            }
            Command::Read { .. } | Command::Write { .. } => {
                let buffer_len = if writes {
                    data.output().len()
                } else {
                    data.input().len()
                };
                match self.geometry.io(m, cmd, buffer_len) {
                    Ok(Some(io)) => self.geometry.run(m, io, &mut data),
                    Ok(None) => Completion::good(0),
                    Err(s) => Completion::check(s),
                }
            }
            Command::Verify {
                lba,
                blocks,
                bytchk,
            } => self.verify(lba, blocks, bytchk, &data),
            Command::SyncCache { lba, blocks } => {
                // Zero blocks means "to the end": only the LBA needs to be in range.
                if let Err(s) = self.geometry.range(m, lba, blocks.into()) {
                    return Completion::check(s);
                }
                match m.flush() {
                    Ok(()) => Completion::good(0),
                    Err(mut e) => {
                        e.op = "flush";
                        Completion {
                            error: Some(e),
                            ..Completion::check(Sense::medium_error(lba, true))
                        }
                    }
                }
            }
            Command::WriteSame16 { lba, blocks, unmap } => {
                self.write_same(lba, blocks, unmap, &data)
            }
            Command::Unmap { len } => {
                if !self.unmap_supported() {
                    return Completion::check(Sense::invalid_opcode());
                }
                self.unmap(len, &data)
            }
            Command::GetLbaStatus { lba, alloc } => self.get_lba_status(lba, alloc, &mut data),
            Command::PersistentReserveIn { action, alloc } => {
                Completion::good(data.reply(&self.reservations.reserve_in(action), alloc))
            }
            Command::PersistentReserveOut {
                action,
                scope,
                ty,
                len,
            } => {
                let list = match data.param_list(len, 5) {
                    Ok(l) => l,
                    Err(s) => return Completion::check(s),
                };
                match self
                    .reservations
                    .reserve_out(initiator, action, scope, ty, list)
                {
                    Ok(()) => Completion::good(list.len()),
                    Err(PrOutError::Conflict) => Completion::conflict(),
                    Err(PrOutError::Sense(s)) => Completion::check(s),
                }
            }
            Command::GetConfiguration { .. }
            | Command::GetEventStatus { .. }
            | Command::ReadToc { .. }
            | Command::ReadDiscInformation { .. } => Completion::check(Sense::invalid_opcode()),
        }
    }
}
