//! `viridian vm ...`: manage running VMs through their control sockets (Stop-VM, Get-VM).

use crate::control;
use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Shut a VM down through the guest's shutdown service (Stop-VM); waits until it is off.
    Stop {
        #[command(flatten)]
        target: Target,
        /// Power off at once instead of asking the guest (Stop-VM -TurnOff).
        #[arg(long, visible_alias = "turn-off")]
        force: bool,
        /// Seconds to wait for the guest to power off.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Show a running VM's state and its integration services (Get-VM).
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Show the key-value pairs the guest publishes (host name, OS, addresses) and the ones
    /// the host pushed (Get-VMKeyValuePair); `--set` and `--delete` change the host's items.
    Kvp {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
        /// Push KEY=VALUE into the guest's external pool (repeatable).
        #[arg(long, value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Remove KEY from the guest's external pool (repeatable).
        #[arg(long, value_name = "KEY")]
        delete: Vec<String>,
    },
    /// Add, remove or list the disks of a running VM (Add-/Remove-/Get-VMHardDiskDrive).
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Connect or disconnect a running VM's network cable (`NAME --connect|--disconnect`),
    /// or list, hot-add and hot-remove its NICs (`list|add|remove`).
    Nic(crate::nic::NicArgs),
    /// Insert or eject the medium of a running VM's DVD drive (Set-VMDvdDrive), or list its
    /// DVD drives (Get-VMDvdDrive). The guest sees the new medium on its next command.
    Dvd {
        #[command(flatten)]
        target: Target,
        /// Insert this ISO image (read-only, shared with other readers).
        #[arg(long, conflicts_with = "eject")]
        path: Option<PathBuf>,
        /// Take the medium out.
        #[arg(long)]
        eject: bool,
        /// The drive's controller (default: that of the VM's first DVD drive).
        #[arg(long)]
        controller: Option<u8>,
        /// The drive's location (default: the controller's first DVD drive).
        #[arg(long)]
        location: Option<u8>,
        #[arg(long)]
        json: bool,
    },
    /// List the integration services with their status, or turn one on or off
    /// (Get-, Enable-, Disable-VMIntegrationService): heartbeat, kvp, shutdown, timesync.
    Integration {
        #[command(flatten)]
        target: Target,
        #[arg(long, value_name = "SERVICE", conflicts_with = "disable")]
        enable: Option<String>,
        #[arg(long, value_name = "SERVICE")]
        disable: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// What a running VM has used since it started: CPU time, memory, disk and network bytes
    /// (Measure-VM).
    Measure {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Dump the VM's VMBus state: connection, channels, GPADLs, devices and their workers (JSON).
    Inspect {
        #[command(flatten)]
        target: Target,
    },
    /// Attach to a running VM's serial console (COM1): the last 1 MiB of its output, then live
    /// output; keys go to the guest, Ctrl-] detaches. Several may watch; one types at a time.
    Console {
        #[command(flatten)]
        target: Target,
        /// Watch only; send no input.
        #[arg(long)]
        read_only: bool,
        /// Take the input over from whoever holds it (they can still watch).
        #[arg(long, conflicts_with = "read_only")]
        force: bool,
    },
    /// Save a running foreground VM (`viridian run`) to a file and end it (Save-VM);
    /// `viridian run --restore FILE` resumes it.
    SaveTo {
        #[command(flatten)]
        target: Target,
        /// The saved-state file to write.
        #[arg(long)]
        path: PathBuf,
    },
    /// List VMs (the service's inventory, else the running foreground VMs).
    List {
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Managed(crate::service::vm::ManagedCommand),
}

#[derive(Subcommand)]
pub enum DiskCommand {
    /// Attach a VHDX, VHD or raw image to a running VM; the guest's hv_storvsc sees a new
    /// disk without a reboot. A controller the VM does not have yet is added (hot-plug).
    Add {
        /// The VM's name (`viridian run --name`).
        name: String,
        path: PathBuf,
        /// The SCSI controller (0-3; default 0).
        #[arg(long)]
        controller: Option<u8>,
        /// The location (LUN, 0-63) on the controller; default: the lowest free one.
        #[arg(long)]
        location: Option<u8>,
        #[arg(long)]
        readonly: bool,
        /// Open the image in this format (vhdx, vhd, raw) instead of the one its content and
        /// name agree on.
        #[arg(long)]
        format: Option<vmm::vmbus_host::ImageFormat>,
        /// `none` (the default: unbuffered, as Hyper-V) or `writeback` (through the host's
        /// page cache).
        #[arg(long, value_name = "none|writeback")]
        cache: Option<vmm::vmbus_host::CacheMode>,
    },
    /// Detach the drive at a location; its file is closed once its last request is done.
    Remove {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 0)]
        controller: u8,
        #[arg(long)]
        location: u8,
    },
    /// List the running VM's drives (disks and DVD drives).
    List {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct Target {
    /// The VM's name (`viridian run --name`).
    #[arg(required_unless_present = "socket")]
    name: Option<String>,
    /// The control socket path instead of a name.
    #[arg(long, conflicts_with = "name")]
    socket: Option<PathBuf>,
}

impl Target {
    /// The VM's name, when it was named rather than given by its socket.
    pub(crate) fn name(&self) -> Option<&str> {
        self.socket
            .is_none()
            .then_some(self.name.as_deref())
            .flatten()
    }

    pub(crate) fn path(&self) -> PathBuf {
        match (&self.socket, &self.name) {
            (Some(p), _) => p.clone(),
            (None, Some(n)) => control::socket_for(n),
            (None, None) => unreachable!("clap requires one"),
        }
    }
}

pub fn main(cmd: VmCommand) -> anyhow::Result<i32> {
    // Through the service when one runs and knows the VM; else the control sockets.
    let via_service = match &cmd {
        VmCommand::List { json } => crate::service::vm::list(*json)?,
        VmCommand::Stop {
            target,
            force,
            timeout,
        } => match (&target.name, &target.socket) {
            (Some(n), None) => crate::service::vm::stop(n, *force, *timeout)?,
            _ => None,
        },
        VmCommand::Status { target, json } => match (&target.name, &target.socket) {
            (Some(n), None) => crate::service::vm::status(n, *json)?,
            _ => None,
        },
        VmCommand::Disk(cmd) => service_disk(cmd)?,
        VmCommand::Integration {
            target:
                Target {
                    name: Some(name),
                    socket: None,
                },
            enable,
            disable,
            json,
        } => {
            let change = integration_change(enable, disable)?;
            let reply = match change {
                Some((short, on)) => crate::service::vm::vm_call(
                    name,
                    "PUT",
                    &format!("/integration/{short}"),
                    Some(&serde_json::json!({ "enabled": on })),
                )?,
                None => crate::service::vm::vm_call(name, "GET", "/integration", None)?,
            };
            match reply {
                Some(list) => Some(print_integration(&list, *json)?),
                None => None,
            }
        }
        VmCommand::Measure {
            target:
                Target {
                    name: Some(name),
                    socket: None,
                },
            json,
        } => match crate::service::vm::vm_call(name, "GET", "/measure", None)? {
            Some(m) => Some(print_measure(&m, *json)?),
            None => None,
        },
        VmCommand::Dvd {
            target:
                Target {
                    name: Some(name),
                    socket: None,
                },
            path,
            eject,
            controller,
            location,
            json,
        } => service_dvd(
            name,
            path.as_deref(),
            *eject,
            (*controller, *location),
            *json,
        )?,
        _ => None,
    };
    if let Some(code) = via_service {
        return Ok(code);
    }
    let result: anyhow::Result<i32> = match cmd {
        VmCommand::Stop {
            target,
            force,
            timeout,
        } => {
            let path = target.path();
            let reply = control::send(&path, if force { "turn-off" } else { "shutdown" })?;
            eprintln!("viridian: {reply}");
            let deadline = Instant::now() + Duration::from_secs(timeout);
            while path.exists() && std::os::unix::net::UnixStream::connect(&path).is_ok() {
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "the guest did not power off within {timeout} s; `viridian vm stop --force` turns it off"
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!("viridian: the VM is off");
            Ok(0)
        }
        VmCommand::Managed(cmd) => crate::service::vm::managed(cmd),
        VmCommand::Kvp {
            target,
            json,
            set,
            delete,
        } => kvp(&target.path(), json, &set, &delete),
        VmCommand::Disk(cmd) => disk(cmd),
        VmCommand::Nic(args) => crate::nic::main(args),
        VmCommand::Dvd {
            target,
            path,
            eject,
            controller,
            location,
            json,
        } => dvd(&target.path(), path, eject, (controller, location), json),
        VmCommand::Integration {
            target,
            enable,
            disable,
            json,
        } => {
            if let Some((short, on)) = integration_change(&enable, &disable)? {
                let reply = control::send(
                    &target.path(),
                    &format!("integration-set {short} {}", if on { "on" } else { "off" }),
                )?;
                eprintln!("viridian: {reply}");
            }
            let reply = control::send(&target.path(), "integration")?;
            print_integration(&serde_json::from_str(&reply)?, json)
        }
        VmCommand::Measure { target, json } => {
            let reply = control::send(&target.path(), "measure")?;
            print_measure(&serde_json::from_str(&reply)?, json)
        }
        VmCommand::Console {
            target,
            read_only,
            force,
        } => {
            // A service's VM by its worker's socket, else a foreground `viridian run --name`.
            let path = match (&target.name, &target.socket) {
                (Some(n), None) => {
                    crate::service::vm::control_socket(n)?.unwrap_or_else(|| control::socket_for(n))
                }
                _ => target.path(),
            };
            let name = target
                .name
                .clone()
                .unwrap_or_else(|| path.display().to_string());
            crate::console::attach(&path, &name, read_only, force)
        }
        VmCommand::Inspect { target } => {
            println!("{}", control::send(&target.path(), "inspect")?);
            Ok(0)
        }
        VmCommand::SaveTo { target, path } => {
            let path = std::path::absolute(&path)
                .with_context(|| format!("{}: cannot make the path absolute", path.display()))?;
            let reply = crate::saved_run::request(&target.path(), &path)?;
            eprintln!("viridian: {reply}");
            Ok(0)
        }
        VmCommand::Status { target, .. } => {
            println!("{}", control::send(&target.path(), "status")?);
            // NICs and their counters (none without VMBus).
            for n in crate::nic::list(&target.path()).unwrap_or_default() {
                println!("{}", crate::nic::status_line(&n));
            }
            Ok(0)
        }
        VmCommand::List { .. } => {
            let dir = control::socket_dir();
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(_) => return Ok(0),
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "sock")
                    && std::os::unix::net::UnixStream::connect(&p).is_ok()
                {
                    let name = p.file_stem().unwrap().to_string_lossy();
                    println!("{name}\t{}", p.display());
                }
            }
            Ok(0)
        }
    };
    result.context("viridian vm")
}

/// `viridian vm kvp`.
fn kvp(
    path: &std::path::Path,
    json: bool,
    set: &[String],
    delete: &[String],
) -> anyhow::Result<i32> {
    for item in set {
        if !item.contains('=') {
            anyhow::bail!("--set {item}: expected KEY=VALUE");
        }
        eprintln!(
            "viridian: {}",
            control::send(path, &format!("kvp-set {item}"))?
        );
    }
    for key in delete {
        eprintln!(
            "viridian: {}",
            control::send(path, &format!("kvp-delete {key}"))?
        );
    }
    if !set.is_empty() || !delete.is_empty() {
        return Ok(0);
    }
    let reply = control::send(path, "kvp")?;
    if json {
        println!("{reply}");
        return Ok(0);
    }
    let v: serde_json::Value =
        serde_json::from_str(&reply).context("the VM sent a KVP answer that is not JSON")?;
    println!("{:<14} {:<32} VALUE", "POOL", "KEY");
    for (side, pools) in [("guest", &v["guest"]), ("host", &v["host"])] {
        let Some(pools) = pools.as_object() else {
            continue;
        };
        for (pool, items) in pools {
            for (key, value) in items.as_object().into_iter().flatten() {
                let value = match value {
                    serde_json::Value::String(s) => s.clone(),
                    other => format!(
                        "{} ({})",
                        other["value"].as_str().unwrap_or(""),
                        other["state"].as_str().unwrap_or("")
                    ),
                };
                println!("{:<14} {key:<32} {value}", format!("{side}:{pool}"));
            }
        }
    }
    println!("daemon: {}", v["daemon"].as_str().unwrap_or("unknown"));
    Ok(0)
}

fn auto(v: Option<u8>) -> String {
    v.map_or("auto".to_string(), |v| v.to_string())
}

/// The drive list from the control socket.
fn drives(path: &std::path::Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let reply = control::send(path, "disks")?;
    let v: serde_json::Value =
        serde_json::from_str(&reply).context("the VM sent a drive list that is not JSON")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn print_drives(list: &[serde_json::Value]) {
    println!(
        "{:<10} {:<8} {:<5} {:<6} {:>12} {:<4} {:<9} PATH",
        "CONTROLLER", "LOCATION", "KIND", "FORMAT", "SIZE", "MODE", "CACHE"
    );
    for d in list {
        let path = d["path"].as_str().unwrap_or("(empty)");
        println!(
            "{:<10} {:<8} {:<5} {:<6} {:>12} {:<4} {:<9} {path}",
            d["controller"],
            d["location"],
            d["kind"].as_str().unwrap_or(""),
            d["format"].as_str().unwrap_or("-"),
            d["size"],
            if d["read_only"].as_bool() == Some(true) {
                "ro"
            } else {
                "rw"
            },
            d["cache"].as_str().unwrap_or("-"),
        );
    }
}

/// `viridian vm disk` on a VM of the service: its settings change, and a running worker with
/// them. `None` when no service knows the VM.
fn service_disk(cmd: &DiskCommand) -> anyhow::Result<Option<i32>> {
    use crate::service::vm::vm_call;
    match cmd {
        DiskCommand::Add {
            name,
            path,
            controller,
            location,
            readonly,
            format,
            cache,
        } => {
            let path = std::path::absolute(path)
                .with_context(|| format!("{}: cannot resolve the path", path.display()))?;
            let mut body = serde_json::json!({
                "path": path, "read_only": readonly, "controller": controller, "location": location,
            });
            if let Some(c) = cache {
                body["cache"] = c.name().into();
            }
            let Some(d) = vm_call(name, "POST", "/disks", Some(&body))? else {
                return Ok(None);
            };
            if format.is_some() {
                eprintln!("viridian: the service detects the format from the content; --format was not used");
            }
            eprintln!(
                "viridian: {} attached at controller {} location {}",
                d["path"].as_str().unwrap_or_default(),
                d["controller"],
                d["location"]
            );
            Ok(Some(0))
        }
        DiskCommand::Remove {
            target:
                Target {
                    name: Some(name),
                    socket: None,
                },
            controller,
            location,
        } => {
            let rest = format!("/disks/{controller}/{location}");
            let Some(d) = vm_call(name, "DELETE", &rest, None)? else {
                return Ok(None);
            };
            eprintln!(
                "viridian: {} detached from controller {controller} location {location}",
                d["path"].as_str().unwrap_or_default()
            );
            Ok(Some(0))
        }
        DiskCommand::List {
            target:
                Target {
                    name: Some(name),
                    socket: None,
                },
            json,
        } => {
            let Some(vm) = vm_call(name, "GET", "", None)? else {
                return Ok(None);
            };
            let list = service_drives(&vm);
            if *json {
                println!("{}", serde_json::Value::Array(list));
            } else {
                print_drives(&list);
            }
            Ok(Some(0))
        }
        _ => Ok(None),
    }
}

/// The service to turn on or off, by its short name.
fn integration_change(
    enable: &Option<String>,
    disable: &Option<String>,
) -> anyhow::Result<Option<(&'static str, bool)>> {
    let Some((name, on)) = enable
        .as_deref()
        .map(|n| (n, true))
        .or(disable.as_deref().map(|n| (n, false)))
    else {
        return Ok(None);
    };
    let short = api::integration_service(name).with_context(|| {
        format!("unknown integration service '{name}'; use heartbeat, kvp, shutdown or timesync")
    })?;
    Ok(Some((short, on)))
}

/// Prints Get-VMIntegrationService's columns, or JSON.
fn print_integration(list: &serde_json::Value, json: bool) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(list)?);
        return Ok(0);
    }
    println!("{:<24} {:<8} PrimaryStatusDescription", "Name", "Enabled");
    for s in list.as_array().into_iter().flatten() {
        println!(
            "{:<24} {:<8} {}",
            s["name"].as_str().unwrap_or(""),
            if s["enabled"].as_bool() == Some(true) {
                "True"
            } else {
                "False"
            },
            s["status"].as_str().unwrap_or("")
        );
    }
    Ok(0)
}

