//! The hub's side of the GraphQL API: [`FleetReader`] over the inventory store. Each method is
//! one SQL statement (the fleet summary a few), whatever the number of rows, so a request's cost
//! does not grow with its results.

use std::collections::HashMap;

use async_trait::async_trait;
use drover_graphql::model::*;
use drover_graphql::{FleetReader, ReadError};
use drover_shared::inventory::{ClusterHealth, MigrationPhase, RunStrategy, RuntimeKind, VmPhase};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QueryResult, QuerySelect,
};
use uuid::Uuid;

use crate::store::entities::{cluster, migration, node, vm};
use crate::store::{is_unavailable, sql::Sql, Store};

#[derive(Clone)]
pub struct StoreReader {
    store: Store,
}

impl StoreReader {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    fn backend(&self) -> DbBackend {
        self.store.backend()
    }
}

fn db_err(e: DbErr) -> ReadError {
    if is_unavailable(&e) {
        ReadError::Unavailable(e.to_string())
    } else {
        ReadError::Internal(e.to_string())
    }
}

fn corrupt(what: &str, value: &str) -> ReadError {
    ReadError::Internal(format!("stored {what} {value:?} is not one this hub knows"))
}

fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    value: serde_json::Value,
) -> Result<T, ReadError> {
    serde_json::from_value(value)
        .map_err(|e| ReadError::Internal(format!("stored {what} is malformed: {e}")))
}

fn cluster_record(m: cluster::Model) -> Result<ClusterRecord, ReadError> {
    Ok(ClusterRecord {
        id: m.id,
        runtime: RuntimeKind::parse(&m.runtime).ok_or_else(|| corrupt("runtime", &m.runtime))?,
        health: ClusterHealth::parse(&m.health).ok_or_else(|| corrupt("health", &m.health))?,
        platform_version: m.platform_version,
        virtualization_version: m.virtualization_version,
        cpu_models: from_json("cpu models", m.cpu_models)?,
        feature_gates: from_json("feature gates", m.feature_gates)?,
        migration_config: from_json("migration configuration", m.migration_config)?,
        storage_classes: from_json("storage classes", m.storage_classes)?,
        networks: from_json("networks", m.networks)?,
        sync_endpoint: m.sync_endpoint,
        last_heartbeat_at: m.last_heartbeat_at,
        maintenance: m.maintenance,
        maintenance_since: m.maintenance_since,
        inventory_generation: m.inventory_generation,
        created_at: m.created_at,
        updated_at: m.updated_at,
        name: m.name,
    })
}

fn node_record(m: node::Model) -> Result<NodeRecord, ReadError> {
    Ok(NodeRecord {
        id: m.id,
        cluster_id: m.cluster_id,
        name: m.name,
        cpu_model: m.cpu_model,
        allocatable_memory_bytes: m.allocatable_memory_bytes,
        allocatable_cpu_millis: m.allocatable_cpu_millis,
        requested_memory_bytes: m.requested_memory_bytes,
        requested_cpu_millis: m.requested_cpu_millis,
        schedulable: m.schedulable,
        labels: from_json("node labels", m.labels)?,
    })
}

fn vm_record(m: vm::Model) -> Result<VmRecord, ReadError> {
    Ok(VmRecord {
        id: m.id,
        cluster_id: m.cluster_id,
        run_strategy: RunStrategy::parse(&m.run_strategy)
            .ok_or_else(|| corrupt("run strategy", &m.run_strategy))?,
        phase: VmPhase::parse(&m.phase).ok_or_else(|| corrupt("phase", &m.phase))?,
        namespace: m.namespace,
        name: m.name,
        uid: m.uid,
        node: m.node_name,
        memory_bytes: m.memory_bytes,
        vcpus: m.vcpus,
        disks: from_json("disks", m.disks)?,
        interfaces: from_json("interfaces", m.interfaces)?,
        migratable: m.migratable,
        non_migratable_reasons: from_json("non-migratable reasons", m.non_migratable_reasons)?,
        generation: m.generation,
        updated_at: m.updated_at,
    })
}

