//! Evacuations and rebalances on the hub: the fleet as the planner sees it (from the
//! inventory and the migrations queued or running), dry-run plans, starting a plan (re-checked
//! at start; the evacuated cluster is cordoned; every move is queued as a Pending migration for
//! the scheduler), cancelling (nothing more is admitted, what runs is cancelled safely), retrying
//! a failed move when that is safe, and ending an evacuation when all its migrations have ended.
//! Its counters are counted from its migrations' rows, so they are right after any restart.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use drover_shared::inventory::{MigrationPhase, VmPhase};
use drover_shared::ClusterName;
use uuid::Uuid;

use crate::config::SchedulerSettings;
use crate::core::admission::AdmissionLimits;
use crate::core::planner::{self, Plan, PlanKind, PlanOptions, RebalanceOptions};
use crate::inventory::fleet_view::load_fleet;
use crate::orchestration::migrations::{MigrateError, Migrations, QueuedMigration};
use crate::store::entities::{evacuation, migration};
use crate::store::evacuations::{EvacuationRows, NewEvacuation, Started};
use crate::store::migrations::{MigrationRows, NewMigration};
use crate::store::{Store, StoreError};

pub use crate::store::evacuations::Counters;
pub use drover_shared::migration::EvacuationState;

/// What an operator asks to plan.
#[derive(Debug, Clone)]
pub enum PlanRequest {
    Evacuation { cluster: String },
    Rebalance(RebalanceOptions),
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
    crate::store::evacuations::cordon(store, name, maintenance).await
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
            let last = EvacuationRows::new(store.clone())
                .last_rebalance_at()
                .await?;
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
        Some(name) => MigrationRows::new(store.clone())
            .cluster_named(name.as_str())
            .await?
            .map(|c| c.id),
        None => None,
    };
    let kind = if matches!(plan.kind, PlanKind::Rebalance) {
        "rebalance"
    } else {
        "evacuation"
    };
    let new = NewEvacuation {
        id,
        kind,
        cluster_id: source_id,
        plan: &plan,
        actor,
        now,
        rebalance_hold_down: match request {
            PlanRequest::Rebalance(goal) => Some(hold_down_secs(goal, settings)),
            PlanRequest::Evacuation { .. } => None,
        },
    };
    // Its migrations land with it: a scheduler round never sees the evacuation without them
    // (and would end it as done).
    let queue = |clusters: &HashMap<String, Uuid>| {
        let mut queued = Vec::with_capacity(plan.moves.len());
        for m in &plan.moves {
            let (Some(&source), Some(&target)) = (
                clusters.get(m.vm.cluster.as_str()),
                clusters.get(m.target_cluster.as_str()),
            ) else {
                continue;
            };
            queued.push(NewMigration {
                id: m.id,
                queued: QueuedMigration {
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
                },
                trace_id: crate::orchestration::migration_trace::trace_id_text(m.id),
            });
        }
        queued
    };
    // A rebalance checks its hold-down and records itself in one serialised transaction.
    let queued = match EvacuationRows::new(store.clone()).start(new, queue).await? {
        Started::Queued(queued) => queued,
        Started::HeldDown {
            last,
            hold_down,
            until,
        } => {
            return Err(MigrateError::Conflict(format!(
                "a rebalance started at {last}; the hold-down time ({hold_down} s, the longer of the request's holdDownSeconds and the hub's --rebalance-hold-down-secs) lets the next start from {until}"
            )));
        }
    };
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
    let evacuations = EvacuationRows::new(store.clone());
    let row = evacuations
        .find(id)
        .await?
        .ok_or_else(|| MigrateError::NotFound(format!("evacuation {id} does not exist")))?;
    if row.state != EvacuationState::Running.as_str() {
        return Err(MigrateError::Conflict(format!(
            "evacuation {id} is {} and can no longer be cancelled",
            row.state
        )));
    }
    if !evacuations.cancel(id, store.clock.now()).await? {
        return Err(MigrateError::Conflict(format!(
            "evacuation {id} ended meanwhile"
        )));
    }
    let active = MigrationRows::new(store.clone())
        .not_ended_of_evacuation(id)
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
    let running: Vec<Uuid> = EvacuationRows::new(store.clone())
        .running()
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();
    if running.is_empty() {
        return Ok(());
    }
    let rows = MigrationRows::new(store.clone())
        .of_evacuations(running)
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
        let Some(options) = m.planned_options() else {
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
    let on_source = MigrationRows::new(store.clone())
        .vm_on_cluster(&m.vm_uid, m.source_cluster_id.unwrap_or_default())
        .await?;
    Ok(on_source.is_some_and(|v| v.phase == VmPhase::Running.as_str()))
}

/// Counts an evacuation's migrations: each VM's latest attempt decides.
pub async fn counters(
    store: &Store,
    e: &evacuation::Model,
    max_attempts: i32,
) -> Result<Counters, StoreError> {
    let rows = MigrationRows::new(store.clone())
        .of_evacuation(e.id)
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
        planned: e.planned_move_count(),
        cannot_move: e.cannot_move_count(),
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
    let evacuations = EvacuationRows::new(store.clone());
    let running = evacuations.running().await?;
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
        evacuations
            .finish(e.id, state, &c, store.clock.now())
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
        let planned = e.planned_seconds()?;
        return Some(started + chrono::Duration::milliseconds((planned * 1000.0) as i64));
    }
    let elapsed = (now - started).num_milliseconds().max(1) as f64;
    let per_byte = elapsed / done as f64;
    Some(now + chrono::Duration::milliseconds((per_byte * left as f64) as i64))
}
