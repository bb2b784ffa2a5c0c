//! Hub -> agent commands: what the hub can ask an agent to do, and what the agent answers. Each
//! command travels with an idempotency key; the agent runs a key at most once and answers a
//! repeat with the recorded outcome, so the hub may re-send until it hears back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ClusterName, MigrationId};
use crate::inventory::{Disk, Interface, RunStrategy, VmInfo, VmPhase};
use crate::migration::MigrationOptions;

/// The longest idempotency key the hub accepts.
pub const MAX_KEY_LEN: usize = 200;

/// A disk of a VM to create: a blank qcow2 image of `size_bytes`, or a copy of `image`
/// (a file on the agent's host) grown to `size_bytes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskSpec {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// Direct kernel boot (the demo/test guest boots this way); without it a VM boots its first disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootSpec {
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: String,
}

/// A VM as an operator declares it: in the agent's data dir, or in a create command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSpec {
    pub namespace: String,
    pub name: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Always: keep it running; Halted: keep it stopped; Manual: leave it as it is.
    #[serde(default = "always")]
    pub run_strategy: RunStrategy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootSpec>,
}

fn always() -> RunStrategy {
    RunStrategy::Always
}

impl VmSpec {
    /// The inventory record this spec describes, in `phase`.
    pub fn to_info(&self, uid: &str, phase: VmPhase, node: Option<String>) -> VmInfo {
        VmInfo {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            uid: uid.to_owned(),
            run_strategy: self.run_strategy,
            phase,
            node,
            memory_bytes: self.memory_bytes,
            vcpus: self.vcpus,
            disks: self
                .disks
                .iter()
                .map(|d| Disk {
                    name: d.name.clone(),
                    size_bytes: d.size_bytes,
                    storage_class: "qcow2".into(),
                    access_mode: "ReadWriteOnce".into(),
                })
                .collect(),
            interfaces: self.interfaces.clone(),
            labels: self.labels.clone(),
            migratable: true,
            non_migratable_reasons: Vec::new(),
            generation: 0,
        }
    }

    /// Everything wrong with this spec, as one message (names, sizes, MACs, run strategy).
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = self.to_info("spec", VmPhase::Stopped, None).problems();
        if !matches!(
            self.run_strategy,
            RunStrategy::Always | RunStrategy::Halted | RunStrategy::Manual
        ) {
            problems.push(format!(
                "run strategy {:?} is not one of Always, Halted, Manual",
                self.run_strategy
            ));
        }
        for d in &self.disks {
            if d.name.is_empty()
                || !d
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(format!(
                    "disk name {:?} must be letters, digits, '-' or '_'",
                    d.name
                ));
            }
        }
        for i in &self.interfaces {
            if i.name.is_empty()
                || !i
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                problems.push(format!(
                    "interface name {:?} must be letters, digits, '-' or '_'",
                    i.name
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "virtual machine {}/{}: {}",
                self.namespace,
                self.name,
                problems.join("; ")
            ))
        }
    }
}

/// What the hub asks an agent to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum AgentCommand {
    /// Create a VM (and start it unless its run strategy is Halted).
    #[serde(rename_all = "camelCase")]
    CreateVm { spec: VmSpec },
    /// Start a stopped VM and keep it running (run strategy Always).
    #[serde(rename_all = "camelCase")]
    StartVm { namespace: String, name: String },
    /// Shut a VM down (ACPI, then forcibly after the grace period) and keep it stopped.
    #[serde(rename_all = "camelCase")]
    StopVm {
        namespace: String,
        name: String,
        grace_period_secs: u32,
    },
    /// Stop a VM and remove it with its disks.
    #[serde(rename_all = "camelCase")]
    DeleteVm { namespace: String, name: String },
    /// Target side of a migration: the sync endpoint starts expecting `source_cluster` for this
    /// id and the VM's name is reserved. The sender describes the VM's hardware over the sync
    /// channel; the receiving VM (blank volumes of the same sizes, QEMU waiting for the
    /// migration stream) is created then. Succeeds when the target is ready (TargetReady).
    #[serde(rename_all = "camelCase")]
    PrepareReceiver {
        migration_id: MigrationId,
        source_cluster: ClusterName,
        namespace: String,
        name: String,
        /// W3C traceparent of the hub's span this work belongs to (one trace per migration).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace_parent: Option<String>,
    },
    /// Source side: connect to the target's sync endpoint, move disk then memory through the
    /// agents' TLS tunnel, switch over. Succeeds when the VM runs on the target.
    #[serde(rename_all = "camelCase")]
    SendVm {
        migration_id: MigrationId,
        namespace: String,
        name: String,
        target_cluster: ClusterName,
        target_namespace: String,
        connect_url: String,
        options: MigrationOptions,
        /// W3C traceparent of the hub's span this work belongs to (one trace per migration).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace_parent: Option<String>,
    },
    /// Stop a migration before switchover on whichever side this agent is; the source keeps
    /// running and the target side is removed.
    #[serde(rename_all = "camelCase")]
    CancelMigration {
        migration_id: MigrationId,
        /// W3C traceparent of the hub's span this work belongs to (one trace per migration).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace_parent: Option<String>,
    },
}

impl AgentCommand {
    /// A short name for logs, metrics and the hub's command table.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::CreateVm { .. } => "createVm",
            Self::StartVm { .. } => "startVm",
            Self::StopVm { .. } => "stopVm",
            Self::DeleteVm { .. } => "deleteVm",
            Self::PrepareReceiver { .. } => "prepareReceiver",
            Self::SendVm { .. } => "sendVm",
            Self::CancelMigration { .. } => "cancelMigration",
        }
    }
}

/// How a command ended on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum CommandOutcome {
    Succeeded { message: String },
    Failed { reason: String },
}

impl CommandOutcome {
    pub fn succeeded(&self) -> bool {
        matches!(self, Self::Succeeded { .. })
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Succeeded { message } => message,
            Self::Failed { reason } => reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            namespace: "default".into(),
            name: "web-1".into(),
            memory_bytes: 256 << 20,
            vcpus: 1,
            disks: vec![DiskSpec {
                name: "root".into(),
                size_bytes: 64 << 20,
                image: None,
            }],
            interfaces: vec![Interface {
                name: "nic0".into(),
                network: "default".into(),
                mac: "02:00:00:00:00:01".into(),
            }],
            labels: BTreeMap::new(),
            run_strategy: RunStrategy::Always,
            boot: None,
        }
    }

    #[test]
    fn a_good_spec_passes_and_bad_ones_say_what_is_wrong() {
        spec().validate().unwrap();
        let mut bad = spec();
        bad.name = "Web_1".into();
        bad.interfaces[0].mac = "nope".into();
        bad.disks[0].name = "../etc".into();
        bad.run_strategy = RunStrategy::Once;
        let err = bad.validate().unwrap_err();
        for needle in ["Web_1", "nope", "../etc", "Once"] {
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn commands_are_tagged_json() {
        let cmd = AgentCommand::StopVm {
            namespace: "default".into(),
            name: "web-1".into(),
            grace_period_secs: 30,
        };
        let json = serde_json::to_string(&cmd).unwrap();
        assert!(json.contains("\"kind\":\"stopVm\""), "{json}");
        assert_eq!(serde_json::from_str::<AgentCommand>(&json).unwrap(), cmd);
    }
}
