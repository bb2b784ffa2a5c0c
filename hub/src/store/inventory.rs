//! Inventory as stored by ingest: a cluster's snapshot or delta written in one transaction
//! (cluster row locked, generation checked, nodes, virtual machines and labels replaced or
//! upserted), cluster health and heartbeats, silent clusters marked unreachable, and the
//! maintenance flag the seeded fleets set. Inventory lists and maps are encoded to their JSON
//! columns here.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use drover_shared::inventory::{
    normalize_mac, ClusterHealth, ClusterInfo, InvalidInventory, InventoryChange, InventoryDelta,
    InventorySnapshot, NodeInfo, VmInfo,
};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    QueryFilter, QuerySelect, TransactionTrait,
};
use uuid::Uuid;

use crate::store::entities::{cluster, cluster_label, node, vm, vm_label};
use crate::store::{sql::Sql, Store, StoreError};

/// Rows per INSERT: well under both backends' bound-parameter limits.
const CHUNK: usize = 400;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Invalid(#[from] InvalidInventory),
    #[error("inventory for cluster {cluster} refused: generation {got} is not newer than the hub's {have}; send a newer generation (or a full snapshot after a restart)")]
    StaleGeneration {
        cluster: String,
        got: u64,
        have: i64,
    },
    #[error("delta for cluster {cluster} refused: the hub has no inventory for it yet; send a full snapshot first")]
    UnknownCluster { cluster: String },
    #[error("cluster {cluster} is not in the fleet")]
    NoSuchCluster { cluster: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sea_orm::DbErr> for IngestError {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::Store(e.into())
    }
}

/// What an ingest changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestOutcome {
    pub cluster_id: Uuid,
    pub generation: u64,
    pub nodes_upserted: usize,
    pub nodes_removed: usize,
    pub vms_upserted: usize,
    pub vms_removed: usize,
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

fn cluster_columns(info: &ClusterInfo, model: &mut cluster::ActiveModel) {
    model.runtime = Set(info.runtime.as_str().to_owned());
    model.platform_version = Set(info.platform_version.clone());
    model.virtualization_version = Set(info.virtualization_version.clone());
    model.cpu_models = Set(to_json(&info.cpu_models));
    model.feature_gates = Set(to_json(&info.feature_gates));
    model.migration_config = Set(to_json(&info.migration_config));
    model.storage_classes = Set(to_json(&info.storage_classes));
    model.networks = Set(to_json(&info.networks));
    model.sync_endpoint = Set(info.sync_endpoint.clone());
}

fn node_model(cluster_id: Uuid, id: Uuid, n: &NodeInfo, now: DateTime<Utc>) -> node::ActiveModel {
    node::ActiveModel {
        id: Set(id),
        cluster_id: Set(cluster_id),
        name: Set(n.name.clone()),
        cpu_model: Set(n.cpu_model.clone()),
        allocatable_memory_bytes: Set(n.allocatable_memory_bytes as i64),
        allocatable_cpu_millis: Set(n.allocatable_cpu_millis as i64),
        requested_memory_bytes: Set(n.requested_memory_bytes as i64),
        requested_cpu_millis: Set(n.requested_cpu_millis as i64),
        schedulable: Set(n.schedulable),
        labels: Set(to_json(&n.labels)),
        updated_at: Set(now),
    }
}

fn vm_model(cluster_id: Uuid, id: Uuid, v: &VmInfo, now: DateTime<Utc>) -> vm::ActiveModel {
    let mut interfaces = v.interfaces.clone();
    for i in &mut interfaces {
        // validate() has already proved every MAC parses.
        i.mac = normalize_mac(&i.mac).unwrap_or_else(|_| i.mac.clone());
    }
    vm::ActiveModel {
        id: Set(id),
        cluster_id: Set(cluster_id),
        namespace: Set(v.namespace.clone()),
        name: Set(v.name.clone()),
        uid: Set(v.uid.clone()),
        run_strategy: Set(v.run_strategy.as_str().to_owned()),
        phase: Set(v.phase.as_str().to_owned()),
        node_name: Set(v.node.clone()),
        memory_bytes: Set(v.memory_bytes as i64),
        vcpus: Set(v.vcpus as i32),
        disks: Set(to_json(&v.disks)),
        interfaces: Set(to_json(&interfaces)),
        migratable: Set(v.migratable),
        non_migratable_reasons: Set(to_json(&v.non_migratable_reasons)),
        generation: Set(v.generation as i64),
        created_at: Set(now),
        updated_at: Set(now),
    }
}

/// Whether the store takes one writer at a time (SQLite): ingest then takes turns itself rather
/// than retrying on a busy database.
pub fn single_writer(store: &Store) -> bool {
    matches!(store.backend(), DbBackend::Sqlite)
}

/// Replaces everything the hub knows about a cluster with a snapshot (already validated), in one
/// transaction, creating the cluster on first sight. A stale generation is refused.
pub async fn apply_snapshot(
    store: &Store,
    snap: &InventorySnapshot,
    now: DateTime<Utc>,
) -> Result<IngestOutcome, IngestError> {
    let tx = store.db.begin().await?;
    let existing = lock_or_create_cluster(&tx, snap.cluster.as_str(), &snap.info, now).await?;
    check_generation(&existing, snap.generation)?;
    let cluster_id = existing.id;

    let mut model: cluster::ActiveModel = existing.into();
    cluster_columns(&snap.info, &mut model);
    model.inventory_generation = Set(snap.generation as i64);
    model.updated_at = Set(now);
    cluster::Entity::update(model).exec(&tx).await?;
    replace_cluster_labels(&tx, cluster_id, &snap.info.labels).await?;

    // Nodes: keep ids of nodes we know, remove the ones the cluster no longer has.
    let known_nodes: HashMap<String, Uuid> = node::Entity::find()
        .select_only()
        .columns([node::Column::Name, node::Column::Id])
        .filter(node::Column::ClusterId.eq(cluster_id))
        .into_tuple::<(String, Uuid)>()
        .all(&tx)
        .await?
        .into_iter()
        .collect();
    let wanted: HashSet<&str> = snap.nodes.iter().map(|n| n.name.as_str()).collect();
    let gone_nodes: Vec<Uuid> = known_nodes
        .iter()
        .filter(|(name, _)| !wanted.contains(name.as_str()))
        .map(|(_, id)| *id)
        .collect();
    delete_by_ids(&tx, "nodes", &gone_nodes).await?;
    let nodes: Vec<(Uuid, &NodeInfo)> = snap
        .nodes
        .iter()
        .map(|n| {
            (
                known_nodes
                    .get(&n.name)
                    .copied()
                    .unwrap_or_else(Uuid::now_v7),
                n,
            )
        })
        .collect();
    upsert_nodes(&tx, cluster_id, &nodes, now).await?;

    // Virtual machines, the same way.
    let known_vms = known_vm_ids(&tx, cluster_id).await?;
    let wanted: HashSet<(&str, &str)> = snap
        .vms
        .iter()
        .map(|v| (v.namespace.as_str(), v.name.as_str()))
        .collect();
    let gone_vms: Vec<Uuid> = known_vms
        .iter()
        .filter(|((ns, name), _)| !wanted.contains(&(ns.as_str(), name.as_str())))
        .map(|(_, id)| *id)
        .collect();
    delete_by_ids(&tx, "virtual_machines", &gone_vms).await?;
    let vms: Vec<(Uuid, &VmInfo)> = snap
        .vms
        .iter()
        .map(|v| {
            let key = (v.namespace.clone(), v.name.clone());
            (known_vms.get(&key).copied().unwrap_or_else(Uuid::now_v7), v)
        })
        .collect();
    upsert_vms(&tx, cluster_id, &vms, now).await?;

    tx.commit().await?;
    Ok(IngestOutcome {
        cluster_id,
        generation: snap.generation,
        nodes_upserted: nodes.len(),
        nodes_removed: gone_nodes.len(),
        vms_upserted: vms.len(),
        vms_removed: gone_vms.len(),
    })
}

/// Applies a delta (already validated) in one transaction; the cluster must have sent a snapshot
/// before, and a stale generation is refused.
pub async fn apply_delta(
    store: &Store,
    delta: &InventoryDelta,
    now: DateTime<Utc>,
) -> Result<IngestOutcome, IngestError> {
    let tx = store.db.begin().await?;
    let existing = lock_cluster(&tx, delta.cluster.as_str())
        .await?
        .ok_or_else(|| IngestError::UnknownCluster {
            cluster: delta.cluster.to_string(),
        })?;
    check_generation(&existing, delta.generation)?;
    let cluster_id = existing.id;

    // The last change to each object wins; order inside a delta is honoured that way.
    let mut info: Option<&ClusterInfo> = None;
    let mut node_changes: BTreeMap<&str, Option<&NodeInfo>> = BTreeMap::new();
    let mut vm_changes: BTreeMap<(&str, &str), Option<&VmInfo>> = BTreeMap::new();
    for change in &delta.changes {
        match change {
            InventoryChange::ClusterUpdated { info: i } => info = Some(i),
            InventoryChange::NodeUpserted { node } => {
                node_changes.insert(&node.name, Some(node));
            }
            InventoryChange::NodeRemoved { name } => {
                node_changes.insert(name, None);
            }
            InventoryChange::VmUpserted { vm } => {
                vm_changes.insert((&vm.namespace, &vm.name), Some(vm));
            }
            InventoryChange::VmRemoved { namespace, name } => {
                vm_changes.insert((namespace, name), None);
            }
        }
    }

    let mut model: cluster::ActiveModel = existing.into();
    if let Some(info) = info {
        cluster_columns(info, &mut model);
        replace_cluster_labels(&tx, cluster_id, &info.labels).await?;
    }
    model.inventory_generation = Set(delta.generation as i64);
    model.updated_at = Set(now);
    cluster::Entity::update(model).exec(&tx).await?;

    let mut outcome = IngestOutcome {
        cluster_id,
        generation: delta.generation,
        nodes_upserted: 0,
        nodes_removed: 0,
        vms_upserted: 0,
        vms_removed: 0,
    };

    if !node_changes.is_empty() {
        let names: Vec<String> = node_changes.keys().map(|n| n.to_string()).collect();
        let known: HashMap<String, Uuid> = node::Entity::find()
            .select_only()
            .columns([node::Column::Name, node::Column::Id])
            .filter(node::Column::ClusterId.eq(cluster_id))
            .filter(node::Column::Name.is_in(names))
            .into_tuple::<(String, Uuid)>()
            .all(&tx)
            .await?
            .into_iter()
            .collect();
        let mut removed = Vec::new();
        let mut upserts = Vec::new();
        for (name, change) in &node_changes {
            match change {
                None => removed.extend(known.get(*name).copied()),
                Some(n) => {
                    upserts.push((known.get(*name).copied().unwrap_or_else(Uuid::now_v7), *n))
                }
            }
        }
        delete_by_ids(&tx, "nodes", &removed).await?;
        upsert_nodes(&tx, cluster_id, &upserts, now).await?;
        outcome.nodes_removed = removed.len();
        outcome.nodes_upserted = upserts.len();
    }

    if !vm_changes.is_empty() {
        let known = vm_ids_for(&tx, cluster_id, vm_changes.keys().copied()).await?;
        let mut removed = Vec::new();
        let mut upserts = Vec::new();
        for ((ns, name), change) in &vm_changes {
            let id = known.get(&(ns.to_string(), name.to_string())).copied();
            match change {
                None => removed.extend(id),
                Some(v) => upserts.push((id.unwrap_or_else(Uuid::now_v7), *v)),
            }
        }
        delete_by_ids(&tx, "virtual_machines", &removed).await?;
        upsert_vms(&tx, cluster_id, &upserts, now).await?;
        outcome.vms_removed = removed.len();
        outcome.vms_upserted = upserts.len();
    }

    tx.commit().await?;
    Ok(outcome)
}

/// Records a cluster's health, and when it was last heard if `heard_at` is given, in one
/// statement; false when there is no cluster of that name.
pub async fn write_health(
    store: &Store,
    cluster: &str,
    health: ClusterHealth,
    heard_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<bool, IngestError> {
    let mut update = cluster::Entity::update_many()
        .col_expr(cluster::Column::Health, health.as_str().into())
        .col_expr(cluster::Column::UpdatedAt, now.into())
        .filter(cluster::Column::Name.eq(cluster));
    if let Some(at) = heard_at {
        update = update.col_expr(cluster::Column::LastHeartbeatAt, Some(at).into());
    }
    Ok(update.exec(&store.db).await?.rows_affected > 0)
}

/// Marks `Unreachable` every cluster with an agent identity whose last heartbeat is older than
/// `cutoff` (or that was never heard); returns their names. Clusters without an agent are left
/// alone.
pub async fn mark_silent_clusters_unreachable(
    store: &Store,
    cutoff: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Vec<String>, IngestError> {
    let mut sql = Sql::new(store.backend());
    sql.push("SELECT name FROM clusters WHERE health <> ")
        .bind(ClusterHealth::Unreachable.as_str())
        .push(" AND (last_heartbeat_at IS NULL OR last_heartbeat_at < ")
        .bind(cutoff)
        .push(
            ") AND name IN (SELECT cluster_name FROM agent_certificates WHERE revoked_at IS NULL)",
        );
    let rows = store.db.query_all(sql.build()).await?;
    let mut names = Vec::with_capacity(rows.len());
    for row in rows {
        names.push(row.try_get::<String>("", "name")?);
    }
    if names.is_empty() {
        return Ok(names);
    }
    cluster::Entity::update_many()
        .col_expr(
            cluster::Column::Health,
            ClusterHealth::Unreachable.as_str().into(),
        )
        .col_expr(cluster::Column::UpdatedAt, now.into())
        .filter(cluster::Column::Name.is_in(names.clone()))
        .filter(
            cluster::Column::LastHeartbeatAt
                .lt(cutoff)
                .or(cluster::Column::LastHeartbeatAt.is_null()),
        )
        .exec(&store.db)
        .await?;
    Ok(names)
}

/// Sets or clears a cluster's maintenance flag and since when (the seeded fleets cordon some).
pub async fn set_maintenance(
    store: &Store,
    cluster: &str,
    maintenance: bool,
    since: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    cluster::Entity::update_many()
        .col_expr(cluster::Column::Maintenance, maintenance.into())
        .col_expr(cluster::Column::MaintenanceSince, since.into())
        .filter(cluster::Column::Name.eq(cluster))
        .exec(&store.db)
        .await?;
    Ok(())
}

fn check_generation(existing: &cluster::Model, got: u64) -> Result<(), IngestError> {
    if (got as i64) <= existing.inventory_generation {
        return Err(IngestError::StaleGeneration {
            cluster: existing.name.clone(),
            got,
            have: existing.inventory_generation,
        });
    }
    Ok(())
}

/// Locks the cluster's row for this transaction (PostgreSQL; SQLite has one writer anyway).
async fn lock_cluster(
    tx: &DatabaseTransaction,
    name: &str,
) -> Result<Option<cluster::Model>, IngestError> {
    let mut q = cluster::Entity::find().filter(cluster::Column::Name.eq(name));
    if tx.get_database_backend() == DbBackend::Postgres {
        q = q.lock_exclusive();
    }
    Ok(q.one(tx).await?)
}

/// Creates the cluster if it is new (the write comes first so SQLite takes its write lock at
/// once), then locks it.
async fn lock_or_create_cluster(
    tx: &DatabaseTransaction,
    name: &str,
    info: &ClusterInfo,
    now: DateTime<Utc>,
) -> Result<cluster::Model, IngestError> {
    let mut fresh = cluster::ActiveModel {
        id: Set(Uuid::now_v7()),
        name: Set(name.to_owned()),
        health: Set(ClusterHealth::Ready.as_str().to_owned()),
        last_heartbeat_at: Set(Some(now)),
        maintenance: Set(false),
        maintenance_since: Set(None),
        inventory_generation: Set(-1),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    };
    cluster_columns(info, &mut fresh);
    cluster::Entity::insert(fresh)
        .on_conflict(
            OnConflict::column(cluster::Column::Name)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(tx)
        .await?;
    lock_cluster(tx, name)
        .await?
        .ok_or_else(|| IngestError::NoSuchCluster {
            cluster: name.to_owned(),
        })
}

async fn replace_cluster_labels(
    tx: &DatabaseTransaction,
    cluster_id: Uuid,
    labels: &BTreeMap<String, String>,
) -> Result<(), IngestError> {
    cluster_label::Entity::delete_many()
        .filter(cluster_label::Column::ClusterId.eq(cluster_id))
        .exec(tx)
        .await?;
    if !labels.is_empty() {
        cluster_label::Entity::insert_many(labels.iter().map(|(k, v)| {
            cluster_label::ActiveModel {
                cluster_id: Set(cluster_id),
                key: Set(k.clone()),
                value: Set(v.clone()),
            }
        }))
        .exec_without_returning(tx)
        .await?;
    }
    Ok(())
}

async fn delete_by_ids(
    tx: &DatabaseTransaction,
    table: &str,
    ids: &[Uuid],
) -> Result<(), IngestError> {
    for chunk in ids.chunks(CHUNK) {
        let mut sql = Sql::new(tx.get_database_backend());
        sql.push("DELETE FROM ")
            .push(table)
            .push(" WHERE ")
            .in_ids("id", chunk);
        tx.execute(sql.build()).await?;
    }
    Ok(())
}

async fn upsert_nodes(
    tx: &DatabaseTransaction,
    cluster_id: Uuid,
    nodes: &[(Uuid, &NodeInfo)],
    now: DateTime<Utc>,
) -> Result<(), IngestError> {
    for chunk in nodes.chunks(CHUNK) {
        node::Entity::insert_many(
            chunk
                .iter()
                .map(|(id, n)| node_model(cluster_id, *id, n, now)),
        )
        .on_conflict(
            OnConflict::columns([node::Column::ClusterId, node::Column::Name])
                .update_columns([
                    node::Column::CpuModel,
                    node::Column::AllocatableMemoryBytes,
                    node::Column::AllocatableCpuMillis,
                    node::Column::RequestedMemoryBytes,
                    node::Column::RequestedCpuMillis,
                    node::Column::Schedulable,
                    node::Column::Labels,
                    node::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec_without_returning(tx)
        .await?;
    }
    Ok(())
}

async fn known_vm_ids(
    tx: &DatabaseTransaction,
    cluster_id: Uuid,
) -> Result<HashMap<(String, String), Uuid>, IngestError> {
    Ok(vm::Entity::find()
        .select_only()
        .columns([vm::Column::Namespace, vm::Column::Name, vm::Column::Id])
        .filter(vm::Column::ClusterId.eq(cluster_id))
        .into_tuple::<(String, String, Uuid)>()
        .all(tx)
        .await?
        .into_iter()
        .map(|(ns, name, id)| ((ns, name), id))
        .collect())
}

async fn vm_ids_for<'a>(
    tx: &DatabaseTransaction,
    cluster_id: Uuid,
    keys: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<HashMap<(String, String), Uuid>, IngestError> {
    let keys: Vec<(&str, &str)> = keys.collect();
    let mut out = HashMap::with_capacity(keys.len());
    for chunk in keys.chunks(CHUNK) {
        let mut sql = Sql::new(tx.get_database_backend());
        sql.push("SELECT namespace, name, id FROM virtual_machines WHERE cluster_id = ")
            .bind(cluster_id)
            .push(" AND name IN ")
            .bind_list(chunk.iter().map(|(_, name)| name.to_string()));
        let wanted: HashSet<&(&str, &str)> = chunk.iter().collect();
        for row in tx.query_all(sql.build()).await? {
            let ns: String = row.try_get("", "namespace")?;
            let name: String = row.try_get("", "name")?;
            let id: Uuid = row.try_get("", "id")?;
            if wanted.contains(&(ns.as_str(), name.as_str())) {
                out.insert((ns, name), id);
            }
        }
    }
    Ok(out)
}

async fn upsert_vms(
    tx: &DatabaseTransaction,
    cluster_id: Uuid,
    vms: &[(Uuid, &VmInfo)],
    now: DateTime<Utc>,
) -> Result<(), IngestError> {
    for chunk in vms.chunks(CHUNK) {
        vm::Entity::insert_many(
            chunk
                .iter()
                .map(|(id, v)| vm_model(cluster_id, *id, v, now)),
        )
        .on_conflict(
            OnConflict::columns([
                vm::Column::ClusterId,
                vm::Column::Namespace,
                vm::Column::Name,
            ])
            .update_columns([
                vm::Column::Uid,
                vm::Column::RunStrategy,
                vm::Column::Phase,
                vm::Column::NodeName,
                vm::Column::MemoryBytes,
                vm::Column::Vcpus,
                vm::Column::Disks,
                vm::Column::Interfaces,
                vm::Column::Migratable,
                vm::Column::NonMigratableReasons,
                vm::Column::Generation,
                vm::Column::UpdatedAt,
            ])
            .to_owned(),
        )
        .exec_without_returning(tx)
        .await?;
        // Labels are replaced whole for the virtual machines in this chunk.
        let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
        let mut sql = Sql::new(tx.get_database_backend());
        sql.push("DELETE FROM vm_labels WHERE ")
            .in_ids("vm_id", &ids);
        tx.execute(sql.build()).await?;
        let labels: Vec<vm_label::ActiveModel> = chunk
            .iter()
            .flat_map(|(id, v)| {
                v.labels.iter().map(move |(k, val)| vm_label::ActiveModel {
                    vm_id: Set(*id),
                    key: Set(k.clone()),
                    value: Set(val.clone()),
                })
            })
            .collect();
        for labels in labels.chunks(CHUNK * 2) {
            vm_label::Entity::insert_many(labels.to_vec())
                .exec_without_returning(tx)
                .await?;
        }
    }
    Ok(())
}
