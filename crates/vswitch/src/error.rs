use crate::netlink::NetlinkError;
use std::path::PathBuf;

/// What can go wrong with a switch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field} {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("switch {0:?} already exists")]
    Exists(String),
    #[error("no switch named {0:?}")]
    NotFound(String),
    #[error(
        "interface {ifname} already exists; switch {switch:?} would need that name for its bridge"
    )]
    BridgeNameTaken { switch: String, ifname: String },
    #[error("interface {0} exists but is not a bridge")]
    NotABridge(String),
    #[error("no network adapter named {0:?}")]
    UnknownAdapter(String),
    #[error("adapter {adapter:?} {reason}")]
    AdapterInUse { adapter: String, reason: String },
    #[error("no interface named {0:?}")]
    NoInterface(String),
    #[error("interface {ifname} is not a port of switch {switch:?}")]
    NotAPort { switch: String, ifname: String },
    #[error("switch {switch:?} has ports attached ({}); detach them first, or force the removal", ports.join(", "))]
    HasPorts { switch: String, ports: Vec<String> },
    #[error("switch {0:?} carries untagged traffic only: this kernel's bridge has no VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)")]
    NoVlans(String),
    #[error("{}: {reason}", path.display())]
    BadDefinition { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("{program}: {reason}")]
    Helper {
        program: &'static str,
        reason: String,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
