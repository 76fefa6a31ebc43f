//! `viridian run`: one VM in the foreground, like a worker process with its console attached.

use crate::console::{InputEnd, RawMode, Stdin};
use crate::serial_log::SerialLog;
use crate::whole_lines::{WholeLines, PROMPT_DELAY};
use anyhow::Context;
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vmm::console::{Console, InputError, Viewer, WhenSlow};
use vmm::{ExitReason, Vm, VmConfig};

/// Exit status when the guest reset itself (the VM does not reboot in the foreground).
pub const EXIT_RESET: i32 = 3;
/// Exit status when stopped with Ctrl-C.
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Args, Clone)]
pub struct RunArgs {
    /// The guest kernel: an x86-64 bzImage, or an uncompressed ELF vmlinux.
    #[arg(long, required_unless_present_any = ["demo", "restore"])]
    kernel: Option<PathBuf>,
    /// An initrd/initramfs image.
    #[arg(long)]
    pub(crate) initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    pub(crate) cmdline: String,
    /// Number of virtual processors.
    #[arg(long, default_value_t = 1)]
    pub(crate) cpus: u32,
    /// Guest memory, e.g. 512M or 2G (a plain number means MiB).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub(crate) memory: u64,
    /// The VM's name, for `viridian vm stop NAME` (default: viridian-PID).
    #[arg(long)]
    name: Option<String>,
    /// Control socket path (default: /run/viridian/NAME.sock for root).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Also write the guest's serial console to this file (with --restore, appended to it;
    /// kept to at most 16 MiB).
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Send nothing to the guest's console: by default a terminal on stdin is put in raw mode
    /// and its keys go to COM1 (Ctrl-] detaches), and piped stdin is sent as typed input.
    /// Without a terminal on stdin the console goes to stdout in whole lines.
    #[arg(long)]
    no_console_input: bool,
    /// Present plain KVM instead of Hyper-V (no Hyper-V CPUID leaves, synthetic MSRs or VMBus).
    #[arg(long)]
    pub(crate) no_hyperv: bool,
    /// Do not offer this integration service (repeatable): heartbeat, kvp, shutdown or
    /// timesync (Disable-VMIntegrationService). `viridian vm integration` turns it on later.
    #[arg(long = "disable-integration", value_name = "SERVICE", value_parser = parse_service)]
    pub(crate) disable_integration: Vec<vmm::vmbus_host::Service>,
    /// Boot the demo guest: a Debian 12 system disk to its login prompt (root, no password),
    /// built from Debian packages and cached on the first run; the guest writes to a
    /// differencing disk that is deleted afterwards. Where this host's KVM cannot run Linux,
    /// the demo runs inside the lab VM instead.
    #[arg(long, conflicts_with_all = ["kernel", "initrd"])]
    demo: bool,
    /// A disk (repeatable): a VHDX, VHD or raw image, detected from its content, which must
    /// agree with a .vhdx or .vhd name; a raw image must be whole 512-byte sectors unless
    /// given `format=raw`. `readonly` attaches it read-only. `controller=N` (0-3) and
    /// `location=M` (0-63) place it; by default disks go on controller 0 at locations 0, 1,
    /// 2 ... in order. Each controller used is a SCSI controller of its own on VMBus. A disk
    /// opened for writing is locked; a file another VM is writing fails to open.
    #[arg(long = "disk", value_name = DISK_USAGE)]
    pub(crate) disks: Vec<String>,
    /// A DVD drive (repeatable) with an ISO image loaded, read-only and shared with other
    /// readers, or empty with `none`; it takes the next free location after the disks
    /// unless placed. `viridian vm dvd NAME --path ISO | --eject` changes the medium.
    #[arg(long = "dvd", value_name = DVD_USAGE)]
    pub(crate) dvds: Vec<String>,
    /// A network adapter (repeatable): a TAP device on virtual switch NAME (`default` is the
    /// Default Switch, created if needed). Without `mac=` its MAC is stable, from the VM's
    /// name and the NIC's index. `vlan=` puts it in an access VLAN (or a trunk);
    /// `mac-spoofing=on` lets the guest send from other MACs; `dhcp-guard=on` and
    /// `router-guard=on` drop DHCP server and router messages it sends.
    #[arg(long = "nic", value_name = crate::nic::NIC_USAGE)]
    pub(crate) nics: Vec<String>,
    /// Resume a VM saved to this file (`viridian vm save`) where it was, instead of booting:
    /// its processors, memory and kernel come from the file; so do its disks, DVDs and NICs
    /// unless given here (they must be the same ones).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["demo", "kernel"])]
    restore: Option<PathBuf>,
    /// Where switch definitions live (default: $VIRIDIAN_STATE_DIR, else /var/lib/viridian).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// One `--disk` or `--dvd` value: `PATH[,readonly][,format=raw|vhd|vhdx][,controller=N]
/// [,location=M]` (a DVD takes no `readonly` or `format`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    pub path: PathBuf,
    pub read_only: bool,
    /// `None`: the format the content and the name agree on.
    pub format: Option<vmm::vmbus_host::ImageFormat>,
    /// `None`: the default, unbuffered (`cache=none`).
    pub cache: Option<vmm::vmbus_host::CacheMode>,
    pub controller: Option<u8>,
    pub location: Option<u8>,
}

