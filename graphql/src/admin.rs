//! The trait through which mutations change the fleet; the hub implements it.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use drover_shared::commands::AgentCommand;
use drover_shared::ClusterName;

use crate::reader::ReadError;

/// A join token as created, shown to the operator once.
#[derive(Debug, Clone)]
pub struct JoinTokenRecord {
    pub token: String,
    pub cluster: String,
    pub expires_at: DateTime<Utc>,
    pub ca_sha256: String,
}

/// What removing a cluster did.
#[derive(Debug, Clone, Default)]
pub struct RemovedCluster {
    pub cluster: String,
    pub certificates_revoked: i64,
    pub virtual_machines_forgotten: i64,
    pub session_ended: bool,
}

/// Where a hub -> agent command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandProgress {
    /// Stored; not yet acknowledged by the agent (it may be offline: it gets it on reconnect).
    Pending,
    Succeeded,
    Failed,
}

/// A hub -> agent command as the hub records it.
#[derive(Debug, Clone)]
pub struct CommandRecord {
    pub cluster: String,
    pub key: String,
    pub kind: String,
    pub state: CommandProgress,
    /// The agent's message (success) or reason (failure).
    pub message: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub send_count: i32,
    pub acked_at: Option<DateTime<Utc>>,
}

pub use drover_shared::migration::MigrateRequest;

/// One VM the plan moves.
#[derive(Debug, Clone)]
pub struct PlannedMoveRecord {
    pub namespace: String,
    pub name: String,
    pub source_cluster: String,
    pub source_node: String,
    pub target_cluster: String,
    pub target_node: String,
    pub memory_bytes: i64,
    pub disk_bytes: i64,
}

/// One VM the plan cannot move, with every reason.
#[derive(Debug, Clone)]
pub struct CannotMoveRecord {
    pub namespace: String,
    pub name: String,
    pub cluster: String,
    pub reasons: Vec<String>,
}

/// The limits of one cluster a plan touches.
#[derive(Debug, Clone)]
pub struct ClusterLimitsRecord {
    pub cluster: String,
    pub parallel_migrations_per_cluster: i64,
    pub parallel_outbound_migrations_per_node: i64,
    pub bandwidth_per_migration: i64,
}

/// A plan (evacuation or rebalance): the moves, who cannot move and why, the limits that will
/// apply and the estimated duration.
#[derive(Debug, Clone)]
pub struct PlanRecord {
    pub kind: String,
    pub cluster: Option<String>,
    pub moves: Vec<PlannedMoveRecord>,
    pub cannot_move: Vec<CannotMoveRecord>,
    pub max_in_flight: i64,
    pub pair_bandwidth_bytes_per_sec: i64,
    pub max_attempts: i64,
    pub cluster_limits: Vec<ClusterLimitsRecord>,
    pub estimated_seconds: f64,
}

/// What to plan.
#[derive(Debug, Clone)]
pub enum PlanAsk {
    Evacuation {
        cluster: ClusterName,
    },
    Rebalance {
        /// Utilisation within mean ± band/2 counts as balanced.
        band: f64,
        min_improvement: f64,
        max_moves: usize,
        /// VMs moved this recently stay, and no rebalance starts this soon after another.
        hold_down: Duration,
    },
}

/// An evacuation or rebalance as it stands.
#[derive(Debug, Clone)]
pub struct EvacuationRecord {
    pub id: uuid::Uuid,
    pub kind: String,
    pub cluster: Option<String>,
    pub state: String,
    pub plan: PlanRecord,
    pub planned: i64,
    pub queued: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cannot_move: i64,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub estimated_finish_at: Option<DateTime<Utc>>,
}

/// A migration policy: selectors and the settings it gives the VMs it selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    pub name: String,
    pub vm_selector: std::collections::BTreeMap<String, String>,
    pub namespace_selector: std::collections::BTreeMap<String, String>,
    pub bandwidth_per_migration: Option<i64>,
    pub completion_timeout_per_gib: Option<i32>,
    pub allow_auto_converge: Option<bool>,
    pub allow_post_copy: Option<bool>,
}

/// Why an administrative change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    NotFound(String),
    /// The change is not safe now; the message says why and what to do.
    Conflict(String),
    /// The request itself is wrong; the message says what and how to fix it.
    Invalid(String),
    /// A migration's preflight checks failed; the message lists the reasons.
    Preflight(String),
    Read(ReadError),
}