/// Prints a measurement as Measure-VM's columns, or as JSON.
fn print_measure(m: &serde_json::Value, json: bool) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(0);
    }
    let n = |k: &str| m[k].as_u64().unwrap_or(0);
    let mib = |k: &str| format!("{:.1}", n(k) as f64 / (1 << 20) as f64);
    println!("Uptime(s)         {}", n("uptime_secs"));
    println!(
        "CPUTime(s)        {:.2}",
        m["cpu_seconds"].as_f64().unwrap_or(0.0)
    );
    println!("Memory(M)         {}", n("memory_bytes") >> 20);
    println!("Resident(M)       {}", mib("resident_bytes"));
    println!("DiskRead(M)       {}", mib("disk_read_bytes"));
    println!("DiskWritten(M)    {}", mib("disk_written_bytes"));
    println!("NetworkIn(M)      {}", mib("network_received_bytes"));
    println!("NetworkOut(M)     {}", mib("network_sent_bytes"));
    Ok(0)
}

/// A service VM's disks and DVD drives in the shape the worker's `disks` command lists them.
fn service_drives(vm: &serde_json::Value) -> Vec<serde_json::Value> {
    let empty = Vec::new();
    let disks = vm["disks"].as_array().unwrap_or(&empty).iter().map(|d| {
        serde_json::json!({
            "kind": "disk", "controller": d["controller"], "location": d["location"],
            "path": d["path"], "read_only": d["read_only"], "cache": d["cache"],
        })
    });
    let dvds = vm["dvds"].as_array().unwrap_or(&empty).iter().map(|d| {
        serde_json::json!({
            "kind": "dvd", "controller": d["controller"], "location": d["location"],
            "path": d["path"], "read_only": true,
        })
    });
    disks.chain(dvds).collect()
}

