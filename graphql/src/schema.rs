//! The schema: root fields (`fleet`, `clusters`, `cluster`, `virtualMachines`, `virtualMachine`,
//! `migrations`, `migration`, subscription `inventoryEvents`), object types, filters, Relay
//! pagination and the limits that keep a query's cost bounded. Resolvers stay thin: they
//! validate arguments and read through sibling batches (see `batch`).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_graphql::connection::{Connection, Edge, EmptyFields};
use async_graphql::{
    Context, Enum, InputObject, InputValueError, InputValueResult, Object, Result, Scalar,
    ScalarType, Schema, SimpleObject, Subscription, Value, ID,
};
use chrono::{DateTime, Utc};
use drover_shared::inventory as inv;
use drover_shared::labels::LabelSelector;
use drover_shared::{ClusterName, Namespace, VmName};
use futures::Stream;
use uuid::Uuid;

use crate::admin::FleetAdmin;
use crate::batch::{ClusterBatch, ClusterRefs, Reader, VmBatch};
use crate::error::{ApiError, ErrorCode};
use crate::events::InventoryEvent;
use crate::model::{self, *};

/// The largest `first` any list accepts.
pub const MAX_PAGE_SIZE: i32 = 100;
/// What `first` is when a client leaves it out.
pub const DEFAULT_PAGE_SIZE: i32 = 50;

pub type DroverSchema = Schema<Query, Mutation, Subscription>;

/// Limits on what one query may cost.
#[derive(Debug, Clone, Copy)]
pub struct SchemaLimits {
    pub max_depth: usize,
    pub max_complexity: usize,
    pub max_recursive_depth: usize,
}

impl Default for SchemaLimits {
    fn default() -> Self {
        // A portal's fleet page (100 clusters, each with nodes and 100 VMs with labels) costs
        // about 150k; 300k leaves room for richer pages and refuses 100x100x100 fan-outs.
        Self {
            max_depth: 12,
            max_complexity: 300_000,
            max_recursive_depth: 32,
        }
    }
}

/// Builds the schema over a reader and an admin; `events` feeds subscriptions.
pub fn build_schema(
    reader: Reader,
    admin: Arc<dyn FleetAdmin>,
    events: Arc<dyn crate::events::FleetEvents>,
    limits: SchemaLimits,
) -> DroverSchema {
    Schema::build(Query::default(), Mutation::default(), Subscription)
        .data(reader)
        .data(admin)
        .data(events)
        .limit_depth(limits.max_depth)
        .limit_complexity(limits.max_complexity)
        .limit_recursive_depth(limits.max_recursive_depth)
        .finish()
}

/// The schema's SDL, as checked in at `graphql/schema.graphql`.
pub fn schema_sdl() -> String {
    Schema::build(Query::default(), Mutation::default(), Subscription)
        .finish()
        .sdl()
}

fn reader<'a>(ctx: &'a Context<'_>) -> &'a Reader {
    ctx.data_unchecked::<Reader>()
}

/// A 64-bit integer (bytes, millicores, generations), sent as a JSON number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Long(pub i64);

/// A 64-bit integer such as a size in bytes or CPU in millicores; a JSON number (exact up to
/// 2^53).
#[Scalar(name = "Long")]
impl ScalarType for Long {
    fn parse(value: Value) -> InputValueResult<Self> {
        match &value {
            Value::Number(n) => n
                .as_i64()
                .map(Long)
                .ok_or_else(|| InputValueError::custom("expected a whole number")),
            Value::String(s) => s
                .parse()
                .map(Long)
                .map_err(|_| InputValueError::custom("expected a whole number")),
            _ => Err(InputValueError::expected_type(value)),
        }
    }

    fn to_value(&self) -> Value {
        Value::Number(self.0.into())
    }
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "drover_shared::inventory::ClusterHealth")]
pub enum ClusterHealth {
    Ready,
    Degraded,
    Unreachable,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "drover_shared::inventory::RuntimeKind")]
pub enum RuntimeKind {
    Kubevirt,
    Qemu,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "drover_shared::inventory::VmPhase")]
pub enum VirtualMachinePhase {
    Stopped,
    Starting,
    Running,
    Paused,
    Migrating,
    Stopping,
    WaitingForReceiver,
    Failed,
    Unknown,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(remote = "drover_shared::inventory::RunStrategy")]
pub enum RunStrategy {
    Always,
    RerunOnFailure,
    Manual,
    Halted,
    Once,
    WaitAsReceiver,
}

#[derive(Enum, Copy, Clone, Debug, Eq, PartialEq, serde::Serialize, serde::Deserialize)]
#[graphql(remote = "drover_shared::inventory::MigrationPhase")]
pub enum MigrationPhase {
    Pending,
    Scheduling,
    Scheduled,
    PreparingTarget,
    TargetReady,
    Running,
    Succeeded,
    Failed,
}

#[derive(SimpleObject, Clone)]
pub struct Label {
    pub key: String,
    pub value: String,
}

