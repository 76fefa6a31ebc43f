//! Loopback netvsp over a real TAP device, no VM: the guest-side netvsc client on this
//! thread plays hv_netvsc (its interrupt masked while it drains, like NAPI) over the real
//! VMBus host and netvsp's worker thread.
//!
//! - guest to host: the guest streams 60-byte frames (up to 32 outstanding in send
//!   sections); the kernel counts them as received on the TAP.
//! - host to guest: a thread sends 60-byte frames out of the interface through an AF_PACKET
//!   socket; the guest counts what arrives and completes each receive batch.
//!
//! Each direction prints frames per second (wall clock), frames per CPU-second of the whole
//! process (guest thread, worker thread and, host to guest, the sender), and per frame the
//! guest's signals to the host, the host's interrupts to the guest and the worker's wake-ups.
//! Run (root, /dev/net/tun): `cargo bench -p netvsp --bench tap`; `NETVSP_BENCH_FRAMES`
//! (100000) frames each way. Syscalls per frame: run the bench binary under `strace -f -c`.
#![allow(unsafe_code)]

use guestmem::GuestMemory;
use hvdef::netvsp as nv;
use hvdef::vmbus::Guid;
use netvsp::client::Netvsc;
use netvsp::tap::{Tap, TapConfig};
use netvsp::{NetvspDevice, NicConfig, PortPolicy};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vmbus::client::{Client, LINUX_VERSIONS};
use vmbus::testing::{wait_event, GuestSynic, ThreadedTransport};
use vmbus::{HostConfig, VmbusHost};

const MEM: u64 = 64 << 20;
const MAC: [u8; 6] = [0x00, 0x15, 0x5d, 0x0b, 0x0e, 0x0c];
const WINDOW: u64 = 32;
/// Frames the host-to-guest sender keeps in flight.
const IN_FLIGHT: u64 = 256;

/// Process CPU time (user + system, all threads) from /proc/self/stat, in 10 ms ticks.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn sys_u64(name: &str, file: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/{file}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0x5a; 60];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    // A local experimental ethertype: the host stack counts and drops it.
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// An AF_PACKET socket bound for sending out of interface `index`.
struct PacketSocket {
    fd: OwnedFd,
    addr: libc::sockaddr_ll,
}

impl PacketSocket {
    fn new(index: i32, dst: [u8; 6]) -> Self {
        // SAFETY: a plain socket(2); the descriptor is owned at once.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(raw >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst);
        Self { fd, addr }
    }

    fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: the buffer and address are valid for the call and sized as passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&self.addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        n == frame.len() as isize
    }
}

struct Sample {
    frames: u64,
    wall: Duration,
    cpu: Duration,
    guest_signals: u64,
    guest_interrupts: u64,
    wakeups: u64,
}

impl Sample {
    fn print(&self, what: &str) {
        let n = self.frames.max(1) as f64;
        println!(
            "{what}: {} frames, {:.0} frames/s, {:.0} frames per CPU-second, per frame: \
             {:.3} guest signals, {:.3} guest interrupts, {:.3} worker wake-ups",
            self.frames,
            n / self.wall.as_secs_f64(),
            n / self.cpu.as_secs_f64().max(0.01),
            self.guest_signals as f64 / n,
            self.guest_interrupts as f64 / n,
            self.wakeups as f64 / n,
        );
    }
}

fn worker_wakeups(host: &VmbusHost) -> u64 {
    let v = host.inspect().unwrap_or_default();
    v["devices"][0]["channels"][0]["worker"]["wakeups"]
        .as_u64()
        .unwrap_or(0)
}

/// Drains the host's packets like hv_netvsc's NAPI poll: masked while reading, unmasked,
/// then looked at once more.
fn napi(g: &mut Netvsc) {
    g.ch.channel.set_interrupt_mask(true).expect("mask");
    while g.pump() > 0 {}
    g.ch.channel.set_interrupt_mask(false).expect("unmask");
    g.pump();
}

