//! Events the hub publishes to GraphQL subscriptions.

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, async_graphql::Enum, serde::Serialize, serde::Deserialize,
)]
pub enum InventoryEventKind {
    /// A full snapshot replaced the cluster's inventory.
    Snapshot,
    /// A delta changed part of it.
    Delta,
    /// The cluster's health or maintenance state changed.
    Status,
}

/// One change to a cluster's inventory, as it is committed.
#[derive(Debug, Clone, async_graphql::SimpleObject, serde::Serialize, serde::Deserialize)]
pub struct InventoryEvent {
    pub cluster: String,
    pub kind: InventoryEventKind,
    /// The cluster's inventory generation after the change.
    pub generation: crate::schema::Long,
    /// How many nodes and virtual machines the change touched.
    pub changes: i32,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// A migration changed phase or reported progress.
#[derive(Debug, Clone, async_graphql::SimpleObject, serde::Serialize, serde::Deserialize)]
pub struct MigrationEvent {
    pub migration_id: async_graphql::ID,
    /// The evacuation or rebalance it belongs to, if any.
    pub evacuation_id: Option<async_graphql::ID>,
    pub vm_namespace: String,
    pub vm_name: String,
    pub source_cluster: String,
    pub target_cluster: String,
    /// The phase now (as in `Migration.phase`).
    pub phase: crate::schema::MigrationPhase,
    /// Progress, when the event is a progress report.
    pub bytes_total: Option<crate::schema::Long>,
    pub bytes_transferred: Option<crate::schema::Long>,
    pub bytes_remaining: Option<crate::schema::Long>,
    pub failure_reason: Option<String>,
    pub at: chrono::DateTime<chrono::Utc>,
}
