//! COM1: a 16550A UART (vm-superio) whose interrupt is an eventfd the VMM wires to IRQ 4.
//!
//! Input has two stages: an [`InputQueue`] (up to [`INPUT_QUEUE_BYTES`], filled by the host's
//! console) and the UART's 64-byte receive FIFO. Queued bytes move into the FIFO when the host
//! adds them and whenever the guest has read the FIFO empty; each refill raises the
//! received-data interrupt as the UART does when data arrives. A writer facing a full queue
//! waits for room ([`InputQueue::wait_for_room`]), so pasted text is paced by the guest, not
//! lost.

use crate::RestoreError;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// COM1's interrupt line.
pub const IRQ: u32 = 4;

/// Console input queued in front of the receive FIFO.
pub const INPUT_QUEUE_BYTES: usize = 64 * 1024;

/// The receive buffer register's offset (the divisor latch when DLAB is set).
const DATA: u16 = 0;
/// The modem control register's offset, and its loopback bit.
const MCR: u8 = 4;
const MCR_LOOP: u8 = 0x10;

/// Raises the UART interrupt by writing to an eventfd (registered with KVM as an irqfd).
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Console input waiting for room in the receive FIFO.
#[derive(Default)]
pub struct InputQueue {
    state: Mutex<QueueState>,
    room: Condvar,
}

#[derive(Default)]
struct QueueState {
    bytes: VecDeque<u8>,
    /// A writer waits in [`InputQueue::wait_for_room`]: the next drain wakes it.
    waiting: bool,
}

impl InputQueue {
    /// Appends as much of `input` as fits; returns how many bytes were taken.
    pub fn push(&self, input: &[u8]) -> usize {
        let mut s = support::lock(&self.state);
        let n = input.len().min(INPUT_QUEUE_BYTES - s.bytes.len());
        s.bytes.extend(&input[..n]);
        n
    }

    /// Waits until the queue has room or `timeout` passes; returns whether it has room.
    pub fn wait_for_room(&self, timeout: Duration) -> bool {
        let mut s = support::lock(&self.state);
        if s.bytes.len() < INPUT_QUEUE_BYTES {
            return true;
        }
        s.waiting = true;
        let (s, _) = self
            .room
            .wait_timeout_while(s, timeout, |s| s.bytes.len() >= INPUT_QUEUE_BYTES)
            .unwrap_or_else(|e| e.into_inner());
        s.bytes.len() < INPUT_QUEUE_BYTES
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        support::lock(&self.state).bytes.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes up to `max` bytes from the front.
    fn take(&self, max: usize) -> Vec<u8> {
        let mut s = support::lock(&self.state);
        let n = max.min(s.bytes.len());
        let out: Vec<u8> = s.bytes.drain(..n).collect();
        if n > 0 && s.waiting {
            s.waiting = false;
            self.room.notify_all();
        }
        out
    }
}

/// Where the guest's output goes; shared so that a restored UART writes to the same place.
#[derive(Clone)]
struct Output(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        support::lock(&self.0).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        support::lock(&self.0).flush()
    }
}

type Uart = vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, Output>;

/// The UART, where its output goes, and its queued input.
pub struct Serial {
    uart: Uart,
    input: Arc<InputQueue>,
    /// The receive FIFO's size (its free room when empty).
    fifo_size: usize,
}

