//! The IC framework every service shares: the pipe header, building and parsing the IC
//! message header, version negotiation, transaction numbering, draining the inbound ring,
//! and rate-limited logging of dropped guest packets.
//!
//! Guest packets are hostile. [`parse_response`] checks the pipe header (type data, size
//! matching what follows and fitting the packet) and the IC header before a service sees the
//! body; [`Framework::drain`] turns every packet into either a framework event, a service
//! message, or a typed [`IcError`].

use hvdef::ic::{
    self as wire, flags, msgtype, IcMessageHeader, IcVersion, NegotiateHeader, PipeHeader,
    FRAMEWORK_1_0, FRAMEWORK_3_0, IC_BODY_OFFSET,
};
use hvdef::vmbus::packet_type;
use std::time::Duration;
use vmbus::{Channel, ChannelError};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Framework versions offered (Linux picks 3.0, then 1.0).
pub const FRAMEWORK_VERSIONS: [IcVersion; 2] = [FRAMEWORK_3_0, FRAMEWORK_1_0];

/// IC errors. Malformed guest packets are dropped; the state does not change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IcError {
    #[error("channel: {0}")]
    Channel(#[from] ChannelError),
    #[error("the service has not finished version negotiation")]
    NotReady,
    #[error("a request is already outstanding")]
    Busy,
    #[error("malformed IC packet: {0}")]
    Malformed(&'static str),
    #[error("unexpected IC message type {0}")]
    UnexpectedType(u16),
    #[error("the guest chose version {0}.{1}, which was not offered")]
    BadVersion(u16, u16),
    #[error("operation not supported by this service")]
    WrongService,
    /// A response whose transaction matches no outstanding request (unsolicited, stale or
    /// forged).
    #[error("response to transaction {0}, which is not outstanding")]
    UnexpectedTransaction(u64),
    /// The pipe header of a guest packet is wrong.
    #[error("bad pipe header: {0}")]
    BadPipeHeader(&'static str),
    /// A KVP string field is malformed.
    #[error("bad KVP string: {0}")]
    BadString(&'static str),
    /// A host-supplied argument is invalid (too long, empty, contains NUL).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// Too many host requests are queued.
    #[error("the request queue is full")]
    QueueFull,
    /// The negotiated message version does not support this request.
    #[error("not supported by the negotiated message version")]
    Unsupported,
    /// A saved state could not be restored.
    #[error("invalid saved state: {0}")]
    BadSavedState(&'static str),
}

/// Negotiation / lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcState {
    /// The guest has not opened the channel.
    Closed,
    /// NEGOTIATE sent, waiting for the guest's answer.
    Negotiating,
    /// Versions agreed.
    Ready {
        framework: IcVersion,
        message: IcVersion,
    },
    /// No common version: the service is unusable until reopened.
    NoCommonVersion,
}

/// A version pair in saved state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedVersion {
    pub major: u16,
    pub minor: u16,
}

impl From<IcVersion> for SavedVersion {
    fn from(v: IcVersion) -> Self {
        Self {
            major: v.major,
            minor: v.minor,
        }
    }
}

impl From<SavedVersion> for IcVersion {
    fn from(v: SavedVersion) -> Self {
        IcVersion::new(v.major, v.minor)
    }
}

/// The framework's part of a saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum SavedNegotiation {
    Closed,
    /// NEGOTIATE was sent with this transaction id.
    Negotiating {
        transaction: Option<u64>,
    },
    Ready {
        framework: SavedVersion,
        message: SavedVersion,
    },
    NoCommonVersion,
}

/// Builds a request packet: pipe header, IC header (TRANSACTION | REQUEST), body.
pub(crate) fn ic_packet<T: IntoBytes + Immutable + ?Sized>(
    ty: u16,
    framework: IcVersion,
    message: IcVersion,
    transaction: u8,
    body: &T,
) -> Vec<u8> {
    let body = body.as_bytes();
    let hdr = IcMessageHeader {
        framework_version: framework,
        msgtype: ty,
        message_version: message,
        msgsize: u16::try_from(body.len()).unwrap_or(u16::MAX),
        status: 0,
        transaction_id: transaction,
        flags: flags::TRANSACTION | flags::REQUEST,
        reserved: [0; 2],
    };
    let pipe = PipeHeader {
        pipe_type: wire::PIPE_TYPE_DATA,
        size: (size_of::<IcMessageHeader>() + body.len()) as u32,
    };
    let mut v = Vec::with_capacity(IC_BODY_OFFSET + body.len());
    v.extend_from_slice(pipe.as_bytes());
    v.extend_from_slice(hdr.as_bytes());
    v.extend_from_slice(body);
    v
}

/// A guest response that passed the framing checks.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    pub header: IcMessageHeader,
    /// The message body: what follows the IC header, as far as the pipe header says.
    pub body: &'a [u8],
}

