//! Fleet reads: the fleet as the planner sees it (every cluster with its nodes and VMs, the
//! reservations of queued and running migrations, the policies, when each VM last moved), and the
//! GraphQL reader's queries (one SQL statement each, the fleet summary a few), returned as typed
//! rows with their stored strings and JSON columns decoded.

use std::collections::{BTreeMap, HashMap};

use drover_graphql::model::{ClusterFilter, MigrationFilter, PageRequest, VmFilter};
use drover_shared::inventory::{
    ClusterHealth, ClusterInfo, MigrationPhase, NodeInfo, RunStrategy, RuntimeKind, VmInfo, VmPhase,
};
use drover_shared::{ClusterName, Namespace, VmName, VmRef};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QueryResult, QuerySelect,
};
use uuid::Uuid;

use crate::core::planner::{Fleet, FleetCluster, Plan, Reservation};
use crate::store::entities::{cluster, cluster_label, evacuation, migration, node, vm, vm_label};
use crate::store::{is_unavailable, sql::Sql, Store, StoreError};

fn json_list(value: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(value.clone()).unwrap_or_default()
}

/// The fleet as the planner sees it: every cluster with its nodes and VMs, the memory, MACs and
/// names that queued and running migrations hold on their targets, the policies, and when each
/// VM last moved.
pub async fn load_fleet(store: &Store) -> Result<Fleet, StoreError> {
    let db = &store.db;
    let clusters = cluster::Entity::find()
        .order_by_asc(cluster::Column::Name)
        .all(db)
        .await?;
    let mut cluster_labels: HashMap<Uuid, BTreeMap<String, String>> = HashMap::new();
    for l in cluster_label::Entity::find().all(db).await? {
        cluster_labels
            .entry(l.cluster_id)
            .or_default()
            .insert(l.key, l.value);
    }
    let nodes = node::Entity::find().all(db).await?;
    let vms = vm::Entity::find().all(db).await?;
    let mut labels: HashMap<Uuid, BTreeMap<String, String>> = HashMap::new();
    for l in vm_label::Entity::find().all(db).await? {
        labels.entry(l.vm_id).or_default().insert(l.key, l.value);
    }
    let names: HashMap<Uuid, &str> = clusters.iter().map(|c| (c.id, c.name.as_str())).collect();
    let vm_info = |v: &vm::Model, labels: BTreeMap<String, String>| VmInfo {
        namespace: v.namespace.clone(),
        name: v.name.clone(),
        uid: v.uid.clone(),
        run_strategy: RunStrategy::parse(&v.run_strategy).unwrap_or(RunStrategy::Always),
        phase: VmPhase::parse(&v.phase).unwrap_or(VmPhase::Unknown),
        node: v.node_name.clone(),
        memory_bytes: v.memory_bytes.max(0) as u64,
        vcpus: v.vcpus.max(0) as u32,
        disks: serde_json::from_value(v.disks.clone()).unwrap_or_default(),
        interfaces: serde_json::from_value(v.interfaces.clone()).unwrap_or_default(),
        labels,
        migratable: v.migratable,
        non_migratable_reasons: json_list(&v.non_migratable_reasons),
        generation: v.generation.max(0) as u64,
    };
    let mut by_uid: HashMap<&str, (&vm::Model, BTreeMap<String, String>)> = HashMap::new();
    for v in &vms {
        by_uid.insert(
            v.uid.as_str(),
            (v, labels.get(&v.id).cloned().unwrap_or_default()),
        );
    }
    let mut fleet = Fleet::default();
    for c in &clusters {
        let Ok(name) = ClusterName::new(c.name.clone()) else {
            continue;
        };
        fleet.clusters.push(FleetCluster {
            name,
            health: ClusterHealth::parse(&c.health).unwrap_or(ClusterHealth::Unreachable),
            cordoned: c.maintenance,
            info: ClusterInfo {
                runtime: RuntimeKind::parse(&c.runtime).unwrap_or(RuntimeKind::Kubevirt),
                platform_version: c.platform_version.clone(),
                virtualization_version: c.virtualization_version.clone(),
                labels: cluster_labels.remove(&c.id).unwrap_or_default(),
                cpu_models: json_list(&c.cpu_models),
                feature_gates: json_list(&c.feature_gates),
                migration_config: serde_json::from_value(c.migration_config.clone())
                    .unwrap_or_default(),
                storage_classes: serde_json::from_value(c.storage_classes.clone())
                    .unwrap_or_default(),
                networks: json_list(&c.networks),
                sync_endpoint: c.sync_endpoint.clone().filter(|s| !s.is_empty()),
            },
            nodes: nodes
                .iter()
                .filter(|n| n.cluster_id == c.id)
                .map(|n| NodeInfo {
                    name: n.name.clone(),
                    cpu_model: n.cpu_model.clone(),
                    allocatable_memory_bytes: n.allocatable_memory_bytes.max(0) as u64,
                    allocatable_cpu_millis: n.allocatable_cpu_millis.max(0) as u64,
                    requested_memory_bytes: n.requested_memory_bytes.max(0) as u64,
                    requested_cpu_millis: n.requested_cpu_millis.max(0) as u64,
                    schedulable: n.schedulable,
                    labels: serde_json::from_value(n.labels.clone()).unwrap_or_default(),
                })
                .collect(),
            vms: vms
                .iter()
                .filter(|v| v.cluster_id == c.id)
                .map(|v| vm_info(v, labels.get(&v.id).cloned().unwrap_or_default()))
                .collect(),
            namespace_labels: BTreeMap::new(),
        });
    }
    for m in migration::Entity::find()
        .filter(
            migration::Column::Phase.is_in(MigrationPhase::NOT_ENDED.iter().map(|p| p.as_str())),
        )
        .all(db)
        .await?
    {
        let (Ok(source), Ok(target), Ok(namespace), Ok(name)) = (
            ClusterName::new(m.source_cluster_name.clone()),
            ClusterName::new(m.target_cluster_name.clone()),
            Namespace::new(m.vm_namespace.clone()),
            VmName::new(m.vm_name.clone()),
        ) else {
            continue;
        };
        let (memory, macs, labels) = match by_uid.get(m.vm_uid.as_str()) {
            Some((v, labels)) => (
                v.memory_bytes.max(0) as u64,
                vm_info(v, BTreeMap::new())
                    .interfaces
                    .into_iter()
                    .map(|i| i.mac)
                    .collect(),
                labels.clone(),
            ),
            None => (0, Vec::new(), BTreeMap::new()),
        };
        fleet.reservations.push(Reservation {
            migration_id: m.id,
            vm: VmRef {
                cluster: source,
                namespace,
                name,
            },
            target_cluster: target,
            target_node: None,
            target_namespace: m.target_namespace.clone(),
            memory_bytes: memory,
            macs,
            labels,
        });
    }
    fleet.policies = crate::store::policies::load(store).await?;
    for m in migration::Entity::find()
        .filter(migration::Column::Phase.eq(MigrationPhase::Succeeded.as_str()))
        .all(db)
        .await?
    {
        let (Some(at), Some(Ok(cluster)), Ok(namespace), Ok(name)) = (
            m.finished_at,
            m.target_cluster_id
                .and_then(|t| names.get(&t).map(|n| ClusterName::new(n.to_string()))),
            Namespace::new(m.target_namespace.clone()),
            VmName::new(m.vm_name.clone()),
        ) else {
            continue;
        };
        let key = VmRef {
            cluster,
            namespace,
            name,
        };
        let e = fleet.last_moved.entry(key).or_insert(at);
        *e = (*e).max(at);
    }
    Ok(fleet)
}

