//! The hub's events as GraphQL subscriptions show them: [`HubEvents`] serves the schema's
//! subscriptions from the hub's own broadcasts of inventory and migration changes, mapping each
//! onto its GraphQL type.

use drover_graphql::schema::Long;
use drover_graphql::{FleetEvents, InventoryEvent, InventoryEventKind, MigrationEvent};
use drover_shared::events::{InventoryChange, InventoryChangeKind, MigrationChange};
use futures::stream::BoxStream;
use futures::StreamExt as _;
use tokio::sync::broadcast;

/// The hub's two broadcasts, as the schema's event source.
pub struct HubEvents {
    pub inventory: broadcast::Sender<InventoryChange>,
    pub migrations: broadcast::Sender<MigrationChange>,
}

/// Every value sent on `sender` from now on; a subscriber that lags behind skips what it missed.
fn follow<T: Clone + Send + 'static, U: Send + 'static>(
    sender: &broadcast::Sender<T>,
    map: fn(&T) -> U,
) -> BoxStream<'static, U> {
    futures::stream::unfold(sender.subscribe(), move |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(v) => return Some((map(&v), rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .boxed()
}

impl FleetEvents for HubEvents {
    fn inventory(&self) -> BoxStream<'static, InventoryEvent> {
        follow(&self.inventory, inventory_event)
    }

    fn migrations(&self) -> BoxStream<'static, MigrationEvent> {
        follow(&self.migrations, migration_event)
    }
}

/// An inventory change as `inventoryEvents` shows it.
pub fn inventory_event(c: &InventoryChange) -> InventoryEvent {
    InventoryEvent {
        cluster: c.cluster.clone(),
        kind: match c.kind {
            InventoryChangeKind::Snapshot => InventoryEventKind::Snapshot,
            InventoryChangeKind::Delta => InventoryEventKind::Delta,
            InventoryChangeKind::Status => InventoryEventKind::Status,
        },
        generation: Long(c.generation),
        changes: c.changes,
        at: c.at,
    }
}

/// A migration change as `migrationEvents` shows it.
pub fn migration_event(c: &MigrationChange) -> MigrationEvent {
    let long = |v: u64| Long(v.min(i64::MAX as u64) as i64);
    MigrationEvent {
        migration_id: async_graphql::ID(c.migration_id.to_string()),
        evacuation_id: c.evacuation_id.map(|e| async_graphql::ID(e.to_string())),
        vm_namespace: c.vm_namespace.clone(),
        vm_name: c.vm_name.clone(),
        source_cluster: c.source_cluster.clone(),
        target_cluster: c.target_cluster.clone(),
        phase: c.phase.into(),
        bytes_total: c.progress.map(|p| long(p.bytes_total)),
        bytes_transferred: c.progress.map(|p| long(p.bytes_transferred)),
        bytes_remaining: c.progress.map(|p| long(p.bytes_remaining)),
        failure_reason: c.failure_reason.clone(),
        at: c.at,
    }
}
