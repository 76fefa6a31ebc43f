//! The sans-I/O NVSP half: a guest message parsed into a typed [`Request`], the version
//! negotiation, and the messages the host sends back, all on bytes alone.

use hvdef::netvsp::{self as nv, msg, status, version, MESSAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The versions accepted, newest first: every one Linux 6.1 tries.
pub const VERSIONS: [u32; 6] = [
    version::V61,
    version::V6,
    version::V5,
    version::V4,
    version::V2,
    version::V1,
];

/// A typed guest message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Init {
        min: u32,
        max: u32,
    },
    NdisVersion {
        major: u32,
        minor: u32,
    },
    NdisConfig {
        mtu: u32,
        capabilities: u64,
    },
    ReceiveBuffer {
        gpadl: u32,
        id: u16,
    },
    SendBuffer {
        gpadl: u32,
        id: u16,
    },
    RevokeReceiveBuffer {
        id: u16,
    },
    RevokeSendBuffer {
        id: u16,
    },
    RndisPacket(nv::RndisPacket),
    /// The guest completing one of the host's RNDIS packets (sent as a completion packet).
    RndisPacketComplete {
        status: u32,
    },
    Subchannel {
        op: u32,
        count: u32,
    },
    SwitchDataPath {
        datapath: u32,
    },
}

/// Why a message could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message of {len} bytes is too short for type {msg_type}")]
    Short { msg_type: u32, len: usize },
    #[error("unknown or unsupported message type {0}")]
    Unknown(u32),
}

impl ParseError {
    /// The message type the answer should carry.
    pub fn msg_type(&self) -> u32 {
        match *self {
            ParseError::Short { msg_type, .. } | ParseError::Unknown(msg_type) => msg_type,
        }
    }
}

fn body<T: FromBytes>(p: &[u8], msg_type: u32) -> Result<T, ParseError> {
    T::read_from_prefix(p.get(4..).unwrap_or(&[]))
        .map(|(t, _)| t)
        .map_err(|_| ParseError::Short {
            msg_type,
            len: p.len(),
        })
}

/// Parses one guest message (an in-band packet's payload, or a completion's).
pub fn parse(p: &[u8]) -> Result<Request, ParseError> {
    let (h, _) = nv::Header::read_from_prefix(p).map_err(|_| ParseError::Short {
        msg_type: 0,
        len: p.len(),
    })?;
    let t = h.msg_type;
    Ok(match t {
        msg::INIT => {
            let b: nv::Init = body(p, t)?;
            Request::Init {
                min: b.min_version,
                max: b.max_version,
            }
        }
        msg::SEND_NDIS_VERSION => {
            let b: nv::NdisVersion = body(p, t)?;
            Request::NdisVersion {
                major: b.major,
                minor: b.minor,
            }
        }
        msg::SEND_NDIS_CONFIG => {
            let b: nv::NdisConfig = body(p, t)?;
            Request::NdisConfig {
                mtu: b.mtu,
                capabilities: b.capabilities,
            }
        }
        msg::SEND_RECEIVE_BUFFER => {
            let b: nv::SendBuffer = body(p, t)?;
            Request::ReceiveBuffer {
                gpadl: b.gpadl,
                id: b.id,
            }
        }
        msg::SEND_SEND_BUFFER => {
            let b: nv::SendBuffer = body(p, t)?;
            Request::SendBuffer {
                gpadl: b.gpadl,
                id: b.id,
            }
        }
        msg::REVOKE_RECEIVE_BUFFER => Request::RevokeReceiveBuffer {
            id: body::<nv::RevokeBuffer>(p, t)?.id,
        },
        msg::REVOKE_SEND_BUFFER => Request::RevokeSendBuffer {
            id: body::<nv::RevokeBuffer>(p, t)?.id,
        },
        msg::SEND_RNDIS_PACKET => Request::RndisPacket(body(p, t)?),
        msg::SEND_RNDIS_PACKET_COMPLETE => Request::RndisPacketComplete {
            status: body::<nv::RndisPacketComplete>(p, t)?.status,
        },
        msg::SUBCHANNEL => {
            let b: nv::SubchannelRequest = body(p, t)?;
            Request::Subchannel {
                op: b.op,
                count: b.count,
            }
        }
        msg::SWITCH_DATA_PATH => Request::SwitchDataPath {
            datapath: body::<u32>(p, t)?,
        },
        t => return Err(ParseError::Unknown(t)),
    })
}

/// A host message of [`MESSAGE_SIZE`] bytes: type, then `body`, zero padded.
pub fn message<T: IntoBytes + Immutable>(msg_type: u32, body: &T) -> [u8; MESSAGE_SIZE] {
    let mut m = [0u8; MESSAGE_SIZE];
    m[..4].copy_from_slice(&msg_type.to_le_bytes());
    let b = body.as_bytes();
    let n = b.len().min(MESSAGE_SIZE - 4);
    m[4..4 + n].copy_from_slice(&b[..n]);
    m
}

/// The answer to a message the host does not handle: its own type with FAIL.
pub fn failure(msg_type: u32) -> [u8; MESSAGE_SIZE] {
    message(msg_type, &status::FAIL)
}

/// Picks the version for INIT {min, max}: the newest supported one in the range.
pub fn negotiate(min: u32, max: u32) -> Option<u32> {
    VERSIONS.into_iter().find(|&v| v >= min && v <= max)
}

/// INIT_COMPLETE.
pub fn init_complete(v: Option<u32>) -> [u8; MESSAGE_SIZE] {
    message(
        msg::INIT_COMPLETE,
        &nv::InitComplete {
            negotiated_version: v.unwrap_or(0),
            max_mdl_chain_len: 34,
            status: if v.is_some() {
                status::SUCCESS
            } else {
                status::FAIL
            },
        },
    )
}

/// The completion of a guest RNDIS packet.
pub fn rndis_complete(st: u32) -> [u8; MESSAGE_SIZE] {
    message(
        msg::SEND_RNDIS_PACKET_COMPLETE,
        &nv::RndisPacketComplete { status: st },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_linux_version_and_nothing_else() {
        for v in VERSIONS {
            assert_eq!(negotiate(v, v), Some(v));
        }
        assert_eq!(negotiate(0x70000, 0x70000), None);
        assert_eq!(negotiate(3, 3), None);
        assert_eq!(negotiate(2, 0x60001), Some(version::V61));
        assert_eq!(negotiate(5, 4), None);
    }

    #[test]
    fn short_and_unknown_messages() {
        assert_eq!(
            parse(&[1, 0, 0, 0, 2, 0]),
            Err(ParseError::Short {
                msg_type: 1,
                len: 6
            })
        );
        assert_eq!(parse(&[1, 0]).unwrap_err().msg_type(), 0);
        let m = message(999, &0u32);
        assert_eq!(parse(&m), Err(ParseError::Unknown(999)));
        let m = message(
            msg::SEND_RECEIVE_BUFFER,
            &nv::SendBuffer {
                gpadl: 7,
                id: 0xcafe,
            },
        );
        assert_eq!(
            parse(&m),
            Ok(Request::ReceiveBuffer {
                gpadl: 7,
                id: 0xcafe
            })
        );
        let c = init_complete(None);
        assert_eq!(
            u32::from_le_bytes(c[12..16].try_into().unwrap()),
            status::FAIL
        );
    }
}
