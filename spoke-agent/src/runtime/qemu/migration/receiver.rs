//! The receiving side of a migration: the waiting VM (QEMU with `-incoming defer -S`, NBD
//! exports of blank disks, the marker), its switchover into a normal VM, and its removal when
//! the migration does not happen.

use std::path::PathBuf;
use std::time::Duration;

use drover_shared::commands::VmSpec;
use drover_shared::inventory::{normalize_mac, RunStrategy, VmPhase};
use qapi::qmp::{MigrationCapability, MigrationStatus, RunState};
use tokio::time::Instant;

use super::super::layout::{self, VmDir, VmKey};
use super::super::qmp::QmpError;
use super::super::state::TrackedVm;
use super::super::{
    check_runnable_here, lock, process, QemuRuntime, RuntimeError, OPERATION_LOCK_TIMEOUT,
};
use super::{
    check_migration_id, check_socket_path, commands, disk_node, export_id, marker_file,
    read_marker, remove_marker, remove_stale, write_marker, Marker, MigrationFailure,
    ReceiverEndpoints, Role, MIGRATION_SOCKET, NBD_SOCKET, RECEIVE_COMPLETION_TIMEOUT,
    SWITCHOVER_POLL,
};

impl QemuRuntime {
    /// Prepares this runtime to receive a VM: its directory with blank disks of the spec's
    /// sizes, a QEMU with the same hardware waiting for the incoming migration (paused), an NBD
    /// server exporting the disks, and the marker. Returns the sockets the sender's tunnel must
    /// reach. On failure nothing is left behind.
    #[tracing::instrument(skip_all, fields(vm = %format_args!("{}/{}", spec.namespace, spec.name), migration = migration_id))]
    pub async fn prepare_receiver(
        &self,
        mut spec: VmSpec,
        migration_id: &str,
    ) -> Result<ReceiverEndpoints, RuntimeError> {
        check_migration_id(migration_id)?;
        // Checked as the VM it becomes after the switchover; its disks are received, not copied
        // from an image.
        spec.run_strategy = RunStrategy::Always;
        for disk in &mut spec.disks {
            disk.image = None;
        }
        spec.validate().map_err(RuntimeError::InvalidSpec)?;
        check_runnable_here(&spec, &self.options.image_dirs)?;
        for interface in &mut spec.interfaces {
            interface.mac = normalize_mac(&interface.mac).map_err(RuntimeError::InvalidSpec)?;
        }
        spec.run_strategy = RunStrategy::WaitAsReceiver;
        let key = VmKey::of(&spec);
        let vm = key.to_string();
        let dir = self.dir(&key);
        let precondition = |detail: String| RuntimeError::Migration {
            vm: vm.clone(),
            migration_id: migration_id.to_owned(),
            kind: MigrationFailure::Precondition,
            detail,
        };
        let endpoints = ReceiverEndpoints {
            nbd_socket: dir.path.join(NBD_SOCKET),
            migration_socket: dir.path.join(MIGRATION_SOCKET),
        };
        check_socket_path("the NBD socket", &endpoints.nbd_socket).map_err(precondition)?;
        check_socket_path("the migration socket", &endpoints.migration_socket)
            .map_err(precondition)?;
        if let Some(problem) = &self.qemu_problem {
            return Err(precondition(format!("QEMU is not usable: {problem}")));
        }

        let _declaring = tokio::time::timeout(OPERATION_LOCK_TIMEOUT, self.declare_lock.lock())
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
        // A leftover directory may hold someone's disks: never reuse it.
        if scan.declared.contains_key(&key) || dir.path.exists() {
            return Err(RuntimeError::AlreadyExists { vm });
        }
        self.check_macs_free(&key, &spec, &scan)?;
        let _vm_lock = self.lock_vm(&key).await?;
        match self
            .start_receiver(&key, &dir, &spec, migration_id, &endpoints)
            .await
        {
            Ok(()) => {
                tracing::info!(nbd = %endpoints.nbd_socket.display(), migration = %endpoints.migration_socket.display(), "receiver ready");
                Ok(endpoints)
            }
            Err(e) => {
                tracing::error!(error = %e, "preparing the receiver failed; removing it");
                if let Err(cleanup) = self.remove_receiver_locked(&key, &dir).await {
                    tracing::error!(error = %cleanup, "removing the failed receiver failed too");
                }
                Err(e)
            }
        }
    }

