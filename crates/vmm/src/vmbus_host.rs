//! The VMBus server and its devices inside the worker: the I/O adapter between the vCPU
//! threads (HvPostMessage, HvSignalEvent), hv1's SynIC (message slots, event flags,
//! interrupts) and the sans-I/O `vmbus::Server` and `ic::Ic` state machines.

use crate::hyperv::{inject, Hv};
use guestmem::GuestMemory;
use hv1::{EventDelivery, HvStatus};
use hvdef::vmbus::{Guid, MESSAGE_SINT};
use ic::{HeartbeatState, Ic, IcEvent, IcKind, ShutdownKind};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vmbus::{Action, Channel, Server, ServerConfig, Side};

/// SynIC message type of VMBus channel messages.
const VMBUS_MESSAGE_TYPE: u32 = 1;
/// NTSTATUS for a failed open.
const STATUS_UNSUCCESSFUL: u32 = 0xC000_0001;
/// Replies one guest message can produce at most (REQUESTOFFERS: one per offer, plus
/// ALLOFFERS_DELIVERED), kept free in the SynIC queue.
const REPLY_HEADROOM: usize = 8;
/// How often the host sends a heartbeat and a time sample.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
const TIME_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// How long without a heartbeat answer before the guest counts as lost.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// Instance GUIDs of the integration services (constant, so the guest sees the same devices
/// on every boot).
fn instance_id(kind: IcKind) -> Guid {
    let n = match kind {
        IcKind::Shutdown => 1,
        IcKind::Heartbeat => 2,
        IcKind::Timesync => 3,
    };
    Guid::from_u128(0x5649_5249_4449_414e_0000_0000_0000_0000 | n)
}

struct Device {
    ic: Ic,
    relid: u32,
    channel: Option<Channel>,
}

struct Inner {
    server: Server,
    devices: Vec<Device>,
    last_sample: Option<Instant>,
    last_heartbeat: Option<Instant>,
}

/// Guest-visible state of the integration services, for `viridian vm` status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcStatus {
    pub vmbus_version: Option<u32>,
    pub heartbeat: HeartbeatState,
    pub shutdown_ready: bool,
    pub time_synced: bool,
}

/// Why a shutdown request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error("the guest has not connected its shutdown service (no hv_utils driver?); use --force to power off")]
    NotConnected,
    #[error("shutdown service: {0}")]
    Ic(#[from] ic::IcError),
}

/// VMBus with the shutdown, heartbeat and timesync services.
pub struct VmbusHost {
    hv: Hv,
    kvm: Arc<kvm::Partition>,
    mem: GuestMemory,
    inner: Mutex<Inner>,
}