fn main() {
    let frames: u64 = std::env::var("NETVSP_BENCH_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let name = format!("nvb{}", std::process::id() % 100_000);
    let tap = match Tap::open(&TapConfig {
        name: Some(name.clone()),
        queues: 1,
        offload: true,
        mtu: 1500,
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("skipped: cannot create a TAP device here: {e}");
            return;
        }
    };
    let mem = GuestMemory::new(&[(0, MEM)]).unwrap();
    let synic = GuestSynic::new(64);
    let host = VmbusHost::start(HostConfig::default(), mem.clone(), synic.clone()).unwrap();
    let dev = NetvspDevice::new(
        NicConfig {
            instance_id: Guid::from_u128(0xbe4c),
            mac: MAC,
            mtu: 1500,
            max_queues: 1,
            policy: PortPolicy::default(),
        },
        mem.clone(),
        tap,
    )
    .unwrap();
    host.add_device(dev.clone()).unwrap();
    let mut client = Client::new(
        ThreadedTransport::new(host.clone(), synic.clone()),
        mem,
        1 << 20,
        MEM - (1 << 20),
    );
    client.connect(&LINUX_VERSIONS).unwrap();
    client.request_offers().unwrap();
    let relid = client.find_offer(nv::INTERFACE).unwrap().relid;
    let event = synic.event(relid);
    let mut g = Netvsc::open(&mut client, host.clone(), event.clone(), relid, 64);
    assert!(g.negotiate(&[nv::version::V61]).is_some());
    assert_eq!(g.give_buffers(&mut client, 512, 256), (1, 1));
    g.bring_up();

    // Guest to host.
    let out = frame([0x02, 0, 0, 0, 0, 1], MAC);
    let rx0 = sys_u64(&name, "statistics/rx_packets");
    let (s0, i0, w0) = (
        g.ch.channel.signals_sent(),
        dev.stats().guest_interrupts,
        worker_wakeups(&host),
    );
    let (t0, c0) = (Instant::now(), cpu_time());
    let mut window = std::collections::VecDeque::new();
    for i in 0..frames {
        if window.len() as u64 >= WINDOW {
            let tid = window.pop_front().expect("full");
            while !g.completed(tid) {
                if !wait_event(&event, Duration::from_secs(5)) {
                    panic!("no completion for {tid}");
                }
                napi(&mut g);
            }
        }
        window.push_back(g.post_frame(&out, (i % WINDOW) as u32 + 1));
    }
    for tid in window {
        while !g.completed(tid) {
            wait_event(&event, Duration::from_millis(100));
            napi(&mut g);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while sys_u64(&name, "statistics/rx_packets") < rx0 + frames && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    Sample {
        frames: sys_u64(&name, "statistics/rx_packets") - rx0,
        wall: t0.elapsed(),
        cpu: cpu_time() - c0,
        guest_signals: g.ch.channel.signals_sent() - s0,
        guest_interrupts: dev.stats().guest_interrupts - i0,
        wakeups: worker_wakeups(&host) - w0,
    }
    .print("guest to host");

    // Host to guest.
    let index = sys_u64(&name, "ifindex") as i32;
    let (s0, i0, w0) = (
        g.ch.channel.signals_sent(),
        dev.stats().guest_interrupts,
        worker_wakeups(&host),
    );
    let (t0, c0) = (Instant::now(), cpu_time());
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sender = {
        let received = received.clone();
        std::thread::spawn(move || {
            let sock = PacketSocket::new(index, MAC);
            let back = frame(MAC, [0x02, 0, 0, 0, 0, 2]);
            let mut sent = 0u64;
            // At most a TAP queue's worth in flight, so that the kernel drops none.
            while sent < frames {
                if sent - received.load(Ordering::Relaxed) >= IN_FLIGHT {
                    std::thread::yield_now();
                } else if sock.send(&back) {
                    sent += 1;
                }
            }
        })
    };
    let mut got = 0u64;
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_millis(200) {
        wait_event(&event, Duration::from_millis(20));
        napi(&mut g);
        let n = g
            .frames()
            .iter()
            .filter(|f| f.data[6..12] == [2, 0, 0, 0, 0, 2])
            .count();
        if n > 0 {
            got += n as u64;
            received.store(got, Ordering::Relaxed);
            last = Instant::now();
        }
        if !sender.is_finished() {
            last = last.max(Instant::now() - Duration::from_millis(100));
        }
    }
    let wall = last - t0;
    Sample {
        frames: got,
        wall,
        cpu: cpu_time() - c0,
        guest_signals: g.ch.channel.signals_sent() - s0,
        guest_interrupts: dev.stats().guest_interrupts - i0,
        wakeups: worker_wakeups(&host) - w0,
    }
    .print("host to guest");
    println!(
        "host to guest: {frames} frames sent, {} dropped by the TAP",
        sys_u64(&name, "statistics/tx_dropped")
    );
    host.stop();
}
