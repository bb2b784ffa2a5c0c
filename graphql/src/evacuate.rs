//! Fleet operations: `planEvacuation` / `startEvacuation` / `cancelEvacuation`, `planRebalance` /
//! `startRebalance`, the `evacuations` and `evacuation(id)` queries with live counters, and
//! migration policies (`setMigrationPolicy`, `deleteMigrationPolicy`, `migrationPolicies`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::connection::{Connection, Edge, EmptyFields};
use async_graphql::{Context, Enum, InputObject, Object, Result, SimpleObject, ID};
use chrono::{DateTime, Utc};
use drover_shared::ClusterName;

use crate::admin::{
    CannotMoveRecord, ClusterLimitsRecord, EvacuationRecord, FleetAdmin, PlanAsk, PlanRecord,
    PlannedMoveRecord, PolicyRecord,
};
use crate::error::{ApiError, ErrorCode};
use crate::lifecycle::LabelInput;
use crate::schema::{Label, Long};

fn admin<'a>(ctx: &'a Context<'_>) -> &'a Arc<dyn FleetAdmin> {
    ctx.data_unchecked::<Arc<dyn FleetAdmin>>()
}

/// One VM a plan moves.
#[derive(SimpleObject)]
pub struct PlannedMove {
    pub namespace: String,
    pub name: String,
    pub source_cluster: String,
    pub source_node: String,
    pub target_cluster: String,
    pub target_node: String,
    pub memory_bytes: Long,
    pub disk_bytes: Long,
}

/// One VM a plan cannot move, with every reason.
#[derive(SimpleObject)]
pub struct CannotMove {
    pub namespace: String,
    pub name: String,
    pub cluster: String,
    pub reasons: Vec<String>,
}

/// The limits of one cluster.
#[derive(SimpleObject)]
pub struct ClusterLimits {
    pub cluster: String,
    pub parallel_migrations_per_cluster: i32,
    pub parallel_outbound_migrations_per_node: i32,
    /// Bytes per second per migration (0: unlimited).
    pub bandwidth_per_migration: Long,
}

/// The limits the scheduler applies to a plan's migrations, all at once.
#[derive(SimpleObject)]
pub struct PlanLimits {
    /// Migrations in flight in the whole fleet at most.
    pub max_in_flight: i32,
    /// Bytes per second one cluster pair carries at most (0: unlimited).
    pub pair_bandwidth_bytes_per_sec: Long,
    /// Attempts per VM (a retry only when the source still runs and the target was cleaned up).
    pub max_attempts: i32,
    pub clusters: Vec<ClusterLimits>,
}

/// What a fleet plan (and the evacuation that carries it out) does.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum PlanKind {
    /// Empty one cluster (it is cordoned first).
    Evacuation,
    /// Bring the clusters' memory utilisation within a band.
    Rebalance,
}

impl PlanKind {
    fn parse(stored: &str) -> Result<Self, ApiError> {
        match stored.to_ascii_lowercase().as_str() {
            "evacuation" => Ok(Self::Evacuation),
            "rebalance" => Ok(Self::Rebalance),
            other => Err(unreadable("kind", other)),
        }
    }
}

/// Where an evacuation or rebalance is.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
#[graphql(remote = "drover_shared::migration::EvacuationState")]
pub enum EvacuationState {
    /// Its migrations are queued or running.
    Running,
    /// Every planned VM moved.
    Succeeded,
    /// Ended with some VMs not moved (failed after their attempts).
    Failed,
    /// An operator cancelled it; what had moved stays moved.
    Cancelled,
}

impl EvacuationState {
    fn parse(stored: &str) -> Result<Self, ApiError> {
        drover_shared::migration::EvacuationState::parse(stored)
            .map(Self::from)
            .ok_or_else(|| unreadable("state", stored))
    }
}

/// A stored value this version of the API does not know (a newer hub wrote it?).
fn unreadable(field: &str, value: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Internal,
        format!("an evacuation's stored {field} {value:?} is not one this hub knows"),
    )
}

