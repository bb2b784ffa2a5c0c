//! Runtimes: what actually runs a cluster's VMs. Each one reports inventory (`InventorySource`)
//! and carries out the hub's commands: VM lifecycle here, migrations through the agent's
//! migration controller (`QemuAgent`).

pub mod qemu;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use drover_shared::commands::{AgentCommand, CommandOutcome};

use crate::commands::CommandHandler;

/// VM lifecycle commands on the qemu runtime.
async fn lifecycle(runtime: &qemu::QemuRuntime, command: AgentCommand) -> CommandOutcome {
    let result = match command {
        AgentCommand::CreateVm { spec } => runtime.create_vm(spec).await,
        AgentCommand::StartVm { namespace, name } => runtime.start_vm(&namespace, &name).await,
        AgentCommand::StopVm {
            namespace,
            name,
            grace_period_secs,
        } => {
            runtime
                .stop_vm(
                    &namespace,
                    &name,
                    Duration::from_secs(grace_period_secs as u64),
                )
                .await
        }
        AgentCommand::DeleteVm { namespace, name } => runtime.delete_vm(&namespace, &name).await,
        other => {
            return CommandOutcome::Failed {
                reason: format!("{} is not a lifecycle command", other.kind()),
            }
        }
    };
    match result {
        Ok(message) => CommandOutcome::Succeeded { message },
        Err(e) => CommandOutcome::Failed {
            reason: e.to_string(),
        },
    }
}

impl CommandHandler for qemu::QemuRuntime {
    fn execute(
        &self,
        command: AgentCommand,
    ) -> Pin<Box<dyn Future<Output = CommandOutcome> + Send + '_>> {
        Box::pin(lifecycle(self, command))
    }
}

/// The qemu runtime's migration steps, for the agent's migration controller.
pub struct QemuMigrations {
    pub runtime: std::sync::Arc<qemu::QemuRuntime>,
    /// `<data_dir>/vms`, where declared specs live.
    pub vms_dir: std::path::PathBuf,
}

impl crate::migrate::MigrationRuntime for QemuMigrations {
    fn vm_spec(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<drover_shared::commands::VmSpec, String> {
        let path = self.vms_dir.join(namespace).join(name).join("vm.json");
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("no virtual machine {namespace}/{name} here ({e})"))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{} is unreadable: {e}", path.display()))
    }

    fn has_vm(&self, namespace: &str, name: &str) -> bool {
        self.vms_dir.join(namespace).join(name).exists()
    }

