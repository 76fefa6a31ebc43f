//! The heartbeat service (Linux `heartbeat_onchannelcallback`): the host sends a sequence
//! number, the guest returns it plus one.

use crate::framework::{Framework, IcError, Response};
use crate::IcEvent;
use hvdef::ic::{HeartbeatMessage, IcVersion};
use std::time::{Duration, Instant};
use vmbus::Channel;
use zerocopy::FromBytes;

/// Message versions offered, newest first.
pub const VERSIONS: [IcVersion; 2] = [IcVersion::new(3, 0), IcVersion::new(1, 0)];

/// Heartbeat health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeartbeatState {
    /// No heartbeat answered yet.
    NoContact,
    /// The last answer came within the timeout.
    Healthy,
    /// Answers stopped arriving.
    Lost,
}

/// An unanswered heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutstandingHeartbeat {
    pub transaction: u64,
    pub seq: u64,
}

#[derive(Debug)]
pub(crate) struct Heartbeat {
    pub(crate) seq: u64,
    pub(crate) outstanding: Option<OutstandingHeartbeat>,
    pub(crate) last_ack: Option<Instant>,
    pub(crate) timeout: Duration,
}

impl Heartbeat {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            seq: 0,
            outstanding: None,
            last_ack: None,
            timeout,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.outstanding = None;
        self.last_ack = None;
    }

    /// Sends the next heartbeat; one still unanswered is replaced.
    pub(crate) fn send(&mut self, fw: &mut Framework, ch: &mut Channel) -> Result<u64, IcError> {
        fw.ready()?;
        let next = self.seq.wrapping_add(2);
        let m = HeartbeatMessage {
            seq_num: next,
            reserved: [0; 8],
        };
        let t = fw.send_request(ch, &m)?;
        self.seq = next;
        self.outstanding = Some(OutstandingHeartbeat {
            transaction: t,
            seq: next,
        });
        Ok(next)
    }

    pub(crate) fn response(
        &mut self,
        tid: u64,
        resp: Response<'_>,
        now: Instant,
    ) -> Result<IcEvent, IcError> {
        let (m, _) = HeartbeatMessage::read_from_prefix(resp.body)
            .map_err(|_| IcError::Malformed("short heartbeat"))?;
        let Some(o) = self.outstanding else {
            return Err(IcError::Malformed("unsolicited heartbeat response"));
        };
        if o.transaction != tid || resp.header.transaction_id != o.transaction as u8 {
            return Err(IcError::UnexpectedTransaction(tid));
        }
        if m.seq_num != o.seq.wrapping_add(1) {
            return Err(IcError::Malformed("heartbeat sequence mismatch"));
        }
        self.outstanding = None;
        self.last_ack = Some(now);
        Ok(IcEvent::HeartbeatAck { seq: o.seq })
    }

    pub(crate) fn state(&self, now: Instant) -> HeartbeatState {
        match self.last_ack {
            None => HeartbeatState::NoContact,
            Some(t) if now.saturating_duration_since(t) <= self.timeout => HeartbeatState::Healthy,
            Some(_) => HeartbeatState::Lost,
        }
    }
}
