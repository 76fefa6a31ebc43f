//! `viridian vm ...` through the service: New-VM, Get-VM, Set-VM, Start-VM, Stop-VM,
//! Restart-VM, Suspend-VM, Resume-VM, Remove-VM.

use super::{call, client, client_if_up, segment, table, ServiceError};
use anyhow::Context;
use api::client::Client;
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ManagedCommand {
    /// Define a VM in the service's inventory (New-VM).
    New {
        name: String,
        #[command(flatten)]
        settings: Box<Settings>,
        #[command(flatten)]
        devices: Box<NewDevices>,
        #[arg(long)]
        json: bool,
    },
    /// Show one VM (Get-VM NAME).
    Get {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a VM's settings (Set-VM, Set-VMProcessor, Set-VMMemory).
    Set {
        name: String,
        /// A new name.
        #[arg(long)]
        new_name: Option<String>,
        #[command(flatten)]
        settings: Box<Settings>,
        #[arg(long)]
        json: bool,
    },
    /// Start a VM (Start-VM).
    Start { name: String },
    /// Stop, then start a VM (Restart-VM).
    Restart {
        name: String,
        /// Turn it off instead of shutting it down.
        #[arg(long, visible_alias = "force")]
        turn_off: bool,
        /// Seconds to wait for the guest to shut down before turning it off.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Pause a VM (Suspend-VM).
    Pause { name: String },
    /// Resume a paused VM (Resume-VM).
    Resume { name: String },
    /// Remove a VM and its folder (Remove-VM); it must be off.
    Remove { name: String },
    /// Save a VM (Save-VM): its whole state goes to its folder and it is Saved; `vm start`
    /// resumes it where it was. Shows the job's progress.
    Save { name: String },
    /// Delete a Saved VM's saved state (Remove-VMSavedState); it is Off then.
    DiscardSavedState { name: String },
}

/// Settings of `vm new` and `vm set`.
#[derive(Args)]
pub struct Settings {
    /// Virtual processors.
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory with a unit, e.g. 512M or 2G.
    #[arg(long)]
    memory: Option<String>,
    /// The guest kernel (bzImage or ELF vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// An initrd (`vm set --initrd ""` removes it).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Present plain KVM instead of Hyper-V.
    #[arg(long)]
    no_hyperv: bool,
    /// CPU limit in percent (Set-VMProcessor -Maximum).
    #[arg(long)]
    cpu_limit: Option<u32>,
    /// CPU reserve in percent (Set-VMProcessor -Reserve).
    #[arg(long)]
    cpu_reserve: Option<u32>,
    /// Relative CPU weight, 1..=10000 (Set-VMProcessor -RelativeWeight).
    #[arg(long)]
    cpu_weight: Option<u32>,
    /// Nothing, Start or StartIfRunning (AutomaticStartAction).
    #[arg(long)]
    auto_start: Option<String>,
    /// ShutDown or TurnOff (AutomaticStopAction).
    #[arg(long)]
    auto_stop: Option<String>,
    /// None or Restart: what happens when the worker dies.
    #[arg(long)]
    recovery: Option<String>,
}

/// Drives and adapters of `vm new`.
#[derive(Args)]
pub struct NewDevices {
    /// Attach an existing VHDX, VHD or raw image (repeatable):
    /// PATH[,readonly][,cache=none|writeback][,controller=N][,location=M].
    #[arg(
        long = "disk",
        value_name = "PATH[,readonly][,cache=none|writeback][,controller=N][,location=M]"
    )]
    disks: Vec<String>,
    /// Create a new dynamic VHDX and attach it (repeatable, each with a --size); a relative
    /// path is in the VM's folder.
    #[arg(long = "new-disk", value_name = "PATH", requires = "sizes")]
    new_disks: Vec<PathBuf>,
    /// The size of each --new-disk, in order, e.g. 20G.
    #[arg(long = "size", value_name = "SIZE")]
    sizes: Vec<String>,
    /// A DVD drive with this ISO, or `none` for an empty drive (repeatable).
    #[arg(long = "dvd", value_name = "ISO|none")]
    dvds: Vec<String>,
    /// A network adapter (repeatable), as `viridian run --nic` takes it.
    #[arg(
        long = "nic",
        value_name = crate::nic::NIC_USAGE
    )]
    nics: Vec<String>,
}

