//! `viridian job list | get ID` (Get-Job): the service's long operations and their progress.

use super::{call, client, segment};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum JobCommand {
    /// List the jobs, newest first: those running and the last 100 finished.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one job.
    Get {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn main(cmd: JobCommand) -> anyhow::Result<i32> {
    let c = client();
    let (path, json) = match &cmd {
        JobCommand::List { json } => ("/jobs".to_string(), *json),
        JobCommand::Get { id, json } => (format!("/jobs/{}", segment(id)), *json),
    };
    let (_, v) = call(&c, "GET", &path, None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let jobs: Vec<api::Job> = match cmd {
        JobCommand::List { .. } => serde_json::from_value(v)?,
        JobCommand::Get { .. } => vec![serde_json::from_value(v)?],
    };
    table(&jobs);
    Ok(0)
}

/// Id, Operation, VM, State, Percent, then the progress or the error.
fn table(jobs: &[api::Job]) {
    let vm = jobs
        .iter()
        .map(|j| j.vm.chars().count())
        .max()
        .unwrap_or(0)
        .max(2);
    println!(
        "{:<36} {:<9} {:<vm$} {:<9} {:>7} Progress",
        "Id", "Operation", "VM", "State", "Percent"
    );
    for j in jobs {
        let text = j.error.as_deref().unwrap_or(&j.progress);
        println!(
            "{:<36} {:<9} {:<vm$} {:<9} {:>7} {text}",
            j.id,
            j.operation,
            j.vm,
            j.state.as_str(),
            j.percent
        );
    }
}