/// `viridian vm dvd` on a VM of the service (Set-VMDvdDrive, Get-VMDvdDrive).
fn service_dvd(
    name: &str,
    iso: Option<&std::path::Path>,
    eject: bool,
    (controller, location): (Option<u8>, Option<u8>),
    json: bool,
) -> anyhow::Result<Option<i32>> {
    use crate::service::vm::vm_call;
    let Some(vm) = vm_call(name, "GET", "", None)? else {
        return Ok(None);
    };
    if iso.is_none() && !eject {
        let list: Vec<_> = service_drives(&vm)
            .into_iter()
            .filter(|d| d["kind"] == "dvd")
            .collect();
        if json {
            println!("{}", serde_json::Value::Array(list));
        } else {
            print_drives(&list);
        }
        return Ok(Some(0));
    }
    let drive = vm["dvds"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| {
            controller.is_none_or(|c| d["controller"] == c)
                && location.is_none_or(|l| d["location"] == l)
        })
        .with_context(|| {
            format!("VM '{name}' has no such DVD drive (`viridian vm dvd {name}` lists them)")
        })?;
    let rest = format!("/dvds/{}/{}", drive["controller"], drive["location"]);
    let body = match iso {
        Some(p) => {
            let p = std::path::absolute(p)
                .with_context(|| format!("{}: cannot resolve the path", p.display()))?;
            serde_json::json!({ "path": p })
        }
        None => serde_json::json!({ "path": null }),
    };
    let d = vm_call(name, "PUT", &rest, Some(&body))?.unwrap_or_default();
    match d["path"].as_str() {
        Some(p) => eprintln!("viridian: {p} inserted"),
        None => eprintln!("viridian: ejected"),
    }
    Ok(Some(0))
}

