//! `viridian vhd ...`: the disk image commands, each mirroring a Hyper-V cmdlet.

mod copy;
mod get;
mod util;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use vhdx::open::{self, CreateOptions, Format, ImageType};
use vhdx::Disk;

use util::{parse_size, progress_bar, show_size};

/// Options choosing an image's format and allocation type.
#[derive(Args, Clone, Debug, Default)]
pub struct TypeArgs {
    /// Fully allocate the image (VHD/VHDX fixed).
    #[arg(long, conflicts_with = "dynamic")]
    fixed: bool,
    /// Allocate blocks on first write (the default).
    #[arg(long)]
    dynamic: bool,
    /// Image format (vhdx, vhd, raw); by default from the file extension.
    #[arg(long)]
    format: Option<Format>,
    /// Block size of a dynamic/differencing image (e.g. 32M).
    #[arg(long, value_parser = parse_size)]
    block_size: Option<u64>,
    /// Logical sector size (512 or 4096).
    #[arg(long, value_parser = parse_size)]
    logical_sector_size: Option<u64>,
    /// Physical sector size (512 or 4096).
    #[arg(long, value_parser = parse_size)]
    physical_sector_size: Option<u64>,
}

#[derive(Subcommand)]
pub enum VhdCommand {
    /// Create a disk image (New-VHD).
    New {
        path: PathBuf,
        /// Virtual size (bytes, or with K/M/G/T suffix; binary units).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Create a differencing image on this parent.
        #[arg(long, conflicts_with_all = ["fixed", "from"])]
        parent: Option<PathBuf>,
        /// Copy the contents of this disk (any format, chains flattened) into the new image.
        #[arg(long)]
        from: Option<PathBuf>,
        #[command(flatten)]
        ty: TypeArgs,
    },
    /// Show an image's properties (Get-VHD).
    Get {
        path: PathBuf,
        /// Print JSON (Get-VHD's property names).
        #[arg(long)]
        json: bool,
    },
    /// Check the structure of images and their parent chains (Test-VHD). Exit code 1 if bad.
    Test {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Change an image's virtual size (Resize-VHD).
    Resize {
        path: PathBuf,
        #[arg(long, value_parser = parse_size, required_unless_present = "to_minimum_size")]
        size: Option<u64>,
        /// Shrink to the smallest size that keeps all data.
        #[arg(long, conflicts_with = "size")]
        to_minimum_size: bool,
    },
    /// Return unused space to the host so the file shrinks (Optimize-VHD).
    Optimize { path: PathBuf },
    /// Merge a differencing image into its parent or an ancestor (Merge-VHD). The merged
    /// images are deleted.
    Merge {
        path: PathBuf,
        /// The ancestor to merge into (default: the parent).
        #[arg(long)]
        destination: Option<PathBuf>,
    },
    /// Convert between formats and types; chains are flattened (Convert-VHD).
    Convert {
        source: PathBuf,
        destination: PathBuf,
        #[command(flatten)]
        ty: TypeArgs,
    },
    /// Change an image's parent or disk identifier (Set-VHD).
    Set {
        path: PathBuf,
        /// New location of the parent of a differencing image.
        #[arg(long)]
        parent_path: Option<PathBuf>,
        /// Accept a parent whose identifier does not match the one the child recorded.
        #[arg(long, requires = "parent_path")]
        ignore_id_mismatch: bool,
        /// Give the image a new disk identifier.
        #[arg(long)]
        reset_disk_id: bool,
    },
}

pub fn main(cmd: VhdCommand) -> anyhow::Result<()> {
    match cmd {
        VhdCommand::New {
            path,
            size,
            parent,
            from,
            ty,
        } => new(&path, size, parent, from, &ty),
        VhdCommand::Get { path, json } => get::get(&path, json),
        VhdCommand::Test { paths } => {
            if !test(&paths) {
                std::process::exit(1);
            }
            Ok(())
        }
        VhdCommand::Resize {
            path,
            size,
            to_minimum_size,
        } => resize(&path, size, to_minimum_size),
        VhdCommand::Optimize { path } => optimize(&path),
        VhdCommand::Merge { path, destination } => merge(&path, destination.as_deref()),
        VhdCommand::Convert {
            source,
            destination,
            ty,
        } => convert(&source, &destination, &ty),
        VhdCommand::Set {
            path,
            parent_path,
            ignore_id_mismatch,
            reset_disk_id,
        } => set(
            &path,
            parent_path.as_deref(),
            ignore_id_mismatch,
            reset_disk_id,
        ),
    }
}

/// The format of a file to create: `--format`, else its extension.
fn target_format(path: &Path, explicit: Option<Format>) -> anyhow::Result<Format> {
    explicit
        .or_else(|| Format::from_extension(path))
        .with_context(|| {
            format!(
            "{}: cannot tell the format from the extension; use .vhdx, .vhd, .img/.raw or --format",
            path.display()
        )
        })
}

fn sector(v: Option<u64>) -> anyhow::Result<u32> {
    match v {
        None => Ok(0),
        Some(n @ (512 | 4096)) => Ok(n as u32),
        Some(n) => bail!("sector size {n} must be 512 or 4096"),
    }
}

fn create_options(
    path: &Path,
    ty: &TypeArgs,
    size: u64,
    default_type: ImageType,
) -> anyhow::Result<CreateOptions> {
    let block_size = match ty.block_size {
        None => 0,
        Some(b) => u32::try_from(b).context("block size too large")?,
    };
    Ok(CreateOptions {
        format: target_format(path, ty.format)?,
        image_type: if ty.fixed {
            ImageType::Fixed
        } else if ty.dynamic {
            ImageType::Dynamic
        } else {
            default_type
        },
        size,
        block_size,
        logical_sector_size: sector(ty.logical_sector_size)?,
        physical_sector_size: sector(ty.physical_sector_size)?,
        parent: None,
    })
}

fn new(
    path: &Path,
    size: Option<u64>,
    parent: Option<PathBuf>,
    from: Option<PathBuf>,
    ty: &TypeArgs,
) -> anyhow::Result<()> {
    if let Some(parent) = parent {
        if size.is_some() {
            bail!("a differencing image takes its size from the parent; drop --size");
        }
        let mut opts = create_options(path, ty, 0, ImageType::Differencing)?;
        opts.parent = Some(parent);
        opts.image_type = ImageType::Differencing;
        let img = open::create(path, &opts)?;
        img.flush()?;
        println!("{}", path.display());
        return Ok(());
    }
    if let Some(from) = from {
        let src = open::open(&from, true)?;
        let size = size.unwrap_or(src.size()).max(src.size());
        return copy::convert_into(&src, path, ty, size, ImageType::Dynamic);
    }
    let size = size.context("--size is required (or --parent / --from)")?;
    let opts = create_options(path, ty, size, ImageType::Dynamic)?;
    let img = open::create(path, &opts)?;
    img.flush()?;
    println!("{}", path.display());
    Ok(())
}

fn test(paths: &[PathBuf]) -> bool {
    let mut ok = true;
    for p in paths {
        match open::open(p, true) {
            Err(e) => {
                eprintln!("{}: {e}", p.display());
                println!("{}: False", p.display());
                ok = false;
            }
            Ok(img) => {
                let problems = img.check();
                for pr in &problems {
                    eprintln!("{}: {pr}", p.display());
                }
                // Read every allocated range once: a damaged block shows up as an I/O error.
                let read_err = copy::read_through(&img).err();
                if let Some(e) = &read_err {
                    eprintln!("{}: {e}", p.display());
                }
                let good = problems.is_empty() && read_err.is_none();
                println!("{}: {}", p.display(), if good { "True" } else { "False" });
                ok &= good;
            }
        }
    }
    ok
}

fn resize(path: &Path, size: Option<u64>, to_min: bool) -> anyhow::Result<()> {
    let mut img = open::open(path, false)?;
    let target = match size {
        Some(t) if t >= img.size() => t,
        // Shrinking: VHDX checks for data past the new end itself (and large VHDX files have
        // no cheap minimum size here).
        Some(t) if img.format() == Format::Vhdx => t,
        _ => {
            let min = img.minimum_size()?;
            let t = if to_min {
                min.max(img.logical_sector_size() as u64)
            } else {
                size.unwrap()
            };
            if t < min {
                bail!(
                    "{}: {} is smaller than the minimum size {} (data would be lost)",
                    path.display(),
                    show_size(t),
                    show_size(min)
                );
            }
            t
        }
    };
    let old = img.size();
    img.resize(target)?;
    img.flush()?;
    println!(
        "{}: {} -> {}",
        path.display(),
        show_size(old),
        show_size(target)
    );
    Ok(())
}

fn optimize(path: &Path) -> anyhow::Result<()> {
    let mut img = open::open(path, false)?;
    let pb = progress_bar(0, "optimize");
    let (before, after) = img.compact(&mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    img.flush()?;
    println!(
        "{}: {} -> {}",
        path.display(),
        show_size(before),
        show_size(after)
    );
    Ok(())
}

fn merge(path: &Path, destination: Option<&Path>) -> anyhow::Result<()> {
    let child = open::open(path, true)?;
    let chain = child.chain_paths();
    if chain.len() < 2 {
        bail!("{}: not a differencing image", path.display());
    }
    let dest_idx = match destination {
        None => 1,
        Some(d) => {
            let canon = std::fs::canonicalize(d)
                .with_context(|| format!("{}: cannot resolve", d.display()))?;
            chain
                .iter()
                .position(|p| std::fs::canonicalize(p).ok().as_ref() == Some(&canon))
                .filter(|&i| i > 0)
                .with_context(|| {
                    format!("{} is not an ancestor of {}", d.display(), path.display())
                })?
        }
    };
    if child.format() == Format::Vhdx {
        // Fold the chain down one level at a time: each merge writes a child's sectors into
        // its parent, which is then merged into its own parent.
        drop(child);
        for p in &chain[..dest_idx] {
            vhdx::vhdx::merge_into_parent(p)?;
            std::fs::remove_file(p).with_context(|| format!("{}: remove", p.display()))?;
        }
        println!("{}", chain[dest_idx].display());
        return Ok(());
    }
    // Every range held by a file between the child and the destination, read through the
    // child (which sees the newest data), is written into the destination.
    let mut ranges = Vec::new();
    {
        let mut layer = Some(&child);
        let mut owned;
        let mut i = 0;
        while i < dest_idx {
            let l = layer.unwrap();
            ranges.extend(l.allocated_ranges()?);
            i += 1;
            if i < dest_idx {
                owned = open::open(&chain[i], true)?;
                layer = Some(&owned);
            }
        }
    }
    let ranges = open::merge_ranges(ranges, child.size());
    let dest = open::open(&chain[dest_idx], false)?;
    if dest.size() < child.size() {
        bail!(
            "{} is smaller than {}; resize it first",
            chain[dest_idx].display(),
            path.display()
        );
    }
    copy::copy_ranges(&child, &ranges, &dest, false, "merge")?;
    dest.flush()?;
    drop(dest);
    drop(child);
    for p in &chain[..dest_idx] {
        std::fs::remove_file(p).with_context(|| format!("{}: remove", p.display()))?;
    }
    println!("{}", chain[dest_idx].display());
    Ok(())
}

fn convert(source: &Path, destination: &Path, ty: &TypeArgs) -> anyhow::Result<()> {
    let src = open::open(source, true)?;
    let info = src.info()?;
    let default_type = match info.image_type {
        ImageType::Fixed if info.format != Format::Raw => ImageType::Fixed,
        _ => ImageType::Dynamic,
    };
    copy::convert_into(&src, destination, ty, src.size(), default_type)
}

fn set(
    path: &Path,
    parent: Option<&Path>,
    ignore_id_mismatch: bool,
    reset_disk_id: bool,
) -> anyhow::Result<()> {
    if parent.is_none() && !reset_disk_id {
        bail!("nothing to change: give --parent-path or --reset-disk-id");
    }
    if let Some(p) = parent {
        open::set_parent(path, p, ignore_id_mismatch)?;
    }
    if !reset_disk_id {
        return Ok(());
    }
    let mut img = open::open(path, false)?;
    img.reset_disk_id()?;
    img.flush()?;
    Ok(())
}
