//! Loopback storvsp throughput: guest threads play storvsc over the real VMBus host (one
//! worker thread per channel) against a raw image in tmpfs, with no VM and no vCPU.
//! 4 KiB random reads and writes, 32 requests outstanding per channel, on one channel and on
//! four, through the direct path (vectored I/O straight into guest pages) and the bounce-buffer
//! path (the same image as a plain medium, as before the direct path existed).
//!
//! Run: `cargo bench -p storvsp --bench loopback`. Besides criterion's requests per second
//! (wall clock), each case prints requests per CPU-second of the whole process (guest threads
//! included, so the device's own cost per request is lower than that says).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hvdef::storvsp::{self as sp, operation};
use hvdef::vmbus::packet_type;
use std::time::{Duration, Instant};
use storvsp::DiskSpec;
use vmbus::PagedRange;
use zerocopy::IntoBytes;

/// Requests each channel keeps outstanding.
const QUEUE_DEPTH: u64 = 32;
/// The image: 256 MiB of 4 KiB blocks.
const BLOCKS: u64 = 65536;

/// Process CPU time (user + system, all threads) so far, from /proc/self/stat (in the
/// kernel's USER_HZ ticks, 100 per second).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which ends with the last ')').
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

struct Setup {
    rig: Rig,
    guests: Vec<Guest>,
    _dir: tempfile::TempDir,
}

fn setup(channels: u16, direct: bool) -> Setup {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let path = raw_disk(dir.path(), "bench.img", BLOCKS * 4096);
    // Touch every block so reads hit tmpfs pages, not holes.
    std::fs::write(&path, vec![0x5a; (BLOCKS * 4096) as usize]).unwrap();
    let spec = DiskSpec::open(&path, None, false).unwrap();
    let spec = if direct {
        spec
    } else {
        DiskSpec::from_medium(spec.medium.clone(), spec.path.clone(), "raw")
    };
    let mut rig = rig(vec![(0, spec)], channels - 1);
    let mut g = rig.open(0, 64);
    g.handshake(&[0x0602]);
    if channels > 1 {
        let mut p = packet(operation::CREATE_SUB_CHANNELS);
        p.set_sub_channel_count(channels - 1);
        assert_eq!({ g.control(p).status }, 0);
        rig.client.transport_mut().timeout = Duration::from_millis(20);
        let deadline = Instant::now() + Duration::from_secs(10);
        while rig
            .client
            .offers()
            .filter(|o| o.interface_type == sp::INTERFACE)
            .count()
            < channels as usize
        {
            assert!(Instant::now() < deadline, "no subchannel offers");
            rig.client.drain_messages();
            std::thread::sleep(Duration::from_millis(10));
        }
        rig.client.transport_mut().timeout = Duration::from_secs(10);
    }
    let mut guests = vec![g];
    guests.extend((1..channels).map(|i| rig.open(i, 64)));
    Setup {
        rig,
        guests,
        _dir: dir,
    }
}

/// Runs `n` 4 KiB requests on one channel, `QUEUE_DEPTH` outstanding, at pseudo-random
/// LBAs; each outstanding slot has its own guest page.
fn drive(g: &mut Guest, n: u64, write: bool, seed: u64) {
    let mut x = seed | 1;
    let mut next_lba = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % BLOCKS) * 8
    };
    let (op, dir) = if write {
        (0x2a, sp::data_in::WRITE)
    } else {
        (0x28, sp::data_in::READ)
    };
    let send = |g: &mut Guest, id: u64, lba: u64| {
        let mut cdb = [op, 0, 0, 0, 0, 0, 0, 0, 8, 0];
        cdb[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
        let range = PagedRange {
            byte_offset: 0,
            byte_count: 4096,
            pfns: vec![g.pages[(id % QUEUE_DEPTH) as usize]],
        };
        let h = vmbus::packet::gpa_direct_header(&[range]);
        let p = g.srb_packet(0, &cdb, dir, 4096);
        g.send(id, packet_type::DATA_USING_GPA_DIRECT, &h, p.as_bytes());
    };
    let mut sent = 0;
    while sent < n.min(QUEUE_DEPTH) {
        send(g, sent, next_lba());
        sent += 1;
    }
    for _ in 0..n {
        let p = g.recv();
        let id = p.transaction_id;
        if sent < n {
            // The completed request's slot (id % depth) is free for the next one.
            send(g, id + QUEUE_DEPTH, next_lba());
            sent += 1;
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("storvsp_4k_random");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(1));
    let mut summary = Vec::new();
    for channels in [1u16, 4] {
        for direct in [true, false] {
            let mut s = setup(channels, direct);
            for write in [false, true] {
                let name = format!(
                    "{}-{}ch-{}",
                    if write { "write" } else { "read" },
                    channels,
                    if direct { "direct" } else { "bounce" }
                );
                let (mut reqs, mut cpu, mut wall) = (0u64, Duration::ZERO, Duration::ZERO);
                group.bench_function(BenchmarkId::from_parameter(&name), |b| {
                    b.iter_custom(|iters| {
                        // `iters` requests in all, shared by the channels.
                        let per = iters.div_ceil(u64::from(channels));
                        let (c0, t0) = (cpu_time(), Instant::now());
                        std::thread::scope(|sc| {
                            for (i, g) in s.guests.iter_mut().enumerate() {
                                sc.spawn(move || drive(g, per, write, 0x9e37 + i as u64));
                            }
                        });
                        let el = t0.elapsed();
                        reqs += per * u64::from(channels);
                        cpu += cpu_time() - c0;
                        wall += el;
                        el.mul_f64(iters as f64 / (per * u64::from(channels)) as f64)
                    })
                });
                summary.push(format!(
                    "{name:>22}: {:>9.0} requests/s wall, {:>9.0} per CPU-second ({:.2} cores busy)",
                    reqs as f64 / wall.as_secs_f64(),
                    reqs as f64 / cpu.as_secs_f64(),
                    cpu.as_secs_f64() / wall.as_secs_f64()
                ));
            }
            s.rig.host.stop();
        }
    }
    group.finish();
    println!("\nstorvsp loopback, 4 KiB random, queue depth {QUEUE_DEPTH} per channel:");
    for l in summary {
        println!("{l}");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