const DISK_USAGE: &str =
    "PATH[,readonly][,format=raw|vhd|vhdx][,cache=none|writeback][,controller=N][,location=M]";
const DVD_USAGE: &str = "ISO|none[,controller=N][,location=M]";

/// Parses a `--disk` value. Options follow the path after commas, in any order; a path may
/// itself hold commas (the options are taken off its end).
pub fn parse_disk(value: &str) -> anyhow::Result<DiskArg> {
    parse_drive("--disk", value, DISK_USAGE)
}

/// Parses a `--dvd` value: an ISO, or `none` for an empty drive (path left empty).
pub fn parse_dvd(value: &str) -> anyhow::Result<DiskArg> {
    let mut arg = parse_drive("--dvd", value, DVD_USAGE)?;
    if arg.path.as_os_str() == "none" {
        arg.path = PathBuf::new();
    }
    Ok(arg)
}

fn parse_drive(flag: &str, value: &str, usage: &str) -> anyhow::Result<DiskArg> {
    let dvd = flag == "--dvd";
    let mut arg = DiskArg {
        path: PathBuf::new(),
        read_only: false,
        format: None,
        cache: None,
        controller: None,
        location: None,
    };
    let number = |what: &str, v: &str| -> anyhow::Result<u8> {
        v.parse()
            .map_err(|_| anyhow::anyhow!("{flag} {value}: {what}={v:?} is not a number"))
    };
    let mut rest = value;
    let mut took_option = false;
    while let Some((head, opt)) = rest.rsplit_once(',') {
        match opt.split_once('=') {
            None if !dvd && (opt == "readonly" || opt == "ro") => arg.read_only = true,
            Some(("format", f)) if !dvd => {
                arg.format = Some(
                    f.parse()
                        .map_err(|e| anyhow::anyhow!("{flag} {value}: {e}"))?,
                )
            }
            Some(("cache", c)) if !dvd => {
                arg.cache = Some(
                    c.parse()
                        .map_err(|e| anyhow::anyhow!("{flag} {value}: {e}"))?,
                )
            }
            Some(("controller", n)) => arg.controller = Some(number("controller", n)?),
            Some(("location", n)) => arg.location = Some(number("location", n)?),
            // A comma inside the path, once an option was taken or where a directory follows.
            _ if took_option || opt.contains('/') => break,
            _ => anyhow::bail!("{flag} {value}: unknown option {opt:?} ({usage})"),
        }
        took_option = true;
        rest = head;
    }
    anyhow::ensure!(!rest.is_empty(), "{flag} needs a path ({usage})");
    arg.path = PathBuf::from(rest);
    Ok(arg)
}

