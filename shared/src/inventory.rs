//! The inventory an agent reports about its cluster: a full snapshot, then deltas. These are the
//! protocol types of the hub's ingest path; `validate` is the one place that decides what is
//! acceptable, so that bad data is refused whole before anything is written.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::ids::{ClusterName, Namespace, VmName};
use crate::labels::check_label;

/// Sizes above these are treated as corrupt input, not as big machines.
pub const MAX_VM_MEMORY_BYTES: u64 = 64 << 40; // 64 TiB
pub const MAX_VM_VCPUS: u32 = 4096;
pub const MAX_DISK_BYTES: u64 = 1 << 50; // 1 PiB
pub const MAX_NODE_MEMORY_BYTES: u64 = 1 << 50;
pub const MAX_NODE_CPU_MILLIS: u64 = 100_000_000; // 100k cores
pub const MAX_BANDWIDTH_BYTES_PER_SEC: u64 = 1 << 40;
pub const MAX_VMS_PER_SNAPSHOT: usize = 100_000;
pub const MAX_NODES_PER_SNAPSHOT: usize = 10_000;
pub const MAX_CHANGES_PER_DELTA: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Kubevirt,
    Qemu,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kubevirt => "kubevirt",
            Self::Qemu => "qemu",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "kubevirt" => Some(Self::Kubevirt),
            "qemu" => Some(Self::Qemu),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClusterHealth {
    Ready,
    Degraded,
    Unreachable,
}

impl ClusterHealth {
    pub const ALL: [Self; 3] = [Self::Ready, Self::Degraded, Self::Unreachable];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Degraded => "Degraded",
            Self::Unreachable => "Unreachable",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.as_str() == s)
    }
}

/// A virtual machine's status as the cluster reports it (KubeVirt's printable status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmPhase {
    Stopped,
    Starting,
    Running,
    Paused,
    Migrating,
    Stopping,
    WaitingForReceiver,
    Failed,
    Unknown,
}

