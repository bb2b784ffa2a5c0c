//! Evacuations and rebalances on the hub: the fleet as the planner sees it (from the
//! inventory and the migrations queued or running), dry-run plans, starting a plan (re-checked
//! at start; the evacuated cluster is cordoned; every move is queued as a Pending migration for
//! the scheduler), cancelling (nothing more is admitted, what runs is cancelled safely), retrying
//! a failed move when that is safe, and ending an evacuation when all its migrations have ended.
//! Its counters are counted from its migrations' rows, so they are right after any restart.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use drover_shared::inventory::{MigrationConfig, MigrationPhase, VmPhase};
use drover_shared::migration::MigrationOptions;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::migrations::{MigrateError, Migrations, QueuedMigration};
use crate::placement::{self, ClusterView, NodeView, Plan, RebalanceGoal, VmView};
use crate::scheduler::SchedulerSettings;
use crate::store::entities::{cluster, evacuation, migration, node, vm, vm_label};
use crate::store::{Store, StoreError};

/// Where an evacuation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvacuationState {
    Running,
    Succeeded,
    /// Ended with some VMs not moved (failed after their attempts).
    Failed,
    Cancelled,
}

impl EvacuationState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Running,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// What an operator asks to plan.
#[derive(Debug, Clone)]
pub enum PlanRequest {
    Evacuation { cluster: String },
    Rebalance(RebalanceGoal),
}

/// A plan with the limits that will apply.
#[derive(Debug, Clone)]
pub struct PlanReport {
    pub kind: &'static str,
    pub cluster: Option<String>,
    pub plan: Plan,
    pub limits: serde_json::Value,
}

/// An evacuation's counters, counted from its migrations.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    /// VMs the plan moves.
    pub planned: i64,
    /// Queued, waiting for a slot.
    pub queued: i64,
    pub running: i64,
    pub succeeded: i64,
    /// VMs whose last attempt failed and that get no further attempt.
    pub failed: i64,
    pub cannot_move: i64,
}

fn json_list(value: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(value.clone()).unwrap_or_default()
}

