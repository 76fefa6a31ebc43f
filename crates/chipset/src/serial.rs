//! COM1: a 16550A UART (vm-superio) whose interrupt is an eventfd the VMM wires to IRQ 4.

use std::io::Write;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// COM1's interrupt line.
pub const IRQ: u32 = 4;

/// Raises the UART interrupt by writing to an eventfd (registered with KVM as an irqfd).
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART and where its output goes.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART writing the guest's output to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(Self {
            uart: vm_superio::Serial::new(IrqTrigger(evt), out),
        })
    }

    /// The interrupt eventfd, to register as an irqfd for [`IRQ`].
    pub fn irq_eventfd(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    pub fn read(&mut self, offset: u16) -> u8 {
        self.uart.read(offset as u8)
    }

    pub fn write(&mut self, offset: u16, value: u8) {
        if let Err(e) = self.uart.write(offset as u8, value) {
            tracing::warn!("serial output failed: {e:?}");
        }
    }

    /// Queues console input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
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
}
