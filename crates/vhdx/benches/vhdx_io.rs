//! VHDX throughput, side by side with a raw file and (when installed) qemu-img.
//! Run: `cargo bench -p vhdx --bench vhdx_io` (VHDX_BENCH_MIB sets the data size, default 512).
//! Prints MiB/s and ratios; the files live in the system temp dir (a real disk, page cache on).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use vhdx::vhdx::{Vhdx, VhdxBuilder};
use vhdx::Disk;

const MIB: u64 = 1 << 20;

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

fn rate(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

/// Sequential writes of `chunk` bytes into a fresh image, then a flush.
fn seq_write(d: &dyn Disk, total: u64, chunk: usize) -> f64 {
    let mut buf = vec![0u8; chunk];
    fill(&mut buf, 1);
    let t = Instant::now();
    let mut off = 0;
    while off < total {
        d.write_at(&buf, off).unwrap();
        off += chunk as u64;
    }
    d.flush().unwrap();
    t.elapsed().as_secs_f64()
}

fn seq_read(d: &dyn Disk, total: u64) -> f64 {
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    let mut off = 0;
    while off < total {
        d.read_at(&mut buf, off).unwrap();
        off += MIB;
    }
    t.elapsed().as_secs_f64()
}

fn rand_read(d: &dyn Disk, total: u64, n: u64) -> f64 {
    let mut buf = vec![0u8; 4096];
    let mut x: u64 = 12345;
    let t = Instant::now();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        d.read_at(&mut buf, (x % (total / 4096)) * 4096).unwrap();
    }
    t.elapsed().as_secs_f64()
}

/// A raw file behind the Disk trait, for the baseline.
struct Raw(std::fs::File, u64);
impl Disk for Raw {
    fn read_at(&self, b: &mut [u8], o: u64) -> vhdx::Result<()> {
        self.0.read_exact_at(b, o).unwrap();
        Ok(())
    }
    fn write_at(&self, b: &[u8], o: u64) -> vhdx::Result<()> {
        self.0.write_all_at(b, o).unwrap();
        Ok(())
    }
    fn flush(&self) -> vhdx::Result<()> {
        self.0.sync_data().unwrap();
        Ok(())
    }
    fn unmap(&self, _: u64, _: u64) -> vhdx::Result<()> {
        Ok(())
    }
    fn size(&self) -> u64 {
        self.1
    }
    fn logical_sector_size(&self) -> u32 {
        512
    }
    fn physical_sector_size(&self) -> u32 {
        4096
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

fn qemu_convert(src: &Path, dst: &Path, block: &str) -> Option<f64> {
    let t = Instant::now();
    let ok = Command::new("qemu-img")
        .args([
            "convert",
            // qemu-img convert defaults to cache=unsafe (no flush); flush like we do.
            "-t",
            "writeback",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            &format!("subformat=dynamic,block_size={block}"),
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
        ])
        .status()
        .ok()?
        .success();
    ok.then(|| t.elapsed().as_secs_f64())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let total: u64 = std::env::var("VHDX_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512)
        * MIB;
    let dir = tempfile::tempdir().unwrap();
    println!("data size {} MiB", total / MIB);

    // Raw baseline.
    let rp = dir.path().join("raw.img");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&rp)
        .unwrap();
    f.set_len(total).unwrap();
    let raw = Raw(f, total);
    let raw_w = seq_write(&raw, total, 64 << 10);
    let raw_r = seq_read(&raw, total);
    let raw_rr = rand_read(&raw, total, 20000);
    println!(
        "raw:            seq write 64K {:7.0} MiB/s   seq read 1M {:7.0} MiB/s   rand read 4K {:7.0} IOPS",
        rate(total, raw_w),
        rate(total, raw_r),
        20000.0 / raw_rr
    );

    for (bs, name) in [(1u32 << 20, "1M"), (8 << 20, "8M"), (32 << 20, "32M")] {
        let p = dir.path().join(format!("d{name}.vhdx"));
        let d = VhdxBuilder::new(total).block_size(bs).create(&p).unwrap();
        let w = seq_write(&d, total, 64 << 10);
        // Overwrite (blocks allocated).
        let ow = seq_write(&d, total, 64 << 10);
        d.close().unwrap();
        let d = Vhdx::open(&p, true).unwrap();
        let r = seq_read(&d, total);
        let rr = rand_read(&d, total, 20000);
        println!(
            "vhdx {name:>3} blocks: alloc write 64K {:7.0} MiB/s ({:.2}x raw)   overwrite {:7.0} MiB/s   seq read 1M {:7.0} MiB/s ({:.2}x raw)   rand read 4K {:7.0} IOPS",
            rate(total, w),
            raw_w / w,
            rate(total, ow),
            rate(total, r),
            raw_r / r,
            20000.0 / rr
        );
        if name == "8M" {
            let q = dir.path().join("q.vhdx");
            if let Some(qt) = qemu_convert(&rp, &q, "8M") {
                // Our equivalent of `qemu-img convert raw -> vhdx`: read raw, write VHDX.
                let o = dir.path().join("o.vhdx");
                let t = Instant::now();
                let d = VhdxBuilder::new(total).block_size(bs).create(&o).unwrap();
                let mut buf = vec![0u8; 2 * MIB as usize];
                let mut off = 0;
                while off < total {
                    raw.read_at(&mut buf, off).unwrap();
                    d.write_at(&buf, off).unwrap();
                    off += buf.len() as u64;
                }
                d.flush().unwrap();
                d.close().unwrap();
                let ot = t.elapsed().as_secs_f64();
                println!(
                    "convert raw->vhdx 8M (random data): qemu-img {:7.0} MiB/s, ours {:7.0} MiB/s (ours/qemu time {:.2})",
                    rate(total, qt),
                    rate(total, ot),
                    ot / qt
                );
            } else {
                println!("qemu-img not installed: skipped the qemu comparison");
            }
        }
    }
}
