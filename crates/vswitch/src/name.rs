//! Switch names and the interface names made from them.
//!
//! Linux interface names are at most 15 bytes (IFNAMSIZ 16 with the NUL). A switch named
//! NAME is the bridge `vs-NAME`, so a switch name is 1 to 12 characters: ASCII letters,
//! digits, `-` and `_`, starting with a letter or digit. For Internal and Default switches the
//! bridge device itself is the host's interface on the switch (Hyper-V's "vEthernet (NAME)").

use crate::Error;

/// The prefix of every switch bridge.
pub const BRIDGE_PREFIX: &str = "vs-";
/// The longest switch name: 15 bytes of interface name less the prefix.
pub const MAX_NAME_LEN: usize = 15 - BRIDGE_PREFIX.len();
/// The Default Switch's name.
pub const DEFAULT_SWITCH: &str = "default";

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Checks a switch name.
pub fn check_switch_name(name: &str) -> Result<(), Error> {
    let field = "switch name";
    if name.is_empty() {
        return Err(invalid(field, name, "it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            field,
            name,
            format!(
                "it is {} bytes; at most {MAX_NAME_LEN} (the bridge is {BRIDGE_PREFIX}NAME and Linux interface names are at most 15 bytes)",
                name.len()
            ),
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid(field, name, "it must start with a letter or digit"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(invalid(
            field,
            name,
            format!("{c:?} is not allowed (letters, digits, '-' and '_' only)"),
        ));
    }
    Ok(())
}

/// Checks an existing interface's name (an adapter or a port), as the kernel would.
pub fn check_ifname(field: &'static str, name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 15 {
        return Err(invalid(field, name, "an interface name is 1 to 15 bytes"));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(invalid(field, name, "not a valid interface name"));
    }
    Ok(())
}

/// The bridge of the switch `name` (a valid switch name).
pub fn bridge_name(name: &str) -> String {
    format!("{BRIDGE_PREFIX}{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_names() {
        for ok in ["a", "lab", "External_1", "vm-net", "abcdefghijkl", "9"] {
            check_switch_name(ok).unwrap();
            assert!(bridge_name(ok).len() <= 15);
        }
        for bad in ["", "abcdefghijklm", "-x", "_x", "a b", "a/b", "a.b", "é"] {
            let err = check_switch_name(bad).unwrap_err().to_string();
            assert!(err.contains("switch name"), "{err}");
        }
        assert_eq!(bridge_name(DEFAULT_SWITCH), "vs-default");
    }

    #[test]
    fn interface_names() {
        check_ifname("adapter", "eth0").unwrap();
        check_ifname("adapter", "enp0s31f6").unwrap();
        for bad in ["", "sixteen-bytes-xx", "a b", "a/b", "..", "eth0:1"] {
            let err = check_ifname("adapter", bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid adapter"), "{err}");
        }
    }
}