impl VmPhase {
    pub const ALL: [Self; 9] = [
        Self::Stopped,
        Self::Starting,
        Self::Running,
        Self::Paused,
        Self::Migrating,
        Self::Stopping,
        Self::WaitingForReceiver,
        Self::Failed,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "Stopped",
            Self::Starting => "Starting",
            Self::Running => "Running",
            Self::Paused => "Paused",
            Self::Migrating => "Migrating",
            Self::Stopping => "Stopping",
            Self::WaitingForReceiver => "WaitingForReceiver",
            Self::Failed => "Failed",
            Self::Unknown => "Unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// KubeVirt's run strategies, including the receiver's `WaitAsReceiver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunStrategy {
    Always,
    RerunOnFailure,
    Manual,
    Halted,
    Once,
    WaitAsReceiver,
}

impl RunStrategy {
    pub const ALL: [Self; 6] = [
        Self::Always,
        Self::RerunOnFailure,
        Self::Manual,
        Self::Halted,
        Self::Once,
        Self::WaitAsReceiver,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::RerunOnFailure => "RerunOnFailure",
            Self::Manual => "Manual",
            Self::Halted => "Halted",
            Self::Once => "Once",
            Self::WaitAsReceiver => "WaitAsReceiver",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// Phases of a migration, mirroring KubeVirt's VirtualMachineInstanceMigration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MigrationPhase {
    Pending,
    Scheduling,
    Scheduled,
    PreparingTarget,
    TargetReady,
    Running,
    Succeeded,
    Failed,
}

impl MigrationPhase {
    pub const ALL: [Self; 8] = [
        Self::Pending,
        Self::Scheduling,
        Self::Scheduled,
        Self::PreparingTarget,
        Self::TargetReady,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
    ];
    /// Phases in which a migration holds (or is about to hold) resources on both sides.
    pub const IN_FLIGHT: [Self; 5] = [
        Self::Scheduling,
        Self::Scheduled,
        Self::PreparingTarget,
        Self::TargetReady,
        Self::Running,
    ];
    /// Phases of a migration that has not ended: queued (Pending) or in flight.
    pub const NOT_ENDED: [Self; 6] = [
        Self::Pending,
        Self::Scheduling,
        Self::Scheduled,
        Self::PreparingTarget,
        Self::TargetReady,
        Self::Running,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Scheduling => "Scheduling",
            Self::Scheduled => "Scheduled",
            Self::PreparingTarget => "PreparingTarget",
            Self::TargetReady => "TargetReady",
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// A cluster's live-migration limits and tuning, with KubeVirt's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MigrationConfig {
    pub parallel_migrations_per_cluster: u32,
    pub parallel_outbound_migrations_per_node: u32,
    /// Bytes per second; 0 means unlimited.
    pub bandwidth_per_migration: u64,
    /// Seconds per GiB of memory and disk before a migration is aborted.
    pub completion_timeout_per_gib: u32,
    /// Seconds without progress before a migration is aborted.
    pub progress_timeout: u32,
    pub allow_auto_converge: bool,
    pub allow_post_copy: bool,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            parallel_migrations_per_cluster: 5,
            parallel_outbound_migrations_per_node: 2,
            bandwidth_per_migration: 0,
            completion_timeout_per_gib: 150,
            progress_timeout: 150,
            allow_auto_converge: false,
            allow_post_copy: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageClass {
    pub name: String,
    #[serde(default)]
    pub provisioner: String,
    #[serde(default)]
    pub is_default: bool,
}

/// What a cluster says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterInfo {
    pub runtime: RuntimeKind,
    pub platform_version: String,
    pub virtualization_version: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub cpu_models: Vec<String>,
    #[serde(default)]
    pub feature_gates: Vec<String>,
    #[serde(default)]
    pub migration_config: MigrationConfig,
    #[serde(default)]
    pub storage_classes: Vec<StorageClass>,
    #[serde(default)]
    pub networks: Vec<String>,
    #[serde(default)]
    pub sync_endpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub name: String,
    pub cpu_model: String,
    pub allocatable_memory_bytes: u64,
    pub allocatable_cpu_millis: u64,
    #[serde(default)]
    pub requested_memory_bytes: u64,
    #[serde(default)]
    pub requested_cpu_millis: u64,
    #[serde(default = "yes")]
    pub schedulable: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub storage_class: String,
    /// ReadWriteOnce, ReadWriteMany, ReadOnlyMany.
    #[serde(default = "rwo")]
    pub access_mode: String,
}

fn rwo() -> String {
    "ReadWriteOnce".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    pub network: String,
    /// Lowercase colon-separated form, e.g. "02:00:00:ab:cd:ef".
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub run_strategy: RunStrategy,
    pub phase: VmPhase,
    #[serde(default)]
    pub node: Option<String>,
    pub memory_bytes: u64,
    pub vcpus: u32,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "yes")]
    pub migratable: bool,
    /// Why the VM cannot live-migrate (host devices, shareable disk, LUN, virtiofs, ...).
    #[serde(default)]
    pub non_migratable_reasons: Vec<String>,
    /// The VM object's own generation as the cluster reports it.
    #[serde(default)]
    pub generation: u64,
}

/// Everything a cluster has, at one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventorySnapshot {
    pub cluster: ClusterName,
    /// Strictly increasing per cluster; the hub refuses anything not newer than what it has.
    pub generation: u64,
    pub info: ClusterInfo,
    pub nodes: Vec<NodeInfo>,
    pub vms: Vec<VmInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum InventoryChange {
    ClusterUpdated { info: ClusterInfo },
    NodeUpserted { node: NodeInfo },
    NodeRemoved { name: String },
    VmUpserted { vm: VmInfo },
    VmRemoved { namespace: String, name: String },
}

/// Changes since the previous generation, applied all together or not at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryDelta {
    pub cluster: ClusterName,
    pub generation: u64,
    pub changes: Vec<InventoryChange>,
}

