//! VM lifecycle mutations for admins (`createVirtualMachine`, `startVirtualMachine`,
//! `stopVirtualMachine`, `deleteVirtualMachine`) and `agentCommand`: each becomes a durable
//! hub -> agent command with an idempotency key, and answers with that command's outcome.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::{Context, Enum, InputObject, Object, Result, SimpleObject};
use chrono::{DateTime, Utc};
use drover_shared::commands::{AgentCommand, BootSpec, DiskSpec, VmSpec};
use drover_shared::inventory::{normalize_mac, Interface};
use drover_shared::{ClusterName, Namespace, VmName};
use sha2::{Digest, Sha256};

use crate::admin::{CommandProgress, CommandRecord, FleetAdmin};
use crate::error::ApiError;
use crate::schema::{Long, RunStrategy};

/// Longest a mutation waits for the agent's answer before returning the command as PENDING.
const MAX_WAIT_SECONDS: i32 = 300;

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum CommandState {
    /// Stored on the hub; the agent has not answered yet (it gets it when it next connects).
    Pending,
    Succeeded,
    Failed,
}

/// A command the hub sent (or will send) to a cluster's agent.
#[derive(SimpleObject)]
pub struct AgentCommandStatus {
    pub cluster: String,
    /// The idempotency key: repeat a mutation with it and you get this command, not a second one.
    pub idempotency_key: String,
    pub kind: String,
    pub state: CommandState,
    /// What the agent said: its result, or why it failed.
    pub message: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    /// How many times the hub has sent it (re-sent until acknowledged).
    pub send_count: i32,
    pub acknowledged_at: Option<DateTime<Utc>>,
}

impl From<CommandRecord> for AgentCommandStatus {
    fn from(r: CommandRecord) -> Self {
        Self {
            cluster: r.cluster,
            idempotency_key: r.key,
            kind: r.kind,
            state: match r.state {
                CommandProgress::Pending => CommandState::Pending,
                CommandProgress::Succeeded => CommandState::Succeeded,
                CommandProgress::Failed => CommandState::Failed,
            },
            message: r.message,
            created_by: r.created_by,
            created_at: r.created_at,
            sent_at: r.sent_at,
            send_count: r.send_count,
            acknowledged_at: r.acked_at,
        }
    }
}

#[derive(InputObject)]
pub struct DiskInput {
    /// Letters, digits, '-' and '_'.
    pub name: String,
    pub size_bytes: Long,
    /// A disk image on the agent's host to copy (any format qemu-img reads); blank when absent.
    pub image: Option<String>,
}

#[derive(InputObject)]
pub struct InterfaceInput {
    pub name: String,
    #[graphql(default_with = "String::from(\"default\")")]
    pub network: String,
    /// Left out, the hub derives a stable, locally administered MAC from cluster, VM and NIC.
    pub mac_address: Option<String>,
}

#[derive(InputObject)]
pub struct LabelInput {
    pub key: String,
    pub value: String,
}

/// Direct kernel boot (paths on the agent's host); without it the VM boots its first disk.
#[derive(InputObject)]
pub struct BootInput {
    pub kernel: String,
    pub initrd: Option<String>,
    #[graphql(default)]
    pub cmdline: String,
}

#[derive(InputObject)]
pub struct CreateVirtualMachineInput {
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    pub memory_bytes: Long,
    pub vcpus: i32,
    #[graphql(default)]
    pub disks: Vec<DiskInput>,
    #[graphql(default)]
    pub interfaces: Vec<InterfaceInput>,
    #[graphql(default)]
    pub labels: Vec<LabelInput>,
    /// ALWAYS (start and keep running), HALTED (create stopped) or MANUAL.
    #[graphql(default_with = "RunStrategy::Always")]
    pub run_strategy: RunStrategy,
    pub boot: Option<BootInput>,
    /// Repeat a request with the same key to get the same command, never a second VM.
    pub idempotency_key: Option<String>,
    /// How long to wait for the agent's answer (0..=300); PENDING after that.
    #[graphql(default = 60)]
    pub wait_seconds: i32,
}

