//! Request checks that need the host: processor count, memory size, paths. Each message
//! starts with the field's name.

use crate::db::Settings;
use crate::error::ApiError;
use crate::host;
use api::{NewVm, VmPatch};

pub fn name(n: &str) -> Result<(), ApiError> {
    api::validate_name(n).map_err(ApiError::invalid)
}

pub fn cpus(n: u32) -> Result<u32, ApiError> {
    let max = host::cpus();
    if n == 0 || n > max {
        return Err(ApiError::invalid(format!(
            "cpus: {n} is out of range; this host has {max} processor(s), so use 1 to {max}"
        )));
    }
    Ok(n)
}

pub fn memory(s: &str) -> Result<u64, ApiError> {
    let bytes = api::parse_size(s).map_err(|e| ApiError::invalid(format!("memory: {e}")))?;
    let max = host::memory();
    if bytes < api::MIN_MEMORY {
        return Err(ApiError::invalid(format!(
            "memory: {s} is too small; give at least 32M"
        )));
    }
    if bytes > max {
        return Err(ApiError::invalid(format!(
            "memory: {s} is more than this host has ({})",
            api::format_size(max & !((1 << 20) - 1))
        )));
    }
    if bytes % (1 << 20) != 0 {
        return Err(ApiError::invalid(format!(
            "memory: {s} is not a whole number of MiB"
        )));
    }
    Ok(bytes)
}

/// A host path that must name an existing regular file.
pub fn file(field: &str, p: &str) -> Result<String, ApiError> {
    if p.is_empty() || p.contains('\0') {
        return Err(ApiError::invalid(format!("{field}: give a path to a file")));
    }
    let path = std::path::Path::new(p);
    if !path.is_absolute() {
        return Err(ApiError::invalid(format!(
            "{field}: '{p}' is relative; give an absolute path (the service does not share your working directory)"
        )));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(p.to_string()),
        Ok(_) => Err(ApiError::invalid(format!(
            "{field}: '{p}' is not a regular file"
        ))),
        Err(e) => Err(ApiError::invalid(format!("{field}: '{p}': {e}"))),
    }
}

fn cmdline(c: &str) -> Result<String, ApiError> {
    if c.len() > 4096 || c.contains('\0') {
        return Err(ApiError::invalid(
            "cmdline: at most 4096 bytes, without NUL characters",
        ));
    }
    Ok(c.to_string())
}

fn percent(field: &str, v: u32, min: u32) -> Result<u32, ApiError> {
    if v < min || v > 100 {
        return Err(ApiError::invalid(format!(
            "{field}: {v} is out of range; use {min} to 100 (percent)"
        )));
    }
    Ok(v)
}

fn weight(v: u32) -> Result<u32, ApiError> {
    if !(1..=10000).contains(&v) {
        return Err(ApiError::invalid(format!(
            "cpu_weight: {v} is out of range; use 1 to 10000 (100 is the default)"
        )));
    }
    Ok(v)
}

/// The settings of a new VM.
pub fn new_vm(req: &NewVm) -> Result<Settings, ApiError> {
    name(&req.name)?;
    Ok(Settings {
        cpus: cpus(req.cpus)?,
        memory: memory(&req.memory)?,
        kernel: file("kernel", &req.kernel)?,
        initrd: req
            .initrd
            .as_deref()
            .map(|i| file("initrd", i))
            .transpose()?,
        cmdline: cmdline(req.cmdline.as_deref().unwrap_or("console=ttyS0"))?,
        hyperv: req.hyperv.unwrap_or(true),
        cpu_limit: percent("cpu_limit", req.cpu_limit.unwrap_or(100), 1)?,
        cpu_reserve: percent("cpu_reserve", req.cpu_reserve.unwrap_or(0), 0)?,
        cpu_weight: weight(req.cpu_weight.unwrap_or(100))?,
        auto_start: req.auto_start.unwrap_or_default(),
        auto_stop: req.auto_stop.unwrap_or_default(),
        recovery: req.recovery.unwrap_or_default(),
        disks: Vec::new(),
        dvds: Vec::new(),
        nics: Vec::new(),
        disabled_integration: Vec::new(),
    })
}

/// Whether the patch changes something that needs the VM off.
pub fn needs_off(p: &VmPatch) -> Option<&'static str> {
    [
        (p.name.is_some(), "name"),
        (p.cpus.is_some(), "cpus"),
        (p.memory.is_some(), "memory"),
        (p.kernel.is_some(), "kernel"),
        (p.initrd.is_some(), "initrd"),
        (p.cmdline.is_some(), "cmdline"),
        (p.hyperv.is_some(), "hyperv"),
    ]
    .into_iter()
    .find(|(set, _)| *set)
    .map(|(_, f)| f)
}

/// Applies a patch to a copy of the settings; nothing changes when a field is invalid.
pub fn patch(s: &Settings, p: &VmPatch) -> Result<Settings, ApiError> {
    if let Some(n) = &p.name {
        name(n)?;
    }
    let mut s = s.clone();
    if let Some(v) = p.cpus {
        s.cpus = cpus(v)?;
    }
    if let Some(v) = &p.memory {
        s.memory = memory(v)?;
    }
    if let Some(v) = &p.kernel {
        s.kernel = file("kernel", v)?;
    }
    if let Some(v) = &p.initrd {
        // An empty string removes the initrd.
        s.initrd = if v.is_empty() {
            None
        } else {
            Some(file("initrd", v)?)
        };
    }
    if let Some(v) = &p.cmdline {
        s.cmdline = cmdline(v)?;
    }
    if let Some(v) = p.hyperv {
        s.hyperv = v;
    }
    if let Some(v) = p.cpu_limit {
        s.cpu_limit = percent("cpu_limit", v, 1)?;
    }
    if let Some(v) = p.cpu_reserve {
        s.cpu_reserve = percent("cpu_reserve", v, 0)?;
    }
    if let Some(v) = p.cpu_weight {
        s.cpu_weight = weight(v)?;
    }
    if let Some(v) = p.auto_start {
        s.auto_start = v;
    }
    if let Some(v) = p.auto_stop {
        s.auto_stop = v;
    }
    if let Some(v) = p.recovery {
        s.recovery = v;
    }
    Ok(s)
}
