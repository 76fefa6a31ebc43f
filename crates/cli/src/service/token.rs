//! `viridian token new | list | revoke`: bearer tokens for callers over TLS.

use super::{call, client, segment};
use clap::Subcommand;
use serde_json::json;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Make a token; it is printed once, on the last line, and only its hash is kept.
    New { name: String },
    /// List the tokens (names and creation times).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: callers presenting it get 401 from then on.
    Revoke { name: String },
}

pub fn main(cmd: TokenCommand) -> anyhow::Result<i32> {
    let c = client();
    match cmd {
        TokenCommand::New { name } => {
            let (_, v) = call(&c, "POST", "/tokens", Some(&json!({ "name": name })))?;
            let t: api::TokenCreated = serde_json::from_value(v)?;
            println!(
                "Token '{}' made. It is shown only now; give it as VIRIDIAN_TOKEN or `Authorization: Bearer TOKEN`:",
                t.name
            );
            println!("{}", t.token);
        }
        TokenCommand::List { json } => {
            let (_, v) = call(&c, "GET", "/tokens", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let list: Vec<api::TokenInfo> = serde_json::from_value(v)?;
                let w = list.iter().map(|t| t.name.len()).max().unwrap_or(0).max(4);
                println!("{:<w$} Created", "Name");
                for t in list {
                    println!("{:<w$} {}", t.name, t.created_at);
                }
            }
        }
        TokenCommand::Revoke { name } => {
            call(&c, "DELETE", &format!("/tokens/{}", segment(&name)), None)?;
            println!("{name}: revoked");
        }
    }
    Ok(0)
}
