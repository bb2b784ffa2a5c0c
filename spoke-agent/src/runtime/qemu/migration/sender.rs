//! The sending side of a migration: the transfer (disks mirrored over NBD, then memory), its
//! progress and stall detection, its undoing on failure or cancel, and the source's end after
//! the switchover (or its resumption when the switchover is abandoned).

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_shared::inventory::VmPhase;
use drover_shared::telemetry::MIGRATION_TRACE_TARGET;
use qapi::qmp::{JobStatus, MigrationCapability, MigrationStatus, RunState};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument as _;

use super::super::layout::{self, VmDir, VmKey};
use super::super::qmp::QmpError;
use super::super::{lock, process, QemuRuntime, RuntimeError};
use super::commands::{self, BlockJob, MigrationInfo};
use super::progress::{stall_reason, ProgressTracker, Sample, Stage};
use super::{
    check_migration_id, check_socket_path, disk_node, in_progress, marker_file, mib, mirror_job,
    nbd_node, next_poll, read_marker, remove_marker, write_marker, Failure, Marker,
    MigrationFailure, MigrationProgress, MigrationStage, Registered, Role, SendOptions,
    SendOutcome, CANCEL_TIMEOUT, CLEANUP_WAIT, DOWNTIME_LIMIT_MS, POLL, REPORT_EVERY,
    SWITCHOVER_DISK_TIMEOUT, UNLIMITED_BANDWIDTH,
};

/// How long connecting to the caller's local tunnel may take.
const LINK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to the caller's local socket for QEMU (see `local_socket`: the agent connects, QEMU
/// is handed the connected descriptor, so both ends have wide buffers).
async fn connect_link(path: &Path) -> Result<tokio::net::UnixStream, String> {
    match tokio::time::timeout(LINK_CONNECT_TIMEOUT, crate::local_socket::connect(path)).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => Err(format!(
            "cannot connect the tunnel at {}: {e}",
            path.display()
        )),
        Err(_) => Err(format!(
            "connecting the tunnel at {} timed out after {LINK_CONNECT_TIMEOUT:?}",
            path.display()
        )),
    }
}