/// Everything wrong with a piece of inventory, each problem naming the object it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inventory for cluster {cluster} refused, nothing was written: {}", problems.join("; "))]
pub struct InvalidInventory {
    pub cluster: String,
    pub problems: Vec<String>,
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, p: impl Into<String>) {
        // A flood of problems helps nobody; the first few say what is wrong.
        if self.0.len() < 20 {
            self.0.push(p.into());
        }
    }

    fn check(&mut self, ok: bool, p: impl FnOnce() -> String) {
        if !ok {
            self.push(p());
        }
    }

    fn into_result(self, cluster: &ClusterName) -> Result<(), InvalidInventory> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(InvalidInventory {
                cluster: cluster.to_string(),
                problems: self.0,
            })
        }
    }
}

/// Normalises a MAC address to lowercase colon form, or says why it is not one.
pub fn normalize_mac(mac: &str) -> Result<String, String> {
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(format!(
            "MAC address {mac:?} is not six hex pairs like 02:00:00:ab:cd:ef"
        ));
    }
    Ok(parts.join(":").to_ascii_lowercase())
}

fn check_labels(problems: &mut Problems, owner: &str, labels: &BTreeMap<String, String>) {
    for (k, v) in labels {
        if let Err(e) = check_label(k, v) {
            problems.push(format!("{owner}: {e}"));
        }
    }
}

fn check_free_text(problems: &mut Problems, owner: &str, what: &str, value: &str, max: usize) {
    problems.check(value.len() <= max, || {
        format!("{owner}: {what} is longer than {max} characters")
    });
    problems.check(!value.chars().any(char::is_control), || {
        format!("{owner}: {what} contains control characters")
    });
}

impl ClusterInfo {
    fn check(&self, problems: &mut Problems) {
        check_free_text(
            problems,
            "cluster",
            "platformVersion",
            &self.platform_version,
            64,
        );
        check_free_text(
            problems,
            "cluster",
            "virtualizationVersion",
            &self.virtualization_version,
            64,
        );
        check_labels(problems, "cluster", &self.labels);
        for m in &self.cpu_models {
            check_free_text(problems, "cluster", "CPU model", m, 128);
        }
        for g in &self.feature_gates {
            check_free_text(problems, "cluster", "feature gate", g, 128);
        }
        for n in &self.networks {
            check_free_text(problems, "cluster", "network", n, 253);
        }
        for s in &self.storage_classes {
            check_free_text(problems, "cluster", "storage class", &s.name, 253);
        }
        let mc = &self.migration_config;
        problems.check(
            (1..=1000).contains(&mc.parallel_migrations_per_cluster),
            || {
                format!(
                    "cluster: parallelMigrationsPerCluster {} must be between 1 and 1000",
                    mc.parallel_migrations_per_cluster
                )
            },
        );
        problems.check(
            (1..=100).contains(&mc.parallel_outbound_migrations_per_node),
            || {
                format!(
                    "cluster: parallelOutboundMigrationsPerNode {} must be between 1 and 100",
                    mc.parallel_outbound_migrations_per_node
                )
            },
        );
        problems.check(
            mc.bandwidth_per_migration <= MAX_BANDWIDTH_BYTES_PER_SEC,
            || {
                format!(
                    "cluster: bandwidthPerMigration {} bytes/s is absurd (max {MAX_BANDWIDTH_BYTES_PER_SEC}; 0 means unlimited)",
                    mc.bandwidth_per_migration
                )
            },
        );
        problems.check(
            (1..=86_400).contains(&mc.completion_timeout_per_gib),
            || {
                format!(
                    "cluster: completionTimeoutPerGiB {} must be between 1 and 86400 seconds",
                    mc.completion_timeout_per_gib
                )
            },
        );
        problems.check((1..=86_400).contains(&mc.progress_timeout), || {
            format!(
                "cluster: progressTimeout {} must be between 1 and 86400 seconds",
                mc.progress_timeout
            )
        });
        if let Some(ep) = &self.sync_endpoint {
            check_free_text(problems, "cluster", "syncEndpoint", ep, 2048);
        }
    }
}

