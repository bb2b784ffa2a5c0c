//! The durable scheduler: admits queued migrations (phase Pending, in the database) under every
//! limit at once — the fleet-wide in-flight cap, parallelMigrationsPerCluster at the source and
//! at the target, parallelOutboundMigrationsPerNode on the source node, and the bandwidth of each
//! cluster pair — whenever something is queued or ends, so that a freed slot is filled at once.
//! Admission is one transaction; on PostgreSQL it holds an advisory lock, so that hub replicas
//! on one database admit one at a time and never the same migration twice (each admission is
//! also a conditional update from Pending). The scheduler keeps no state of its own: a hub that
//! restarts admits from the rows. It also retries failed migrations of an evacuation when that is
//! safe, and ends evacuations whose migrations have all ended.

use std::collections::HashMap;
use std::time::Duration;

use drover_shared::inventory::MigrationPhase;
use uuid::Uuid;

use crate::config::SchedulerSettings;
use crate::core::admission::{self, AdmissionLimits, ClusterSlots, MigrationRequest};
use crate::orchestration::migrations::Migrations;
use crate::store::entities::migration;
use crate::store::migrations::MigrationRows;
use crate::store::{Store, StoreError};

/// The advisory lock key that serialises admission across hub replicas ("drover-admit").
pub use crate::store::migrations::ADMISSION_LOCK;

