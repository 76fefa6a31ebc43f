//! Loopback storvsp throughput: guest threads play storvsc over the real VMBus host (one
//! worker thread per channel) against a raw image in tmpfs, with no VM and no vCPU.
//! 4 KiB random reads and writes with 32 requests outstanding per channel, and 256 KiB
//! sequential reads with 4 and 1 MiB ones with 1 and with 8 (the guest's pool is 256 pages:
//! the 8 share it, as reads may), on one channel and on four, three ways: `uring` (each channel's
//! io_uring, vectored straight into guest pages), `sync` (the same vectored I/O on the worker
//! thread, as with `VIRIDIAN_NO_IO_URING=1`) and `bounce` (the image as a plain medium through
//! the worker's bounce buffer, as before the direct path existed), all through the page cache
//! (`cache=writeback`). Then the same image on a real file system (/var/tmp), one channel,
//! `uring` and `sync` each buffered (`cache=writeback`: the page cache holds the image after
//! it is written) and unbuffered (`cache=none`: O_DIRECT to the device); these also print
//! CPU-seconds per GiB moved. Last, a dynamic VHDX of the same size on /var/tmp (every block
//! allocated), one channel, `uring`, unbuffered: the same as the raw image's case but for the
//! format.
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
use storvsp::{CacheMode, DiskSpec};
use vmbus::PagedRange;
use zerocopy::IntoBytes;

/// Guest pages each channel's outstanding requests use between them.
const POOL_PAGES: u64 = 256;
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Uring,
    Sync,
    Bounce,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Uring => "uring",
            Mode::Sync => "sync",
            Mode::Bounce => "bounce",
        }
    }
}

/// Where the image is: tmpfs, or a real file system with the given cache mode.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Tmpfs,
    Disk(CacheMode),
    /// A dynamic VHDX on the real file system, every block allocated, unbuffered.
    DiskVhdx,
}

fn setup(channels: u16, mode: Mode, place: Place) -> Setup {
    let (dir, cache) = match place {
        Place::Tmpfs => (
            tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap()),
            CacheMode::Writeback,
        ),
        Place::Disk(cache) => (
            tempfile::tempdir_in("/var/tmp").unwrap_or_else(|_| tempfile::tempdir().unwrap()),
            cache,
        ),
        Place::DiskVhdx => (
            tempfile::tempdir_in("/var/tmp").unwrap_or_else(|_| tempfile::tempdir().unwrap()),
            CacheMode::None,
        ),
    };
    // Touch every block so reads hit data, not holes (and every VHDX block is allocated).
    let data = vec![0x5a; (BLOCKS * 4096) as usize];
    let path = if place == Place::DiskVhdx {
        let path = vhdx_disk(dir.path(), BLOCKS * 4096);
        let img = vhdx::open::open(&path, false).unwrap();
        vhdx::Disk::write_at(&img, &data, 0).unwrap();
        vhdx::Disk::flush(&img).unwrap();
        path
    } else {
        let path = raw_disk(dir.path(), "bench.img", BLOCKS * 4096);
        std::fs::write(&path, &data).unwrap();
        path
    };
    let spec = DiskSpec::open(&path, None, false)
        .unwrap()
        .with_cache(cache);
    let spec = if mode == Mode::Bounce {
        DiskSpec::from_medium(spec.medium.clone(), spec.path.clone(), "raw")
    } else {
        spec
    };
    let mut config = storvsp::ControllerConfig::new(INSTANCE, channels - 1);
    config.io_uring = mode == Mode::Uring;
    let mut rig = rig_with(config, vec![(0, spec)]);
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

/// One benchmark's requests.
#[derive(Clone, Copy)]
struct Load {
    write: bool,
    /// Pages per request (1: 4 KiB at random LBAs; more: sequential).
    pages: u64,
    /// Requests outstanding; more than the pool holds share its pages (reads only).
    depth: u64,
}

impl Load {
    /// The first pool page of the slot `slot`.
    fn first_page(self, slot: u64) -> usize {
        ((slot * self.pages) % POOL_PAGES) as usize
    }

    fn name(self) -> String {
        let op = if self.write { "write" } else { "read" };
        if self.pages == 1 {
            format!("{op}-4k-random-qd{}", self.depth)
        } else {
            format!("{op}-{}k-seq-qd{}", self.pages * 4, self.depth)
        }
    }
}