/// Checks the framing of a guest packet's payload (which the ring pads to 8 bytes): the pipe
/// header must say data (1) and a size that covers the IC header, fits the payload and
/// leaves at most the ring's padding after it; the IC header must be a response.
pub fn parse_response(payload: &[u8]) -> Result<Response<'_>, IcError> {
    let (pipe, rest) =
        PipeHeader::read_from_prefix(payload).map_err(|_| IcError::Malformed("short"))?;
    if pipe.pipe_type != wire::PIPE_TYPE_DATA {
        return Err(IcError::BadPipeHeader("type is not data"));
    }
    let size = pipe.size as usize;
    if size > rest.len() {
        return Err(IcError::BadPipeHeader("size exceeds the packet"));
    }
    if rest.len() - size >= 8 {
        return Err(IcError::BadPipeHeader("size does not match the packet"));
    }
    let (header, body) = IcMessageHeader::read_from_prefix(&rest[..size])
        .map_err(|_| IcError::Malformed("short"))?;
    if header.flags & flags::RESPONSE == 0 {
        return Err(IcError::Malformed("not a response"));
    }
    Ok(Response { header, body })
}

/// NEGOTIATE body offering `FRAMEWORK_VERSIONS` and `versions`.
pub(crate) fn negotiate_body(versions: &[IcVersion]) -> Vec<u8> {
    let mut body = NegotiateHeader {
        framework_count: FRAMEWORK_VERSIONS.len() as u16,
        message_count: versions.len() as u16,
        reserved: 0,
    }
    .as_bytes()
    .to_vec();
    for v in FRAMEWORK_VERSIONS.iter().chain(versions) {
        body.extend_from_slice(v.as_bytes());
    }
    body
}

/// Result of a NEGOTIATE answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    Agreed {
        framework: IcVersion,
        message: IcVersion,
    },
    NoCommonVersion,
}

/// Parses the guest's NEGOTIATE answer: counts 1 and 1 followed by the chosen framework and
/// message version (both must have been offered), or a zero count for "no match".
pub fn parse_negotiate_response(body: &[u8], offered: &[IcVersion]) -> Result<Negotiated, IcError> {
    let (h, rest) =
        NegotiateHeader::read_from_prefix(body).map_err(|_| IcError::Malformed("short"))?;
    if h.framework_count == 0 || h.message_count == 0 {
        return Ok(Negotiated::NoCommonVersion);
    }
    if h.framework_count != 1 || h.message_count != 1 {
        return Err(IcError::Malformed(
            "negotiation answer must choose one version each",
        ));
    }
    let (versions, _) = <[IcVersion]>::ref_from_prefix_with_elems(rest, 2)
        .map_err(|_| IcError::Malformed("short version list"))?;
    let (fw, msg) = (versions[0], versions[1]);
    if !FRAMEWORK_VERSIONS.contains(&fw) {
        return Err(IcError::BadVersion(fw.major, fw.minor));
    }
    if !offered.contains(&msg) {
        return Err(IcError::BadVersion(msg.major, msg.minor));
    }
    Ok(Negotiated::Agreed {
        framework: fw,
        message: msg,
    })
}

/// What [`Framework::drain`] hands a service for each packet.
pub(crate) enum Incoming<'a> {
    /// Versions were agreed (state is now Ready).
    Negotiated {
        framework: IcVersion,
        message: IcVersion,
    },
    /// No common version (state is now NoCommonVersion).
    NegotiationFailed,
    /// A response of the service's message type, received while Ready.
    Message {
        transaction_id: u64,
        response: Response<'a>,
    },
}

/// Counts of one drain.
#[derive(Debug, Default)]
pub(crate) struct DrainOutcome {
    pub dropped: u32,
    pub first_error: Option<IcError>,
}

/// Dropped guest packets are logged at most once per interval (the rest are counted).
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Negotiation state, transaction numbering and the receive loop of one service.
pub(crate) struct Framework {
    name: &'static str,
    msgtype: u16,
    versions: &'static [IcVersion],
    pub(crate) state: IcState,
    pub(crate) next_transaction: u64,
    /// Transaction of the NEGOTIATE request, when it went out.
    pub(crate) negotiate_transaction: Option<u64>,
    buf: Vec<u8>,
    log: support::RateLimit,
}

impl Framework {
    pub(crate) fn new(name: &'static str, msgtype: u16, versions: &'static [IcVersion]) -> Self {
        Self {
            name,
            msgtype,
            versions,
            state: IcState::Closed,
            next_transaction: 1,
            negotiate_transaction: None,
            buf: Vec::new(),
            log: support::RateLimit::new(LOG_INTERVAL, 1),
        }
    }