impl QemuRuntime {
    /// Sends a running VM to a receiver: disks first (mirrored, writes kept in sync), then
    /// memory, reporting progress about every 250 ms. On success the target holds the whole
    /// state and the source is paused (QEMU `postmigrate`) until `finish_sender` or
    /// `resume_sender`. On any failure, timeout or cancel the transfer is undone and the source
    /// keeps running; the error says why.
    #[tracing::instrument(skip(self, options, progress), fields(vm = %format_args!("{namespace}/{name}")))]
    pub async fn send<F>(
        &self,
        namespace: &str,
        name: &str,
        migration_id: &str,
        options: SendOptions,
        progress: F,
    ) -> Result<SendOutcome, RuntimeError>
    where
        F: Fn(MigrationProgress) + Send + Sync,
    {
        check_migration_id(migration_id)?;
        let key = VmKey::checked(namespace, name)?;
        let dir = self.dir(&key);
        let failed = |kind: MigrationFailure, detail: String| RuntimeError::Migration {
            vm: key.to_string(),
            migration_id: migration_id.to_owned(),
            kind,
            detail,
        };
        let precondition = |detail: String| failed(MigrationFailure::Precondition, detail);
        for (what, socket) in [
            ("the NBD socket", &options.nbd_socket),
            ("the migration socket", &options.migration_socket),
        ] {
            check_socket_path(what, socket).map_err(precondition)?;
        }
        let _vm_lock = self.lock_vm(&key).await?;
        let spec = match layout::read_spec(&dir, &key) {
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
        match read_marker(&dir) {
            Ok(None) => {}
            Ok(Some(marker)) => {
                return Err(precondition(format!(
                    "it already takes part in migration {} (started {}); finish, resume or cancel that one first",
                    marker.migration_id, marker.started_at
                )))
            }
            Err(problem) => return Err(precondition(problem)),
        }
        if process::running_pid(&dir).is_none() {
            return Err(precondition(
                "it is not running; only a running VM is live-migrated".into(),
            ));
        }
        let socket = dir.qmp_socket();
        let status = commands::query_status(&socket)
            .await
            .map_err(|e| failed(MigrationFailure::Qemu, format!("reading its state: {e}")))?
            .status;
        if !matches!(status, RunState::running | RunState::paused) {
            return Err(precondition(format!(
                "its QEMU is {status:?}, not running or paused"
            )));
        }
        if !spec.disks.is_empty() && !options.nbd_socket.exists() {
            return Err(precondition(format!(
                "the NBD socket {} does not exist; the tunnel to the target must listen there",
                options.nbd_socket.display()
            )));
        }
        if !options.migration_socket.exists() {
            return Err(precondition(format!(
                "the migration socket {} does not exist; the tunnel to the target must listen there",
                options.migration_socket.display()
            )));
        }

        let (cancel_tx, cancel_rx) = watch::channel(false);
        lock(&self.sends.0).insert(key.clone(), cancel_tx);
        let _registered = Registered {
            sends: &self.sends,
            key: key.clone(),
        };
        let marker = Marker {
            migration_id: migration_id.to_owned(),
            role: Role::Sender,
            spec: None,
            started_at: chrono::Utc::now(),
        };
        write_marker(&dir, &marker).map_err(|source| RuntimeError::Io {
            vm: key.to_string(),
            action: "cannot write",
            path: marker_file(&dir),
            source,
        })?;
        self.update(|state| {
            if let Some(tracked) = state.tracked.get_mut(&key) {
                tracked.phase = VmPhase::Migrating;
            }
        });
        let disks: Vec<String> = spec.disks.iter().map(|d| d.name.clone()).collect();
        let now = Instant::now();
        let mut transfer = Transfer {
            socket: socket.clone(),
            disks: disks.clone(),
            options: &options,
            cancel: cancel_rx,
            progress: &progress,
            started: now,
            tracker: ProgressTracker::new(options.progress_timeout, now),
            memory_total: spec.memory_bytes,
            disk: (0, 0),
            disk_rate: None,
            post_copy: false,
            disk_time_ms: 0,
        };
        tracing::info!(
            migration = migration_id,
            bandwidth = options.bandwidth_bytes_per_sec,
            "sending"
        );
        let result = transfer.run().await;
        match result {
            Ok(outcome) => {
                self.refresh_locked(&key, &dir).await;
                tracing::info!(
                    migration = migration_id,
                    downtime_ms = outcome.downtime_ms,
                    total_time_ms = outcome.total_time_ms,
                    bytes = outcome.bytes,
                    "sent; the source is paused until the switchover"
                );
                Ok(outcome)
            }
            Err(failure) => {
                tracing::warn!(migration = migration_id, reason = %failure.detail, "the send failed; undoing it");
                let problems = abort_transfer(&socket, &disks, status == RunState::running).await;
                let mut detail = failure.detail;
                if problems.is_empty() {
                    if let Err(e) = remove_marker(&dir) {
                        tracing::error!(error = %e, "cannot remove the migration marker");
                    }
                    detail.push_str("; the virtual machine keeps running here");
                } else {
                    // The marker stays: the monitor must not restart a VM whose state is unclear.
                    detail.push_str(&format!(
                        "; undoing the transfer failed too ({}); resume the VM here with resume_sender",
                        problems.join("; ")
                    ));
                }
                self.refresh_locked(&key, &dir).await;
                Err(failed(failure.kind, detail))
            }
        }
    }

    /// Cancels a send at any time before it completes: the transfer is undone and the source
    /// keeps running. Waits (bounded) for a running send to finish its cleanup. A send that
    /// already completed cannot be cancelled: the VM is then paused awaiting the switchover.
    #[tracing::instrument(skip(self))]
    pub async fn cancel_send(&self, namespace: &str, name: &str) -> Result<String, RuntimeError> {
        let key = VmKey::checked(namespace, name)?;
        let dir = self.dir(&key);
        let signalled = lock(&self.sends.0)
            .get(&key)
            .is_some_and(|cancel| cancel.send(true).is_ok());
        let _vm_lock = tokio::time::timeout(CANCEL_TIMEOUT, self.vm_lock(&key).lock_owned())
            .await
            .map_err(|_| RuntimeError::Busy {
                vm: key.to_string(),
                waited: CANCEL_TIMEOUT,
            })?;
        let precondition = |migration_id: &str, detail: String| RuntimeError::Migration {
            vm: key.to_string(),
            migration_id: migration_id.to_owned(),
            kind: MigrationFailure::Precondition,
            detail,
        };
        let marker = match read_marker(&dir) {
            Ok(Some(marker)) => marker,
            Ok(None) if signalled => {
                return Ok(format!(
                    "cancelled the migration of {key}; it keeps running here"
                ))
            }
            Ok(None) => return Ok(format!("no migration of {key} is in progress here")),
            Err(problem) => return Err(precondition("unknown", problem)),
        };
        if marker.role == Role::Receiver {
            return Err(precondition(
                &marker.migration_id,
                "it is the receiving side here; abort the receiver instead".into(),
            ));
        }
        // No send runs now (we hold the lock): what is left is a completed send or the remains
        // of one that a stopped agent interrupted.
        if process::running_pid(&dir).is_some() {
            let status = commands::query_status(&dir.qmp_socket())
                .await
                .map_err(|e| {
                    precondition(&marker.migration_id, format!("reading its state: {e}"))
                })?;
            if status.status == RunState::postmigrate {
                return Err(precondition(
                    &marker.migration_id,
                    "the migration already completed and the VM is paused here awaiting the switchover; finish it (finish_receiver, then finish_sender) or keep the VM here (abort_receiver, then resume_sender)".into(),
                ));
            }
            let disks = self.disk_names(&key, &dir);
            let problems = abort_transfer(&dir.qmp_socket(), &disks, true).await;
            if !problems.is_empty() {
                return Err(RuntimeError::Migration {
                    vm: key.to_string(),
                    migration_id: marker.migration_id,
                    kind: MigrationFailure::Qemu,
                    detail: format!("undoing the transfer failed: {}", problems.join("; ")),
                });
            }
        }
        remove_marker(&dir).map_err(|source| RuntimeError::Io {
            vm: key.to_string(),
            action: "cannot remove",
            path: marker_file(&dir),
            source,
        })?;
        self.refresh_locked(&key, &dir).await;
        Ok(format!(
            "cancelled migration {} of {key}; it keeps running here",
            marker.migration_id
        ))
    }

    fn disk_names(&self, key: &VmKey, dir: &VmDir) -> Vec<String> {
        let spec = layout::read_spec(dir, key)
            .ok()
            .flatten()
            .or_else(|| lock(&self.state).tracked.get(key).map(|vm| vm.spec.clone()));
        spec.map(|s| s.disks.iter().map(|d| d.name.clone()).collect())
            .unwrap_or_default()
    }

    /// The switchover on the source, after `finish_receiver`: quits the paused QEMU and removes
    /// the VM's directory; the VM lives on the target now. Refuses a source that runs.
    #[tracing::instrument(skip(self))]
    pub async fn finish_sender(&self, namespace: &str, name: &str) -> Result<String, RuntimeError> {
        let key = VmKey::checked(namespace, name)?;
        let dir = self.dir(&key);
        let _vm_lock = self.lock_vm(&key).await?;
        let marker = self.sender_marker(&key, &dir)?;
        let precondition = |detail: String| RuntimeError::Migration {
            vm: key.to_string(),
            migration_id: marker.migration_id.clone(),
            kind: MigrationFailure::Precondition,
            detail,
        };
        let mut how = "its QEMU had already exited";
        if let Some(pid) = process::running_pid(&dir) {
            let status = commands::query_status(&dir.qmp_socket())
                .await
                .map_err(|e| precondition(format!("reading its state: {e}")))?
                .status;
            if status != RunState::postmigrate {
                return Err(precondition(format!(
                    "its migration has not completed (QEMU is {status:?}); only a completed send is finished"
                )));
            }
            how = self.end_process(&key, &dir, pid, Duration::ZERO).await?;
        }
        self.remove_dir_locked(&key, &dir)?;
        tracing::info!(migration = %marker.migration_id, how, "source removed after the switchover");
        Ok(format!(
            "removed {key} from this agent after migration {} ({how}); it runs on the target",
            marker.migration_id
        ))
    }

    /// Abandons a completed send before the switchover (the target failed to take over): the
    /// source resumes and stays authoritative. Call it only once the target's guest cannot run
    /// (after `abort_receiver`).
    #[tracing::instrument(skip(self))]
    pub async fn resume_sender(&self, namespace: &str, name: &str) -> Result<String, RuntimeError> {
        let key = VmKey::checked(namespace, name)?;
        let dir = self.dir(&key);
        let _vm_lock = self.lock_vm(&key).await?;
        let marker = self.sender_marker(&key, &dir)?;
        let failed = |kind: MigrationFailure, detail: String| RuntimeError::Migration {
            vm: key.to_string(),
            migration_id: marker.migration_id.clone(),
            kind,
            detail,
        };
        let message = if process::running_pid(&dir).is_some() {
            let socket = dir.qmp_socket();
            let disks = self.disk_names(&key, &dir);
            // `true`: resume whatever the migration left stopped.
            let problems = abort_transfer(&socket, &disks, true).await;
            if !problems.is_empty() {
                return Err(failed(
                    MigrationFailure::Qemu,
                    format!("resuming failed: {}", problems.join("; ")),
                ));
            }
            format!(
                "virtual machine {key} runs here again; migration {} was abandoned",
                marker.migration_id
            )
        } else {
            format!(
                "virtual machine {key} stays here (migration {} abandoned); its QEMU had exited and is started again per its run strategy",
                marker.migration_id
            )
        };
        remove_marker(&dir).map_err(|source| RuntimeError::Io {
            vm: key.to_string(),
            action: "cannot remove",
            path: marker_file(&dir),
            source,
        })?;
        self.refresh_locked(&key, &dir).await;
        tracing::info!(migration = %marker.migration_id, "source resumed");
        Ok(message)
    }

    fn sender_marker(&self, key: &VmKey, dir: &VmDir) -> Result<Marker, RuntimeError> {
        let problem = |detail: String| RuntimeError::Migration {
            vm: key.to_string(),
            migration_id: "-".into(),
            kind: MigrationFailure::Precondition,
            detail,
        };
        match read_marker(dir) {
            Ok(Some(marker)) if marker.role == Role::Sender => Ok(marker),
            Ok(Some(_)) => Err(problem("it is a migration receiver here".into())),
            Ok(None) if !dir.path.exists() => Err(RuntimeError::NotFound {
                vm: key.to_string(),
            }),
            Ok(None) => Err(problem("it is not being sent anywhere".into())),
            Err(detail) => Err(problem(detail)),
        }
    }
}

/// One send in progress.
struct Transfer<'a, F> {
    socket: PathBuf,
    disks: Vec<String>,
    options: &'a SendOptions,
    cancel: watch::Receiver<bool>,
    progress: &'a F,
    started: Instant,
    tracker: ProgressTracker,
    memory_total: u64,
    /// Disk bytes (total, copied) as last seen.
    disk: (u64, u64),
    /// The last disk sample, to compute the disk copy's throughput.
    disk_rate: Option<(Instant, u64, u64)>,
    post_copy: bool,
    /// When the disks got in sync, counted from `started`.
    disk_time_ms: u64,
}

