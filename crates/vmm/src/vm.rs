//! The VM: builds the partition, runs one thread per vCPU, and reports why it stopped.

use crate::console::Console;
use crate::hyperv::{self, Hv, HvExits};
use crate::integration::ShutdownError;
use crate::pause::PauseGate;
use crate::save::{self, Parts, SaveAck, SaveError, SaveReport, SaveRequest};
use crate::saved::SavedFile;
pub use crate::vmbus_host::DiskError;
use crate::vmbus_host::{DriveInfo, IcStatus, Media, Vmbus};
use crate::{acpi, boot, cpu, layout, vcpu, Error, Result};
use chipset::Chipset;
use guestmem::GuestMemory;
use kvm::kvm_ioctls::VcpuFd;
use kvm::Partition;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// What to run.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Present the Hyper-V interface (CPUID leaves, synthetic MSRs, hypercalls, VMBus device).
    /// When false the guest sees plain KVM (kvmclock and friends).
    pub hyperv: bool,
    /// Disks and DVD drives at their places (see [`crate::vmbus_host::place`]), each used
    /// controller its own storvsp device; files opened, and locked, by
    /// [`crate::vmbus_host::open_disk`] before the VM is built. Needs `hyperv`.
    pub disks: Vec<crate::vmbus_host::Drive>,
    /// Network adapters, each a TAP on a virtual switch (see [`crate::network`]). Needs
    /// `hyperv`.
    pub network: crate::network::NetworkConfig,
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 or port 0xCF9, or a reboot through ACPI).
    Reset,
    /// A vCPU triple-faulted.
    TripleFault { vcpu: u32, registers: String },
    /// KVM could not emulate or run the guest.
    InternalError {
        vcpu: u32,
        what: String,
        registers: String,
    },
    /// Stopped from outside (Ctrl-C).
    Stopped,
    /// Turned off from outside (`viridian vm stop --force`).
    TurnedOff,
    /// Saved to a file (Save-VM); `viridian run --restore` resumes it.
    Saved,
    /// A save failed after the VM had stopped for it, so it was turned off; why.
    SaveFailed(String),
}

/// What the thread running the VM is told: an exit, or a pause or resume to carry out.
enum Event {
    Exit(ExitReason),
    Pause {
        paused: bool,
        done: mpsc::Sender<std::result::Result<(), PauseError>>,
    },
    Save {
        request: SaveRequest,
        done: mpsc::Sender<std::result::Result<(SaveReport, SaveAck), SaveError>>,
    },
}

/// Stops a running VM from another thread.
#[derive(Clone)]
pub struct StopHandle(mpsc::Sender<Event>);

impl StopHandle {
    /// Stops the VM as Ctrl-C does.
    pub fn stop(&self) {
        let _ = self.0.send(Event::Exit(ExitReason::Stopped));
    }

    /// Powers the VM off without asking the guest.
    pub fn turn_off(&self) {
        let _ = self.0.send(Event::Exit(ExitReason::TurnedOff));
    }
}

/// Why a pause or resume did not happen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is not running")]
    NotRunning,
    #[error("{0} of the VM's vCPUs did not stop within {PAUSE_TIMEOUT:?}")]
    Timeout(u32),
}

/// How long a pause waits for the vCPUs to leave the guest.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Controls a running VM from another thread (the control socket).
#[derive(Clone)]
pub struct VmControl {
    stop: StopHandle,
    vmbus: Option<Arc<Vmbus>>,
    gate: Arc<PauseGate>,
    console: Arc<Console>,
    memory: u64,
    started: std::time::Instant,
    network: Option<Arc<crate::network::Network>>,
}

impl VmControl {
    /// The integration services and how each is doing (Get-VMIntegrationService); empty
    /// without Hyper-V enlightenments.
    pub fn integration(&self) -> Vec<crate::vmbus_host::ServiceState> {
        self.vmbus
            .as_ref()
            .map(|v| v.services())
            .unwrap_or_default()
    }

    /// Offers or rescinds an integration service (Enable-/Disable-VMIntegrationService).
    pub fn set_integration(
        &self,
        service: crate::vmbus_host::Service,
        enabled: bool,
    ) -> std::result::Result<(), String> {
        match &self.vmbus {
            Some(v) => v.set_service(service, enabled),
            None => Err("this VM has no VMBus (it runs without Hyper-V enlightenments)".into()),
        }
    }

