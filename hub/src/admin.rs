//! The hub's side of GraphQL mutations: [`FleetAdmin`] over identities and the store. Every
//! mutation leaves an audit row: who, what, when, result.

use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use drover_graphql::{
    AdminError, CommandProgress, CommandRecord, FleetAdmin, JoinTokenRecord, MigrateRequest,
    ReadError, RemovedCluster,
};
use drover_shared::commands::AgentCommand;
use drover_shared::inventory::MigrationPhase;
use drover_shared::ClusterName;
use sea_orm::ConnectionTrait;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, TransactionTrait};
use serde_json::json;

use crate::commands::{CommandError, CommandState, CommandStore, StoredCommand};
use crate::identity::Identities;
use crate::sessions::Sessions;
use crate::store::entities::{agent_certificate, cluster, migration, vm};
use crate::store::{sql::Sql, Store, StoreError};

pub struct HubAdmin {
    pub store: Store,
    pub identities: Identities,
    pub sessions: Sessions,
    pub commands: CommandStore,
    pub migrations: crate::migrations::Migrations,
    pub scheduler: crate::scheduler::Scheduler,
}

fn migrate_err(e: crate::migrations::MigrateError) -> AdminError {
    use crate::migrations::MigrateError;
    match e {
        e @ MigrateError::Preflight(_) => AdminError::Preflight(e.to_string()),
        MigrateError::NotFound(m) => AdminError::NotFound(m),
        MigrateError::Conflict(m) => AdminError::Conflict(m),
        MigrateError::Store(e) => AdminError::Read(store_err(e)),
    }
}

fn record(c: StoredCommand) -> CommandRecord {
    CommandRecord {
        cluster: c.cluster,
        key: c.key,
        kind: c.command.kind().to_owned(),
        state: match c.state {
            CommandState::Pending => CommandProgress::Pending,
            CommandState::Succeeded => CommandProgress::Succeeded,
            CommandState::Failed => CommandProgress::Failed,
        },
        message: c.result_message,
        created_by: c.created_by,
        created_at: c.created_at,
        sent_at: c.sent_at,
        send_count: c.send_count,
        acked_at: c.acked_at,
    }
}