impl From<ReadError> for AdminError {
    fn from(e: ReadError) -> Self {
        Self::Read(e)
    }
}

#[async_trait]
pub trait FleetAdmin: Send + Sync + 'static {
    /// Creates a one-time token with which the agent of `cluster` joins the hub; refused when
    /// the cluster has an identity, unless `replace` (redeeming it then revokes that identity).
    async fn create_join_token(
        &self,
        cluster: &ClusterName,
        ttl: Duration,
        replace: bool,
        actor: &str,
    ) -> Result<JoinTokenRecord, AdminError>;

    /// Removes a cluster from the fleet: revokes its agent's certificates, ends its session and
    /// forgets its inventory. Refused while migrations to or from it are in flight.
    async fn remove_cluster(
        &self,
        cluster: &ClusterName,
        actor: &str,
    ) -> Result<RemovedCluster, AdminError>;

    /// Stores `command` for `cluster`'s agent under `key` (a repeat with the same key and
    /// command returns the first one), delivers it, and waits up to `wait` for the outcome.
    async fn run_command(
        &self,
        cluster: &ClusterName,
        key: &str,
        command: AgentCommand,
        wait: Duration,
        actor: &str,
    ) -> Result<CommandRecord, AdminError>;

    /// A command by its cluster and idempotency key.
    async fn command(
        &self,
        cluster: &ClusterName,
        key: &str,
    ) -> Result<Option<CommandRecord>, ReadError>;

    /// Preflight checks, then a Migration (returned id) driven to its end by the hub.
    async fn migrate_virtual_machine(
        &self,
        request: MigrateRequest,
        actor: &str,
    ) -> Result<uuid::Uuid, AdminError>;

    /// Cancels a migration before switchover; the source keeps running.
    async fn cancel_migration(&self, id: uuid::Uuid, actor: &str) -> Result<(), AdminError>;

    /// A dry run: the plan for an evacuation or a rebalance on the fleet as it is now.
    async fn plan(&self, ask: PlanAsk) -> Result<PlanRecord, AdminError>;

    /// Starts a plan (re-planned now); refused when a VM cannot move unless `allow_partial`.
    async fn start_plan(
        &self,
        ask: PlanAsk,
        allow_partial: bool,
        actor: &str,
    ) -> Result<uuid::Uuid, AdminError>;

    /// Stops admitting an evacuation's migrations and cancels those in flight safely.
    async fn cancel_evacuation(&self, id: uuid::Uuid, actor: &str) -> Result<(), AdminError>;

    /// One evacuation, or when `id` is None the newest `limit` of them older than `after` (an
    /// evacuation's id, from a previous page). A constant number of statements per call.
    async fn evacuations(
        &self,
        id: Option<uuid::Uuid>,
        after: Option<uuid::Uuid>,
        limit: u64,
    ) -> Result<Vec<EvacuationRecord>, AdminError>;

    /// Creates or replaces a migration policy.
    async fn set_migration_policy(
        &self,
        policy: PolicyRecord,
        actor: &str,
    ) -> Result<(), AdminError>;

    /// Deletes a migration policy; false when there was none of that name.
    async fn delete_migration_policy(&self, name: &str, actor: &str) -> Result<bool, AdminError>;

    /// Every migration policy, by name.
    async fn migration_policies(&self) -> Result<Vec<PolicyRecord>, AdminError>;

    /// Cordons a cluster (nothing new is placed on it; what runs there stays) or uncordons it.
    async fn set_cluster_maintenance(
        &self,
        cluster: &ClusterName,
        maintenance: bool,
        actor: &str,
    ) -> Result<(), AdminError>;

    /// Creates an API token with `role`, expiring at `expires_at` if given; returns it with its
    /// secret (shown once).
    async fn create_api_token(
        &self,
        name: &str,
        role: crate::access::Role,
        expires_at: Option<DateTime<Utc>>,
        actor: &str,
    ) -> Result<(ApiTokenRecord, String), AdminError>;

    /// Revokes the API token `name` (refused from then on); false when there was none to revoke.
    async fn revoke_api_token(&self, name: &str, actor: &str) -> Result<bool, AdminError>;

    /// Every API token, without its secret.
    async fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, AdminError>;
}

/// An API token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTokenRecord {
    pub name: String,
    pub role: crate::access::Role,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}
