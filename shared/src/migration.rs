//! What hub and agents say about a cross-cluster live migration: the options a send runs under,
//! the progress it reports, and the agent-to-agent sync protocol (the hello that opens each
//! tunnelled channel, and the status/cancel/switchover messages on the control channel), after
//! KubeVirt's Synchronize service.

use serde::{Deserialize, Serialize};

use crate::commands::VmSpec;
use crate::ids::{ClusterName, MigrationId};
use crate::inventory::MigrationPhase;

/// Limits and features a migration runs under (from the cluster's migration configuration or a
/// migration policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationOptions {
    /// Bytes per second for memory and disk; 0 = unlimited.
    pub bandwidth_bytes_per_sec: u64,
    pub allow_auto_converge: bool,
    pub allow_post_copy: bool,
    /// Seconds per GiB of memory and disk before the migration is given up.
    pub completion_timeout_per_gib: u32,
    /// Seconds without the remaining bytes falling before the migration is given up.
    pub progress_timeout_secs: u32,
}

/// A single VM migration an operator asks for: `namespace/name` on `cluster`, to
/// `target_cluster` (into `target_namespace`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateRequest {
    pub cluster: crate::ClusterName,
    pub namespace: String,
    pub name: String,
    pub target_cluster: crate::ClusterName,
    pub target_namespace: String,
}

impl MigrationOptions {
    /// How long a migration of `bytes` (memory and disks) may take before it is given up:
    /// `completion_timeout_per_gib` per GiB, counting at least one GiB. The source's agent
    /// gives up at this limit; the hub waits this long plus a margin for its outcome.
    pub fn completion_timeout(&self, bytes: u64) -> std::time::Duration {
        completion_timeout(self.completion_timeout_per_gib, bytes)
    }
}

/// `per_gib` seconds per GiB of `bytes`, counting at least one GiB.
pub fn completion_timeout(per_gib: u32, bytes: u64) -> std::time::Duration {
    let gib = (bytes as f64 / (1u64 << 30) as f64).max(1.0);
    std::time::Duration::from_secs_f64(per_gib as f64 * gib)
}

/// How far a transfer is, as the sender sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationProgress {
    pub bytes_total: u64,
    pub bytes_transferred: u64,
    pub bytes_remaining: u64,
    pub dirty_rate_bytes_per_sec: u64,
    pub throughput_bytes_per_sec: u64,
}

/// A byte stream tunnelled between the two agents of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SyncChannel {
    /// JSON lines of `SyncMessage`: status in both directions, cancel, switchover.
    Control,
    /// QEMU's migration stream (memory and device state).
    Memory,
    /// The target's NBD server (disk contents, mirrored).
    Disk,
}

/// The first line a sending agent writes on a new TLS connection to the receiving agent's sync
/// endpoint; the receiver answers with one `SyncReply` line, then the channel carries its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncHello {
    pub migration_id: MigrationId,
    pub channel: SyncChannel,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncReply {
    pub accepted: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

/// Messages on the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum SyncMessage {
    /// Source -> target, first: the VM to receive (already in the target's namespace).
    #[serde(rename_all = "camelCase")]
    Prepare {
        spec: VmSpec,
        /// W3C traceparent of the sender's span: the target's spans join the migration's trace.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace_parent: Option<String>,
    },
    /// Target -> source: the receiving VM waits for the streams (or why it cannot).
    #[serde(rename_all = "camelCase")]
    Prepared {
        ready: bool,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Source -> target: where the sender is (KubeVirt's SyncSourceMigrationStatus).
    #[serde(rename_all = "camelCase")]
    SourceStatus {
        phase: MigrationPhase,
        progress: MigrationProgress,
    },
    /// Target -> source (SyncTargetMigrationStatus).
    #[serde(rename_all = "camelCase")]
    TargetStatus { phase: MigrationPhase },
    /// Source -> target: the memory stream completed and the source is paused; take over.
    Switchover,
    /// Target -> source: the answer to `Switchover`.
    #[serde(rename_all = "camelCase")]
    SwitchedOver {
        succeeded: bool,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Either side: stop; the source stays authoritative (CancelMigration).
    #[serde(rename_all = "camelCase")]
    Cancel { reason: String },
}

/// What a sending agent reports to the hub about a migration in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    pub migration_id: MigrationId,
    pub phase: MigrationPhase,
    #[serde(default)]
    pub progress: Option<MigrationProgress>,
    #[serde(default)]
    pub message: Option<String>,
    /// The source paused with everything sent and asks the target to take over: from now on
    /// the migration cannot be cancelled.
    #[serde(default)]
    pub switchover: bool,
    /// The cluster reporting it (checked against the session's cluster).
    pub cluster: ClusterName,
}

/// Where an evacuation or rebalance stands (stored as `as_str`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvacuationState {
    Running,
    Succeeded,
    /// Ended with some VMs not moved (failed after their attempts).
    Failed,
    Cancelled,
}

impl EvacuationState {
    pub const ALL: [Self; 4] = [
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
        }
    }

    /// The state stored as `s`; None for one this version does not know.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_completion_timeout_counts_each_gib_and_at_least_one() {
        let secs = |bytes: u64| completion_timeout(150, bytes).as_secs_f64();
        assert_eq!(secs(0), 150.0, "a VM under a GiB still gets one GiB's time");
        assert_eq!(secs(1 << 30), 150.0);
        assert_eq!(secs(3 << 30), 450.0);
        assert_eq!(secs((1 << 30) + (1 << 29)), 225.0);
    }
}
