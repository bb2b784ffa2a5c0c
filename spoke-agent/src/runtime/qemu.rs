//! The QEMU runtime: VMs are local QEMU processes driven over QMP, disks are qcow2 images.
//! It owns `<data_dir>/vms/` (one directory per VM, see `layout`), the VMs' QEMU processes
//! (started so that they outlive the agent, adopted again when it restarts, never stopped
//! unless asked), the monitor task that keeps declared VMs in their run strategy, and the
//! inventory it reports to the hub.
//!
//! ```text
//! <data_dir>/vms/<namespace>/<name>/
//!   vm.json             the declared VmSpec (written atomically; operators may add their own)
//!   uid                 the VM's uid (uuid v4), created once
//!   disk-<disk>.qcow2   one per disk, created once and never overwritten
//!   qemu.pid            pid of the running QEMU (written by QEMU)
//!   qmp.sock            QMP socket of the running QEMU
//!   serial.log          the guest's serial console, appended across restarts
//!   qemu.log            what QEMU printed while starting (why a start failed)
//! ```
//!
//! Decisions worth knowing:
//! - QEMU daemonizes (`-daemonize -pidfile`): VMs live in their own session, so neither an
//!   agent restart nor a signal to the agent's process group reaches them. A VM runs if its
//!   pidfile names a live process whose command line carries that VM's pidfile path.
//! - Every network maps to QEMU user networking for now (`process::qemu_args`).
//! - Disk images, kernels and initrds are read only from the agent's image directories
//!   (`image_dirs`), checked when a VM is created or prepared as a migration receiver and
//!   again at every start; QEMU and qemu-img get the checked canonical paths.
//! - The monitor only ever *starts* VMs (run strategy Always); it never stops one. A VM found
//!   running against its Halted declaration keeps running until someone stops it.
//! - The inventory is published under one lock together with its change events, so a
//!   subscriber that takes a snapshot after subscribing misses nothing.

mod host;
mod image_dirs;
mod layout;
mod migration;
mod process;
mod qmp;
mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use drover_shared::commands::VmSpec;
use drover_shared::inventory::{
    normalize_mac, ClusterInfo, InventoryChange, MigrationConfig, NodeInfo, RunStrategy,
    RuntimeKind, StorageClass, VmInfo, VmPhase,
};
use drover_shared::protocol::ReportedHealth;
use tokio::sync::{broadcast, watch, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::host::{HostFacts, ResolvedAccel};
use self::layout::{VmDir, VmKey};
use self::state::TrackedVm;

/// QMP's migration and block-job queries as the runtime reads them (leniently, across QEMU
/// versions); benchmarks that drive QEMU directly read them the same way.
pub use self::migration::commands::{
    mirror_options, nbd_client_options, nbd_export_options, BlockJob, MigrationInfo,
    QueryBlockJobs, QueryMigrate, RamStats,
};
pub use self::migration::{
    next_poll, MigrationFailure, MigrationProgress, MigrationStage, ReceiverEndpoints, SendOptions,
    SendOutcome, DOWNTIME_LIMIT_MS, SWITCHOVER_POLL,
};

/// The QEMU command line (without the binary) this runtime starts `spec` with when the VM's
/// directory is `vm_dir` (QMP socket, pidfile, serial log and `disk-<name>.qcow2` disks inside
/// it). Benchmarks that migrate with QEMU alone use it to run the very same virtual hardware.
pub fn vm_command_line(vm_dir: &Path, spec: &VmSpec, accel: Accel) -> Vec<std::ffi::OsString> {
    let dir = VmDir {
        path: vm_dir.to_path_buf(),
    };
    process::qemu_args(&dir, spec, host::resolve_accel(accel))
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM when /dev/kvm is usable, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// How the QEMU runtime is set up.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// The runtime keeps its VMs in `<data_dir>/vms/`.
    pub data_dir: PathBuf,
    pub qemu_binary: PathBuf,
    pub qemu_img: PathBuf,
    pub accel: Accel,
    /// How often the monitor rescans declarations and checks processes.
    pub poll_interval: Duration,
    /// Reported as the cluster's labels.
    pub cluster_labels: BTreeMap<String, String>,
    /// The agent's sync endpoint (host:port) that peer agents reach for migrations into this
    /// cluster; reported to the hub.
    pub sync_endpoint: Option<String>,
    /// The limits migrations from this cluster run under (reported to the hub).
    pub migration_config: MigrationConfig,
    /// The only directories disk images, kernels and initrds of VM specs are read from (after
    /// resolving `..` and symlinks); empty: VMs may only have blank disks and no boot files.
    pub image_dirs: Vec<PathBuf>,
}

impl QemuOptions {
    /// Defaults: `qemu-system-x86_64` and `qemu-img` from PATH, KVM if usable, a 1 s poll.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            accel: Accel::Auto,
            poll_interval: Duration::from_secs(1),
            cluster_labels: BTreeMap::new(),
            sync_endpoint: None,
            migration_config: MigrationConfig::default(),
            image_dirs: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("data directory {path}: {detail}")]
    DataDir { path: PathBuf, detail: String },
    #[error("{0}")]
    InvalidSpec(String),
    #[error(transparent)]
    InvalidName(#[from] drover_shared::ids::InvalidName),
    #[error(
        "virtual machine {vm} already exists on this agent; delete it first or choose another name"
    )]
    AlreadyExists { vm: String },
    #[error("virtual machine {vm}: MAC address {mac} is already used by virtual machine {other} on this agent; choose another MAC")]
    MacInUse {
        vm: String,
        mac: String,
        other: String,
    },
    #[error("virtual machine {vm} does not exist on this agent")]
    NotFound { vm: String },
    #[error("virtual machine {vm}: its declaration {path} is unusable: {detail}; fix or replace the file")]
    BadDeclaration {
        vm: String,
        path: PathBuf,
        detail: String,
    },
    #[error("virtual machine {vm}: another operation on it is still running after {waited:?}; try again later")]
    Busy { vm: String, waited: Duration },
    #[error("virtual machine {vm}: {action} {path}: {source}")]
    Io {
        vm: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("virtual machine {vm}: disk {disk}: {detail}")]
    Disk {
        vm: String,
        disk: String,
        detail: String,
    },
    #[error("virtual machine {vm}: QEMU did not start: {detail}")]
    StartFailed { vm: String, detail: String },
    #[error("virtual machine {vm} was created but did not start; it stays declared (fix the cause and start it, or delete it): {source}")]
    CreatedButNotStarted {
        vm: String,
        #[source]
        source: Box<RuntimeError>,
    },
    #[error("virtual machine {vm}: its QEMU (pid {pid}) did not stop: {detail}")]
    StopFailed {
        vm: String,
        pid: u32,
        detail: String,
    },
    #[error("virtual machine {vm}: migration {migration_id}: {detail}")]
    Migration {
        vm: String,
        migration_id: String,
        kind: MigrationFailure,
        detail: String,
    },
}