fn command_err(e: CommandError) -> AdminError {
    match e {
        CommandError::Store(e) => AdminError::Read(store_err(e)),
        e @ CommandError::KeyReused { .. } => AdminError::Conflict(e.to_string()),
        e @ CommandError::BadKey(_) => AdminError::Invalid(e.to_string()),
    }
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

impl HubAdmin {
    async fn cordon(&self, name: &ClusterName, maintenance: bool) -> Result<(), AdminError> {
        let db_err = |e: sea_orm::DbErr| AdminError::Read(store_err(e.into()));
        let now = Utc::now();
        let mut update = cluster::Entity::update_many()
            .col_expr(cluster::Column::Maintenance, maintenance.into())
            .col_expr(cluster::Column::UpdatedAt, now.into())
            .filter(cluster::Column::Name.eq(name.as_str()));
        if maintenance {
            // Cordoning twice keeps the first time.
            update = update.col_expr(
                cluster::Column::MaintenanceSince,
                sea_orm::sea_query::Expr::cust_with_values(
                    "COALESCE(maintenance_since, $1)",
                    [sea_orm::Value::from(now)],
                ),
            );
        } else {
            update = update.col_expr(
                cluster::Column::MaintenanceSince,
                Option::<chrono::DateTime<Utc>>::None.into(),
            );
        }
        let changed = update.exec(&self.store.db).await.map_err(db_err)?;
        if changed.rows_affected == 0 {
            return Err(AdminError::NotFound(format!(
                "cluster \"{name}\" is not in the fleet; `clusters` lists the clusters there are"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl FleetAdmin for HubAdmin {
    async fn set_cluster_maintenance(
        &self,
        cluster: &ClusterName,
        maintenance: bool,
        actor: &str,
    ) -> Result<(), AdminError> {
        let result = self.cordon(cluster, maintenance).await;
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        let details = json!({"maintenance": maintenance});
        self.audit(
            actor,
            "setClusterMaintenance",
            cluster.as_str(),
            outcome,
            details,
        )
        .await;
        result
    }

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

    async fn remove_cluster(
        &self,
        name: &ClusterName,
        actor: &str,
    ) -> Result<RemovedCluster, AdminError> {
        let result = self.remove(name).await;
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        let details = match &result {
            Ok(r) => {
                json!({"certificatesRevoked": r.certificates_revoked, "virtualMachinesForgotten": r.virtual_machines_forgotten})
            }
            Err(e) => json!({"error": format!("{e:?}")}),
        };
        self.audit(actor, "removeCluster", name.as_str(), outcome, details)
            .await;
        result
    }

    async fn run_command(
        &self,
        cluster: &ClusterName,
        key: &str,
        command: AgentCommand,
        wait: Duration,
        actor: &str,
    ) -> Result<CommandRecord, AdminError> {
        let db_err = |e: sea_orm::DbErr| AdminError::Read(store_err(e.into()));
        let known = cluster::Entity::find()
            .filter(cluster::Column::Name.eq(cluster.as_str()))
            .count(&self.store.db)
            .await
            .map_err(db_err)?;
        if known == 0 {
            return Err(AdminError::NotFound(format!(
                "cluster \"{cluster}\" is not in the fleet (its agent has not reported yet); `clusters` lists the clusters there are"
            )));
        }
        let kind = command.kind();
        let submitted = self
            .commands
            .submit(cluster, key, &command, actor)
            .await
            .map_err(command_err);
        let details = json!({"key": key, "command": command});
        let (stored, new) = match submitted {
            Ok(s) => s,
            Err(e) => {
                self.audit(actor, kind, cluster.as_str(), "refused", details)
                    .await;
                return Err(e);
            }
        };
        if new {
            self.audit(actor, kind, cluster.as_str(), "submitted", details)
                .await;
            if !self.sessions.deliver(stored.clone()) {
                tracing::info!(%cluster, %key, "command stored; the agent gets it when its session is back");
            }
        }
        let current = self
            .commands
            .wait(cluster.as_str(), key, wait)
            .await
            .map_err(|e| AdminError::Read(store_err(e)))?;
        Ok(record(current.unwrap_or(stored)))
    }

    async fn command(
        &self,
        cluster: &ClusterName,
        key: &str,
    ) -> Result<Option<CommandRecord>, ReadError> {
        Ok(self
            .commands
            .get(cluster.as_str(), key)
            .await
            .map_err(store_err)?
            .map(record))
    }

    async fn migrate_virtual_machine(
        &self,
        request: MigrateRequest,
        actor: &str,
    ) -> Result<uuid::Uuid, AdminError> {
        let target = format!(
            "{}/{}/{} -> {}",
            request.cluster, request.namespace, request.name, request.target_cluster
        );
        let result = self
            .migrations
            .start(
                crate::migrations::MigrateRequest {
                    cluster: request.cluster,
                    namespace: request.namespace,
                    name: request.name,
                    target_cluster: request.target_cluster,
                    target_namespace: request.target_namespace,
                },
                actor,
            )
            .await
            .map_err(migrate_err);
        let details = match &result {
            Ok(id) => json!({"migration": id}),
            Err(e) => json!({"error": format!("{e:?}")}),
        };
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        self.audit(actor, "migrateVirtualMachine", &target, outcome, details)
            .await;
        result
    }

    async fn cancel_migration(&self, id: uuid::Uuid, actor: &str) -> Result<(), AdminError> {
        let result = self.migrations.cancel(id, actor).await.map_err(migrate_err);
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        self.audit(
            actor,
            "cancelMigration",
            &id.to_string(),
            outcome,
            json!({}),
        )
        .await;
        result
    }
}

impl HubAdmin {
    async fn remove(&self, name: &ClusterName) -> Result<RemovedCluster, AdminError> {
        let db_err = |e: sea_orm::DbErr| AdminError::Read(store_err(e.into()));
        let tx = self.store.db.begin().await.map_err(db_err)?;
        let row = cluster::Entity::find()
            .filter(cluster::Column::Name.eq(name.as_str()))
            .one(&tx)
            .await
            .map_err(db_err)?;
        let mut forgotten = 0;
        if let Some(row) = &row {
            let in_flight = migration::Entity::find()
                .filter(
                    migration::Column::SourceClusterId
                        .eq(row.id)
                        .or(migration::Column::TargetClusterId.eq(row.id)),
                )
                .filter(
                    migration::Column::Phase
                        .is_in(MigrationPhase::IN_FLIGHT.iter().map(|p| p.as_str())),
                )
                .count(&tx)
                .await
                .map_err(db_err)?;
            if in_flight > 0 {
                return Err(AdminError::Conflict(format!(
                    "cluster {name} has {in_flight} migrations in flight; cancel them or wait for them to finish, then remove it"
                )));
            }
            forgotten = vm::Entity::find()
                .filter(vm::Column::ClusterId.eq(row.id))
                .count(&tx)
                .await
                .map_err(db_err)? as i64;
            cluster::Entity::delete_by_id(row.id)
                .exec(&tx)
                .await
                .map_err(db_err)?;
        }
        let revoked = agent_certificate::Entity::update_many()
            .col_expr(
                agent_certificate::Column::RevokedAt,
                Some(Utc::now()).into(),
            )
            .filter(agent_certificate::Column::ClusterName.eq(name.as_str()))
            .filter(agent_certificate::Column::RevokedAt.is_null())
            .exec(&tx)
            .await
            .map_err(db_err)?
            .rows_affected as i64;
        if row.is_none() && revoked == 0 {
            return Err(AdminError::NotFound(format!(
                "cluster \"{name}\" is neither in the fleet nor joined; `clusters` lists the clusters there are"
            )));
        }
        tx.commit().await.map_err(db_err)?;
        if let Err(e) = self.commands.forget_cluster(name.as_str()).await {
            tracing::warn!(cluster = %name, error = %e, "forgetting the removed cluster's commands failed");
        }
        let session_ended = self
            .sessions
            .end(name, "the cluster was removed from the fleet");
        tracing::warn!(cluster = %name, revoked, forgotten, session_ended, "cluster removed from the fleet");
        Ok(RemovedCluster {
            cluster: name.to_string(),
            certificates_revoked: revoked,
            virtual_machines_forgotten: forgotten,
            session_ended,
        })
    }
}
