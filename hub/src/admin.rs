//! The hub's side of GraphQL mutations: [`FleetAdmin`] over identities and the store. Every
//! mutation leaves an audit row: who, what, when, result.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use drover_graphql::{FleetAdmin, JoinTokenRecord, ReadError};
use drover_shared::ClusterName;
use sea_orm::ConnectionTrait;
use serde_json::json;

use crate::identity::Identities;
use crate::store::{sql::Sql, Store, StoreError};

pub struct HubAdmin {
    pub store: Store,
    pub identities: Identities,
}

fn store_err(e: StoreError) -> ReadError {
    match e {
        StoreError::Unavailable(e) => ReadError::Unavailable(e.to_string()),
        other => ReadError::Internal(other.to_string()),
    }
}

impl HubAdmin {
    async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        result: &str,
        details: serde_json::Value,
    ) {
        let mut sql = Sql::new(self.store.backend());
        sql.push("INSERT INTO audit_log (at, actor, action, target, result, details) VALUES (")
            .bind(Utc::now())
            .push(", ")
            .bind(actor.to_owned())
            .push(", ")
            .bind(action.to_owned())
            .push(", ")
            .bind(target.to_owned())
            .push(", ")
            .bind(result.to_owned())
            .push(", ")
            .bind(details)
            .push(")");
        if let Err(e) = self.store.db.execute(sql.build()).await {
            // The action stands; the missing audit row is loud in the log.
            tracing::error!(error = %e, %actor, %action, %target, "writing the audit log failed");
        }
    }
}

#[async_trait]
impl FleetAdmin for HubAdmin {
    async fn create_join_token(
        &self,
        cluster: &ClusterName,
        ttl: Duration,
        actor: &str,
    ) -> Result<JoinTokenRecord, ReadError> {
        let result = self
            .identities
            .create_join_token(cluster, ttl, actor)
            .await
            .map_err(store_err);
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.audit(
            actor,
            "createJoinToken",
            cluster.as_str(),
            outcome,
            json!({ "ttlSeconds": ttl.as_secs() }),
        )
        .await;
        let t = result?;
        Ok(JoinTokenRecord {
            token: t.token,
            cluster: t.cluster.to_string(),
            expires_at: t.expires_at,
            ca_sha256: t.ca_sha256,
        })
    }
}
