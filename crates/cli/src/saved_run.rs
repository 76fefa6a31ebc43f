//! Save-VM in the worker: the control socket's `save PATH`, and the configuration a saved
//! state keeps so that `viridian run --restore PATH` can build the same VM again.

use crate::run::RunArgs;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use vmm::{SaveRequest, VmControl};

/// Layout version of [`SavedRun`].
const VERSION: u32 = 1;

/// How the saved VM was built: `viridian run`'s options, with the drives and integration
/// services as they were when it was saved (hot-added disks included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRun {
    pub version: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u32,
    pub memory: u64,
    pub hyperv: bool,
    /// `--disk` values, placed.
    pub disks: Vec<String>,
    /// `--dvd` values, placed.
    pub dvds: Vec<String>,
    /// `--nic` values as given.
    pub nics: Vec<String>,
    /// `--disable-integration` values.
    pub disabled_integration: Vec<String>,
}

impl SavedRun {
    /// The configuration `viridian run` was started with.
    pub fn from_args(args: &RunArgs, kernel: &Path) -> Self {
        Self {
            version: VERSION,
            kernel: kernel.to_path_buf(),
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone(),
            cpus: args.cpus,
            memory: args.memory,
            hyperv: !args.no_hyperv,
            disks: args.disks.clone(),
            dvds: args.dvds.clone(),
            nics: args.nics.clone(),
            disabled_integration: args
                .disable_integration
                .iter()
                .map(|s| s.short().to_string())
                .collect(),
        }
    }

    /// This configuration with the running VM's drives and integration services.
    pub fn current(&self, control: &VmControl) -> Self {
        let mut now = self.clone();
        if self.hyperv {
            now.disks.clear();
            now.dvds.clear();
            for (c, d) in control.drives() {
                let place = format!("controller={c},location={}", d.lun);
                match (d.kind, &d.path) {
                    (vmm::vmbus_host::DriveKind::Dvd, Some(p)) => {
                        now.dvds.push(format!("{},{place}", p.display()))
                    }
                    (vmm::vmbus_host::DriveKind::Dvd, None) => {
                        now.dvds.push(format!("none,{place}"))
                    }
                    (_, path) => {
                        let path = path.clone().unwrap_or_default();
                        let mut v = format!("{},{place}", path.display());
                        if let Some(f) = &d.format {
                            v.push_str(&format!(",format={}", f.to_ascii_lowercase()));
                        }
                        if d.read_only {
                            v.push_str(",readonly");
                        }
                        if let Some(c) = d.cache.filter(|c| *c != Default::default()) {
                            v.push_str(&format!(",cache={}", c.name()));
                        }
                        now.disks.push(v);
                    }
                }
            }
            now.disabled_integration = control
                .integration()
                .iter()
                .filter(|s| !s.enabled)
                .filter_map(|s| vmm::vmbus_host::Service::parse(s.name))
                .map(|s| s.short().to_string())
                .collect();
        }
        now
    }

    /// Reads the configuration section of a saved-state file.
    pub fn read(file: &mut vmm::saved::SavedFile) -> anyhow::Result<Self> {
        let bytes = file.config()?;
        let run: SavedRun = serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: the saved configuration is invalid: {e}",
                file.path().display()
            )
        })?;
        anyhow::ensure!(
            run.version == VERSION,
            "{}: saved configuration version {} is not supported (this viridian reads {VERSION})",
            file.path().display(),
            run.version
        );
        Ok(run)
    }
}

/// The control socket's `save PATH`: answers `progress N` lines (percent of RAM written) while
/// it saves, then one `ok: ...` or `error: ...` line. On success the VM ends once the answer is
/// out.
pub fn serve_save(
    mut writer: std::os::unix::net::UnixStream,
    arg: &str,
    control: &VmControl,
    run: &SavedRun,
) {
    let path = PathBuf::from(arg.trim());
    if arg.trim().is_empty() || !path.is_absolute() {
        let _ = writeln!(writer, "error: usage: save ABSOLUTE-PATH");
        return;
    }
    let config = match serde_json::to_vec(&run.current(control)) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(writer, "error: {e}");
            return;
        }
    };
    let mut progress_out = writer.try_clone().ok();
    let mut last = None;
    let progress = Box::new(move |done: u64, total: u64| {
        let pct = (done.saturating_mul(100) / total.max(1)).min(100);
        if last != Some(pct) {
            last = Some(pct);
            if let Some(w) = &mut progress_out {
                if writeln!(w, "progress {pct}").is_err() {
                    // The client went; the save goes on.
                    progress_out = None;
                }
            }
        }
    });
    let request = SaveRequest {
        path,
        config,
        progress,
    };
    match control.save(request) {
        Ok((report, ack)) => {
            let w = report.written;
            tracing::info!(
                "saved to {} in {:?}: {} MiB of RAM, {} MiB of it not zero, {} MiB file",
                report.path.display(),
                report.elapsed,
                w.ram_bytes >> 20,
                w.nonzero_bytes >> 20,
                w.file_bytes >> 20
            );
            let _ = writeln!(
                writer,
                "ok: saved to {} in {:.2} s ({} MiB of RAM, {} MiB written)",
                report.path.display(),
                report.elapsed.as_secs_f64(),
                w.ram_bytes >> 20,
                w.file_bytes >> 20
            );
            let _ = writer.flush();
            drop(ack);
        }
        Err(e) => {
            let _ = writeln!(writer, "error: {e}");
        }
    }
}

/// Sends `save PATH` to a control socket, showing progress on a terminal; returns the answer.
pub fn request(socket: &Path, path: &Path) -> anyhow::Result<String> {
    use std::io::BufRead;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the VM's control socket {}: {e} (is the VM running?)",
            socket.display()
        )
    })?;
    writeln!(stream, "save {}", path.display())?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    for line in std::io::BufReader::new(stream).lines() {
        let line = line?;
        if let Some(p) = line.strip_prefix("progress ") {
            if tty {
                eprint!("\rviridian: saving... {p}%");
            }
            continue;
        }
        if tty {
            eprintln!();
        }
        return match line.strip_prefix("error: ") {
            Some(e) => anyhow::bail!("{e}"),
            None => Ok(line.trim_start_matches("ok: ").to_string()),
        };
    }
    anyhow::bail!("the VM closed the control connection during the save")
}