impl Serial {
    /// A UART writing the guest's output to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let uart = vm_superio::Serial::new(IrqTrigger(evt), Output(Arc::new(Mutex::new(out))));
        Ok(Self {
            fifo_size: uart.fifo_capacity(),
            uart,
            input: Arc::default(),
        })
    }

    /// The interrupt eventfd, to register as an irqfd for [`IRQ`].
    pub fn irq_eventfd(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// The input queue, for a console writer: push to it, then call [`Serial::feed`].
    pub fn input(&self) -> Arc<InputQueue> {
        self.input.clone()
    }

    pub fn read(&mut self, offset: u16) -> u8 {
        let value = self.uart.read(offset as u8);
        // Refill only once the guest has read the FIFO empty: one interrupt per FIFO load,
        // not one per byte.
        if offset == DATA && self.uart.fifo_capacity() == self.fifo_size {
            self.feed();
        }
        value
    }

    pub fn write(&mut self, offset: u16, value: u8) {
        if let Err(e) = self.uart.write(offset as u8, value) {
            tracing::warn!("serial output failed: {e:?}");
        }
    }

    /// Moves queued input into the receive FIFO as far as it has room, raising the
    /// received-data interrupt if the guest enabled it.
    pub fn feed(&mut self) {
        let room = self.uart.fifo_capacity();
        // In loopback mode (the driver probing the UART) the receiver is cut off from the
        // line: input waits in the queue.
        if room == 0 || self.uart.read(MCR) & MCR_LOOP != 0 {
            return;
        }
        let bytes = self.input.take(room);
        if !bytes.is_empty() {
            // The FIFO has room for all of them, so this cannot fail.
            let _ = self.uart.enqueue_raw_bytes(&bytes);
        }
    }

    /// Queues console input for the guest and fills the receive FIFO; returns how many bytes
    /// were taken (the rest did not fit in the input queue).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let n = self.input.push(input);
        self.feed();
        n
    }

    /// The UART's registers and receive FIFO (queued console input is not part of it).
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }

    /// Puts the UART's registers and receive FIFO back, keeping its output and interrupt.
    /// A pending interrupt the state shows is raised again.
    pub fn set_state(
        &mut self,
        state: &vm_superio::serial::SerialState,
    ) -> Result<(), RestoreError> {
        if state.in_buffer.len() > self.fifo_size {
            return Err(RestoreError(format!(
                "COM1: {} bytes in a {}-byte receive FIFO",
                state.in_buffer.len(),
                self.fifo_size
            )));
        }
        let evt =
            self.uart.interrupt_evt().0.try_clone().map_err(|e| {
                RestoreError(format!("COM1: cannot share the interrupt eventfd: {e}"))
            })?;
        let out = self.uart.writer_mut().clone();
        self.uart = Uart::from_state(state, IrqTrigger(evt), vm_superio::serial::NoEvents, out)
            .map_err(|e| RestoreError(format!("COM1: {e}")))?;
        Ok(())
    }

    /// Flushes the output sink.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_reaches_the_sink_and_raises_the_interrupt() {
        let cap = Capture::default();
        let mut s = Serial::new(Box::new(cap.clone())).unwrap();
        s.write(1, 0x02); // IER: THR empty interrupt
        let _ = s.irq_eventfd().read();
        // Reading IIR acknowledges the pending THR-empty interrupt.
        assert_eq!(s.read(2) & 0x0f, 0x02);
        for b in b"ok\n" {
            s.write(0, *b);
        }
        assert_eq!(&*cap.0.lock().unwrap(), b"ok\n");
        assert!(s.irq_eventfd().read().unwrap() >= 1);
        // Line status: transmitter empty.
        assert_ne!(s.read(5) & 0x20, 0);
    }

    /// Reads up to `max` bytes the way Linux's 8250 driver does: while LSR says data ready.
    fn drain(s: &mut Serial, max: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < max && s.read(5) & 0x01 != 0 {
            got.push(s.read(0));
        }
        got
    }

    #[test]
    fn queued_input_reaches_the_guest_in_order_one_interrupt_per_fifo_load() {
        let mut s = Serial::new(Box::new(std::io::sink())).unwrap();
        s.write(1, 0x01); // IER: received data available
        let text: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        assert_eq!(s.enqueue_input(&text), text.len());
        assert_eq!(s.input().len(), text.len() - 64, "the FIFO holds 64 bytes");
        assert_eq!(s.irq_eventfd().read().unwrap(), 1);
        let mut got = Vec::new();
        let mut interrupts = 0;
        while got.len() < text.len() {
            // The interrupt handler: IIR says received data, then the FIFO is drained.
            assert_eq!(s.read(2) & 0x0f, 0x04, "after {} bytes", got.len());
            // Linux reads at most 256 bytes per interrupt.
            got.extend(drain(&mut s, 256));
            if let Ok(n) = s.irq_eventfd().read() {
                interrupts += n;
            }
        }
        assert_eq!(got, text);
        assert!(s.input().is_empty());
        assert_eq!(s.read(5) & 0x01, 0, "nothing left");
        // One interrupt per refill of 64 bytes (the first load's was read above).
        assert_eq!(interrupts, (1000 / 64) as u64);
    }

    #[test]
    fn a_full_queue_refuses_more_and_wakes_a_waiting_writer_when_drained() {
        let mut s = Serial::new(Box::new(std::io::sink())).unwrap();
        let big = vec![b'x'; INPUT_QUEUE_BYTES + 64 + 10];
        assert_eq!(s.enqueue_input(&big), INPUT_QUEUE_BYTES);
        let q = s.input();
        assert_eq!(q.len(), INPUT_QUEUE_BYTES - 64);
        assert_eq!(q.push(&big), 64);
        assert_eq!(q.push(b"y"), 0);
        assert!(!q.wait_for_room(Duration::from_millis(1)));
        let waiter = std::thread::spawn(move || q.wait_for_room(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(drain(&mut s, 64).len(), 64);
        assert!(waiter.join().unwrap(), "the refill made room");
        assert_eq!(s.input().len(), INPUT_QUEUE_BYTES - 64);
    }

    #[test]
    fn input_waits_while_the_uart_is_in_loopback() {
        let mut s = Serial::new(Box::new(std::io::sink())).unwrap();
        s.write(4, 0x10); // MCR: loopback, as the driver's probe sets it
        assert_eq!(s.enqueue_input(b"hi"), 2);
        assert_eq!(drain(&mut s, 10), b"");
        s.write(4, 0x08);
        s.feed();
        assert_eq!(drain(&mut s, 10), b"hi");
    }
}