impl NodeInfo {
    fn check(&self, problems: &mut Problems) {
        let owner = format!("node {:?}", self.name);
        if let Err(e) = crate::ids::check_dns1123_subdomain("node name", &self.name) {
            problems.push(e.to_string());
        }
        check_free_text(problems, &owner, "cpuModel", &self.cpu_model, 128);
        problems.check(
            self.allocatable_memory_bytes <= MAX_NODE_MEMORY_BYTES,
            || {
                format!(
                    "{owner}: allocatable memory {} bytes is absurd (max {MAX_NODE_MEMORY_BYTES})",
                    self.allocatable_memory_bytes
                )
            },
        );
        problems.check(self.requested_memory_bytes <= MAX_NODE_MEMORY_BYTES, || {
            format!(
                "{owner}: requested memory {} bytes is absurd (max {MAX_NODE_MEMORY_BYTES})",
                self.requested_memory_bytes
            )
        });
        problems.check(self.allocatable_cpu_millis <= MAX_NODE_CPU_MILLIS, || {
            format!(
                "{owner}: allocatable CPU {} millicores is absurd (max {MAX_NODE_CPU_MILLIS})",
                self.allocatable_cpu_millis
            )
        });
        problems.check(self.requested_cpu_millis <= MAX_NODE_CPU_MILLIS, || {
            format!(
                "{owner}: requested CPU {} millicores is absurd (max {MAX_NODE_CPU_MILLIS})",
                self.requested_cpu_millis
            )
        });
        check_labels(problems, &owner, &self.labels);
    }
}

impl VmInfo {
    /// Everything wrong with this one VM (empty when it is acceptable).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Problems(Vec::new());
        self.check(&mut problems);
        problems.0
    }

    fn check(&self, problems: &mut Problems) {
        let owner = format!("virtual machine {}/{}", self.namespace, self.name);
        if let Err(e) = Namespace::new(self.namespace.clone()) {
            problems.push(e.to_string());
        }
        if let Err(e) = VmName::new(self.name.clone()) {
            problems.push(e.to_string());
        }
        check_free_text(problems, &owner, "uid", &self.uid, 128);
        problems.check(!self.uid.is_empty(), || format!("{owner}: uid is empty"));
        problems.check(
            self.memory_bytes > 0 && self.memory_bytes <= MAX_VM_MEMORY_BYTES,
            || {
                format!(
                    "{owner}: memory {} bytes must be between 1 and {MAX_VM_MEMORY_BYTES}",
                    self.memory_bytes
                )
            },
        );
        problems.check(self.vcpus > 0 && self.vcpus <= MAX_VM_VCPUS, || {
            format!(
                "{owner}: vcpus {} must be between 1 and {MAX_VM_VCPUS}",
                self.vcpus
            )
        });
        problems.check(self.generation <= i64::MAX as u64, || {
            format!("{owner}: generation {} is out of range", self.generation)
        });
        if let Some(node) = &self.node {
            if let Err(e) = crate::ids::check_dns1123_subdomain("node name", node) {
                problems.push(format!("{owner}: {e}"));
            }
        }
        let mut disk_names = HashSet::new();
        for d in &self.disks {
            problems.check(disk_names.insert(d.name.as_str()), || {
                format!("{owner}: disk {:?} appears twice", d.name)
            });
            check_free_text(problems, &owner, "disk name", &d.name, 253);
            check_free_text(problems, &owner, "storage class", &d.storage_class, 253);
            problems.check(d.size_bytes > 0 && d.size_bytes <= MAX_DISK_BYTES, || {
                format!(
                    "{owner}: disk {:?} size {} bytes must be between 1 and {MAX_DISK_BYTES}",
                    d.name, d.size_bytes
                )
            });
            problems.check(
                matches!(
                    d.access_mode.as_str(),
                    "ReadWriteOnce" | "ReadWriteMany" | "ReadOnlyMany" | "ReadWriteOncePod"
                ),
                || {
                    format!(
                        "{owner}: disk {:?} access mode {:?} is not ReadWriteOnce, ReadWriteMany, ReadOnlyMany or ReadWriteOncePod",
                        d.name, d.access_mode
                    )
                },
            );
        }
        let mut macs = HashSet::new();
        for i in &self.interfaces {
            check_free_text(problems, &owner, "interface name", &i.name, 253);
            check_free_text(problems, &owner, "network", &i.network, 253);
            match normalize_mac(&i.mac) {
                Ok(mac) => problems.check(macs.insert(mac), || {
                    format!("{owner}: MAC address {} appears twice", i.mac)
                }),
                Err(e) => problems.push(format!("{owner}: {e}")),
            }
        }
        for r in &self.non_migratable_reasons {
            check_free_text(problems, &owner, "non-migratable reason", r, 1024);
        }
        check_labels(problems, &owner, &self.labels);
    }
}