/// A dry-run plan.
#[derive(SimpleObject)]
pub struct FleetPlan {
    pub kind: PlanKind,
    /// The evacuated cluster.
    pub cluster: Option<String>,
    pub moves: Vec<PlannedMove>,
    pub cannot_move: Vec<CannotMove>,
    pub limits: PlanLimits,
    /// Under the limits, at the bandwidth each migration gets (1 GiB/s assumed where unlimited).
    pub estimated_duration_seconds: f64,
}

fn clamp(v: i64) -> i32 {
    v.clamp(0, i32::MAX as i64) as i32
}

impl TryFrom<PlanRecord> for FleetPlan {
    type Error = ApiError;

    fn try_from(p: PlanRecord) -> Result<Self, ApiError> {
        Ok(Self {
            kind: PlanKind::parse(&p.kind)?,
            cluster: p.cluster,
            moves: p
                .moves
                .into_iter()
                .map(|m: PlannedMoveRecord| PlannedMove {
                    namespace: m.namespace,
                    name: m.name,
                    source_cluster: m.source_cluster,
                    source_node: m.source_node,
                    target_cluster: m.target_cluster,
                    target_node: m.target_node,
                    memory_bytes: Long(m.memory_bytes),
                    disk_bytes: Long(m.disk_bytes),
                })
                .collect(),
            cannot_move: p
                .cannot_move
                .into_iter()
                .map(|c: CannotMoveRecord| CannotMove {
                    namespace: c.namespace,
                    name: c.name,
                    cluster: c.cluster,
                    reasons: c.reasons,
                })
                .collect(),
            limits: PlanLimits {
                max_in_flight: clamp(p.max_in_flight),
                pair_bandwidth_bytes_per_sec: Long(p.pair_bandwidth_bytes_per_sec),
                max_attempts: clamp(p.max_attempts),
                clusters: p
                    .cluster_limits
                    .into_iter()
                    .map(|c: ClusterLimitsRecord| ClusterLimits {
                        cluster: c.cluster,
                        parallel_migrations_per_cluster: clamp(c.parallel_migrations_per_cluster),
                        parallel_outbound_migrations_per_node: clamp(
                            c.parallel_outbound_migrations_per_node,
                        ),
                        bandwidth_per_migration: Long(c.bandwidth_per_migration),
                    })
                    .collect(),
            },
            estimated_duration_seconds: p.estimated_seconds,
        })
    }
}

/// How far an evacuation has come, counted from its migrations (each VM's latest attempt).
#[derive(SimpleObject)]
pub struct EvacuationCounters {
    pub planned: i32,
    /// Waiting for a slot (or for a safe retry).
    pub queued: i32,
    pub running: i32,
    pub succeeded: i32,
    /// Failed with no attempt left.
    pub failed: i32,
    pub cannot_move: i32,
}

/// An evacuation or rebalance; its migrations are `migrations(filter: {evacuationId})`.
#[derive(SimpleObject)]
pub struct Evacuation {
    pub id: ID,
    pub kind: PlanKind,
    pub cluster: Option<String>,
    pub state: EvacuationState,
    pub plan: FleetPlan,
    pub counters: EvacuationCounters,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// From the pace of its finished moves (the plan's estimate before the first one).
    pub estimated_finish_at: Option<DateTime<Utc>>,
}

impl TryFrom<EvacuationRecord> for Evacuation {
    type Error = ApiError;

    fn try_from(e: EvacuationRecord) -> Result<Self, ApiError> {
        Ok(Self {
            id: ID(e.id.to_string()),
            kind: PlanKind::parse(&e.kind)?,
            cluster: e.cluster,
            state: EvacuationState::parse(&e.state)?,
            plan: e.plan.try_into()?,
            counters: EvacuationCounters {
                planned: clamp(e.planned),
                queued: clamp(e.queued),
                running: clamp(e.running),
                succeeded: clamp(e.succeeded),
                failed: clamp(e.failed),
                cannot_move: clamp(e.cannot_move),
            },
            created_by: e.created_by,
            created_at: e.created_at,
            started_at: e.started_at,
            finished_at: e.finished_at,
            estimated_finish_at: e.estimated_finish_at,
        })
    }
}