    /// Resource use since the VM was built (Measure-VM).
    pub fn measure(&self) -> crate::measure::Measure {
        let (cpu_seconds, resident_bytes) = crate::measure::own_usage();
        let (disk_read_bytes, disk_written_bytes) = self
            .vmbus
            .as_ref()
            .map(|v| v.disk_bytes())
            .unwrap_or_default();
        let (network_received_bytes, network_sent_bytes) =
            self.network.as_ref().map(|n| n.bytes()).unwrap_or_default();
        crate::measure::Measure {
            uptime_secs: self.started.elapsed().as_secs(),
            cpu_seconds,
            memory_bytes: self.memory,
            resident_bytes,
            disk_read_bytes,
            disk_written_bytes,
            network_received_bytes,
            network_sent_bytes,
        }
    }

    /// The COM1 console hub.
    pub fn console(&self) -> &Arc<Console> {
        &self.console
    }

    /// Stops the vCPUs; the guest's state stays in memory (Suspend-VM). Returns once every
    /// vCPU is out of the guest.
    pub fn pause(&self) -> std::result::Result<(), PauseError> {
        self.set_paused(true)
    }

    /// Lets a paused VM's vCPUs run again (Resume-VM).
    pub fn resume(&self) -> std::result::Result<(), PauseError> {
        self.set_paused(false)
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.gate.is_paused()
    }

    fn set_paused(&self, paused: bool) -> std::result::Result<(), PauseError> {
        let (done, answer) = mpsc::channel();
        self.stop
            .0
            .send(Event::Pause { paused, done })
            .map_err(|_| PauseError::NotRunning)?;
        answer
            .recv_timeout(PAUSE_TIMEOUT * 2)
            .map_err(|_| PauseError::NotRunning)?
    }

    /// Saves the VM to a file (Save-VM) and ends it: the vCPUs stop, the devices quiesce, and
    /// the whole state goes to `request.path`. On success the VM's [`Vm::run`] returns
    /// [`ExitReason::Saved`] once the returned [`SaveAck`] is dropped (answer your caller
    /// first). A [`SaveError::Preflight`] leaves the VM running; [`SaveError::Failed`] does not.
    pub fn save(
        &self,
        request: SaveRequest,
    ) -> std::result::Result<(SaveReport, SaveAck), SaveError> {
        save::preflight(&request.path, self.memory)?;
        let (done, answer) = mpsc::channel();
        self.stop
            .0
            .send(Event::Save { request, done })
            .map_err(|_| SaveError::NotRunning)?;
        answer.recv().map_err(|_| SaveError::NotRunning)?
    }

    /// Asks the guest to shut down (or reboot) through the shutdown integration service.
    pub fn shutdown(&self, reboot: bool) -> std::result::Result<(), ShutdownError> {
        match &self.vmbus {
            Some(v) => v.request_shutdown(reboot),
            None => Err(ShutdownError::NotConnected),
        }
    }

    /// Powers the VM off at once.
    pub fn turn_off(&self) {
        self.stop.turn_off();
    }

    /// Integration-service status (None without Hyper-V enlightenments).
    pub fn status(&self) -> Option<IcStatus> {
        self.vmbus.as_ref().map(|v| v.status())
    }

    /// Hot-adds a disk (Add-VMHardDiskDrive) at `location` of `controller`, or at the lowest
    /// free location (of controller 0); a controller the VM lacks is offered on VMBus then.
    /// The file is opened and locked as `--disk` does, its data cached as `cache` says.
    /// Returns the place.
    pub fn add_disk(
        &self,
        path: &std::path::Path,
        format: Option<storvsp::ImageFormat>,
        read_only: bool,
        cache: storvsp::CacheMode,
        controller: Option<u8>,
        location: Option<u8>,
    ) -> std::result::Result<(u8, u8), DiskError> {
        self.vmbus()?.attach(controller, location, || {
            storvsp::DiskSpec::open(path, format, read_only)
                .map(|spec| Media::Disk(spec.with_cache(cache)))
                .map_err(|e| DiskError::Open(Box::new(e)))
        })
    }

    /// Hot-adds a DVD drive (Add-VMDvdDrive), loaded with `iso` or empty.
    pub fn add_dvd(
        &self,
        iso: Option<&std::path::Path>,
        controller: Option<u8>,
        location: Option<u8>,
    ) -> std::result::Result<(u8, u8), DiskError> {
        self.vmbus()?.attach(controller, location, || {
            iso.map(storvsp::DiskSpec::open_iso)
                .transpose()
                .map(Media::Dvd)
                .map_err(|e| DiskError::Open(Box::new(e)))
        })
    }

