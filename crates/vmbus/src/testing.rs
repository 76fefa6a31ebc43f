//! A threaded stand-in for the hypervisor, for tests and benchmarks of the run-time host:
//! [`GuestSynic`] receives what the host sends to the guest (messages into a bounded inbox,
//! event flags as one eventfd per relid), and [`ThreadedTransport`] is the guest's side of
//! the hypercalls, so the guest-side [`crate::client::Client`] runs on its own thread against
//! the real control thread and device workers.

use crate::channel::{Channel, ChannelError};
use crate::client::{GuestChannel, Transport};
use crate::host::{Doorbell, PostFailure, Synic, VmbusHost};
use hvdef::hv::HvStatus;
use hvdef::vmbus::MAX_RELID;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The guest's SynIC as the host sees it.
pub struct GuestSynic {
    inbox: Mutex<VecDeque<Vec<u8>>>,
    arrived: Condvar,
    /// Messages the inbox holds before the host gets QueueFull (the SynIC queue depth).
    pub capacity: usize,
    events: Mutex<HashMap<u32, Arc<Doorbell>>>,
    /// Host-to-guest interrupts, all channels.
    pub interrupts: AtomicU64,
    /// Doorbells the host routed to the "hypervisor" ([`Synic::route_signal`]), by connection
    /// id: [`GuestSynic::signal`] rings them as KVM's ioeventfds do.
    routes: Mutex<HashMap<u32, Arc<Doorbell>>>,
    /// Every route (true) and unroute (false) call, in order.
    pub route_log: Mutex<Vec<(u32, bool)>>,
    /// Guest signals that rang a routed doorbell, bypassing the host.
    pub routed_signals: AtomicU64,
}

