//! SCSI status codes and fixed-format sense data (SPC-4 4.5.3).

/// The SCSI status byte of a completed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ScsiStatus {
    Good = 0x00,
    CheckCondition = 0x02,
    ReservationConflict = 0x18,
}

/// Sense keys (SPC-4 table 48) this crate reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    AbortedCommand = 0xB,
    Miscompare = 0xE,
}

/// Additional sense codes (ASC, ASCQ) this crate reports.
pub mod asc {
    pub const NO_ADDITIONAL: (u8, u8) = (0x00, 0x00);
    pub const WRITE_ERROR: (u8, u8) = (0x0C, 0x00);
    pub const UNRECOVERED_READ_ERROR: (u8, u8) = (0x11, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: (u8, u8) = (0x1A, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: (u8, u8) = (0x1D, 0x00);
    pub const INVALID_COMMAND_OPERATION_CODE: (u8, u8) = (0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: (u8, u8) = (0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: (u8, u8) = (0x24, 0x00);
    pub const LOGICAL_UNIT_NOT_SUPPORTED: (u8, u8) = (0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: (u8, u8) = (0x26, 0x00);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: (u8, u8) = (0x26, 0x04);
    pub const WRITE_PROTECTED: (u8, u8) = (0x27, 0x00);
    pub const NOT_READY_TO_READY_CHANGE: (u8, u8) = (0x28, 0x00);
    pub const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x03);
    pub const RESERVATIONS_RELEASED: (u8, u8) = (0x2A, 0x04);
    pub const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2A, 0x05);
    pub const CAPACITY_DATA_HAS_CHANGED: (u8, u8) = (0x2A, 0x09);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: (u8, u8) = (0x39, 0x00);
    pub const MEDIUM_NOT_PRESENT: (u8, u8) = (0x3A, 0x00);
    pub const MEDIUM_REMOVAL_PREVENTED: (u8, u8) = (0x53, 0x02);
}

/// Length of the fixed-format sense data this crate produces.
pub const FIXED_SENSE_LEN: usize = 18;

/// Points at the byte (and optionally the bit) of the CDB or parameter list that was wrong
/// (the sense-key specific field of an ILLEGAL REQUEST, SPC-4 4.5.2.4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldPointer {
    /// `true` for a CDB field, `false` for a parameter-list field.
    pub in_cdb: bool,
    pub byte: u16,
    pub bit: Option<u8>,
}

/// One sense condition: key, ASC/ASCQ, and the optional information and field-pointer fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (the failing LBA for medium errors). Fixed-format sense has four
    /// bytes for it: a value above `u32::MAX` is carried here but sent with VALID = 0.
    pub information: Option<u64>,
    pub field: Option<FieldPointer>,
}

impl Sense {
    pub const fn new(key: SenseKey, code: (u8, u8)) -> Self {
        Self {
            key,
            asc: code.0,
            ascq: code.1,
            information: None,
            field: None,
        }
    }

    pub const fn no_sense() -> Self {
        Self::new(SenseKey::NoSense, asc::NO_ADDITIONAL)
    }

    pub const fn invalid_opcode() -> Self {
        Self::new(
            SenseKey::IllegalRequest,
            asc::INVALID_COMMAND_OPERATION_CODE,
        )
        .in_cdb(0, None)
    }

    /// INVALID FIELD IN CDB, pointing at `byte` (and `bit`) of the CDB.
    pub const fn invalid_cdb_field(byte: u16, bit: Option<u8>) -> Self {
        Self::new(SenseKey::IllegalRequest, asc::INVALID_FIELD_IN_CDB).in_cdb(byte, bit)
    }

    /// INVALID FIELD IN PARAMETER LIST, pointing at `byte` of the parameter list.
    pub const fn invalid_param_field(byte: u16) -> Self {
        let mut s = Self::new(
            SenseKey::IllegalRequest,
            asc::INVALID_FIELD_IN_PARAMETER_LIST,
        );
        s.field = Some(FieldPointer {
            in_cdb: false,
            byte,
            bit: None,
        });
        s
    }

    pub const fn parameter_list_length_error() -> Self {
        Self::new(SenseKey::IllegalRequest, asc::PARAMETER_LIST_LENGTH_ERROR)
    }

    pub const fn lba_out_of_range() -> Self {
        Self::new(SenseKey::IllegalRequest, asc::LBA_OUT_OF_RANGE)
    }

    pub const fn lun_not_supported() -> Self {
        Self::new(SenseKey::IllegalRequest, asc::LOGICAL_UNIT_NOT_SUPPORTED)
    }

