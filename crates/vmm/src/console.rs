//! The COM1 console hub: the guest's serial output goes to a replay buffer (the last
//! [`REPLAY_BYTES`]) and to any number of viewers; input comes from one writer at a time.
//!
//! - **Output.** The UART writes into [`Console::output`] under its lock, in the vCPU thread;
//!   that only appends to memory. Each viewer has its own queue and a thread that writes the
//!   queue to its sink (the terminal, the `--serial` file, a control-socket client), so a slow
//!   sink never holds up the guest or the other viewers. A viewer whose queue grows past
//!   [`VIEWER_BACKLOG`] is handled as its owner chose ([`WhenSlow`]): the local terminal and the
//!   log file lose the backlog and are told how much ([`WhenSlow::Drop`]); a control-socket
//!   client is disconnected ([`WhenSlow::Disconnect`]) and may re-attach, getting the replay.
//! - **Input.** [`Console::take_input`] hands out the one [`Writer`]; a second caller is refused
//!   ([`InputBusy`] names the holder) unless it forces a takeover, after which the old writer's
//!   sends fail with [`InputError::TakenOver`]. Bytes go into the UART's input queue and from
//!   there into its receive FIFO as the guest reads (see `chipset::serial`); a writer facing a
//!   full queue waits, so input is paced by the guest and nothing is lost.

use chipset::serial::InputQueue;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use support::lock;

/// Output kept for viewers that attach later.
pub const REPLAY_BYTES: usize = 1 << 20;
/// Output a viewer may have waiting (its replay included) before the hub gives up on it.
pub const VIEWER_BACKLOG: usize = 2 << 20;
/// How long a woken viewer lets output gather before writing it: the UART hands over one byte
/// per guest exit, and a write per byte would cost more than the exit.
const GATHER: Duration = Duration::from_millis(2);
/// How often a writer waiting for room rechecks whether it was taken over or the VM stopped.
const WRITER_RECHECK: Duration = Duration::from_millis(100);

static SLOW_LOG: support::RateLimit = support::RateLimit::guest();

/// What happens to a viewer that falls more than [`VIEWER_BACKLOG`] behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenSlow {
    /// Its backlog is discarded and it gets a line saying how many bytes it lost.
    Drop,
    /// It gets a line saying why, and is disconnected.
    Disconnect,
}

/// Why a viewer stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewerEnd {
    /// The VM stopped; the viewer got all output.
    Closed,
    /// Its owner detached it ([`Viewer::detach`]).
    Detached,
    /// It fell more than [`VIEWER_BACKLOG`] behind ([`WhenSlow::Disconnect`]).
    TooSlow,
    /// Writing to its sink failed.
    Failed(std::io::ErrorKind),
}

/// Another writer holds the console's input.
#[derive(Debug, thiserror::Error)]
#[error("the console's input is held by {holder}")]
pub struct InputBusy {
    pub holder: String,
}

/// Why input could not be sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("console input was taken over by {0}")]
    TakenOver(String),
    #[error("the VM has stopped")]
    Stopped,
    #[error("the sender went away")]
    Cancelled,
}

/// The hub. Built with the VM; shared by the UART, viewers and writers.
pub struct Console {
    state: Mutex<State>,
    /// Signalled when a viewer has gone, for [`Console::close`].
    viewer_gone: Condvar,
    uart: OnceLock<UartInput>,
}

/// Where input goes: the UART's queue, and how to move queued bytes into its FIFO.
struct UartInput {
    queue: Arc<InputQueue>,
    feed: Box<dyn Fn() + Send + Sync>,
}

#[derive(Default)]
struct State {
    replay: VecDeque<u8>,
    viewers: Vec<Slot>,
    next_id: u64,
    /// The writer's id and description.
    writer: Option<(u64, String)>,
    /// Writers whose input was taken over, and by whom (until they are dropped).
    revoked: Vec<(u64, String)>,
    closed: bool,
}

struct Slot {
    id: u64,
    name: String,
    queue: Vec<u8>,
    wake: Arc<Condvar>,
    when_slow: WhenSlow,
    /// Bytes discarded since the viewer last wrote ([`WhenSlow::Drop`]).
    dropped: u64,
    end: Option<ViewerEnd>,
}