/// How long an operation waits for another one on the same VM to finish.
const OPERATION_LOCK_TIMEOUT: Duration = Duration::from_secs(600);
/// How long `quit` (and then SIGKILL) may take to end a QEMU.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const CHANGES_CAPACITY: usize = 1024;

/// The inventory as last published, plus what the runtime tracks to derive it.
struct State {
    cluster: ClusterInfo,
    /// The node as last published.
    node: NodeInfo,
    /// The VMs as last published.
    vms: BTreeMap<VmKey, VmInfo>,
    tracked: BTreeMap<VmKey, TrackedVm>,
    /// Unusable declarations and why, as last logged.
    malformed: BTreeMap<PathBuf, String>,
}

/// VMs run by local QEMU processes. See the module documentation.
pub struct QemuRuntime {
    options: QemuOptions,
    vms_root: PathBuf,
    accel: ResolvedAccel,
    host: HostFacts,
    /// Why QEMU cannot be used, if it cannot.
    qemu_problem: Option<String>,
    state: Mutex<State>,
    changes: broadcast::Sender<Vec<InventoryChange>>,
    /// Serializes operations per VM; the monitor skips a VM whose lock is taken.
    vm_locks: Mutex<HashMap<VmKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Serializes the uniqueness checks and declaration of new VMs.
    declare_lock: tokio::sync::Mutex<()>,
    shutdown: watch::Sender<bool>,
    monitor: Mutex<Option<JoinHandle<()>>>,
    /// Sends in progress, so that `cancel_send` can reach them.
    sends: migration::Sends,
}