impl NewDevices {
    fn add_to(&self, body: &mut Map<String, Value>) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.new_disks.len() == self.sizes.len(),
            "give one --size for each --new-disk ({} --new-disk, {} --size)",
            self.new_disks.len(),
            self.sizes.len()
        );
        let mut disks = Vec::new();
        for d in &self.disks {
            let arg = crate::run::parse_disk(d)?;
            anyhow::ensure!(
                arg.format.is_none(),
                "--disk {d}: the service detects the format from the content; drop format="
            );
            disks.push(json!({
                "path": path_arg(&arg.path)?,
                "read_only": arg.read_only,
                "controller": arg.controller,
                "location": arg.location,
                "cache": arg.cache.unwrap_or_default().name(),
            }));
        }
        let new_disks: Vec<Value> = self
            .new_disks
            .iter()
            .zip(&self.sizes)
            .map(|(p, size)| {
                // Relative paths are in the VM's folder, on the service's side.
                json!({"path": p.to_string_lossy(), "size": size})
            })
            .collect();
        let mut dvds = Vec::new();
        for d in &self.dvds {
            let path = match d.as_str() {
                "none" => Value::Null,
                p => json!(path_arg(std::path::Path::new(p))?),
            };
            dvds.push(json!({ "path": path }));
        }
        let mut nics = Vec::new();
        for n in &self.nics {
            nics.push(nic_json(n)?);
        }
        for (k, v) in [
            ("disks", disks),
            ("new_disks", new_disks),
            ("dvds", dvds),
            ("nics", nics),
        ] {
            if !v.is_empty() {
                body.insert(k.into(), Value::Array(v));
            }
        }
        Ok(())
    }
}

/// A `--nic` value (the syntax of `viridian run --nic`) as a NewNetworkAdapter.
fn nic_json(value: &str) -> anyhow::Result<Value> {
    Ok(crate::nic::new_adapter(&crate::nic::parse(value)?))
}

/// A call on one of the service's VMs: `None` when no service runs or it has no such VM (a
/// foreground `viridian run` VM, then).
pub fn vm_call(
    name: &str,
    method: &str,
    rest: &str,
    body: Option<&Value>,
) -> anyhow::Result<Option<Value>> {
    let Some(c) = client_if_up()? else {
        return Ok(None);
    };
    match call(&c, "GET", &vm_path(name), None) {
        Err(e) if unknown_vm(&e) => return Ok(None),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let (_, v) = call(&c, method, &format!("{}{rest}", vm_path(name)), body)?;
    Ok(Some(v))
}

fn path_arg(p: &std::path::Path) -> anyhow::Result<String> {
    if p.as_os_str().is_empty() {
        return Ok(String::new());
    }
    // The service does not share this working directory.
    let abs = std::path::absolute(p).with_context(|| format!("{}", p.display()))?;
    Ok(abs.to_string_lossy().into_owned())
}

impl Settings {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(k.into(), v);
        };
        if let Some(v) = self.cpus {
            put("cpus", json!(v));
        }
        if let Some(v) = &self.memory {
            put("memory", json!(v));
        }
        if let Some(v) = &self.kernel {
            put("kernel", json!(path_arg(v)?));
        }
        if let Some(v) = &self.initrd {
            put("initrd", json!(path_arg(v)?));
        }
        if let Some(v) = &self.cmdline {
            put("cmdline", json!(v));
        }
        if self.no_hyperv {
            put("hyperv", json!(false));
        }
        for (k, v) in [
            ("cpu_limit", self.cpu_limit),
            ("cpu_reserve", self.cpu_reserve),
            ("cpu_weight", self.cpu_weight),
        ] {
            if let Some(v) = v {
                put(k, json!(v));
            }
        }
        for (k, v) in [
            ("auto_start", &self.auto_start),
            ("auto_stop", &self.auto_stop),
            ("recovery", &self.recovery),
        ] {
            if let Some(v) = v {
                put(k, json!(v));
            }
        }
        Ok(m)
    }
}