    /// Hot-removes the drive at `location` of `controller` (Remove-VMHardDiskDrive); its
    /// file is closed and unlocked once its last request is done. Returns the file.
    pub fn remove_disk(
        &self,
        controller: u8,
        location: u8,
    ) -> std::result::Result<Option<std::path::PathBuf>, DiskError> {
        self.vmbus()?.detach(controller, location)
    }

    /// Inserts (`Some`) or ejects (`None`) a DVD drive's medium (Set-VMDvdDrive); see
    /// [`Vmbus::change_dvd`] for which drive. Returns its place and the file taken out.
    pub fn change_dvd(
        &self,
        iso: Option<&std::path::Path>,
        controller: Option<u8>,
        location: Option<u8>,
    ) -> std::result::Result<(u8, u8, Option<std::path::PathBuf>), DiskError> {
        let vmbus = self.vmbus()?;
        let iso = iso
            .map(storvsp::DiskSpec::open_iso)
            .transpose()
            .map_err(|e| DiskError::Open(Box::new(e)))?;
        vmbus.change_dvd(controller, location, iso)
    }

    /// Every drive: controller and what is at each location.
    pub fn drives(&self) -> Vec<(u8, DriveInfo)> {
        self.vmbus.as_ref().map(|v| v.drives()).unwrap_or_default()
    }

    fn vmbus(&self) -> std::result::Result<&Vmbus, DiskError> {
        self.vmbus.as_deref().ok_or(DiskError::NoVmbus)
    }

    /// The KVP service (None without Hyper-V enlightenments).
    pub fn kvp(&self) -> Option<&crate::kvp::KvpDevice> {
        self.vmbus.as_ref().map(|v| v.kvp())
    }

    /// A JSON dump of VMBus and its devices (None without Hyper-V enlightenments).
    pub fn inspect(&self) -> Option<serde_json::Value> {
        self.vmbus.as_ref().map(|v| v.inspect())
    }

    /// The VM's network adapters (Add-/Remove-/Get-VMNetworkAdapter).
    pub fn network(
        &self,
    ) -> std::result::Result<&crate::network::Network, crate::network::NicError> {
        self.network
            .as_deref()
            .ok_or(crate::network::NicError::NoVmbus)
    }
}

/// A built, not yet running, VM.
pub struct Vm {
    partition: Arc<Partition>,
    hv: Option<Hv>,
    vmbus: Option<Arc<Vmbus>>,
    network: Option<Arc<crate::network::Network>>,
    chipset: Arc<Chipset>,
    console: Arc<Console>,
    vcpus: Vec<VcpuFd>,
    events: (mpsc::Sender<Event>, mpsc::Receiver<Event>),
    gate: Arc<PauseGate>,
    memory: u64,
    started: std::time::Instant,
    time: Option<Arc<hyperv::KvmTime>>,
}

/// How long a save's caller may take to answer before the VM's process goes on ending.
const SAVE_ACK_WAIT: Duration = Duration::from_secs(5);