impl QemuRuntime {
    /// Scans `data_dir/vms`, adopts VMs whose QEMU still runs (never kills or restarts them),
    /// starts declared VMs with run strategy Always that are not running, and spawns the
    /// monitor task (owned by the runtime, stopped by `shutdown` or when the runtime is dropped).
    pub async fn open(options: QemuOptions) -> Result<Arc<Self>, RuntimeError> {
        let data_dir_error = |detail: String| RuntimeError::DataDir {
            path: options.data_dir.clone(),
            detail,
        };
        let vms = options.data_dir.join("vms");
        std::fs::create_dir_all(&vms).map_err(|e| {
            data_dir_error(format!(
                "cannot create {}: {e}; check that the agent may write there",
                vms.display()
            ))
        })?;
        let data_dir = options
            .data_dir
            .canonicalize()
            .map_err(|e| data_dir_error(format!("cannot resolve it: {e}")))?;
        if data_dir.to_str().is_none() {
            return Err(data_dir_error(
                "its path is not UTF-8, which QEMU's command line needs; choose another directory"
                    .into(),
            ));
        }
        let options = QemuOptions {
            data_dir: data_dir.clone(),
            ..options
        };
        let host = HostFacts::read();
        let accel = host::resolve_accel(options.accel);
        let (qemu_version, qemu_problem) =
            match host::probe_qemu_version(&options.qemu_binary).await {
                Ok(version) => (version, None),
                Err(problem) => ("unknown".to_owned(), Some(problem)),
            };
        if let Some(problem) = &qemu_problem {
            tracing::error!(%problem, "QEMU is not usable; VMs cannot start");
        }
        for dir in &options.image_dirs {
            if !dir.is_dir() {
                tracing::warn!(image_dir = %dir.display(), "the image directory does not exist (or is no directory); it allows no file until it is created");
            }
        }
        let cluster = ClusterInfo {
            runtime: RuntimeKind::Qemu,
            platform_version: host.kernel_release.clone(),
            virtualization_version: qemu_version,
            labels: options.cluster_labels.clone(),
            cpu_models: vec![accel.cpu_model().to_owned()],
            feature_gates: vec!["decentralizedLiveMigration".to_owned()],
            migration_config: options.migration_config.clone(),
            storage_classes: vec![StorageClass {
                name: "qcow2".into(),
                provisioner: "drover.qemu/local".into(),
                is_default: true,
            }],
            networks: vec!["default".into()],
            sync_endpoint: options.sync_endpoint.clone(),
        };
        let node = NodeInfo {
            name: host.node_name.clone(),
            cpu_model: host.cpu_model.clone(),
            allocatable_memory_bytes: host.memory_bytes,
            allocatable_cpu_millis: host.cpu_millis,
            requested_memory_bytes: 0,
            requested_cpu_millis: 0,
            schedulable: true,
            labels: BTreeMap::new(),
        };
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let runtime = Arc::new(Self {
            vms_root: data_dir.join("vms"),
            options,
            accel,
            host,
            qemu_problem,
            state: Mutex::new(State {
                cluster,
                node,
                vms: BTreeMap::new(),
                tracked: BTreeMap::new(),
                malformed: BTreeMap::new(),
            }),
            changes,
            vm_locks: Mutex::new(HashMap::new()),
            declare_lock: tokio::sync::Mutex::new(()),
            shutdown,
            monitor: Mutex::new(None),
            sends: migration::Sends::default(),
        });
        tracing::info!(
            data_dir = %runtime.options.data_dir.display(),
            accel = runtime.accel.as_qemu_arg(),
            node = %runtime.host.node_name,
            image_dirs = ?runtime.options.image_dirs,
            "QEMU runtime opening"
        );
        runtime.reconcile_all().await;
        let monitor = tokio::spawn(Self::monitor(
            Arc::downgrade(&runtime),
            shutdown_rx,
            runtime.options.poll_interval,
        ));
        *lock(&runtime.monitor) = Some(monitor);
        Ok(runtime)
    }

    /// Declares a VM (directory, uid, disks, then `vm.json`) and starts it unless its run
    /// strategy is Halted. Refuses an invalid spec, an existing name and a MAC another VM of
    /// this agent uses, before creating anything.
    #[tracing::instrument(skip_all, fields(vm = %format_args!("{}/{}", spec.namespace, spec.name)))]
    pub async fn create_vm(&self, mut spec: VmSpec) -> Result<String, RuntimeError> {
        spec.validate().map_err(RuntimeError::InvalidSpec)?;
        check_runnable_here(&spec, &self.options.image_dirs)?;
        for interface in &mut spec.interfaces {
            interface.mac = normalize_mac(&interface.mac).map_err(RuntimeError::InvalidSpec)?;
        }
        let key = VmKey::of(&spec);
        let vm = key.to_string();
        let dir = self.dir(&key);

        let declaring = tokio::time::timeout(OPERATION_LOCK_TIMEOUT, self.declare_lock.lock())
            .await
            .map_err(|_| RuntimeError::Busy {
                vm: vm.clone(),
                waited: OPERATION_LOCK_TIMEOUT,
            })?;
        let scan = self.scan().await.map_err(|e| RuntimeError::Io {
            vm: vm.clone(),
            action: "cannot scan",
            path: self.vms_root.clone(),
            source: e,
        })?;
        if scan.declared.contains_key(&key)
            || dir.spec_file().exists()
            || migration::has_marker(&dir)
        {
            return Err(RuntimeError::AlreadyExists { vm });
        }
        let tracked_specs: Vec<VmSpec> = lock(&self.state)
            .tracked
            .values()
            .map(|t| t.spec.clone())
            .collect();
        for other in scan.declared.values().chain(tracked_specs.iter()) {
            if VmKey::of(other) == key {
                continue;
            }
            for theirs in &other.interfaces {
                let theirs = normalize_mac(&theirs.mac).unwrap_or_else(|_| theirs.mac.clone());
                if let Some(mine) = spec.interfaces.iter().find(|i| i.mac == theirs) {
                    return Err(RuntimeError::MacInUse {
                        vm,
                        mac: mine.mac.clone(),
                        other: VmKey::of(other).to_string(),
                    });
                }
            }
        }

        // Still holding the declaration lock: a second create of the same name or MAC waits
        // until this one's vm.json exists (disk copies make that a while, rarely).
        let _vm_lock = self.lock_vm(&key).await?;
        let newly_made = !dir.path.exists();
        let declared = self.declare(&key, &dir, &spec).await;
        if declared.is_err() && newly_made {
            let _ = std::fs::remove_dir_all(&dir.path);
        }
        let uid = declared?;
        drop(declaring);
        self.update(|state| {
            state
                .tracked
                .insert(key.clone(), TrackedVm::new(spec.clone(), uid));
        });
        tracing::info!(
            run_strategy = spec.run_strategy.as_str(),
            "virtual machine created"
        );

        if spec.run_strategy == RunStrategy::Halted {
            return Ok(format!(
                "created virtual machine {vm} (run strategy Halted: not started)"
            ));
        }
        match self.start_locked(&key, &dir, &spec).await {
            Ok(pid) => Ok(format!(
                "created virtual machine {vm} and started it (QEMU pid {pid})"
            )),
            Err(e) => Err(RuntimeError::CreatedButNotStarted {
                vm,
                source: Box::new(e),
            }),
        }
    }