/// Why a read for the API failed: the database cannot be reached now, or something else (a
/// failed statement, a stored value this hub cannot read, a bad cursor), with its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFailure {
    Unavailable(String),
    Internal(String),
}

fn db_err(e: DbErr) -> ReadFailure {
    if is_unavailable(&e) {
        ReadFailure::Unavailable(e.to_string())
    } else {
        ReadFailure::Internal(e.to_string())
    }
}

fn corrupt(what: &str, value: &str) -> ReadFailure {
    ReadFailure::Internal(format!("stored {what} {value:?} is not one this hub knows"))
}

fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    value: serde_json::Value,
) -> Result<T, ReadFailure> {
    serde_json::from_value(value)
        .map_err(|e| ReadFailure::Internal(format!("stored {what} is malformed: {e}")))
}

fn get<T: sea_orm::TryGetable>(row: &QueryResult, col: &str) -> Result<T, ReadFailure> {
    row.try_get("", col).map_err(db_err)
}

/// A cluster row, decoded: the API reader's record as it is.
pub type ClusterRow = drover_graphql::model::ClusterRecord;

/// A node row, decoded: the API reader's record as it is.
pub type NodeRow = drover_graphql::model::NodeRecord;

/// A vm row, decoded: the API reader's record as it is.
pub type VmRow = drover_graphql::model::VmRecord;