impl InventorySnapshot {
    /// Refuses the whole snapshot if any part of it is wrong.
    pub fn validate(&self) -> Result<(), InvalidInventory> {
        let mut problems = Problems::default();
        problems.check(self.generation <= i64::MAX as u64, || {
            format!("generation {} is out of range", self.generation)
        });
        problems.check(self.nodes.len() <= MAX_NODES_PER_SNAPSHOT, || {
            format!(
                "{} nodes exceed the limit of {MAX_NODES_PER_SNAPSHOT} per snapshot",
                self.nodes.len()
            )
        });
        problems.check(self.vms.len() <= MAX_VMS_PER_SNAPSHOT, || {
            format!(
                "{} virtual machines exceed the limit of {MAX_VMS_PER_SNAPSHOT} per snapshot",
                self.vms.len()
            )
        });
        self.info.check(&mut problems);
        let mut node_names = HashSet::new();
        for n in &self.nodes {
            n.check(&mut problems);
            problems.check(node_names.insert(n.name.as_str()), || {
                format!("node {:?} appears twice", n.name)
            });
        }
        let mut vm_names = HashSet::new();
        let mut macs = HashSet::new();
        for vm in &self.vms {
            vm.check(&mut problems);
            problems.check(
                vm_names.insert((vm.namespace.as_str(), vm.name.as_str())),
                || format!("virtual machine {}/{} appears twice", vm.namespace, vm.name),
            );
            for i in &vm.interfaces {
                if let Ok(mac) = normalize_mac(&i.mac) {
                    problems.check(macs.insert(mac), || {
                        format!(
                            "virtual machine {}/{}: MAC address {} is already used by another virtual machine in this snapshot",
                            vm.namespace, vm.name, i.mac
                        )
                    });
                }
            }
        }
        problems.into_result(&self.cluster)
    }
}