    pub const fn write_protected() -> Self {
        Self::new(SenseKey::DataProtect, asc::WRITE_PROTECTED)
    }

    pub const fn medium_not_present() -> Self {
        Self::new(SenseKey::NotReady, asc::MEDIUM_NOT_PRESENT)
    }

    pub const fn medium_changed() -> Self {
        Self::new(SenseKey::UnitAttention, asc::NOT_READY_TO_READY_CHANGE)
    }

    pub const fn capacity_changed() -> Self {
        Self::new(SenseKey::UnitAttention, asc::CAPACITY_DATA_HAS_CHANGED)
    }

    pub const fn saving_not_supported() -> Self {
        Self::new(
            SenseKey::IllegalRequest,
            asc::SAVING_PARAMETERS_NOT_SUPPORTED,
        )
        .in_cdb(2, Some(7))
    }

    pub const fn removal_prevented() -> Self {
        Self::new(SenseKey::IllegalRequest, asc::MEDIUM_REMOVAL_PREVENTED)
    }

    pub const fn invalid_release() -> Self {
        Self::new(
            SenseKey::IllegalRequest,
            asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
        )
    }

    /// A MEDIUM ERROR at `lba` (`write` selects WRITE ERROR over UNRECOVERED READ ERROR).
    pub const fn medium_error(lba: u64, write: bool) -> Self {
        let code = if write {
            asc::WRITE_ERROR
        } else {
            asc::UNRECOVERED_READ_ERROR
        };
        Self::new(SenseKey::MediumError, code).with_information(lba)
    }

    /// MISCOMPARE DURING VERIFY OPERATION; `offset` is the byte offset of the first
    /// difference within the data-out buffer.
    pub const fn miscompare(offset: u64) -> Self {
        Self::new(SenseKey::Miscompare, asc::MISCOMPARE_DURING_VERIFY).with_information(offset)
    }

    pub const fn with_information(mut self, information: u64) -> Self {
        self.information = Some(information);
        self
    }

    const fn in_cdb(mut self, byte: u16, bit: Option<u8>) -> Self {
        self.field = Some(FieldPointer {
            in_cdb: true,
            byte,
            bit,
        });
        self
    }

    /// The (key, ASC, ASCQ) triple.
    pub fn triple(&self) -> (u8, u8, u8) {
        (self.key as u8, self.asc, self.ascq)
    }

    /// Fixed-format sense data, response code 70h (current error), 18 bytes.
    pub fn to_fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = 0x70;
        b[2] = self.key as u8;
        if let Some(info) = self.information {
            if let Ok(info) = u32::try_from(info) {
                b[0] |= 0x80; // VALID
                b[3..7].copy_from_slice(&info.to_be_bytes());
            }
        }
        b[7] = (FIXED_SENSE_LEN - 8) as u8; // additional sense length
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(f) = self.field {
            b[15] = 0x80; // SKSV
            if f.in_cdb {
                b[15] |= 0x40; // C/D
            }
            if let Some(bit) = f.bit {
                b[15] |= 0x08 | (bit & 7); // BPV + bit pointer
            }
            b[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_invalid_opcode() {
        let b = Sense::invalid_opcode().to_fixed();
        assert_eq!(
            b,
            [0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0xC0, 0, 0]
        );
    }

    #[test]
    fn fixed_format_medium_error_carries_lba() {
        let b = Sense::medium_error(0x1234_5678, false).to_fixed();
        assert_eq!(b[0], 0xF0);
        assert_eq!(b[2], 3);
        assert_eq!(&b[3..7], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!((b[12], b[13]), (0x11, 0));
        let w = Sense::medium_error(7, true).to_fixed();
        assert_eq!((w[12], w[13]), (0x0C, 0));
    }

    #[test]
    fn information_too_large_clears_valid() {
        let b = Sense::medium_error(1 << 40, true).to_fixed();
        assert_eq!(b[0], 0x70);
        assert_eq!(&b[3..7], &[0, 0, 0, 0]);
    }

    #[test]
    fn field_pointer_with_bit() {
        let b = Sense::invalid_cdb_field(1, Some(3)).to_fixed();
        assert_eq!(b[15], 0x80 | 0x40 | 0x08 | 3);
        assert_eq!(&b[16..18], &[0, 1]);
        let p = Sense::invalid_param_field(0x123).to_fixed();
        assert_eq!(p[15], 0x80);
        assert_eq!(&p[16..18], &[0x01, 0x23]);
        assert_eq!((p[12], p[13]), (0x26, 0));
    }
}