fn migration_record(m: migration::Model) -> Result<MigrationRecord, ReadError> {
    Ok(MigrationRecord {
        id: m.id,
        phase: MigrationPhase::parse(&m.phase).ok_or_else(|| corrupt("phase", &m.phase))?,
        vm_namespace: m.vm_namespace,
        vm_name: m.vm_name,
        vm_uid: m.vm_uid,
        source_cluster_id: m.source_cluster_id,
        target_cluster_id: m.target_cluster_id,
        source_cluster_name: m.source_cluster_name,
        target_cluster_name: m.target_cluster_name,
        target_namespace: m.target_namespace,
        phase_timestamps: from_json("phase timestamps", m.phase_timestamps)?,
        bytes_total: m.bytes_total,
        bytes_transferred: m.bytes_transferred,
        bytes_remaining: m.bytes_remaining,
        dirty_rate_bytes_per_sec: m.dirty_rate_bytes_per_sec,
        throughput_bytes_per_sec: m.throughput_bytes_per_sec,
        failure_reason: m.failure_reason,
        attempt: m.attempt,
        evacuation_id: m.evacuation_id,
        trace_id: m.trace_id,
        requested_by: m.requested_by,
        created_at: m.created_at,
        updated_at: m.updated_at,
    })
}

fn get<T: sea_orm::TryGetable>(row: &QueryResult, col: &str) -> Result<T, ReadError> {
    row.try_get("", col).map_err(db_err)
}

/// `CAST(COALESCE(SUM(expr), 0) AS BIGINT)`: PostgreSQL sums bigints into numerics.
fn sum(expr: &str, alias: &str) -> String {
    format!("CAST(COALESCE(SUM({expr}), 0) AS BIGINT) AS {alias}")
}

fn cluster_where(sql: &mut Sql, filter: &ClusterFilter) {
    sql.push(" WHERE 1 = 1");
    if let Some(h) = filter.health {
        sql.push(" AND c.health = ").bind(h.as_str());
    }
    if let Some(m) = filter.maintenance {
        sql.push(" AND c.maintenance = ").bind(m);
    }
    if let Some(sel) = &filter.label_selector {
        sql.label_selector(sel, "cluster_labels", "cluster_id", "c.id");
    }
}

fn vm_where(sql: &mut Sql, filter: &VmFilter) {
    if let Some(ns) = &filter.namespace {
        sql.push(" AND v.namespace = ").bind(ns.clone());
    }
    if let Some(p) = filter.phase {
        sql.push(" AND v.phase = ").bind(p.as_str());
    }
    if let Some(n) = &filter.node {
        sql.push(" AND v.node_name = ").bind(n.clone());
    }
    if let Some(m) = filter.migratable {
        sql.push(" AND v.migratable = ").bind(m);
    }
    if let Some(sel) = &filter.label_selector {
        sql.label_selector(sel, "vm_labels", "vm_id", "v.id");
    }
}

impl StoreReader {
    async fn labels_of(
        &self,
        table: &str,
        owner: &str,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, String, String)>, ReadError> {
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let mut sql = Sql::new(self.backend());
        sql.push("SELECT ")
            .push(owner)
            .push(" AS owner, key, value FROM ")
            .push(table)
            .push(" WHERE ")
            .in_ids(owner, ids);
        let rows = self.store.db.query_all(sql.build()).await.map_err(db_err)?;
        rows.iter()
            .map(|r| Ok((get(r, "owner")?, get(r, "key")?, get(r, "value")?)))
            .collect()
    }
}