impl InventoryDelta {
    pub fn validate(&self) -> Result<(), InvalidInventory> {
        let mut problems = Problems::default();
        problems.check(self.generation <= i64::MAX as u64, || {
            format!("generation {} is out of range", self.generation)
        });
        problems.check(!self.changes.is_empty(), || "delta has no changes".into());
        problems.check(self.changes.len() <= MAX_CHANGES_PER_DELTA, || {
            format!(
                "{} changes exceed the limit of {MAX_CHANGES_PER_DELTA} per delta",
                self.changes.len()
            )
        });
        for c in &self.changes {
            match c {
                InventoryChange::ClusterUpdated { info } => info.check(&mut problems),
                InventoryChange::NodeUpserted { node } => node.check(&mut problems),
                InventoryChange::NodeRemoved { name } => {
                    if let Err(e) = crate::ids::check_dns1123_subdomain("node name", name) {
                        problems.push(e.to_string());
                    }
                }
                InventoryChange::VmUpserted { vm } => vm.check(&mut problems),
                InventoryChange::VmRemoved { namespace, name } => {
                    if let Err(e) = Namespace::new(namespace.clone()) {
                        problems.push(e.to_string());
                    }
                    if let Err(e) = VmName::new(name.clone()) {
                        problems.push(e.to_string());
                    }
                }
            }
        }
        problems.into_result(&self.cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, mac: &str) -> VmInfo {
        VmInfo {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            run_strategy: RunStrategy::Always,
            phase: VmPhase::Running,
            node: Some("node-1".into()),
            memory_bytes: 1 << 30,
            vcpus: 2,
            disks: vec![Disk {
                name: "root".into(),
                size_bytes: 10 << 30,
                storage_class: "standard".into(),
                access_mode: "ReadWriteOnce".into(),
            }],
            interfaces: vec![Interface {
                name: "default".into(),
                network: "pod".into(),
                mac: mac.into(),
            }],
            labels: BTreeMap::from([("app".into(), "web".into())]),
            migratable: true,
            non_migratable_reasons: vec![],
            generation: 1,
        }
    }

    fn snapshot(vms: Vec<VmInfo>) -> InventorySnapshot {
        InventorySnapshot {
            cluster: ClusterName::new("east-2").unwrap(),
            generation: 1,
            info: ClusterInfo {
                runtime: RuntimeKind::Kubevirt,
                platform_version: "4.20.3".into(),
                virtualization_version: "1.6.0".into(),
                labels: BTreeMap::new(),
                cpu_models: vec!["Skylake-Server".into()],
                feature_gates: vec!["DecentralizedLiveMigration".into()],
                migration_config: MigrationConfig::default(),
                storage_classes: vec![],
                networks: vec![],
                sync_endpoint: None,
            },
            nodes: vec![],
            vms,
        }
    }

    #[test]
    fn a_sound_snapshot_passes() {
        snapshot(vec![
            vm("a", "02:00:00:00:00:01"),
            vm("b", "02:00:00:00:00:02"),
        ])
        .validate()
        .unwrap();
    }

    #[test]
    fn absurd_sizes_and_duplicates_are_named() {
        let mut big = vm("big", "02:00:00:00:00:01");
        big.memory_bytes = u64::MAX;
        big.disks[0].size_bytes = 0;
        let dup = vm("dup", "02:00:00:00:00:01");
        let err = snapshot(vec![big, dup.clone(), dup])
            .validate()
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("default/big: memory"), "{text}");
        assert!(text.contains("disk \"root\" size 0"), "{text}");
        assert!(text.contains("default/dup appears twice"), "{text}");
        assert!(text.contains("already used by another"), "{text}");
        assert!(text.contains("nothing was written"), "{text}");
    }

    #[test]
    fn negative_sizes_do_not_deserialize() {
        let json = serde_json::json!({"namespace":"a","name":"b","uid":"u","runStrategy":"Always",
            "phase":"Running","memoryBytes":-1,"vcpus":1});
        let err = serde_json::from_value::<VmInfo>(json).unwrap_err();
        assert!(
            err.to_string().contains("invalid value: integer `-1`"),
            "{err}"
        );
    }

    #[test]
    fn macs_are_normalised() {
        assert_eq!(
            normalize_mac("02-00-00-AB-CD-EF").unwrap(),
            "02:00:00:ab:cd:ef"
        );
        assert!(normalize_mac("02:00:00:ab:cd").is_err());
        assert!(normalize_mac("zz:00:00:ab:cd:ef").is_err());
    }

    #[test]
    fn migration_config_defaults_match_kubevirt() {
        let c: MigrationConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.parallel_migrations_per_cluster, 5);
        assert_eq!(c.parallel_outbound_migrations_per_node, 2);
        assert_eq!(c.bandwidth_per_migration, 0);
        assert_eq!(c.completion_timeout_per_gib, 150);
        assert_eq!(c.progress_timeout, 150);
        assert!(!c.allow_auto_converge && !c.allow_post_copy);
    }
}