/// A migration policy (as KubeVirt's MigrationPolicy).
#[derive(SimpleObject)]
pub struct MigrationPolicy {
    pub name: String,
    /// Labels a VM must carry, all of them.
    pub vm_selector: Vec<Label>,
    /// Labels the VM's namespace must carry (`kubernetes.io/metadata.name` is its name).
    pub namespace_selector: Vec<Label>,
    pub bandwidth_per_migration: Option<Long>,
    pub completion_timeout_per_gib: Option<i32>,
    pub allow_auto_converge: Option<bool>,
    pub allow_post_copy: Option<bool>,
}

fn labels(map: BTreeMap<String, String>) -> Vec<Label> {
    map.into_iter()
        .map(|(key, value)| Label { key, value })
        .collect()
}

impl From<PolicyRecord> for MigrationPolicy {
    fn from(p: PolicyRecord) -> Self {
        Self {
            name: p.name,
            vm_selector: labels(p.vm_selector),
            namespace_selector: labels(p.namespace_selector),
            bandwidth_per_migration: p.bandwidth_per_migration.map(Long),
            completion_timeout_per_gib: p.completion_timeout_per_gib,
            allow_auto_converge: p.allow_auto_converge,
            allow_post_copy: p.allow_post_copy,
        }
    }
}

#[derive(InputObject)]
pub struct EvacuationInput {
    /// The cluster to empty.
    pub cluster: String,
    /// startEvacuation only: start even if some VMs cannot move (they stay where they are).
    #[graphql(default = false)]
    pub allow_partial: bool,
}

#[derive(InputObject)]
pub struct RebalanceInput {
    /// Clusters within mean ± band/2 of memory utilisation count as balanced (0.1 = 10%).
    #[graphql(default = 0.1)]
    pub band: f64,
    /// A move must narrow the spread between the fullest and emptiest cluster by this much.
    #[graphql(default = 0.02)]
    pub min_improvement: f64,
    /// At most this many moves per run.
    #[graphql(default = 10)]
    pub max_moves: i32,
    /// VMs moved this recently stay, and no rebalance starts this soon after the last one.
    #[graphql(default = 3600)]
    pub hold_down_seconds: i32,
}

#[derive(InputObject)]
pub struct MigrationPolicyInput {
    pub name: String,
    #[graphql(default)]
    pub vm_selector: Vec<LabelInput>,
    #[graphql(default)]
    pub namespace_selector: Vec<LabelInput>,
    /// Bytes per second (0: unlimited); unset: the source cluster's setting.
    pub bandwidth_per_migration: Option<Long>,
    pub completion_timeout_per_gib: Option<i32>,
    pub allow_auto_converge: Option<bool>,
    pub allow_post_copy: Option<bool>,
}

fn evacuation_ask(input: &EvacuationInput) -> Result<PlanAsk, ApiError> {
    Ok(PlanAsk::Evacuation {
        cluster: ClusterName::new(input.cluster.clone())?,
    })
}

fn rebalance_ask(input: &RebalanceInput) -> Result<PlanAsk, ApiError> {
    if !(input.band > 0.0 && input.band < 1.0) {
        return Err(ApiError::bad_input(format!(
            "band: {} is not between 0 and 1 (a fraction of memory utilisation, e.g. 0.1)",
            input.band
        )));
    }
    if !(0.0..1.0).contains(&input.min_improvement) {
        return Err(ApiError::bad_input(format!(
            "minImprovement: {} is not between 0 and 1",
            input.min_improvement
        )));
    }
    if !(1..=1000).contains(&input.max_moves) {
        return Err(ApiError::bad_input(format!(
            "maxMoves: {} is outside 1..=1000",
            input.max_moves
        )));
    }
    if input.hold_down_seconds < 0 {
        return Err(ApiError::bad_input("holdDownSeconds: must not be negative"));
    }
    Ok(PlanAsk::Rebalance {
        band: input.band,
        min_improvement: input.min_improvement,
        max_moves: input.max_moves as usize,
        hold_down: Duration::from_secs(input.hold_down_seconds as u64),
    })
}