    /// Starts a VM and keeps it running: its run strategy becomes Always (persisted).
    #[tracing::instrument(skip(self))]
    pub async fn start_vm(&self, namespace: &str, name: &str) -> Result<String, RuntimeError> {
        let key = VmKey::checked(namespace, name)?;
        let dir = self.dir(&key);
        let _vm_lock = self.lock_vm(&key).await?;
        let spec = self.set_run_strategy(&key, &dir, RunStrategy::Always)?;
        if let Some(pid) = process::running_pid(&dir) {
            self.refresh_locked(&key, &dir).await;
            return Ok(format!(
                "virtual machine {key} is already running (QEMU pid {pid})"
            ));
        }
        // An operator's start clears the backoff of earlier failures.
        self.update(|state| {
            if let Some(vm) = state.tracked.get_mut(&key) {
                vm.failures = 0;
                vm.next_start_at = None;
            }
        });
        let pid = self.start_locked(&key, &dir, &spec).await?;
        Ok(format!("started virtual machine {key} (QEMU pid {pid})"))
    }

    /// Stops a VM and keeps it stopped: its run strategy becomes Halted (persisted), then the
    /// guest gets an ACPI power-down and `grace` to shut down, then QEMU is told to quit (and
    /// killed if QMP does not answer).
    #[tracing::instrument(skip(self))]
    pub async fn stop_vm(
        &self,
        namespace: &str,
        name: &str,
        grace: Duration,
    ) -> Result<String, RuntimeError> {
        let key = VmKey::checked(namespace, name)?;
        let dir = self.dir(&key);
        let _vm_lock = self.lock_vm(&key).await?;
        self.set_run_strategy(&key, &dir, RunStrategy::Halted)?;
        let Some(pid) = process::running_pid(&dir) else {
            self.refresh_locked(&key, &dir).await;
            return Ok(format!("virtual machine {key} is already stopped"));
        };
        let how = self.terminate(&key, &dir, pid, grace).await;
        self.refresh_locked(&key, &dir).await;
        Ok(format!("stopped virtual machine {key} ({})", how?))
    }

    /// Stops a VM at once (no grace) and removes its directory with its disks.
    #[tracing::instrument(skip(self))]
    pub async fn delete_vm(&self, namespace: &str, name: &str) -> Result<String, RuntimeError> {
        let key = VmKey::checked(namespace, name)?;
        let dir = self.dir(&key);
        let _vm_lock = self.lock_vm(&key).await?;
        if !dir.path.exists() {
            return Err(RuntimeError::NotFound {
                vm: key.to_string(),
            });
        }
        if let Some(pid) = process::running_pid(&dir) {
            self.terminate(&key, &dir, pid, Duration::ZERO).await?;
        }
        std::fs::remove_dir_all(&dir.path).map_err(|e| RuntimeError::Io {
            vm: key.to_string(),
            action: "cannot remove",
            path: dir.path.clone(),
            source: e,
        })?;
        // An empty namespace directory is not worth keeping; a non-empty one stays.
        if let Some(namespace_dir) = dir.path.parent() {
            let _ = std::fs::remove_dir(namespace_dir);
        }
        self.update(|state| {
            state.tracked.remove(&key);
        });
        tracing::info!("virtual machine deleted");
        Ok(format!("deleted virtual machine {key} and its disks"))
    }