/// How often the scheduler looks even when nothing woke it (timeouts, other replicas' work).
const TICK: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Scheduler {
    store: Store,
    migrations: Migrations,
    settings: std::sync::Arc<std::sync::RwLock<SchedulerSettings>>,
    /// Clusters whose slots gauge was ever set: one that holds no slot any more reads 0.
    reported: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl Scheduler {
    pub fn new(store: Store, migrations: Migrations, settings: SchedulerSettings) -> Self {
        Self {
            store,
            migrations,
            settings: std::sync::Arc::new(std::sync::RwLock::new(settings)),
            reported: std::sync::Arc::default(),
        }
    }

    pub fn settings(&self) -> SchedulerSettings {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes the limits (the hub's flags) for every holder of this scheduler.
    pub fn set_settings(&self, settings: SchedulerSettings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    /// Runs until `stop` resolves: admits, retries and finishes evacuations on every wake-up
    /// and every tick.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let cap = Duration::from_secs(5);
        let mut delays = crate::retry::delays(TICK, cap);
        loop {
            let wait = match self.round().await {
                Ok(()) => {
                    metrics::counter!("drover_scheduler_rounds_total").increment(1);
                    delays = crate::retry::delays(TICK, cap);
                    TICK
                }
                Err(e) => {
                    let wait = crate::retry::next(&mut delays, cap);
                    metrics::counter!("drover_scheduler_round_failures_total").increment(1);
                    tracing::warn!(error = %e, retry_in = ?wait, "scheduling round failed");
                    wait
                }
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = self.migrations.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One round: retries what may be retried, admits what fits, ends finished evacuations.
    pub async fn round(&self) -> Result<(), StoreError> {
        let settings = self.settings();
        // Renew this replica's leases and drive what it holds: every in-flight migration has
        // a driver on exactly one replica (one whose start found the database away, whose hub
        // restarted, or whose replica died is picked up again).
        let resumed = self.migrations.resume().await?;
        if resumed > 0 {
            tracing::info!(resumed, "drivers resumed");
        }
        crate::orchestration::evacuations::retry_failed(&self.store, &self.migrations, &settings)
            .await?;
        let admitted = self.admit().await?;
        if !admitted.is_empty() {
            // What this round admitted is driven here, unless another replica claimed it first.
            self.migrations.resume().await?;
        }
        crate::orchestration::evacuations::finish_ended(&self.store, settings.max_attempts).await?;
        Ok(())
    }

    /// The scheduler's gauges after a round: the slots each cluster's migrations hold (as
    /// source or target; 0 for a `known` cluster and for one that held some before) and how
    /// many migrations wait.
    fn record_slots<'a>(
        &self,
        known: impl Iterator<Item = &'a String>,
        running: &[migration::Model],
        queued: &[migration::Model],
        admitted: &[Uuid],
    ) {
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let mut in_use: HashMap<String, u64> = known.map(|c| (c.clone(), 0)).collect();
        for c in reported.iter() {
            in_use.entry(c.clone()).or_default();
        }
        let admitted_rows = queued.iter().filter(|r| admitted.contains(&r.id));
        for row in running.iter().chain(admitted_rows) {
            for cluster in [&row.source_cluster_name, &row.target_cluster_name] {
                *in_use.entry(cluster.clone()).or_default() += 1;
            }
        }
        for (cluster, n) in in_use {
            metrics::gauge!("drover_scheduler_slots_in_use", "cluster" => cluster.clone())
                .set(n as f64);
            reported.insert(cluster);
        }
        metrics::gauge!("drover_migrations_waiting")
            .set(queued.len().saturating_sub(admitted.len()) as f64);
    }

    /// Admits what every limit allows; returns the admitted migrations' ids.
    pub async fn admit(&self) -> Result<Vec<Uuid>, StoreError> {
        let admission = MigrationRows::new(self.store.clone())
            .admit(|queued, running, configs| {
                let settings = self.settings();
                let limits = AdmissionLimits {
                    max_in_flight: settings.max_in_flight,
                    max_attempts: settings.max_attempts.max(1) as u32,
                    clusters: configs
                        .iter()
                        .map(|(name, c)| (name.clone(), ClusterSlots::from(c)))
                        .collect(),
                    pair_bandwidth: settings.pair_bandwidth(),
                };
                let in_flight: Vec<MigrationRequest> = running.iter().map(request_of).collect();
                let candidates: Vec<MigrationRequest> = queued.iter().map(request_of).collect();
                let decision = admission::admit(&limits, &candidates, &in_flight);
                (limits, decision.admitted)
            })
            .await?;
        let Some(admission) = admission else {
            // Nothing waits; the gauges still follow the migrations that end.
            let running = MigrationRows::new(self.store.clone()).in_flight().await?;
            self.record_slots(std::iter::empty(), &running, &[], &[]);
            return Ok(Vec::new());
        };
        let (queued, running, limits, admitted, now) = (
            admission.queued,
            admission.running,
            admission.decided,
            admission.admitted,
            admission.now,
        );
        self.record_slots(limits.clusters.keys(), &running, &queued, &admitted);
        for id in &admitted {
            if let Some(row) = queued.iter().find(|r| r.id == *id) {
                metrics::histogram!("drover_admission_wait_seconds").record(
                    (now - row.created_at)
                        .to_std()
                        .unwrap_or_default()
                        .as_secs_f64(),
                );
                let queued_at = row
                    .phase_stamps()
                    .get(MigrationPhase::Pending.as_str())
                    .copied()
                    .unwrap_or(row.created_at);
                crate::orchestration::migration_trace::phase_ended(
                    row,
                    MigrationPhase::Pending,
                    queued_at,
                    now,
                );
                crate::orchestration::migration_trace::phase_ended(
                    row,
                    MigrationPhase::Scheduling,
                    now,
                    now,
                );
                self.migrations
                    .publish(crate::orchestration::migrations::event_of(
                        row,
                        MigrationPhase::Scheduled,
                        None,
                        None,
                        now,
                    ));
                tracing::info!(migration = %id, vm = %format!("{}/{}", row.vm_namespace, row.vm_name), source = %row.source_cluster_name, target = %row.target_cluster_name, "migration admitted");
            }
        }
        Ok(admitted)
    }
}

/// A migration row as admission sees it.
fn request_of(row: &migration::Model) -> MigrationRequest {
    MigrationRequest {
        id: row.id,
        vm: row.vm_uid.clone(),
        position: row.queue_position.max(0) as u64,
        source_cluster: row.source_cluster_name.clone(),
        source_node: row.source_node.clone(),
        target_cluster: row.target_cluster_name.clone(),
        bytes: row.planned_bytes.max(0) as u64,
        bandwidth_bytes_per_sec: row.bandwidth_bytes_per_sec.max(0) as u64,
        attempt: row.attempt.max(1) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_pair_has_its_own_budget_and_the_rest_the_default() {
        let settings = SchedulerSettings {
            pair_bandwidth_bytes_per_sec: 1000,
            pair_budgets: vec![admission::PairBudget {
                source: "east-1".into(),
                target: "west-1".into(),
                bytes_per_sec: 250,
            }],
            ..SchedulerSettings::default()
        };
        let pairs = settings.pair_bandwidth();
        assert_eq!(pairs.budget("east-1", "west-1"), 250);
        assert_eq!(pairs.budget("west-1", "east-1"), 1000, "pairs are directed");
        assert_eq!(pairs.budget("east-1", "north-1"), 1000);
    }
}