/// How long a stopping VM gives console viewers to write the last output.
const CONSOLE_GRACE: Duration = Duration::from_secs(1);

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl Vm {
    /// Checks the configuration, creates the partition and loads the guest. The guest's serial
    /// console goes to the hub ([`Vm::console`]): attach viewers before [`Vm::run`] to see
    /// all of it (later ones get the replay).
    pub fn new(config: &VmConfig) -> Result<Self> {
        Self::build(config, true)
    }

    /// Builds the VM as [`Vm::new`] does but loads nothing (the kernel need not exist): for
    /// [`Vm::restore`], which fills RAM and every device from a saved state.
    pub fn for_restore(config: &VmConfig) -> Result<Self> {
        Self::build(config, false)
    }

    /// Restores a saved state (Start-VM of a Saved VM) into a VM from [`Vm::for_restore`]
    /// with the saved configuration, before [`Vm::run`]. `file` has had its configuration
    /// read; `progress` sees RAM being read.
    pub fn restore(
        &self,
        file: &mut SavedFile,
        progress: crate::saved::Progress<'_>,
    ) -> Result<()> {
        save::restore(&self.parts(), &self.vcpus, file, progress)
    }

    fn parts(&self) -> Parts<'_> {
        Parts {
            partition: &self.partition,
            chipset: &self.chipset,
            hv: self.hv.as_deref(),
            vmbus: self.vmbus.as_deref(),
            time: self.time.as_deref(),
        }
    }

    fn build(config: &VmConfig, boot_linux: bool) -> Result<Self> {
        if config.memory < layout::MIN_MEMORY {
            return Err(Error::MemoryTooSmall {
                requested: config.memory >> 20,
                minimum: layout::MIN_MEMORY >> 20,
            });
        }
        if let Some(host) = host_memory_bytes() {
            if config.memory > host {
                return Err(Error::MemoryTooLarge {
                    requested: config.memory >> 20,
                    host: host >> 20,
                });
            }
        }
        if boot_linux {
            boot::preflight(&config.kernel, config.initrd.as_deref(), config.memory)?;
        }
        let kvm = kvm::open_kvm()?;
        let max_vcpus = (kvm.get_max_vcpus() as u32).clamp(1, 254);
        if config.vcpus == 0 || config.vcpus > max_vcpus {
            return Err(Error::BadCpuCount {
                requested: config.vcpus,
                maximum: max_vcpus,
            });
        }
        let started = std::time::Instant::now();
        let memory = GuestMemory::new(&layout::ram_ranges(config.memory))?;
        let partition = Partition::new(kvm, memory.clone())?;
        tracing::debug!("partition created after {:?}", started.elapsed());

        let vmbus_acpi = hyperv::VmbusAcpi;
        let dsdt_devices: Vec<&dyn acpi_tables::Aml> = if config.hyperv {
            vec![&vmbus_acpi]
        } else {
            vec![]
        };
        // The APIC assist (lazy EOI through the VP assist page) needs KVM to serve the APIC
        // access MSRs itself; they then stay out of the filter.
        let apic_assist = config.hyperv && partition.serves_hyperv_apic_msrs();
        let kvm_msrs: &[u32] = match apic_assist {
            true => &[hvdef::hv::MSR_EOI, hvdef::hv::MSR_ICR, hvdef::hv::MSR_TPR],
            false => &[],
        };
        // KVM_X86_SET_MSR_FILTER waits for an SRCU grace period (14 ms measured here), so it
        // runs while the guest is loaded rather than before.
        let entry = std::thread::scope(|scope| {
            let filter = config.hyperv.then(|| {
                scope.spawn(|| partition.trap_msrs(hvdef::hv::MSR_RANGE_START, 0x200, kvm_msrs))
            });
            let entry = if boot_linux {
                let rsdp = acpi::write_tables(&memory, config.vcpus, &dsdt_devices)?;
                let entry = boot::load_linux(
                    &memory,
                    config.memory,
                    &config.kernel,
                    config.initrd.as_deref(),
                    &config.cmdline,
                    rsdp,
                )?;
                tracing::debug!("guest loaded after {:?}", started.elapsed());
                Some(entry)
            } else {
                None
            };
            if let Some(filter) = filter {
                filter
                    .join()
                    .expect("the MSR filter thread does not panic")?;
                tracing::debug!("MSR filter set after {:?}", started.elapsed());
            }
            Ok::<_, Error>(entry)
        })?;

        let console = Console::new();
        let serial = chipset::serial::Serial::new(console.output()).map_err(Error::Console)?;
        let input = serial.input();
        partition
            .vm()
            .register_irqfd(serial.irq_eventfd(), chipset::serial::IRQ)
            .map_err(|source| kvm::Error::Ioctl {
                op: "KVM_IRQFD",
                source,
            })?;
        let below_4g = config.memory.min(layout::PCI_HOLE_START);
        let cmos = chipset::cmos::Cmos::new(below_4g, config.memory - below_4g);
        let chipset = Arc::new(Chipset::new(serial, cmos));
        let uart = Arc::downgrade(&chipset);
        console.connect_uart(input, move || {
            if let Some(c) = uart.upgrade() {
                support::lock(&c.serial).feed();
            }
        });

        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let vcpu = partition
                .vm()
                .create_vcpu(u64::from(index))
                .map_err(|source| Error::Vcpu {
                    vcpu: index,
                    op: "KVM_CREATE_VCPU",
                    source,
                })?;
            vcpus.push(vcpu);
        }
        let tsc_khz = vcpus[0].get_tsc_khz().map_err(|source| Error::Vcpu {
            vcpu: 0,
            op: "KVM_GET_TSC_KHZ",
            source,
        })?;
        tracing::info!(tsc_khz, "guest TSC frequency");

        let mut base_cpuid =
            cpu::supported_cpuid(partition.kvm()).map_err(|(op, source)| Error::Vcpu {
                vcpu: 0,
                op,
                source,
            })?;
        let time = config
            .hyperv
            .then(|| Arc::new(hyperv::KvmTime::new(u64::from(tsc_khz) * 1000)));
        let hv = match &time {
            Some(time) => {
                let hv_config = hv1::PartitionConfig {
                    vp_count: config.vcpus,
                    invariant_tsc: false,
                    apic_assist,
                };
                tracing::debug!(apic_assist, "Hyper-V enlightenments");
                let hv = hv1::Partition::new(hv_config, memory.clone(), time.clone())
                    .map_err(Error::Hv)?;
                base_cpuid = hyperv::patch_cpuid(&base_cpuid, &hv_config.cpuid());
                Some(Arc::new(hv))
            }
            None => None,
        };
        for (index, vcpu) in vcpus.iter().enumerate() {
            let index = index as u32;
            let vcpu_err = |(op, source)| Error::Vcpu {
                vcpu: index,
                op,
                source,
            };
            let cpuid = cpu::cpuid_for_vcpu(&base_cpuid, index, config.vcpus);
            cpu::configure_vcpu(vcpu, &cpuid).map_err(vcpu_err)?;
            if let (0, Some(entry)) = (index, entry) {
                cpu::set_boot_state(vcpu, entry).map_err(vcpu_err)?;
            }
        }
        let partition = Arc::new(partition);
        let vmbus = match &hv {
            Some(hv) => Some(Arc::new(
                Vmbus::start_with_disks(
                    hv.clone(),
                    partition.clone(),
                    config.vcpus,
                    config.disks.clone(),
                )
                .map_err(Error::Vmbus)?,
            )),
            None => None,
        };
        let network = crate::network::start(
            &config.network,
            vmbus.as_ref().map(|v| v.host()),
            &memory,
            config.vcpus,
        )?;
        Ok(Self {
            partition,
            hv,
            vmbus,
            network,
            chipset,
            console,
            vcpus,
            events: mpsc::channel(),
            gate: Arc::new(PauseGate::default()),
            memory: config.memory,
            started: std::time::Instant::now(),
            time,
        })
    }

    /// The COM1 console hub.
    pub fn console(&self) -> &Arc<Console> {
        &self.console
    }

    /// A handle for the control socket.
    pub fn control(&self) -> VmControl {
        VmControl {
            stop: self.stop_handle(),
            vmbus: self.vmbus.clone(),
            gate: self.gate.clone(),
            console: self.console.clone(),
            memory: self.memory,
            started: self.started,
            network: self.network.clone(),
        }
    }

    /// A handle that stops the VM once it runs.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.events.0.clone())
    }

    /// Runs the guest until it powers off, resets, fails, is stopped, or is saved.
    pub fn run(mut self) -> Result<ExitReason> {
        let _ = register_signal_handler(kick_signal(), on_kick);
        let vcpus = std::mem::take(&mut self.vcpus);
        let (tx, rx) = &self.events;
        let mut running = self.spawn_vcpus(vcpus, tx);
        let reason = loop {
            match rx.recv() {
                Ok(Event::Exit(reason)) => break reason,
                Ok(Event::Pause { paused, done }) => {
                    let _ = done.send(self.gate.carry_out(paused, &running.threads));
                }
                Ok(Event::Save { request, done }) => {
                    let vcpus = running.stop(&self.gate, false);
                    let result = match vcpus {
                        Some(vcpus) => save::save(&self.parts(), &vcpus, request),
                        None => Err(SaveError::Failed {
                            what: "a vCPU thread died".into(),
                        }),
                    };
                    let reason = match &result {
                        Ok(_) => ExitReason::Saved,
                        Err(e) => ExitReason::SaveFailed(e.to_string()),
                    };
                    let (ack, acked) = save::ack_pair();
                    let _ = done.send(result.map(|report| (report, ack)));
                    save::wait_for_ack(&acked, SAVE_ACK_WAIT);
                    break reason;
                }
                Err(_) => break ExitReason::Stopped,
            }
        };
        // Where a guest that had to be stopped from outside was: the clue to a hang.
        running.stop(&self.gate, matches!(reason, ExitReason::Stopped));
        if let Some(v) = &self.vmbus {
            v.stop();
        }
        support::lock(&self.chipset.serial).flush();
        self.console.close(CONSOLE_GRACE);
        Ok(reason)
    }

    fn spawn_vcpus(&self, vcpus: Vec<VcpuFd>, events: &mpsc::Sender<Event>) -> Running {
        let stopping = Arc::new(AtomicBool::new(false));
        let threads = vcpus
            .into_iter()
            .enumerate()
            .map(|(index, vcpu)| {
                let ctx = VcpuContext {
                    index: index as u32,
                    hv: self.hv.clone().zip(self.vmbus.as_ref()).map(|(hv, vmbus)| {
                        HvExits::new(hv, self.partition.clone(), vmbus.host().clone())
                    }),
                    chipset: self.chipset.clone(),
                    events: events.clone(),
                    stopping: stopping.clone(),
                    gate: self.gate.clone(),
                };
                std::thread::Builder::new()
                    .name(format!("vcpu{index}"))
                    .spawn(move || ctx.run(vcpu))
                    .expect("spawn vCPU thread")
            })
            .collect();
        Running { threads, stopping }
    }
}