fn vm_path(name: &str) -> String {
    format!("/vms/{}", segment(name))
}

fn show(v: Value, json: bool) -> anyhow::Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        table::vm(&serde_json::from_value(v)?);
    }
    Ok(0)
}

fn report(v: Value) -> anyhow::Result<i32> {
    let vm: api::Vm = serde_json::from_value(v)?;
    println!("{}: {} ({})", vm.name, vm.state, vm.status);
    Ok(0)
}

pub fn managed(cmd: ManagedCommand) -> anyhow::Result<i32> {
    let c = client();
    match cmd {
        ManagedCommand::New {
            name,
            settings,
            devices,
            json,
        } => {
            let mut body = settings.to_json()?;
            devices.add_to(&mut body)?;
            body.insert("name".into(), json!(name));
            if !body.contains_key("kernel") {
                anyhow::bail!("--kernel is required: the guest kernel to boot");
            }
            let (_, v) = call(&c, "POST", "/vms", Some(&Value::Object(body)))?;
            show(v, json)
        }
        ManagedCommand::Get { name, json } => show(call(&c, "GET", &vm_path(&name), None)?.1, json),
        ManagedCommand::Set {
            name,
            new_name,
            settings,
            json,
        } => {
            let mut body = settings.to_json()?;
            if let Some(n) = new_name {
                body.insert("name".into(), json!(n));
            }
            let (_, v) = call(&c, "PATCH", &vm_path(&name), Some(&Value::Object(body)))?;
            show(v, json)
        }
        ManagedCommand::Start { name } => lifecycle(&c, &name, "start"),
        ManagedCommand::Restart {
            name,
            turn_off,
            timeout,
        } => lifecycle(
            &c,
            &name,
            &format!("restart?turn_off={turn_off}&timeout={}", timeout.min(3600)),
        ),
        ManagedCommand::Pause { name } => pause(&c, &name, "pause"),
        ManagedCommand::Resume { name } => pause(&c, &name, "resume"),
        ManagedCommand::Save { name } => save(&c, &name),
        ManagedCommand::DiscardSavedState { name } => action(&c, &name, "discard-saved-state", ""),
        ManagedCommand::Remove { name } => {
            call(&c, "DELETE", &vm_path(&name), None)?;
            println!("{name}: removed");
            Ok(0)
        }
    }
}

/// Suspend-VM / Resume-VM: through the service when it runs and knows the VM, else on the
/// control socket of a foreground `viridian run --name NAME`.
fn pause(c: &Client, name: &str, verb: &str) -> anyhow::Result<i32> {
    if client_if_up()?.is_some() {
        match action(c, name, verb, "") {
            Err(e) if unknown_vm(&e) => {}
            other => return other,
        }
    }
    let reply = crate::control::send(&crate::control::socket_for(name), verb)?;
    println!("{name}: {reply}");
    Ok(0)
}

/// Save-VM: starts the job, then follows it to its end.
fn save(c: &Client, name: &str) -> anyhow::Result<i32> {
    let started = std::time::Instant::now();
    let (_, v) = call(c, "POST", &format!("{}/save", vm_path(name)), None)?;
    match follow(c, name, serde_json::from_value(v)?)? {
        Ok(_) => {
            println!("{name}: Saved in {:.1} s", started.elapsed().as_secs_f64());
            Ok(0)
        }
        Err(e) => anyhow::bail!("{name} was not saved: {e}"),
    }
}

/// Follows a job to its end, showing its progress on a terminal; its result (the VM's state
/// and status) or its error.
fn follow(c: &Client, name: &str, mut job: api::Job) -> anyhow::Result<Result<String, String>> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Short jobs (a start takes tens of milliseconds) answer soon; long ones are polled
    // every 200 ms.
    let mut pause = std::time::Duration::from_millis(5);
    while job.state == api::JobState::Running {
        if tty {
            eprint!("\r\x1b[K{name}: {} ({}%)", job.progress, job.percent);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(200));
        let (_, v) = call(c, "GET", &format!("/jobs/{}", segment(&job.id)), None)?;
        job = serde_json::from_value(v)?;
    }
    if tty {
        eprint!("\r\x1b[K");
    }
    Ok(match job.state {
        api::JobState::Failed => Err(job.error.unwrap_or_default()),
        _ => Ok(job.progress),
    })
}