/// A stable, locally administered unicast MAC for one NIC of one VM of one cluster.
fn derived_mac(cluster: &str, namespace: &str, name: &str, nic: &str) -> String {
    let digest = Sha256::digest(format!("{cluster}/{namespace}/{name}/{nic}").as_bytes());
    let mut bytes = [0u8; 6];
    bytes[0] = 0x02;
    bytes[1..].copy_from_slice(&digest[..5]);
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn to_u64(what: &str, value: Long) -> Result<u64, ApiError> {
    u64::try_from(value.0)
        .map_err(|_| ApiError::bad_input(format!("{what}: {} must not be negative", value.0)))
}

impl CreateVirtualMachineInput {
    fn into_spec(self, cluster: &ClusterName) -> Result<VmSpec, ApiError> {
        let namespace = Namespace::new(self.namespace)?;
        let name = VmName::new(self.name)?;
        let vcpus = u32::try_from(self.vcpus)
            .map_err(|_| ApiError::bad_input(format!("vcpus: {} must be positive", self.vcpus)))?;
        let mut disks = Vec::with_capacity(self.disks.len());
        for d in self.disks {
            disks.push(DiskSpec {
                size_bytes: to_u64(&format!("disk {:?} sizeBytes", d.name), d.size_bytes)?,
                name: d.name,
                image: d.image,
            });
        }
        let mut interfaces = Vec::with_capacity(self.interfaces.len());
        for i in self.interfaces {
            let mac = match i.mac_address {
                Some(mac) => normalize_mac(&mac)
                    .map_err(|e| ApiError::bad_input(format!("interface {:?}: {e}", i.name)))?,
                None => derived_mac(cluster.as_str(), namespace.as_str(), name.as_str(), &i.name),
            };
            interfaces.push(Interface {
                name: i.name,
                network: i.network,
                mac,
            });
        }
        let labels: BTreeMap<String, String> =
            self.labels.into_iter().map(|l| (l.key, l.value)).collect();
        let spec = VmSpec {
            namespace: namespace.to_string(),
            name: name.to_string(),
            memory_bytes: to_u64("memoryBytes", self.memory_bytes)?,
            vcpus,
            disks,
            interfaces,
            labels,
            run_strategy: self.run_strategy.into(),
            boot: self.boot.map(|b| BootSpec {
                kernel: b.kernel,
                initrd: b.initrd,
                cmdline: b.cmdline,
            }),
        };
        spec.validate().map_err(ApiError::bad_input)?;
        Ok(spec)
    }
}

fn wait_duration(wait_seconds: i32) -> Result<Duration, ApiError> {
    if !(0..=MAX_WAIT_SECONDS).contains(&wait_seconds) {
        return Err(ApiError::bad_input(format!(
            "waitSeconds: {wait_seconds} is outside 0..={MAX_WAIT_SECONDS}"
        )));
    }
    Ok(Duration::from_secs(wait_seconds as u64))
}

async fn run(
    ctx: &Context<'_>,
    cluster: ClusterName,
    key: Option<String>,
    command: AgentCommand,
    wait_seconds: i32,
) -> Result<AgentCommandStatus> {
    let wait = wait_duration(wait_seconds)?;
    let key = key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let admin = ctx.data_unchecked::<Arc<dyn FleetAdmin>>();
    let record = admin
        .run_command(&cluster, &key, command, wait, &crate::access::actor(ctx))
        .await
        .map_err(ApiError::from)?;
    Ok(record.into())
}

/// The VM a start/stop/delete is about, checked.
fn target(
    cluster: String,
    namespace: String,
    name: String,
) -> Result<(ClusterName, String, String), ApiError> {
    let cluster = ClusterName::new(cluster)?;
    let namespace = Namespace::new(namespace)?;
    let name = VmName::new(name)?;
    Ok((cluster, namespace.to_string(), name.to_string()))
}

#[derive(Default)]
pub struct LifecycleMutation;

#[Object]
impl LifecycleMutation {
    /// Creates a VM on a cluster (and starts it unless runStrategy is HALTED), through the
    /// cluster's agent. Answers when the agent has, or after waitSeconds with state PENDING.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Admin)")]
    async fn create_virtual_machine(
        &self,
        ctx: &Context<'_>,
        input: CreateVirtualMachineInput,
    ) -> Result<AgentCommandStatus> {
        let cluster = ClusterName::new(input.cluster.clone()).map_err(ApiError::from)?;
        let key = input.idempotency_key.clone();
        let wait = input.wait_seconds;
        let spec = input.into_spec(&cluster)?;
        run(ctx, cluster, key, AgentCommand::CreateVm { spec }, wait).await
    }

    /// Starts a stopped VM and keeps it running.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Admin)")]
    async fn start_virtual_machine(
        &self,
        ctx: &Context<'_>,
        cluster: String,
        namespace: String,
        name: String,
        idempotency_key: Option<String>,
        #[graphql(default = 60)] wait_seconds: i32,
    ) -> Result<AgentCommandStatus> {
        let (cluster, namespace, name) = target(cluster, namespace, name)?;
        let command = AgentCommand::StartVm { namespace, name };
        run(ctx, cluster, idempotency_key, command, wait_seconds).await
    }

    /// Shuts a VM down (ACPI power button, then forcibly after gracePeriodSeconds) and keeps it
    /// stopped.
    #[allow(clippy::too_many_arguments)]
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Admin)")]
    async fn stop_virtual_machine(
        &self,
        ctx: &Context<'_>,
        cluster: String,
        namespace: String,
        name: String,
        #[graphql(default = 30)] grace_period_seconds: i32,
        idempotency_key: Option<String>,
        #[graphql(default = 60)] wait_seconds: i32,
    ) -> Result<AgentCommandStatus> {
        let (cluster, namespace, name) = target(cluster, namespace, name)?;
        let grace_period_secs = u32::try_from(grace_period_seconds)
            .ok()
            .filter(|g| *g <= 3600)
            .ok_or_else(|| {
                ApiError::bad_input(format!(
                    "gracePeriodSeconds: {grace_period_seconds} is outside 0..=3600"
                ))
            })?;
        let command = AgentCommand::StopVm {
            namespace,
            name,
            grace_period_secs,
        };
        run(ctx, cluster, idempotency_key, command, wait_seconds).await
    }

    /// Stops a VM and deletes it with its disks.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Admin)")]
    async fn delete_virtual_machine(
        &self,
        ctx: &Context<'_>,
        cluster: String,
        namespace: String,
        name: String,
        idempotency_key: Option<String>,
        #[graphql(default = 60)] wait_seconds: i32,
    ) -> Result<AgentCommandStatus> {
        let (cluster, namespace, name) = target(cluster, namespace, name)?;
        let command = AgentCommand::DeleteVm { namespace, name };
        run(ctx, cluster, idempotency_key, command, wait_seconds).await
    }
}

/// Looks a command up by cluster and idempotency key (to follow one that answered PENDING).
pub async fn agent_command(
    ctx: &Context<'_>,
    cluster: String,
    idempotency_key: String,
) -> Result<Option<AgentCommandStatus>> {
    let cluster = ClusterName::new(cluster).map_err(ApiError::from)?;
    let admin = ctx.data_unchecked::<Arc<dyn FleetAdmin>>();
    let record = admin
        .command(&cluster, &idempotency_key)
        .await
        .map_err(ApiError::from)?;
    Ok(record.map(Into::into))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_macs_are_stable_local_unicast_and_distinct() {
        let a = derived_mac("east", "default", "web-1", "nic0");
        assert_eq!(a, derived_mac("east", "default", "web-1", "nic0"));
        assert_ne!(a, derived_mac("east", "default", "web-2", "nic0"));
        assert!(a.starts_with("02:"), "{a}");
        assert_eq!(normalize_mac(&a).unwrap(), a);
    }
}
