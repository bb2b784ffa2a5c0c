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

#[async_trait]
pub trait FleetAdmin: Send + Sync + 'static {
    /// Creates a one-time token with which the agent of `cluster` joins the hub.
    async fn create_join_token(
        &self,
        cluster: &ClusterName,
        ttl: Duration,
        actor: &str,
    ) -> Result<JoinTokenRecord, ReadError>;
}