/// The fleet as the planner sees it.
pub async fn load_fleet(store: &Store) -> Result<Vec<ClusterView>, StoreError> {
    let db = &store.db;
    let clusters = cluster::Entity::find()
        .order_by_asc(cluster::Column::Name)
        .all(db)
        .await?;
    let nodes = node::Entity::find().all(db).await?;
    let vms = vm::Entity::find().all(db).await?;
    let mut labels: HashMap<Uuid, BTreeMap<String, String>> = HashMap::new();
    for l in vm_label::Entity::find().all(db).await? {
        labels.entry(l.vm_id).or_default().insert(l.key, l.value);
    }
    let active = migration::Entity::find()
        .filter(
            migration::Column::Phase.is_in(MigrationPhase::NOT_ENDED.iter().map(|p| p.as_str())),
        )
        .all(db)
        .await?;
    let migrating: HashSet<&str> = active.iter().map(|m| m.vm_uid.as_str()).collect();
    let mut reserved: HashMap<Uuid, u64> = HashMap::new();
    let memory_of: HashMap<&str, i64> = vms
        .iter()
        .map(|v| (v.uid.as_str(), v.memory_bytes))
        .collect();
    for m in &active {
        if let Some(t) = m.target_cluster_id {
            let memory = memory_of
                .get(m.vm_uid.as_str())
                .copied()
                .unwrap_or(0)
                .max(0) as u64;
            *reserved.entry(t).or_default() += memory;
        }
    }
    let mut last_moved: HashMap<String, DateTime<Utc>> = HashMap::new();
    for m in migration::Entity::find()
        .filter(migration::Column::Phase.eq(MigrationPhase::Succeeded.as_str()))
        .all(db)
        .await?
    {
        if let Some(at) = m.finished_at {
            let e = last_moved.entry(m.vm_uid).or_insert(at);
            *e = (*e).max(at);
        }
    }
    let mut views = Vec::with_capacity(clusters.len());
    for c in clusters {
        let config: MigrationConfig =
            serde_json::from_value(c.migration_config.clone()).unwrap_or_default();
        let storage: Vec<serde_json::Value> =
            serde_json::from_value(c.storage_classes.clone()).unwrap_or_default();
        views.push(ClusterView {
            ready: c.health == drover_shared::inventory::ClusterHealth::Ready.as_str(),
            health: c.health.clone(),
            cordoned: c.maintenance,
            runtime: c.runtime.clone(),
            virtualization_version: c.virtualization_version.clone(),
            cpu_models: json_list(&c.cpu_models),
            feature_gates: json_list(&c.feature_gates),
            storage_classes: storage
                .iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect(),
            networks: json_list(&c.networks),
            sync_endpoint: c.sync_endpoint.as_deref().is_some_and(|s| !s.is_empty()),
            nodes: nodes
                .iter()
                .filter(|n| n.cluster_id == c.id)
                .map(|n| NodeView {
                    name: n.name.clone(),
                    cpu_model: n.cpu_model.clone(),
                    allocatable_memory_bytes: n.allocatable_memory_bytes.max(0) as u64,
                    requested_memory_bytes: n.requested_memory_bytes.max(0) as u64,
                    schedulable: n.schedulable,
                })
                .collect(),
            vms: vms
                .iter()
                .filter(|v| v.cluster_id == c.id)
                .map(|v| {
                    let disks = v.disks.as_array().cloned().unwrap_or_default();
                    let interfaces = v.interfaces.as_array().cloned().unwrap_or_default();
                    VmView {
                        uid: v.uid.clone(),
                        namespace: v.namespace.clone(),
                        name: v.name.clone(),
                        node: v.node_name.clone(),
                        running: v.phase == VmPhase::Running.as_str(),
                        memory_bytes: v.memory_bytes.max(0) as u64,
                        disk_bytes: disks.iter().filter_map(|d| d["sizeBytes"].as_u64()).sum(),
                        storage_classes: disks
                            .iter()
                            .filter_map(|d| d["storageClass"].as_str().map(str::to_owned))
                            .filter(|s| !s.is_empty())
                            .collect(),
                        networks: interfaces
                            .iter()
                            .filter_map(|i| i["network"].as_str().map(str::to_owned))
                            .collect(),
                        macs: interfaces
                            .iter()
                            .filter_map(|i| i["mac"].as_str().map(str::to_owned))
                            .collect(),
                        labels: labels.remove(&v.id).unwrap_or_default(),
                        migratable: v.migratable,
                        non_migratable_reasons: json_list(&v.non_migratable_reasons),
                        last_moved_at: last_moved.get(&v.uid).copied(),
                        migrating: migrating.contains(v.uid.as_str()),
                    }
                })
                .collect(),
            reserved_memory_bytes: reserved.get(&c.id).copied().unwrap_or(0),
            bandwidth_per_migration: config.bandwidth_per_migration,
            parallel_migrations: config.parallel_migrations_per_cluster as usize,
            name: c.name,
        });
    }
    Ok(views)
}

/// Cordons (or uncordons) a cluster; cordoning again keeps the first time. False when there is
/// no such cluster.
pub async fn cordon(store: &Store, name: &str, maintenance: bool) -> Result<bool, StoreError> {
    let now = Utc::now();
    let mut update = cluster::Entity::update_many()
        .col_expr(cluster::Column::Maintenance, maintenance.into())
        .col_expr(cluster::Column::UpdatedAt, now.into())
        .filter(cluster::Column::Name.eq(name));
    if !maintenance {
        update = update.col_expr(
            cluster::Column::MaintenanceSince,
            Option::<DateTime<Utc>>::None.into(),
        );
    }
    let found = update.exec(&store.db).await?.rows_affected > 0;
    if maintenance {
        cluster::Entity::update_many()
            .col_expr(cluster::Column::MaintenanceSince, Some(now).into())
            .filter(cluster::Column::Name.eq(name))
            .filter(cluster::Column::MaintenanceSince.is_null())
            .exec(&store.db)
            .await?;
    }
    Ok(found)
}

