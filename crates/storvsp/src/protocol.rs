//! The sans-I/O half of storvsp: a guest packet's payload parsed into a typed [`Request`],
//! the init handshake as a state machine ([`Handshake`]), and the completion packets, all
//! without channels, memory or disks, so it is unit-tested and fuzzed on bytes alone.

use hvdef::storvsp::{
    self as sp, operation, status, ChannelProperties, ProtocolVersion, ScsiRequest, VstorPacket,
};
use zerocopy::FromBytes;

/// The protocol versions accepted, newest first: the ones Linux 5.14+ proposes (6.2, 6.0,
/// 5.1). All of them use the 64-byte packet with the Windows 8 extension.
pub const VERSIONS: [u16; 3] = [sp::version::WIN10, sp::version::WIN8_1, sp::version::WIN8];

/// Why a packet could not be parsed. Each one still gets a completion (see
/// [`ParseError::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("packet of {0} bytes is shorter than a vstor_packet (64)")]
    Short(usize),
    #[error("unknown operation {0}")]
    UnknownOperation(u32),
    #[error("operation {0} is only sent by the host")]
    HostOnly(u32),
}

impl ParseError {
    /// The NT status the completion carries.
    pub fn status(&self) -> u32 {
        match self {
            ParseError::Short(_) => status::INVALID_PARAMETER,
            ParseError::UnknownOperation(_) | ParseError::HostOnly(_) => status::NOT_SUPPORTED,
        }
    }
}

/// One SRB as the guest sent it (the fields the VSP uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Srb {
    pub path_id: u8,
    pub target_id: u8,
    pub lun: u8,
    pub cdb: [u8; sp::CDB_LEN],
    /// As sent; [`Srb::cdb`] checks it.
    pub cdb_length: u8,
    /// [`sp::data_in`].
    pub data_in: u8,
    pub data_transfer_length: u32,
}

impl Srb {
    /// The CDB bytes, if `cdb_length` is 1..=16.
    pub fn cdb(&self) -> Option<&[u8]> {
        match self.cdb_length as usize {
            0 => None,
            n => self.cdb.get(..n),
        }
    }
}

/// A typed guest request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    BeginInit,
    EndInit,
    QueryVersion(u16),
    QueryProperties,
    ExecuteSrb(Srb),
    ResetLun,
    ResetAdapter,
    ResetBus,
    CreateSubChannels(u16),
    /// FCHBA_DATA: only Fibre Channel hosts answer it.
    FcHbaData,
}

/// Parses a guest packet's payload (after the VMBus descriptor and any GPA header). Bytes
/// after the 64-byte packet are ignored (the ring pads to 8 bytes).
pub fn parse(payload: &[u8]) -> Result<Request, ParseError> {
    let (p, _) =
        VstorPacket::read_from_prefix(payload).map_err(|_| ParseError::Short(payload.len()))?;
    Ok(match p.operation {
        operation::BEGIN_INITIALIZATION => Request::BeginInit,
        operation::END_INITIALIZATION => Request::EndInit,
        operation::QUERY_PROTOCOL_VERSION => Request::QueryVersion(p.version().major_minor),
        operation::QUERY_PROPERTIES => Request::QueryProperties,
        operation::EXECUTE_SRB => {
            let s = p.srb();
            let mut cdb = [0; sp::CDB_LEN];
            cdb.copy_from_slice(&s.cdb_or_sense[..sp::CDB_LEN]);
            Request::ExecuteSrb(Srb {
                path_id: s.path_id,
                target_id: s.target_id,
                lun: s.lun,
                cdb,
                cdb_length: s.cdb_length,
                data_in: s.data_in,
                data_transfer_length: s.data_transfer_length,
            })
        }
        operation::RESET_LUN => Request::ResetLun,
        operation::RESET_ADAPTER => Request::ResetAdapter,
        operation::RESET_BUS => Request::ResetBus,
        operation::CREATE_SUB_CHANNELS => Request::CreateSubChannels(p.sub_channel_count()),
        operation::FCHBA_DATA => Request::FcHbaData,
        op @ (operation::COMPLETE_IO | operation::REMOVE_DEVICE | operation::ENUMERATE_BUS) => {
            return Err(ParseError::HostOnly(op))
        }
        op => return Err(ParseError::UnknownOperation(op)),
    })
}

