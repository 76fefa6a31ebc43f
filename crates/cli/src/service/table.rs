//! Text output: Get-VM's table and property lists.

use api::{format_size, ServiceInfo, Vm};

/// Uptime as Hyper-V shows it: `HH:MM:SS`, with `D.` in front past a day.
pub fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}.{h:02}:{m:02}:{s:02}")
    } else {
        format!("{h:02}:{m:02}:{s:02}")
    }
}

/// Get-VM's columns.
pub fn vms(vms: &[Vm]) {
    let rows: Vec<[String; 6]> = vms
        .iter()
        .map(|v| {
            [
                v.name.clone(),
                v.state.to_string(),
                format!("{}", v.cpu_usage_percent.round() as u64),
                (v.memory_assigned_bytes >> 20).to_string(),
                uptime(v.uptime_secs),
                v.status.clone(),
            ]
        })
        .collect();
    let head = [
        "Name",
        "State",
        "CPUUsage(%)",
        "MemoryAssigned(M)",
        "Uptime",
        "Status",
    ];
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 5 {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$} ", w = width[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(head);
    line(head.map(|h| &"------------------"[..h.len()]));
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]].map(String::as_str));
    }
}

/// One VM as a property list.
pub fn vm(v: &Vm) {
    let props = [
        ("Name", v.name.clone()),
        ("Id", v.id.clone()),
        ("State", v.state.to_string()),
        ("Status", v.status.clone()),
        (
            "Heartbeat",
            format!("{:?}", v.heartbeat).replace("Ok", "OK"),
        ),
        ("ProcessorCount", v.cpus.to_string()),
        ("Memory", format_size(v.memory_bytes)),
        (
            "MemoryAssigned(M)",
            (v.memory_assigned_bytes >> 20).to_string(),
        ),
        ("CPUUsage(%)", format!("{}", v.cpu_usage_percent)),
        ("Uptime", uptime(v.uptime_secs)),
        ("Kernel", v.kernel.clone()),
        ("Initrd", v.initrd.clone().unwrap_or_default()),
        ("Cmdline", v.cmdline.clone()),
        ("HyperV", v.hyperv.to_string()),
        ("CpuLimit(%)", v.cpu_limit.to_string()),
        ("CpuReserve(%)", v.cpu_reserve.to_string()),
        ("CpuWeight", v.cpu_weight.to_string()),
        ("AutomaticStartAction", format!("{:?}", v.auto_start)),
        ("AutomaticStopAction", format!("{:?}", v.auto_stop)),
        ("Recovery", format!("{:?}", v.recovery)),
        ("Folder", v.folder.clone()),
        ("Pid", v.pid.map(|p| p.to_string()).unwrap_or_default()),
    ];
    let mut props = props.to_vec();
    for d in &v.disks {
        props.push((
            "HardDiskDrive",
            format!(
                "SCSI {}:{} {}{}",
                d.controller,
                d.location,
                d.path,
                if d.read_only { " (read-only)" } else { "" }
            ),
        ));
    }
    for d in &v.dvds {
        props.push((
            "DvdDrive",
            format!(
                "SCSI {}:{} {}",
                d.controller,
                d.location,
                d.path.as_deref().unwrap_or("(empty)")
            ),
        ));
    }
    for n in &v.nics {
        let vlan = n
            .vlan
            .as_ref()
            .map(|v| format!(" vlan {v}"))
            .unwrap_or_default();
        let guards: String = [
            (" dhcp-guard", n.dhcp_guard),
            (" router-guard", n.router_guard),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(g, _)| *g)
        .collect();
        props.push((
            "NetworkAdapter",
            format!("{} on {}{vlan}{guards}", n.mac, n.switch),
        ));
    }
    print_props(&props);
}

pub fn service(s: &ServiceInfo) {
    print_props(&[
        ("Version", s.version.clone()),
        ("Pid", s.pid.to_string()),
        ("Uptime", uptime(s.uptime_secs)),
        ("StateDir", s.state_dir.clone()),
        ("Socket", s.socket.clone()),
        ("Worker", s.worker.clone()),
        (
            "VMs",
            format!("{} defined, {} running", s.vms_defined, s.vms_running),
        ),
        ("Cgroups", s.cgroups.clone()),
        ("HostCPUs", s.host_cpus.to_string()),
        (
            "HostMemory",
            format_size(s.host_memory_bytes & !((1 << 20) - 1)),
        ),
    ]);
}

fn print_props(props: &[(&str, String)]) {
    let w = props.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in props {
        println!("{k:<w$} : {v}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uptime() {
        assert_eq!(super::uptime(0), "00:00:00");
        assert_eq!(super::uptime(3725), "01:02:05");
        assert_eq!(super::uptime(90061), "1.01:01:01");
    }
}