/// A dry run: the plan for `request` on the fleet as it is now.
pub async fn plan(
    store: &Store,
    request: &PlanRequest,
    settings: SchedulerSettings,
) -> Result<PlanReport, MigrateError> {
    let fleet = load_fleet(store).await?;
    let configs: BTreeMap<String, MigrationConfig> = cluster::Entity::find()
        .all(&store.db)
        .await?
        .into_iter()
        .map(|c| {
            (
                c.name,
                serde_json::from_value(c.migration_config).unwrap_or_default(),
            )
        })
        .collect();
    let (kind, cluster, plan) = match request {
        PlanRequest::Evacuation { cluster } => {
            if !fleet.iter().any(|c| &c.name == cluster) {
                return Err(MigrateError::NotFound(format!(
                    "cluster \"{cluster}\" is not in the fleet; `clusters` lists the clusters there are"
                )));
            }
            (
                "evacuation",
                Some(cluster.clone()),
                placement::plan_evacuation(&fleet, cluster, settings.max_in_flight),
            )
        }
        PlanRequest::Rebalance(goal) => (
            "rebalance",
            None,
            placement::plan_rebalance(&fleet, *goal, settings.max_in_flight),
        ),
    };
    let involved: BTreeMap<String, MigrationConfig> = configs
        .into_iter()
        .filter(|(name, _)| {
            cluster.as_ref() == Some(name)
                || plan
                    .moves
                    .iter()
                    .any(|m| &m.source_cluster == name || &m.target_cluster == name)
        })
        .collect();
    Ok(PlanReport {
        kind,
        cluster,
        limits: crate::scheduler::limits_report(settings, &involved),
        plan,
    })
}

