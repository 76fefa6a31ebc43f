//! `viridian switch ...`: virtual switches (New-, Get-, Remove-VMSwitch). Through the
//! management service when one answers (`--socket`, `VIRIDIAN_SOCKET`, `--host`, or the default
//! socket), else worked directly on the state directory and the kernel (as root). With
//! `--state-dir` or `VIRIDIAN_STATE_DIR`, and for `apply`, `connect` and `disconnect` (ports of
//! another VMM, which the service does not track), always directly.

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use vswitch::{Cidr, SwitchDef, SwitchKind, SwitchStatus};

#[derive(Args)]
pub struct SwitchArgs {
    /// Where switch definitions live (default: $VIRIDIAN_STATE_DIR, else /var/lib/viridian);
    /// they are STATE_DIR/switches/NAME.json.
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: SwitchCommand,
}

#[derive(Subcommand)]
enum SwitchCommand {
    /// Create a switch (New-VMSwitch): bridge vs-NAME. NAME `default` is the Default Switch
    /// (172.30.254.1/24, NAT, DHCP and DNS).
    New {
        /// 1-12 letters, digits, '-' or '_'.
        name: String,
        /// private: VMs only; internal: VMs and this host; external: bridged to --adapter.
        /// Implied by --adapter (external) and by NAME default.
        #[arg(long = "type", value_enum)]
        kind: Option<Kind>,
        /// External: the physical adapter; its addresses and routes move to the switch.
        #[arg(long, value_name = "NIC")]
        adapter: Option<String>,
        /// Internal (or default): the host's address on the switch, ADDRESS/PREFIX.
        #[arg(long, value_name = "CIDR")]
        host_address: Option<Cidr>,
    },
    /// List the defined switches and whether each is present in the kernel (Get-VMSwitch).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a switch and its definition (Remove-VMSwitch); an External adapter gets its
    /// addresses and routes back.
    Remove {
        name: String,
        /// Remove it even with VM interfaces attached (they stay, connected to nothing).
        #[arg(long)]
        force: bool,
    },
    /// Re-create every defined switch (after a reboot; what viridian-switches.service runs).
    /// Existing bridges are reconciled, not duplicated.
    Apply,
    /// Make an existing interface (another VMM's TAP, a veth) a port of the switch, with a
    /// VLAN setting, and bring it up. Viridian's own NICs are attached by `--nic`.
    Connect {
        name: String,
        interface: String,
        /// An access VLAN id, `untagged` (the default), or `trunk:ID,ID...[;native=ID]`.
        #[arg(long)]
        vlan: Option<String>,
    },
    /// Take an interface off the switch.
    Disconnect { name: String, interface: String },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Private,
    Internal,
    External,
    Default,
}

impl From<Kind> for SwitchKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Private => SwitchKind::Private,
            Kind::Internal => SwitchKind::Internal,
            Kind::External => SwitchKind::External,
            Kind::Default => SwitchKind::Default,
        }
    }
}

/// The kind a `switch new` asks for, from --type, --adapter and the name.
fn kind_of(name: &str, kind: Option<Kind>, adapter: bool) -> anyhow::Result<SwitchKind> {
    Ok(match (kind, adapter, name == vswitch::DEFAULT_SWITCH) {
        (Some(k), _, _) => k.into(),
        (None, true, _) => SwitchKind::External,
        (None, false, true) => SwitchKind::Default,
        (None, false, false) => {
            anyhow::bail!("--type is needed: private, internal or external (or give --adapter)")
        }
    })
}

pub fn main(args: SwitchArgs) -> anyhow::Result<i32> {
    let dir_named = args.state_dir.is_some()
        || std::env::var_os("VIRIDIAN_STATE_DIR").is_some_and(|d| !d.is_empty());
    let direct = matches!(
        args.command,
        SwitchCommand::Apply | SwitchCommand::Connect { .. } | SwitchCommand::Disconnect { .. }
    );
    if !dir_named && !direct {
        if let Some(c) = crate::service::client_if_up()? {
            return via_service(&c, args.command);
        }
    }
    let dir = vswitch::state_dir(args.state_dir);
    match args.command {
        SwitchCommand::New {
            name,
            kind,
            adapter,
            host_address,
        } => {
            let kind = kind_of(&name, kind, adapter.is_some())?;
            let def = SwitchDef {
                name,
                kind,
                adapter,
                host_address,
            };
            let def = vswitch::create(&dir, def)?;
            println!("{}", describe(&def));
            Ok(0)
        }
        SwitchCommand::List { json } => {
            let list = vswitch::list(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                table(&list);
            }
            Ok(0)
        }
        SwitchCommand::Remove { name, force } => {
            vswitch::remove(&dir, &name, force)?;
            println!("Removed switch {name}");
            Ok(0)
        }
        SwitchCommand::Apply => {
            let applied = vswitch::apply(&dir)
                .with_context(|| format!("applying the switches in {}", dir.display()))?;
            let mut failed = 0;
            for a in &applied {
                match &a.result {
                    Ok(()) => println!("{}: up", a.name),
                    Err(e) => {
                        failed += 1;
                        eprintln!("viridian: switch {}: {e}", a.name);
                    }
                }
            }
            if applied.is_empty() {
                println!("No switches are defined in {}", dir.display());
            }
            Ok(if failed == 0 { 0 } else { 1 })
        }
        SwitchCommand::Connect {
            name,
            interface,
            vlan,
        } => {
            let vlan = vlan
                .map(|v| crate::nic::parse_vlan(&v))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--vlan: {e}"))?
                .unwrap_or_default();
            vswitch::attach(&dir, &name, &interface, vswitch::PortSettings { vlan })?;
            println!("{interface} is a port of switch {name}");
            Ok(0)
        }
        SwitchCommand::Disconnect { name, interface } => {
            vswitch::detach(&dir, &name, &interface)?;
            println!("{interface} is off switch {name}");
            Ok(0)
        }
    }
}

