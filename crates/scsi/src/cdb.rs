//! CDB decoding: bytes from the guest to a typed, validated [`Command`].
//!
//! Decoding looks at the CDB alone (no device state), so it can be fuzzed on its own. Fields a
//! target needs its state for (LBA ranges, medium presence, reservation rules) are checked when
//! the command is executed.

use crate::sense::Sense;

/// The page-control field of MODE SENSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageControl {
    Current,
    Changeable,
    Default,
    Saved,
}

/// PERSISTENT RESERVE IN service actions this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrInAction {
    ReadKeys,
    ReadReservation,
    ReportCapabilities,
}

/// PERSISTENT RESERVE OUT service actions this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrOutAction {
    Register,
    Reserve,
    Release,
    Clear,
    Preempt,
    PreemptAndAbort,
    RegisterAndIgnore,
}

/// A decoded CDB. Lengths are as the CDB gives them (`alloc` = allocation length in bytes,
/// `len` = parameter list length in bytes, `blocks` = transfer length in logical blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ReportLuns {
        select: u8,
        alloc: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: PageControl,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    ModeSelect {
        ten: bool,
        pf: bool,
        sp: bool,
        len: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// VERIFY 10/16; `bytchk` compares the data-out buffer with the medium.
    Verify {
        lba: u64,
        blocks: u32,
        bytchk: bool,
    },
    /// SYNCHRONIZE CACHE 10/16; `blocks` = 0 means "to the end of the medium".
    SyncCache {
        lba: u64,
        blocks: u32,
    },
    WriteSame16 {
        lba: u64,
        blocks: u32,
        unmap: bool,
    },
    Unmap {
        len: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    StartStop {
        start: bool,
        loej: bool,
        power: u8,
    },
    PreventAllow {
        prevent: bool,
    },
    PersistentReserveIn {
        action: PrInAction,
        alloc: u32,
    },
    PersistentReserveOut {
        action: PrOutAction,
        scope: u8,
        ty: u8,
        len: u32,
    },
    GetConfiguration {
        rt: u8,
        start: u16,
        alloc: u32,
    },
    GetEventStatus {
        classes: u8,
        alloc: u32,
    },
    ReadToc {
        msf: bool,
        format: u8,
        track: u8,
        alloc: u32,
    },
    ReadDiscInformation {
        alloc: u32,
    },
}

/// Operation codes.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const VERIFY_10: u8 = 0x2F;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const UNMAP: u8 = 0x42;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS: u8 = 0x4A;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5E;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5F;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8A;
    pub const VERIFY_16: u8 = 0x8F;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;

    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
}

/// The CDB length of an operation code's group (SPC-4 4.2.5.1), `None` for the groups with
/// variable or vendor-specific lengths.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Whether this crate decodes `opcode` at all.
fn known(opcode: u8) -> bool {
    use op::*;
    matches!(
        opcode,
        TEST_UNIT_READY
            | REQUEST_SENSE
            | READ_6
            | WRITE_6
            | INQUIRY
            | MODE_SELECT_6
            | MODE_SENSE_6
            | START_STOP_UNIT
            | PREVENT_ALLOW
            | READ_CAPACITY_10
            | READ_10
            | WRITE_10
            | VERIFY_10
            | SYNCHRONIZE_CACHE_10
            | UNMAP
            | READ_TOC
            | GET_CONFIGURATION
            | GET_EVENT_STATUS
            | READ_DISC_INFORMATION
            | MODE_SELECT_10
            | MODE_SENSE_10
            | PERSISTENT_RESERVE_IN
            | PERSISTENT_RESERVE_OUT
            | READ_16
            | WRITE_16
            | VERIFY_16
            | SYNCHRONIZE_CACHE_16
            | WRITE_SAME_16
            | SERVICE_ACTION_IN_16
            | REPORT_LUNS
            | READ_12
            | WRITE_12
    )
}

/// Bounds-checked big-endian field reads; bytes past the end read as zero (never reached after
/// the length check, but keeps decoding panic-free by construction).
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn b(&self, i: usize) -> u8 {
        self.0.get(i).copied().unwrap_or(0)
    }
    fn bit(&self, i: usize, bit: u8) -> bool {
        self.b(i) & (1 << bit) != 0
    }
    fn be(&self, i: usize, n: usize) -> u64 {
        (i..i + n).fold(0, |acc, j| (acc << 8) | u64::from(self.b(j)))
    }
    fn be16(&self, i: usize) -> u32 {
        self.be(i, 2) as u32
    }
    fn be32(&self, i: usize) -> u32 {
        self.be(i, 4) as u32
    }
    fn be64(&self, i: usize) -> u64 {
        self.be(i, 8)
    }
}