fn labels_list(map: &BTreeMap<String, String>) -> Vec<Label> {
    map.iter()
        .map(|(k, v)| Label {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Arguments

pub(crate) fn page_request(
    first: Option<i32>,
    after: Option<String>,
    parts: usize,
) -> Result<PageRequest> {
    let first = first.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(0..=MAX_PAGE_SIZE).contains(&first) {
        return Err(ApiError::new(
            ErrorCode::PageTooLarge,
            format!(
                "first: {first} is outside 0..={MAX_PAGE_SIZE}; ask for at most {MAX_PAGE_SIZE} and page on with `after`"
            ),
        )
        .into());
    }
    let after = after.map(|c| decode_cursor(&c, parts)).transpose()?;
    Ok(PageRequest {
        first: first as u32,
        after,
    })
}

fn parse_selector(selector: Option<String>) -> Result<Option<LabelSelector>, ApiError> {
    selector
        .map(|s| LabelSelector::parse(&s).map_err(|e| ApiError::bad_input(e.to_string())))
        .transpose()
        .map(|s| s.filter(|s| !s.is_empty()))
}

async fn cluster_id_by_name(ctx: &Context<'_>, name: &str) -> Result<ClusterRecord, ApiError> {
    let name = ClusterName::new(name)?;
    reader(ctx)
        .clusters_by_name(&[name.to_string()])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "cluster \"{name}\" is not in the fleet; `clusters` lists the clusters there are"
            ))
        })
}

#[derive(InputObject, Default)]
pub struct ClusterFilterInput {
    /// Kubernetes label selector, e.g. "region=eu,tier in (gold,silver),!legacy".
    pub label_selector: Option<String>,
    pub health: Option<ClusterHealth>,
    /// true: only cordoned clusters; false: only clusters not in maintenance.
    pub maintenance: Option<bool>,
}

impl ClusterFilterInput {
    fn into_filter(self) -> Result<ClusterFilter, ApiError> {
        Ok(ClusterFilter {
            label_selector: parse_selector(self.label_selector)?,
            health: self.health.map(Into::into),
            maintenance: self.maintenance,
        })
    }
}

#[derive(InputObject, Default)]
pub struct VirtualMachineFilter {
    /// Only this cluster's virtual machines.
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    /// Kubernetes label selector, e.g. "app=web,tier!=db".
    pub label_selector: Option<String>,
    pub phase: Option<VirtualMachinePhase>,
    /// Only virtual machines on this node.
    pub node: Option<String>,
    pub migratable: Option<bool>,
}

/// Filter for a cluster's own virtual machines.
#[derive(InputObject, Default)]
pub struct ClusterVirtualMachineFilter {
    pub namespace: Option<String>,
    pub label_selector: Option<String>,
    pub phase: Option<VirtualMachinePhase>,
    pub node: Option<String>,
    pub migratable: Option<bool>,
}

fn vm_filter(
    namespace: Option<String>,
    label_selector: Option<String>,
    phase: Option<VirtualMachinePhase>,
    node: Option<String>,
    migratable: Option<bool>,
) -> Result<VmFilter, ApiError> {
    let namespace = namespace
        .map(|n| Namespace::new(n).map(String::from))
        .transpose()?;
    if let Some(node) = &node {
        drover_shared::ids::check_dns1123_subdomain("node name", node)?;
    }
    Ok(VmFilter {
        cluster_id: None,
        namespace,
        label_selector: parse_selector(label_selector)?,
        phase: phase.map(Into::into),
        node,
        migratable,
    })
}

#[derive(InputObject, Default)]
pub struct MigrationFilterInput {
    /// Migrations from or to this cluster.
    pub cluster: Option<String>,
    pub phase: Option<MigrationPhase>,
    pub evacuation_id: Option<ID>,
}

