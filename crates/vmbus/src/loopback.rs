//! A single-process "hypervisor" joining the [`Server`] and the guest-side
//! [`crate::client::Client`]: posted messages go straight into the server, the server's
//! actions are carried out at once (messages queued for the guest, host ends of opened
//! channels kept for the test or device to take). No CPU involved.

use crate::channel::{Channel, Side};
use crate::client::Transport;
use crate::server::{Action, ProtocolError, Server};
use guestmem::GuestMemory;
use hvdef::vmbus::STATUS_UNSUCCESSFUL;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Host-to-guest interrupts raised by host channels: (VP, relid).
pub type InterruptLog = Arc<Mutex<Vec<(u32, u32)>>>;

/// The loopback transport.
pub struct Loopback {
    pub server: Server,
    pub mem: GuestMemory,
    /// Messages for the guest: (VP, SINT, bytes).
    pub inbox: VecDeque<(u32, u8, Vec<u8>)>,
    /// Host ends of channels the guest opened, by relid.
    pub host_channels: BTreeMap<u32, Channel>,
    /// Channels the server closed, in order.
    pub closed: Vec<u32>,
    /// Channels the server removed.
    pub removed: Vec<u32>,
    /// Relids whose doorbell the guest rang.
    pub doorbells: Vec<u32>,
    /// Host-to-guest interrupts.
    pub interrupts: InterruptLog,
    /// Protocol errors the server reported for guest messages.
    pub protocol_errors: Vec<ProtocolError>,
    /// Number of resets (unload / reconnect).
    pub resets: usize,
}

impl Loopback {
    pub fn new(server: Server, mem: GuestMemory) -> Self {
        Self {
            server,
            mem,
            inbox: VecDeque::new(),
            host_channels: BTreeMap::new(),
            closed: Vec::new(),
            removed: Vec::new(),
            doorbells: Vec::new(),
            interrupts: Arc::default(),
            protocol_errors: Vec::new(),
            resets: 0,
        }
    }

    /// Carries out every queued server action.
    pub fn pump(&mut self) {
        while let Some(a) = self.server.poll_action() {
            match a {
                Action::SendMessage { vp, sint, message } => {
                    self.inbox
                        .push_back((vp, sint, message.as_bytes().to_vec()))
                }
                Action::OpenChannel(req) => {
                    let log = self.interrupts.clone();
                    let target = req.target.clone();
                    let signal: crate::SignalFn = Arc::new(move || {
                        log.lock()
                            .expect("not poisoned")
                            .push((target.vp(), target.relid))
                    });
                    let status = match Channel::new(
                        &self.mem,
                        &req.ring_pfns,
                        req.downstream_page_offset,
                        Side::Host,
                        Some(signal),
                    ) {
                        Ok(ch) => {
                            self.host_channels.insert(req.relid, ch);
                            0
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "loopback: open refused");
                            STATUS_UNSUCCESSFUL
                        }
                    };
                    self.server
                        .open_complete(req.relid, status)
                        .expect("channel is opening");
                }
                Action::CloseChannel { relid } => {
                    self.host_channels.remove(&relid);
                    self.closed.push(relid);
                }
                Action::ChannelRemoved { relid } => self.removed.push(relid),
                Action::TargetVpChanged { .. } => {}
                Action::Reset => self.resets += 1,
            }
        }
    }
}

impl Transport for Loopback {
    fn post_message(&mut self, connection_id: u32, data: &[u8]) -> Result<(), u16> {
        let r = self.server.post_message(connection_id, 0, data);
        self.pump();
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.protocol_errors.push(e);
                Ok(())
            }
            Err(e) => Err(e.hv_status()),
        }
    }

    fn next_message(&mut self) -> Option<Vec<u8>> {
        self.pump();
        self.inbox.pop_front().map(|(_, _, m)| m)
    }

    fn signal_event(&mut self, connection_id: u32) -> Result<(), u16> {
        let relid = self
            .server
            .signal_event(connection_id)
            .map_err(|e| e.hv_status())?;
        self.doorbells.push(relid);
        Ok(())
    }
}
