//! What the runtime's monitor does with VMs that take part in a migration: it reports them but
//! never starts them, and after an agent restart it finishes an interrupted switchover or undoes
//! an interrupted send.

use drover_shared::inventory::VmPhase;
use qapi::qmp::RunState;
use tokio::time::Instant;

use super::super::layout::{self, VmDir, VmKey};
use super::super::state::TrackedVm;
use super::super::{process, QemuRuntime};
use super::commands;
use super::sender::abort_transfer;
use super::{read_marker, remove_marker, Role};

impl QemuRuntime {
    /// The monitor's pass over a VM with a migration marker; the caller holds its lock. Such a
    /// VM is never started by the monitor. Returns false when the VM turns out not to be
    /// migrating (any more), so that the usual handling applies.
    pub(in crate::runtime::qemu) async fn reconcile_migration(
        &self,
        key: &VmKey,
        dir: &VmDir,
    ) -> bool {
        let marker = match read_marker(dir) {
            Ok(Some(marker)) => marker,
            Ok(None) => return false,
            Err(problem) => {
                tracing::warn!(vm = %key, %problem, "ignoring an unreadable migration marker");
                return false;
            }
        };
        let pid = process::running_pid(dir);
        let status = match pid {
            Some(_) => commands::query_status(&dir.qmp_socket())
                .await
                .ok()
                .map(|s| s.status),
            None => None,
        };
        match marker.role {
            Role::Receiver => {
                let Some(spec) = marker.spec.clone() else {
                    return false;
                };
                if status == Some(RunState::running) {
                    // The guest was resumed by `finish_receiver`, which stopped before its
                    // bookkeeping: the switchover happened, finish it.
                    match self.become_normal_vm(key, dir, &marker) {
                        Ok(_) => {
                            tracing::info!(vm = %key, migration = %marker.migration_id, "completed an interrupted switchover")
                        }
                        Err(e) => {
                            tracing::error!(vm = %key, error = %e, "cannot complete an interrupted switchover")
                        }
                    }
                    return false;
                }
                let Ok(uid) = layout::ensure_uid(dir) else {
                    return true;
                };
                let now = Instant::now();
                self.update(|state| {
                    let tracked = state
                        .tracked
                        .entry(key.clone())
                        .or_insert_with(|| TrackedVm::new(spec.clone(), uid));
                    tracked.spec = spec.clone();
                    if tracked.pid.is_some() && pid.is_none() {
                        tracing::warn!(vm = %key, migration = %marker.migration_id, "the receiving QEMU exited (its incoming migration failed or was cancelled); abort the receiver");
                    }
                    if pid.is_some() && tracked.running_since.is_none() {
                        tracked.running_since = Some(now);
                    }
                    tracked.pid = pid;
                    tracked.phase = if pid.is_some() {
                        VmPhase::WaitingForReceiver
                    } else {
                        VmPhase::Failed
                    };
                });
                true
            }
            Role::Sender => {
                let Ok(Some(spec)) = layout::read_spec(dir, key) else {
                    return false;
                };
                // No send runs (this pass holds the VM's lock): a sender whose QEMU did not
                // complete the migration is what an interrupted send left behind.
                if matches!(
                    status,
                    Some(RunState::running | RunState::paused | RunState::finish_migrate)
                ) {
                    let disks: Vec<String> = spec.disks.iter().map(|d| d.name.clone()).collect();
                    let was_running = status != Some(RunState::paused);
                    let problems = abort_transfer(&dir.qmp_socket(), &disks, was_running).await;
                    if problems.is_empty() {
                        let _ = remove_marker(dir);
                        tracing::warn!(vm = %key, migration = %marker.migration_id, "undid an interrupted send; the VM keeps running here");
                        return false;
                    }
                    tracing::error!(vm = %key, problems = %problems.join("; "), "cannot undo an interrupted send");
                }
                if let Ok(uid) = layout::ensure_uid(dir) {
                    self.update(|state| {
                        let tracked = state
                            .tracked
                            .entry(key.clone())
                            .or_insert_with(|| TrackedVm::new(spec.clone(), uid));
                        tracked.spec = spec.clone();
                    });
                }
                self.refresh_locked(key, dir).await;
                if pid.is_none() {
                    self.update(|state| {
                        if let Some(tracked) = state.tracked.get_mut(key) {
                            // Not restarted: the target may run it now.
                            tracked.phase = VmPhase::Migrating;
                        }
                    });
                }
                true
            }
        }
    }
}