#[async_trait]
impl FleetReader for StoreReader {
    async fn fleet_summary(&self) -> Result<FleetSummary, ReadError> {
        let db = &self.store.db;
        let mut summary = FleetSummary::default();

        let mut sql = Sql::new(self.backend());
        sql.push("SELECT health, CAST(COUNT(*) AS BIGINT) AS n, ")
            .push(&sum("CASE WHEN maintenance THEN 1 ELSE 0 END", "cordoned"))
            .push(" FROM clusters GROUP BY health");
        for row in db.query_all(sql.build()).await.map_err(db_err)? {
            let health: String = get(&row, "health")?;
            let health = ClusterHealth::parse(&health).ok_or_else(|| corrupt("health", &health))?;
            summary.clusters_by_health.push((health, get(&row, "n")?));
            summary.clusters_in_maintenance += get::<i64>(&row, "cordoned")?;
        }

        let mut sql = Sql::new(self.backend());
        sql.push("SELECT phase, CAST(COUNT(*) AS BIGINT) AS n, ")
            .push(&sum("memory_bytes", "memory"))
            .push(", ")
            .push(&sum("vcpus", "vcpus"))
            .push(", ")
            .push(&sum("CASE WHEN migratable THEN 0 ELSE 1 END", "pinned"))
            .push(" FROM virtual_machines GROUP BY phase ORDER BY phase");
        for row in db.query_all(sql.build()).await.map_err(db_err)? {
            let phase: String = get(&row, "phase")?;
            let phase = VmPhase::parse(&phase).ok_or_else(|| corrupt("phase", &phase))?;
            summary.vms_by_phase.push((phase, get(&row, "n")?));
            summary.vm_memory_bytes += get::<i64>(&row, "memory")?;
            summary.vm_vcpus += get::<i64>(&row, "vcpus")?;
            summary.vms_not_migratable += get::<i64>(&row, "pinned")?;
        }

        let mut sql = Sql::new(self.backend());
        sql.push("SELECT CAST(COUNT(*) AS BIGINT) AS n, ")
            .push(&capacity_columns())
            .push(" FROM nodes");
        if let Some(row) = db.query_one(sql.build()).await.map_err(db_err)? {
            summary.capacity = capacity_from(&row)?;
        }

        let mut sql = Sql::new(self.backend());
        sql.push("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM migrations WHERE phase IN ")
            .bind_list(MigrationPhase::IN_FLIGHT.iter().map(|p| p.as_str()));
        if let Some(row) = db.query_one(sql.build()).await.map_err(db_err)? {
            summary.migrations_in_flight = get(&row, "n")?;
        }
        Ok(summary)
    }

    async fn clusters(
        &self,
        filter: &ClusterFilter,
        page: &PageRequest,
    ) -> Result<Page<ClusterRecord>, ReadError> {
        let mut sql = Sql::new(self.backend());
        sql.push("SELECT c.* FROM clusters c");
        cluster_where(&mut sql, filter);
        if let Some(after) = &page.after {
            sql.push(" AND c.name > ").bind(after[0].clone());
        }
        sql.push(" ORDER BY c.name LIMIT ")
            .bind(page.first as i64 + 1);
        let rows = cluster::Entity::find()
            .from_raw_sql(sql.build())
            .all(&self.store.db)
            .await
            .map_err(db_err)?;
        let rows = rows
            .into_iter()
            .map(cluster_record)
            .collect::<Result<_, _>>()?;
        Ok(Page::from_overfetch(rows, page.first))
    }

    async fn count_clusters(&self, filter: &ClusterFilter) -> Result<i64, ReadError> {
        let mut sql = Sql::new(self.backend());
        sql.push("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM clusters c");
        cluster_where(&mut sql, filter);
        let row = self.store.db.query_one(sql.build()).await.map_err(db_err)?;
        row.map_or(Ok(0), |r| get(&r, "n"))
    }