impl<F: Fn(MigrationProgress) + Send + Sync> Transfer<'_, F> {
    async fn run(&mut self) -> Result<SendOutcome, Failure> {
        let disks = tracing::info_span!(
            target: MIGRATION_TRACE_TARGET,
            "disk copy",
            drover.disks = self.disks.len(),
            drover.bytes = Empty,
            otel.status_code = Empty,
            error.message = Empty,
        );
        let copied = self.copy_disks().instrument(disks.clone()).await;
        disks.record("drover.bytes", self.disk.1);
        record_failure(&disks, copied.as_ref().err());
        copied?;
        self.disk_time_ms = self.started.elapsed().as_millis() as u64;
        let memory = tracing::info_span!(
            target: MIGRATION_TRACE_TARGET,
            "memory copy",
            drover.memory.bytes = self.memory_total,
            drover.bytes = Empty,
            drover.downtime_ms = Empty,
            drover.post_copy = Empty,
            otel.status_code = Empty,
            error.message = Empty,
        );
        let sent = self.copy_memory().instrument(memory.clone()).await;
        if let Ok(outcome) = &sent {
            memory.record("drover.bytes", outcome.memory_bytes);
            memory.record("drover.downtime_ms", outcome.downtime_ms);
            memory.record("drover.post_copy", outcome.post_copy);
        }
        record_failure(&memory, sent.as_ref().err());
        sent
    }

    fn check_cancel_and_deadline(&self, latest: Option<&MigrationProgress>) -> Result<(), Failure> {
        if *self.cancel.borrow() {
            return Err(Failure::new(
                MigrationFailure::Cancelled,
                "cancelled by the operator",
            ));
        }
        let elapsed = self.started.elapsed();
        if elapsed >= self.options.completion_timeout {
            let state = latest
                .map(|p| {
                    format!(
                        " ({} of {} left, dirty rate {}/s, throughput {}/s)",
                        mib(p.remaining_bytes),
                        mib(p.total_bytes),
                        mib(p.dirty_rate_bytes_per_sec),
                        mib(p.throughput_bytes_per_sec)
                    )
                })
                .unwrap_or_default();
            return Err(Failure::new(
                MigrationFailure::TimedOut,
                format!(
                    "it did not complete within its completion timeout of {:?}{state}",
                    self.options.completion_timeout
                ),
            ));
        }
        Ok(())
    }

    async fn copy_disks(&mut self) -> Result<(), Failure> {
        if self.disks.is_empty() {
            return Ok(());
        }
        for disk in &self.disks {
            let link = connect_link(&self.options.nbd_socket).await.map_err(|e| {
                Failure::new(
                    MigrationFailure::TransferFailed,
                    format!("disk {disk}: {e}"),
                )
            })?;
            commands::blockdev_add_nbd(
                &self.socket,
                &nbd_node(disk),
                link.as_fd(),
                &disk_node(disk),
            )
            .await
            .map_err(|e| {
                Failure::new(
                    MigrationFailure::TransferFailed,
                    format!(
                        "disk {disk}: cannot reach the target's export {} through {}: {e}",
                        disk_node(disk),
                        self.options.nbd_socket.display()
                    ),
                )
            })?;
            commands::blockdev_mirror(
                &self.socket,
                &mirror_job(disk),
                &disk_node(disk),
                &nbd_node(disk),
                self.options.bandwidth_bytes_per_sec,
            )
            .await
            .map_err(|e| Failure::qemu(&format!("disk {disk}: starting its mirror"), e))?;
        }
        tracing::info!(disks = self.disks.len(), "mirroring disks to the target");
        let mut latest = None;
        let mut next_report = Instant::now();
        loop {
            self.check_cancel_and_deadline(latest.as_ref())?;
            let jobs = self.mirror_jobs().await?;
            let all_ready = jobs.iter().all(|j| j.ready);
            let now = Instant::now();
            if all_ready || now >= next_report {
                next_report = now + REPORT_EVERY;
                let stage = if all_ready {
                    MigrationStage::Memory
                } else {
                    MigrationStage::Disks
                };
                let report = self.report(stage, None, now);
                if !all_ready {
                    let stalled = self.tracker.observe(
                        Sample {
                            stage: Stage::Disks,
                            remaining: report.disk_remaining_bytes,
                            transferred: report.transferred_bytes,
                            memory_passes: 0,
                        },
                        now,
                    );
                    if stalled {
                        return Err(Failure::new(
                            MigrationFailure::Stalled,
                            format!(
                                "the disk copy made no progress for {:?} ({} of {} left, throughput {}/s); the link to the target is stalled or too slow",
                                self.options.progress_timeout,
                                mib(report.disk_remaining_bytes),
                                mib(report.disk_total_bytes),
                                mib(report.throughput_bytes_per_sec)
                            ),
                        ));
                    }
                }
                latest = Some(report);
            }
            if all_ready {
                tracing::info!(bytes = self.disk.1, "disks in sync; copying memory");
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Our mirror jobs, failing if one of them failed or vanished; updates the disk counters.
    async fn mirror_jobs(&mut self) -> Result<Vec<BlockJob>, Failure> {
        let jobs = commands::query_block_jobs(&self.socket)
            .await
            .map_err(|e| Failure::qemu("asking for the disk mirrors' state", e))?;
        let mut ours = Vec::new();
        for disk in &self.disks {
            let id = mirror_job(disk);
            let Some(job) = jobs.iter().find(|j| j.device == id) else {
                return Err(Failure::new(
                    MigrationFailure::TransferFailed,
                    format!("disk {disk}: its mirror job ended unexpectedly"),
                ));
            };
            if job.error.is_some()
                || matches!(
                    job.status,
                    JobStatus::aborting | JobStatus::concluded | JobStatus::null
                )
            {
                return Err(Failure::new(
                    MigrationFailure::TransferFailed,
                    format!(
                        "disk {disk}: copying it to the target failed: {}",
                        job.error.as_deref().unwrap_or("the mirror job ended")
                    ),
                ));
            }
            ours.push(job.clone());
        }
        self.disk = (
            ours.iter().map(|j| j.len).sum(),
            ours.iter().map(|j| j.offset).sum(),
        );
        Ok(ours)
    }

    async fn copy_memory(&mut self) -> Result<SendOutcome, Failure> {
        let options = self.options;
        commands::migrate_set_capabilities(
            &self.socket,
            &[
                (MigrationCapability::pause_before_switchover, true),
                (MigrationCapability::return_path, true),
                (
                    MigrationCapability::auto_converge,
                    options.allow_auto_converge,
                ),
                (MigrationCapability::postcopy_ram, options.allow_post_copy),
            ],
        )
        .await
        .map_err(|e| Failure::qemu("setting the migration capabilities", e))?;
        let bandwidth = match options.bandwidth_bytes_per_sec {
            0 => UNLIMITED_BANDWIDTH,
            limit => limit,
        };
        commands::migrate_set_parameters(&self.socket, bandwidth, DOWNTIME_LIMIT_MS)
            .await
            .map_err(|e| Failure::qemu("setting the migration parameters", e))?;
        let link = connect_link(&options.migration_socket)
            .await
            .map_err(|e| Failure::new(MigrationFailure::TransferFailed, e))?;
        commands::migrate(&self.socket, link.as_fd())
            .await
            .map_err(|e| {
                Failure::new(
                    MigrationFailure::TransferFailed,
                    format!(
                        "starting the memory transfer through {}: {e}",
                        options.migration_socket.display()
                    ),
                )
            })?;
        self.tracker.reset(Instant::now());
        let mut disks_handed_over = self.disks.is_empty();
        let mut latest: Option<MigrationProgress> = None;
        let mut next_report = Instant::now();
        loop {
            self.check_cancel_and_deadline(latest.as_ref())?;
            let info = commands::query_migrate(&self.socket)
                .await
                .map_err(|e| Failure::qemu("asking for the migration's state", e))?;
            match info.status {
                Some(MigrationStatus::completed) => {
                    // The concluded mirrors and the NBD links stay until the source QEMU ends
                    // (`finish_sender`) or resumes (`resume_sender` releases them): every QMP
                    // exchange before the target runs adds to the guest's pause.
                    let report =
                        self.report(MigrationStage::Switchover, Some(&info), Instant::now());
                    let memory_bytes = info.ram.as_ref().map_or(0, |r| r.transferred);
                    return Ok(SendOutcome {
                        downtime_ms: info.downtime.unwrap_or(0),
                        total_time_ms: report.elapsed.as_millis() as u64,
                        bytes: memory_bytes + self.disk.1,
                        memory_bytes,
                        disk_bytes: self.disk.1,
                        disk_time_ms: self.disk_time_ms,
                        post_copy: self.post_copy,
                        completed_at: Instant::now(),
                    });
                }
                Some(MigrationStatus::failed) => {
                    return Err(Failure::new(
                        MigrationFailure::TransferFailed,
                        format!(
                            "the memory transfer failed: {}",
                            info.error_desc
                                .as_deref()
                                .unwrap_or("QEMU gave no reason (the link to the target broke?)")
                        ),
                    ))
                }
                Some(MigrationStatus::cancelled | MigrationStatus::cancelling) => {
                    return Err(Failure::new(
                        MigrationFailure::TransferFailed,
                        "QEMU cancelled the memory transfer",
                    ))
                }
                Some(MigrationStatus::pre_switchover) if !disks_handed_over => {
                    self.hand_over_disks().await?;
                    disks_handed_over = true;
                    commands::migrate_continue_after_pre_switchover(&self.socket)
                        .await
                        .map_err(|e| Failure::qemu("continuing the switchover", e))?;
                    continue;
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= next_report {
                next_report = now + REPORT_EVERY;
                if !disks_handed_over {
                    // Write-blocking mirrors fail when the link does; say so at once.
                    self.mirror_jobs().await?;
                }
                let (stage, tracked) = match info.status {
                    Some(MigrationStatus::postcopy_active) => {
                        (MigrationStage::PostCopy, Stage::PostCopy)
                    }
                    Some(MigrationStatus::pre_switchover | MigrationStatus::device) => {
                        (MigrationStage::Switchover, Stage::Memory)
                    }
                    _ => (MigrationStage::Memory, Stage::Memory),
                };
                let report = self.report(stage, Some(&info), now);
                let stalled = self.tracker.observe(
                    Sample {
                        stage: tracked,
                        remaining: report.remaining_bytes,
                        transferred: report.transferred_bytes,
                        memory_passes: report.memory_passes,
                    },
                    now,
                );
                if stalled {
                    if options.allow_post_copy
                        && !self.post_copy
                        && info.status == Some(MigrationStatus::active)
                    {
                        tracing::info!(
                            dirty_rate = report.dirty_rate_bytes_per_sec,
                            throughput = report.throughput_bytes_per_sec,
                            "pre-copy does not converge; switching to post-copy"
                        );
                        commands::migrate_start_postcopy(&self.socket)
                            .await
                            .map_err(|e| Failure::qemu("switching to post-copy", e))?;
                        self.post_copy = true;
                        self.tracker.reset(now);
                    } else {
                        return Err(Failure::new(
                            MigrationFailure::Stalled,
                            stall_reason(&report, self.options),
                        ));
                    }
                }
                latest = Some(report);
            }
            tokio::time::sleep(next_poll(&info)).await;
        }
    }

    /// At pre-switchover (guest stopped, disks still active): completes every mirror, so that
    /// the target holds every write, and drops the NBD connections.
    async fn hand_over_disks(&mut self) -> Result<(), Failure> {
        for disk in &self.disks {
            commands::block_job_cancel(&self.socket, &mirror_job(disk), false)
                .await
                .map_err(|e| Failure::qemu(&format!("disk {disk}: completing its mirror"), e))?;
        }
        let deadline = Instant::now() + SWITCHOVER_DISK_TIMEOUT;
        loop {
            let jobs = commands::query_block_jobs(&self.socket)
                .await
                .map_err(|e| Failure::qemu("asking for the disk mirrors' state", e))?;
            let mut done = 0;
            for disk in &self.disks {
                let id = mirror_job(disk);
                match jobs.iter().find(|j| j.device == id) {
                    Some(job) if job.status == JobStatus::concluded => {
                        if let Some(error) = &job.error {
                            return Err(Failure::new(
                                MigrationFailure::TransferFailed,
                                format!("disk {disk}: its last writes did not reach the target: {error}"),
                            ));
                        }
                        done += 1;
                    }
                    Some(_) => {}
                    None => {
                        return Err(Failure::new(
                            MigrationFailure::TransferFailed,
                            format!("disk {disk}: its mirror job vanished during the switchover"),
                        ))
                    }
                }
            }
            if done == self.disks.len() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Failure::new(
                    MigrationFailure::TransferFailed,
                    format!("the disk mirrors did not complete within {SWITCHOVER_DISK_TIMEOUT:?} while the guest was stopped; the link to the target is stalled"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::debug!("disks handed over");
        Ok(())
    }

    /// Builds a progress report and hands it to the caller.
    fn report(
        &mut self,
        stage: MigrationStage,
        info: Option<&MigrationInfo>,
        now: Instant,
    ) -> MigrationProgress {
        let (disk_total, disk_done) = self.disk;
        let ram = info.and_then(|i| i.ram.clone()).unwrap_or_default();
        let memory_total = if ram.total > 0 {
            ram.total
        } else {
            self.memory_total
        };
        let memory_remaining = match (stage, ram.total) {
            (MigrationStage::Disks, _) | (_, 0) => memory_total,
            _ => ram.remaining,
        };
        let throughput = if stage == MigrationStage::Disks {
            match self.disk_rate {
                Some((at, done, rate)) if now > at => {
                    let secs = (now - at).as_secs_f64();
                    if secs >= 1.0 {
                        let rate = (disk_done.saturating_sub(done) as f64 / secs) as u64;
                        self.disk_rate = Some((now, disk_done, rate));
                        rate
                    } else {
                        rate
                    }
                }
                Some((_, _, rate)) => rate,
                None => {
                    self.disk_rate = Some((now, disk_done, 0));
                    0
                }
            }
        } else {
            (ram.mbps * 1_000_000.0 / 8.0) as u64
        };
        let report = MigrationProgress {
            stage,
            elapsed: now.saturating_duration_since(self.started),
            total_bytes: disk_total + memory_total,
            transferred_bytes: disk_done + ram.transferred,
            remaining_bytes: disk_total.saturating_sub(disk_done) + memory_remaining,
            disk_total_bytes: disk_total,
            disk_remaining_bytes: disk_total.saturating_sub(disk_done),
            memory_total_bytes: memory_total,
            memory_remaining_bytes: memory_remaining,
            memory_passes: ram.dirty_sync_count,
            dirty_rate_bytes_per_sec: ram.dirty_pages_rate.saturating_mul(ram.page_size),
            throughput_bytes_per_sec: throughput,
            cpu_throttle_percent: info.and_then(|i| i.cpu_throttle_percentage).unwrap_or(0),
        };
        (self.progress)(report.clone());
        report
    }
}

/// Marks a transfer step's span as ended well or failed.
fn record_failure(span: &tracing::Span, failure: Option<&Failure>) {
    match failure {
        None => {
            span.record("otel.status_code", "OK");
        }
        Some(failure) => {
            span.record("otel.status_code", "ERROR");
            span.record("error.message", failure.detail.as_str());
        }
    }
}

/// Undoes a send on the source: ends the migration, cancels and dismisses the mirrors, deletes
/// the NBD nodes, and resumes the guest if it was running. Returns what could not be undone.
pub(super) async fn abort_transfer(
    socket: &Path,
    disks: &[String],
    was_running: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    match commands::query_migrate(socket).await {
        Ok(info) if in_progress(info.status) => {
            if let Err(e) = commands::migrate_cancel(socket).await {
                problems.push(format!("cancelling the memory transfer: {e}"));
            }
            let deadline = Instant::now() + CLEANUP_WAIT;
            loop {
                match commands::query_migrate(socket).await {
                    Ok(info) if !in_progress(info.status) => break,
                    Ok(info) if Instant::now() >= deadline => {
                        problems.push(format!(
                            "the memory transfer is still {:?} {CLEANUP_WAIT:?} after cancelling it",
                            info.status
                        ));
                        break;
                    }
                    Ok(_) => tokio::time::sleep(POLL).await,
                    Err(e) => {
                        problems.push(format!("asking for the migration's state: {e}"));
                        break;
                    }
                }
            }
        }
        Ok(_) => {}
        Err(e) => problems.push(format!("asking for the migration's state: {e}")),
    }
    if !disks.is_empty() {
        let ours = |jobs: Vec<BlockJob>| -> Vec<BlockJob> {
            jobs.into_iter()
                .filter(|j| disks.iter().any(|d| mirror_job(d) == j.device))
                .collect()
        };
        match commands::query_block_jobs(socket).await {
            Ok(jobs) => {
                for job in ours(jobs) {
                    if job.status != JobStatus::concluded {
                        if let Err(e) = commands::block_job_cancel(socket, &job.device, true).await
                        {
                            problems.push(format!("cancelling mirror {}: {e}", job.device));
                        }
                    }
                }
                let deadline = Instant::now() + CLEANUP_WAIT;
                loop {
                    let jobs = match commands::query_block_jobs(socket).await {
                        Ok(jobs) => ours(jobs),
                        Err(e) => {
                            problems.push(format!("asking for the disk mirrors' state: {e}"));
                            break;
                        }
                    };
                    let open: Vec<&BlockJob> = jobs
                        .iter()
                        .filter(|j| j.status != JobStatus::concluded)
                        .collect();
                    if open.is_empty() {
                        for job in &jobs {
                            if let Err(e) = commands::job_dismiss(socket, &job.device).await {
                                problems.push(format!("dismissing mirror {}: {e}", job.device));
                            }
                        }
                        break;
                    }
                    if Instant::now() >= deadline {
                        problems.push(format!(
                            "mirror {} did not end within {CLEANUP_WAIT:?} of cancelling it (requests to a stalled link still wait; close the tunnel)",
                            open[0].device
                        ));
                        break;
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
            Err(e) => problems.push(format!("asking for the disk mirrors' state: {e}")),
        }
        for disk in disks {
            match commands::blockdev_del(socket, &nbd_node(disk)).await {
                Ok(()) => {}
                Err(QmpError::Refused { message, .. }) if message.contains("find node") => {}
                Err(e) => problems.push(format!("deleting NBD node {}: {e}", nbd_node(disk))),
            }
        }
    }
    if was_running {
        match commands::query_status(socket).await {
            Ok(status) if status.status == RunState::running => {}
            Ok(status) => {
                tracing::info!(state = ?status.status, "resuming the guest the migration left stopped");
                if let Err(e) = commands::cont(socket).await {
                    problems.push(format!("resuming the guest: {e}"));
                }
            }
            Err(e) => problems.push(format!("reading the VM's state: {e}")),
        }
    }
    problems
}