    pub(crate) fn transaction(&mut self) -> u64 {
        let t = self.next_transaction;
        self.next_transaction = self.next_transaction.wrapping_add(1).max(1);
        t
    }

    /// The guest opened the channel: send NEGOTIATE.
    pub(crate) fn open(&mut self, ch: &mut Channel) -> Result<(), IcError> {
        self.state = IcState::Negotiating;
        let t = self.transaction();
        self.negotiate_transaction = Some(t);
        let body = negotiate_body(self.versions);
        let pkt = ic_packet(
            msgtype::NEGOTIATE,
            FRAMEWORK_1_0,
            FRAMEWORK_1_0,
            0,
            &body[..],
        );
        ch.send_inband(t, &pkt, false)?;
        Ok(())
    }

    pub(crate) fn close(&mut self) {
        self.state = IcState::Closed;
        self.negotiate_transaction = None;
    }

    pub(crate) fn ready(&self) -> Result<(IcVersion, IcVersion), IcError> {
        match self.state {
            IcState::Ready { framework, message } => Ok((framework, message)),
            _ => Err(IcError::NotReady),
        }
    }

    /// Sends a request of the service's type with a fresh transaction; returns it.
    pub(crate) fn send_request<T: IntoBytes + Immutable + ?Sized>(
        &mut self,
        ch: &mut Channel,
        body: &T,
    ) -> Result<u64, IcError> {
        let (fw, ver) = self.ready()?;
        let t = self.transaction();
        let pkt = ic_packet(self.msgtype, fw, ver, t as u8, body);
        ch.send_inband(t, &pkt, false)?;
        Ok(t)
    }

