//! Copying disk contents between images: a reader thread and a writer, zero runs skipped.

use std::path::Path;
use std::sync::mpsc;

use anyhow::Context;
use vhdx::open::{self, Format, Image, ImageType};
use vhdx::Disk;

use super::util::progress_bar;
use super::TypeArgs;

const CHUNK: usize = 4 << 20;
const SUB: usize = 64 << 10;

fn is_zero(b: &[u8]) -> bool {
    // Slice comparison is a memcmp: fast even in unoptimized builds.
    static ZEROS: [u8; SUB] = [0; SUB];
    b.chunks(SUB).all(|c| c == &ZEROS[..c.len()])
}

/// Copies `ranges` of `src` to the same offsets of `dst`. With `dst_fresh` (a new image that
/// reads as zeros), runs of zeros are not written, so the destination stays sparse.
pub fn copy_ranges(
    src: &dyn Disk,
    ranges: &[(u64, u64)],
    dst: &dyn Disk,
    dst_fresh: bool,
    label: &str,
) -> anyhow::Result<()> {
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let pb = progress_bar(total, label);
    let res = std::thread::scope(|s| -> anyhow::Result<()> {
        let (tx, rx) = mpsc::sync_channel::<vhdx::Result<(u64, Vec<u8>)>>(3);
        let (ret_tx, ret_rx) = mpsc::channel::<Vec<u8>>();
        s.spawn(move || {
            for &(start, len) in ranges {
                let mut off = start;
                while off < start + len {
                    let n = ((start + len - off) as usize).min(CHUNK - (off as usize % CHUNK));
                    let mut buf = ret_rx.try_recv().unwrap_or_default();
                    buf.resize(n, 0);
                    let r = src.read_at(&mut buf, off).map(|()| (off, buf));
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                    off += n as u64;
                }
            }
        });
        for msg in rx {
            let (off, buf) = msg?;
            if dst_fresh {
                // Write maximal runs of non-zero sub-chunks.
                let mut i = 0;
                while i < buf.len() {
                    let end = (i + SUB).min(buf.len());
                    if is_zero(&buf[i..end]) {
                        i = end;
                        continue;
                    }
                    let mut j = end;
                    while j < buf.len() {
                        let e = (j + SUB).min(buf.len());
                        if is_zero(&buf[j..e]) {
                            break;
                        }
                        j = e;
                    }
                    dst.write_at(&buf[i..j], off + i as u64)?;
                    i = j;
                }
            } else {
                dst.write_at(&buf, off)?;
            }
            pb.inc(buf.len() as u64);
            let _ = ret_tx.send(buf);
        }
        Ok(())
    });
    pb.finish_and_clear();
    res
}

/// Reads every range the chain holds data for (a full read check for `test`).
pub fn read_through(img: &Image) -> vhdx::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    for (start, len) in img.chain_allocated_ranges()? {
        let mut off = start;
        while off < start + len {
            let n = ((start + len - off) as usize).min(CHUNK);
            img.read_at(&mut buf[..n], off)?;
            off += n as u64;
        }
    }
    Ok(())
}

/// Creates `dst_path` (format from its extension or `--format`) and copies `src` into it.
pub fn convert_into(
    src: &Image,
    dst_path: &Path,
    ty: &TypeArgs,
    size: u64,
    default_type: ImageType,
) -> anyhow::Result<()> {
    let mut opts = super::create_options(dst_path, ty, size, default_type)?;
    if opts.logical_sector_size == 0 && opts.format != Format::Vhd {
        opts.logical_sector_size = src.logical_sector_size();
    }
    if opts.physical_sector_size == 0 && opts.format != Format::Vhd {
        opts.physical_sector_size = src.physical_sector_size();
    }
    let ranges = src.chain_allocated_ranges()?;
    let dst = open::create(dst_path, &opts)?;
    let result = copy_ranges(src, &ranges, &dst, true, "convert")
        .and_then(|()| dst.flush().context("flush"));
    drop(dst);
    if result.is_err() {
        let _ = std::fs::remove_file(dst_path);
    }
    result?;
    println!("{}", dst_path.display());
    Ok(())
}