/// Starts a plan: re-plans on the fleet as it is now, refuses when a VM cannot move (unless
/// `allow_partial`), cordons the evacuated cluster, stores the evacuation and queues one
/// migration per move in plan order. Returns the evacuation's id.
pub async fn start(
    store: &Store,
    migrations: &Migrations,
    request: &PlanRequest,
    allow_partial: bool,
    settings: SchedulerSettings,
    actor: &str,
) -> Result<Uuid, MigrateError> {
    if let PlanRequest::Evacuation { cluster } = request {
        // Nothing new lands on it from now on, not even while the plan is made.
        cordon(store, cluster, true).await?;
    }
    let report = plan(store, request, settings).await?;
    if !report.plan.cannot_move.is_empty() && !allow_partial {
        let reasons = report
            .plan
            .cannot_move
            .iter()
            .map(|c| {
                format!(
                    "{}/{} on {}: {}",
                    c.namespace,
                    c.name,
                    c.cluster,
                    c.reasons.join(", ")
                )
            })
            .collect();
        return Err(MigrateError::Preflight(reasons));
    }
    if report.plan.moves.is_empty()
        && report.plan.cannot_move.is_empty()
        && report.kind == "rebalance"
    {
        return Err(MigrateError::Conflict(
            "the fleet is already balanced within the band; nothing to move".into(),
        ));
    }
    let id = Uuid::now_v7();
    let now = Utc::now();
    let source_id = match &report.cluster {
        Some(name) => cluster::Entity::find()
            .filter(cluster::Column::Name.eq(name.as_str()))
            .one(&store.db)
            .await?
            .map(|c| c.id),
        None => None,
    };
    evacuation::ActiveModel {
        id: Set(id),
        kind: Set(report.kind.to_owned()),
        cluster_id: Set(source_id),
        state: Set(EvacuationState::Running.as_str().to_owned()),
        plan: Set(json!({
            "cluster": report.cluster,
            "moves": report.plan.moves,
            "cannotMove": report.plan.cannot_move,
            "estimatedSeconds": report.plan.estimated_seconds,
        })),
        limits: Set(report.limits.clone()),
        counters: Set(json!({})),
        deadline: Set(None),
        schedule_id: Set(None),
        created_by: Set(actor.to_owned()),
        created_at: Set(now),
        started_at: Set(Some(now)),
        finished_at: Set(None),
    }
    .insert(&store.db)
    .await?;
    let clusters: HashMap<String, cluster::Model> = cluster::Entity::find()
        .all(&store.db)
        .await?
        .into_iter()
        .map(|c| (c.name.clone(), c))
        .collect();
    let policies = crate::policies::load(store).await?;
    let fleet = load_fleet(store).await?;
    let labels_of: HashMap<&str, &BTreeMap<String, String>> = fleet
        .iter()
        .flat_map(|c| c.vms.iter().map(|v| (v.uid.as_str(), &v.labels)))
        .collect();
    for (position, m) in report.plan.moves.iter().enumerate() {
        let (Some(source), Some(target)) = (
            clusters.get(&m.source_cluster),
            clusters.get(&m.target_cluster),
        ) else {
            continue;
        };
        let config: MigrationConfig =
            serde_json::from_value(source.migration_config.clone()).unwrap_or_default();
        let empty = BTreeMap::new();
        let options = crate::policies::options_for(
            labels_of.get(m.vm_uid.as_str()).copied().unwrap_or(&empty),
            &crate::policies::namespace_labels(&m.namespace),
            &policies,
            &config,
        );
        migrations
            .enqueue(
                QueuedMigration {
                    vm_uid: m.vm_uid.clone(),
                    namespace: m.namespace.clone(),
                    name: m.name.clone(),
                    source_cluster: (source.id, source.name.clone()),
                    target_cluster: (target.id, target.name.clone()),
                    target_namespace: m.namespace.clone(),
                    source_node: m.source_node.clone(),
                    planned_bytes: (m.memory_bytes + m.disk_bytes).min(i64::MAX as u64) as i64,
                    options,
                    evacuation_id: Some(id),
                    queue_position: position as i64,
                    attempt: 1,
                },
                actor,
            )
            .await?;
    }
    tracing::info!(evacuation = %id, kind = report.kind, moves = report.plan.moves.len(), cannot_move = report.plan.cannot_move.len(), "started");
    Ok(id)
}