impl VmbusHost {
    pub fn new(hv: Hv, kvm: Arc<kvm::Partition>, vp_count: u32) -> Self {
        let mem = kvm.memory().clone();
        let mut server = Server::new(ServerConfig {
            vp_count,
            ..Default::default()
        });
        let time_hv = hv.clone();
        let services = [
            Ic::shutdown(),
            Ic::heartbeat(HEARTBEAT_TIMEOUT),
            Ic::timesync(Box::new(ic::SystemTimeSource(move || {
                time_hv.reference_time()
            }))),
        ];
        let devices = services
            .into_iter()
            .map(|ic| {
                let relid = server
                    .add_offer(ic.kind().offer(instance_id(ic.kind())))
                    .expect("three offers fit");
                Device {
                    ic,
                    relid,
                    channel: None,
                }
            })
            .collect();
        Self {
            hv,
            kvm,
            mem,
            inner: Mutex::new(Inner {
                server,
                devices,
                last_sample: None,
                last_heartbeat: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// HvPostMessage from VP `vp`; returns the hypercall status.
    pub fn post_message(&self, req: &hv1::PostMessageRequest) -> HvStatus {
        let mut inner = self.lock();
        // Every guest message may produce replies. When the reply queue of the connection's
        // VP is nearly full, refuse the message so the guest backs off and retries, instead
        // of the host queueing without bound or dropping replies.
        if let vmbus::server::ConnectionState::Connected {
            target_vp, sint, ..
        } = inner.server.connection()
        {
            if self.hv.queued_messages(*target_vp, *sint) + REPLY_HEADROOM
                >= hv1::MESSAGE_QUEUE_DEPTH
            {
                return HvStatus::INSUFFICIENT_BUFFERS;
            }
        }
        let status =
            match inner
                .server
                .post_message(req.connection_id, req.vp, req.payload.as_slice())
            {
                Ok(_) => HvStatus::SUCCESS,
                Err(e) => HvStatus(e.hv_status()),
            };
        self.pump(&mut inner);
        status
    }

    /// HvSignalEvent: the guest put packets in a channel's ring.
    pub fn signal_event(&self, req: &hv1::SignalEventRequest) -> HvStatus {
        let mut inner = self.lock();
        let relid = match inner.server.signal_event(req.connection_id) {
            Ok(relid) => relid,
            Err(e) => return HvStatus(e.hv_status()),
        };
        let now = Instant::now();
        if let Some(dev) = inner.devices.iter_mut().find(|d| d.relid == relid) {
            process(dev, now);
        }
        HvStatus::SUCCESS
    }

    /// Carries out the server's actions in order.
    fn pump(&self, inner: &mut Inner) {
        while let Some(action) = inner.server.poll_action() {
            match action {
                Action::SendMessage { vp, sint, message } => {
                    match self
                        .hv
                        .post_message(vp, sint, VMBUS_MESSAGE_TYPE, message.as_bytes())
                    {
                        Ok(d) => inject(&self.kvm, d.interrupt.as_slice()),
                        Err(e) => tracing::warn!("vmbus: message to VP {vp} lost: {e}"),
                    }
                }
                Action::OpenChannel(req) => {
                    let hv = self.hv.clone();
                    let kvm = self.kvm.clone();
                    let target = req.target.clone();
                    let signal: vmbus::SignalFn = Arc::new(move || {
                        if let Ok(EventDelivery::Signalled(Some(i))) =
                            hv.signal_event(target.vp(), MESSAGE_SINT, target.relid)
                        {
                            inject(&kvm, &[i]);
                        }
                    });
                    let channel = Channel::new(
                        &self.mem,
                        &req.ring_pfns,
                        req.downstream_page_offset,
                        Side::Host,
                        Some(signal),
                    );
                    let status = match channel {
                        Ok(ch) => {
                            if let Some(dev) =
                                inner.devices.iter_mut().find(|d| d.relid == req.relid)
                            {
                                dev.channel = Some(ch);
                            }
                            0
                        }
                        Err(e) => {
                            tracing::warn!("vmbus: cannot open channel {}: {e}", req.relid);
                            STATUS_UNSUCCESSFUL
                        }
                    };
                    if let Err(e) = inner.server.open_complete(req.relid, status) {
                        tracing::warn!("vmbus: open_complete({}): {e}", req.relid);
                    }
                    // Deliver OPENRESULT before the service speaks first.
                    self.pump(inner);
                    if let Some(dev) = inner.devices.iter_mut().find(|d| d.relid == req.relid) {
                        if let Some(ch) = dev.channel.as_mut() {
                            if let Err(e) = dev.ic.open(ch) {
                                tracing::warn!(
                                    "{:?}: negotiation failed to start: {e}",
                                    dev.ic.kind()
                                );
                            }
                        }
                    }
                }
                Action::CloseChannel { relid } => {
                    if let Some(dev) = inner.devices.iter_mut().find(|d| d.relid == relid) {
                        dev.channel = None;
                        dev.ic.close();
                    }
                }
                Action::Reset => {
                    for dev in &mut inner.devices {
                        dev.channel = None;
                        dev.ic.close();
                    }
                }
                Action::ChannelRemoved { .. } | Action::TargetVpChanged { .. } => {}
            }
        }
    }

    /// Periodic work: heartbeats, time samples, and packets the guest left without a doorbell.
    pub fn tick(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let due = |last: Option<Instant>, every: Duration| {
            last.is_none_or(|t| now.duration_since(t) >= every)
        };
        let sample_due = due(inner.last_sample, TIME_SAMPLE_INTERVAL);
        let heartbeat_due = due(inner.last_heartbeat, HEARTBEAT_INTERVAL);
        let (mut sampled, mut beat) = (false, false);
        for dev in &mut inner.devices {
            process(dev, now);
            let Some(ch) = dev.channel.as_mut() else {
                continue;
            };
            if !matches!(dev.ic.state(), ic::IcState::Ready { .. }) {
                continue;
            }
            let result = match dev.ic.kind() {
                IcKind::Heartbeat if heartbeat_due => {
                    beat = true;
                    dev.ic.send_heartbeat(ch).map(|_| ())
                }
                IcKind::Timesync if !dev.ic.time_synced() => dev.ic.send_timesync(ch, true),
                IcKind::Timesync if sample_due => {
                    sampled = true;
                    dev.ic.send_timesync(ch, false)
                }
                _ => Ok(()),
            };
            if let Err(e) = result {
                tracing::debug!("{:?}: {e}", dev.ic.kind());
            }
        }
        if sampled {
            inner.last_sample = Some(now);
        }
        if beat {
            inner.last_heartbeat = Some(now);
        }
    }

    /// Asks the guest to shut down through the shutdown service.
    pub fn request_shutdown(&self, reboot: bool) -> Result<(), ShutdownError> {
        let mut inner = self.lock();
        let dev = inner
            .devices
            .iter_mut()
            .find(|d| d.ic.kind() == IcKind::Shutdown)
            .expect("shutdown service exists");
        let ch = dev.channel.as_mut().ok_or(ShutdownError::NotConnected)?;
        if !matches!(dev.ic.state(), ic::IcState::Ready { .. }) {
            return Err(ShutdownError::NotConnected);
        }
        let kind = if reboot {
            ShutdownKind::Reboot
        } else {
            ShutdownKind::PowerOff
        };
        dev.ic
            .request_shutdown(ch, kind, false, "viridian vm stop")?;
        Ok(())
    }

    pub fn status(&self) -> IcStatus {
        let inner = self.lock();
        let now = Instant::now();
        let find = |k: IcKind| inner.devices.iter().find(|d| d.ic.kind() == k).unwrap();
        IcStatus {
            vmbus_version: inner.server.version(),
            heartbeat: find(IcKind::Heartbeat).ic.heartbeat_state(now),
            shutdown_ready: matches!(find(IcKind::Shutdown).ic.state(), ic::IcState::Ready { .. }),
            time_synced: find(IcKind::Timesync).ic.time_synced(),
        }
    }
}

/// Drains a device's inbound ring.
fn process(dev: &mut Device, now: Instant) {
    let Some(ch) = dev.channel.as_mut() else {
        return;
    };
    match dev.ic.process(ch, now) {
        Ok(events) => {
            for e in events {
                match e {
                    IcEvent::Negotiated { .. } => {
                        tracing::info!("{:?} service negotiated", dev.ic.kind())
                    }
                    IcEvent::ShutdownResponse { status } => {
                        tracing::info!("guest answered the shutdown request: status {status:#x}")
                    }
                    other => tracing::trace!("{:?}: {other:?}", dev.ic.kind()),
                }
            }
        }
        Err(e) => tracing::debug!("{:?}: {e}", dev.ic.kind()),
    }
}