    /// Stops the monitor task. Never stops VMs: agent restarts must not kill guests.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        if let Some(monitor) = lock(&self.monitor).take() {
            monitor.abort();
        }
    }

    fn dir(&self, key: &VmKey) -> VmDir {
        VmDir::new(&self.vms_root, key)
    }

    async fn scan(&self) -> std::io::Result<layout::Scan> {
        let root = self.vms_root.clone();
        tokio::task::spawn_blocking(move || layout::scan(&root))
            .await
            .map_err(std::io::Error::other)?
    }

    async fn lock_vm(&self, key: &VmKey) -> Result<OwnedMutexGuard<()>, RuntimeError> {
        let vm_lock = self.vm_lock(key);
        tokio::time::timeout(OPERATION_LOCK_TIMEOUT, vm_lock.lock_owned())
            .await
            .map_err(|_| RuntimeError::Busy {
                vm: key.to_string(),
                waited: OPERATION_LOCK_TIMEOUT,
            })
    }

    fn vm_lock(&self, key: &VmKey) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.vm_locks).entry(key.clone()).or_default().clone()
    }

    /// Directory, uid, disks, then the declaration: once `vm.json` exists the VM is complete.
    async fn declare(
        &self,
        key: &VmKey,
        dir: &VmDir,
        spec: &VmSpec,
    ) -> Result<String, RuntimeError> {
        let io_error = |action, path: &Path| {
            let vm = key.to_string();
            let path = path.to_owned();
            move |source: std::io::Error| RuntimeError::Io {
                vm,
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&dir.path).map_err(io_error("cannot create", &dir.path))?;
        let uid = layout::ensure_uid(dir).map_err(io_error("cannot write", &dir.uid_file()))?;
        let resolved = self.resolve_host_files(key, dir, spec)?;
        self.prepare_disks(key, dir, &resolved).await?;
        layout::write_spec(dir, spec).map_err(io_error("cannot write", &dir.spec_file()))?;
        Ok(uid)
    }

    /// `spec` with the host files this start reads (the kernel, the initrd and the images of
    /// disks not created yet) checked against the image directories again and named by their
    /// canonical paths, so that QEMU and qemu-img read exactly the files that were allowed.
    /// The declaration keeps the paths as given.
    fn resolve_host_files(
        &self,
        key: &VmKey,
        dir: &VmDir,
        spec: &VmSpec,
    ) -> Result<VmSpec, RuntimeError> {
        let allowed = &self.options.image_dirs;
        let mut problems = Vec::new();
        let mut resolve = |what: String, file: &mut String| match image_dirs::allowed_host_file(
            &what, file, allowed,
        ) {
            Ok(path) => *file = path.to_string_lossy().into_owned(),
            Err(problem) => problems.push(problem),
        };
        let mut resolved = spec.clone();
        for disk in &mut resolved.disks {
            if dir.disk(&disk.name).exists() {
                continue;
            }
            if let Some(image) = &mut disk.image {
                resolve(format!("disk {:?}: image", disk.name), image);
            }
        }
        if let Some(boot) = &mut resolved.boot {
            resolve("kernel".into(), &mut boot.kernel);
            if let Some(initrd) = &mut boot.initrd {
                resolve("initrd".into(), initrd);
            }
        }
        if problems.is_empty() {
            Ok(resolved)
        } else {
            Err(RuntimeError::InvalidSpec(format!(
                "virtual machine {key}: {}",
                problems.join("; ")
            )))
        }
    }

    async fn prepare_disks(
        &self,
        key: &VmKey,
        dir: &VmDir,
        spec: &VmSpec,
    ) -> Result<(), RuntimeError> {
        process::prepare_disks(&self.options.qemu_img, dir, spec)
            .await
            .map_err(|(disk, detail)| RuntimeError::Disk {
                vm: key.to_string(),
                disk,
                detail,
            })
    }

    /// Reads the declaration, sets its run strategy (persisted if it changed) and returns it.
    fn set_run_strategy(
        &self,
        key: &VmKey,
        dir: &VmDir,
        run_strategy: RunStrategy,
    ) -> Result<VmSpec, RuntimeError> {
        let mut spec = match layout::read_spec(dir, key) {
            Ok(Some(spec)) => spec,
            Ok(None) => {
                return Err(RuntimeError::NotFound {
                    vm: key.to_string(),
                })
            }
            Err(detail) => {
                return Err(RuntimeError::BadDeclaration {
                    vm: key.to_string(),
                    path: dir.spec_file(),
                    detail,
                })
            }
        };
        if spec.run_strategy != run_strategy {
            spec.run_strategy = run_strategy;
            layout::write_spec(dir, &spec).map_err(|source| RuntimeError::Io {
                vm: key.to_string(),
                action: "cannot write",
                path: dir.spec_file(),
                source,
            })?;
        }
        let uid = layout::ensure_uid(dir).map_err(|source| RuntimeError::Io {
            vm: key.to_string(),
            action: "cannot write",
            path: dir.uid_file(),
            source,
        })?;
        self.update(|state| {
            let tracked = state
                .tracked
                .entry(key.clone())
                .or_insert_with(|| TrackedVm::new(spec.clone(), uid));
            tracked.spec = spec.clone();
        });
        Ok(spec)
    }

    /// Creates missing disks and launches QEMU; the caller holds the VM's lock. Failures are
    /// recorded (backoff, health, phase Failed) and returned.
    async fn start_locked(
        &self,
        key: &VmKey,
        dir: &VmDir,
        spec: &VmSpec,
    ) -> Result<u32, RuntimeError> {
        self.update(|state| {
            if let Some(vm) = state.tracked.get_mut(key) {
                vm.phase = VmPhase::Starting;
            }
        });
        let prepared = match self.resolve_host_files(key, dir, spec) {
            Ok(resolved) => self
                .prepare_disks(key, dir, &resolved)
                .await
                .map(|()| resolved),
            Err(e) => Err(e),
        };
        let launched = match prepared {
            Ok(resolved) => process::launch(&self.options.qemu_binary, dir, &resolved, self.accel)
                .await
                .map_err(|detail| RuntimeError::StartFailed {
                    vm: key.to_string(),
                    detail,
                }),
            Err(e) => Err(e),
        };
        match launched {
            Ok(pid) => {
                tracing::info!(vm = %key, pid, "QEMU started");
                self.update(|state| {
                    if let Some(vm) = state.tracked.get_mut(key) {
                        vm.pid = Some(pid);
                        vm.last_start_error = None;
                        vm.running_since = Some(Instant::now());
                    }
                });
                self.refresh_locked(key, dir).await;
                Ok(pid)
            }
            Err(e) => {
                tracing::error!(vm = %key, error = %e, "starting the virtual machine failed");
                self.update(|state| {
                    if let Some(vm) = state.tracked.get_mut(key) {
                        vm.record_failure(Instant::now(), Some(e.to_string()));
                        vm.pid = None;
                        vm.phase = vm.phase_when_not_running();
                    }
                });
                Err(e)
            }
        }
    }

    /// Ends a running QEMU: ACPI power-down and `grace`, then `quit`, then SIGKILL. Says how it
    /// ended. An exit we caused is not a failure, so the tracked process is cleared here.
    async fn terminate(
        &self,
        key: &VmKey,
        dir: &VmDir,
        pid: u32,
        grace: Duration,
    ) -> Result<&'static str, RuntimeError> {
        self.update(|state| {
            if let Some(vm) = state.tracked.get_mut(key) {
                vm.phase = VmPhase::Stopping;
            }
        });
        let ended = self.end_process(key, dir, pid, grace).await;
        if ended.is_ok() {
            self.update(|state| {
                if let Some(vm) = state.tracked.get_mut(key) {
                    vm.pid = None;
                    vm.running_since = None;
                    vm.phase = VmPhase::Stopped;
                }
            });
        }
        ended
    }

    async fn end_process(
        &self,
        key: &VmKey,
        dir: &VmDir,
        pid: u32,
        grace: Duration,
    ) -> Result<&'static str, RuntimeError> {
        let socket = dir.qmp_socket();
        if !grace.is_zero() {
            match qmp::system_powerdown(&socket).await {
                Ok(()) => {
                    if process::wait_for_exit(pid, dir, grace).await {
                        return Ok("the guest shut down");
                    }
                    tracing::info!(vm = %key, ?grace, "the guest did not shut down within its grace period; quitting QEMU");
                }
                Err(e) => {
                    tracing::warn!(vm = %key, error = %e, "ACPI power-down failed; quitting QEMU")
                }
            }
        }
        match qmp::quit(&socket).await {
            Ok(()) => {
                if process::wait_for_exit(pid, dir, QUIT_TIMEOUT).await {
                    return Ok("QEMU quit");
                }
                tracing::warn!(vm = %key, pid, "QEMU did not exit after quit; killing it");
            }
            Err(e) => tracing::warn!(vm = %key, pid, error = %e, "QMP quit failed; killing QEMU"),
        }
        let stop_failed = |detail: String| RuntimeError::StopFailed {
            vm: key.to_string(),
            pid,
            detail,
        };
        process::kill(pid, dir).map_err(stop_failed)?;
        if process::wait_for_exit(pid, dir, KILL_TIMEOUT).await {
            Ok("QEMU was killed")
        } else {
            Err(stop_failed(format!(
                "it is still alive {KILL_TIMEOUT:?} after SIGKILL"
            )))
        }
    }

    /// Observes the VM's process (and QMP status) and publishes what changed. The caller holds
    /// the VM's lock.
    async fn refresh_locked(&self, key: &VmKey, dir: &VmDir) {
        let pid = process::running_pid(dir);
        let qemu_phase = match pid {
            Some(_) => Some(match qmp::query_status(&dir.qmp_socket()).await {
                Ok(status) => state::phase_of(status.status),
                Err(e) => {
                    tracing::warn!(vm = %key, error = %e, "cannot read the VM's status");
                    VmPhase::Unknown
                }
            }),
            None => None,
        };
        let now = Instant::now();
        self.update(|state| {
            let Some(vm) = state.tracked.get_mut(key) else {
                return;
            };
            if let (Some(old), None) = (vm.pid, pid) {
                // It ended without us: a crash, a guest power-off, or someone killed it.
                let ran_long = vm.running_since.is_some_and(|t| now - t >= state::STABLE_RUN);
                if ran_long {
                    vm.failures = 0;
                }
                vm.record_failure(now, None);
                if vm.spec.run_strategy == RunStrategy::Always {
                    tracing::warn!(vm = %key, pid = old, retry_in = ?state::restart_backoff(vm.failures), "QEMU exited; restarting it (run strategy Always)");
                } else {
                    tracing::info!(vm = %key, pid = old, "QEMU exited");
                }
                vm.running_since = None;
            }
            if let (None, Some(pid)) = (vm.pid, pid) {
                tracing::info!(vm = %key, pid, "found its QEMU running; adopting it");
            }
            if pid.is_some() && vm.running_since.is_none() {
                vm.running_since = Some(now);
            }
            if vm
                .running_since
                .is_some_and(|t| now - t >= state::STABLE_RUN)
            {
                vm.failures = 0;
                vm.next_start_at = None;
            }
            vm.pid = pid;
            vm.phase = qemu_phase.unwrap_or_else(|| vm.phase_when_not_running());
        });
    }

    /// One monitor pass: rescan declarations, observe every VM, start Always VMs that are due.
    async fn reconcile_all(&self) {
        let scan = match self.scan().await {
            Ok(scan) => scan,
            Err(e) => {
                tracing::error!(root = %self.vms_root.display(), error = %e, "cannot scan VM declarations");
                return;
            }
        };
        let keys: BTreeSet<VmKey> = {
            let mut state = lock(&self.state);
            for (path, problem) in &scan.malformed {
                if state.malformed.get(path) != Some(problem) {
                    tracing::error!(file = %path.display(), %problem, "skipping an unusable VM declaration; fix or remove the file");
                }
            }
            for path in state.malformed.keys() {
                if !scan.malformed.contains_key(path) {
                    tracing::info!(file = %path.display(), "VM declaration is no longer unusable");
                }
            }
            state.malformed = scan.malformed;
            scan.declared
                .keys()
                .chain(state.tracked.keys())
                .cloned()
                // Receivers have no declaration yet.
                .chain(migration::marked_vms(&self.vms_root))
                .collect()
        };
        futures::future::join_all(
            keys.iter()
                .map(|key| self.reconcile_vm(key, scan.declared.contains_key(key))),
        )
        .await;
    }

    /// `usable`: the scan found the declaration sound (readable, valid, no reused MAC).
    async fn reconcile_vm(&self, key: &VmKey, usable: bool) {
        // A VM under an operation is that operation's business this round.
        let Ok(_vm_lock) = self.vm_lock(key).try_lock_owned() else {
            return;
        };
        let dir = self.dir(key);
        if self.reconcile_migration(key, &dir).await {
            return;
        }
        // Read again under the lock: an operation may have changed it since the scan.
        let spec = match layout::read_spec(&dir, key) {
            Ok(Some(spec)) => usable.then_some(spec),
            Ok(None) => {
                self.forget(key);
                return;
            }
            // Already logged by the scan; keep what we knew of it, if anything.
            Err(_) => None,
        };
        if let Some(spec) = &spec {
            let uid = match layout::ensure_uid(&dir) {
                Ok(uid) => uid,
                Err(e) => {
                    tracing::error!(vm = %key, error = %e, "cannot read or write the VM's uid file");
                    return;
                }
            };
            self.update(|state| {
                let tracked = state
                    .tracked
                    .entry(key.clone())
                    .or_insert_with(|| TrackedVm::new(spec.clone(), uid));
                tracked.spec = spec.clone();
            });
        }
        if !lock(&self.state).tracked.contains_key(key) {
            return;
        }
        self.refresh_locked(key, &dir).await;
        let due = lock(&self.state)
            .tracked
            .get(key)
            .is_some_and(|vm| vm.start_due(Instant::now()));
        if let (true, Some(spec)) = (due, spec) {
            if self.qemu_problem.is_none() {
                let _ = self.start_locked(key, &dir, &spec).await;
            }
        }
    }

    /// The VM's declaration is gone: stop reporting it.
    fn forget(&self, key: &VmKey) {
        self.update(|state| {
            if let Some(vm) = state.tracked.remove(key) {
                match vm.pid {
                    Some(pid) => tracing::warn!(vm = %key, pid, "the VM's declaration disappeared while its QEMU runs; it is no longer managed (stop that process by hand if it should not run)"),
                    None => tracing::info!(vm = %key, "the VM's declaration disappeared"),
                }
            }
        });
    }

    /// Applies `change` to the tracked VMs and publishes whatever it changed in the inventory,
    /// all under the state lock so that snapshots and change events agree.
    fn update(&self, change: impl FnOnce(&mut State)) {
        let mut state = lock(&self.state);
        change(&mut state);
        let vms = state::vm_infos(&state.tracked, &self.host.node_name);
        let node = state::node_with_requests(&state.node, &state.tracked);
        let changes = state::changes_between(&state.node, &state.vms, &node, &vms);
        if changes.is_empty() {
            return;
        }
        state.node = node;
        state.vms = vms;
        // No subscriber is fine: the next session starts from a snapshot.
        let _ = self.changes.send(changes);
    }

    async fn monitor(runtime: Weak<Self>, mut shutdown: watch::Receiver<bool>, interval: Duration) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(interval) => {}
            }
            if *shutdown.borrow() {
                return;
            }
            let Some(runtime) = runtime.upgrade() else {
                return;
            };
            runtime.reconcile_all().await;
        }
    }
}

