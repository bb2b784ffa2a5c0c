//! The `migrations` table as stored: queuing a migration, reading rows, conditional phase
//! changes with their stamps, progress and switchover reports, recording a cancel, the in-flight
//! queries, and the scheduler's admission transaction (with its advisory lock). Also the few
//! reads of clusters and VMs a migration's driver needs (typed, JSON decoded here).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use drover_shared::inventory::{MigrationConfig, MigrationPhase};
use drover_shared::migration::{MigrationOptions, MigrationProgress};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, Statement, TransactionTrait,
};
use serde_json::json;
use uuid::Uuid;

use crate::store::entities::{cluster, migration, vm};
use crate::store::{Store, StoreError};

/// The advisory lock key that serialises admission across hub replicas ("drover-admit").
pub const ADMISSION_LOCK: i64 = 0x6472_6f76_6572_4144;

/// A migration to queue: what moves where, as planned.
#[derive(Debug, Clone)]
pub struct QueuedMigration {
    pub vm_uid: String,
    pub namespace: String,
    pub name: String,
    /// (id, name) of the source cluster.
    pub source_cluster: (Uuid, String),
    pub target_cluster: (Uuid, String),
    pub target_namespace: String,
    pub source_node: String,
    /// Memory plus disks.
    pub planned_bytes: i64,
    pub options: MigrationOptions,
    pub evacuation_id: Option<Uuid>,
    pub queue_position: i64,
    pub attempt: i32,
}

/// A migration to store as queued, under its id, with the trace id its row records.
#[derive(Debug, Clone)]
pub struct NewMigration {
    pub id: Uuid,
    pub queued: QueuedMigration,
    pub trace_id: String,
}

/// A cluster as a migration's driver needs it.
#[derive(Debug, Clone)]
pub struct MigrationCluster {
    pub id: Uuid,
    pub name: String,
    pub sync_endpoint: Option<String>,
    /// Its migration settings; None when the stored value cannot be read.
    pub migration_config: Option<MigrationConfig>,
}

impl From<cluster::Model> for MigrationCluster {
    fn from(c: cluster::Model) -> Self {
        Self {
            id: c.id,
            name: c.name,
            sync_endpoint: c.sync_endpoint,
            migration_config: serde_json::from_value(c.migration_config).ok(),
        }
    }
}

/// What one admission transaction read and decided.
pub struct Admission<T> {
    /// Every queued migration, in queue order.
    pub queued: Vec<migration::Model>,
    /// Every in-flight migration.
    pub running: Vec<migration::Model>,
    /// What the decision returned besides the ids to admit.
    pub decided: T,
    /// The migrations moved to Scheduled (each a conditional update from Pending).
    pub admitted: Vec<Uuid>,
    /// When they were admitted (the hub's clock, after the decision).
    pub now: DateTime<Utc>,
}

impl migration::Model {
    /// The phase, None for one this hub does not know.
    pub fn stored_phase(&self) -> Option<MigrationPhase> {
        MigrationPhase::parse(&self.phase)
    }

    /// The phase timestamps recorded in the row.
    pub fn phase_stamps(&self) -> BTreeMap<String, DateTime<Utc>> {
        serde_json::from_value(self.phase_timestamps.clone()).unwrap_or_default()
    }

    /// The options it was planned with; None when none (or none readable) are stored.
    pub fn planned_options(&self) -> Option<MigrationOptions> {
        self.options
            .clone()
            .and_then(|o| serde_json::from_value::<MigrationOptions>(o).ok())
    }
}

/// The error a driver gives up on: its row is gone.
pub fn row_gone(id: Uuid) -> StoreError {
    StoreError::Database(DbErr::RecordNotFound(format!("migration {id}")))
}

/// The error a driver gives up on: a stored value it cannot read.
pub fn unreadable(what: String) -> StoreError {
    StoreError::Database(DbErr::Custom(what))
}

/// Whether a driver should give up on `e` (its row is gone or unreadable) instead of retrying.
pub fn gone_or_unreadable(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Database(DbErr::RecordNotFound(_) | DbErr::Custom(_))
    )
}