/// Places and opens every `--disk` and `--dvd` before the VM is built, so a bad place or a
/// missing or locked file fails at once with one line naming it. Disks come first; places
/// not given are the lowest free locations of controller 0 (or of the controller given).
fn open_disks(args: &RunArgs) -> anyhow::Result<Vec<vmm::vmbus_host::Drive>> {
    use vmm::vmbus_host::{self as vh, Drive, Media};
    if (!args.disks.is_empty() || !args.dvds.is_empty()) && args.no_hyperv {
        anyhow::bail!("--disk and --dvd need the Hyper-V interface (the SCSI controller is on VMBus); drop --no-hyperv");
    }
    let mut parsed = Vec::new();
    for d in &args.disks {
        parsed.push(("--disk", d, parse_disk(d)?));
    }
    for d in &args.dvds {
        parsed.push(("--dvd", d, parse_dvd(d)?));
    }
    let wanted: Vec<vh::Wanted> = parsed
        .iter()
        .map(|(_, _, a)| (a.controller, a.location))
        .collect();
    let places = vh::place(&wanted).map_err(|(i, e)| {
        let (flag, value, _) = &parsed[i];
        anyhow::anyhow!("{flag} {value}: {e}")
    })?;
    parsed
        .into_iter()
        .zip(places)
        .map(|((flag, _, a), (controller, location))| {
            let media = if flag == "--disk" {
                Media::Disk(
                    vh::open_disk(&a.path, a.format, a.read_only)?
                        .with_cache(a.cache.unwrap_or_default()),
                )
            } else if a.path.as_os_str().is_empty() {
                Media::Dvd(None)
            } else {
                Media::Dvd(Some(vh::DiskSpec::open_iso(&a.path)?))
            };
            Ok(Drive {
                controller,
                location,
                media,
            })
        })
        .collect()
}

/// The VM's name: `--name`, else viridian-PID.
fn vm_name(args: &RunArgs) -> String {
    args.name
        .clone()
        .unwrap_or_else(|| format!("viridian-{}", std::process::id()))
}

/// The `--nic` adapters, checked before the VM is built (the TAPs are made with it).
fn network(args: &RunArgs) -> anyhow::Result<vmm::network::NetworkConfig> {
    if !args.nics.is_empty() && args.no_hyperv {
        anyhow::bail!(
            "--nic needs the Hyper-V interface (the network adapter is on VMBus); drop --no-hyperv"
        );
    }
    crate::nic::network_config(&args.nics, &vm_name(args), args.state_dir.clone())
}