fn parse_uuid(what: &str, id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        ApiError::bad_input(format!(
            "{what}: {:?} is not a valid id (a UUID such as 0192c1f0-7a3b-7c4d-8e9f-0123456789ab)",
            id.chars().take(80).collect::<String>()
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Query root

#[derive(Default)]
pub struct FleetQuery;

/// Queries: the fleet here, API tokens in `tokens`.
#[derive(async_graphql::MergedObject, Default)]
pub struct Query(FleetQuery, crate::tokens::TokenQuery);

#[Object]
impl FleetQuery {
    /// Counts and totals for the whole fleet.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Viewer)")]
    async fn fleet(&self, ctx: &Context<'_>) -> Result<Fleet> {
        let summary = reader(ctx).fleet_summary().await.map_err(ApiError::from)?;
        Ok(Fleet(summary))
    }

    /// Clusters ordered by name.
    #[graphql(
        guard = "crate::access::RoleGuard(crate::access::Role::Viewer)",
        complexity = "first.unwrap_or(DEFAULT_PAGE_SIZE).clamp(0, MAX_PAGE_SIZE) as usize * child_complexity"
    )]
    async fn clusters(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        filter: Option<ClusterFilterInput>,
    ) -> Result<Connection<String, Cluster, ClusterTotal>> {
        let page = page_request(first, after, 1)?;
        let filter = filter.unwrap_or_default().into_filter()?;
        let result = reader(ctx)
            .clusters(&filter, &page)
            .await
            .map_err(ApiError::from)?;
        let batch = ClusterBatch::new(
            reader(ctx).clone(),
            result.items.iter().map(|c| c.id).collect(),
        );
        let mut conn = Connection::with_additional_fields(
            page.after.is_some(),
            result.has_next_page,
            ClusterTotal { filter },
        );
        conn.edges.extend(
            result
                .items
                .into_iter()
                .map(|c| Edge::new(encode_cursor(&[&c.name]), Cluster(c, batch.clone()))),
        );
        Ok(conn)
    }

    /// One cluster by name.
    /// Evacuations and rebalances, newest first.
    #[graphql(
        guard = "crate::access::RoleGuard(crate::access::Role::Viewer)",
        complexity = "first.unwrap_or(DEFAULT_PAGE_SIZE).clamp(0, MAX_PAGE_SIZE) as usize * child_complexity"
    )]
    async fn evacuations(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Connection<String, crate::evacuate::Evacuation, EmptyFields>> {
        crate::evacuate::evacuations(ctx, first, after).await
    }

    /// One evacuation or rebalance by id, with its counters and estimated finish.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Viewer)")]
    async fn evacuation(
        &self,
        ctx: &Context<'_>,
        id: ID,
    ) -> Result<Option<crate::evacuate::Evacuation>> {
        crate::evacuate::evacuation_by_id(ctx, id).await
    }

    /// Migration policies by name.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Viewer)")]
    async fn migration_policies(
        &self,
        ctx: &Context<'_>,
    ) -> Result<Vec<crate::evacuate::MigrationPolicy>> {
        crate::evacuate::migration_policies(ctx).await
    }

    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Viewer)")]
    async fn cluster(&self, ctx: &Context<'_>, name: String) -> Result<Option<Cluster>> {
        let c = cluster_id_by_name(ctx, &name).await?;
        let batch = ClusterBatch::new(reader(ctx).clone(), vec![c.id]);
        Ok(Some(Cluster(c, batch)))
    }

    /// Virtual machines across the fleet ordered by cluster, namespace, name.
    #[graphql(
        guard = "crate::access::RoleGuard(crate::access::Role::Viewer)",
        complexity = "first.unwrap_or(DEFAULT_PAGE_SIZE).clamp(0, MAX_PAGE_SIZE) as usize * child_complexity"
    )]
    async fn virtual_machines(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        filter: Option<VirtualMachineFilter>,
    ) -> Result<Connection<String, VirtualMachine, VirtualMachineTotal>> {
        let page = page_request(first, after, 3)?;
        let f = filter.unwrap_or_default();
        let mut filter = vm_filter(f.namespace, f.label_selector, f.phase, f.node, f.migratable)?;
        if let Some(cluster) = f.cluster {
            filter.cluster_id = Some(cluster_id_by_name(ctx, &cluster).await?.id);
        }
        let result = reader(ctx)
            .vms(&filter, &page)
            .await
            .map_err(ApiError::from)?;
        let batch = VmBatch::new(reader(ctx).clone(), &result.items);
        let mut conn = Connection::with_additional_fields(
            page.after.is_some(),
            result.has_next_page,
            VirtualMachineTotal {
                cluster: None,
                filter,
            },
        );
        for v in result.items {
            // The cursor needs the cluster's name: one query for the whole page.
            let (cluster, _) = batch.clusters.require(v.cluster_id).await?;
            conn.edges.push(Edge::new(
                encode_cursor(&[&cluster.name, &v.namespace, &v.name]),
                VirtualMachine(v, batch.clone()),
            ));
        }
        Ok(conn)
    }

    /// One virtual machine by cluster, namespace and name.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Viewer)")]
    async fn virtual_machine(
        &self,
        ctx: &Context<'_>,
        cluster: String,
        namespace: String,
        name: String,
    ) -> Result<Option<VirtualMachine>> {
        let namespace = Namespace::new(namespace).map_err(ApiError::from)?;
        let name = VmName::new(name).map_err(ApiError::from)?;
        let c = cluster_id_by_name(ctx, &cluster).await?;
        let vm = reader(ctx)
            .vm_by_ref(c.id, namespace.as_str(), name.as_str())
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "virtual machine {namespace}/{name} is not in cluster {cluster:?}; `virtualMachines(filter: {{cluster: \"{cluster}\"}})` lists what is there"
                ))
            })?;
        let batch = VmBatch::new(reader(ctx).clone(), [&vm]);
        Ok(Some(VirtualMachine(vm, batch)))
    }

    /// Migrations, newest first.
    #[graphql(
        guard = "crate::access::RoleGuard(crate::access::Role::Viewer)",
        complexity = "first.unwrap_or(DEFAULT_PAGE_SIZE).clamp(0, MAX_PAGE_SIZE) as usize * child_complexity"
    )]
    async fn migrations(
        &self,
        ctx: &Context<'_>,
        first: Option<i32>,
        after: Option<String>,
        filter: Option<MigrationFilterInput>,
    ) -> Result<Connection<String, Migration, EmptyFields>> {
        let page = page_request(first, after, 1)?;
        let f = filter.unwrap_or_default();
        let mut filter = MigrationFilter {
            phase: f.phase.map(Into::into),
            evacuation_id: f
                .evacuation_id
                .map(|id| parse_uuid("evacuationId", &id))
                .transpose()?,
            ..Default::default()
        };
        if let Some(cluster) = f.cluster {
            filter.cluster_id = Some(cluster_id_by_name(ctx, &cluster).await?.id);
        }
        if let Some(after) = &page.after {
            parse_uuid("after", &after[0])?;
        }
        let result = reader(ctx)
            .migrations(&filter, &page)
            .await
            .map_err(ApiError::from)?;
        let clusters = Arc::new(ClusterRefs::new(
            reader(ctx).clone(),
            result
                .items
                .iter()
                .flat_map(|m| [m.source_cluster_id, m.target_cluster_id])
                .flatten(),
        ));
        let mut conn = Connection::new(page.after.is_some(), result.has_next_page);
        conn.edges.extend(result.items.into_iter().map(|m| {
            Edge::new(
                encode_cursor(&[&m.id.to_string()]),
                Migration(m, clusters.clone()),
            )
        }));
        Ok(conn)
    }

    /// One migration by id (the migrationID both sides share).
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Viewer)")]
    async fn migration(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Migration>> {
        let id = parse_uuid("id", &id)?;
        let m = reader(ctx)
            .migrations_by_id(&[id])
            .await
            .map_err(ApiError::from)?
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::not_found(format!("migration {id} does not exist")))?;
        let clusters = Arc::new(ClusterRefs::new(
            reader(ctx).clone(),
            [m.source_cluster_id, m.target_cluster_id]
                .into_iter()
                .flatten(),
        ));
        Ok(Some(Migration(m, clusters)))
    }

    /// A hub -> agent command by cluster and idempotency key, to follow one that answered
    /// PENDING (the agent was offline or slow).
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Viewer)")]
    async fn agent_command(
        &self,
        ctx: &Context<'_>,
        cluster: String,
        idempotency_key: String,
    ) -> Result<Option<crate::lifecycle::AgentCommandStatus>> {
        crate::lifecycle::agent_command(ctx, cluster, idempotency_key).await
    }
}