/// Start-VM, Stop-VM, Restart-VM: the job, followed to its end; prints `NAME: STATE (STATUS)`.
fn lifecycle(c: &Client, name: &str, verb_and_query: &str) -> anyhow::Result<i32> {
    let (_, v) = call(
        c,
        "POST",
        &format!("{}/{verb_and_query}", vm_path(name)),
        None,
    )?;
    match follow(c, name, serde_json::from_value(v)?)? {
        Ok(result) => {
            println!("{name}: {result}");
            Ok(0)
        }
        Err(e) => Err(anyhow::Error::msg(e)),
    }
}

fn action(c: &Client, name: &str, verb: &str, query: &str) -> anyhow::Result<i32> {
    let (_, v) = call(c, "POST", &format!("{}/{verb}{query}", vm_path(name)), None)?;
    report(v)
}

/// `vm list` through the service, or `None` when no service runs.
pub fn list(json: bool) -> anyhow::Result<Option<i32>> {
    let Some(c) = client_if_up()? else {
        return Ok(None);
    };
    let (_, v) = call(&c, "GET", "/vms", None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        table::vms(&serde_json::from_value::<Vec<api::Vm>>(v)?);
    }
    Ok(Some(0))
}

/// The control socket of the service's worker for `name` (`vm console`); `None` when no
/// service runs or it has no such VM (a foreground `viridian run --name NAME`).
pub fn control_socket(name: &str) -> anyhow::Result<Option<PathBuf>> {
    let Some(c) = client_if_up()? else {
        return Ok(None);
    };
    let vm: api::Vm = match call(&c, "GET", &vm_path(name), None) {
        Ok((_, v)) => serde_json::from_value(v)?,
        Err(e) if unknown_vm(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    anyhow::ensure!(
        matches!(vm.state, api::VmState::Running | api::VmState::Paused),
        "{name} is {}: it has a console while it runs (`viridian vm start {name}`)",
        vm.state
    );
    anyhow::ensure!(
        c.socket().is_some(),
        "the console is reached through the worker's socket on the service's host: run `viridian vm console` there"
    );
    let (_, info) = call(&c, "GET", "/service", None)?;
    let info: api::ServiceInfo = serde_json::from_value(info)?;
    // The service keeps its workers' control sockets in STATE_DIR/run, named by VM id.
    Ok(Some(
        PathBuf::from(info.state_dir)
            .join("run")
            .join(format!("{}.sock", vm.id)),
    ))
}

/// Whether an error is the service saying it has no such VM.
fn unknown_vm(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ServiceError>()
        .is_some_and(|s| s.status == 404)
}

/// `vm stop NAME` through the service; `None` when no service runs or it has no such VM
/// (a foreground `viridian run --name NAME`).
pub fn stop(name: &str, turn_off: bool, timeout: u64) -> anyhow::Result<Option<i32>> {
    let Some(c) = client_if_up()? else {
        return Ok(None);
    };
    let q = format!("stop?turn_off={turn_off}&timeout={}", timeout.min(3600));
    match lifecycle(&c, name, &q) {
        Err(e) if unknown_vm(&e) => Ok(None),
        other => other.map(Some),
    }
}

/// `vm status NAME` through the service; `None` as for `stop`.
pub fn status(name: &str, json: bool) -> anyhow::Result<Option<i32>> {
    let Some(c) = client_if_up()? else {
        return Ok(None);
    };
    match call(&c, "GET", &vm_path(name), None) {
        Ok((_, v)) => show(v, json).map(Some),
        Err(e) if unknown_vm(&e) => Ok(None),
        Err(e) => Err(e),
    }
}