impl State {
    fn slot(&mut self, id: u64) -> Option<&mut Slot> {
        self.viewers.iter_mut().find(|s| s.id == id)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

/// What a viewer thread does next.
enum Next {
    Write { bytes: Vec<u8>, dropped: u64 },
    End(ViewerEnd),
}

impl Console {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            viewer_gone: Condvar::new(),
            uart: OnceLock::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The UART's output sink.
    pub fn output(self: &Arc<Self>) -> Box<dyn Write + Send> {
        Box::new(Output(self.clone()))
    }

    /// Connects input to the UART: `queue` is its input queue, `feed` moves queued bytes into
    /// its receive FIFO (taking the UART's lock). Later calls are ignored.
    pub fn connect_uart(&self, queue: Arc<InputQueue>, feed: impl Fn() + Send + Sync + 'static) {
        let _ = self.uart.set(UartInput {
            queue,
            feed: Box::new(feed),
        });
    }

    /// Puts output from before this process (the console log of a VM saved earlier) at the
    /// front of the replay buffer, so that viewers attaching later see it too. Viewers already
    /// attached do not get it: they (the log file) have it.
    pub fn preload(&self, earlier: &[u8]) {
        let mut st = self.state();
        let room = REPLAY_BYTES.saturating_sub(st.replay.len());
        let earlier = &earlier[earlier.len().saturating_sub(room)..];
        for &b in earlier.iter().rev() {
            st.replay.push_front(b);
        }
    }

    fn append(&self, bytes: &[u8]) {
        let mut st = self.state();
        st.replay.extend(bytes);
        let excess = st.replay.len().saturating_sub(REPLAY_BYTES);
        st.replay.drain(..excess);
        for slot in st.viewers.iter_mut().filter(|s| s.end.is_none()) {
            let was_empty = slot.queue.is_empty();
            if slot.queue.len() + bytes.len() <= VIEWER_BACKLOG {
                slot.queue.extend_from_slice(bytes);
                if was_empty {
                    slot.wake.notify_one();
                }
                continue;
            }
            match slot.when_slow {
                WhenSlow::Drop => {
                    if slot.dropped == 0 {
                        support::limited!(SLOW_LOG, warn, viewer = %slot.name, "console: viewer fell {} MiB behind; its backlog is dropped", VIEWER_BACKLOG >> 20);
                    }
                    slot.dropped += (slot.queue.len() + bytes.len()) as u64;
                    slot.queue = Vec::new();
                }
                WhenSlow::Disconnect => {
                    support::limited!(SLOW_LOG, warn, viewer = %slot.name, "console: viewer fell {} MiB behind; disconnecting it", VIEWER_BACKLOG >> 20);
                    slot.queue = Vec::new();
                    slot.end = Some(ViewerEnd::TooSlow);
                }
            }
            slot.wake.notify_one();
        }
    }

    /// Attaches a viewer writing to `sink` from its own thread, starting with the replay
    /// buffer if `replay`. `name` is for log lines.
    pub fn attach(
        self: &Arc<Self>,
        name: &str,
        sink: Box<dyn Write + Send>,
        replay: bool,
        when_slow: WhenSlow,
    ) -> std::io::Result<Viewer> {
        let wake = Arc::new(Condvar::new());
        let id = {
            let mut st = self.state();
            let id = st.id();
            let queue = if replay {
                let (a, b) = st.replay.as_slices();
                [a, b].concat()
            } else {
                Vec::new()
            };
            st.viewers.push(Slot {
                id,
                name: name.to_string(),
                queue,
                wake: wake.clone(),
                when_slow,
                dropped: 0,
                end: None,
            });
            id
        };
        let console = self.clone();
        let end = Arc::new(OnceLock::new());
        let ended = end.clone();
        let spawned = std::thread::Builder::new()
            .name("console-viewer".into())
            .spawn(move || {
                let _ = ended.set(console.pump(id, &wake, sink));
                console.remove(id);
            });
        match spawned {
            Ok(_) => Ok(Viewer {
                console: self.clone(),
                id,
                end,
            }),
            Err(e) => {
                self.remove(id);
                Err(e)
            }
        }
    }

    /// The viewer thread: writes what the hub queues for viewer `id` until it ends. The
    /// caller removes the viewer afterwards.
    fn pump(&self, id: u64, wake: &Condvar, mut sink: Box<dyn Write + Send>) -> ViewerEnd {
        let end = loop {
            match self.next(id, wake) {
                Next::Write { bytes, dropped } => {
                    let mut result = Ok(());
                    if dropped > 0 {
                        let note = format!(
                            "\r\n[viridian: {dropped} bytes of console output dropped: this viewer fell behind]\r\n"
                        );
                        result = sink.write_all(note.as_bytes());
                    }
                    if let Err(e) = result
                        .and_then(|()| sink.write_all(&bytes))
                        .and_then(|()| sink.flush())
                    {
                        // A viewer disconnected while its write hung: that is the cause.
                        let recorded = self.state().slot(id).and_then(|s| s.end.clone());
                        break recorded.unwrap_or(ViewerEnd::Failed(e.kind()));
                    }
                }
                Next::End(end) => {
                    if end == ViewerEnd::TooSlow {
                        let _ = sink.write_all(
                            format!("\r\n[viridian: disconnected: this console viewer fell more than {} MiB behind the guest's output]\r\n", VIEWER_BACKLOG >> 20)
                                .as_bytes(),
                        );
                    }
                    let _ = sink.flush();
                    break end;
                }
            }
        };
        end
    }

    /// Waits until viewer `id` has output to write or has ended.
    fn next(&self, id: u64, wake: &Condvar) -> Next {
        let mut st = self.state();
        let mut gathered = false;
        loop {
            let closed = st.closed;
            let Some(slot) = st.slot(id) else {
                return Next::End(ViewerEnd::Detached);
            };
            if let Some(end) = &slot.end {
                return Next::End(end.clone());
            }
            let ready = !slot.queue.is_empty() || slot.dropped > 0;
            if ready && (gathered || closed) {
                return Next::Write {
                    bytes: std::mem::take(&mut slot.queue),
                    dropped: std::mem::take(&mut slot.dropped),
                };
            }
            if ready {
                drop(st);
                std::thread::sleep(GATHER);
                gathered = true;
                st = self.state();
                continue;
            }
            if closed {
                return Next::End(ViewerEnd::Closed);
            }
            st = wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn remove(&self, id: u64) {
        self.state().viewers.retain(|s| s.id != id);
        self.viewer_gone.notify_all();
    }

    /// Takes the console's input for `who`; with `force`, from whoever holds it.
    pub fn take_input(self: &Arc<Self>, who: &str, force: bool) -> Result<Writer, InputBusy> {
        let mut st = self.state();
        if let Some((_, holder)) = &st.writer {
            if !force {
                return Err(InputBusy {
                    holder: holder.clone(),
                });
            }
        }
        let id = st.id();
        if let Some((old, _)) = st.writer.replace((id, who.to_string())) {
            st.revoked.push((old, who.to_string()));
        }
        Ok(Writer {
            console: self.clone(),
            id,
        })
    }

    /// Who holds the input, if anyone.
    pub fn input_holder(&self) -> Option<String> {
        self.state().writer.as_ref().map(|(_, who)| who.clone())
    }

    /// The VM has stopped: viewers write what they have and end, writers fail. Waits up to
    /// `grace` for the viewers to finish.
    pub fn close(&self, grace: Duration) {
        let mut st = self.state();
        st.closed = true;
        for slot in &st.viewers {
            slot.wake.notify_one();
        }
        let deadline = Instant::now() + grace;
        while !st.viewers.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .viewer_gone
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The UART's sink.
struct Output(Arc<Console>);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One viewer, writing from its own thread.
pub struct Viewer {
    console: Arc<Console>,
    id: u64,
    /// Set by the viewer's thread when it ends, just before the viewer is removed.
    end: Arc<OnceLock<ViewerEnd>>,
}

impl Viewer {
    /// Queues a message for this viewer only, after the output it has not written yet.
    pub fn notice(&self, text: &str) {
        let mut st = self.console.state();
        if let Some(slot) = st.slot(self.id) {
            slot.queue.extend_from_slice(text.as_bytes());
            slot.wake.notify_one();
        }
    }

    /// Stops this viewer: output it has not written yet is discarded.
    pub fn detach(&self) {
        let mut st = self.console.state();
        if let Some(slot) = st.slot(self.id) {
            slot.end.get_or_insert(ViewerEnd::Detached);
            slot.queue = Vec::new();
            slot.wake.notify_one();
        }
    }

    /// Why the viewer ended, once it has.
    pub fn ended(&self) -> Option<ViewerEnd> {
        self.end.get().cloned()
    }

    /// Waits up to `timeout` for the viewer to end, and says why.
    pub fn wait(&self, timeout: Duration) -> Option<ViewerEnd> {
        let deadline = Instant::now() + timeout;
        let mut st = self.console.state();
        loop {
            // Set before the viewer is removed, which notifies under this lock.
            if let Some(end) = self.end.get() {
                return Some(end.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self
                .console
                .viewer_gone
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The console's input, held by one writer at a time; released when dropped.
pub struct Writer {
    console: Arc<Console>,
    id: u64,
}

impl Writer {
    fn check(&self) -> Result<(), InputError> {
        let st = self.console.state();
        if st.closed {
            return Err(InputError::Stopped);
        }
        if st.writer.as_ref().is_some_and(|(id, _)| *id == self.id) {
            return Ok(());
        }
        let by = st.revoked.iter().find(|(id, _)| *id == self.id);
        Err(InputError::TakenOver(by.map_or_else(
            || "another client".into(),
            |(_, who)| who.clone(),
        )))
    }

    /// Sends `bytes` to the guest, waiting while its input queue is full.
    pub fn send(&self, bytes: &[u8]) -> Result<(), InputError> {
        self.send_while(bytes, || true)
    }

    /// Sends `bytes` as [`Writer::send`] does, but while waiting for room it gives up once
    /// `wanted` says no (the sender went away).
    pub fn send_while(&self, bytes: &[u8], wanted: impl Fn() -> bool) -> Result<(), InputError> {
        let uart = self.console.uart.get().ok_or(InputError::Stopped)?;
        let (mut rest, mut waited) = (bytes, false);
        while !rest.is_empty() {
            self.check()?;
            if waited && !wanted() {
                return Err(InputError::Cancelled);
            }
            let n = uart.queue.push(rest);
            (uart.feed)();
            rest = &rest[n..];
            if !rest.is_empty() {
                uart.queue.wait_for_room(WRITER_RECHECK);
                waited = true;
            }
        }
        Ok(())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let mut st = self.console.state();
        if st.writer.as_ref().is_some_and(|(id, _)| *id == self.id) {
            st.writer = None;
        }
        st.revoked.retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chipset::serial::{Serial, INPUT_QUEUE_BYTES};

    const LONG: Duration = Duration::from_secs(10);

    /// A sink that keeps what it is given.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Capture {
        fn bytes(&self) -> Vec<u8> {
            lock(&self.0).clone()
        }
    }

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink whose writes block until the receiver is dropped (a viewer that stopped
    /// reading), then fail.
    struct Stuck(std::sync::mpsc::Receiver<()>);

    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Output as the UART gives it: one byte per write.
    fn emit(console: &Arc<Console>, bytes: &[u8]) {
        let mut out = console.output();
        for b in bytes {
            out.write_all(std::slice::from_ref(b)).unwrap();
        }
    }

    /// `n` bytes that differ from their neighbours for a long stretch.
    fn pattern(n: usize) -> Vec<u8> {
        (0..n as u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn replay_is_exactly_the_last_mib() {
        let console = Console::new();
        let all = pattern(REPLAY_BYTES + 12_345);
        let mut out = console.output();
        for chunk in all.chunks(4000) {
            out.write_all(chunk).unwrap();
        }
        let late = Capture::default();
        let viewer = console
            .attach("late", Box::new(late.clone()), true, WhenSlow::Disconnect)
            .unwrap();
        console.close(Duration::from_secs(10));
        assert_eq!(viewer.wait(LONG), Some(ViewerEnd::Closed));
        let got = late.bytes();
        assert_eq!(got.len(), REPLAY_BYTES);
        assert!(got == all[12_345..], "the replay is the tail of the output");
    }

    #[test]
    fn preloaded_output_comes_first_in_the_replay_and_not_to_attached_viewers() {
        let console = Console::new();
        let log = Capture::default();
        let v1 = console
            .attach("log", Box::new(log.clone()), true, WhenSlow::Drop)
            .unwrap();
        // More than the replay holds: only its last bytes are kept.
        let earlier = pattern(REPLAY_BYTES + 100);
        console.preload(&earlier);
        emit(&console, b"after");
        let late = Capture::default();
        let v2 = console
            .attach("late", Box::new(late.clone()), true, WhenSlow::Drop)
            .unwrap();
        console.close(Duration::from_secs(10));
        for v in [v1, v2] {
            assert_eq!(v.wait(LONG), Some(ViewerEnd::Closed));
        }
        assert_eq!(log.bytes(), b"after", "the log file has the earlier output");
        let got = late.bytes();
        assert_eq!(got.len(), REPLAY_BYTES);
        assert!(got.ends_with(b"after"));
        assert!(
            got[..REPLAY_BYTES - 5] == earlier[105..],
            "the tail of the earlier output"
        );
    }

    #[test]
    fn every_viewer_sees_the_whole_stream_once() {
        let console = Console::new();
        let text = pattern(50_000);
        let first = Capture::default();
        let v1 = console
            .attach("first", Box::new(first.clone()), true, WhenSlow::Drop)
            .unwrap();
        emit(&console, &text[..20_000]);
        // Attached mid-stream with the replay: no gap and nothing twice.
        let second = Capture::default();
        let v2 = console
            .attach("second", Box::new(second.clone()), true, WhenSlow::Drop)
            .unwrap();
        // Attached without the replay: only what follows.
        let live = Capture::default();
        let v3 = console
            .attach("live", Box::new(live.clone()), false, WhenSlow::Drop)
            .unwrap();
        emit(&console, &text[20_000..]);
        console.close(Duration::from_secs(10));
        for v in [v1, v2, v3] {
            assert_eq!(v.wait(LONG), Some(ViewerEnd::Closed));
        }
        assert!(first.bytes() == text);
        assert!(second.bytes() == text);
        assert!(live.bytes() == text[20_000..]);
    }

    #[test]
    fn a_slow_viewer_holds_up_neither_the_guest_nor_the_others() {
        let console = Console::new();
        let fast = Capture::default();
        let v_fast = console
            .attach("fast", Box::new(fast.clone()), true, WhenSlow::Disconnect)
            .unwrap();
        let (release_a, stuck_a) = std::sync::mpsc::channel();
        let v_gone = console
            .attach(
                "stuck",
                Box::new(Stuck(stuck_a)),
                true,
                WhenSlow::Disconnect,
            )
            .unwrap();
        let (release_b, stuck_b) = std::sync::mpsc::channel::<()>();
        let dropped_into = Capture::default();
        let sink_b = Capture::clone(&dropped_into);
        // Stuck for its first write, then a working sink.
        struct ThenCapture(Option<std::sync::mpsc::Receiver<()>>, Capture);
        impl Write for ThenCapture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                if let Some(rx) = self.0.take() {
                    let _ = rx.recv();
                }
                self.1.write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        emit(&console, b"x");
        let v_drop = console
            .attach(
                "lossy",
                Box::new(ThenCapture(Some(stuck_b), sink_b)),
                false,
                WhenSlow::Drop,
            )
            .unwrap();
        emit(&console, b"y");
        std::thread::sleep(Duration::from_millis(50));
        // Three times the backlog, at about 4 MB/s (a fast guest), while two viewers write
        // nothing: this finishes only if the stuck sinks hold up nobody.
        let text = pattern(3 * VIEWER_BACKLOG);
        let mut out = console.output();
        for chunk in text.chunks(4096) {
            out.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        // The stuck viewer is disconnected; its thread, stuck in a write, ends after that
        // write fails.
        assert!(console.state().slot(v_gone.id).unwrap().end == Some(ViewerEnd::TooSlow));
        drop(release_a);
        assert_eq!(v_gone.wait(LONG), Some(ViewerEnd::TooSlow));
        release_b.send(()).unwrap();
        emit(&console, b"tail");
        console.close(Duration::from_secs(10));
        assert_eq!(v_fast.wait(LONG), Some(ViewerEnd::Closed));
        assert_eq!(v_drop.wait(LONG), Some(ViewerEnd::Closed));
        let mut whole = b"xy".to_vec();
        whole.extend_from_slice(&text);
        whole.extend_from_slice(b"tail");
        assert!(fast.bytes() == whole, "the fast viewer got everything");
        let lossy = String::from_utf8_lossy(&dropped_into.bytes()).into_owned();
        assert!(lossy.starts_with('y'), "{}", &lossy[..40.min(lossy.len())]);
        assert!(lossy.contains("bytes of console output dropped"));
        assert!(lossy.ends_with("tail"));
    }

    #[test]
    fn a_detached_viewer_stops_and_the_others_go_on() {
        let console = Console::new();
        let a = Capture::default();
        let b = Capture::default();
        let va = console
            .attach("a", Box::new(a.clone()), true, WhenSlow::Drop)
            .unwrap();
        let vb = console
            .attach("b", Box::new(b.clone()), true, WhenSlow::Drop)
            .unwrap();
        va.detach();
        assert_eq!(va.wait(LONG), Some(ViewerEnd::Detached));
        emit(&console, b"after");
        console.close(Duration::from_secs(10));
        assert_eq!(vb.wait(LONG), Some(ViewerEnd::Closed));
        assert_eq!(a.bytes(), b"");
        assert_eq!(b.bytes(), b"after");
    }

    /// A console wired to a real UART, as the VMM does it.
    fn with_uart() -> (Arc<Console>, Arc<Mutex<Serial>>) {
        let console = Console::new();
        let serial = Serial::new(console.output()).unwrap();
        let input = serial.input();
        let serial = Arc::new(Mutex::new(serial));
        let uart = Arc::downgrade(&serial);
        console.connect_uart(input, move || {
            if let Some(s) = uart.upgrade() {
                lock(&s).feed();
            }
        });
        (console, serial)
    }

    #[test]
    fn one_writer_at_a_time_and_force_takes_over() {
        let (console, serial) = with_uart();
        let first = console.take_input("terminal", false).unwrap();
        let refused = console.take_input("socket client 1", false).err().unwrap();
        assert_eq!(refused.holder, "terminal");
        first.send(b"a").unwrap();
        let second = console.take_input("socket client 2", true).unwrap();
        assert_eq!(
            first.send(b"b"),
            Err(InputError::TakenOver("socket client 2".into()))
        );
        // The old writer going away does not release the new one's hold.
        drop(first);
        assert_eq!(console.input_holder().as_deref(), Some("socket client 2"));
        second.send(b"c").unwrap();
        let third = console.take_input("socket client 3", true).unwrap();
        drop(third);
        assert_eq!(console.input_holder(), None);
        // A writer that was taken over stays out, and says by whom, after the slot is free.
        assert_eq!(
            second.send(b"d"),
            Err(InputError::TakenOver("socket client 3".into()))
        );
        drop(second);
        assert!(console.state().revoked.is_empty());
        console.take_input("terminal", false).unwrap();
        let mut s = lock(&serial);
        assert_eq!([s.read(0), s.read(0)], *b"ac");
    }

    #[test]
    fn pasted_input_is_paced_by_the_guest_and_none_is_lost() {
        let (console, serial) = with_uart();
        let writer = console.take_input("paste", false).unwrap();
        let text = pattern(3 * INPUT_QUEUE_BYTES + 999);
        let sent = text.clone();
        let paste = std::thread::spawn(move || writer.send(&sent));
        // The guest: reads whatever the FIFO holds, pausing between loads.
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < text.len() && Instant::now() < deadline {
            {
                let mut s = lock(&serial);
                for _ in 0..64 {
                    if s.read(5) & 1 == 0 {
                        break;
                    }
                    got.push(s.read(0));
                }
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        paste.join().unwrap().unwrap();
        assert_eq!(got.len(), text.len());
        assert!(got == text);
    }

    #[test]
    fn closing_fails_a_waiting_writer() {
        let (console, _serial) = with_uart();
        let writer = console.take_input("paste", false).unwrap();
        let big = vec![b'z'; 2 * INPUT_QUEUE_BYTES];
        let paste = std::thread::spawn(move || writer.send(&big));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!paste.is_finished(), "the writer waits for the guest");
        console.close(Duration::ZERO);
        assert_eq!(paste.join().unwrap(), Err(InputError::Stopped));
    }

    #[test]
    fn a_waiting_writer_gives_up_when_its_sender_goes() {
        let (console, _serial) = with_uart();
        let writer = console.take_input("paste", false).unwrap();
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let big = vec![b'z'; 2 * INPUT_QUEUE_BYTES];
        let flag = gone.clone();
        let paste = std::thread::spawn(move || {
            let r = writer.send_while(&big, || !flag.load(std::sync::atomic::Ordering::SeqCst));
            (r, writer)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!paste.is_finished(), "the writer waits for the guest");
        gone.store(true, std::sync::atomic::Ordering::SeqCst);
        let (r, writer) = paste.join().unwrap();
        assert_eq!(r, Err(InputError::Cancelled));
        drop(writer);
        assert_eq!(console.input_holder(), None, "the input is free again");
    }
}
