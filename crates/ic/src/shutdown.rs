//! The shutdown service (Linux `shutdown_onchannelcallback`): the host asks the guest to power
//! off, reboot or hibernate; the guest answers with a status and then acts.

use crate::framework::{Framework, IcError, Response};
use crate::IcEvent;
use hvdef::ic::{self as wire, IcVersion, ShutdownMessage};
use vmbus::Channel;
use zerocopy::FromZeros;

/// Message versions offered, newest first (what Linux accepts).
pub const VERSIONS: [IcVersion; 4] = [
    IcVersion::new(3, 2),
    IcVersion::new(3, 1),
    IcVersion::new(3, 0),
    IcVersion::new(1, 0),
];

/// Kind of shutdown requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownKind {
    PowerOff,
    Reboot,
    Hibernate,
}

/// Builds the request body. `reason` is UTF-16LE, truncated to the field with a terminator.
pub fn shutdown_message(kind: ShutdownKind, force: bool, reason: &str) -> ShutdownMessage {
    let mut m = ShutdownMessage::new_zeroed();
    m.flags = match kind {
        ShutdownKind::PowerOff => wire::shutdown_flags::POWER_OFF,
        ShutdownKind::Reboot => wire::shutdown_flags::RESTART,
        ShutdownKind::Hibernate => wire::shutdown_flags::HIBERNATE,
    } | if force {
        wire::shutdown_flags::FORCE
    } else {
        0
    };
    for (dst, u) in m
        .message
        .chunks_exact_mut(2)
        .take(wire::SHUTDOWN_MESSAGE_SIZE / 2 - 1)
        .zip(reason.encode_utf16())
    {
        dst.copy_from_slice(&u.to_le_bytes());
    }
    m
}

/// State of the shutdown service.
#[derive(Debug, Default)]
pub(crate) struct Shutdown {
    /// Transaction of the unanswered request.
    pub(crate) outstanding: Option<u64>,
}

impl Shutdown {
    pub(crate) fn reset(&mut self) {
        self.outstanding = None;
    }

    pub(crate) fn request(
        &mut self,
        fw: &mut Framework,
        ch: &mut Channel,
        kind: ShutdownKind,
        force: bool,
        reason: &str,
    ) -> Result<(), IcError> {
        fw.ready()?;
        if self.outstanding.is_some() {
            return Err(IcError::Busy);
        }
        let t = fw.send_request(ch, &shutdown_message(kind, force, reason))?;
        self.outstanding = Some(t);
        Ok(())
    }

    pub(crate) fn response(&mut self, tid: u64, resp: Response<'_>) -> Result<IcEvent, IcError> {
        match self.outstanding {
            None => Err(IcError::Malformed("unsolicited shutdown response")),
            Some(t) if t != tid || resp.header.transaction_id != t as u8 => {
                Err(IcError::UnexpectedTransaction(tid))
            }
            Some(_) => {
                self.outstanding = None;
                Ok(IcEvent::ShutdownResponse {
                    status: resp.header.status,
                })
            }
        }
    }
}