    async fn clusters_by_name(&self, names: &[String]) -> Result<Vec<ClusterRecord>, ReadError> {
        cluster::Entity::find()
            .filter(cluster::Column::Name.is_in(names.iter().cloned()))
            .all(&self.store.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(cluster_record)
            .collect()
    }

    async fn clusters_by_id(&self, ids: &[Uuid]) -> Result<Vec<ClusterRecord>, ReadError> {
        cluster::Entity::find()
            .filter(cluster::Column::Id.is_in(ids.iter().copied()))
            .all(&self.store.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(cluster_record)
            .collect()
    }

    async fn cluster_labels(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, String, String)>, ReadError> {
        self.labels_of("cluster_labels", "cluster_id", ids).await
    }

    async fn nodes_of_clusters(&self, ids: &[Uuid]) -> Result<Vec<NodeRecord>, ReadError> {
        node::Entity::find()
            .filter(node::Column::ClusterId.is_in(ids.iter().copied()))
            .order_by_asc(node::Column::Name)
            .all(&self.store.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(node_record)
            .collect()
    }

    async fn capacity_of_clusters(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Capacity>, ReadError> {
        let mut sql = Sql::new(self.backend());
        sql.push("SELECT cluster_id, CAST(COUNT(*) AS BIGINT) AS n, ")
            .push(&capacity_columns())
            .push(" FROM nodes WHERE ")
            .in_ids("cluster_id", ids)
            .push(" GROUP BY cluster_id");
        let rows = self.store.db.query_all(sql.build()).await.map_err(db_err)?;
        rows.iter()
            .map(|r| Ok((get(r, "cluster_id")?, capacity_from(r)?)))
            .collect()
    }

    async fn vms(
        &self,
        filter: &VmFilter,
        page: &PageRequest,
    ) -> Result<Page<VmRecord>, ReadError> {
        let mut sql = Sql::new(self.backend());
        sql.push(
            "SELECT v.* FROM virtual_machines v JOIN clusters c ON c.id = v.cluster_id WHERE 1 = 1",
        );
        if let Some(id) = filter.cluster_id {
            sql.push(" AND v.cluster_id = ").bind(id);
        }
        vm_where(&mut sql, filter);
        if let Some(after) = &page.after {
            sql.push(" AND (c.name, v.namespace, v.name) > (")
                .bind(after[0].clone())
                .push(", ")
                .bind(after[1].clone())
                .push(", ")
                .bind(after[2].clone())
                .push(")");
        }
        sql.push(" ORDER BY c.name, v.namespace, v.name LIMIT ")
            .bind(page.first as i64 + 1);
        let rows = vm::Entity::find()
            .from_raw_sql(sql.build())
            .all(&self.store.db)
            .await
            .map_err(db_err)?;
        let rows: Vec<VmRecord> = rows.into_iter().map(vm_record).collect::<Result<_, _>>()?;
        Ok(Page::from_overfetch(rows, page.first))
    }

    async fn count_vms(&self, filter: &VmFilter) -> Result<i64, ReadError> {
        let mut sql = Sql::new(self.backend());
        sql.push("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM virtual_machines v WHERE 1 = 1");
        if let Some(id) = filter.cluster_id {
            sql.push(" AND v.cluster_id = ").bind(id);
        }
        vm_where(&mut sql, filter);
        let row = self.store.db.query_one(sql.build()).await.map_err(db_err)?;
        row.map_or(Ok(0), |r| get(&r, "n"))
    }

    async fn vms_of_clusters(
        &self,
        cluster_ids: &[Uuid],
        filter: &VmFilter,
        page: &PageRequest,
    ) -> Result<HashMap<Uuid, Page<VmRecord>>, ReadError> {
        let mut sql = Sql::new(self.backend());
        sql.push(
            "SELECT * FROM (SELECT v.*, ROW_NUMBER() OVER (PARTITION BY v.cluster_id ORDER BY v.namespace, v.name) AS rn \
             FROM virtual_machines v WHERE ",
        )
        .in_ids("v.cluster_id", cluster_ids);
        vm_where(&mut sql, filter);
        if let Some(after) = &page.after {
            sql.push(" AND (v.namespace, v.name) > (")
                .bind(after[0].clone())
                .push(", ")
                .bind(after[1].clone())
                .push(")");
        }
        sql.push(") ranked WHERE rn <= ")
            .bind(page.first as i64 + 1)
            .push(" ORDER BY cluster_id, rn");
        let rows = vm::Entity::find()
            .from_raw_sql(sql.build())
            .all(&self.store.db)
            .await
            .map_err(db_err)?;
        let all: Vec<VmRecord> = rows.into_iter().map(vm_record).collect::<Result<_, _>>()?;
        let mut grouped: HashMap<Uuid, Vec<VmRecord>> = HashMap::new();
        for v in all {
            grouped.entry(v.cluster_id).or_default().push(v);
        }
        Ok(grouped
            .into_iter()
            .map(|(id, rows)| (id, Page::from_overfetch(rows, page.first)))
            .collect())
    }

    async fn count_vms_of_clusters(
        &self,
        cluster_ids: &[Uuid],
        filter: &VmFilter,
    ) -> Result<HashMap<Uuid, i64>, ReadError> {
        let mut sql = Sql::new(self.backend());
        sql.push("SELECT v.cluster_id AS cluster_id, CAST(COUNT(*) AS BIGINT) AS n FROM virtual_machines v WHERE ")
            .in_ids("v.cluster_id", cluster_ids);
        vm_where(&mut sql, filter);
        sql.push(" GROUP BY v.cluster_id");
        let rows = self.store.db.query_all(sql.build()).await.map_err(db_err)?;
        rows.iter()
            .map(|r| Ok((get(r, "cluster_id")?, get(r, "n")?)))
            .collect()
    }

    async fn vm_by_ref(
        &self,
        cluster_id: Uuid,
        namespace: &str,
        name: &str,
    ) -> Result<Option<VmRecord>, ReadError> {
        vm::Entity::find()
            .filter(vm::Column::ClusterId.eq(cluster_id))
            .filter(vm::Column::Namespace.eq(namespace))
            .filter(vm::Column::Name.eq(name))
            .one(&self.store.db)
            .await
            .map_err(db_err)?
            .map(vm_record)
            .transpose()
    }

    async fn vm_labels(&self, vm_ids: &[Uuid]) -> Result<Vec<(Uuid, String, String)>, ReadError> {
        self.labels_of("vm_labels", "vm_id", vm_ids).await
    }

    async fn migrations(
        &self,
        filter: &MigrationFilter,
        page: &PageRequest,
    ) -> Result<Page<MigrationRecord>, ReadError> {
        let mut q = migration::Entity::find();
        if let Some(id) = filter.cluster_id {
            q = q.filter(
                migration::Column::SourceClusterId
                    .eq(id)
                    .or(migration::Column::TargetClusterId.eq(id)),
            );
        }
        if let Some(p) = filter.phase {
            q = q.filter(migration::Column::Phase.eq(p.as_str()));
        }
        if let Some(e) = filter.evacuation_id {
            q = q.filter(migration::Column::EvacuationId.eq(e));
        }
        if let Some(uid) = &filter.vm_uid {
            q = q.filter(migration::Column::VmUid.eq(uid.clone()));
        }
        if let Some(after) = &page.after {
            let id = Uuid::parse_str(&after[0])
                .map_err(|_| ReadError::Internal("cursor is not a migration id".into()))?;
            q = q.filter(migration::Column::Id.lt(id));
        }
        let rows = q
            .order_by_desc(migration::Column::Id)
            .limit(page.first as u64 + 1)
            .all(&self.store.db)
            .await
            .map_err(db_err)?;
        let rows = rows
            .into_iter()
            .map(migration_record)
            .collect::<Result<_, _>>()?;
        Ok(Page::from_overfetch(rows, page.first))
    }

    async fn migrations_by_id(&self, ids: &[Uuid]) -> Result<Vec<MigrationRecord>, ReadError> {
        migration::Entity::find()
            .filter(migration::Column::Id.is_in(ids.iter().copied()))
            .all(&self.store.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(migration_record)
            .collect()
    }
}

fn capacity_columns() -> String {
    [
        sum("allocatable_memory_bytes", "alloc_mem"),
        sum("requested_memory_bytes", "req_mem"),
        sum("allocatable_cpu_millis", "alloc_cpu"),
        sum("requested_cpu_millis", "req_cpu"),
    ]
    .join(", ")
}

fn capacity_from(row: &QueryResult) -> Result<Capacity, ReadError> {
    Ok(Capacity {
        nodes: get(row, "n")?,
        allocatable_memory_bytes: get(row, "alloc_mem")?,
        requested_memory_bytes: get(row, "req_mem")?,
        allocatable_cpu_millis: get(row, "alloc_cpu")?,
        requested_cpu_millis: get(row, "req_cpu")?,
    })
}
