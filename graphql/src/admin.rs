//! The trait through which mutations change the fleet; the hub implements it.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
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

/// Why an administrative change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    NotFound(String),
    /// The change is not safe now; the message says why and what to do.
    Conflict(String),
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
}
