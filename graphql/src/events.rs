//! Events as GraphQL subscriptions show them, and [`FleetEvents`], where subscriptions get them
//! (the hub implements it, mapping its own events onto these types).

use futures::stream::BoxStream;

/// The live events subscriptions read. Each call is a new subscriber's stream; a subscriber too
/// slow to keep up misses events rather than holding the hub back.
pub trait FleetEvents: Send + Sync {
    /// Every inventory change from now on.
    fn inventory(&self) -> BoxStream<'static, InventoryEvent>;
    /// Every migration's phase changes and progress from now on.
    fn migrations(&self) -> BoxStream<'static, MigrationEvent>;
}

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
