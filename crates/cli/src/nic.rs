//! Network adapters: the `--nic` value of `viridian run`, the control socket's NIC commands
//! and `viridian vm nic ...` (Add-, Remove-, Get-, Connect-/Disconnect-VMNetworkAdapter).
//!
//! A NIC value is `switch=NAME[,mac=MAC][,vlan=ID|untagged|trunk:ID,ID...[;native=ID]]
//! [,mac-spoofing=on][,dhcp-guard=on][,router-guard=on]`, fields in any order.

use crate::control;
use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use vmm::network::{mac_string, NetworkConfig, NicInfo, NicSpec};
use vmm::VmControl;
use vswitch::{Vlan, MAX_VID};

pub const NIC_USAGE: &str = "switch=NAME[,mac=MAC][,vlan=ID|untagged|trunk:ID,ID...[;native=ID]][,mac-spoofing=on][,dhcp-guard=on][,router-guard=on]";

/// A MAC address: six hex bytes separated by `:` or `-`, or twelve hex digits; unicast and
/// not all zero.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let digits: String = s.chars().filter(|c| !matches!(c, ':' | '-')).collect();
    let grouped = s.contains([':', '-']);
    let groups_ok = !grouped || s.split([':', '-']).all(|g| g.len() == 2);
    if digits.len() != 12 || !groups_ok || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a MAC address (like 00:15:5d:01:02:03)"
        ));
    }
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{s} is a multicast address; a NIC needs a unicast one"
        ));
    }
    if mac == [0; 6] {
        return Err("00:00:00:00:00:00 is not a usable MAC address".into());
    }
    Ok(mac)
}

fn vid(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|v| (1..=MAX_VID).contains(v))
        .ok_or_else(|| format!("{s:?} is not a VLAN id (1-{MAX_VID})"))
}

/// A VLAN setting: an access VLAN id, `untagged`, or `trunk:ID,ID...[;native=ID]`.
pub fn parse_vlan(s: &str) -> Result<Vlan, String> {
    if s == "untagged" {
        return Ok(Vlan::Untagged);
    }
    let Some(trunk) = s.strip_prefix("trunk:") else {
        return vid(s).map(Vlan::Access);
    };
    let (ids, native) = match trunk.split_once(';') {
        None => (trunk, None),
        Some((ids, opt)) => match opt.strip_prefix("native=") {
            Some(n) => (ids, Some(vid(n)?)),
            None => return Err(format!("{opt:?}: a trunk takes only native=ID after ';'")),
        },
    };
    let allowed = ids.split(',').map(vid).collect::<Result<Vec<u16>, _>>()?;
    Ok(Vlan::Trunk { allowed, native })
}

fn on_off(v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{v:?} is neither on nor off")),
    }
}

/// Parses a NIC value ([`NIC_USAGE`]); errors name the field.
pub fn parse(value: &str) -> anyhow::Result<NicSpec> {
    let err = |field: &str, reason: String| anyhow::anyhow!("--nic {value}: {field}: {reason}");
    let mut spec = NicSpec::on("");
    let mut seen: Vec<&str> = Vec::new();
    let mut tokens = value.split(',').peekable();
    while let Some(token) = tokens.next() {
        let Some((field, v)) = token.split_once('=') else {
            anyhow::bail!("--nic {value}: {token:?} is not FIELD=VALUE ({NIC_USAGE})");
        };
        if seen.contains(&field) {
            return Err(err(field, "given twice".into()));
        }
        seen.push(field);
        match field {
            "switch" => {
                vswitch::check_switch_name(v).map_err(|e| err(field, e.to_string()))?;
                spec.switch = v.to_string();
            }
            "mac" => spec.mac = Some(parse_mac(v).map_err(|e| err(field, e))?),
            "vlan" => {
                // A trunk's list goes on after commas: `vlan=trunk:10,20;native=1`.
                let mut full = v.to_string();
                while v.starts_with("trunk:")
                    && tokens
                        .peek()
                        .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_digit()))
                {
                    full.push(',');
                    full.push_str(tokens.next().unwrap_or_default());
                }
                spec.vlan = parse_vlan(&full).map_err(|e| err(field, e))?;
            }
            "mac-spoofing" => {
                spec.policy.mac_spoofing_protection = !on_off(v).map_err(|e| err(field, e))?
            }
            "dhcp-guard" => spec.policy.dhcp_guard = on_off(v).map_err(|e| err(field, e))?,
            "router-guard" => spec.policy.router_guard = on_off(v).map_err(|e| err(field, e))?,
            _ => anyhow::bail!("--nic {value}: unknown field {field:?} ({NIC_USAGE})"),
        }
    }
    if spec.switch.is_empty() {
        anyhow::bail!("--nic {value}: switch=NAME is required ({NIC_USAGE})");
    }
    Ok(spec)
}