/// A migration row, decoded: the API reader's record as it is.
pub type MigrationRow = drover_graphql::model::MigrationRecord;

/// Node count and summed capacity of a set of nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeTotals {
    pub nodes: i64,
    pub allocatable_memory_bytes: i64,
    pub requested_memory_bytes: i64,
    pub allocatable_cpu_millis: i64,
    pub requested_cpu_millis: i64,
}

/// The fleet summary's counts, as the database adds them up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SummaryRows {
    /// Per health: how many clusters, and how many of them are in maintenance.
    pub clusters_by_health: Vec<(ClusterHealth, i64, i64)>,
    /// Per phase: how many VMs, their memory, their vCPUs, and how many cannot migrate.
    pub vms_by_phase: Vec<VmPhaseTotals>,
    /// All nodes; `None` when the database returned no row.
    pub capacity: Option<NodeTotals>,
    /// Migrations in flight; `None` when the database returned no row.
    pub migrations_in_flight: Option<i64>,
}

/// One phase's virtual machines, added up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmPhaseTotals {
    pub phase: VmPhase,
    pub vms: i64,
    pub memory_bytes: i64,
    pub vcpus: i64,
    pub not_migratable: i64,
}

fn cluster_row(m: cluster::Model) -> Result<ClusterRow, ReadFailure> {
    Ok(ClusterRow {
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

fn node_row(m: node::Model) -> Result<NodeRow, ReadFailure> {
    Ok(NodeRow {
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

fn vm_row(m: vm::Model) -> Result<VmRow, ReadFailure> {
    Ok(VmRow {
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

fn migration_row(m: migration::Model) -> Result<MigrationRow, ReadFailure> {
    Ok(MigrationRow {
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

fn capacity_columns() -> String {
    [
        sum("allocatable_memory_bytes", "alloc_mem"),
        sum("requested_memory_bytes", "req_mem"),
        sum("allocatable_cpu_millis", "alloc_cpu"),
        sum("requested_cpu_millis", "req_cpu"),
    ]
    .join(", ")
}

fn capacity_from(row: &QueryResult) -> Result<NodeTotals, ReadFailure> {
    Ok(NodeTotals {
        nodes: get(row, "n")?,
        allocatable_memory_bytes: get(row, "alloc_mem")?,
        requested_memory_bytes: get(row, "req_mem")?,
        allocatable_cpu_millis: get(row, "alloc_cpu")?,
        requested_cpu_millis: get(row, "req_cpu")?,
    })
}

/// The GraphQL reader's queries over the inventory store. Each method is one SQL statement (the
/// fleet summary a few), whatever the number of rows. Lists are fetched one row past the page
/// (`first + 1`) so the caller can tell whether there is a next page.
#[derive(Clone)]
pub struct FleetRows {
    store: Store,
}

impl FleetRows {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    fn backend(&self) -> DbBackend {
        self.store.backend()
    }

    /// `(owner id, key, value)` for every label of the given owners, from `table`.
    async fn labels_of(
        &self,
        table: &str,
        owner: &str,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, String, String)>, ReadFailure> {
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

    /// Clusters per health, VMs per phase, all nodes' capacity and migrations in flight.
    pub async fn summary(&self) -> Result<SummaryRows, ReadFailure> {
        let db = &self.store.db;
        let mut summary = SummaryRows::default();

        let mut sql = Sql::new(self.backend());
        sql.push("SELECT health, CAST(COUNT(*) AS BIGINT) AS n, ")
            .push(&sum("CASE WHEN maintenance THEN 1 ELSE 0 END", "cordoned"))
            .push(" FROM clusters GROUP BY health");
        for row in db.query_all(sql.build()).await.map_err(db_err)? {
            let health: String = get(&row, "health")?;
            let health = ClusterHealth::parse(&health).ok_or_else(|| corrupt("health", &health))?;
            let n = get(&row, "n")?;
            summary
                .clusters_by_health
                .push((health, n, get::<i64>(&row, "cordoned")?));
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
            summary.vms_by_phase.push(VmPhaseTotals {
                phase,
                vms: get(&row, "n")?,
                memory_bytes: get::<i64>(&row, "memory")?,
                vcpus: get::<i64>(&row, "vcpus")?,
                not_migratable: get::<i64>(&row, "pinned")?,
            });
        }

        let mut sql = Sql::new(self.backend());
        sql.push("SELECT CAST(COUNT(*) AS BIGINT) AS n, ")
            .push(&capacity_columns())
            .push(" FROM nodes");
        if let Some(row) = db.query_one(sql.build()).await.map_err(db_err)? {
            summary.capacity = Some(capacity_from(&row)?);
        }

        let mut sql = Sql::new(self.backend());
        sql.push("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM migrations WHERE phase IN ")
            .bind_list(MigrationPhase::IN_FLIGHT.iter().map(|p| p.as_str()));
        if let Some(row) = db.query_one(sql.build()).await.map_err(db_err)? {
            summary.migrations_in_flight = Some(get(&row, "n")?);
        }
        Ok(summary)
    }

    /// Clusters matching `filter`, by name, after the page's cursor (a cluster name).
    pub async fn clusters(
        &self,
        filter: &ClusterFilter,
        page: &PageRequest,
    ) -> Result<Vec<ClusterRow>, ReadFailure> {
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
        rows.into_iter().map(cluster_row).collect()
    }

    pub async fn count_clusters(&self, filter: &ClusterFilter) -> Result<i64, ReadFailure> {
        let mut sql = Sql::new(self.backend());
        sql.push("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM clusters c");
        cluster_where(&mut sql, filter);
        let row = self.store.db.query_one(sql.build()).await.map_err(db_err)?;
        row.map_or(Ok(0), |r| get(&r, "n"))
    }

    pub async fn clusters_by_name(&self, names: &[String]) -> Result<Vec<ClusterRow>, ReadFailure> {
        cluster::Entity::find()
            .filter(cluster::Column::Name.is_in(names.iter().cloned()))
            .all(&self.store.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(cluster_row)
            .collect()
    }

    pub async fn clusters_by_id(&self, ids: &[Uuid]) -> Result<Vec<ClusterRow>, ReadFailure> {
        cluster::Entity::find()
            .filter(cluster::Column::Id.is_in(ids.iter().copied()))
            .all(&self.store.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(cluster_row)
            .collect()
    }

    pub async fn cluster_labels(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, String, String)>, ReadFailure> {
        self.labels_of("cluster_labels", "cluster_id", ids).await
    }

    /// The nodes of the given clusters, by name.
    pub async fn nodes_of_clusters(&self, ids: &[Uuid]) -> Result<Vec<NodeRow>, ReadFailure> {
        node::Entity::find()
            .filter(node::Column::ClusterId.is_in(ids.iter().copied()))
            .order_by_asc(node::Column::Name)
            .all(&self.store.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(node_row)
            .collect()
    }

    /// Node totals per cluster, for the clusters that have nodes.
    pub async fn capacity_of_clusters(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, NodeTotals)>, ReadFailure> {
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

    /// Virtual machines matching `filter`, by cluster name, namespace and name, after the page's
    /// cursor (those three).
    pub async fn vms(
        &self,
        filter: &VmFilter,
        page: &PageRequest,
    ) -> Result<Vec<VmRow>, ReadFailure> {
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
        rows.into_iter().map(vm_row).collect()
    }

    pub async fn count_vms(&self, filter: &VmFilter) -> Result<i64, ReadFailure> {
        let mut sql = Sql::new(self.backend());
        sql.push("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM virtual_machines v WHERE 1 = 1");
        if let Some(id) = filter.cluster_id {
            sql.push(" AND v.cluster_id = ").bind(id);
        }
        vm_where(&mut sql, filter);
        let row = self.store.db.query_one(sql.build()).await.map_err(db_err)?;
        row.map_or(Ok(0), |r| get(&r, "n"))
    }

    /// Up to `first + 1` virtual machines of each given cluster (by namespace and name, after the
    /// page's cursor), ordered by cluster.
    pub async fn vms_of_clusters(
        &self,
        cluster_ids: &[Uuid],
        filter: &VmFilter,
        page: &PageRequest,
    ) -> Result<Vec<VmRow>, ReadFailure> {
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
        rows.into_iter().map(vm_row).collect()
    }

    /// How many virtual machines of each given cluster match `filter`.
    pub async fn count_vms_of_clusters(
        &self,
        cluster_ids: &[Uuid],
        filter: &VmFilter,
    ) -> Result<Vec<(Uuid, i64)>, ReadFailure> {
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

    pub async fn vm_by_ref(
        &self,
        cluster_id: Uuid,
        namespace: &str,
        name: &str,
    ) -> Result<Option<VmRow>, ReadFailure> {
        vm::Entity::find()
            .filter(vm::Column::ClusterId.eq(cluster_id))
            .filter(vm::Column::Namespace.eq(namespace))
            .filter(vm::Column::Name.eq(name))
            .one(&self.store.db)
            .await
            .map_err(db_err)?
            .map(vm_row)
            .transpose()
    }

    pub async fn vm_labels(
        &self,
        vm_ids: &[Uuid],
    ) -> Result<Vec<(Uuid, String, String)>, ReadFailure> {
        self.labels_of("vm_labels", "vm_id", vm_ids).await
    }

    /// Migrations matching `filter`, newest first, after the page's cursor (a migration id).
    pub async fn migrations(
        &self,
        filter: &MigrationFilter,
        page: &PageRequest,
    ) -> Result<Vec<MigrationRow>, ReadFailure> {
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
                .map_err(|_| ReadFailure::Internal("cursor is not a migration id".into()))?;
            q = q.filter(migration::Column::Id.lt(id));
        }
        let rows = q
            .order_by_desc(migration::Column::Id)
            .limit(page.first as u64 + 1)
            .all(&self.store.db)
            .await
            .map_err(db_err)?;
        rows.into_iter().map(migration_row).collect()
    }

    pub async fn migrations_by_id(&self, ids: &[Uuid]) -> Result<Vec<MigrationRow>, ReadFailure> {
        migration::Entity::find()
            .filter(migration::Column::Id.is_in(ids.iter().copied()))
            .all(&self.store.db)
            .await
            .map_err(db_err)?
            .into_iter()
            .map(migration_row)
            .collect()
    }
}

/// Evacuations (and rebalances), newest first (ids are UUIDv7): the one with `id` if given,
/// those older than `after` if given, at most `limit`; each with its migrations' rows, read in
/// one statement for all of them.
pub async fn evacuations_with_migrations(
    store: &Store,
    id: Option<Uuid>,
    after: Option<Uuid>,
    limit: u64,
) -> Result<Vec<(evacuation::Model, Vec<migration::Model>)>, StoreError> {
    let mut query = evacuation::Entity::find().order_by_desc(evacuation::Column::Id);
    if let Some(id) = id {
        query = query.filter(evacuation::Column::Id.eq(id));
    }
    if let Some(after) = after {
        query = query.filter(evacuation::Column::Id.lt(after));
    }
    let evacuations = query.limit(limit).all(&store.db).await?;
    let mut by_evacuation: HashMap<Uuid, Vec<migration::Model>> = HashMap::new();
    if !evacuations.is_empty() {
        let rows = migration::Entity::find()
            .filter(migration::Column::EvacuationId.is_in(evacuations.iter().map(|e| e.id)))
            .all(&store.db)
            .await?;
        for row in rows {
            if let Some(e) = row.evacuation_id {
                by_evacuation.entry(e).or_default().push(row);
            }
        }
    }
    Ok(evacuations
        .into_iter()
        .map(|e| {
            let rows = by_evacuation.remove(&e.id).unwrap_or_default();
            (e, rows)
        })
        .collect())
}

/// A stored evacuation's plan, decoded; `None` when it is unreadable.
pub fn stored_plan(e: &evacuation::Model) -> Option<Plan> {
    serde_json::from_value(e.plan.clone()).ok()
}
