//! Evacuations and rebalances on the hub: the fleet as the planner sees it (from the
//! inventory and the migrations queued or running), dry-run plans, starting a plan (re-checked
//! at start; the evacuated cluster is cordoned; every move is queued as a Pending migration for
//! the scheduler), cancelling (nothing more is admitted, what runs is cancelled safely), retrying
//! a failed move when that is safe, and ending an evacuation when all its migrations have ended.
//! Its counters are counted from its migrations' rows, so they are right after any restart.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use drover_shared::inventory::{MigrationPhase, VmPhase};
use drover_shared::migration::MigrationOptions;
use drover_shared::ClusterName;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder,
    TransactionTrait,
};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::config::SchedulerSettings;
use crate::core::admission::AdmissionLimits;
use crate::core::planner::{self, Plan, PlanKind, PlanOptions, RebalanceOptions};
use crate::inventory::fleet_view::load_fleet;
use crate::orchestration::migrations::{MigrateError, Migrations, QueuedMigration};
use crate::store::entities::{cluster, evacuation, migration, vm};
use crate::store::{Store, StoreError};

pub use drover_shared::migration::EvacuationState;

/// What an operator asks to plan.
#[derive(Debug, Clone)]
pub enum PlanRequest {
    Evacuation { cluster: String },
    Rebalance(RebalanceOptions),
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

/// How the hub plans: its scheduler's limits, now.
fn plan_options(settings: &SchedulerSettings, now: DateTime<Utc>) -> PlanOptions {
    let mut options = PlanOptions::new(Uuid::now_v7(), now);
    options.limits = AdmissionLimits {
        max_in_flight: settings.max_in_flight,
        max_attempts: settings.max_attempts.max(1) as u32,
        clusters: BTreeMap::new(),
        pair_bandwidth: settings.pair_bandwidth(),
    };
    options
}

/// Cordons (or uncordons) a cluster; cordoning again keeps the first time. False when there is
/// no such cluster.
pub async fn cordon(store: &Store, name: &str, maintenance: bool) -> Result<bool, StoreError> {
    let now = store.clock.now();
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
    settings: &SchedulerSettings,
) -> Result<Plan, MigrateError> {
    let fleet = load_fleet(store).await?;
    let options = plan_options(settings, store.clock.now());
    Ok(match request {
        PlanRequest::Evacuation { cluster } => {
            let name = ClusterName::new(cluster.clone())
                .map_err(|e| MigrateError::NotFound(e.to_string()))?;
            if !fleet.clusters.iter().any(|c| c.name == name) {
                return Err(MigrateError::NotFound(format!(
                    "cluster \"{cluster}\" is not in the fleet; `clusters` lists the clusters there are"
                )));
            }
            planner::plan_evacuation(&fleet, &name, &options)
        }
        PlanRequest::Rebalance(goal) => {
            let last = last_rebalance_at(&store.db).await?;
            let goal = RebalanceOptions {
                last_rebalance_at: last,
                hold_down_secs: hold_down_secs(goal, settings),
                ..goal.clone()
            };
            planner::plan_rebalance(&fleet, &options, &goal)
        }
    })
}

/// A rebalance's hold-down: what it asks for, never less than the fleet's minimum.
fn hold_down_secs(goal: &RebalanceOptions, settings: &SchedulerSettings) -> u64 {
    goal.hold_down_secs.max(settings.rebalance_hold_down_secs)
}

/// When the latest rebalance was started.
async fn last_rebalance_at(
    db: &impl sea_orm::ConnectionTrait,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    Ok(evacuation::Entity::find()
        .filter(evacuation::Column::Kind.eq("rebalance"))
        .order_by_desc(evacuation::Column::CreatedAt)
        .one(db)
        .await?
        .map(|e| e.created_at))
}

/// Serialises starting rebalances across hub replicas (PostgreSQL advisory lock, held to the
/// end of the transaction) and within this process (SQLite), so that the hold-down check and
/// the new rebalance's row are one step: two racing requests never both start.
const REBALANCE_LOCK: i64 = 0x6472_6f76_6572_5242;

async fn lock_rebalances(tx: &sea_orm::DatabaseTransaction) -> Result<(), StoreError> {
    use sea_orm::ConnectionTrait as _;
    if tx.get_database_backend() == sea_orm::DbBackend::Postgres {
        tx.execute(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1)",
            [REBALANCE_LOCK.into()],
        ))
        .await?;
    }
    Ok(())
}

