//! DHCP and DNS for a Default Switch's guests: one dnsmasq per switch, bound to the bridge
//! only, its pid file and leases next to the switch's definition
//! (`switches/NAME.dnsmasq.pid`, `switches/NAME.leases`).

use crate::cidr::Cidr;
use crate::error::{io_err, Error, Result};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long guests keep a lease.
const LEASE_TIME: &str = "1h";

pub fn pid_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.dnsmasq.pid"))
}

pub fn lease_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.leases"))
}

/// The addresses handed out: from just after the host's address to the last one before the
/// broadcast address.
pub fn dhcp_range(host: Cidr) -> std::result::Result<(Ipv4Addr, Ipv4Addr, Ipv4Addr), String> {
    let IpAddr::V4(addr) = host.addr() else {
        return Err("the Default Switch's address must be IPv4".into());
    };
    if !(8..=29).contains(&host.prefix()) {
        return Err("the Default Switch's prefix length must be 8 to 29".into());
    }
    let mask = u32::MAX << (32 - u32::from(host.prefix()));
    let net = u32::from(addr) & mask;
    let broadcast = net | !mask;
    let first = u32::from(addr) + 1;
    let last = broadcast - 1;
    if u32::from(addr) == net || first > last {
        return Err(format!("{host} leaves no addresses after it for guests"));
    }
    Ok((first.into(), last.into(), mask.into()))
}

/// dnsmasq's arguments for a switch.
pub fn args(dir: &Path, name: &str, bridge: &str, host: Cidr) -> Result<Vec<String>> {
    let (first, last, mask) = dhcp_range(host).map_err(|reason| Error::Invalid {
        field: "host address",
        value: host.to_string(),
        reason,
    })?;
    let me = host.addr();
    Ok(vec![
        "--conf-file=/dev/null".into(),
        format!("--pid-file={}", pid_file(dir, name).display()),
        format!("--dhcp-leasefile={}", lease_file(dir, name).display()),
        format!("--interface={bridge}"),
        "--except-interface=lo".into(),
        "--bind-dynamic".into(),
        format!("--dhcp-range={first},{last},{mask},{LEASE_TIME}"),
        format!("--dhcp-option=option:router,{me}"),
        format!("--dhcp-option=option:dns-server,{me}"),
        "--dhcp-authoritative".into(),
        "--domain-needed".into(),
        "--bogus-priv".into(),
    ])
}

/// The running dnsmasq of this switch, if its pid file names a live dnsmasq started with
/// exactly these arguments.
fn running(dir: &Path, name: &str, want: &[String]) -> Option<i32> {
    let pid = read_pid(dir, name)?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut parts = cmdline.split(|b| *b == 0).filter(|p| !p.is_empty());
    let prog = parts.next()?;
    if !prog.ends_with(b"dnsmasq") {
        return None;
    }
    let rest: Vec<&[u8]> = parts.collect();
    let same = rest.len() == want.len() && rest.iter().zip(want).all(|(a, b)| *a == b.as_bytes());
    same.then_some(pid)
}

fn read_pid(dir: &Path, name: &str) -> Option<i32> {
    let text = std::fs::read_to_string(pid_file(dir, name)).ok()?;
    text.trim().parse().ok().filter(|p| *p > 1)
}

/// Whether the dnsmasq named in the switch's pid file is alive.
pub fn is_running(dir: &Path, name: &str) -> bool {
    read_pid(dir, name).is_some_and(|pid| is_ours(pid, dir, name))
}

/// Whether `pid` is a dnsmasq started for this switch (a pid file can outlive its process
/// and its pid be reused, even by another dnsmasq).
fn is_ours(pid: i32, dir: &Path, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut parts = cmdline.split(|b| *b == 0);
    let our_pid_file = format!("--pid-file={}", pid_file(dir, name).display());
    parts.next().is_some_and(|p| p.ends_with(b"dnsmasq"))
        && parts.any(|a| a == our_pid_file.as_bytes())
}

/// Starts dnsmasq for the switch unless the right one already runs; one started with other
/// arguments is replaced.
pub fn ensure(dir: &Path, name: &str, bridge: &str, host: Cidr) -> Result<()> {
    let want = args(dir, name, bridge, host)?;
    if running(dir, name, &want).is_some() {
        return Ok(());
    }
    stop(dir, name)?;
    let helper = |reason: String| Error::Helper {
        program: "dnsmasq",
        reason,
    };
    // dnsmasq checks its options and binds before it forks into the background, so its exit
    // status says whether it started; the daemon writes its pid file.
    let out = Command::new("dnsmasq")
        .args(&want)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| helper(format!("cannot run it ({e}); install dnsmasq-base")))?;
    if !out.status.success() {
        return Err(helper(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Stops the switch's dnsmasq (if it runs) and waits up to 5 s for it to go.
pub fn stop(dir: &Path, name: &str) -> Result<()> {
    let pid_path = pid_file(dir, name);
    if let Some(pid) = read_pid(dir, name).filter(|p| is_ours(*p, dir, name)) {
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_ours(pid, dir, name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if is_ours(pid, dir, name) {
            return Err(Error::Helper {
                program: "dnsmasq",
                reason: format!("process {pid} did not stop within 5 s of SIGTERM"),
            });
        }
    }
    match std::fs::remove_file(&pid_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(pid_path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = dhcp_range("172.30.254.1/24".parse().unwrap()).unwrap();
        assert_eq!(
            r,
            (
                "172.30.254.2".parse().unwrap(),
                "172.30.254.254".parse().unwrap(),
                "255.255.255.0".parse().unwrap()
            )
        );
        for bad in [
            "172.30.254.0/24",
            "172.30.254.254/24",
            "10.0.0.1/30",
            "fd00::1/64",
            "10.0.0.1/7",
        ] {
            assert!(dhcp_range(bad.parse().unwrap()).is_err(), "{bad}");
        }
    }
}