fn parse_id(what: &str, id: &ID) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(id)
        .map_err(|_| ApiError::bad_input(format!("{what}: {:?} is not an id", id.as_str())))
}

async fn evacuation(ctx: &Context<'_>, id: uuid::Uuid) -> Result<Evacuation> {
    admin(ctx)
        .evacuations(Some(id), None, 1)
        .await
        .map_err(ApiError::from)?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("evacuation {id} does not exist")))?
        .try_into()
        .map_err(Into::into)
}

fn selector(labels: Vec<LabelInput>) -> Result<BTreeMap<String, String>, ApiError> {
    let mut map = BTreeMap::new();
    for l in labels {
        if l.key.is_empty() || l.key.len() > 317 {
            return Err(ApiError::bad_input(format!(
                "label key {:?} is empty or too long",
                l.key
            )));
        }
        map.insert(l.key, l.value);
    }
    Ok(map)
}

#[derive(Default)]
pub struct EvacuationMutation;

#[Object]
impl EvacuationMutation {
    /// A dry run: where every VM of `cluster` would go, which cannot move and why, the limits
    /// that will apply and the estimated duration. Changes nothing.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Migrator)")]
    async fn plan_evacuation(
        &self,
        ctx: &Context<'_>,
        input: EvacuationInput,
    ) -> Result<FleetPlan> {
        let ask = evacuation_ask(&input)?;
        Ok(admin(ctx)
            .plan(ask)
            .await
            .map_err(ApiError::from)?
            .try_into()?)
    }

    /// Empties a cluster: cordons it, plans again on the fleet as it is now (refused with
    /// PREFLIGHT_FAILED, listing who cannot move and why, unless allowPartial) and queues one
    /// migration per VM; the scheduler runs them under every limit. Follow it with
    /// `evacuation(id)`.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Migrator)")]
    async fn start_evacuation(
        &self,
        ctx: &Context<'_>,
        input: EvacuationInput,
    ) -> Result<Evacuation> {
        let ask = evacuation_ask(&input)?;
        let id = admin(ctx)
            .start_plan(ask, input.allow_partial, &crate::access::actor(ctx))
            .await
            .map_err(ApiError::from)?;
        evacuation(ctx, id).await
    }

