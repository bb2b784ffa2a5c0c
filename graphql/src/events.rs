//! Events the hub publishes to GraphQL subscriptions.

#[derive(Debug, Clone, Copy, PartialEq, Eq, async_graphql::Enum)]
pub enum InventoryEventKind {
    /// A full snapshot replaced the cluster's inventory.
    Snapshot,
    /// A delta changed part of it.
    Delta,
    /// The cluster's health or maintenance state changed.
    Status,
}

/// One change to a cluster's inventory, as it is committed.
#[derive(Debug, Clone, async_graphql::SimpleObject)]
pub struct InventoryEvent {
    pub cluster: String,
    pub kind: InventoryEventKind,
    /// The cluster's inventory generation after the change.
    pub generation: crate::schema::Long,
    /// How many nodes and virtual machines the change touched.
    pub changes: i32,
    pub at: chrono::DateTime<chrono::Utc>,
}