/// Runs `n` requests of `load` on one channel, `load.depth` outstanding, each slot on its
/// own guest pages while the pool has room for them (reads deeper than that share pages).
fn drive(g: &mut Guest, n: u64, load: Load, seed: u64) {
    let depth = load.depth;
    let mut x = seed | 1;
    let mut seq = 0u64;
    let mut next_lba = move || {
        if load.pages > 1 {
            seq = (seq + load.pages * 8) % (BLOCKS * 8);
            return seq;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % BLOCKS) * 8
    };
    let (op, dir) = if load.write {
        (0x2a, sp::data_in::WRITE)
    } else {
        (0x28, sp::data_in::READ)
    };
    let len = (load.pages * 4096) as u32;
    let send = |g: &mut Guest, id: u64, lba: u64| {
        let mut cdb = [op, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        cdb[2..6].copy_from_slice(&(lba as u32).to_be_bytes());
        cdb[7..9].copy_from_slice(&((load.pages * 8) as u16).to_be_bytes());
        let first = load.first_page(id % depth);
        let range = PagedRange {
            byte_offset: 0,
            byte_count: len,
            pfns: g.pages[first..first + load.pages as usize].to_vec(),
        };
        let h = vmbus::packet::gpa_direct_header(&[range]);
        let p = g.srb_packet(0, &cdb, dir, len);
        g.send(id, packet_type::DATA_USING_GPA_DIRECT, &h, p.as_bytes());
    };
    let mut sent = 0;
    while sent < n.min(depth) {
        send(g, sent, next_lba());
        sent += 1;
    }
    for _ in 0..n {
        let p = g.recv();
        let id = p.transaction_id;
        if sent < n {
            // The completed request's slot (id % depth) is free for the next one.
            send(g, id + depth, next_lba());
            sent += 1;
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("storvsp_4k_random");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(1));
    let mut summary = Vec::new();
    let load = |write: bool, pages: u64, depth: u64| {
        assert!(
            !write || pages * depth <= POOL_PAGES,
            "writes need pages of their own"
        );
        Load {
            write,
            pages,
            depth,
        }
    };
    let loads = [
        load(false, 1, 32),
        load(true, 1, 32),
        load(false, 64, 4),
        load(false, 256, 1),
        load(false, 256, 8),
    ];
    let mut cases = Vec::new();
    for channels in [1u16, 4] {
        for mode in [Mode::Uring, Mode::Sync, Mode::Bounce] {
            cases.push((channels, mode, Place::Tmpfs));
        }
    }
    for mode in [Mode::Uring, Mode::Sync] {
        for cache in [CacheMode::Writeback, CacheMode::None] {
            cases.push((1, mode, Place::Disk(cache)));
        }
    }
    cases.push((1, Mode::Uring, Place::DiskVhdx));
    for (channels, mode, place) in cases {
        let mut s = setup(channels, mode, place);
        let at = match place {
            Place::Tmpfs => "tmpfs".to_string(),
            Place::Disk(c) => format!("disk-cache-{}", c.name()),
            Place::DiskVhdx => "disk-vhdx-cache-none".to_string(),
        };
        for load in loads {
            let name = format!("{}-{}ch-{}-{at}", load.name(), channels, mode.name());
            let (mut reqs, mut cpu, mut wall) = (0u64, Duration::ZERO, Duration::ZERO);
            group.bench_function(BenchmarkId::from_parameter(&name), |b| {
                b.iter_custom(|iters| {
                    // `iters` requests in all, shared by the channels.
                    let per = iters.div_ceil(u64::from(channels));
                    let (c0, t0) = (cpu_time(), Instant::now());
                    std::thread::scope(|sc| {
                        for (i, g) in s.guests.iter_mut().enumerate() {
                            sc.spawn(move || drive(g, per, load, 0x9e37 + i as u64));
                        }
                    });
                    let el = t0.elapsed();
                    reqs += per * u64::from(channels);
                    cpu += cpu_time() - c0;
                    wall += el;
                    el.mul_f64(iters as f64 / (per * u64::from(channels)) as f64)
                })
            });
            if reqs == 0 {
                // Filtered out by the command line's benchmark name.
                continue;
            }
            let gib = (reqs * load.pages * 4096) as f64 / f64::from(1u32 << 30);
            summary.push(format!(
                    "{name:>48}: {:>8.0} requests/s wall, {:>8.0} per CPU-second ({:.2} cores busy), {:.2} CPU-s/GiB",
                    reqs as f64 / wall.as_secs_f64(),
                    reqs as f64 / cpu.as_secs_f64(),
                    cpu.as_secs_f64() / wall.as_secs_f64(),
                    cpu.as_secs_f64() / gib
                ));
        }
        s.rig.host.stop();
    }
    group.finish();
    println!("\nstorvsp loopback, raw image in tmpfs and on /var/tmp, dynamic VHDX on /var/tmp:");
    for l in summary {
        println!("{l}");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