impl Command {
    /// Decodes a CDB. `cdb` may be longer than the operation code's CDB length (storvsc sends
    /// 16-byte buffers); a shorter one is refused with INVALID FIELD IN CDB.
    pub fn decode(cdb: &[u8]) -> Result<Self, Sense> {
        use op::*;
        let Some(&opcode) = cdb.first() else {
            return Err(Sense::invalid_opcode());
        };
        if !known(opcode) {
            return Err(Sense::invalid_opcode());
        }
        let len = cdb_len(opcode).ok_or_else(Sense::invalid_opcode)?;
        if cdb.len() < len {
            return Err(Sense::invalid_cdb_field(cdb.len() as u16, None));
        }
        let c = Bytes(&cdb[..len]);
        // CONTROL byte: NACA is not supported (SAM-5 5.2).
        if c.bit(len - 1, 2) {
            return Err(Sense::invalid_cdb_field(len as u16 - 1, Some(2)));
        }
        let protect = |c: &Bytes| {
            if c.b(1) & 0xE0 != 0 {
                Err(Sense::invalid_cdb_field(1, Some(7)))
            } else {
                Ok(())
            }
        };
        let cmd = match opcode {
            TEST_UNIT_READY => Self::TestUnitReady,
            REQUEST_SENSE => Self::RequestSense {
                desc: c.bit(1, 0),
                alloc: c.b(4).into(),
            },
            INQUIRY => {
                if c.bit(1, 1) {
                    return Err(Sense::invalid_cdb_field(1, Some(1))); // CMDDT
                }
                let evpd = c.bit(1, 0);
                if !evpd && c.b(2) != 0 {
                    return Err(Sense::invalid_cdb_field(2, None));
                }
                Self::Inquiry {
                    evpd,
                    page: c.b(2),
                    alloc: c.be16(3),
                }
            }
            REPORT_LUNS => Self::ReportLuns {
                select: c.b(2),
                alloc: c.be32(6),
            },
            READ_CAPACITY_10 => Self::ReadCapacity10,
            SERVICE_ACTION_IN_16 => match c.b(1) & 0x1F {
                SA_READ_CAPACITY_16 => Self::ReadCapacity16 { alloc: c.be32(10) },
                SA_GET_LBA_STATUS => Self::GetLbaStatus {
                    lba: c.be64(2),
                    alloc: c.be32(10),
                },
                _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
            },
            MODE_SENSE_6 | MODE_SENSE_10 => {
                let ten = opcode == MODE_SENSE_10;
                Self::ModeSense {
                    ten,
                    dbd: c.bit(1, 3),
                    llbaa: ten && c.bit(1, 4),
                    pc: match c.b(2) >> 6 {
                        0 => PageControl::Current,
                        1 => PageControl::Changeable,
                        2 => PageControl::Default,
                        _ => PageControl::Saved,
                    },
                    page: c.b(2) & 0x3F,
                    subpage: c.b(3),
                    alloc: if ten { c.be16(7) } else { c.b(4).into() },
                }
            }
            MODE_SELECT_6 | MODE_SELECT_10 => {
                let ten = opcode == MODE_SELECT_10;
                Self::ModeSelect {
                    ten,
                    pf: c.bit(1, 4),
                    sp: c.bit(1, 0),
                    len: if ten { c.be16(7) } else { c.b(4).into() },
                }
            }
            READ_6 | WRITE_6 => {
                let lba = c.be(1, 3) & 0x1F_FFFF;
                let blocks = match c.b(4) {
                    0 => 256,
                    n => n.into(),
                };
                if opcode == READ_6 {
                    Self::Read {
                        lba,
                        blocks,
                        fua: false,
                    }
                } else {
                    Self::Write {
                        lba,
                        blocks,
                        fua: false,
                    }
                }
            }
            READ_10 | READ_12 | READ_16 | WRITE_10 | WRITE_12 | WRITE_16 => {
                protect(&c)?;
                let (lba, blocks) = match opcode {
                    READ_10 | WRITE_10 => (c.be32(2).into(), c.be16(7)),
                    READ_12 | WRITE_12 => (c.be32(2).into(), c.be32(6)),
                    _ => (c.be64(2), c.be32(10)),
                };
                let fua = c.bit(1, 3);
                if matches!(opcode, READ_10 | READ_12 | READ_16) {
                    Self::Read { lba, blocks, fua }
                } else {
                    Self::Write { lba, blocks, fua }
                }
            }
            VERIFY_10 | VERIFY_16 => {
                protect(&c)?;
                let bytchk = match (c.b(1) >> 1) & 3 {
                    0 => false,
                    1 => true,
                    _ => return Err(Sense::invalid_cdb_field(1, Some(2))),
                };
                let (lba, blocks) = if opcode == VERIFY_10 {
                    (c.be32(2).into(), c.be16(7))
                } else {
                    (c.be64(2), c.be32(10))
                };
                Self::Verify {
                    lba,
                    blocks,
                    bytchk,
                }
            }
            SYNCHRONIZE_CACHE_10 => Self::SyncCache {
                lba: c.be32(2).into(),
                blocks: c.be16(7),
            },
            SYNCHRONIZE_CACHE_16 => Self::SyncCache {
                lba: c.be64(2),
                blocks: c.be32(10),
            },
            WRITE_SAME_16 => {
                protect(&c)?;
                if c.bit(1, 4) {
                    return Err(Sense::invalid_cdb_field(1, Some(4))); // ANCHOR
                }
                if c.bit(1, 0) {
                    return Err(Sense::invalid_cdb_field(1, Some(0))); // NDOB
                }
                Self::WriteSame16 {
                    lba: c.be64(2),
                    blocks: c.be32(10),
                    unmap: c.bit(1, 3),
                }
            }
            UNMAP => {
                if c.bit(1, 0) {
                    return Err(Sense::invalid_cdb_field(1, Some(0))); // ANCHOR
                }
                Self::Unmap { len: c.be16(7) }
            }
            START_STOP_UNIT => Self::StartStop {
                start: c.bit(4, 0),
                loej: c.bit(4, 1),
                power: c.b(4) >> 4,
            },
            PREVENT_ALLOW => Self::PreventAllow {
                prevent: c.bit(4, 0),
            },
            PERSISTENT_RESERVE_IN => Self::PersistentReserveIn {
                action: match c.b(1) & 0x1F {
                    0 => PrInAction::ReadKeys,
                    1 => PrInAction::ReadReservation,
                    2 => PrInAction::ReportCapabilities,
                    _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
                },
                alloc: c.be16(7),
            },
            PERSISTENT_RESERVE_OUT => Self::PersistentReserveOut {
                action: match c.b(1) & 0x1F {
                    0 => PrOutAction::Register,
                    1 => PrOutAction::Reserve,
                    2 => PrOutAction::Release,
                    3 => PrOutAction::Clear,
                    4 => PrOutAction::Preempt,
                    5 => PrOutAction::PreemptAndAbort,
                    6 => PrOutAction::RegisterAndIgnore,
                    _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
                },
                scope: c.b(2) >> 4,
                ty: c.b(2) & 0x0F,
                len: c.be32(5),
            },
            GET_CONFIGURATION => {
                let rt = c.b(1) & 3;
                if rt == 3 {
                    return Err(Sense::invalid_cdb_field(1, Some(1)));
                }
                Self::GetConfiguration {
                    rt,
                    start: c.be16(2) as u16,
                    alloc: c.be16(7),
                }
            }
            GET_EVENT_STATUS => {
                if !c.bit(1, 0) {
                    return Err(Sense::invalid_cdb_field(1, Some(0))); // asynchronous
                }
                Self::GetEventStatus {
                    classes: c.b(4),
                    alloc: c.be16(7),
                }
            }
            READ_TOC => {
                // MMC moved the format from byte 9 (bits 7-6) to byte 2; Linux's sr still uses
                // the old place for the multisession query.
                let format = match c.b(2) & 0x0F {
                    0 => c.b(9) >> 6,
                    f => f,
                };
                Self::ReadToc {
                    msf: c.bit(1, 1),
                    format,
                    track: c.b(6),
                    alloc: c.be16(7),
                }
            }
            READ_DISC_INFORMATION => {
                if c.b(1) & 7 != 0 {
                    return Err(Sense::invalid_cdb_field(1, Some(2)));
                }
                Self::ReadDiscInformation { alloc: c.be16(7) }
            }
            _ => return Err(Sense::invalid_opcode()),
        };
        Ok(cmd)
    }

