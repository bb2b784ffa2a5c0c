//! What the hub tells whoever listens (its API's subscriptions, the other hub replicas): a
//! cluster's inventory changed, a migration changed phase or reported progress. Plain data; the
//! API maps it onto its own types.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::inventory::MigrationPhase;
use crate::migration::MigrationProgress;

/// What kind of change an inventory change was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InventoryChangeKind {
    /// A full snapshot replaced the cluster's inventory.
    Snapshot,
    /// A delta changed part of it.
    Delta,
    /// The cluster's health or maintenance state changed.
    Status,
}

/// One change to a cluster's inventory, as it was committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryChange {
    pub cluster: String,
    pub kind: InventoryChangeKind,
    /// The cluster's inventory generation after the change (-1: unchanged by a status change).
    pub generation: i64,
    /// How many nodes and virtual machines the change touched.
    pub changes: i32,
    pub at: DateTime<Utc>,
}

/// A migration changed phase or reported progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationChange {
    pub migration_id: Uuid,
    /// The evacuation or rebalance it belongs to, if any.
    pub evacuation_id: Option<Uuid>,
    pub vm_namespace: String,
    pub vm_name: String,
    pub source_cluster: String,
    pub target_cluster: String,
    /// The phase now.
    pub phase: MigrationPhase,
    /// Progress, when the change is a progress report.
    pub progress: Option<MigrationProgress>,
    pub failure_reason: Option<String>,
    pub at: DateTime<Utc>,
}