// ---------------------------------------------------------------------------------------------
// Fleet

pub struct Fleet(FleetSummary);

#[derive(SimpleObject)]
pub struct ClusterCounts {
    pub total: i32,
    pub ready: i32,
    pub degraded: i32,
    pub unreachable: i32,
    /// Clusters cordoned for maintenance, whatever their health.
    pub in_maintenance: i32,
}

#[derive(SimpleObject)]
pub struct PhaseCount {
    pub phase: VirtualMachinePhase,
    pub count: i32,
}

#[derive(SimpleObject)]
pub struct VirtualMachineCounts {
    pub total: i32,
    pub running: i32,
    /// Every phase with at least one virtual machine.
    pub by_phase: Vec<PhaseCount>,
    pub not_migratable: i32,
    /// Memory the virtual machines are sized for, in bytes.
    pub memory_bytes: Long,
    pub vcpus: Long,
}

/// Resources summed over nodes.
#[derive(SimpleObject, Clone, Copy)]
pub struct Capacity {
    pub nodes: i32,
    pub allocatable_memory_bytes: Long,
    pub requested_memory_bytes: Long,
    pub allocatable_cpu_millis: Long,
    pub requested_cpu_millis: Long,
}

impl From<model::Capacity> for Capacity {
    fn from(c: model::Capacity) -> Self {
        Self {
            nodes: clamp_i32(c.nodes),
            allocatable_memory_bytes: Long(c.allocatable_memory_bytes),
            requested_memory_bytes: Long(c.requested_memory_bytes),
            allocatable_cpu_millis: Long(c.allocatable_cpu_millis),
            requested_cpu_millis: Long(c.requested_cpu_millis),
        }
    }
}

fn clamp_i32(n: i64) -> i32 {
    n.clamp(0, i32::MAX as i64) as i32
}

#[Object]
impl Fleet {
    async fn clusters(&self) -> ClusterCounts {
        let of = |h| {
            self.0
                .clusters_by_health
                .iter()
                .filter(|(x, _)| *x == h)
                .map(|(_, n)| *n)
                .sum::<i64>()
        };
        ClusterCounts {
            total: clamp_i32(self.0.clusters_by_health.iter().map(|(_, n)| n).sum()),
            ready: clamp_i32(of(inv::ClusterHealth::Ready)),
            degraded: clamp_i32(of(inv::ClusterHealth::Degraded)),
            unreachable: clamp_i32(of(inv::ClusterHealth::Unreachable)),
            in_maintenance: clamp_i32(self.0.clusters_in_maintenance),
        }
    }

