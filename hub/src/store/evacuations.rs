//! The `evacuations` table as stored: starting an evacuation or rebalance in one transaction
//! with its queued migrations (a rebalance checks its hold-down inside its lock), cancelling,
//! finishing with its counters, the reads of running ones, what its stored plan says, and
//! cordoning a cluster.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use drover_shared::migration::EvacuationState;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait,
    QueryFilter, QueryOrder, Statement, TransactionTrait,
};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::core::planner::Plan;
use crate::store::entities::{cluster, evacuation};
use crate::store::migrations::{insert_queued, NewMigration};
use crate::store::{Store, StoreError};

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

/// Serialises starting rebalances across hub replicas (PostgreSQL advisory lock, held to the
/// end of the transaction) and within this process (SQLite), so that the hold-down check and
/// the new rebalance's row are one step: two racing requests never both start.
const REBALANCE_LOCK: i64 = 0x6472_6f76_6572_5242;

async fn lock_rebalances(tx: &sea_orm::DatabaseTransaction) -> Result<(), StoreError> {
    if tx.get_database_backend() == DbBackend::Postgres {
        tx.execute(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1)",
            [REBALANCE_LOCK.into()],
        ))
        .await?;
    }
    Ok(())
}

/// When the latest rebalance was started.
async fn last_rebalance_at(db: &impl ConnectionTrait) -> Result<Option<DateTime<Utc>>, StoreError> {
    Ok(evacuation::Entity::find()
        .filter(evacuation::Column::Kind.eq("rebalance"))
        .order_by_desc(evacuation::Column::CreatedAt)
        .one(db)
        .await?
        .map(|e| e.created_at))
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

impl evacuation::Model {
    /// How many VMs its stored plan moves.
    pub fn planned_move_count(&self) -> i64 {
        self.plan["moves"].as_array().map_or(0, |m| m.len() as i64)
    }

    /// How many VMs its stored plan cannot move.
    pub fn cannot_move_count(&self) -> i64 {
        self.plan["cannotMove"]
            .as_array()
            .map_or(0, |m| m.len() as i64)
    }

    /// How long its stored plan estimated it to take, in seconds.
    pub fn planned_seconds(&self) -> Option<f64> {
        self.plan["estimate"]["seconds"].as_f64()
    }
}

/// An evacuation or rebalance to store as started.
pub struct NewEvacuation<'a> {
    pub id: Uuid,
    /// "evacuation" or "rebalance".
    pub kind: &'static str,
    /// The evacuated cluster.
    pub cluster_id: Option<Uuid>,
    pub plan: &'a Plan,
    pub actor: &'a str,
    pub now: DateTime<Utc>,
    /// For a rebalance: its hold-down in seconds, checked against the latest rebalance.
    pub rebalance_hold_down: Option<u64>,
}

/// What starting stored.
#[derive(Debug)]
pub enum Started {
    /// Stored, with the ids of the migrations queued with it (those not queued before).
    Queued(Vec<Uuid>),
    /// Not stored: the rebalance started at `last` holds the next one down until `until`.
    HeldDown {
        last: DateTime<Utc>,
        hold_down: u64,
        until: DateTime<Utc>,
    },
}

/// The evacuations table.
#[derive(Clone)]
pub struct EvacuationRows {
    store: Store,
}

impl EvacuationRows {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// When the latest rebalance was started.
    pub async fn last_rebalance_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        last_rebalance_at(&self.store.db).await
    }

    /// Stores the evacuation and the migrations `queue` makes (given every cluster's id by
    /// name) in one transaction: a scheduler round never sees the evacuation without them. A
    /// rebalance checks its hold-down and records itself in one serialised transaction.
    pub async fn start(
        &self,
        new: NewEvacuation<'_>,
        queue: impl FnOnce(&HashMap<String, Uuid>) -> Vec<NewMigration>,
    ) -> Result<Started, StoreError> {
        static SQLITE_REBALANCES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = match (new.rebalance_hold_down, self.store.backend()) {
            (Some(_), DbBackend::Sqlite) => Some(SQLITE_REBALANCES.lock().await),
            _ => None,
        };
        let now = new.now;
        let tx = self.store.db.begin().await?;
        if let Some(hold_down) = new.rebalance_hold_down {
            lock_rebalances(&tx).await?;
            if let Some(last) = last_rebalance_at(&tx).await? {
                let until = last + chrono::Duration::seconds(hold_down.min(i64::MAX as u64) as i64);
                if now < until {
                    return Ok(Started::HeldDown {
                        last,
                        hold_down,
                        until,
                    });
                }
            }
        }
        evacuation::ActiveModel {
            id: Set(new.id),
            kind: Set(new.kind.to_owned()),
            cluster_id: Set(new.cluster_id),
            state: Set(EvacuationState::Running.as_str().to_owned()),
            plan: Set(json!(new.plan)),
            limits: Set(json!(new.plan.limits)),
            counters: Set(json!({})),
            deadline: Set(None),
            schedule_id: Set(None),
            created_by: Set(new.actor.to_owned()),
            created_at: Set(now),
            started_at: Set(Some(now)),
            finished_at: Set(None),
        }
        .insert(&tx)
        .await?;
        let clusters: HashMap<String, Uuid> = cluster::Entity::find()
            .all(&tx)
            .await?
            .into_iter()
            .map(|c| (c.name, c.id))
            .collect();
        let mut queued = Vec::new();
        for m in queue(&clusters) {
            if insert_queued(&tx, &m, new.actor, now).await? {
                queued.push(m.id);
            }
        }
        tx.commit().await?;
        Ok(Started::Queued(queued))
    }

    /// The evacuation `id`, if there is one.
    pub async fn find(&self, id: Uuid) -> Result<Option<evacuation::Model>, StoreError> {
        Ok(evacuation::Entity::find_by_id(id)
            .one(&self.store.db)
            .await?)
    }

    /// Marks running evacuation `id` cancelled at `now`; false when it is not running.
    pub async fn cancel(&self, id: Uuid, now: DateTime<Utc>) -> Result<bool, StoreError> {
        Ok(evacuation::Entity::update_many()
            .col_expr(
                evacuation::Column::State,
                EvacuationState::Cancelled.as_str().into(),
            )
            .col_expr(evacuation::Column::FinishedAt, Some(now).into())
            .filter(evacuation::Column::Id.eq(id))
            .filter(evacuation::Column::State.eq(EvacuationState::Running.as_str()))
            .exec(&self.store.db)
            .await?
            .rows_affected
            > 0)
    }

    /// Every running evacuation.
    pub async fn running(&self) -> Result<Vec<evacuation::Model>, StoreError> {
        Ok(evacuation::Entity::find()
            .filter(evacuation::Column::State.eq(EvacuationState::Running.as_str()))
            .all(&self.store.db)
            .await?)
    }

    /// Ends running evacuation `id` in `state` with its final `counters` at `now`.
    pub async fn finish(
        &self,
        id: Uuid,
        state: EvacuationState,
        counters: &Counters,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        evacuation::Entity::update_many()
            .col_expr(evacuation::Column::State, state.as_str().into())
            .col_expr(evacuation::Column::Counters, json!(counters).into())
            .col_expr(evacuation::Column::FinishedAt, Some(now).into())
            .filter(evacuation::Column::Id.eq(id))
            .filter(evacuation::Column::State.eq(EvacuationState::Running.as_str()))
            .exec(&self.store.db)
            .await?;
        Ok(())
    }
}