/// Stores migration `q` as queued (`Pending`) through `db` (a transaction, when it must land
/// together with what it belongs to); false when a migration with that id exists already.
pub(crate) async fn insert_queued(
    db: &impl ConnectionTrait,
    new: &NewMigration,
    actor: &str,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let q = &new.queued;
    let stamps = BTreeMap::from([(MigrationPhase::Pending.as_str().to_owned(), now)]);
    let row = migration::ActiveModel {
        id: Set(new.id),
        vm_namespace: Set(q.namespace.clone()),
        vm_name: Set(q.name.clone()),
        vm_uid: Set(q.vm_uid.clone()),
        source_cluster_id: Set(Some(q.source_cluster.0)),
        target_cluster_id: Set(Some(q.target_cluster.0)),
        source_cluster_name: Set(q.source_cluster.1.clone()),
        target_cluster_name: Set(q.target_cluster.1.clone()),
        target_namespace: Set(q.target_namespace.clone()),
        storage_class_map: Set(json!({})),
        network_map: Set(json!({})),
        phase: Set(MigrationPhase::Pending.as_str().to_owned()),
        phase_timestamps: Set(json!(stamps)),
        bytes_total: Set(0),
        bytes_transferred: Set(0),
        bytes_remaining: Set(0),
        dirty_rate_bytes_per_sec: Set(0),
        throughput_bytes_per_sec: Set(0),
        failure_reason: Set(None),
        attempt: Set(q.attempt),
        evacuation_id: Set(q.evacuation_id),
        trace_id: Set(Some(new.trace_id.clone())),
        requested_by: Set(actor.to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
        finished_at: Set(None),
        queue_position: Set(q.queue_position),
        source_node: Set(q.source_node.clone()),
        planned_bytes: Set(q.planned_bytes),
        bandwidth_bytes_per_sec: Set(q.options.bandwidth_bytes_per_sec.min(i64::MAX as u64) as i64),
        options: Set(Some(json!(q.options))),
        switchover_at: Set(None),
    };
    let inserted = migration::Entity::insert(row)
        .on_conflict(
            sea_orm::sea_query::OnConflict::column(migration::Column::Id)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(db)
        .await?;
    Ok(inserted > 0)
}

/// The migrations table.
#[derive(Clone)]
pub struct MigrationRows {
    store: Store,
}

impl MigrationRows {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Stores a migration as queued; false when one with that id exists already.
    pub async fn insert_queued(
        &self,
        new: &NewMigration,
        actor: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        insert_queued(&self.store.db, new, actor, now).await
    }

    /// Every migration in flight (admitted and not ended).
    pub async fn in_flight(&self) -> Result<Vec<migration::Model>, StoreError> {
        Ok(migration::Entity::find()
            .filter(
                migration::Column::Phase
                    .is_in(MigrationPhase::IN_FLIGHT.iter().map(|p| p.as_str())),
            )
            .all(&self.store.db)
            .await?)
    }

    /// The migration `id`, if there is one.
    pub async fn find(&self, id: Uuid) -> Result<Option<migration::Model>, StoreError> {
        Ok(migration::Entity::find_by_id(id)
            .one(&self.store.db)
            .await?)
    }

    /// The migration `id`; [`row_gone`] when there is none.
    pub async fn get(&self, id: Uuid) -> Result<migration::Model, StoreError> {
        self.find(id).await?.ok_or_else(|| row_gone(id))
    }

    /// How many migrations of the VM `vm_uid` have not ended.
    pub async fn not_ended_of_vm(&self, vm_uid: &str) -> Result<u64, StoreError> {
        Ok(migration::Entity::find()
            .filter(migration::Column::VmUid.eq(vm_uid))
            .filter(
                migration::Column::Phase
                    .is_in(MigrationPhase::NOT_ENDED.iter().map(|p| p.as_str())),
            )
            .count(&self.store.db)
            .await?)
    }

    /// The migrations of evacuation `evacuation` that have not ended.
    pub async fn not_ended_of_evacuation(
        &self,
        evacuation: Uuid,
    ) -> Result<Vec<migration::Model>, StoreError> {
        Ok(migration::Entity::find()
            .filter(migration::Column::EvacuationId.eq(evacuation))
            .filter(
                migration::Column::Phase
                    .is_in(MigrationPhase::NOT_ENDED.iter().map(|p| p.as_str())),
            )
            .all(&self.store.db)
            .await?)
    }

    /// Every migration of evacuation `evacuation` (every attempt).
    pub async fn of_evacuation(
        &self,
        evacuation: Uuid,
    ) -> Result<Vec<migration::Model>, StoreError> {
        Ok(migration::Entity::find()
            .filter(migration::Column::EvacuationId.eq(evacuation))
            .all(&self.store.db)
            .await?)
    }

    /// Every migration of the evacuations `evacuations` (every attempt).
    pub async fn of_evacuations(
        &self,
        evacuations: Vec<Uuid>,
    ) -> Result<Vec<migration::Model>, StoreError> {
        Ok(migration::Entity::find()
            .filter(migration::Column::EvacuationId.is_in(evacuations))
            .all(&self.store.db)
            .await?)
    }

    /// Moves `id` to `phase` if it is in one of `from` (a conditional update: of two racing
    /// writers, exactly one wins), with `stamps` as its phase timestamps; an ended phase
    /// records `now` as the end, Succeeded clears the failure reason, and `failure` (when
    /// given) is recorded as the reason. False when it was not in `from`.
    pub async fn set_phase(
        &self,
        id: Uuid,
        from: &[MigrationPhase],
        phase: MigrationPhase,
        stamps: &BTreeMap<String, DateTime<Utc>>,
        failure: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = matches!(phase, MigrationPhase::Succeeded | MigrationPhase::Failed);
        let mut update = migration::Entity::update_many()
            .col_expr(migration::Column::Phase, phase.as_str().into())
            .col_expr(migration::Column::PhaseTimestamps, json!(stamps).into())
            .col_expr(migration::Column::UpdatedAt, now.into())
            .filter(migration::Column::Id.eq(id))
            .filter(migration::Column::Phase.is_in(from.iter().map(|p| p.as_str())));
        if done {
            update = update.col_expr(migration::Column::FinishedAt, Some(now).into());
        }
        if phase == MigrationPhase::Succeeded {
            update = update.col_expr(
                migration::Column::FailureReason,
                Option::<String>::None.into(),
            );
        }
        if let Some(reason) = failure {
            update = update.col_expr(migration::Column::FailureReason, Some(reason).into());
        }
        Ok(update.exec(&self.store.db).await?.rows_affected > 0)
    }

    /// Records `reason` as the cancel of running migration `id`, unless a reason is recorded
    /// already or the switchover began. False when nothing was recorded.
    pub async fn record_cancel(&self, id: Uuid, reason: String) -> Result<bool, StoreError> {
        Ok(migration::Entity::update_many()
            .col_expr(migration::Column::FailureReason, Some(reason).into())
            .filter(migration::Column::Id.eq(id))
            .filter(migration::Column::Phase.eq(MigrationPhase::Running.as_str()))
            .filter(migration::Column::FailureReason.is_null())
            .filter(migration::Column::SwitchoverAt.is_null())
            .exec(&self.store.db)
            .await?
            .rows_affected
            > 0)
    }

    /// Records that the switchover of running migration `id` (from source cluster `source`)
    /// began at `now`, unless it was recorded already.
    pub async fn record_switchover(
        &self,
        id: Uuid,
        source: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        migration::Entity::update_many()
            .col_expr(migration::Column::SwitchoverAt, Some(now).into())
            .filter(migration::Column::Id.eq(id))
            .filter(migration::Column::SourceClusterName.eq(source))
            .filter(migration::Column::Phase.eq(MigrationPhase::Running.as_str()))
            .filter(migration::Column::SwitchoverAt.is_null())
            .exec(&self.store.db)
            .await?;
        Ok(())
    }

    /// Records the progress the source cluster `source` reports of running migration `id`.
    pub async fn record_progress(
        &self,
        id: Uuid,
        source: &str,
        p: &MigrationProgress,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
        migration::Entity::update_many()
            .col_expr(migration::Column::BytesTotal, clamp(p.bytes_total).into())
            .col_expr(
                migration::Column::BytesTransferred,
                clamp(p.bytes_transferred).into(),
            )
            .col_expr(
                migration::Column::BytesRemaining,
                clamp(p.bytes_remaining).into(),
            )
            .col_expr(
                migration::Column::DirtyRateBytesPerSec,
                clamp(p.dirty_rate_bytes_per_sec).into(),
            )
            .col_expr(
                migration::Column::ThroughputBytesPerSec,
                clamp(p.throughput_bytes_per_sec).into(),
            )
            .col_expr(migration::Column::UpdatedAt, now.into())
            .filter(migration::Column::Id.eq(id))
            .filter(migration::Column::SourceClusterName.eq(source))
            .filter(migration::Column::Phase.eq(MigrationPhase::Running.as_str()))
            .exec(&self.store.db)
            .await?;
        Ok(())
    }

    /// The cluster named `name`, as a migration needs it.
    pub async fn cluster_named(&self, name: &str) -> Result<Option<MigrationCluster>, StoreError> {
        Ok(cluster::Entity::find()
            .filter(cluster::Column::Name.eq(name))
            .one(&self.store.db)
            .await?
            .map(MigrationCluster::from))
    }

    /// The VM `namespace`/`name` on cluster `cluster_id`.
    pub async fn vm_named(
        &self,
        cluster_id: Uuid,
        namespace: &str,
        name: &str,
    ) -> Result<Option<vm::Model>, StoreError> {
        Ok(vm::Entity::find()
            .filter(vm::Column::ClusterId.eq(cluster_id))
            .filter(vm::Column::Namespace.eq(namespace))
            .filter(vm::Column::Name.eq(name))
            .one(&self.store.db)
            .await?)
    }

    /// The VM with `uid` as cluster `cluster_id` reports it.
    pub async fn vm_on_cluster(
        &self,
        uid: &str,
        cluster_id: Uuid,
    ) -> Result<Option<vm::Model>, StoreError> {
        Ok(vm::Entity::find()
            .filter(vm::Column::Uid.eq(uid))
            .filter(vm::Column::ClusterId.eq(cluster_id))
            .one(&self.store.db)
            .await?)
    }

    /// Memory plus disks of the VM with `uid`; 0 when it is not in the inventory.
    pub async fn vm_bytes(&self, uid: &str) -> Result<u64, StoreError> {
        let vm = vm::Entity::find()
            .filter(vm::Column::Uid.eq(uid))
            .one(&self.store.db)
            .await?;
        Ok(vm.map_or(0, |v| {
            let disks: u64 = v
                .disks
                .as_array()
                .map(|d| d.iter().filter_map(|d| d["sizeBytes"].as_u64()).sum())
                .unwrap_or(0);
            v.memory_bytes.max(0) as u64 + disks
        }))
    }

    /// One admission, in one transaction (on PostgreSQL under the admission advisory lock; on
    /// SQLite one at a time in this process): reads the queue, the in-flight migrations and
    /// every cluster's migration settings (unreadable ones as the defaults), lets `decide`
    /// choose, and moves each chosen migration from Pending to Scheduled with its Scheduling
    /// and Scheduled stamps at the hub's time then. None when nothing is queued.
    pub async fn admit<T>(
        &self,
        decide: impl FnOnce(
            &[migration::Model],
            &[migration::Model],
            HashMap<String, MigrationConfig>,
        ) -> (T, Vec<Uuid>),
    ) -> Result<Option<Admission<T>>, StoreError> {
        // SQLite (one hub) has no advisory locks and its writers would only collide: one
        // admission at a time in this process. PostgreSQL serialises replicas with the lock
        // taken below.
        static SQLITE_ADMISSION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one = match self.store.backend() {
            DbBackend::Sqlite => Some(SQLITE_ADMISSION.lock().await),
            _ => None,
        };
        let tx = self.store.db.begin().await?;
        lock_admission(&tx).await?;
        let queued = migration::Entity::find()
            .filter(migration::Column::Phase.eq(MigrationPhase::Pending.as_str()))
            .order_by_asc(migration::Column::CreatedAt)
            .order_by_asc(migration::Column::QueuePosition)
            .all(&tx)
            .await?;
        if queued.is_empty() {
            tx.commit().await?;
            return Ok(None);
        }
        let running = migration::Entity::find()
            .filter(
                migration::Column::Phase
                    .is_in(MigrationPhase::IN_FLIGHT.iter().map(|p| p.as_str())),
            )
            .all(&tx)
            .await?;
        let configs: HashMap<String, MigrationConfig> = cluster::Entity::find()
            .all(&tx)
            .await?
            .into_iter()
            .map(|c| {
                (
                    c.name,
                    serde_json::from_value(c.migration_config).unwrap_or_default(),
                )
            })
            .collect();
        let (decided, chosen) = decide(&queued, &running, configs);
        let now = self.store.clock.now();
        let mut admitted = Vec::new();
        for id in chosen {
            let Some(row) = queued.iter().find(|r| r.id == id) else {
                continue;
            };
            let mut stamps = row.phase_stamps();
            for phase in [MigrationPhase::Scheduling, MigrationPhase::Scheduled] {
                stamps.entry(phase.as_str().to_owned()).or_insert(now);
            }
            let moved = migration::Entity::update_many()
                .col_expr(
                    migration::Column::Phase,
                    MigrationPhase::Scheduled.as_str().into(),
                )
                .col_expr(migration::Column::PhaseTimestamps, json!(stamps).into())
                .col_expr(migration::Column::UpdatedAt, now.into())
                .filter(migration::Column::Id.eq(row.id))
                .filter(migration::Column::Phase.eq(MigrationPhase::Pending.as_str()))
                .exec(&tx)
                .await?;
            if moved.rows_affected > 0 {
                admitted.push(row.id);
            }
        }
        tx.commit().await?;
        Ok(Some(Admission {
            queued,
            running,
            decided,
            admitted,
            now,
        }))
    }
}

/// Serialises admission across hub replicas (PostgreSQL); SQLite serves one hub and serialises
/// writers itself.
async fn lock_admission(tx: &sea_orm::DatabaseTransaction) -> Result<(), StoreError> {
    if tx.get_database_backend() == DbBackend::Postgres {
        tx.execute(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1)",
            [ADMISSION_LOCK.into()],
        ))
        .await?;
    }
    Ok(())
}
