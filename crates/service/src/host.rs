//! Facts about the host and its processes, read from /proc.

use std::path::Path;

/// Processors the service may give a VM.
pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// The host's memory in bytes (MemTotal).
pub fn memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib << 10)
        .unwrap_or(0)
}

/// A process's arguments, or None when it is gone.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `pid` is a worker serving the control socket `socket`.
pub fn is_worker(pid: u32, socket: &Path) -> bool {
    let Some(args) = cmdline(pid) else {
        return false;
    };
    let socket = socket.to_string_lossy();
    args.iter().any(|a| a == "run") && args.iter().any(|a| *a == socket)
}

/// The pid of the worker serving `socket`, found by its command line.
pub fn find_worker(socket: &Path) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| is_worker(*pid, socket))
}

/// CPU time (user + system) of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second of /proc's CPU times.
pub const TICKS_PER_SEC: u64 = 100;

/// The supplementary groups of a process.
pub fn groups(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Groups:")).map(|l| {
                l["Groups:".len()..]
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The gid and member names of a group in /etc/group.
pub fn group(name: &str) -> Option<(u32, Vec<String>)> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4 && f[0] == name {
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            Some((f[2].parse().ok()?, members))
        } else {
            None
        }
    })
}

/// The user name of a uid in /etc/passwd.
pub fn user_name(uid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[2].parse() == Ok(uid)).then(|| f[0].to_string())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_process() {
        let me = std::process::id();
        assert!(super::cmdline(me).is_some_and(|a| !a.is_empty()));
        assert!(super::cpu_ticks(me).is_some());
        assert!(super::memory() > 0);
        assert!(super::cmdline(u32::MAX).is_none());
    }
}