    async fn virtual_machines(&self) -> VirtualMachineCounts {
        VirtualMachineCounts {
            total: clamp_i32(self.0.vms_by_phase.iter().map(|(_, n)| n).sum()),
            running: clamp_i32(
                self.0
                    .vms_by_phase
                    .iter()
                    .filter(|(p, _)| *p == inv::VmPhase::Running)
                    .map(|(_, n)| *n)
                    .sum(),
            ),
            by_phase: self
                .0
                .vms_by_phase
                .iter()
                .map(|(p, n)| PhaseCount {
                    phase: (*p).into(),
                    count: clamp_i32(*n),
                })
                .collect(),
            not_migratable: clamp_i32(self.0.vms_not_migratable),
            memory_bytes: Long(self.0.vm_memory_bytes),
            vcpus: Long(self.0.vm_vcpus),
        }
    }

    async fn capacity(&self) -> Capacity {
        self.0.capacity.into()
    }

    /// Migrations between Scheduling and Running.
    async fn migrations_in_flight(&self) -> i32 {
        clamp_i32(self.0.migrations_in_flight)
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster

pub struct Cluster(pub ClusterRecord, Arc<ClusterBatch>);

pub struct ClusterTotal {
    filter: ClusterFilter,
}

#[Object]
impl ClusterTotal {
    /// How many clusters match the filter.
    async fn total_count(&self, ctx: &Context<'_>) -> Result<i32> {
        let n = reader(ctx)
            .count_clusters(&self.filter)
            .await
            .map_err(ApiError::from)?;
        Ok(clamp_i32(n))
    }
}

/// KubeVirt's live-migration limits and tuning for this cluster.
#[derive(SimpleObject)]
pub struct MigrationConfiguration {
    pub parallel_migrations_per_cluster: i32,
    pub parallel_outbound_migrations_per_node: i32,
    /// Bytes per second per migration; 0 means unlimited.
    pub bandwidth_per_migration: Long,
    #[graphql(name = "completionTimeoutPerGiB")]
    pub completion_timeout_per_gib: i32,
    pub progress_timeout: i32,
    pub allow_auto_converge: bool,
    pub allow_post_copy: bool,
}

#[derive(SimpleObject)]
pub struct StorageClass {
    pub name: String,
    pub provisioner: String,
    pub is_default: bool,
}

#[Object]
impl Cluster {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    async fn name(&self) -> &str {
        &self.0.name
    }

    async fn runtime(&self) -> RuntimeKind {
        self.0.runtime.into()
    }

    async fn platform_version(&self) -> &str {
        &self.0.platform_version
    }

    async fn virtualization_version(&self) -> &str {
        &self.0.virtualization_version
    }

    async fn labels(&self) -> Result<Vec<Label>> {
        Ok(labels_list(&self.1.labels(self.0.id).await?))
    }

    async fn cpu_models(&self) -> &[String] {
        &self.0.cpu_models
    }

    async fn feature_gates(&self) -> &[String] {
        &self.0.feature_gates
    }

    async fn migration_configuration(&self) -> MigrationConfiguration {
        let c = &self.0.migration_config;
        MigrationConfiguration {
            parallel_migrations_per_cluster: c.parallel_migrations_per_cluster as i32,
            parallel_outbound_migrations_per_node: c.parallel_outbound_migrations_per_node as i32,
            bandwidth_per_migration: Long(c.bandwidth_per_migration as i64),
            completion_timeout_per_gib: c.completion_timeout_per_gib as i32,
            progress_timeout: c.progress_timeout as i32,
            allow_auto_converge: c.allow_auto_converge,
            allow_post_copy: c.allow_post_copy,
        }
    }

    async fn storage_classes(&self) -> Vec<StorageClass> {
        self.0
            .storage_classes
            .iter()
            .map(|s| StorageClass {
                name: s.name.clone(),
                provisioner: s.provisioner.clone(),
                is_default: s.is_default,
            })
            .collect()
    }

    async fn networks(&self) -> &[String] {
        &self.0.networks
    }

    /// Where other clusters' agents reach this cluster's sync controller.
    async fn sync_endpoint(&self) -> Option<&str> {
        self.0.sync_endpoint.as_deref()
    }

    async fn health(&self) -> ClusterHealth {
        self.0.health.into()
    }

    async fn last_heartbeat_at(&self) -> Option<DateTime<Utc>> {
        self.0.last_heartbeat_at
    }

    /// Cordoned: nothing new is placed on the cluster.
    async fn maintenance(&self) -> bool {
        self.0.maintenance
    }

    async fn maintenance_since(&self) -> Option<DateTime<Utc>> {
        self.0.maintenance_since
    }

    /// The generation of the last inventory the cluster's agent reported.
    async fn inventory_generation(&self) -> Long {
        Long(self.0.inventory_generation)
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }

    async fn capacity(&self) -> Result<Capacity> {
        Ok(self.1.capacity(self.0.id).await?.into())
    }

    #[graphql(complexity = "10 * child_complexity")]
    async fn nodes(&self) -> Result<Vec<Node>> {
        Ok(self
            .1
            .nodes(self.0.id)
            .await?
            .into_iter()
            .map(Node)
            .collect())
    }

    /// This cluster's virtual machines ordered by namespace and name.
    #[graphql(
        complexity = "first.unwrap_or(DEFAULT_PAGE_SIZE).clamp(0, MAX_PAGE_SIZE) as usize * child_complexity"
    )]
    async fn virtual_machines(
        &self,
        first: Option<i32>,
        after: Option<String>,
        filter: Option<ClusterVirtualMachineFilter>,
    ) -> Result<Connection<String, VirtualMachine, VirtualMachineTotal>> {
        let page = page_request(first, after, 2)?;
        let f = filter.unwrap_or_default();
        let filter = vm_filter(f.namespace, f.label_selector, f.phase, f.node, f.migratable)?;
        let (result, batch) = self
            .1
            .vm_page(self.0.id, filter.clone(), page.clone())
            .await?;
        let mut conn = Connection::with_additional_fields(
            page.after.is_some(),
            result.has_next_page,
            VirtualMachineTotal {
                cluster: Some((self.0.id, self.1.clone())),
                filter,
            },
        );
        conn.edges.extend(result.items.into_iter().map(|v| {
            Edge::new(
                encode_cursor(&[&v.namespace, &v.name]),
                VirtualMachine(v, batch.clone()),
            )
        }));
        Ok(conn)
    }
}

