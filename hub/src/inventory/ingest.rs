//! Inventory ingest: a cluster's full snapshot or a delta, each applied in one transaction.
//! A snapshot or delta is validated whole first, a stale generation is refused, and nothing is
//! ever half-applied. This is the path agents use; `drover-hub seed` and the tests use it too.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use drover_shared::events::{InventoryChange, InventoryChangeKind};
use drover_shared::inventory::{ClusterHealth, InventoryDelta, InventorySnapshot};
use tokio::sync::{broadcast, Mutex};

use crate::store::{inventory, Store};

pub use crate::store::inventory::{IngestError, IngestOutcome};

/// Applies inventory to the store and tells subscribers what changed.
#[derive(Clone)]
pub struct Ingest {
    store: Store,
    events: broadcast::Sender<InventoryChange>,
    /// Tells the other hub replicas' subscribers.
    replicas: crate::replicas::ReplicaBus,
    /// SQLite allows one writer; taking turns here avoids busy retries inside one hub.
    sqlite_writer: Option<Arc<Mutex<()>>>,
}

impl Ingest {
    pub fn new(
        store: Store,
        events: broadcast::Sender<InventoryChange>,
        replicas: crate::replicas::ReplicaBus,
    ) -> Self {
        let sqlite_writer = inventory::single_writer(&store).then(Default::default);
        Self {
            store,
            events,
            replicas,
            sqlite_writer,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.sqlite_writer {
            Some(m) => Some(m.lock().await),
            None => None,
        }
    }

    /// Replaces everything the hub knows about a cluster with a snapshot, creating the cluster
    /// on first sight.
    #[tracing::instrument(skip_all, fields(cluster = %snap.cluster, generation = snap.generation))]
    pub async fn apply_snapshot(
        &self,
        snap: &InventorySnapshot,
    ) -> Result<IngestOutcome, IngestError> {
        snap.validate()?;
        let _turn = self.write_turn().await;
        let now = self.store.clock.now();
        let outcome = inventory::apply_snapshot(&self.store, snap, now).await?;
        self.committed(
            snap.cluster.as_str(),
            InventoryChangeKind::Snapshot,
            &outcome,
            now,
        );
        Ok(outcome)
    }

    /// Applies changes since the last generation; the cluster must have sent a snapshot before.
    #[tracing::instrument(skip_all, fields(cluster = %delta.cluster, generation = delta.generation))]
    pub async fn apply_delta(&self, delta: &InventoryDelta) -> Result<IngestOutcome, IngestError> {
        delta.validate()?;
        let _turn = self.write_turn().await;
        let now = self.store.clock.now();
        let outcome = inventory::apply_delta(&self.store, delta, now).await?;
        self.committed(
            delta.cluster.as_str(),
            InventoryChangeKind::Delta,
            &outcome,
            now,
        );
        Ok(outcome)
    }

    /// Records a cluster's health as the hub judges it (seeding, operators).
    pub async fn set_cluster_health(
        &self,
        cluster: &str,
        health: ClusterHealth,
    ) -> Result<(), IngestError> {
        self.write_health(cluster, health, None, true).await
    }

    /// Records a heartbeat: the agent's judgement of its cluster and when it was last heard, in
    /// one statement. `changed` says whether the session last recorded another health; only then
    /// is there news for subscribers.
    pub async fn record_heartbeat(
        &self,
        cluster: &str,
        health: ClusterHealth,
        changed: bool,
    ) -> Result<(), IngestError> {
        self.write_health(cluster, health, Some(self.store.clock.now()), changed)
            .await
    }

    async fn write_health(
        &self,
        cluster: &str,
        health: ClusterHealth,
        heard_at: Option<DateTime<Utc>>,
        publish: bool,
    ) -> Result<(), IngestError> {
        let _turn = self.write_turn().await;
        let now = self.store.clock.now();
        if !inventory::write_health(&self.store, cluster, health, heard_at, now).await? {
            return Err(IngestError::NoSuchCluster {
                cluster: cluster.to_owned(),
            });
        }
        if publish {
            tracing::info!(%cluster, health = health.as_str(), "cluster health recorded");
            self.publish(cluster, InventoryChangeKind::Status, -1, 0, now);
        }
        Ok(())
    }

    /// Marks `Unreachable` every cluster with an agent identity whose last heartbeat is older
    /// than `silence`; returns their names. Clusters without an agent (seeded demo fleets) are
    /// left alone. Being unreachable never starts anything by itself.
    pub async fn mark_silent_clusters_unreachable(
        &self,
        silence: std::time::Duration,
    ) -> Result<Vec<String>, IngestError> {
        let _turn = self.write_turn().await;
        let now = self.store.clock.now();
        let cutoff = now - chrono::Duration::from_std(silence).unwrap_or_default();
        let names = inventory::mark_silent_clusters_unreachable(&self.store, cutoff, now).await?;
        for name in &names {
            tracing::warn!(cluster = %name, ?silence, "cluster unreachable: no heartbeat");
            self.publish(name, InventoryChangeKind::Status, -1, 0, now);
        }
        Ok(names)
    }

    fn committed(
        &self,
        cluster: &str,
        kind: InventoryChangeKind,
        outcome: &IngestOutcome,
        now: DateTime<Utc>,
    ) {
        let kind_label = match kind {
            InventoryChangeKind::Snapshot => "snapshot",
            InventoryChangeKind::Delta => "delta",
            InventoryChangeKind::Status => "status",
        };
        metrics::counter!("drover_inventory_ingests_total", "kind" => kind_label).increment(1);
        metrics::counter!("drover_inventory_vm_changes_total")
            .increment((outcome.vms_upserted + outcome.vms_removed) as u64);
        let changes = outcome.nodes_upserted
            + outcome.nodes_removed
            + outcome.vms_upserted
            + outcome.vms_removed;
        self.publish(cluster, kind, outcome.generation as i64, changes, now);
    }

    fn publish(
        &self,
        cluster: &str,
        kind: InventoryChangeKind,
        generation: i64,
        changes: usize,
        at: DateTime<Utc>,
    ) {
        // No subscriber is fine: the event is only news (here and on the other replicas).
        let event = InventoryChange {
            cluster: cluster.to_owned(),
            kind,
            generation,
            changes: changes.min(i32::MAX as usize) as i32,
            at,
        };
        self.replicas.tell(crate::replicas::Notice::Inventory {
            event: event.clone(),
        });
        let _ = self.events.send(event);
    }
}
