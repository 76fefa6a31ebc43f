//! SCSI targets for the storage VSP: a disk (peripheral type 0) and a DVD drive (type 5),
//! behind a LUN map. Pure and sans-I/O in shape: [`Command::decode`] turns a CDB into a typed
//! command without touching any state, and a target executes it against a [`Medium`].
//!
//! This crate knows nothing of VMBus: a caller hands it the CDB, the initiator, and the
//! data-in or data-out buffer, and gets a [`Completion`] with the status, the sense data and
//! the number of bytes transferred.
//!
//! Conventions, chosen once for every command:
//! - **Allocation lengths** truncate: at most `min(allocation length, buffer length)` bytes
//!   are returned; an allocation length of 0 transfers nothing and is not an error (except
//!   REPORT LUNS, where SPC-4 requires at least 4).
//! - **Transfer lengths** (READ/WRITE/VERIFY/WRITE SAME and parameter lists): if the data
//!   buffer is shorter than the CDB says, the command fails with ILLEGAL REQUEST, INVALID
//!   FIELD IN CDB (pointing at the length field) and transfers nothing, so a short buffer
//!   never causes a torn write. A longer buffer is fine: [`Completion::transferred`] tells
//!   how much was used; the caller reports the residual.
//! - **Maximum transfer**: a READ/WRITE/VERIFY longer than the configured maximum (reported
//!   in VPD page B0h) fails with INVALID FIELD IN CDB, as SBC-3 prescribes.
//! - **FUA** is not acted on here: [`Completion::fua`] tells the caller to flush before it
//!   completes the write to the guest. Every other write is cached until SYNCHRONIZE CACHE
//!   (the caching page reports WCE = 1).
//! - **Backend errors** complete with MEDIUM ERROR, the failing LBA in the INFORMATION field,
//!   and the [`MediumError`] in [`Completion::error`] for the caller to log.
//! - **Unit attentions** (a DVD medium change, a disk resize, a preempted or released
//!   persistent reservation) are reported once, on the next command other than INQUIRY,
//!   REPORT LUNS, REQUEST SENSE and the DVD's event and configuration queries; REQUEST SENSE
//!   returns (and clears) them as parameter data.
//! - **Persistent reservations** live in a [`SharedReservations`] that the caller shares
//!   between every target (in every VM) on the same medium; the caller names initiators with
//!   [`InitiatorId`]. A command the reservation forbids completes with RESERVATION CONFLICT.
#![forbid(unsafe_code)]

pub mod cdb;
pub mod disk;
pub mod dvd;
pub mod inquiry;
pub mod medium;
pub mod mode;
pub mod reservation;
pub mod sense;
pub mod target;

pub use cdb::Command;
pub use disk::{BlockIo, ConfigError, DiskConfig, ScsiDisk};
pub use dvd::{DvdSnapshot, MediaEvent, ScsiDvd};
pub use medium::{Allocation, Medium, MediumError, MediumErrorKind, MemoryMedium};
pub use reservation::{ReservationSnapshot, ReservationType, SharedReservations};
pub use sense::{ScsiStatus, Sense, SenseKey};
pub use target::Target;

/// Identifies the initiator (for example the VM and its storage channel) for persistent
/// reservations. The caller picks the values; they only need to be distinct and stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct InitiatorId(pub u64);

/// The command's data buffer.
#[derive(Debug)]
pub enum Data<'a> {
    None,
    /// Data-in: the target writes into it (READ, INQUIRY, ...).
    In(&'a mut [u8]),
    /// Data-out: the target reads from it (WRITE, parameter lists).
    Out(&'a [u8]),
}

impl Data<'_> {
    /// The data-in buffer (empty if this is not one).
    pub fn input(&mut self) -> &mut [u8] {
        match self {
            Data::In(b) => b,
            _ => &mut [],
        }
    }

    /// The data-out buffer (empty if this is not one).
    pub fn output(&self) -> &[u8] {
        match self {
            Data::Out(b) => b,
            _ => &[],
        }
    }

    /// Copies at most `alloc` bytes of `bytes` into the data-in buffer; returns the count.
    pub(crate) fn reply(&mut self, bytes: &[u8], alloc: u32) -> usize {
        let buf = self.input();
        let n = bytes
            .len()
            .min(buf.len())
            .min(usize::try_from(alloc).unwrap_or(usize::MAX));
        buf[..n].copy_from_slice(&bytes[..n]);
        n
    }

    /// The first `len` bytes of the data-out buffer, or INVALID FIELD IN CDB (pointing at
    /// the CDB's length field `field`) if the buffer is shorter.
    pub(crate) fn param_list(&self, len: u32, field: u16) -> Result<&[u8], Sense> {
        let out = self.output();
        usize::try_from(len)
            .ok()
            .and_then(|l| out.get(..l))
            .ok_or(Sense::invalid_cdb_field(field, None))
    }
}

/// The result of one command.
#[derive(Debug, Clone)]
pub struct Completion {
    pub status: ScsiStatus,
    /// Set with [`ScsiStatus::CheckCondition`].
    pub sense: Option<Sense>,
    /// Bytes moved to the data-in buffer or taken from the data-out buffer.
    pub transferred: usize,
    /// The command was a write with FUA: flush before completing it.
    pub fua: bool,
    /// The backend failure behind a MEDIUM ERROR, for the caller's log.
    pub error: Option<MediumError>,
}

impl Completion {
    pub fn good(transferred: usize) -> Self {
        Self {
            status: ScsiStatus::Good,
            sense: None,
            transferred,
            fua: false,
            error: None,
        }
    }

    pub fn check(sense: Sense) -> Self {
        Self {
            status: ScsiStatus::CheckCondition,
            sense: Some(sense),
            transferred: 0,
            fua: false,
            error: None,
        }
    }

    pub fn conflict() -> Self {
        Self {
            status: ScsiStatus::ReservationConflict,
            ..Self::good(0)
        }
    }

    /// Fixed-format sense data (18 bytes) when there is a sense condition.
    pub fn sense_data(&self) -> Option<[u8; sense::FIXED_SENSE_LEN]> {
        self.sense.map(|s| s.to_fixed())
    }

    fn from_result(r: Result<usize, Sense>) -> Self {
        match r {
            Ok(n) => Self::good(n),
            Err(s) => Self::check(s),
        }
    }
}

/// A logical unit a [`Target`] can hold.
pub trait LogicalUnit: Send + Sync {
    /// Executes a decoded command from `initiator`.
    fn execute_command(&self, initiator: InitiatorId, cmd: &Command, data: Data<'_>) -> Completion;

    /// Decodes and executes a CDB.
    fn execute(&self, initiator: InitiatorId, cdb: &[u8], data: Data<'_>) -> Completion {
        match Command::decode(cdb) {
            Ok(cmd) => self.execute_command(initiator, &cmd, data),
            Err(s) => Completion::check(s),
        }
    }
}

/// Big-endian u32 helper for response builders.
pub(crate) fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}