// ---------------------------------------------------------------------------------------------
// Node

pub struct Node(NodeRecord);

#[Object]
impl Node {
    async fn name(&self) -> &str {
        &self.0.name
    }

    async fn cpu_model(&self) -> &str {
        &self.0.cpu_model
    }

    async fn allocatable_memory_bytes(&self) -> Long {
        Long(self.0.allocatable_memory_bytes)
    }

    async fn requested_memory_bytes(&self) -> Long {
        Long(self.0.requested_memory_bytes)
    }

    async fn allocatable_cpu_millis(&self) -> Long {
        Long(self.0.allocatable_cpu_millis)
    }

    async fn requested_cpu_millis(&self) -> Long {
        Long(self.0.requested_cpu_millis)
    }

    async fn schedulable(&self) -> bool {
        self.0.schedulable
    }

    async fn labels(&self) -> Vec<Label> {
        labels_list(&self.0.labels)
    }
}

// ---------------------------------------------------------------------------------------------
// VirtualMachine

pub struct VirtualMachine(VmRecord, Arc<VmBatch>);

pub struct VirtualMachineTotal {
    /// Set inside a cluster: the count loads with the cluster's siblings.
    cluster: Option<(Uuid, Arc<ClusterBatch>)>,
    filter: VmFilter,
}

#[Object]
impl VirtualMachineTotal {
    /// How many virtual machines match the filter.
    async fn total_count(&self, ctx: &Context<'_>) -> Result<i32> {
        let n = match &self.cluster {
            Some((id, batch)) => batch.vm_count(*id, self.filter.clone()).await?,
            None => reader(ctx)
                .count_vms(&self.filter)
                .await
                .map_err(ApiError::from)?,
        };
        Ok(clamp_i32(n))
    }
}

#[derive(SimpleObject)]
pub struct Disk {
    pub name: String,
    pub size_bytes: Long,
    pub storage_class: String,
    pub access_mode: String,
}

#[derive(SimpleObject)]
pub struct Interface {
    pub name: String,
    pub network: String,
    pub mac_address: String,
}

#[Object]
impl VirtualMachine {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    async fn cluster(&self) -> Result<Cluster> {
        let (c, batch) = self.1.clusters.require(self.0.cluster_id).await?;
        Ok(Cluster(c, batch))
    }

    async fn namespace(&self) -> &str {
        &self.0.namespace
    }

    async fn name(&self) -> &str {
        &self.0.name
    }

    async fn uid(&self) -> &str {
        &self.0.uid
    }

    async fn run_strategy(&self) -> RunStrategy {
        self.0.run_strategy.into()
    }

    async fn phase(&self) -> VirtualMachinePhase {
        self.0.phase.into()
    }

    /// The node the virtual machine runs on, if it runs.
    async fn node(&self) -> Option<&str> {
        self.0.node.as_deref()
    }

    async fn memory_bytes(&self) -> Long {
        Long(self.0.memory_bytes)
    }

    async fn vcpus(&self) -> i32 {
        self.0.vcpus
    }

    async fn disks(&self) -> Vec<Disk> {
        self.0
            .disks
            .iter()
            .map(|d| Disk {
                name: d.name.clone(),
                size_bytes: Long(d.size_bytes as i64),
                storage_class: d.storage_class.clone(),
                access_mode: d.access_mode.clone(),
            })
            .collect()
    }

    async fn interfaces(&self) -> Vec<Interface> {
        self.0
            .interfaces
            .iter()
            .map(|i| Interface {
                name: i.name.clone(),
                network: i.network.clone(),
                mac_address: i.mac.clone(),
            })
            .collect()
    }

    async fn labels(&self) -> Result<Vec<Label>> {
        Ok(labels_list(&self.1.labels(self.0.id).await?))
    }

    /// Whether the virtual machine can live-migrate at all.
    async fn migratable(&self) -> bool {
        self.0.migratable
    }

