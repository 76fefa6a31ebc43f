//! The run-time host with real threads and eventfds, as storage and networking will use it:
//! guest threads on echo channels against the device workers, through the control thread,
//! the port table and the doorbells. Reports packets per second (256 outstanding per
//! channel) and round-trip latency (one outstanding: guest send to the completion seen by
//! the guest, woken by its channel interrupt), median and p99.
//!
//! `cargo bench -p vmbus --bench threaded` (VMBUS_BENCH_PACKETS sets the packets per run).

use guestmem::GuestMemory;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmbus::client::{Client, LINUX_VERSIONS};
use vmbus::testing::{run_echo, Echo, EchoLoad, GuestSynic, ThreadedTransport};
use vmbus::{Device, DeviceOffer, HostConfig, OpenedChannel, ServerConfig, VmbusHost};

/// An [`Echo`] device with its own instance id.
struct Numbered(Echo, u32);

impl Device for Numbered {
    fn offer(&self) -> DeviceOffer {
        let mut o = self.0.offer();
        o.params.instance_id = hvdef::vmbus::Guid::from_u128(u128::from(self.1) + 1);
        o
    }
    fn open(&self, ch: OpenedChannel) -> Result<Box<dyn vmbus::ChannelWorker>, vmbus::OpenError> {
        self.0.open(ch)
    }
}

fn run(channels: u32, size: usize, load: EchoLoad) -> (Duration, Vec<vmbus::testing::Traffic>) {
    let mem = GuestMemory::new(&[(0, 64 << 20)]).unwrap();
    let synic = GuestSynic::new(64);
    let config = HostConfig {
        server: ServerConfig {
            vp_count: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let host = VmbusHost::start(config, mem.clone(), synic.clone()).unwrap();
    for n in 0..channels {
        host.add_device(Arc::new(Numbered(Echo::default(), n)))
            .unwrap();
    }
    let mut client = Client::new(
        ThreadedTransport::new(host.clone(), synic.clone()),
        mem,
        1 << 20,
        63 << 20,
    );
    client.connect(&LINUX_VERSIONS).unwrap();
    let offers = client.request_offers().unwrap();
    // 64 KiB rings each way, as storvsc and netvsc use at least.
    let chans: Vec<_> = offers
        .iter()
        .map(|o| client.open_channel(o.relid, 16, 16, 0).unwrap())
        .collect();
    let load = EchoLoad {
        size: Some(size),
        ..load
    };
    let start = Instant::now();
    let threads: Vec<_> = chans
        .into_iter()
        .map(|ch| {
            let (host, synic, load) = (host.clone(), synic.clone(), load.clone());
            std::thread::spawn(move || run_echo(ch, &host, &synic, &load).0)
        })
        .collect();
    let traffic: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let elapsed = start.elapsed();
    host.stop();
    (elapsed, traffic)
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let packets: u64 = std::env::var("VMBUS_BENCH_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2000 } else { 200_000 });
    println!("threaded loopback, echo device, {packets} packets per channel");
    println!(
        "{:>6} {:>8} {:>14} {:>12} {:>12}",
        "size", "channels", "packets/s", "rtt p50", "rtt p99"
    );
    for size in [64usize, 4096] {
        for channels in [1u32, 4] {
            let (elapsed, traffic) = run(channels, size, EchoLoad::new(packets));
            let total: u64 = traffic.iter().map(|t| t.completed).sum();
            let pps = total as f64 / elapsed.as_secs_f64();
            let rtt_load = EchoLoad {
                window: 1,
                latencies: true,
                ..EchoLoad::new((packets / 20).max(200))
            };
            let (_, traffic) = run(channels, size, rtt_load);
            let mut lat: Vec<Duration> = traffic.into_iter().flat_map(|t| t.latencies).collect();
            lat.sort_unstable();
            let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
            println!(
                "{size:>6} {channels:>8} {pps:>14.0} {:>10.1}us {:>10.1}us",
                pct(0.5).as_secs_f64() * 1e6,
                pct(0.99).as_secs_f64() * 1e6
            );
        }
    }
}