/// Stops admitting, drops what is still queued, and cancels what runs (each migration ends
/// safely: the source keeps running before switchover; one already switching over completes).
pub async fn cancel(
    store: &Store,
    migrations: &Migrations,
    id: Uuid,
    actor: &str,
) -> Result<(), MigrateError> {
    let row = evacuation::Entity::find_by_id(id)
        .one(&store.db)
        .await?
        .ok_or_else(|| MigrateError::NotFound(format!("evacuation {id} does not exist")))?;
    if row.state != EvacuationState::Running.as_str() {
        return Err(MigrateError::Conflict(format!(
            "evacuation {id} is {} and can no longer be cancelled",
            row.state
        )));
    }
    let moved = evacuation::Entity::update_many()
        .col_expr(
            evacuation::Column::State,
            EvacuationState::Cancelled.as_str().into(),
        )
        .col_expr(evacuation::Column::FinishedAt, Some(Utc::now()).into())
        .filter(evacuation::Column::Id.eq(id))
        .filter(evacuation::Column::State.eq(EvacuationState::Running.as_str()))
        .exec(&store.db)
        .await?;
    if moved.rows_affected == 0 {
        return Err(MigrateError::Conflict(format!(
            "evacuation {id} ended meanwhile"
        )));
    }
    let active = migration::Entity::find()
        .filter(migration::Column::EvacuationId.eq(id))
        .filter(
            migration::Column::Phase.is_in(MigrationPhase::NOT_ENDED.iter().map(|p| p.as_str())),
        )
        .all(&store.db)
        .await?;
    for m in active {
        match migrations.cancel(m.id, actor).await {
            Ok(()) | Err(MigrateError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    tracing::info!(evacuation = %id, %actor, "cancelled");
    Ok(())
}

/// A deterministic id for attempt `attempt` of the move `first` began: a retry is queued once,
/// whichever hub replica or restart queues it.
fn retry_id(first: Uuid, attempt: i32) -> Uuid {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{first}/attempt/{attempt}"));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // A version-8 (custom) UUID.
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes)
}

/// Queues a fresh attempt for each failed migration of a running evacuation whose VM has
/// attempts left, once it is safe: the cancels to both sides were carried out (the target side
/// is gone) and the VM runs on its source again.
pub async fn retry_failed(
    store: &Store,
    migrations: &Migrations,
    settings: SchedulerSettings,
) -> Result<(), StoreError> {
    let running: Vec<Uuid> = evacuation::Entity::find()
        .filter(evacuation::Column::State.eq(EvacuationState::Running.as_str()))
        .all(&store.db)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();
    if running.is_empty() {
        return Ok(());
    }
    let rows = migration::Entity::find()
        .filter(migration::Column::EvacuationId.is_in(running))
        .all(&store.db)
        .await?;
    let mut latest: HashMap<(Uuid, &str), &migration::Model> = HashMap::new();
    for m in &rows {
        let key = (m.evacuation_id.unwrap_or_default(), m.vm_uid.as_str());
        let e = latest.entry(key).or_insert(m);
        if m.attempt > e.attempt {
            *e = m;
        }
    }
    for m in latest.values() {
        if m.phase != MigrationPhase::Failed.as_str() || m.attempt >= settings.max_attempts {
            continue;
        }
        if !retry_is_safe(store, migrations, m).await? {
            continue;
        }
        let Some(first) = rows
            .iter()
            .find(|r| r.vm_uid == m.vm_uid && r.evacuation_id == m.evacuation_id && r.attempt == 1)
        else {
            continue;
        };
        let Some(options) = m
            .options
            .clone()
            .and_then(|o| serde_json::from_value::<MigrationOptions>(o).ok())
        else {
            continue;
        };
        let (Some(source), Some(target)) = (m.source_cluster_id, m.target_cluster_id) else {
            continue;
        };
        let id = retry_id(first.id, m.attempt + 1);
        migrations
            .enqueue_with_id(
                id,
                QueuedMigration {
                    vm_uid: m.vm_uid.clone(),
                    namespace: m.vm_namespace.clone(),
                    name: m.vm_name.clone(),
                    source_cluster: (source, m.source_cluster_name.clone()),
                    target_cluster: (target, m.target_cluster_name.clone()),
                    target_namespace: m.target_namespace.clone(),
                    source_node: m.source_node.clone(),
                    planned_bytes: m.planned_bytes,
                    options,
                    evacuation_id: m.evacuation_id,
                    queue_position: m.queue_position,
                    attempt: m.attempt + 1,
                },
                &m.requested_by,
            )
            .await?;
        tracing::info!(migration = %id, previous = %m.id, attempt = m.attempt + 1, reason = m.failure_reason.as_deref().unwrap_or(""), "retrying a failed move");
    }
    Ok(())
}

async fn retry_is_safe(
    store: &Store,
    migrations: &Migrations,
    m: &migration::Model,
) -> Result<bool, StoreError> {
    for cluster in [&m.source_cluster_name, &m.target_cluster_name] {
        let key = format!("{}/cancel/{cluster}", m.id);
        if !migrations.command_succeeded(cluster, &key).await? {
            return Ok(false);
        }
    }
    let on_source = vm::Entity::find()
        .filter(vm::Column::Uid.eq(&m.vm_uid))
        .filter(vm::Column::ClusterId.eq(m.source_cluster_id.unwrap_or_default()))
        .one(&store.db)
        .await?;
    Ok(on_source.is_some_and(|v| v.phase == VmPhase::Running.as_str()))
}

/// Counts an evacuation's migrations: each VM's latest attempt decides.
pub async fn counters(
    store: &Store,
    e: &evacuation::Model,
    max_attempts: i32,
) -> Result<Counters, StoreError> {
    let rows = migration::Entity::find()
        .filter(migration::Column::EvacuationId.eq(e.id))
        .all(&store.db)
        .await?;
    let mut latest: HashMap<&str, &migration::Model> = HashMap::new();
    for m in &rows {
        let entry = latest.entry(m.vm_uid.as_str()).or_insert(m);
        if m.attempt > entry.attempt {
            *entry = m;
        }
    }
    let mut c = Counters {
        planned: e.plan["moves"].as_array().map_or(0, |m| m.len() as i64),
        cannot_move: e.plan["cannotMove"]
            .as_array()
            .map_or(0, |m| m.len() as i64),
        ..Counters::default()
    };
    let cancelled = e.state == EvacuationState::Cancelled.as_str();
    for m in latest.values() {
        match MigrationPhase::parse(&m.phase) {
            Some(MigrationPhase::Pending) => c.queued += 1,
            Some(MigrationPhase::Succeeded) => c.succeeded += 1,
            Some(MigrationPhase::Failed) if m.attempt >= max_attempts || cancelled => c.failed += 1,
            // Failed with attempts left: a retry is about to be queued.
            Some(MigrationPhase::Failed) => c.queued += 1,
            _ => c.running += 1,
        }
    }
    Ok(c)
}

/// Ends running evacuations whose migrations have all ended for good.
pub async fn finish_ended(store: &Store, max_attempts: i32) -> Result<(), StoreError> {
    let running = evacuation::Entity::find()
        .filter(evacuation::Column::State.eq(EvacuationState::Running.as_str()))
        .all(&store.db)
        .await?;
    for e in running {
        let c = counters(store, &e, max_attempts).await?;
        if c.queued > 0 || c.running > 0 {
            continue;
        }
        let state = if c.failed == 0 && c.cannot_move == 0 {
            EvacuationState::Succeeded
        } else {
            EvacuationState::Failed
        };
        evacuation::Entity::update_many()
            .col_expr(evacuation::Column::State, state.as_str().into())
            .col_expr(evacuation::Column::Counters, json!(c).into())
            .col_expr(evacuation::Column::FinishedAt, Some(Utc::now()).into())
            .filter(evacuation::Column::Id.eq(e.id))
            .filter(evacuation::Column::State.eq(EvacuationState::Running.as_str()))
            .exec(&store.db)
            .await?;
        tracing::info!(evacuation = %e.id, state = state.as_str(), succeeded = c.succeeded, failed = c.failed, cannot_move = c.cannot_move, "ended");
    }
    Ok(())
}

/// When a running evacuation should end, from its progress so far: the time its finished moves
/// took per byte, applied to the bytes still to move (None before the first move finished).
pub fn estimated_finish(
    e: &evacuation::Model,
    rows: &[migration::Model],
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let started = e.started_at?;
    let done: i64 = rows
        .iter()
        .filter(|m| m.phase == MigrationPhase::Succeeded.as_str())
        .map(|m| m.planned_bytes)
        .sum();
    let left: i64 = rows
        .iter()
        .filter(|m| {
            MigrationPhase::parse(&m.phase).is_some_and(|p| MigrationPhase::NOT_ENDED.contains(&p))
        })
        .map(|m| m.planned_bytes)
        .sum();
    if done <= 0 {
        let planned = e.plan["estimatedSeconds"].as_f64()?;
        return Some(started + chrono::Duration::milliseconds((planned * 1000.0) as i64));
    }
    let elapsed = (now - started).num_milliseconds().max(1) as f64;
    let per_byte = elapsed / done as f64;
    Some(now + chrono::Duration::milliseconds((per_byte * left as f64) as i64))
}