/// The verbs as requests to the service (`/switches`).
fn via_service(c: &api::client::Client, cmd: SwitchCommand) -> anyhow::Result<i32> {
    use crate::service::{call, segment};
    match cmd {
        SwitchCommand::New {
            name,
            kind,
            adapter,
            host_address,
        } => {
            let kind = kind_of(&name, kind, adapter.is_some())?;
            let body = serde_json::json!({
                "name": name,
                "type": kind.as_str(),
                "adapter": adapter,
                "host_address": host_address.map(|a| a.to_string()),
            });
            let (_, v) = call(c, "POST", "/switches", Some(&body))?;
            println!("{}", describe(&from_api(serde_json::from_value(v)?)?.def));
        }
        SwitchCommand::List { json } => {
            let (_, v) = call(c, "GET", "/switches", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let list: Vec<api::Switch> = serde_json::from_value(v)?;
                table(
                    &list
                        .into_iter()
                        .map(from_api)
                        .collect::<anyhow::Result<Vec<_>>>()?,
                );
            }
        }
        SwitchCommand::Remove { name, force } => {
            call(
                c,
                "DELETE",
                &format!("/switches/{}?force={force}", segment(&name)),
                None,
            )?;
            println!("Removed switch {name}");
        }
        SwitchCommand::Apply | SwitchCommand::Connect { .. } | SwitchCommand::Disconnect { .. } => {
            unreachable!("apply, connect and disconnect work on the state directory and the kernel")
        }
    }
    Ok(0)
}

/// The service's view of a switch as vswitch's, for the table.
fn from_api(s: api::Switch) -> anyhow::Result<SwitchStatus> {
    let kind = match s.kind {
        api::SwitchType::Private => SwitchKind::Private,
        api::SwitchType::Internal => SwitchKind::Internal,
        api::SwitchType::External => SwitchKind::External,
        api::SwitchType::Default => SwitchKind::Default,
    };
    let host_address = s
        .host_address
        .map(|a| a.parse::<Cidr>().map_err(anyhow::Error::msg))
        .transpose()?;
    Ok(SwitchStatus {
        def: SwitchDef {
            name: s.name,
            kind,
            adapter: s.adapter,
            host_address,
        },
        bridge: s.bridge,
        present: s.present,
        vlan_filtering: s.vlan_filtering,
        ports: s.ports,
        dhcp_running: s.dhcp_running,
    })
}

fn describe(def: &SwitchDef) -> String {
    let mut s = format!(
        "Created {} switch {} (bridge {})",
        def.kind,
        def.name,
        def.bridge()
    );
    if let Some(a) = &def.adapter {
        s.push_str(&format!(", adapter {a}"));
    }
    if let Some(a) = &def.host_address {
        s.push_str(&format!(", host address {a}"));
    }
    s
}

/// Get-VMSwitch's table, with the kernel's side.
fn table(list: &[SwitchStatus]) {
    let head = [
        "Name",
        "SwitchType",
        "Bridge",
        "Adapter",
        "HostAddress",
        "State",
        "Ports",
    ];
    let rows: Vec<[String; 7]> = list
        .iter()
        .map(|s| {
            let mut state = if s.present { "present" } else { "missing" }.to_string();
            if s.present && !s.vlan_filtering {
                state.push_str(" (no VLANs)");
            }
            if s.dhcp_running == Some(false) && s.present {
                state.push_str(" (no DHCP)");
            }
            [
                s.def.name.clone(),
                s.def.kind.to_string(),
                s.bridge.clone(),
                s.def.adapter.clone().unwrap_or_default(),
                s.def
                    .host_address
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                state,
                s.ports.join(","),
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 7]| {
        let mut s = String::new();
        for (c, w) in cells.iter().zip(width) {
            s.push_str(&format!("{c:<w$} "));
        }
        println!("{}", s.trim_end());
    };
    line(head);
    line(head.map(|h| &"-----------"[..h.len()]));
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5], &r[6]].map(String::as_str));
    }
}

#[cfg(test)]
mod tests {
    use crate::Cli;
    use clap::Parser;
    use vswitch::testing::{in_netns, Net};