    /// Why it cannot (host devices, shareable disks, LUNs, virtiofs, ...).
    async fn non_migratable_reasons(&self) -> &[String] {
        &self.0.non_migratable_reasons
    }

    async fn generation(&self) -> Long {
        Long(self.0.generation)
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
}

// ---------------------------------------------------------------------------------------------
// Migration

pub struct Migration(pub MigrationRecord, pub Arc<ClusterRefs>);

#[derive(SimpleObject)]
pub struct MigrationProgress {
    pub bytes_total: Long,
    pub bytes_transferred: Long,
    pub bytes_remaining: Long,
    pub dirty_rate_bytes_per_second: Long,
    pub throughput_bytes_per_second: Long,
}

#[derive(SimpleObject)]
pub struct PhaseTimestamp {
    pub phase: MigrationPhase,
    pub at: DateTime<Utc>,
}

#[derive(SimpleObject)]
pub struct MigratingVirtualMachine {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[Object]
impl Migration {
    /// The migrationID both sides of the migration share.
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    async fn virtual_machine(&self) -> MigratingVirtualMachine {
        MigratingVirtualMachine {
            namespace: self.0.vm_namespace.clone(),
            name: self.0.vm_name.clone(),
            uid: self.0.vm_uid.clone(),
        }
    }

    /// The source cluster's name, kept after the cluster is removed.
    async fn source_cluster_name(&self) -> &str {
        &self.0.source_cluster_name
    }

    /// The target cluster's name, kept after the cluster is removed.
    async fn target_cluster_name(&self) -> &str {
        &self.0.target_cluster_name
    }

    /// Null once the cluster was removed from the fleet.
    async fn source_cluster(&self) -> Result<Option<Cluster>> {
        let Some(id) = self.0.source_cluster_id else {
            return Ok(None);
        };
        let c = self.1.get(id).await?;
        Ok(c.map(|(c, batch)| Cluster(c, batch)))
    }

    /// Null once the cluster was removed from the fleet.
    async fn target_cluster(&self) -> Result<Option<Cluster>> {
        let Some(id) = self.0.target_cluster_id else {
            return Ok(None);
        };
        let c = self.1.get(id).await?;
        Ok(c.map(|(c, batch)| Cluster(c, batch)))
    }

    async fn target_namespace(&self) -> &str {
        &self.0.target_namespace
    }

    async fn phase(&self) -> MigrationPhase {
        self.0.phase.into()
    }

    /// When each phase was entered.
    async fn phase_timestamps(&self) -> Vec<PhaseTimestamp> {
        let mut out: Vec<PhaseTimestamp> = self
            .0
            .phase_timestamps
            .iter()
            .filter_map(|(p, at)| {
                inv::MigrationPhase::parse(p).map(|p| PhaseTimestamp {
                    phase: p.into(),
                    at: *at,
                })
            })
            .collect();
        out.sort_by_key(|t| t.at);
        out
    }

    async fn progress(&self) -> MigrationProgress {
        MigrationProgress {
            bytes_total: Long(self.0.bytes_total),
            bytes_transferred: Long(self.0.bytes_transferred),
            bytes_remaining: Long(self.0.bytes_remaining),
            dirty_rate_bytes_per_second: Long(self.0.dirty_rate_bytes_per_sec),
            throughput_bytes_per_second: Long(self.0.throughput_bytes_per_sec),
        }
    }

    async fn failure_reason(&self) -> Option<&str> {
        self.0.failure_reason.as_deref()
    }

    async fn attempt(&self) -> i32 {
        self.0.attempt
    }

    async fn evacuation_id(&self) -> Option<ID> {
        self.0.evacuation_id.map(|id| ID(id.to_string()))
    }

    /// The OpenTelemetry trace id of this migration.
    async fn trace_id(&self) -> Option<&str> {
        self.0.trace_id.as_deref()
    }

    async fn requested_by(&self) -> &str {
        &self.0.requested_by
    }

    async fn created_at(&self) -> DateTime<Utc> {
        self.0.created_at
    }