/// A parsed NIC value as the service's NewNetworkAdapter (`vm new --nic`, `vm nic add`).
pub fn new_adapter(spec: &NicSpec) -> serde_json::Value {
    let mut body = serde_json::json!({
        "switch": spec.switch,
        "mac_spoofing": !spec.policy.mac_spoofing_protection,
        "dhcp_guard": spec.policy.dhcp_guard,
        "router_guard": spec.policy.router_guard,
    });
    if let Some(m) = &spec.mac {
        body["mac"] = mac_string(m).into();
    }
    match &spec.vlan {
        Vlan::Untagged => {}
        Vlan::Access(id) => body["vlan"] = (*id).into(),
        Vlan::Trunk { allowed, native } => {
            body["vlan"] = serde_json::json!({ "allowed": allowed, "native": native })
        }
    }
    body
}

/// The network of `viridian run`: the parsed `--nic` values, in order.
pub fn network_config(
    values: &[String],
    vm_name: &str,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<NetworkConfig> {
    Ok(NetworkConfig {
        vm_name: vm_name.to_string(),
        state_dir: vswitch::state_dir(state_dir),
        nics: values
            .iter()
            .map(|v| parse(v))
            .collect::<anyhow::Result<_>>()?,
    })
}

/// The control socket's NIC commands:
/// - `nics`: every NIC as JSON ([`NicInfo`]);
/// - `nic-link up|down [MAC]`: connect or disconnect one NIC's cable, or every NIC's;
/// - `nic-add SPEC` (a `--nic` value): hot add;
/// - `nic-remove MAC`: hot remove.
pub fn command(verb: &str, arg: &str, control: &VmControl) -> String {
    let net = match control.network() {
        Ok(n) => n,
        Err(e) => return format!("error: {e}"),
    };
    match verb {
        "nics" => format!(
            "ok {}",
            serde_json::to_string(&net.list()).unwrap_or_default()
        ),
        "nic-link" => {
            let (state, mac) = arg.split_once(' ').unwrap_or((arg, ""));
            let up = match state {
                "up" => true,
                "down" => false,
                _ => return "error: usage: nic-link up|down [MAC]".into(),
            };
            let mac = match mac {
                "" => None,
                m => match parse_mac(m) {
                    Ok(m) => Some(m),
                    Err(e) => return format!("error: {e}"),
                },
            };
            match net.set_link(mac.as_ref(), up) {
                Ok(changed) if changed.is_empty() => "error: the VM has no NIC".into(),
                Ok(changed) => format!(
                    "ok: {} {}",
                    changed
                        .iter()
                        .map(|n| n.mac.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    if up { "connected" } else { "disconnected" }
                ),
                Err(e) => format!("error: {e}"),
            }
        }
        "nic-add" => match parse(arg).and_then(|spec| Ok(net.add(spec)?)) {
            Ok(n) => format!(
                "ok: NIC {} added on switch {} as {} (slot {})",
                n.mac, n.switch, n.tap, n.slot
            ),
            Err(e) => format!("error: {}", crate::error_chain(&e)),
        },
        "nic-remove" => match parse_mac(arg).map_err(anyhow::Error::msg) {
            Ok(mac) => match net.remove(&mac) {
                Ok((n, true)) => format!("ok: NIC {} removed; its TAP {} is closed", n.mac, n.tap),
                Ok((n, false)) => format!(
                    "ok: NIC {} removed; its TAP {} closes once the guest releases the channel",
                    n.mac, n.tap
                ),
                Err(e) => format!("error: {e}"),
            },
            Err(e) => format!("error: {e}"),
        },
        _ => format!("error: unknown command {verb}"),
    }
}

/// `viridian vm nic`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
#[command(group(clap::ArgGroup::new("link").args(["connect", "disconnect"]).required(true)))]
pub struct NicArgs {
    #[command(subcommand)]
    command: Option<NicCommand>,
    /// The VM's name (`viridian run --name`).
    #[arg(required = true)]
    name: Option<String>,
    /// Connect the cable: the guest sees its carrier come back (Connect-VMNetworkAdapter).
    #[arg(long)]
    connect: bool,
    /// Disconnect the cable: the guest sees no carrier (Disconnect-VMNetworkAdapter).
    #[arg(long)]
    disconnect: bool,
    /// Only the NIC with this MAC address (default: every NIC of the VM).
    #[arg(long)]
    mac: Option<String>,
}

#[derive(Subcommand)]
enum NicCommand {
    /// List a running VM's NICs: MAC, switch, TAP, link, counters (Get-VMNetworkAdapter).
    List {
        #[command(flatten)]
        target: crate::vm::Target,
        #[arg(long)]
        json: bool,
    },
    /// Hot-add a NIC to a running VM (Add-VMNetworkAdapter); the guest's hv_netvsc sees a
    /// new interface.
    Add {
        /// The VM's name.
        name: String,
        /// The switch (`default` is created if needed).
        #[arg(long)]
        switch: String,
        /// Default: stable, from the VM's name and the NIC's slot.
        #[arg(long)]
        mac: Option<String>,
        /// An access VLAN id, `untagged`, or `trunk:ID,ID...[;native=ID]`.
        #[arg(long, conflicts_with = "trunk")]
        vlan: Option<String>,
        /// A trunk: the VLAN ids the guest tags its frames with (Set-VMNetworkAdapterVlan
        /// -Trunk -AllowedVlanIdList), like `10,20`.
        #[arg(long, value_name = "ID,ID...")]
        trunk: Option<String>,
        /// The trunk's native VLAN, carried untagged (-NativeVlanId).
        #[arg(long, requires = "trunk", value_name = "ID")]
        native: Option<String>,
        /// Let the guest send frames with other source MACs.
        #[arg(long)]
        mac_spoofing: bool,
        /// Drop DHCP server messages the guest sends.
        #[arg(long)]
        dhcp_guard: bool,
        /// Drop router advertisements and redirects the guest sends.
        #[arg(long)]
        router_guard: bool,
    },
    /// Hot-remove a NIC (Remove-VMNetworkAdapter): rescinded on VMBus, its TAP closed.
    Remove {
        /// The VM's name.
        name: String,
        #[arg(long)]
        mac: String,
    },
}

/// The NIC list of the VM behind `socket`.
pub fn list(socket: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let reply = control::send(socket, "nics")?;
    let v: serde_json::Value =
        serde_json::from_str(&reply).context("the VM sent a NIC list that is not JSON")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn counter(n: &serde_json::Value, name: &str) -> u64 {
    n["counters"][name].as_u64().unwrap_or(0)
}

/// One line per NIC: where it is plugged in and its counters (for `viridian vm status`).
pub fn status_line(n: &serde_json::Value) -> String {
    let drops = [
        ("spoofed-mac", "drop_spoofed_mac"),
        ("guard", "drop_guard"),
        ("filtered", "drop_filtered"),
        ("no-receive-section", "drop_no_receive_section"),
        ("malformed", "drop_malformed"),
        ("backend-error", "drop_backend_error"),
    ]
    .iter()
    .map(|(label, key)| format!("{label}={}", counter(n, key)))
    .collect::<Vec<_>>()
    .join(" ");
    format!(
        "nic {} switch={} tap={} link={} tx={}/{}B rx={}/{}B drops: {drops}",
        n["mac"].as_str().unwrap_or("?"),
        n["switch"].as_str().unwrap_or("?"),
        n["tap"].as_str().unwrap_or("?"),
        if n["link_up"].as_bool() == Some(true) {
            "up"
        } else {
            "down"
        },
        counter(n, "tx_packets"),
        counter(n, "tx_bytes"),
        counter(n, "rx_packets"),
        counter(n, "rx_bytes"),
    )
}

/// A VLAN as the worker (`{"access": 10}`, `{"trunk": {...}}`, `"untagged"`) or the service
/// (`10`, `{"allowed": [...], "native": 1}`, null) writes it.
fn vlan_text(v: &serde_json::Value) -> String {
    if let Some(id) = v.get("access").or(v.as_u64().map(|_| v)) {
        return id.to_string();
    }
    if let Some(t) = v.get("trunk").or(v.get("allowed").map(|_| v)) {
        let ids: Vec<String> = t["allowed"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| i.to_string())
            .collect();
        let native = t["native"]
            .as_u64()
            .map(|n| format!(";native={n}"))
            .unwrap_or_default();
        return format!("trunk:{}{native}", ids.join(","));
    }
    "untagged".into()
}

fn print_list(list: &[serde_json::Value]) {
    println!(
        "{:<4} {:<17} {:<12} {:<9} {:<15} {:<4} {:<5} {:>10} {:>10} {:>8}",
        "SLOT", "MAC", "SWITCH", "VLAN", "TAP", "LINK", "GUEST", "TX", "RX", "DROPPED"
    );
    for n in list {
        let dropped: u64 = n["counters"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("drop_"))
            .filter_map(|(_, v)| v.as_u64())
            .sum();
        println!(
            "{:<4} {:<17} {:<12} {:<9} {:<15} {:<4} {:<5} {:>10} {:>10} {:>8}",
            n["slot"].to_string(),
            n["mac"].as_str().unwrap_or(""),
            n["switch"].as_str().unwrap_or(""),
            vlan_text(&n["vlan"]),
            n["tap"].as_str().unwrap_or(""),
            if n["link_up"].as_bool() == Some(true) {
                "up"
            } else {
                "down"
            },
            if n["guest_ready"].as_bool() == Some(true) {
                "up"
            } else {
                "-"
            },
            counter(n, "tx_packets"),
            counter(n, "rx_packets"),
            dropped,
        );
    }
}

/// The `--nic` value of `vm nic add`'s options.
fn add_spec(add: &NicCommand) -> anyhow::Result<String> {
    let NicCommand::Add {
        switch,
        mac,
        vlan,
        trunk,
        native,
        mac_spoofing,
        dhcp_guard,
        router_guard,
        ..
    } = add
    else {
        anyhow::bail!("not vm nic add");
    };
    let mut spec = format!("switch={switch}");
    if let Some(m) = mac {
        spec.push_str(&format!(",mac={m}"));
    }
    match (vlan, trunk, native) {
        (Some(v), _, _) => spec.push_str(&format!(",vlan={v}")),
        (None, Some(t), None) => spec.push_str(&format!(",vlan=trunk:{t}")),
        (None, Some(t), Some(n)) => spec.push_str(&format!(",vlan=trunk:{t};native={n}")),
        (None, None, _) => {}
    }
    for (field, on) in [
        ("mac-spoofing", mac_spoofing),
        ("dhcp-guard", dhcp_guard),
        ("router-guard", router_guard),
    ] {
        if *on {
            spec.push_str(&format!(",{field}=on"));
        }
    }
    Ok(spec)
}

/// The service's adapters (NetworkAdapterStatus) as rows of the worker's NIC list: the
/// settings, and the live state while the VM runs.
fn service_rows(nics: &serde_json::Value) -> Vec<serde_json::Value> {
    nics.as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let mut row = n["live"].clone();
            if !row.is_object() {
                row = serde_json::json!({ "slot": "-" });
            }
            for k in ["mac", "switch", "vlan"] {
                row[k] = n[k].clone();
            }
            row
        })
        .collect()
}

/// `viridian vm nic ...` on a VM of the service: its settings change there, and on a running
/// VM the service has the worker change too.
fn via_service(args: &NicArgs) -> anyhow::Result<Option<i32>> {
    use crate::service::vm::vm_call;
    let print =
        |v: serde_json::Value| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    match &args.command {
        Some(NicCommand::List { target, json }) => {
            let Some(name) = target.name() else {
                return Ok(None);
            };
            // The service has a running VM's live state (TAPs, counters) from its worker, so
            // this reads the same on the service's host and from another one.
            let Some(nics) = vm_call(name, "GET", "/nics", None)? else {
                return Ok(None);
            };
            match json {
                true => println!("{nics}"),
                false => print_list(&service_rows(&nics)),
            }
            Ok(Some(0))
        }
        Some(add @ NicCommand::Add { name, .. }) => {
            let body = new_adapter(&parse(&add_spec(add)?)?);
            Ok(vm_call(name, "POST", "/nics", Some(&body))?.map(|nic| {
                print(nic);
                0
            }))
        }
        Some(NicCommand::Remove { name, mac }) => {
            let mac = mac_string(&parse_mac(mac).map_err(anyhow::Error::msg)?);
            Ok(
                vm_call(name, "DELETE", &format!("/nics/{mac}"), None)?.map(|v| {
                    print(v);
                    0
                }),
            )
        }
        None => {
            let Some(name) = args.name.as_deref() else {
                return Ok(None);
            };
            let Some(vm) = vm_call(name, "GET", "", None)? else {
                return Ok(None);
            };
            let wanted = args
                .mac
                .as_deref()
                .map(|m| parse_mac(m).map(|m| mac_string(&m)))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let macs: Vec<String> = match wanted {
                Some(m) => vec![m],
                None => vm["nics"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n["mac"].as_str().map(str::to_string))
                    .collect(),
            };
            anyhow::ensure!(!macs.is_empty(), "VM {name} has no network adapter");
            let body = serde_json::json!({ "connected": args.connect });
            for m in macs {
                if let Some(n) = vm_call(name, "PATCH", &format!("/nics/{m}"), Some(&body))? {
                    print(n);
                }
            }
            Ok(Some(0))
        }
    }
}

pub fn main(args: NicArgs) -> anyhow::Result<i32> {
    if let Some(code) = via_service(&args)? {
        return Ok(code);
    }
    match args.command {
        Some(NicCommand::List { target, json }) => {
            let list = list(&target.path())?;
            if json {
                println!("{}", serde_json::Value::Array(list));
            } else {
                print_list(&list);
            }
        }
        Some(add @ NicCommand::Add { .. }) => {
            let spec = add_spec(&add)?;
            // Checked here first, so a typo fails before the VM is asked.
            parse(&spec)?;
            let NicCommand::Add { name, .. } = add else {
                unreachable!("matched as Add")
            };
            let reply = control::send(&control::socket_for(&name), &format!("nic-add {spec}"))?;
            eprintln!("viridian: {reply}");
        }
        Some(NicCommand::Remove { name, mac }) => {
            let mac = mac_string(&parse_mac(&mac).map_err(anyhow::Error::msg)?);
            let reply = control::send(&control::socket_for(&name), &format!("nic-remove {mac}"))?;
            eprintln!("viridian: {reply}");
        }
        None => {
            let name = args.name.context("the VM's name is needed")?;
            let mac = args
                .mac
                .map(|m| parse_mac(&m).map(|m| mac_string(&m)))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let state = if args.connect { "up" } else { "down" };
            let command = match mac {
                Some(m) => format!("nic-link {state} {m}"),
                None => format!("nic-link {state}"),
            };
            let reply = control::send(&control::socket_for(&name), &command)?;
            eprintln!("viridian: {reply}");
        }
    }
    Ok(0)
}

/// The NICs of a VM's inspection dump.
pub fn inspect(control: &VmControl) -> Vec<NicInfo> {
    control.network().map(|n| n.list()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::network::PortPolicy;

    fn p(v: &str) -> Result<NicSpec, String> {
        parse(v).map_err(|e| e.to_string())
    }

    #[test]
    fn nic_values() {
        assert_eq!(p("switch=lab").unwrap(), NicSpec::on("lab"));
        let s = p("vlan=10,mac=00-15-5D-0A-0B-0C,switch=lab,dhcp-guard=on").unwrap();
        assert_eq!(s.mac, Some([0x00, 0x15, 0x5d, 0x0a, 0x0b, 0x0c]));
        assert_eq!(s.vlan, Vlan::Access(10));
        assert_eq!(
            s.policy,
            PortPolicy {
                mac_spoofing_protection: true,
                dhcp_guard: true,
                router_guard: false
            }
        );
        let s = p("switch=default,mac-spoofing=on,router-guard=on,mac=00155d010203").unwrap();
        assert!(!s.policy.mac_spoofing_protection && s.policy.router_guard);
        assert_eq!(s.mac, Some([0, 0x15, 0x5d, 1, 2, 3]));
        assert_eq!(
            p("switch=t,vlan=trunk:10,20;native=1,mac-spoofing=off")
                .unwrap()
                .vlan,
            Vlan::Trunk {
                allowed: vec![10, 20],
                native: Some(1)
            }
        );
        assert_eq!(
            p("switch=t,vlan=trunk:7").unwrap().vlan,
            Vlan::Trunk {
                allowed: vec![7],
                native: None
            }
        );
        assert_eq!(p("switch=t,vlan=untagged").unwrap().vlan, Vlan::Untagged);
    }

    #[test]
    fn nic_errors_name_the_field() {
        let e = |v: &str, want: &str| {
            let got = p(v).unwrap_err();
            assert!(got.contains(want), "{v}: {got}");
            assert!(got.starts_with(&format!("--nic {v}")), "{got}");
        };
        e("mac=00:15:5d:00:00:01", "switch=NAME is required");
        e(
            "switch=lab,vlan=5000",
            "vlan: \"5000\" is not a VLAN id (1-4094)",
        );
        e("switch=lab,vlan=0", "vlan:");
        e("switch=lab,vlan=trunk:10,x", "\"x\" is not FIELD=VALUE");
        e("switch=lab,vlan=trunk:10,99999", "vlan: \"99999\"");
        e("switch=lab,vlan=trunk:10;pvid=2", "vlan:");
        e(
            "switch=lab,mac=01:00:5e:00:00:01",
            "mac: 01:00:5e:00:00:01 is a multicast",
        );
        e(
            "switch=lab,mac=00:15:5d:00:01",
            "mac: \"00:15:5d:00:01\" is not a MAC",
        );
        e("switch=lab,mac=0:15:5d:00:01:022", "mac:");
        e("switch=lab,mac=00:00:00:00:00:00", "mac: 00:00:00:00:00:00");
        e(
            "switch=lab,mac-spoofing=yes",
            "mac-spoofing: \"yes\" is neither on nor off",
        );
        e("switch=lab,dhcp-guard=1", "dhcp-guard:");
        e("switch=lab,speed=10", "unknown field \"speed\"");
        e("switch=lab,switch=other", "switch: given twice");
        e("switch=has space", "switch:");
        e("switch=waytoolongname", "switch:");
        e("lab", "\"lab\" is not FIELD=VALUE");
        e("", "is not FIELD=VALUE");
    }

    #[test]
    fn status_line_shows_counters_and_drops_by_reason() {
        let n = serde_json::json!({
            "mac": "00:15:5d:00:00:01", "switch": "lab", "tap": "vif0", "link_up": false,
            "counters": {"tx_packets": 3, "tx_bytes": 180, "rx_packets": 2, "rx_bytes": 120,
                         "drop_spoofed_mac": 4}
        });
        assert_eq!(
            status_line(&n),
            "nic 00:15:5d:00:00:01 switch=lab tap=vif0 link=down tx=3/180B rx=2/120B drops: \
             spoofed-mac=4 guard=0 filtered=0 no-receive-section=0 malformed=0 backend-error=0"
        );
        assert_eq!(vlan_text(&serde_json::json!({"access": 10})), "10");
        assert_eq!(
            vlan_text(&serde_json::json!({"trunk": {"allowed": [10, 20], "native": 1}})),
            "trunk:10,20;native=1"
        );
        assert_eq!(vlan_text(&serde_json::json!("untagged")), "untagged");
        assert_eq!(vlan_text(&serde_json::json!(12)), "12");
        assert_eq!(
            vlan_text(&serde_json::json!({"allowed": [10, 20], "native": null})),
            "trunk:10,20"
        );
        assert_eq!(vlan_text(&serde_json::Value::Null), "untagged");
    }

    #[test]
    fn nic_values_become_the_services_adapters() {
        let a = |v: &str| new_adapter(&parse(v).unwrap());
        assert_eq!(
            a("switch=lab,vlan=trunk:10,20;native=20,dhcp-guard=on,mac=00-15-5D-00-00-09"),
            serde_json::json!({"switch": "lab", "mac": "00:15:5d:00:00:09",
                               "vlan": {"allowed": [10, 20], "native": 20},
                               "mac_spoofing": false, "dhcp_guard": true, "router_guard": false})
        );
        assert_eq!(
            a("switch=lab,vlan=7,mac-spoofing=on,router-guard=on"),
            serde_json::json!({"switch": "lab", "vlan": 7, "mac_spoofing": true,
                               "dhcp_guard": false, "router_guard": true})
        );
        assert_eq!(a("switch=lab,vlan=untagged").get("vlan"), None);
    }
}