/// Parses a memory size: a number with an optional K, M, G or T suffix (binary units);
/// no suffix means MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 20),
        Some((i, _)) => {
            let unit = s[i..].trim_end_matches(['B', 'b', 'i']);
            let shift = match unit.to_ascii_uppercase().as_str() {
                "K" => 10,
                "M" => 20,
                "G" => 30,
                "T" => 40,
                _ => return Err(format!("'{s}': use a number with K, M, G or T, e.g. 512M")),
            };
            (&s[..i], shift)
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size, e.g. 512M"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

pub fn main(args: RunArgs) -> anyhow::Result<i32> {
    if args.demo {
        return demo(&args);
    }
    if let Some(file) = &args.restore {
        return restore(file, &args);
    }
    let kernel = args.kernel.clone().expect("clap requires --kernel");
    let disks = open_disks(&args)?;
    let network = network(&args)?;
    run_vm(
        &VmConfig {
            kernel,
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone(),
            vcpus: args.cpus,
            memory: args.memory,
            hyperv: !args.no_hyperv,
            disks,
            network,
        },
        &args,
        None,
    )
}

/// `--restore FILE`: the saved VM's shape from the file, its devices from the file unless
/// given, then its state.
fn restore(file: &Path, args: &RunArgs) -> anyhow::Result<i32> {
    let mut saved = vmm::saved::SavedFile::open(file)?;
    let run = crate::saved_run::SavedRun::read(&mut saved)?;
    let mut args = args.clone();
    args.cpus = run.cpus;
    args.memory = run.memory;
    args.no_hyperv = !run.hyperv;
    args.cmdline = run.cmdline.clone();
    args.initrd = run.initrd.clone();
    if args.disks.is_empty() && args.dvds.is_empty() {
        args.disks = run.disks.clone();
        args.dvds = run.dvds.clone();
    }
    if args.nics.is_empty() {
        args.nics = run.nics.clone();
    }
    if args.disable_integration.is_empty() {
        args.disable_integration = run
            .disabled_integration
            .iter()
            .map(|s| parse_service(s).map_err(|e| anyhow::anyhow!("{}: {e}", file.display())))
            .collect::<anyhow::Result<_>>()?;
    }
    let disks = open_disks(&args)?;
    let network = network(&args)?;
    run_vm(
        &VmConfig {
            kernel: run.kernel.clone(),
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone(),
            vcpus: args.cpus,
            memory: args.memory,
            hyperv: !args.no_hyperv,
            disks,
            network,
        },
        &args,
        Some(saved),
    )
}

/// How long the terminal and the `--serial` file may take to write the last output.
const CONSOLE_DRAIN: Duration = Duration::from_secs(10);

/// Parses an integration service's name for `--disable-integration`.
pub fn parse_service(s: &str) -> Result<vmm::vmbus_host::Service, String> {
    vmm::vmbus_host::Service::parse(s).ok_or_else(|| {
        format!("unknown integration service '{s}'; use heartbeat, kvp, shutdown or timesync")
    })
}

fn run_vm(
    config: &VmConfig,
    args: &RunArgs,
    restore: Option<vmm::saved::SavedFile>,
) -> anyhow::Result<i32> {
    // A restored VM's console log goes on where it was; a booting one starts afresh.
    let file = args
        .serial
        .as_ref()
        .map(|p| {
            let opened = if restore.is_some() {
                SerialLog::append(p)
            } else {
                SerialLog::create(p).map(|log| (log, Vec::new()))
            };
            opened.with_context(|| format!("cannot open {}", p.display()))
        })
        .transpose()?;
    let started = std::time::Instant::now();
    let vm = match restore {
        Some(_) => Vm::for_restore(config)?,
        None => Vm::new(config)?,
    };
    tracing::info!("VM built in {:?}", started.elapsed());
    for s in &args.disable_integration {
        vm.control()
            .set_integration(*s, false)
            .map_err(|e| anyhow::anyhow!("--disable-integration {}: {e}", s.short()))?;
    }
    if let Some(mut file) = restore {
        vm.restore(&mut file, &mut |_, _| {})?;
        tracing::info!(
            "restored from {} after {:?}",
            file.path().display(),
            started.elapsed()
        );
    }
    let console = vm.console().clone();
    let log = file
        .map(|(f, earlier)| {
            let viewer = console.attach("--serial file", Box::new(f), true, WhenSlow::Drop);
            console.preload(&earlier);
            viewer
        })
        .transpose()
        .context("cannot start the console log")?;
    let name = vm_name(args);
    let socket = args
        .control_socket
        .clone()
        .unwrap_or_else(|| crate::control::socket_for(&name));
    // Ctrl-C (and SIGTERM or SIGHUP) works from the moment the control socket exists (tests
    // rely on that order).
    let stop = vm.stop_handle();
    ctrlc::set_handler(move || stop.stop()).context("cannot install the Ctrl-C handler")?;
    let saved_run = crate::saved_run::SavedRun::from_args(args, &config.kernel);
    let _control = crate::control::ControlServer::start(&socket, vm.control(), saved_run)?;
    tracing::info!("control socket {}", socket.display());

    let input = if args.no_console_input {
        Stdin::Nothing
    } else {
        crate::console::stdin_kind()
    };
    // Restored when this function returns, whichever way, and by the panic hook.
    let raw = match input {
        Stdin::Terminal => Some(RawMode::enter().context("cannot put the terminal in raw mode")?),
        _ => None,
    };
    // Nobody types at a console whose input is not a terminal: its output is for programs and
    // logs, and goes out in whole lines, so a script's own lines next to it never split one.
    let stdout: Box<dyn Write + Send> = match input {
        Stdin::Terminal => Box::new(std::io::stdout()),
        _ => Box::new(WholeLines::new(std::io::stdout(), PROMPT_DELAY)),
    };
    let terminal = Arc::new(
        console
            .attach("terminal", stdout, true, WhenSlow::Drop)
            .context("cannot start the console")?,
    );
    if input != Stdin::Nothing {
        let hint = reattach_hint(&name, &socket, args);
        let (console, terminal) = (console.clone(), terminal.clone());
        std::thread::Builder::new()
            .name("console-input".into())
            .spawn(move || forward_input(&console, input, &terminal, &hint))
            .context("cannot start the console input thread")?;
    }

    let reason = vm.run()?;
    tracing::info!("VM stopped ({reason:?}) after {:?}", started.elapsed());
    for viewer in std::iter::once(&*terminal).chain(log.as_ref()) {
        viewer.wait(CONSOLE_DRAIN);
    }
    drop(raw);
    Ok(match reason {
        ExitReason::PowerOff => 0,
        ExitReason::Reset => {
            eprintln!(
                "viridian: the guest reset itself; the VM has stopped (exit status {EXIT_RESET})"
            );
            EXIT_RESET
        }
        ExitReason::Saved => {
            eprintln!("viridian: the VM was saved; `viridian run --restore FILE` resumes it");
            0
        }
        ExitReason::SaveFailed(why) => {
            eprintln!("viridian: saving the VM failed: {why}");
            1
        }
        ExitReason::TurnedOff => {
            eprintln!("viridian: turned off by `viridian vm stop --force`");
            0
        }
        ExitReason::Stopped => {
            eprintln!(
                "viridian: stopped by Ctrl-C or a signal; the guest was powered off without shutting down"
            );
            EXIT_INTERRUPTED
        }
        ExitReason::TripleFault { vcpu, registers } => {
            eprintln!("viridian: vCPU {vcpu} triple-faulted; the guest is dead.\n{registers}");
            1
        }
        ExitReason::InternalError {
            vcpu,
            what,
            registers,
        } => {
            eprintln!("viridian: vCPU {vcpu}: {what}.\n{registers}");
            1
        }
    })
}

/// Sends stdin to the guest's console until it ends or, on a terminal, until Ctrl-].
fn forward_input(console: &Arc<Console>, kind: Stdin, terminal: &Viewer, hint: &str) {
    let pid = std::process::id();
    let who = match kind {
        Stdin::Terminal => format!("the terminal of `viridian run` (pid {pid})"),
        _ => format!("the standard input of `viridian run` (pid {pid})"),
    };
    let mut writer = match console.take_input(&who, false) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!("no console input: {e}");
            None
        }
    };
    loop {
        let end = crate::console::forward(kind, |keys| match &writer {
            Some(w) => w.send(keys),
            // Taken over: the terminal only shows output (and still detaches).
            None => Ok(()),
        });
        match end {
            InputEnd::Refused(InputError::Stopped) | InputEnd::Eof => return,
            InputEnd::Refused(why) => {
                writer = None;
                if kind != Stdin::Terminal {
                    tracing::warn!("console input stopped: {why}");
                    return;
                }
                terminal.notice(&format!(
                    "\r\n[viridian: {why}; this terminal only shows output now (Ctrl-] detaches)]\r\n"
                ));
            }
            InputEnd::Detach => {
                drop(writer);
                terminal.detach();
                crate::console::restore_terminal();
                eprintln!("{hint}");
                return;
            }
        }
    }
}