    async fn updated_at(&self) -> DateTime<Utc> {
        self.0.updated_at
    }
}

// ---------------------------------------------------------------------------------------------
// Mutation

/// Mutations: fleet administration here, VM lifecycle in `lifecycle`.
#[derive(async_graphql::MergedObject, Default)]
pub struct Mutation(
    AdminMutation,
    crate::lifecycle::LifecycleMutation,
    crate::migrate::MigrationMutation,
    crate::evacuate::EvacuationMutation,
    crate::tokens::TokenMutation,
);

#[derive(Default)]
pub struct AdminMutation;

/// A one-time join token; `token` is shown only here.
#[derive(SimpleObject)]
pub struct JoinToken {
    /// Give it to the cluster's agent (`drover-agent --join-token`); it carries the hub CA's
    /// fingerprint, so the agent can trust the hub on first contact.
    pub token: String,
    pub cluster: String,
    pub expires_at: DateTime<Utc>,
    /// SHA-256 of the hub's CA certificate, hex.
    pub ca_certificate_sha256: String,
}

/// What `removeCluster` did.
#[derive(SimpleObject)]
pub struct ClusterRemoval {
    pub cluster: String,
    pub certificates_revoked: i32,
    pub virtual_machines_forgotten: i32,
    /// Whether the cluster's agent was connected and has been disconnected.
    pub session_ended: bool,
}

#[Object]
impl AdminMutation {
    /// Removes a cluster from the fleet: its agent's certificates are revoked (it can no longer
    /// connect or report), its session ends, and its inventory is forgotten. The virtual
    /// machines themselves are not touched. Refused while migrations to or from it are in flight.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Admin)")]
    async fn remove_cluster(&self, ctx: &Context<'_>, name: String) -> Result<ClusterRemoval> {
        let cluster = ClusterName::new(name).map_err(ApiError::from)?;
        let admin = ctx.data_unchecked::<Arc<dyn FleetAdmin>>();
        let r = admin
            .remove_cluster(&cluster, &crate::access::actor(ctx))
            .await
            .map_err(ApiError::from)?;
        Ok(ClusterRemoval {
            cluster: r.cluster,
            certificates_revoked: clamp_i32(r.certificates_revoked),
            virtual_machines_forgotten: clamp_i32(r.virtual_machines_forgotten),
            session_ended: r.session_ended,
        })
    }

    /// Cordons a cluster for maintenance (true: nothing new is placed on it — no migration,
    /// evacuation or rebalance targets it; what runs there keeps running) or returns it to
    /// service (false). Answers with the cluster as it now is.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Admin)")]
    async fn set_cluster_maintenance(
        &self,
        ctx: &Context<'_>,
        cluster: String,
        maintenance: bool,
    ) -> Result<Cluster> {
        let name = ClusterName::new(cluster.clone()).map_err(ApiError::from)?;
        let admin = ctx.data_unchecked::<Arc<dyn FleetAdmin>>();
        admin
            .set_cluster_maintenance(&name, maintenance, &crate::access::actor(ctx))
            .await
            .map_err(ApiError::from)?;
        let c = cluster_id_by_name(ctx, &cluster).await?;
        let batch = ClusterBatch::new(reader(ctx).clone(), vec![c.id]);
        Ok(Cluster(c, batch))
    }

    /// Creates a one-time, expiring token with which the agent of `cluster` joins the hub.
    /// Refused (CONFLICT) when the cluster already has an agent identity, unless `replace`:
    /// the agent that joins with a replacement token takes the identity over, and the current
    /// agent's certificates are revoked.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Admin)")]
    async fn create_join_token(
        &self,
        ctx: &Context<'_>,
        cluster: String,
        #[graphql(default = 3600)] ttl_seconds: i32,
        #[graphql(default = false)] replace: bool,
    ) -> Result<JoinToken> {
        let cluster = ClusterName::new(cluster).map_err(ApiError::from)?;
        if !(60..=7 * 86_400).contains(&ttl_seconds) {
            return Err(ApiError::bad_input(format!(
                "ttlSeconds: {ttl_seconds} is outside 60..=604800 (one minute to one week)"
            ))
            .into());
        }
        let admin = ctx.data_unchecked::<Arc<dyn FleetAdmin>>();
        let t = admin
            .create_join_token(
                &cluster,
                std::time::Duration::from_secs(ttl_seconds as u64),
                replace,
                &crate::access::actor(ctx),
            )
            .await
            .map_err(ApiError::from)?;
        Ok(JoinToken {
            token: t.token,
            cluster: t.cluster,
            expires_at: t.expires_at,
            ca_certificate_sha256: t.ca_sha256,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Subscription

pub struct Subscription;

#[Subscription]
impl Subscription {
    /// Migrations' phase changes and progress as they happen, for one migration, one
    /// evacuation, or all.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Viewer)")]
    async fn migration_events(
        &self,
        ctx: &Context<'_>,
        migration_id: Option<ID>,
        evacuation_id: Option<ID>,
    ) -> Result<impl Stream<Item = crate::events::MigrationEvent>> {
        let events = ctx.data_unchecked::<Arc<dyn crate::events::FleetEvents>>();
        Ok(futures::StreamExt::filter(events.migrations(), move |ev| {
            let wanted = migration_id.as_ref().is_none_or(|m| *m == ev.migration_id)
                && evacuation_id
                    .as_ref()
                    .is_none_or(|e| Some(e) == ev.evacuation_id.as_ref());
            std::future::ready(wanted)
        }))
    }

    /// Inventory changes as they are committed, for one cluster or for all.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Viewer)")]
    async fn inventory_events(
        &self,
        ctx: &Context<'_>,
        cluster: Option<String>,
    ) -> Result<impl Stream<Item = InventoryEvent>> {
        let cluster = cluster
            .map(|c| ClusterName::new(c).map(String::from))
            .transpose()
            .map_err(ApiError::from)?;
        let events = ctx.data_unchecked::<Arc<dyn crate::events::FleetEvents>>();
        Ok(futures::StreamExt::filter(events.inventory(), move |ev| {
            std::future::ready(cluster.as_ref().is_none_or(|c| *c == ev.cluster))
        }))
    }
}
