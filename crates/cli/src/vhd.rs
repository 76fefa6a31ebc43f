//! `viridian vhd ...`: the disk image commands.

use clap::Subcommand;

#[derive(Subcommand)]
pub enum VhdCommand {
    /// Show a disk image's properties (Get-VHD).
    Get { path: std::path::PathBuf },
}

pub fn main(cmd: VhdCommand) -> anyhow::Result<()> {
    match cmd {
        VhdCommand::Get { path } => anyhow::bail!("{}: not implemented yet", path.display()),
    }
}