    fn negotiation_answer(
        &mut self,
        transaction_id: u64,
        body: &[u8],
    ) -> Result<Incoming<'static>, IcError> {
        if self.state != IcState::Negotiating {
            return Err(IcError::Malformed(
                "negotiation answer while not negotiating",
            ));
        }
        if let Some(t) = self.negotiate_transaction {
            if t != transaction_id {
                return Err(IcError::UnexpectedTransaction(transaction_id));
            }
        }
        match parse_negotiate_response(body, self.versions)? {
            Negotiated::Agreed { framework, message } => {
                self.state = IcState::Ready { framework, message };
                self.negotiate_transaction = None;
                Ok(Incoming::Negotiated { framework, message })
            }
            Negotiated::NoCommonVersion => {
                self.state = IcState::NoCommonVersion;
                self.negotiate_transaction = None;
                Ok(Incoming::NegotiationFailed)
            }
        }
    }

    /// Receives every waiting packet. Framing and negotiation are handled here; responses of
    /// the service's type go to `service`. Malformed packets (and service errors) are
    /// dropped and counted, the first error kept; ring corruption returns at once.
    pub(crate) fn drain(
        &mut self,
        ch: &mut Channel,
        mut service: impl FnMut(Incoming<'_>) -> Result<(), IcError>,
    ) -> Result<DrainOutcome, IcError> {
        let mut out = DrainOutcome::default();
        loop {
            let mut buf = std::mem::take(&mut self.buf);
            let r = match ch.try_recv(&mut buf) {
                Ok(Some(p)) => Some(match p.packet_type() {
                    packet_type::DATA_INBAND => {
                        let tid = p.transaction_id();
                        match parse_response(p.payload()) {
                            Ok(resp) if resp.header.msgtype == msgtype::NEGOTIATE => self
                                .negotiation_answer(tid, resp.body)
                                .and_then(&mut service),
                            Ok(resp) if resp.header.msgtype == self.msgtype => match self.ready() {
                                Ok(_) => service(Incoming::Message {
                                    transaction_id: tid,
                                    response: resp,
                                }),
                                Err(e) => Err(e),
                            },
                            Ok(resp) => Err(IcError::UnexpectedType(resp.header.msgtype)),
                            Err(e) => Err(e),
                        }
                    }
                    packet_type::COMPLETION => Ok(()),
                    _ => Err(IcError::Malformed("not an in-band packet")),
                }),
                Ok(None) => None,
                Err(e) => {
                    self.buf = buf;
                    return Err(e.into());
                }
            };
            self.buf = buf;
            match r {
                None => break,
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    support::limited!(
                        self.log,
                        debug,
                        service = self.name,
                        error = %e,
                        "ic: dropped guest packet"
                    );
                    out.dropped = out.dropped.saturating_add(1);
                    out.first_error.get_or_insert(e);
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn save(&self) -> SavedNegotiation {
        match self.state {
            IcState::Closed => SavedNegotiation::Closed,
            IcState::Negotiating => SavedNegotiation::Negotiating {
                transaction: self.negotiate_transaction,
            },
            IcState::Ready { framework, message } => SavedNegotiation::Ready {
                framework: framework.into(),
                message: message.into(),
            },
            IcState::NoCommonVersion => SavedNegotiation::NoCommonVersion,
        }
    }

    /// Validates a saved negotiation against what this service offers.
    pub(crate) fn check_saved(
        &self,
        s: &SavedNegotiation,
        next_transaction: u64,
    ) -> Result<(IcState, Option<u64>), IcError> {
        if next_transaction == 0 {
            return Err(IcError::BadSavedState("transaction counter is zero"));
        }
        Ok(match *s {
            SavedNegotiation::Closed => (IcState::Closed, None),
            SavedNegotiation::Negotiating { transaction } => {
                if transaction.is_some_and(|t| t == 0 || t >= next_transaction) {
                    return Err(IcError::BadSavedState("negotiation transaction"));
                }
                (IcState::Negotiating, transaction)
            }
            SavedNegotiation::NoCommonVersion => (IcState::NoCommonVersion, None),
            SavedNegotiation::Ready { framework, message } => {
                let (framework, message) = (IcVersion::from(framework), IcVersion::from(message));
                if !FRAMEWORK_VERSIONS.contains(&framework) || !self.versions.contains(&message) {
                    return Err(IcError::BadSavedState("version was never offered"));
                }
                (IcState::Ready { framework, message }, None)
            }
        })
    }

    pub(crate) fn apply_saved(
        &mut self,
        state: IcState,
        negotiate_transaction: Option<u64>,
        next_transaction: u64,
    ) {
        self.state = state;
        self.negotiate_transaction = negotiate_transaction;
        self.next_transaction = next_transaction;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(pipe_type: u32, size: u32, rest: &[u8]) -> Vec<u8> {
        let mut v = PipeHeader { pipe_type, size }.as_bytes().to_vec();
        v.extend_from_slice(rest);
        v
    }

    fn response_header() -> Vec<u8> {
        IcMessageHeader {
            flags: flags::TRANSACTION | flags::RESPONSE,
            msgtype: msgtype::HEARTBEAT,
            ..Default::default()
        }
        .as_bytes()
        .to_vec()
    }

    #[test]
    fn pipe_header_is_checked() {
        let mut body = response_header();
        body.extend_from_slice(&[0; 40]);
        // Exact, and with ring padding (the payload is padded to 8).
        assert!(parse_response(&pkt(1, 60, &body)).is_ok());
        let mut padded = body.clone();
        padded.extend_from_slice(&[0; 4]);
        let p = pkt(1, 60, &padded);
        let r = parse_response(&p).unwrap();
        assert_eq!(r.body.len(), 40);
        assert_eq!(
            parse_response(&pkt(2, 60, &body)).unwrap_err(),
            IcError::BadPipeHeader("type is not data")
        );
        assert_eq!(
            parse_response(&pkt(1, 61, &body)).unwrap_err(),
            IcError::BadPipeHeader("size exceeds the packet")
        );
        assert_eq!(
            parse_response(&pkt(1, u32::MAX, &body)).unwrap_err(),
            IcError::BadPipeHeader("size exceeds the packet")
        );
        assert_eq!(
            parse_response(&pkt(1, 40, &body)).unwrap_err(),
            IcError::BadPipeHeader("size does not match the packet")
        );
        assert_eq!(
            parse_response(&pkt(1, 4, &body[..4])).unwrap_err(),
            IcError::Malformed("short")
        );
        assert_eq!(
            parse_response(&[1, 0, 0]).unwrap_err(),
            IcError::Malformed("short")
        );
    }

    #[test]
    fn negotiate_answer_needs_one_offered_version_each() {
        let offered = [IcVersion::new(3, 0)];
        let mut b = NegotiateHeader {
            framework_count: 1,
            message_count: 1,
            reserved: 0,
        }
        .as_bytes()
        .to_vec();
        b.extend_from_slice(FRAMEWORK_3_0.as_bytes());
        b.extend_from_slice(IcVersion::new(3, 0).as_bytes());
        assert_eq!(
            parse_negotiate_response(&b, &offered).unwrap(),
            Negotiated::Agreed {
                framework: FRAMEWORK_3_0,
                message: IcVersion::new(3, 0)
            }
        );
        let mut many = b.clone();
        many[0] = 2;
        assert!(parse_negotiate_response(&many, &offered).is_err());
        assert!(parse_negotiate_response(&b[..12], &offered).is_err());
        let mut zero = b.clone();
        zero[2] = 0;
        assert_eq!(
            parse_negotiate_response(&zero, &offered).unwrap(),
            Negotiated::NoCommonVersion
        );
    }
}