impl Drop for QemuRuntime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl crate::session::InventorySource for QemuRuntime {
    fn snapshot(&self) -> (ClusterInfo, Vec<NodeInfo>, Vec<VmInfo>) {
        let state = lock(&self.state);
        (
            state.cluster.clone(),
            vec![state.node.clone()],
            state.vms.values().cloned().collect(),
        )
    }

    fn subscribe(&self) -> broadcast::Receiver<Vec<InventoryChange>> {
        self.changes.subscribe()
    }

    fn health(&self) -> (ReportedHealth, Option<String>) {
        let state = lock(&self.state);
        let mut reasons = Vec::new();
        if let Some(problem) = &self.qemu_problem {
            reasons.push(format!("QEMU is not usable: {problem}"));
        }
        for (key, vm) in &state.tracked {
            if vm.spec.run_strategy == RunStrategy::Halted {
                continue;
            }
            if let (None, Some(error)) = (vm.pid, &vm.last_start_error) {
                reasons.push(format!(
                    "virtual machine {key} failed to start ({} failure(s) in a row): {error}",
                    vm.failures
                ));
            }
        }
        for (path, problem) in &state.malformed {
            reasons.push(format!(
                "VM declaration {} is unusable: {problem}",
                path.display()
            ));
        }
        if reasons.is_empty() {
            (ReportedHealth::Ready, None)
        } else {
            (ReportedHealth::Degraded, Some(reasons.join("; ")))
        }
    }
}