/// A completion with `status` and nothing else.
pub fn complete(status: u32) -> VstorPacket {
    VstorPacket::new(operation::COMPLETE_IO, status)
}

/// The outcome of one SRB, ready to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SrbResult {
    pub srb_status: u8,
    pub scsi_status: u8,
    /// Bytes actually moved (the guest computes the residual from it).
    pub data_transfer_length: u32,
    /// Fixed-format sense data, when `srb_status` has AUTOSENSE_VALID.
    pub sense: Option<[u8; scsi::sense::FIXED_SENSE_LEN]>,
}

impl SrbResult {
    /// An SRB refused before it reached the target (bad CDB length, bad data buffer).
    pub fn invalid_request() -> Self {
        Self {
            srb_status: sp::srb_status::INVALID_REQUEST,
            scsi_status: 0,
            data_transfer_length: 0,
            sense: None,
        }
    }

    /// The answer for an absent target or LUN, as storvsc expects it (it then forgets the
    /// LUN).
    pub fn invalid_lun() -> Self {
        Self {
            srb_status: sp::srb_status::INVALID_LUN,
            scsi_status: scsi::ScsiStatus::CheckCondition as u8,
            data_transfer_length: 0,
            sense: None,
        }
    }

    /// Maps the SCSI target's completion. `present` says whether the LUN exists (an absent
    /// LUN's CHECK CONDITION becomes SRB_STATUS_INVALID_LUN).
    pub fn from_scsi(c: &scsi::Completion, present: bool) -> Self {
        let transferred = u32::try_from(c.transferred).unwrap_or(u32::MAX);
        match c.status {
            scsi::ScsiStatus::Good => Self {
                srb_status: sp::srb_status::SUCCESS,
                scsi_status: 0,
                data_transfer_length: transferred,
                sense: None,
            },
            // Also a LUN removed between the worker's look-up and the command.
            scsi::ScsiStatus::CheckCondition
                if !present || c.sense == Some(scsi::Sense::lun_not_supported()) =>
            {
                Self::invalid_lun()
            }
            scsi::ScsiStatus::CheckCondition => match c.sense_data() {
                Some(sense) => Self {
                    srb_status: sp::srb_status::ERROR | sp::srb_status::AUTOSENSE_VALID,
                    scsi_status: scsi::ScsiStatus::CheckCondition as u8,
                    data_transfer_length: transferred,
                    sense: Some(sense),
                },
                None => Self {
                    srb_status: sp::srb_status::ERROR,
                    scsi_status: scsi::ScsiStatus::CheckCondition as u8,
                    data_transfer_length: transferred,
                    sense: None,
                },
            },
            // storvsc hands the SCSI status to the midlayer when the SRB succeeded, so a
            // RESERVATION CONFLICT reaches sd as such (an SRB error would become DID_ERROR).
            s => Self {
                srb_status: sp::srb_status::SUCCESS,
                scsi_status: s as u8,
                data_transfer_length: transferred,
                sense: None,
            },
        }
    }

    /// The completion packet: the request's SRB with the status fields, sense and length
    /// filled in (storvsc reads them from its own copy of the fields it sent otherwise).
    pub fn packet(&self, request: &Srb) -> VstorPacket {
        let mut srb = ScsiRequest {
            length: sp::SCSI_REQUEST_LEN,
            srb_status: self.srb_status,
            scsi_status: self.scsi_status,
            path_id: request.path_id,
            target_id: request.target_id,
            lun: request.lun,
            cdb_length: request.cdb_length,
            data_in: request.data_in,
            data_transfer_length: self.data_transfer_length,
            ..Default::default()
        };
        if let Some(sense) = &self.sense {
            srb.cdb_or_sense[..sense.len()].copy_from_slice(sense);
            srb.sense_info_length = sense.len() as u8;
        }
        let mut p = complete(status::SUCCESS);
        p.set_srb(&srb);
        p
    }
}

/// Where the init handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No BEGIN_INITIALIZATION yet.
    Start,
    /// BEGIN_INITIALIZATION seen.
    Initializing,
    /// END_INITIALIZATION seen: I/O is allowed.
    Ready,
}

/// The handshake's state, shared by the primary channel and its subchannels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Handshake {
    pub phase: Phase,
    /// The accepted protocol version.
    pub version: Option<u16>,
    /// Subchannels granted so far.
    pub subchannels: u16,
}

