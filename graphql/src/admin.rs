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

/// A single VM migration an operator asks for.
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    pub cluster: ClusterName,
    pub namespace: String,
    pub name: String,
    pub target_cluster: ClusterName,
    pub target_namespace: String,
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
    /// Creates a one-time token with which the agent of `cluster` joins the hub.
    async fn create_join_token(
        &self,
        cluster: &ClusterName,
        ttl: Duration,
        actor: &str,
    ) -> Result<JoinTokenRecord, ReadError>;

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

    /// Cordons a cluster (nothing new is placed on it; what runs there stays) or uncordons it.
    async fn set_cluster_maintenance(
        &self,
        cluster: &ClusterName,
        maintenance: bool,
        actor: &str,
    ) -> Result<(), AdminError>;
}