    /// Stops an evacuation or rebalance: nothing more is admitted, queued moves are dropped,
    /// and migrations in flight are cancelled safely (the source keeps running; one already
    /// switching over completes).
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Migrator)")]
    async fn cancel_evacuation(&self, ctx: &Context<'_>, id: ID) -> Result<Evacuation> {
        let id = parse_id("id", &id)?;
        admin(ctx)
            .cancel_evacuation(id, &crate::access::actor(ctx))
            .await
            .map_err(ApiError::from)?;
        evacuation(ctx, id).await
    }

    /// A dry run of a rebalance: the moves that bring clusters' memory utilisation within the
    /// band (pinned, affinity-grouped and recently moved VMs stay).
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Migrator)")]
    async fn plan_rebalance(&self, ctx: &Context<'_>, input: RebalanceInput) -> Result<FleetPlan> {
        let ask = rebalance_ask(&input)?;
        Ok(admin(ctx)
            .plan(ask)
            .await
            .map_err(ApiError::from)?
            .try_into()?)
    }

    /// Runs a rebalance (planned again now); refused within the hold-down time of the last one.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Migrator)")]
    async fn start_rebalance(
        &self,
        ctx: &Context<'_>,
        input: RebalanceInput,
    ) -> Result<Evacuation> {
        let ask = rebalance_ask(&input)?;
        let id = admin(ctx)
            .start_plan(ask, true, &crate::access::actor(ctx))
            .await
            .map_err(ApiError::from)?;
        evacuation(ctx, id).await
    }

    /// Creates or replaces a migration policy. Among the policies whose selectors all match a
    /// VM, the one matching the most labels applies (ties: the first name); what it leaves
    /// unset comes from the source cluster. Applies to migrations queued from now on.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Admin)")]
    async fn set_migration_policy(
        &self,
        ctx: &Context<'_>,
        input: MigrationPolicyInput,
    ) -> Result<MigrationPolicy> {
        let name = drover_shared::Namespace::new(input.name.clone())
            .map_err(|_| {
                ApiError::bad_input(format!(
                    "name: {:?} is not a DNS-1123 label (lowercase letters, digits, '-')",
                    input.name
                ))
            })?
            .to_string();
        if input.bandwidth_per_migration.is_some_and(|b| b.0 < 0) {
            return Err(ApiError::bad_input("bandwidthPerMigration: must not be negative").into());
        }
        if input.completion_timeout_per_gib.is_some_and(|t| t <= 0) {
            return Err(ApiError::bad_input("completionTimeoutPerGib: must be positive").into());
        }
        let policy = PolicyRecord {
            name,
            vm_selector: selector(input.vm_selector)?,
            namespace_selector: selector(input.namespace_selector)?,
            bandwidth_per_migration: input.bandwidth_per_migration.map(|b| b.0),
            completion_timeout_per_gib: input.completion_timeout_per_gib,
            allow_auto_converge: input.allow_auto_converge,
            allow_post_copy: input.allow_post_copy,
        };
        admin(ctx)
            .set_migration_policy(policy.clone(), &crate::access::actor(ctx))
            .await
            .map_err(ApiError::from)?;
        Ok(policy.into())
    }

    /// Deletes a migration policy; true when there was one.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Admin)")]
    async fn delete_migration_policy(&self, ctx: &Context<'_>, name: String) -> Result<bool> {
        Ok(admin(ctx)
            .delete_migration_policy(&name, &crate::access::actor(ctx))
            .await
            .map_err(ApiError::from)?)
    }
}

/// The queries of this module (merged into `Query`): evacuations and rebalances, newest first,
/// as a connection (`after` is an `endCursor` of a previous page).
pub async fn evacuations(
    ctx: &Context<'_>,
    first: Option<i32>,
    after: Option<String>,
) -> Result<Connection<String, Evacuation, EmptyFields>> {
    let page = crate::schema::page_request(first, after, 1)?;
    let after = page
        .after
        .as_ref()
        .map(|key| parse_id("after", &ID(key[0].clone())))
        .transpose()?;
    let mut records = admin(ctx)
        .evacuations(None, after, u64::from(page.first) + 1)
        .await
        .map_err(ApiError::from)?;
    let has_next = records.len() > page.first as usize;
    records.truncate(page.first as usize);
    let mut conn = Connection::new(after.is_some(), has_next);
    for record in records {
        let cursor = crate::model::encode_cursor(&[&record.id.to_string()]);
        conn.edges
            .push(Edge::new(cursor, Evacuation::try_from(record)?));
    }
    Ok(conn)
}

pub async fn evacuation_by_id(ctx: &Context<'_>, id: ID) -> Result<Option<Evacuation>> {
    let id = parse_id("id", &id)?;
    Ok(admin(ctx)
        .evacuations(Some(id), None, 1)
        .await
        .map_err(ApiError::from)?
        .into_iter()
        .next()
        .map(Evacuation::try_from)
        .transpose()?)
}

pub async fn migration_policies(ctx: &Context<'_>) -> Result<Vec<MigrationPolicy>> {
    Ok(admin(ctx)
        .migration_policies()
        .await
        .map_err(ApiError::from)?
        .into_iter()
        .map(MigrationPolicy::from)
        .collect())
}