    fn receiver_of(&self, migration: drover_shared::MigrationId) -> Option<(String, String)> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Marker {
            migration_id: String,
            role: String,
        }
        let wanted = migration.to_string();
        for ns in std::fs::read_dir(&self.vms_dir).ok()?.flatten() {
            for vm in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let Ok(bytes) = std::fs::read(vm.path().join("migration.json")) else {
                    continue;
                };
                let Ok(marker) = serde_json::from_slice::<Marker>(&bytes) else {
                    continue;
                };
                if marker.migration_id == wanted && marker.role == "receiver" {
                    return Some((
                        ns.file_name().to_string_lossy().into_owned(),
                        vm.file_name().to_string_lossy().into_owned(),
                    ));
                }
            }
        }
        None
    }

    async fn prepare_receiver(
        &self,
        spec: drover_shared::commands::VmSpec,
        migration: drover_shared::MigrationId,
    ) -> Result<crate::sync::ReceiverSockets, String> {
        let endpoints = self
            .runtime
            .prepare_receiver(spec, &migration.to_string())
            .await
            .map_err(|e| e.to_string())?;
        Ok(crate::sync::ReceiverSockets {
            disk: endpoints.nbd_socket,
            memory: endpoints.migration_socket,
        })
    }

    async fn send(
        &self,
        namespace: &str,
        name: &str,
        migration: drover_shared::MigrationId,
        disk_socket: std::path::PathBuf,
        memory_socket: std::path::PathBuf,
        options: drover_shared::migration::MigrationOptions,
        progress: Box<dyn Fn(drover_shared::migration::MigrationProgress) + Send + Sync>,
    ) -> Result<crate::migrate::SendReport, String> {
        let spec = self.vm_spec(namespace, name)?;
        let disk_bytes: u64 = spec.disks.iter().map(|d| d.size_bytes).sum();
        let completion = options.completion_timeout(spec.memory_bytes + disk_bytes);
        let send_options = qemu::SendOptions {
            nbd_socket: disk_socket,
            migration_socket: memory_socket,
            bandwidth_bytes_per_sec: options.bandwidth_bytes_per_sec,
            allow_auto_converge: options.allow_auto_converge,
            allow_post_copy: options.allow_post_copy,
            completion_timeout: completion,
            progress_timeout: Duration::from_secs(options.progress_timeout_secs.max(1) as u64),
        };
        let outcome = self
            .runtime
            .send(
                namespace,
                name,
                &migration.to_string(),
                send_options,
                move |p: qemu::MigrationProgress| {
                    progress(drover_shared::migration::MigrationProgress {
                        bytes_total: p.total_bytes,
                        bytes_transferred: p.transferred_bytes,
                        bytes_remaining: p.remaining_bytes,
                        dirty_rate_bytes_per_sec: p.dirty_rate_bytes_per_sec,
                        throughput_bytes_per_sec: p.throughput_bytes_per_sec,
                    })
                },
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(crate::migrate::SendReport {
            downtime_ms: outcome.downtime_ms,
            total_ms: outcome.total_time_ms,
            bytes: outcome.bytes,
            disk_bytes: outcome.disk_bytes,
            disk_ms: outcome.disk_time_ms,
            completed_at: outcome.completed_at.into_std(),
        })
    }

    async fn cancel_send(&self, namespace: &str, name: &str) {
        if let Err(e) = self.runtime.cancel_send(namespace, name).await {
            tracing::warn!(vm = %format!("{namespace}/{name}"), error = %e, "cancelling the send");
        }
    }

    async fn finish_receiver(&self, namespace: &str, name: &str) -> Result<(), String> {
        self.runtime
            .finish_receiver(namespace, name)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn finish_sender(&self, namespace: &str, name: &str) -> Result<(), String> {
        self.runtime
            .finish_sender(namespace, name)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn resume_sender(&self, namespace: &str, name: &str) -> Result<(), String> {
        self.runtime
            .resume_sender(namespace, name)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn abort_receiver(&self, namespace: &str, name: &str) {
        if let Err(e) = self.runtime.abort_receiver(namespace, name).await {
            tracing::warn!(vm = %format!("{namespace}/{name}"), error = %e, "removing the receiving side");
        }
    }
}

/// The agent's command handler on the qemu runtime: lifecycle on the runtime, migrations
/// through the migration controller.
pub struct QemuAgent {
    pub runtime: std::sync::Arc<qemu::QemuRuntime>,
    pub migrations: std::sync::Arc<crate::migrate::MigrationController<QemuMigrations>>,
}

impl CommandHandler for QemuAgent {
    fn execute(
        &self,
        command: AgentCommand,
    ) -> Pin<Box<dyn Future<Output = CommandOutcome> + Send + '_>> {
        Box::pin(async move {
            match command {
                AgentCommand::PrepareReceiver {
                    migration_id,
                    source_cluster,
                    namespace,
                    name,
                    trace_parent,
                } => {
                    self.migrations
                        .prepare_receiver(
                            migration_id,
                            source_cluster,
                            namespace,
                            name,
                            trace_parent,
                        )
                        .await
                }
                AgentCommand::SendVm {
                    migration_id,
                    namespace,
                    name,
                    target_cluster,
                    target_namespace,
                    connect_url,
                    options,
                    trace_parent,
                } => {
                    self.migrations
                        .send(
                            migration_id,
                            namespace,
                            name,
                            target_cluster,
                            target_namespace,
                            connect_url,
                            options,
                            trace_parent,
                        )
                        .await
                }
                AgentCommand::CancelMigration {
                    migration_id,
                    trace_parent,
                } => self.migrations.cancel(migration_id, trace_parent).await,
                lifecycle_command => lifecycle(&self.runtime, lifecycle_command).await,
            }
        })
    }
}
