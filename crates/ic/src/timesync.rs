//! The time synchronization service (Linux `timesync_onchannelcallback`): the host sends its
//! UTC time (SYNC: set the clock now; SAMPLE: a periodic sample for the guest's drift
//! estimate), the guest acknowledges each sample.

use crate::framework::{Framework, IcError, Response};
use crate::IcEvent;
use hvdef::ic::{self as wire, IcVersion, TimesyncMessage, TimesyncRefMessage};
use std::collections::VecDeque;
use vmbus::Channel;

/// Message versions offered, newest first.
pub const VERSIONS: [IcVersion; 3] = [
    IcVersion::new(4, 0),
    IcVersion::new(3, 0),
    IcVersion::new(1, 0),
];

/// Unacknowledged samples remembered; older ones are forgotten (their late acks are then
/// rejected as unsolicited).
pub const MAX_OUTSTANDING: usize = 8;

/// Clock inputs of the timesync service.
pub trait TimeSource: Send {
    /// Host wall-clock time, 100 ns units since 1601-01-01 UTC.
    fn host_time_100ns(&self) -> u64;
    /// The guest's reference counter (TIME_REF_COUNT, 100 ns units) now.
    fn guest_reference_time(&self) -> u64;
}

/// [`TimeSource`] using the host's system clock and a callback for the reference counter.
pub struct SystemTimeSource<F>(pub F);

impl<F: Fn() -> u64 + Send> TimeSource for SystemTimeSource<F> {
    fn host_time_100ns(&self) -> u64 {
        let since_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        wire::EPOCH_DELTA_100NS.saturating_add((since_unix.as_nanos() / 100) as u64)
    }

    fn guest_reference_time(&self) -> u64 {
        (self.0)()
    }
}

pub(crate) struct Timesync {
    pub(crate) clock: Box<dyn TimeSource>,
    /// A SYNC went out since the channel opened.
    pub(crate) synced: bool,
    /// Versions were agreed but the SYNC could not be sent yet (e.g. ring full).
    pub(crate) sync_owed: bool,
    /// Transactions of unacknowledged samples, oldest first.
    pub(crate) outstanding: VecDeque<u64>,
}

impl Timesync {
    pub(crate) fn new(clock: Box<dyn TimeSource>) -> Self {
        Self {
            clock,
            synced: false,
            sync_owed: false,
            outstanding: VecDeque::new(),
        }
    }

    pub(crate) fn reset(&mut self) {
        self.synced = false;
        self.sync_owed = false;
        self.outstanding.clear();
    }

    pub(crate) fn send(
        &mut self,
        fw: &mut Framework,
        ch: &mut Channel,
        sync: bool,
    ) -> Result<(), IcError> {
        let (_, ver) = fw.ready()?;
        let flags = if sync {
            wire::timesync_flags::SYNC
        } else {
            wire::timesync_flags::SAMPLE
        };
        let parent_time = self.clock.host_time_100ns();
        let t = if ver.major >= 4 {
            let m = TimesyncRefMessage {
                parent_time,
                vm_reference_time: self.clock.guest_reference_time(),
                flags,
                leap_flags: 0,
                stratum: 0,
                reserved: [0; 3],
            };
            fw.send_request(ch, &m)?
        } else {
            let m = TimesyncMessage {
                parent_time,
                child_time: 0,
                round_trip_time: 0,
                flags,
            };
            fw.send_request(ch, &m)?
        };
        if self.outstanding.len() >= MAX_OUTSTANDING {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back(t);
        if sync {
            self.synced = true;
            self.sync_owed = false;
        }
        Ok(())
    }

    pub(crate) fn response(&mut self, tid: u64, resp: Response<'_>) -> Result<IcEvent, IcError> {
        let Some(i) = self.outstanding.iter().position(|&t| t == tid) else {
            return Err(IcError::UnexpectedTransaction(tid));
        };
        if resp.header.transaction_id != tid as u8 {
            return Err(IcError::UnexpectedTransaction(tid));
        }
        self.outstanding.remove(i);
        Ok(IcEvent::TimesyncAck {
            status: resp.header.status,
        })
    }
}