    fn check_macs_free(
        &self,
        key: &VmKey,
        spec: &VmSpec,
        scan: &layout::Scan,
    ) -> Result<(), RuntimeError> {
        let tracked: Vec<VmSpec> = lock(&self.state)
            .tracked
            .values()
            .map(|t| t.spec.clone())
            .collect();
        for other in scan.declared.values().chain(tracked.iter()) {
            if VmKey::of(other) == *key {
                continue;
            }
            for theirs in &other.interfaces {
                let theirs = normalize_mac(&theirs.mac).unwrap_or_else(|_| theirs.mac.clone());
                if let Some(mine) = spec.interfaces.iter().find(|i| i.mac == theirs) {
                    return Err(RuntimeError::MacInUse {
                        vm: key.to_string(),
                        mac: mine.mac.clone(),
                        other: VmKey::of(other).to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    async fn start_receiver(
        &self,
        key: &VmKey,
        dir: &VmDir,
        spec: &VmSpec,
        migration_id: &str,
        endpoints: &ReceiverEndpoints,
    ) -> Result<(), RuntimeError> {
        let vm = key.to_string();
        let io_error = |action, path: PathBuf| {
            let vm = vm.clone();
            move |source| RuntimeError::Io {
                vm,
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&dir.path).map_err(io_error("cannot create", dir.path.clone()))?;
        let uid = layout::ensure_uid(dir).map_err(io_error("cannot write", dir.uid_file()))?;
        // The marker first: from here on a restarted agent knows what this directory is.
        let marker = Marker {
            migration_id: migration_id.to_owned(),
            role: Role::Receiver,
            spec: Some(spec.clone()),
            started_at: chrono::Utc::now(),
        };
        write_marker(dir, &marker).map_err(io_error("cannot write", marker_file(dir)))?;
        self.update(|state| {
            let mut tracked = TrackedVm::new(spec.clone(), uid);
            tracked.phase = VmPhase::Starting;
            state.tracked.insert(key.clone(), tracked);
        });
        // Its kernel and initrd are read from this agent's image directories.
        let resolved = self.resolve_host_files(key, dir, spec)?;
        self.prepare_disks(key, dir, &resolved).await?;
        for socket in [&endpoints.nbd_socket, &endpoints.migration_socket] {
            remove_stale(socket).map_err(io_error("cannot remove stale", socket.clone()))?;
        }
        let pid = process::launch_with(
            &self.options.qemu_binary,
            dir,
            &resolved,
            self.accel,
            &["-incoming", "defer", "-S"],
        )
        .await
        .map_err(|detail| RuntimeError::StartFailed {
            vm: vm.clone(),
            detail,
        })?;
        tracing::info!(pid, "receiving QEMU started");
        self.update(|state| {
            if let Some(tracked) = state.tracked.get_mut(key) {
                tracked.pid = Some(pid);
                tracked.running_since = Some(Instant::now());
            }
        });
        let socket = dir.qmp_socket();
        let qemu_failed = |what: &str, error: QmpError| RuntimeError::Migration {
            vm: vm.clone(),
            migration_id: migration_id.to_owned(),
            kind: MigrationFailure::Qemu,
            detail: format!("{what}: {error}"),
        };
        // Post-copy needs the capability on both sides; without userfaultfd on this host only
        // pre-copy can reach this VM, which the sender then learns when it switches.
        if let Err(e) = commands::migrate_set_capabilities(
            &socket,
            &[(MigrationCapability::postcopy_ram, true)],
        )
        .await
        {
            tracing::warn!(error = %e, "this receiver cannot take post-copy migrations");
        }
        commands::nbd_server_start(&socket, &endpoints.nbd_socket)
            .await
            .map_err(|e| qemu_failed("starting the NBD server", e))?;
        for disk in &spec.disks {
            let node = disk_node(&disk.name);
            commands::block_export_add_nbd(&socket, &export_id(&disk.name), &node)
                .await
                .map_err(|e| qemu_failed(&format!("exporting disk {}", disk.name), e))?;
        }
        commands::migrate_incoming(&socket, &endpoints.migration_socket)
            .await
            .map_err(|e| qemu_failed("listening for the incoming migration", e))?;
        self.update(|state| {
            if let Some(tracked) = state.tracked.get_mut(key) {
                tracked.phase = VmPhase::WaitingForReceiver;
            }
        });
        Ok(())
    }

    /// Ends the receiver's QEMU (if any) and removes its directory; the caller holds the lock.
    async fn remove_receiver_locked(
        &self,
        key: &VmKey,
        dir: &VmDir,
    ) -> Result<Option<&'static str>, RuntimeError> {
        let ended = match process::running_pid(dir) {
            Some(pid) => Some(self.end_process(key, dir, pid, Duration::ZERO).await?),
            None => None,
        };
        self.remove_dir_locked(key, dir)?;
        Ok(ended)
    }

    /// Removes a receiver that will not become the VM (the migration failed or was cancelled):
    /// its QEMU is killed and its directory (disks, sockets, marker) removed. Refuses a VM that
    /// is not a receiver (any more): after `finish_receiver` the VM lives here.
    #[tracing::instrument(skip(self))]
    pub async fn abort_receiver(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<String, RuntimeError> {
        let key = VmKey::checked(namespace, name)?;
        let dir = self.dir(&key);
        let _vm_lock = self.lock_vm(&key).await?;
        let precondition = |migration_id: &str, detail: String| RuntimeError::Migration {
            vm: key.to_string(),
            migration_id: migration_id.to_owned(),
            kind: MigrationFailure::Precondition,
            detail,
        };
        let migration_id = match read_marker(&dir) {
            Ok(Some(marker)) if marker.role == Role::Receiver => marker.migration_id,
            Ok(Some(marker)) => {
                return Err(precondition(
                    &marker.migration_id,
                    "it is the sending side here; cancel the send instead".into(),
                ))
            }
            Ok(None) if !dir.path.exists() => {
                return Ok(format!("no receiver of {key} is here; nothing to remove"))
            }
            Ok(None) => {
                return Err(precondition(
                    "-",
                    "it is not a migration receiver (a normal VM, or its switchover already happened); delete it if it should go".into(),
                ))
            }
            // An unreadable marker without a declaration is still a receiver's leftover.
            Err(problem) if !dir.spec_file().exists() => {
                tracing::warn!(%problem, "removing a receiver with an unreadable marker");
                "unknown".into()
            }
            Err(problem) => return Err(precondition("unknown", problem)),
        };
        let ended = self.remove_receiver_locked(&key, &dir).await?;
        tracing::info!(migration = %migration_id, "receiver removed");
        Ok(format!(
            "removed the receiver of {key} for migration {migration_id} ({}) with its disks",
            ended.unwrap_or("its QEMU had already exited")
        ))
    }

    /// The switchover on the target: waits (bounded) until the incoming migration is complete,
    /// stops the NBD server, resumes the guest and makes the receiver a normal VM (run strategy
    /// Always). Call it only after `send` succeeded on the source.
    #[tracing::instrument(skip(self))]
    pub async fn finish_receiver(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<String, RuntimeError> {
        let key = VmKey::checked(namespace, name)?;
        let dir = self.dir(&key);
        let _vm_lock = self.lock_vm(&key).await?;
        let marker = match read_marker(&dir) {
            Ok(Some(marker)) if marker.role == Role::Receiver => marker,
            Ok(_) => {
                return Err(RuntimeError::Migration {
                    vm: key.to_string(),
                    migration_id: "-".into(),
                    kind: MigrationFailure::Precondition,
                    detail: "it is not a migration receiver here".into(),
                })
            }
            Err(problem) => {
                return Err(RuntimeError::Migration {
                    vm: key.to_string(),
                    migration_id: "unknown".into(),
                    kind: MigrationFailure::Precondition,
                    detail: problem,
                })
            }
        };
        let failed = |kind: MigrationFailure, detail: String| RuntimeError::Migration {
            vm: key.to_string(),
            migration_id: marker.migration_id.clone(),
            kind,
            detail,
        };
        let socket = dir.qmp_socket();
        let gone = || {
            failed(
                MigrationFailure::TransferFailed,
                "its QEMU is not running: the incoming migration failed; abort the receiver and resume the source".into(),
            )
        };
        if process::running_pid(&dir).is_none() {
            return Err(gone());
        }
        let status = commands::query_status(&socket)
            .await
            .map_err(|e| failed(MigrationFailure::Qemu, format!("reading its state: {e}")))?
            .status;
        // Running already: an earlier finish resumed it and then stopped short of the bookkeeping.
        if status != RunState::running {
            let deadline = Instant::now() + RECEIVE_COMPLETION_TIMEOUT;
            loop {
                let info = match commands::query_migrate(&socket).await {
                    Ok(info) => info,
                    Err(_) if process::running_pid(&dir).is_none() => return Err(gone()),
                    Err(e) => {
                        return Err(failed(
                            MigrationFailure::Qemu,
                            format!("asking for the incoming migration's state: {e}"),
                        ))
                    }
                };
                match info.status {
                    Some(MigrationStatus::completed) => break,
                    Some(MigrationStatus::failed) => {
                        return Err(failed(
                            MigrationFailure::TransferFailed,
                            format!(
                                "the incoming migration failed: {}; abort the receiver and resume the source",
                                info.error_desc.unwrap_or_else(|| "QEMU gave no reason".into())
                            ),
                        ))
                    }
                    _ => {}
                }
                if Instant::now() >= deadline {
                    return Err(failed(
                        MigrationFailure::TimedOut,
                        format!(
                            "the incoming migration is not complete after {RECEIVE_COMPLETION_TIMEOUT:?} (state {:?}); the source has not finished sending",
                            info.status
                        ),
                    ));
                }
                // The guest is stopped until this loop ends.
                tokio::time::sleep(SWITCHOVER_POLL).await;
            }
            if let Err(e) = commands::nbd_server_stop(&socket).await {
                tracing::warn!(error = %e, "stopping the NBD server failed; resuming anyway");
            }
            commands::cont(&socket)
                .await
                .map_err(|e| failed(MigrationFailure::Qemu, format!("resuming the guest: {e}")))?;
        }
        let spec = self.become_normal_vm(&key, &dir, &marker)?;
        self.refresh_locked(&key, &dir).await;
        tracing::info!(migration = %marker.migration_id, "switchover done; the VM runs here");
        Ok(format!(
            "virtual machine {key} runs here now (migration {}, run strategy {:?})",
            marker.migration_id, spec.run_strategy
        ))
    }

    /// The receiver's declaration becomes `vm.json` (run strategy Always), then the marker goes.
    pub(super) fn become_normal_vm(
        &self,
        key: &VmKey,
        dir: &VmDir,
        marker: &Marker,
    ) -> Result<VmSpec, RuntimeError> {
        let io_error = |action, path: PathBuf| {
            let vm = key.to_string();
            move |source| RuntimeError::Io {
                vm,
                action,
                path,
                source,
            }
        };
        let mut spec = match (layout::read_spec(dir, key), &marker.spec) {
            (Ok(Some(spec)), _) => spec,
            (_, Some(spec)) => spec.clone(),
            (_, None) => {
                return Err(RuntimeError::Migration {
                    vm: key.to_string(),
                    migration_id: marker.migration_id.clone(),
                    kind: MigrationFailure::Precondition,
                    detail: format!("{} carries no VM spec", marker_file(dir).display()),
                })
            }
        };
        spec.run_strategy = RunStrategy::Always;
        layout::write_spec(dir, &spec).map_err(io_error("cannot write", dir.spec_file()))?;
        remove_marker(dir).map_err(io_error("cannot remove", marker_file(dir)))?;
        let uid = layout::ensure_uid(dir).map_err(io_error("cannot write", dir.uid_file()))?;
        self.update(|state| {
            let tracked = state
                .tracked
                .entry(key.clone())
                .or_insert_with(|| TrackedVm::new(spec.clone(), uid));
            tracked.spec = spec.clone();
        });
        Ok(spec)
    }
}