/// The vCPU threads of a running VM.
struct Running {
    threads: Vec<JoinHandle<(VcpuFd, String)>>,
    stopping: Arc<AtomicBool>,
}

impl Running {
    /// Stops every vCPU thread and hands back the vCPUs (None if a thread died); with
    /// `report`, logs where each was. Stopping twice does nothing the second time.
    fn stop(&mut self, gate: &PauseGate, report: bool) -> Option<Vec<VcpuFd>> {
        self.stopping.store(true, Ordering::SeqCst);
        // A paused VM that is stopped: its vCPUs leave the gate and see `stopping`.
        gate.resume();
        // Kick every vCPU out of KVM_RUN until all threads have noticed.
        for t in &self.threads {
            while !t.is_finished() {
                let _ = t.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut vcpus = Some(Vec::with_capacity(self.threads.len()));
        for (index, t) in std::mem::take(&mut self.threads).into_iter().enumerate() {
            match t.join() {
                Ok((vcpu, last)) => {
                    if report {
                        tracing::warn!("vCPU {index} was stopped at {last}");
                    }
                    if let Some(v) = &mut vcpus {
                        v.push(vcpu);
                    }
                }
                Err(_) => vcpus = None,
            }
        }
        vcpus
    }
}

struct VcpuContext {
    index: u32,
    hv: Option<HvExits>,
    chipset: Arc<Chipset>,
    events: mpsc::Sender<Event>,
    stopping: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
}

impl VcpuContext {
    /// Runs the vCPU until the VM stops; returns it, with where it was (a register summary),
    /// its last exit completed in KVM so that its state can be saved.
    fn run(self, mut vcpu: VcpuFd) -> (VcpuFd, String) {
        if let Some(hv) = &self.hv {
            hv.prepare_vcpu(&mut vcpu);
        }
        while !self.stopping.load(Ordering::Relaxed) {
            if self.gate.is_paused() {
                self.gate.park_while_paused(&self.stopping);
                continue;
            }
            if let Some(reason) =
                vcpu::step(&mut vcpu, self.index, self.hv.as_ref(), &*self.chipset)
            {
                self.finish(reason);
                return (vcpu, String::new());
            }
        }
        kvm::state::complete_pending_exit(&mut vcpu);
        let last = cpu::brief_registers(&vcpu);
        (vcpu, last)
    }

    fn finish(&self, reason: ExitReason) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.events.send(Event::Exit(reason));
    }
}

impl PauseGate {
    /// Pauses or resumes on the thread that runs the VM, which owns the vCPU threads: a pause
    /// kicks them out of KVM_RUN until each has parked.
    fn carry_out<T>(
        &self,
        paused: bool,
        threads: &[JoinHandle<T>],
    ) -> std::result::Result<(), PauseError> {
        match (paused, self.is_paused()) {
            (true, true) => return Err(PauseError::AlreadyPaused),
            (false, false) => return Err(PauseError::NotPaused),
            (false, true) => {
                self.resume();
                return Ok(());
            }
            (true, false) => self.pause(),
        }
        let end = std::time::Instant::now() + PAUSE_TIMEOUT;
        loop {
            let running = threads.iter().filter(|t| !t.is_finished()).count() as u32;
            let parked = self.parked();
            if parked >= running {
                return Ok(());
            }
            if std::time::Instant::now() >= end {
                self.resume();
                return Err(PauseError::Timeout(running - parked));
            }
            for t in threads {
                let _ = t.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