/// The cluster a plan evacuates.
pub fn evacuated(plan: &Plan) -> Option<&ClusterName> {
    match &plan.kind {
        PlanKind::Evacuation { source_cluster } => Some(source_cluster),
        _ => None,
    }
}

/// Starts a plan: re-plans on the fleet as it is now, refuses when a VM cannot move (unless
/// `allow_partial`), cordons the evacuated cluster, stores the evacuation and queues one
/// migration per move in plan order (under the move's stable id, so nothing is queued twice).
/// Returns the evacuation's id.
pub async fn start(
    store: &Store,
    migrations: &Migrations,
    request: &PlanRequest,
    allow_partial: bool,
    settings: &SchedulerSettings,
    actor: &str,
) -> Result<Uuid, MigrateError> {
    if let PlanRequest::Evacuation { cluster } = request {
        // Nothing new lands on it from now on, not even while the plan is made.
        cordon(store, cluster, true).await?;
    }
    let plan = plan(store, request, settings).await?;
    if !plan.cannot_move.is_empty() && !allow_partial {
        let reasons = plan
            .cannot_move
            .iter()
            .map(|c| {
                let why: Vec<String> = c.reasons.iter().map(|r| r.to_string()).collect();
                format!("{}: {}", c.vm, why.join("; "))
            })
            .collect();
        return Err(MigrateError::Preflight(reasons));
    }
    if plan.moves.is_empty() && matches!(plan.kind, PlanKind::Rebalance) {
        return Err(MigrateError::Conflict(format!(
            "nothing to move: {}",
            if plan.notes.is_empty() {
                "the fleet is within the band".to_owned()
            } else {
                plan.notes.join("; ")
            }
        )));
    }
    let id = plan.id;
    let now = store.clock.now();
    let source_id = match evacuated(&plan) {
        Some(name) => cluster::Entity::find()
            .filter(cluster::Column::Name.eq(name.as_str()))
            .one(&store.db)
            .await?
            .map(|c| c.id),
        None => None,
    };
    let kind = if matches!(plan.kind, PlanKind::Rebalance) {
        "rebalance"
    } else {
        "evacuation"
    };
    // A rebalance checks its hold-down and records itself in one serialised transaction.
    static SQLITE_REBALANCES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = match (&plan.kind, store.backend()) {
        (PlanKind::Rebalance, sea_orm::DbBackend::Sqlite) => Some(SQLITE_REBALANCES.lock().await),
        _ => None,
    };
    let tx = store.db.begin().await?;
    if let PlanRequest::Rebalance(goal) = request {
        lock_rebalances(&tx).await?;
        let hold_down = hold_down_secs(goal, settings);
        if let Some(last) = last_rebalance_at(&tx).await? {
            let until = last + chrono::Duration::seconds(hold_down.min(i64::MAX as u64) as i64);
            if now < until {
                return Err(MigrateError::Conflict(format!(
                    "a rebalance started at {last}; the hold-down time ({hold_down} s, the longer of the request's holdDownSeconds and the hub's --rebalance-hold-down-secs) lets the next start from {until}"
                )));
            }
        }
    }
    evacuation::ActiveModel {
        id: Set(id),
        kind: Set(kind.to_owned()),
        cluster_id: Set(source_id),
        state: Set(EvacuationState::Running.as_str().to_owned()),
        plan: Set(json!(plan)),
        limits: Set(json!(plan.limits)),
        counters: Set(json!({})),
        deadline: Set(None),
        schedule_id: Set(None),
        created_by: Set(actor.to_owned()),
        created_at: Set(now),
        started_at: Set(Some(now)),
        finished_at: Set(None),
    }
    .insert(&tx)
    .await?;
    // Its migrations land with it: a scheduler round never sees the evacuation without them
    // (and would end it as done).
    let clusters: HashMap<String, Uuid> = cluster::Entity::find()
        .all(&tx)
        .await?
        .into_iter()
        .map(|c| (c.name, c.id))
        .collect();
    let mut queued = Vec::with_capacity(plan.moves.len());
    for m in &plan.moves {
        let (Some(&source), Some(&target)) = (
            clusters.get(m.vm.cluster.as_str()),
            clusters.get(m.target_cluster.as_str()),
        ) else {
            continue;
        };
        let q = QueuedMigration {
            vm_uid: m.vm_uid.clone(),
            namespace: m.vm.namespace.to_string(),
            name: m.vm.name.to_string(),
            source_cluster: (source, m.vm.cluster.to_string()),
            target_cluster: (target, m.target_cluster.to_string()),
            target_namespace: m.target_namespace.clone(),
            source_node: m.source_node.clone(),
            planned_bytes: m.bytes.min(i64::MAX as u64) as i64,
            options: m.options,
            evacuation_id: Some(id),
            queue_position: m.position.min(i64::MAX as u64) as i64,
            attempt: 1,
        };
        let new = crate::store::migrations::NewMigration {
            id: m.id,
            queued: q,
            trace_id: crate::orchestration::migration_trace::trace_id_text(m.id),
        };
        if crate::store::migrations::insert_queued(&tx, &new, actor, now).await? {
            queued.push(m.id);
        }
    }
    tx.commit().await?;
    for migration in queued {
        // Stored already: a failure here only delays the news (the scheduler ticks anyway).
        if let Err(e) = migrations.announce_queued(migration).await {
            tracing::warn!(%migration, error = %e, "could not announce a queued migration");
        }
    }
    tracing::info!(evacuation = %id, kind, moves = plan.moves.len(), cannot_move = plan.cannot_move.len(), "started");
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
        .col_expr(
            evacuation::Column::FinishedAt,
            Some(store.clock.now()).into(),
        )
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
    settings: &SchedulerSettings,
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
    Ok(counters_of(e, &rows, max_attempts))
}