impl Default for Handshake {
    fn default() -> Self {
        Self {
            phase: Phase::Start,
            version: None,
            subchannels: 0,
        }
    }
}

/// What the device reports in QUERY_PROPERTIES.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Properties {
    pub max_transfer_bytes: u32,
    pub max_subchannels: u16,
}

/// The outcome of a control request.
#[derive(Debug, Clone, Copy)]
pub struct ControlResult {
    pub packet: VstorPacket,
    /// CREATE_SUB_CHANNELS: offer this many more subchannels.
    pub add_subchannels: u16,
}

impl Handshake {
    /// Whether EXECUTE_SRB is allowed.
    pub fn ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// Handles every request except EXECUTE_SRB. `primary` is whether it came on the
    /// primary channel (CREATE_SUB_CHANNELS is only valid there).
    pub fn control(&mut self, req: &Request, props: &Properties, primary: bool) -> ControlResult {
        let plain = |status| ControlResult {
            packet: complete(status),
            add_subchannels: 0,
        };
        match *req {
            Request::BeginInit => {
                // A guest that reloads its driver starts over; subchannels already offered
                // stay (the bus rescinds them when the primary closes).
                self.phase = Phase::Initializing;
                self.version = None;
                plain(status::SUCCESS)
            }
            Request::QueryVersion(v) => {
                if self.phase != Phase::Initializing {
                    return plain(status::INVALID_DEVICE_STATE);
                }
                if !VERSIONS.contains(&v) {
                    return plain(status::REVISION_MISMATCH);
                }
                self.version = Some(v);
                let mut p = complete(status::SUCCESS);
                p.set_version(&ProtocolVersion {
                    major_minor: v,
                    revision: 0,
                });
                ControlResult {
                    packet: p,
                    add_subchannels: 0,
                }
            }
            Request::QueryProperties => {
                if self.phase != Phase::Initializing || self.version.is_none() {
                    return plain(status::INVALID_DEVICE_STATE);
                }
                let mut p = complete(status::SUCCESS);
                p.set_properties(&ChannelProperties {
                    max_channel_cnt: props.max_subchannels,
                    flags: if props.max_subchannels > 0 {
                        sp::CHANNEL_SUPPORTS_MULTI_CHANNEL
                    } else {
                        0
                    },
                    max_transfer_bytes: props.max_transfer_bytes,
                    ..Default::default()
                });
                ControlResult {
                    packet: p,
                    add_subchannels: 0,
                }
            }
            Request::EndInit => {
                if self.phase != Phase::Initializing || self.version.is_none() {
                    return plain(status::INVALID_DEVICE_STATE);
                }
                self.phase = Phase::Ready;
                plain(status::SUCCESS)
            }
            Request::CreateSubChannels(n) => {
                if !primary || self.phase != Phase::Ready {
                    return plain(status::INVALID_DEVICE_STATE);
                }
                if n == 0 {
                    return plain(status::INVALID_PARAMETER);
                }
                let grant = n.min(props.max_subchannels.saturating_sub(self.subchannels));
                self.subchannels += grant;
                ControlResult {
                    packet: complete(status::SUCCESS),
                    add_subchannels: grant,
                }
            }
            // Requests run synchronously, so nothing is in flight to abort.
            Request::ResetLun | Request::ResetAdapter | Request::ResetBus => plain(status::SUCCESS),
            Request::FcHbaData => plain(status::NOT_SUPPORTED),
            Request::ExecuteSrb(_) => plain(status::INVALID_PARAMETER),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    const PROPS: Properties = Properties {
        max_transfer_bytes: 1 << 20,
        max_subchannels: 3,
    };

    fn pkt(op: u32) -> VstorPacket {
        let mut p = VstorPacket::new(op, 0);
        p.flags = sp::REQUEST_COMPLETION_FLAG;
        p
    }

    #[test]
    fn short_and_unknown_packets_are_typed_errors() {
        for len in [0, 4, 12, 63] {
            assert_eq!(parse(&vec![0; len]), Err(ParseError::Short(len)));
        }
        assert_eq!(
            parse(pkt(99).as_bytes()),
            Err(ParseError::UnknownOperation(99))
        );
        assert_eq!(
            parse(pkt(operation::COMPLETE_IO).as_bytes()),
            Err(ParseError::HostOnly(1))
        );
        assert_ne!(ParseError::Short(3).status(), 0);
    }

    #[test]
    fn handshake_accepts_linux_versions_and_declines_others() {
        for v in VERSIONS {
            let mut h = Handshake::default();
            assert_eq!(
                { h.control(&Request::BeginInit, &PROPS, true).packet.status },
                0
            );
            for bad in [0x0402, 0x0601, 0xffff] {
                let r = h.control(&Request::QueryVersion(bad), &PROPS, true).packet;
                assert_eq!(
                    ({ r.operation }, { r.status }),
                    (1, status::REVISION_MISMATCH)
                );
            }
            let r = h.control(&Request::QueryVersion(v), &PROPS, true).packet;
            assert_eq!(({ r.status }, { r.version().major_minor }), (0, v));
            let r = h.control(&Request::QueryProperties, &PROPS, true).packet;
            let p = r.properties();
            assert_eq!(
                ({ p.max_transfer_bytes }, { p.max_channel_cnt }, { p.flags }),
                (1 << 20, 3, 1)
            );
            assert!(!h.ready());
            assert_eq!(
                { h.control(&Request::EndInit, &PROPS, true).packet.status },
                0
            );
            assert!(h.ready());
        }
    }

    #[test]
    fn out_of_order_steps_fail_and_subchannels_are_capped() {
        let mut h = Handshake::default();
        for r in [
            Request::QueryVersion(0x602),
            Request::QueryProperties,
            Request::EndInit,
        ] {
            assert_eq!(
                { h.control(&r, &PROPS, true).packet.status },
                status::INVALID_DEVICE_STATE
            );
        }
        assert_ne!(
            {
                h.control(&Request::CreateSubChannels(2), &PROPS, true)
                    .packet
                    .status
            },
            0
        );
        h.control(&Request::BeginInit, &PROPS, true);
        h.control(&Request::QueryVersion(0x602), &PROPS, true);
        h.control(&Request::EndInit, &PROPS, true);
        assert_ne!(
            {
                h.control(&Request::CreateSubChannels(2), &PROPS, false)
                    .packet
                    .status
            },
            0
        );
        let r = h.control(&Request::CreateSubChannels(2), &PROPS, true);
        assert_eq!(({ r.packet.status }, r.add_subchannels), (0, 2));
        let r = h.control(&Request::CreateSubChannels(64), &PROPS, true);
        assert_eq!(({ r.packet.status }, r.add_subchannels), (0, 1));
        assert_eq!(h.subchannels, 3);
    }

    #[test]
    fn srb_fields_round_trip_and_results_map() {
        let mut p = pkt(operation::EXECUTE_SRB);
        let mut s = ScsiRequest {
            length: 0x34,
            lun: 3,
            cdb_length: 10,
            data_in: 1,
            data_transfer_length: 4096,
            sense_info_length: 0x14,
            ..Default::default()
        };
        s.cdb_or_sense[0] = 0x28;
        p.set_srb(&s);
        let Request::ExecuteSrb(srb) = parse(p.as_bytes()).unwrap() else {
            panic!("not an SRB")
        };
        assert_eq!((srb.lun, srb.data_transfer_length), (3, 4096));
        assert_eq!(srb.cdb().unwrap()[0], 0x28);
        assert_eq!(srb.cdb().unwrap().len(), 10);
        let mut bad = srb;
        bad.cdb_length = 17;
        assert!(bad.cdb().is_none());
        bad.cdb_length = 0;
        assert!(bad.cdb().is_none());

        let c = scsi::Completion::check(scsi::Sense::invalid_opcode());
        let r = SrbResult::from_scsi(&c, true);
        assert_eq!((r.srb_status, r.scsi_status), (0x84, 2));
        let out = r.packet(&srb).srb();
        assert_eq!(out.sense_info_length, 18);
        assert_eq!(out.cdb_or_sense[0], 0x70);
        assert_eq!(out.cdb_or_sense[2] & 0xf, 5);
        assert_eq!(SrbResult::from_scsi(&c, false).srb_status, 0x20);
        let g = SrbResult::from_scsi(&scsi::Completion::good(512), true);
        assert_eq!((g.srb_status, g.data_transfer_length), (1, 512));
    }
}