/// Checks what `VmSpec::validate` cannot: limits of QEMU's names, and that the host files the
/// spec names are files inside the agent's image directories (`allowed_dirs`).
fn check_runnable_here(spec: &VmSpec, allowed_dirs: &[PathBuf]) -> Result<(), RuntimeError> {
    let vm = format!("{}/{}", spec.namespace, spec.name);
    let mut problems = Vec::new();
    let check_file = |problems: &mut Vec<String>, what: String, file: &str| {
        if let Err(problem) = image_dirs::allowed_host_file(&what, file, allowed_dirs) {
            problems.push(problem);
        }
    };
    for disk in &spec.disks {
        if disk.name.len() > process::MAX_DISK_NAME_LEN {
            problems.push(format!(
                "disk name {:?} is longer than {} characters (QEMU's limit for block node names)",
                disk.name,
                process::MAX_DISK_NAME_LEN
            ));
        }
        if let Some(image) = &disk.image {
            check_file(&mut problems, format!("disk {:?}: image", disk.name), image);
        }
    }
    if let Some(boot) = &spec.boot {
        check_file(&mut problems, "kernel".into(), &boot.kernel);
        if let Some(initrd) = &boot.initrd {
            check_file(&mut problems, "initrd".into(), initrd);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(RuntimeError::InvalidSpec(format!(
            "virtual machine {vm}: {}",
            problems.join("; ")
        )))
    }
}

/// The runtime's locks guard plain data; a panic elsewhere leaves it usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