/// An evacuation's counters from its migrations' rows (each VM's latest attempt counts).
pub fn counters_of(
    e: &evacuation::Model,
    rows: &[migration::Model],
    max_attempts: i32,
) -> Counters {
    let mut latest: HashMap<&str, &migration::Model> = HashMap::new();
    for m in rows {
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
    c
}

/// Ends running evacuations whose migrations have all ended for good.
pub async fn finish_ended(store: &Store, max_attempts: i32) -> Result<(), StoreError> {
    let running = evacuation::Entity::find()
        .filter(evacuation::Column::State.eq(EvacuationState::Running.as_str()))
        .all(&store.db)
        .await?;
    // Progress of the running evacuations, summed (per-evacuation detail is in the API).
    let mut progress = Counters::default();
    for e in running {
        let c = counters(store, &e, max_attempts).await?;
        progress.planned += c.planned;
        progress.queued += c.queued;
        progress.running += c.running;
        progress.succeeded += c.succeeded;
        progress.failed += c.failed;
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
            .col_expr(
                evacuation::Column::FinishedAt,
                Some(store.clock.now()).into(),
            )
            .filter(evacuation::Column::Id.eq(e.id))
            .filter(evacuation::Column::State.eq(EvacuationState::Running.as_str()))
            .exec(&store.db)
            .await?;
        tracing::info!(evacuation = %e.id, state = state.as_str(), succeeded = c.succeeded, failed = c.failed, cannot_move = c.cannot_move, "ended");
    }
    for (state, n) in [
        ("planned", progress.planned),
        ("queued", progress.queued),
        ("running", progress.running),
        ("succeeded", progress.succeeded),
        ("failed", progress.failed),
    ] {
        metrics::gauge!("drover_evacuation_moves", "state" => state).set(n as f64);
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
        let planned = e.plan["estimate"]["seconds"].as_f64()?;
        return Some(started + chrono::Duration::milliseconds((planned * 1000.0) as i64));
    }
    let elapsed = (now - started).num_milliseconds().max(1) as f64;
    let per_byte = elapsed / done as f64;
    Some(now + chrono::Duration::milliseconds((per_byte * left as f64) as i64))
}