/// What to tell the user on Ctrl-]: the VM goes on in this process; how to come back.
fn reattach_hint(name: &str, socket: &Path, args: &RunArgs) -> String {
    let target = if args.control_socket.is_some() {
        format!("--socket {}", socket.display())
    } else {
        name.to_string()
    };
    let log = match &args.serial {
        Some(p) => format!("; its console still goes to {}", p.display()),
        None => String::new(),
    };
    format!(
        "\nviridian: detached from the console. The VM goes on running in this process (pid {}){log}.\n\
         viridian: re-attach with `viridian vm console {target}`; stop it with `viridian vm stop {target}` or Ctrl-C here.",
        std::process::id()
    )
}

fn demo(args: &RunArgs) -> anyhow::Result<i32> {
    let cache = lab::Cache::default_location()?;
    eprintln!(
        "viridian: preparing the demo guest, a Debian 12 system disk, in {} (built and cached on the first run)",
        cache.dir().display()
    );
    let exe = std::env::current_exe().context("cannot find the viridian binary")?;
    let guest = lab::DemoGuest::prepare(&cache, &exe)?;
    match lab::host_kvm_can_run_linux() {
        Ok(()) => {
            let scratch = guest.scratch_disk(&exe, &std::env::temp_dir())?;
            eprintln!(
                "viridian: booting {} (through the differencing disk {}); log in as root, no password",
                guest.disk.vhdx.display(),
                scratch.display()
            );
            // The system disk first, so that it is sda; any --disk goes after it.
            let mut with_system = args.clone();
            with_system
                .disks
                .insert(0, format!("{},format=vhdx", scratch.display()));
            let result = open_disks(&with_system).and_then(|disks| {
                run_vm(
                    &VmConfig {
                        kernel: guest.disk.kernel.clone(),
                        initrd: Some(guest.disk.initrd.clone()),
                        cmdline: guest.cmdline.clone(),
                        vcpus: args.cpus,
                        memory: args.memory,
                        hyperv: !args.no_hyperv,
                        disks,
                        network: network(args)?,
                    },
                    args,
                    None,
                )
            });
            let _ = std::fs::remove_file(&scratch);
            result
        }
        Err(why) => {
            eprintln!("viridian: {why}; running the demo inside the lab VM (QEMU TCG with nested KVM) instead");
            let lab = lab::Lab::prepare(&cache, &exe)?;
            let run = lab.run(
                &[lab::Scenario::demo(args.cpus, args.memory >> 20)],
                &mut std::io::stdout(),
            )?;
            let result = run
                .scenario("demo")
                .context("the lab VM did not run the demo scenario")?;
            Ok(result.exit_code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_disk, parse_dvd, parse_size, DiskArg};
    use std::path::PathBuf;

    #[test]
    fn disk_values() {
        use vmm::vmbus_host::ImageFormat;
        let d = |v: &str| parse_disk(v).map_err(|e| e.to_string());
        let v = |v: &str| parse_dvd(v).map_err(|e| e.to_string());
        let arg = |path: &str, read_only, format| DiskArg {
            path: PathBuf::from(path),
            read_only,
            format,
            cache: None,
            controller: None,
            location: None,
        };
        assert_eq!(d("a.vhdx").unwrap(), arg("a.vhdx", false, None));
        assert_eq!(
            d("a.vhdx,cache=writeback,ro").unwrap(),
            DiskArg {
                cache: Some(vmm::vmbus_host::CacheMode::Writeback),
                ..arg("a.vhdx", true, None)
            }
        );
        assert_eq!(
            d("a.vhdx,cache=none").unwrap().cache,
            Some(vmm::vmbus_host::CacheMode::None)
        );
        let bad = d("a.vhdx,cache=bogus").unwrap_err();
        assert!(
            bad.contains("cache=\"bogus\"") && bad.contains("writeback"),
            "{bad}"
        );
        assert!(v("d.iso,cache=none").is_err());
        assert_eq!(
            d("/x/a.vhdx,readonly").unwrap(),
            arg("/x/a.vhdx", true, None)
        );
        assert_eq!(d("a,b.img,ro").unwrap(), arg("a,b.img", true, None));
        assert_eq!(d("/dir,1/a.img").unwrap(), arg("/dir,1/a.img", false, None));
        assert_eq!(
            d("odd.bin,format=raw,ro").unwrap(),
            arg("odd.bin", true, Some(ImageFormat::Raw))
        );
        assert_eq!(
            d("x.img,readonly,format=VHDX").unwrap(),
            arg("x.img", true, Some(ImageFormat::Vhdx))
        );
        assert_eq!(
            d("a.vhdx,controller=1,location=7,readonly").unwrap(),
            DiskArg {
                controller: Some(1),
                location: Some(7),
                ..arg("a.vhdx", true, None)
            }
        );
        assert!(d("a.vhdx,location=x").unwrap_err().contains("\"x\""));
        assert!(d("a.vhdx,location=300").is_err());
        assert_eq!(
            v("none,location=3").unwrap(),
            DiskArg {
                location: Some(3),
                ..arg("", false, None)
            }
        );
        assert_eq!(v("/isos/d.iso").unwrap(), arg("/isos/d.iso", false, None));
        assert!(v("d.iso,readonly").unwrap_err().contains("readonly"));
        assert!(v("d.iso,format=raw").is_err());
        assert!(d("a.img,format=qcow2").unwrap_err().contains("qcow2"));
        assert!(d("a.vhdx,writable").unwrap_err().contains("writable"));
        assert!(d(",readonly").is_err());
        assert!(d("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("64"), Ok(64 << 20));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