impl GuestSynic {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            inbox: Mutex::default(),
            arrived: Condvar::new(),
            capacity,
            events: Mutex::default(),
            interrupts: AtomicU64::new(0),
            routes: Mutex::default(),
            route_log: Mutex::default(),
            routed_signals: AtomicU64::new(0),
        })
    }

    /// The guest's HvSignalEvent as the hypervisor carries it: straight to the doorbell the
    /// host routed for `connection_id`, or else through [`VmbusHost::signal_event`].
    pub fn signal(&self, host: &VmbusHost, connection_id: u32) -> HvStatus {
        if let Some(d) = support::lock(&self.routes).get(&connection_id) {
            d.ring();
            self.routed_signals.fetch_add(1, Ordering::Relaxed);
            return HvStatus::SUCCESS;
        }
        host.signal_event(connection_id)
    }

    /// Connection ids routed now.
    pub fn routed(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = support::lock(&self.routes).keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The eventfd that channel `relid`'s host-to-guest interrupts ring.
    pub fn event(&self, relid: u32) -> Arc<Doorbell> {
        support::lock(&self.events)
            .entry(relid)
            .or_insert_with(|| Arc::new(Doorbell::new().expect("eventfd")))
            .clone()
    }

    /// Waits up to `timeout` for the next message.
    pub fn next_message(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut inbox = support::lock(&self.inbox);
        loop {
            if let Some(m) = inbox.pop_front() {
                return Some(m);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            inbox = self
                .arrived
                .wait_timeout(inbox, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Messages waiting.
    pub fn queued(&self) -> usize {
        support::lock(&self.inbox).len()
    }
}

impl Synic for GuestSynic {
    fn post_message(&self, _vp: u32, _sint: u8, message: &[u8]) -> Result<(), PostFailure> {
        let mut inbox = support::lock(&self.inbox);
        if inbox.len() >= self.capacity {
            return Err(PostFailure::QueueFull);
        }
        inbox.push_back(message.to_vec());
        self.arrived.notify_all();
        Ok(())
    }

    fn signal_event(&self, _vp: u32, _sint: u8, flag: u32) {
        if flag <= MAX_RELID {
            self.interrupts.fetch_add(1, Ordering::Relaxed);
            self.event(flag).ring();
        }
    }

    fn route_signal(&self, connection_id: u32, doorbell: &Arc<Doorbell>) {
        support::lock(&self.route_log).push((connection_id, true));
        support::lock(&self.routes).insert(connection_id, doorbell.clone());
    }

    fn unroute_signal(&self, connection_id: u32) {
        support::lock(&self.route_log).push((connection_id, false));
        support::lock(&self.routes).remove(&connection_id);
    }
}

/// The guest's hypercalls, against a running [`VmbusHost`].
pub struct ThreadedTransport {
    pub host: VmbusHost,
    pub synic: Arc<GuestSynic>,
    /// How long `next_message` waits.
    pub timeout: Duration,
    /// HvPostMessage calls answered INSUFFICIENT_BUFFERS (and retried, as Linux does).
    pub retries: u64,
}

impl ThreadedTransport {
    pub fn new(host: VmbusHost, synic: Arc<GuestSynic>) -> Self {
        Self {
            host,
            synic,
            timeout: Duration::from_secs(10),
            retries: 0,
        }
    }
}

impl Transport for ThreadedTransport {
    fn post_message(&mut self, connection_id: u32, data: &[u8]) -> Result<(), u16> {
        // Linux retries HV_STATUS_INSUFFICIENT_BUFFERS with a growing delay.
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.host.post_message(connection_id, 0, data) {
                HvStatus::INSUFFICIENT_BUFFERS if Instant::now() < deadline => {
                    self.retries += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                HvStatus::SUCCESS => return Ok(()),
                s => return Err(s.0),
            }
        }
    }

    fn next_message(&mut self) -> Option<Vec<u8>> {
        self.synic.next_message(self.timeout)
    }

    fn signal_event(&mut self, connection_id: u32) -> Result<(), u16> {
        match self.synic.signal(&self.host, connection_id) {
            HvStatus::SUCCESS => Ok(()),
            s => Err(s.0),
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes; true if readable. Clears it.
pub fn wait_event(event: &Doorbell, timeout: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(event, PollFlags::IN)];
    let ts = Timespec::try_from(timeout).ok();
    let ready = matches!(poll(&mut fds, ts.as_ref()), Ok(n) if n > 0);
    if ready {
        event.clear();
    }
    ready
}

/// Interface type of the [`Echo`] test device.
pub const ECHO: hvdef::vmbus::Guid =
    hvdef::vmbus::Guid::from_u128(0xec40_0000_0000_0000_0000_0000_0000_0000);

/// A test device that answers every in-band packet with a completion carrying the same
/// payload. One packet in seven is held back and completed after the ones behind it, so
/// completions arrive out of order. With `subchannels`, it asks for that many subchannels
/// when its primary opens, and it records MODIFYCHANNEL retargets.
#[derive(Default)]
pub struct Echo {
    pub subchannels: u16,
    pub retargets: Arc<Mutex<Vec<(u16, u32)>>>,
}

impl crate::Device for Echo {
    fn offer(&self) -> crate::DeviceOffer {
        let mut o = crate::DeviceOffer::new("echo", ECHO, hvdef::vmbus::Guid::ZERO);
        o.max_subchannels = self.subchannels;
        o
    }

    fn open(
        &self,
        ch: crate::OpenedChannel,
    ) -> Result<Box<dyn crate::ChannelWorker>, crate::OpenError> {
        if ch.index == 0 && self.subchannels > 0 {
            ch.bus.add_subchannels(self.subchannels);
        }
        Ok(Box::new(EchoWorker::default()))
    }

    fn retarget(&self, index: u16, vp: u32) {
        support::lock(&self.retargets).push((index, vp));
    }

    fn inspect(&self) -> serde_json::Value {
        serde_json::json!({ "kind": "echo" })
    }
}

#[derive(Default)]
struct EchoWorker {
    buf: Vec<u8>,
    held: Option<(u64, Vec<u8>)>,
    out: VecDeque<(u64, Vec<u8>)>,
}

impl EchoWorker {
    fn flush(&mut self, ch: &mut Channel) -> Result<bool, crate::WorkerError> {
        while let Some((id, payload)) = self.out.front() {
            match ch.send_completion(*id, payload) {
                Ok(()) => {
                    self.out.pop_front();
                }
                Err(ChannelError::Full) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }
}

impl crate::ChannelWorker for EchoWorker {
    fn process(
        &mut self,
        ch: &mut Channel,
        _now: Instant,
    ) -> Result<crate::Progress, crate::WorkerError> {
        use crate::Progress;
        if !self.flush(ch)? {
            return Ok(Progress::WaitingForRoom);
        }
        while let Some(p) = ch.try_recv(&mut self.buf)? {
            let (id, payload) = (p.transaction_id(), p.payload().to_vec());
            if id % 7 == 3 && self.held.is_none() {
                self.held = Some((id, payload));
                continue;
            }
            self.out.push_back((id, payload));
            if let Some(h) = self.held.take() {
                self.out.push_back(h);
            }
            if !self.flush(ch)? {
                return Ok(Progress::WaitingForRoom);
            }
        }
        if let Some(h) = self.held.take() {
            self.out.push_back(h);
        }
        Ok(if self.flush(ch)? {
            Progress::Idle
        } else {
            Progress::WaitingForRoom
        })
    }
}

/// What the guest end of an echo channel sends.
#[derive(Debug, Clone)]
pub struct EchoLoad {
    /// Packets to send (`u64::MAX` with `stop` for "until stopped").
    pub count: u64,
    /// Most packets outstanding at once.
    pub window: usize,
    /// Payload size; `None` for random sizes below 2000 bytes.
    pub size: Option<usize>,
    pub seed: u64,
    /// Ends the load early when set.
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Record each packet's round trip (meaningful with `window` 1).
    pub latencies: bool,
}

impl EchoLoad {
    pub fn new(count: u64) -> Self {
        Self {
            count,
            window: 256,
            size: None,
            seed: 1,
            stop: None,
            latencies: false,
        }
    }
}

/// What a guest thread saw on one echo channel.
#[derive(Debug, Default)]
pub struct Traffic {
    pub sent: u64,
    pub completed: u64,
    /// Times the guest slept on its channel event.
    pub waits: u64,
    /// Round trips, when asked for.
    pub latencies: Vec<Duration>,
}

/// A small deterministic PRNG (xorshift) for tests.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The guest end of an [`Echo`] channel: sends packets (at most `window` outstanding), checks
/// every completion (each id exactly once, same bytes), and follows the signalling rules:
/// HvSignalEvent when the ring says so, and sleep on the channel's event only when nothing
/// could be done. Panics on a lost, duplicated or changed packet, and on a stall of 10 s.
pub fn run_echo(
    mut ch: GuestChannel,
    host: &VmbusHost,
    synic: &GuestSynic,
    load: &EchoLoad,
) -> (Traffic, GuestChannel) {
    let event = synic.event(ch.relid);
    let mut rng = Rng(load.seed | 1);
    let mut outstanding: HashMap<u64, (usize, u8, Instant)> = HashMap::new();
    let mut t = Traffic::default();
    let signal = |ch: &mut GuestChannel| {
        if ch.channel.take_signal() {
            let _ = synic.signal(host, ch.connection_id);
        }
    };
    let stopped = || {
        load.stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    };
    let mut idle_since = Instant::now();
    let mut payload = Vec::new();
    while t.completed < load.count && !stopped() {
        let mut progress = false;
        while t.sent < load.count && outstanding.len() < load.window {
            let len = load.size.unwrap_or((rng.next() % 2000) as usize);
            let byte = rng.next() as u8;
            payload.clear();
            payload.resize(len, byte);
            match ch.channel.send_inband(t.sent, &payload, true) {
                Ok(()) => {
                    outstanding.insert(t.sent, (len, byte, Instant::now()));
                    t.sent += 1;
                    progress = true;
                }
                Err(ChannelError::Full) => break,
                Err(e) => panic!("guest send: {e}"),
            }
        }
        signal(&mut ch);
        loop {
            match ch.channel.recv_owned() {
                Ok(Some(p)) => {
                    assert_eq!(p.packet_type, hvdef::vmbus::packet_type::COMPLETION);
                    let (len, byte, sent_at) =
                        outstanding.remove(&p.transaction_id).unwrap_or_else(|| {
                            panic!("completion {} unknown or twice", p.transaction_id)
                        });
                    if load.latencies {
                        t.latencies.push(sent_at.elapsed());
                    }
                    assert_eq!(p.payload.len(), len.next_multiple_of(8));
                    assert!(
                        p.payload[..len].iter().all(|&b| b == byte),
                        "payload changed"
                    );
                    t.completed += 1;
                    progress = true;
                }
                Ok(None) => break,
                Err(e) => panic!("guest receive: {e}"),
            }
        }
        signal(&mut ch);
        if progress {
            idle_since = Instant::now();
            continue;
        }
        t.waits += 1;
        let patience = if load.stop.is_some() { 10 } else { 1000 };
        if !wait_event(&event, Duration::from_millis(patience)) && load.stop.is_none() {
            assert!(
                idle_since.elapsed() < Duration::from_secs(10),
                "stalled: {} sent, {} completed, {} outstanding",
                t.sent,
                t.completed,
                outstanding.len()
            );
        }
    }
    (t, ch)
}
