//! Checks that need no knowledge of the host: names and sizes.

/// Longest VM name, in characters.
pub const MAX_NAME_LEN: usize = 100;
/// Smallest guest memory.
pub const MIN_MEMORY: u64 = 32 << 20;

/// A VM name: 1 to 100 characters, no `/`, no NUL, not `.` or `..`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let len = name.chars().count();
    if len == 0 {
        return Err("name: must not be empty".into());
    }
    if len > MAX_NAME_LEN {
        return Err(format!(
            "name: {len} characters is too long (at most {MAX_NAME_LEN})"
        ));
    }
    if name.contains('/') {
        return Err("name: must not contain '/'".into());
    }
    if name.chars().any(char::is_control) {
        return Err("name: must not contain control characters".into());
    }
    if name == "." || name == ".." {
        return Err("name: '.' and '..' are not VM names".into());
    }
    Ok(())
}

/// Parses a size: a number with an optional K, M, G or T suffix (binary units, an optional
/// `B` or `iB`); no suffix means MiB, as in `viridian run --memory`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 20),
        Some((i, _)) => {
            let unit = t[i..].trim_end_matches(['B', 'b']).trim_end_matches('i');
            let shift = match unit.to_ascii_uppercase().as_str() {
                "" if t[i..].eq_ignore_ascii_case("b") => 0,
                "K" => 10,
                "M" => 20,
                "G" => 30,
                "T" => 40,
                _ => return Err(format!("'{s}' is not a size; use e.g. 512M or 2G")),
            };
            (&t[..i], shift)
        }
    };
    if digits.is_empty() {
        return Err(format!("'{s}' is not a size; use e.g. 512M or 2G"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("'{s}' is too large"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Formats a byte count with the largest binary unit that divides it (`512M`, `2G`).
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("web-1").is_ok());
        assert!(validate_name(&"x".repeat(100)).is_ok());
        assert!(validate_name(&"é".repeat(100)).is_ok());
        for bad in ["", ".", "..", "a/b", "a\0b", &"x".repeat(101)] {
            let e = validate_name(bad).unwrap_err();
            assert!(e.starts_with("name:"), "{e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1gb"), Ok(1 << 30));
        assert_eq!(parse_size("64"), Ok(64 << 20));
        assert_eq!(parse_size("4096B"), Ok(4096));
        for bad in ["", "M", "lots", "5X", "99999999999T", "-1G", "1.5G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(format_size(512 << 20), "512M");
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(1000), "1000B");
    }
}
