//! Virtual switches as a resource of the service (New-, Get-, Remove-VMSwitch). The
//! definitions under `STATE_DIR/switches/` are the inventory, the same files `viridian switch`
//! works on without a service; the service adds what only it knows (which VMs' adapters use
//! each switch) and re-creates missing bridges when it starts (`switch apply`).

use super::Manager;
use crate::error::ApiError;
use api::{NewSwitch, Switch, SwitchType};
use axum::http::StatusCode;
use vswitch::{SwitchDef, SwitchKind, SwitchStatus};

impl Manager {
    /// Runs a blocking vswitch call (netlink, helper programs) off the runtime's threads.
    async fn on_switches<T: Send + 'static>(
        &self,
        f: impl FnOnce(&std::path::Path) -> vswitch::Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let dir = self.state_dir.clone();
        tokio::task::spawn_blocking(move || f(&dir))
            .await
            .map_err(|e| ApiError::internal("a switch operation failed", e))?
            .map_err(switch_error)
    }

    /// The VMs whose adapters are on `switch`.
    fn switch_users(&self, switch: &str) -> Result<Vec<String>, ApiError> {
        Ok(self
            .db()
            .all()?
            .into_iter()
            .filter(|r| r.settings.nics.iter().any(|n| n.switch == switch))
            .map(|r| r.name)
            .collect())
    }

    fn switch_view(&self, s: SwitchStatus) -> Result<Switch, ApiError> {
        Ok(Switch {
            vms: self.switch_users(&s.def.name)?,
            kind: kind_to_api(s.def.kind),
            adapter: s.def.adapter,
            host_address: s.def.host_address.map(|a| a.to_string()),
            bridge: s.bridge,
            present: s.present,
            vlan_filtering: s.vlan_filtering,
            ports: s.ports,
            dhcp_running: s.dhcp_running,
            name: s.def.name,
        })
    }

    pub async fn switches(&self) -> Result<Vec<Switch>, ApiError> {
        let list = self.on_switches(vswitch::list).await?;
        list.into_iter().map(|s| self.switch_view(s)).collect()
    }

    pub async fn switch(&self, name: &str) -> Result<Switch, ApiError> {
        vswitch::check_switch_name(name).map_err(|_| no_switch(name))?;
        let list = self.on_switches(vswitch::list).await?;
        let s = list
            .into_iter()
            .find(|s| s.def.name == name)
            .ok_or_else(|| no_switch(name))?;
        self.switch_view(s)
    }

    /// New-VMSwitch: the definition and the bridge, or neither.
    pub async fn create_switch(&self, req: NewSwitch) -> Result<Switch, ApiError> {
        let def = switch_def(req)?;
        let name = def.name.clone();
        self.on_switches(move |dir| vswitch::create(dir, def))
            .await?;
        tracing::info!("created switch '{name}'");
        self.switch(&name).await
    }

    /// Remove-VMSwitch: refused while VMs' adapters (in the inventory) or interfaces (in the
    /// kernel) are on it, unless forced.
    pub async fn remove_switch(&self, name: &str, force: bool) -> Result<(), ApiError> {
        vswitch::check_switch_name(name).map_err(|_| no_switch(name))?;
        let users = self.switch_users(name)?;
        if !users.is_empty() && !force {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "in_use",
                format!(
                    "switch '{name}' has network adapters of VM {} on it; remove them (`viridian vm nic remove`) or force the removal",
                    users.join(", ")
                ),
            ));
        }
        let n = name.to_string();
        self.on_switches(move |dir| vswitch::remove(dir, &n, force))
            .await?;
        tracing::info!("removed switch '{name}'");
        Ok(())
    }

    /// At start-up, `switch apply`: every defined switch's bridge is made if it is missing
    /// (after a host reboot) and reconciled otherwise.
    pub async fn apply_switches(&self) {
        match self.on_switches(vswitch::apply).await {
            Ok(applied) => {
                for a in applied {
                    match a.result {
                        Ok(()) => tracing::info!("switch '{}' is up", a.name),
                        Err(e) => tracing::warn!("switch '{}' cannot be brought up: {e}", a.name),
                    }
                }
            }
            Err(e) => tracing::warn!("the switches cannot be applied: {e}"),
        }
    }
}

fn no_switch(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!(
            "there is no switch called '{}' (`viridian switch list` shows them)",
            name.chars().take(64).collect::<String>()
        ),
    )
}

