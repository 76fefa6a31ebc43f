//! `viridian`: the command people type.
#![forbid(unsafe_code)]

mod vhd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "viridian", version, about = "Hyper-V-compatible virtualization on KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, inspect, check and convert VHDX/VHD disk images (the *-VHD cmdlets).
    #[command(subcommand)]
    Vhd(vhd::VhdCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vhd(cmd) => vhd::main(cmd),
    };
    if let Err(err) = result {
        eprintln!("viridian: {err:#}");
        std::process::exit(1);
    }
}