    /// Whether this command may run while a unit attention is pending, without reporting or
    /// clearing it (SPC-4 5.14; MMC-6 for the event and configuration queries).
    pub fn ignores_unit_attention(&self) -> bool {
        matches!(
            self,
            Self::Inquiry { .. }
                | Self::ReportLuns { .. }
                | Self::RequestSense { .. }
                | Self::GetConfiguration { .. }
                | Self::GetEventStatus { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::{asc, SenseKey};

    #[test]
    fn read10_fields() {
        let cdb = [0x28, 0x08, 0, 0, 0x12, 0x34, 0, 0x01, 0x00, 0];
        assert_eq!(
            Command::decode(&cdb),
            Ok(Command::Read {
                lba: 0x1234,
                blocks: 256,
                fua: true
            })
        );
    }

    #[test]
    fn read16_and_write12() {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x88;
        cdb[2..10].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        cdb[10..14].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            Command::decode(&cdb),
            Ok(Command::Read {
                lba: 0x0102_0304_0506_0708,
                blocks: 9,
                fua: false
            })
        );
        let cdb = [0xAA, 0, 0, 0, 0, 5, 0, 0, 1, 0, 0, 0];
        assert_eq!(
            Command::decode(&cdb),
            Ok(Command::Write {
                lba: 5,
                blocks: 0x100,
                fua: false
            })
        );
    }

    #[test]
    fn read6_zero_means_256_and_lba_is_21_bits() {
        let cdb = [0x08, 0xFF, 0xFF, 0xFF, 0, 0];
        assert_eq!(
            Command::decode(&cdb),
            Ok(Command::Read {
                lba: 0x1F_FFFF,
                blocks: 256,
                fua: false
            })
        );
    }

    #[test]
    fn short_and_empty_cdbs() {
        assert_eq!(Command::decode(&[]), Err(Sense::invalid_opcode()));
        let e = Command::decode(&[0x28, 0, 0]).unwrap_err();
        assert_eq!(
            (e.key, e.asc, e.ascq),
            (SenseKey::IllegalRequest, asc::INVALID_FIELD_IN_CDB.0, 0)
        );
        let e = Command::decode(&[0x88; 15]).unwrap_err();
        assert_eq!(e.asc, 0x24);
    }

    #[test]
    fn unknown_opcode_and_service_action() {
        assert_eq!(Command::decode(&[0xA3; 12]), Err(Sense::invalid_opcode()));
        assert_eq!(Command::decode(&[0xFF; 16]), Err(Sense::invalid_opcode()));
        let mut cdb = [0u8; 16];
        cdb[0] = 0x9E;
        cdb[1] = 0x11;
        assert_eq!(Command::decode(&cdb).unwrap_err().asc, 0x24);
    }

    #[test]
    fn naca_and_protect_refused() {
        let e = Command::decode(&[0x00, 0, 0, 0, 0, 0x04]).unwrap_err();
        assert_eq!(e.asc, 0x24);
        assert_eq!(e.field.unwrap().byte, 5);
        let e = Command::decode(&[0x2A, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap_err();
        assert_eq!(e.asc, 0x24);
    }

    #[test]
    fn inquiry_page_without_evpd_refused() {
        assert_eq!(
            Command::decode(&[0x12, 0, 0x80, 0, 0xFF, 0])
                .unwrap_err()
                .asc,
            0x24
        );
        assert_eq!(
            Command::decode(&[0x12, 1, 0x80, 0x01, 0x00, 0]),
            Ok(Command::Inquiry {
                evpd: true,
                page: 0x80,
                alloc: 256
            })
        );
    }

    #[test]
    fn read_toc_old_format_field() {
        let cdb = [0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0x40];
        assert_eq!(
            Command::decode(&cdb),
            Ok(Command::ReadToc {
                msf: false,
                format: 1,
                track: 0,
                alloc: 12
            })
        );
    }

    #[test]
    fn gesn_must_be_polled() {
        assert_eq!(
            Command::decode(&[0x4A, 0, 0, 0, 0x10, 0, 0, 0, 8, 0])
                .unwrap_err()
                .asc,
            0x24
        );
    }
}