fn kind_to_api(k: SwitchKind) -> SwitchType {
    match k {
        SwitchKind::Private => SwitchType::Private,
        SwitchKind::Internal => SwitchType::Internal,
        SwitchKind::External => SwitchType::External,
        SwitchKind::Default => SwitchType::Default,
    }
}

/// A definition from a request, its fields checked; the kind as `viridian switch new` infers
/// it (an adapter means External, the name `default` the Default Switch).
fn switch_def(req: NewSwitch) -> Result<SwitchDef, ApiError> {
    vswitch::check_switch_name(&req.name).map_err(|e| ApiError::invalid(format!("name: {e}")))?;
    let kind = match (req.kind, &req.adapter, req.name == vswitch::DEFAULT_SWITCH) {
        (Some(k), _, _) => match k {
            SwitchType::Private => SwitchKind::Private,
            SwitchType::Internal => SwitchKind::Internal,
            SwitchType::External => SwitchKind::External,
            SwitchType::Default => SwitchKind::Default,
        },
        (None, Some(_), _) => SwitchKind::External,
        (None, None, true) => SwitchKind::Default,
        (None, None, false) => {
            return Err(ApiError::invalid(
                "type: needed: private, internal or external (or give an adapter)",
            ))
        }
    };
    let host_address = req
        .host_address
        .as_deref()
        .map(|a| {
            a.parse::<vswitch::Cidr>()
                .map_err(|e| ApiError::invalid(format!("host_address: '{a}': {e}")))
        })
        .transpose()?;
    let def = SwitchDef {
        name: req.name,
        kind,
        adapter: req.adapter,
        host_address,
    };
    def.check().map_err(switch_error)?;
    Ok(def)
}

/// A vswitch error as an answer: bad fields 422 (named as in the API), clashes 409, a
/// missing switch 404, faults of the host 500.
fn switch_error(e: vswitch::Error) -> ApiError {
    use vswitch::Error as E;
    match &e {
        E::Invalid { field, .. } => {
            let field = match *field {
                "switch name" => "name",
                "host address" => "host_address",
                other => other,
            };
            ApiError::invalid(format!("{field}: {e}"))
        }
        E::UnknownAdapter(_) => ApiError::invalid(format!("adapter: {e}")),
        E::AdapterInUse { .. } => ApiError::conflict(format!("adapter: {e}")),
        E::Exists(name) => ApiError::new(
            StatusCode::CONFLICT,
            "duplicate_name",
            format!("a switch called '{name}' exists already; pick another name"),
        ),
        E::NotFound(name) => no_switch(name),
        E::BridgeNameTaken { .. } | E::NotABridge(_) | E::HasPorts { .. } | E::NoVlans(_) => {
            ApiError::conflict(e.to_string())
        }
        _ => ApiError::internal("the switch could not be changed", e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: serde_json::Value) -> NewSwitch {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn requests_become_definitions_or_name_the_bad_field() {
        let d = switch_def(req(serde_json::json!({"name": "lab", "adapter": "eth1"}))).unwrap();
        assert_eq!(d.kind, SwitchKind::External);
        let d = switch_def(req(serde_json::json!({"name": "default"}))).unwrap();
        assert_eq!(d.kind, SwitchKind::Default);
        for (body, field) in [
            (serde_json::json!({"name": "lab"}), "type:"),
            (serde_json::json!({"name": "", "type": "private"}), "name:"),
            (
                serde_json::json!({"name": "a/b", "type": "private"}),
                "name:",
            ),
            (
                serde_json::json!({"name": "thirteen-char", "type": "private"}),
                "name:",
            ),
            (
                serde_json::json!({"name": "x", "type": "internal", "host_address": "300.1.1.1/24"}),
                "host_address:",
            ),
            (
                serde_json::json!({"name": "x", "type": "internal", "host_address": "10.0.0.1"}),
                "host_address:",
            ),
            (
                serde_json::json!({"name": "x", "type": "private", "host_address": "10.0.0.1/24"}),
                "host_address:",
            ),
            (
                serde_json::json!({"name": "x", "type": "external"}),
                "adapter:",
            ),
            (
                serde_json::json!({"name": "x", "type": "private", "adapter": "eth0"}),
                "adapter:",
            ),
            (
                serde_json::json!({"name": "x", "type": "external", "adapter": "a/b"}),
                "adapter:",
            ),
            (serde_json::json!({"name": "x", "type": "default"}), "name:"),
        ] {
            let e = switch_def(req(body.clone())).unwrap_err();
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {e}");
            assert!(e.message.starts_with(field), "{body}: {}", e.message);
        }
    }
}