    /// Runs `viridian switch ARGS` in this process, as main() would, and returns the exit
    /// code or the error's text.
    fn run(args: &[&str]) -> Result<i32, String> {
        let cli = Cli::try_parse_from(["viridian", "switch"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        match cli.command {
            crate::Command::Switch(a) => super::main(a).map_err(|e| crate::error_chain(&e)),
            _ => unreachable!(),
        }
    }

    #[test]
    fn new_list_remove_and_apply() {
        in_netns(|| {
            let state = tempfile::tempdir().unwrap();
            let dir = state.path().to_str().unwrap().to_string();
            let sd = ["--state-dir", dir.as_str()];
            let net = Net::open();
            net.add_port("phys0");
            net.add_address("phys0", "203.0.113.5/24");
            let with = |args: &[&str]| -> Vec<String> {
                args.iter().chain(&sd).map(|s| s.to_string()).collect()
            };
            let go =
                |args: &[&str]| run(&with(args).iter().map(String::as_str).collect::<Vec<_>>());

            assert_eq!(
                go(&[
                    "new",
                    "lab",
                    "--type",
                    "internal",
                    "--host-address",
                    "198.51.100.1/24"
                ]),
                Ok(0)
            );
            assert_eq!(go(&["new", "iso", "--type", "private"]), Ok(0));
            assert_eq!(go(&["new", "ext", "--adapter", "phys0"]), Ok(0));
            assert_eq!(
                net.link("vs-lab").unwrap().addresses,
                ["198.51.100.1/24".parse().unwrap()]
            );
            assert_eq!(
                net.link("vs-ext").unwrap().addresses,
                ["203.0.113.5/24".parse().unwrap()]
            );
            assert_eq!(net.link("phys0").unwrap().master.as_deref(), Some("vs-ext"));

            // What list --json prints.
            let list = vswitch::list(state.path()).unwrap();
            let json = serde_json::to_value(&list).unwrap();
            let names: Vec<_> = json
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap())
                .collect();
            assert_eq!(names, ["ext", "iso", "lab"]);
            assert_eq!(json[0]["type"], "external");
            assert_eq!(json[0]["adapter"], "phys0");
            assert_eq!(json[0]["bridge"], "vs-ext");
            assert_eq!(json[0]["present"], true);
            assert_eq!(json[2]["host_address"], "198.51.100.1/24");
            assert_eq!(go(&["list"]), Ok(0));
            assert_eq!(go(&["list", "--json"]), Ok(0));

            // Bad input, each naming what is wrong.
            let err = go(&[
                "new",
                "x",
                "--type",
                "internal",
                "--host-address",
                "300.1.1.1/24",
            ])
            .unwrap_err();
            assert!(err.contains("--host-address"), "{err}");
            let err = go(&["new", "lab", "--type", "private"]).unwrap_err();
            assert_eq!(err, "switch \"lab\" already exists");
            let err = go(&["new", "e2", "--adapter", "nosuch0"]).unwrap_err();
            assert_eq!(err, "no network adapter named \"nosuch0\"");
            let err = go(&["new", "thirteen-char"]).unwrap_err();
            assert!(err.contains("--type is needed"), "{err}");
            let err = go(&["new", "thirteen-char", "--type", "private"]).unwrap_err();
            assert!(err.contains("invalid switch name"), "{err}");

            // A port keeps a switch unless forced.
            net.add_port("tap0");
            // Another VMM's TAP joins and leaves through connect and disconnect.
            assert_eq!(go(&["connect", "lab", "tap0"]), Ok(0));
            assert_eq!(net.link("tap0").unwrap().master.as_deref(), Some("vs-lab"));
            assert_eq!(go(&["disconnect", "lab", "tap0"]), Ok(0));
            assert_eq!(net.link("tap0").unwrap().master, None);
            let err = go(&["connect", "lab", "tap0", "--vlan", "x"]).unwrap_err();
            assert!(err.contains("--vlan: \"x\" is not a VLAN id"), "{err}");
            let err = go(&["connect", "nosuch", "tap0"]).unwrap_err();
            assert!(err.contains("no switch named"), "{err}");
            assert_eq!(go(&["connect", "lab", "tap0"]), Ok(0));
            let err = go(&["remove", "lab"]).unwrap_err();
            assert!(err.contains("tap0") && err.contains("force"), "{err}");
            assert_eq!(go(&["remove", "lab", "--force"]), Ok(0));
            assert!(net.link("vs-lab").is_none());

            // After a "reboot" apply brings the rest back; twice is the same as once.
            net.delete("vs-iso");
            assert_eq!(go(&["apply"]), Ok(0));
            assert_eq!(go(&["apply"]), Ok(0));
            assert!(net.link("vs-iso").is_some());
            assert_eq!(go(&["remove", "ext"]), Ok(0));
            assert_eq!(
                net.link("phys0").unwrap().addresses,
                ["203.0.113.5/24".parse().unwrap()]
            );
            assert_eq!(go(&["remove", "iso"]), Ok(0));
            let left = std::fs::read_dir(state.path().join("switches"))
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .extension()
                        .is_some_and(|x| x == "json")
                })
                .count();
            assert_eq!(left, 0);
        });
    }
}
