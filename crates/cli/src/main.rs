//! `viridian`: the command people type.
#![forbid(unsafe_code)]

mod console;
mod control;
mod nic;
mod run;
mod saved_run;
mod serial_log;
mod service;
mod switch;
mod vhd;
mod vm;
mod whole_lines;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "viridian",
    version,
    about = "Hyper-V-compatible virtualization on KVM"
)]
struct Cli {
    /// The management service's socket (default: $VIRIDIAN_SOCKET, else
    /// /run/viridian/viridiand.sock).
    #[arg(long)]
    socket: Option<std::path::PathBuf>,
    /// A remote service, `https://HOST:PORT` (default: $VIRIDIAN_HOST); the token comes from
    /// $VIRIDIAN_TOKEN.
    #[arg(long)]
    host: Option<String>,
    /// The remote service's certificate, PEM (default: $VIRIDIAN_CA_CERT).
    #[arg(long)]
    ca_cert: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Linux guest in the foreground with its serial console on this terminal.
    Run(run::RunArgs),
    /// Manage running VMs (stop, status, list).
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Create, inspect, check and convert VHDX/VHD disk images (the *-VHD cmdlets).
    #[command(subcommand)]
    Vhd(vhd::VhdCommand),
    /// The management service viridiand.
    #[command(subcommand)]
    Service(service::ServiceCommand),
    /// The service's long operations (start, stop, restart, save) and their progress (Get-Job).
    #[command(subcommand)]
    Job(service::job::JobCommand),
    /// Bearer tokens for the service's TLS listener (--listen).
    #[command(subcommand)]
    Token(service::token::TokenCommand),
    /// Virtual switches: private, internal, external and the Default Switch (*-VMSwitch).
    Switch(switch::SwitchArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIRIDIAN_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    service::set_target(cli.socket, cli.host, cli.ca_cert);
    let result = match cli.command {
        Command::Run(args) => run::main(args),
        Command::Vm(cmd) => vm::main(cmd),
        Command::Vhd(cmd) => vhd::main(cmd).map(|()| 0),
        Command::Service(cmd) => service::main(cmd),
        Command::Job(cmd) => service::job::main(cmd),
        Command::Token(cmd) => service::token::main(cmd),
        Command::Switch(args) => switch::main(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("viridian: {}", error_chain(&err));
            std::process::exit(1);
        }
    }
}

/// The error and its causes on one line, leaving out causes that an outer message already
/// quotes (library errors often include their source in their own text).
fn error_chain(err: &anyhow::Error) -> String {
    let mut msg = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}

#[cfg(test)]
mod cli_definition {
    /// clap checks the argument definitions only when a subcommand is first parsed; check
    /// them all here, so a bad definition fails a test instead of a user's command.
    #[test]
    fn every_command_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