/// `viridian vm disk`.
fn disk(cmd: DiskCommand) -> anyhow::Result<i32> {
    match cmd {
        DiskCommand::Add {
            name,
            path,
            controller,
            location,
            readonly,
            format,
            cache,
        } => {
            // The worker opens the file: give it an absolute path.
            let path = std::path::absolute(&path)
                .with_context(|| format!("{}: cannot resolve the path", path.display()))?;
            let mode = if readonly { "ro" } else { "rw" };
            let format = format.map_or("auto", |f| f.name());
            let command = format!(
                "disk-add {} {} {mode} {format} cache={} {}",
                auto(controller),
                auto(location),
                cache.unwrap_or_default().name(),
                path.display()
            );
            eprintln!(
                "viridian: {}",
                control::send(&control::socket_for(&name), &command)?
            );
        }
        DiskCommand::Remove {
            target,
            controller,
            location,
        } => {
            let reply = control::send(
                &target.path(),
                &format!("disk-remove {controller} {location}"),
            )?;
            eprintln!("viridian: {reply}");
        }
        DiskCommand::List { target, json } => {
            let list = drives(&target.path())?;
            if json {
                println!("{}", serde_json::Value::Array(list));
            } else {
                print_drives(&list);
            }
        }
    }
    Ok(0)
}

/// `viridian vm dvd`.
fn dvd(
    socket: &std::path::Path,
    iso: Option<PathBuf>,
    eject: bool,
    (controller, location): (Option<u8>, Option<u8>),
    json: bool,
) -> anyhow::Result<i32> {
    let place = format!("{} {}", auto(controller), auto(location));
    if let Some(iso) = iso {
        let iso = std::path::absolute(&iso)
            .with_context(|| format!("{}: cannot resolve the path", iso.display()))?;
        let reply = control::send(socket, &format!("dvd-set {place} {}", iso.display()))?;
        eprintln!("viridian: {reply}");
        return Ok(0);
    }
    if eject {
        eprintln!(
            "viridian: {}",
            control::send(socket, &format!("dvd-eject {place}"))?
        );
        return Ok(0);
    }
    let list: Vec<serde_json::Value> = drives(socket)?
        .into_iter()
        .filter(|d| d["kind"] == "dvd")
        .collect();
    if json {
        println!("{}", serde_json::Value::Array(list));
    } else {
        print_drives(&list);
    }
    Ok(0)
}
