//! The Default Switch's NAT: an nftables table of our own, `inet viridian`, loaded with
//! `nft -f -` (the ruleset on standard input, replaced as a whole), and IPv4 forwarding.

use crate::cidr::Cidr;
use crate::error::{Error, Result};
use std::io::Write;
use std::process::{Command, Stdio};

/// The table every Viridian NAT rule lives in.
pub const TABLE: &str = "inet viridian";

/// The ruleset: masquerade what the subnet sends out of any other interface; forward what
/// the bridge sends, and to the bridge only replies (guests are not reachable from outside,
/// as behind Hyper-V's Default Switch).
pub fn ruleset(bridge: &str, subnet: Cidr) -> String {
    format!(
        "table {TABLE} {{}}\n\
         delete table {TABLE}\n\
         table {TABLE} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {subnet} oifname != \"{bridge}\" masquerade\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{bridge}\" accept\n\
         \t\toifname \"{bridge}\" ct state established,related accept\n\
         \t\toifname \"{bridge}\" drop\n\
         \t}}\n\
         }}\n"
    )
}

fn nft(script: &str) -> Result<()> {
    let helper = |reason: String| Error::Helper {
        program: "nft",
        reason,
    };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| helper(format!("cannot run it ({e}); install nftables")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| helper(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| helper(e.to_string()))?;
    if !out.status.success() {
        return Err(helper(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Loads (or reloads) the NAT table for `bridge` and turns on IPv4 forwarding.
pub fn apply(bridge: &str, host: Cidr) -> Result<()> {
    nft(&ruleset(bridge, host.network()))?;
    let path = "/proc/sys/net/ipv4/ip_forward";
    std::fs::write(path, "1\n").map_err(crate::error::io_err(path))
}

/// Deletes the NAT table (IPv4 forwarding stays as it is: something else may need it).
pub fn remove() -> Result<()> {
    nft(&format!("table {TABLE} {{}}\ndelete table {TABLE}\n"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ruleset_names_the_subnet_and_bridge() {
        let r = super::ruleset("vs-default", "172.30.254.0/24".parse().unwrap());
        assert!(
            r.contains("ip saddr 172.30.254.0/24 oifname != \"vs-default\" masquerade"),
            "{r}"
        );
        assert!(
            r.starts_with("table inet viridian {}\ndelete table inet viridian\n"),
            "{r}"
        );
    }
}
