//! The hub's side of GraphQL mutations: [`FleetAdmin`] over identities and the store. Every
//! mutation leaves an audit row: who, what, when, result.

use std::time::Duration;

use async_trait::async_trait;
use drover_graphql::{
    AdminError, CannotMoveRecord, ClusterLimitsRecord, CommandProgress, CommandRecord,
    EvacuationRecord, FleetAdmin, JoinTokenRecord, MigrateRequest, PlanAsk, PlanRecord,
    PlannedMoveRecord, PolicyRecord, ReadError, RemovedCluster,
};

use crate::core::planner::{Plan, PlanKind, RebalanceOptions};
use crate::core::policy::MigrationPolicy;
use crate::orchestration::evacuations::{self, EvacuationState, PlanRequest};
use crate::store::policies;
use drover_shared::commands::AgentCommand;
use drover_shared::ClusterName;
use serde_json::json;

use crate::agents::commands::{CommandError, CommandState, CommandStore, StoredCommand};
use crate::agents::identity::Identities;
use crate::agents::sessions::Sessions;
use crate::store::clusters::{self, ClusterRemoval};
use crate::store::entities::{evacuation, migration};
use crate::store::fleet::{evacuations_with_migrations, stored_plan};
use crate::store::{Store, StoreError};

pub struct HubAdmin {
    /// Forgets cached token lookups when a token is revoked here.
    pub auth: std::sync::Arc<crate::api::auth::Authenticator>,
    pub store: Store,
    pub identities: Identities,
    pub sessions: Sessions,
    pub commands: CommandStore,
    pub migrations: crate::orchestration::migrations::Migrations,
    pub scheduler: crate::orchestration::scheduler::Scheduler,
}

fn migrate_err(e: crate::orchestration::migrations::MigrateError) -> AdminError {
    use crate::orchestration::migrations::MigrateError;
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

/// A stored token as the API lists it (an unknown stored role reads as viewer, the least).
fn token_record(t: crate::store::tokens::TokenRecord) -> drover_graphql::admin::ApiTokenRecord {
    drover_graphql::admin::ApiTokenRecord {
        role: drover_graphql::access::Role::parse(&t.role)
            .unwrap_or(drover_graphql::access::Role::Viewer),
        name: t.name,
        created_by: t.created_by,
        created_at: t.created_at,
        expires_at: t.expires_at,
        revoked_at: t.revoked_at,
        last_used_at: t.last_used_at,
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
        if let Err(e) = clusters::audit(&self.store, actor, action, target, result, details).await {
            // The action stands; the missing audit row is loud in the log.
            tracing::error!(error = %e, %actor, %action, %target, "writing the audit log failed");
        }
    }
}

impl HubAdmin {
    async fn cordon(&self, name: &ClusterName, maintenance: bool) -> Result<(), AdminError> {
        let found = evacuations::cordon(&self.store, name.as_str(), maintenance)
            .await
            .map_err(|e| AdminError::Read(store_err(e)))?;
        if !found {
            return Err(AdminError::NotFound(format!(
                "cluster \"{name}\" is not in the fleet; `clusters` lists the clusters there are"
            )));
        }
        Ok(())
    }
}

fn plan_request(ask: &PlanAsk) -> PlanRequest {
    match ask {
        PlanAsk::Evacuation { cluster } => PlanRequest::Evacuation {
            cluster: cluster.to_string(),
        },
        PlanAsk::Rebalance {
            band,
            min_improvement,
            max_moves,
            hold_down,
        } => PlanRequest::Rebalance(RebalanceOptions {
            band: *band,
            min_improvement: *min_improvement,
            max_moves: *max_moves,
            hold_down_secs: hold_down.as_secs(),
            last_rebalance_at: None,
            recently_moved_secs: hold_down.as_secs(),
        }),
    }
}

fn plan_record(plan: Plan) -> PlanRecord {
    let long = |v: u64| v.min(i64::MAX as u64) as i64;
    let limits = &plan.limits;
    PlanRecord {
        kind: match plan.kind {
            PlanKind::Evacuation { .. } => "evacuation",
            PlanKind::Rebalance => "rebalance",
            PlanKind::Move { .. } => "move",
        }
        .to_owned(),
        cluster: evacuations::evacuated(&plan).map(|c| c.to_string()),
        moves: plan
            .moves
            .iter()
            .map(|m| PlannedMoveRecord {
                namespace: m.vm.namespace.to_string(),
                name: m.vm.name.to_string(),
                source_cluster: m.vm.cluster.to_string(),
                source_node: m.source_node.clone(),
                target_cluster: m.target_cluster.to_string(),
                target_node: m.target_node.clone(),
                memory_bytes: long(m.memory_bytes),
                disk_bytes: long(m.disk_bytes),
            })
            .collect(),
        cannot_move: plan
            .cannot_move
            .iter()
            .map(|c| CannotMoveRecord {
                namespace: c.vm.namespace.to_string(),
                name: c.vm.name.to_string(),
                cluster: c.vm.cluster.to_string(),
                reasons: c.reasons.iter().map(|r| r.to_string()).collect(),
            })
            .collect(),
        max_in_flight: limits.max_in_flight as i64,
        pair_bandwidth_bytes_per_sec: limits
            .pairs
            .iter()
            .map(|p| long(p.bytes_per_sec))
            .max()
            .unwrap_or(0),
        max_attempts: i64::from(limits.max_attempts),
        cluster_limits: limits
            .clusters
            .iter()
            .map(|c| ClusterLimitsRecord {
                cluster: c.cluster.to_string(),
                parallel_migrations_per_cluster: i64::from(c.parallel_migrations_per_cluster),
                parallel_outbound_migrations_per_node: i64::from(
                    c.parallel_outbound_migrations_per_node,
                ),
                bandwidth_per_migration: long(c.bandwidth_per_migration),
            })
            .collect(),
        estimated_seconds: plan.estimate.seconds,
    }
}

impl HubAdmin {
    /// An evacuation as the API shows it, from its row and its migrations' rows.
    fn evacuation_record(
        &self,
        e: evacuation::Model,
        rows: &[migration::Model],
        max_attempts: i32,
    ) -> Result<EvacuationRecord, AdminError> {
        let c = evacuations::counters_of(&e, rows, max_attempts);
        let estimated_finish_at = match EvacuationState::parse(&e.state) {
            Some(EvacuationState::Running) => {
                evacuations::estimated_finish(&e, rows, self.store.clock.now())
            }
            _ => e.finished_at,
        };
        Ok(EvacuationRecord {
            id: e.id,
            kind: e.kind.clone(),
            cluster: stored_plan(&e)
                .as_ref()
                .and_then(evacuations::evacuated)
                .map(|c| c.to_string()),
            state: e.state.clone(),
            plan: stored_plan(&e).map(plan_record).ok_or_else(|| {
                AdminError::Read(ReadError::Internal(format!(
                    "evacuation {}'s stored plan is unreadable",
                    e.id
                )))
            })?,
            planned: c.planned,
            queued: c.queued,
            running: c.running,
            succeeded: c.succeeded,
            failed: c.failed,
            cannot_move: c.cannot_move,
            created_by: e.created_by,
            created_at: e.created_at,
            started_at: e.started_at,
            finished_at: e.finished_at,
            estimated_finish_at,
        })
    }
}

#[async_trait]
impl FleetAdmin for HubAdmin {
    async fn plan(&self, ask: PlanAsk) -> Result<PlanRecord, AdminError> {
        let plan = evacuations::plan(&self.store, &plan_request(&ask), &self.scheduler.settings())
            .await
            .map_err(migrate_err)?;
        Ok(plan_record(plan))
    }

    async fn start_plan(
        &self,
        ask: PlanAsk,
        allow_partial: bool,
        actor: &str,
    ) -> Result<uuid::Uuid, AdminError> {
        let (action, target) = match &ask {
            PlanAsk::Evacuation { cluster } => ("startEvacuation", cluster.to_string()),
            PlanAsk::Rebalance { .. } => ("startRebalance", "fleet".to_owned()),
        };
        let result = evacuations::start(
            &self.store,
            &self.migrations,
            &plan_request(&ask),
            allow_partial,
            &self.scheduler.settings(),
            actor,
        )
        .await
        .map_err(migrate_err);
        let (outcome, details) = match &result {
            Ok(id) => ("ok", json!({"evacuation": id})),
            Err(e) => ("refused", json!({"error": format!("{e:?}")})),
        };
        self.audit(actor, action, &target, outcome, details).await;
        result
    }

    async fn cancel_evacuation(&self, id: uuid::Uuid, actor: &str) -> Result<(), AdminError> {
        let result = evacuations::cancel(&self.store, &self.migrations, id, actor)
            .await
            .map_err(migrate_err);
        let outcome = if result.is_ok() { "ok" } else { "refused" };
        self.audit(
            actor,
            "cancelEvacuation",
            &id.to_string(),
            outcome,
            json!({}),
        )
        .await;
        result
    }

    async fn evacuations(
        &self,
        id: Option<uuid::Uuid>,
        after: Option<uuid::Uuid>,
        limit: u64,
    ) -> Result<Vec<EvacuationRecord>, AdminError> {
        // Ids are time-ordered (UUIDv7): newest first, and `after` pages on from an id; every
        // listed evacuation's migrations in one statement.
        let evacuations = evacuations_with_migrations(&self.store, id, after, limit)
            .await
            .map_err(|e| AdminError::Read(store_err(e)))?;
        let max_attempts = self.scheduler.settings().max_attempts;
        evacuations
            .into_iter()
            .map(|(e, rows)| self.evacuation_record(e, &rows, max_attempts))
            .collect()
    }

    async fn set_migration_policy(
        &self,
        policy: PolicyRecord,
        actor: &str,
    ) -> Result<(), AdminError> {
        let stored = MigrationPolicy {
            name: policy.name.clone(),
            vm_selector: policy.vm_selector.clone(),
            namespace_selector: policy.namespace_selector.clone(),
            bandwidth_per_migration: policy.bandwidth_per_migration.map(|b| b.max(0) as u64),
            completion_timeout_per_gib: policy.completion_timeout_per_gib.map(|t| t.max(1) as u32),
            allow_auto_converge: policy.allow_auto_converge,
            allow_post_copy: policy.allow_post_copy,
        };
        let result = policies::save(&self.store, &stored)
            .await
            .map_err(|e| AdminError::Read(store_err(e)));
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.audit(
            actor,
            "setMigrationPolicy",
            &policy.name,
            outcome,
            json!({
                "vmSelector": policy.vm_selector,
                "namespaceSelector": policy.namespace_selector,
                "bandwidthPerMigration": policy.bandwidth_per_migration,
                "completionTimeoutPerGib": policy.completion_timeout_per_gib,
                "allowAutoConverge": policy.allow_auto_converge,
                "allowPostCopy": policy.allow_post_copy,
            }),
        )
        .await;
        result
    }

    async fn delete_migration_policy(&self, name: &str, actor: &str) -> Result<bool, AdminError> {
        let result = policies::delete(&self.store, name)
            .await
            .map_err(|e| AdminError::Read(store_err(e)));
        let outcome = match &result {
            Ok(true) => "ok",
            Ok(false) => "absent",
            Err(_) => "failed",
        };
        self.audit(actor, "deleteMigrationPolicy", name, outcome, json!({}))
            .await;
        result
    }

    async fn migration_policies(&self) -> Result<Vec<PolicyRecord>, AdminError> {
        Ok(policies::load(&self.store)
            .await
            .map_err(|e| AdminError::Read(store_err(e)))?
            .into_iter()
            .map(|p| PolicyRecord {
                name: p.name,
                vm_selector: p.vm_selector,
                namespace_selector: p.namespace_selector,
                bandwidth_per_migration: p
                    .bandwidth_per_migration
                    .map(|b| b.min(i64::MAX as u64) as i64),
                completion_timeout_per_gib: p.completion_timeout_per_gib.map(|t| t as i32),
                allow_auto_converge: p.allow_auto_converge,
                allow_post_copy: p.allow_post_copy,
            })
            .collect())
    }

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
        replace: bool,
        actor: &str,
    ) -> Result<JoinTokenRecord, AdminError> {
        use crate::agents::identity::JoinTokenError;
        let result = self
            .identities
            .create_join_token(cluster, ttl, actor, replace)
            .await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(JoinTokenError::IdentityExists(_)) => "refused",
            Err(_) => "error",
        };
        self.audit(
            actor,
            "createJoinToken",
            cluster.as_str(),
            outcome,
            json!({ "ttlSeconds": ttl.as_secs(), "replace": replace }),
        )
        .await;
        let t = result.map_err(|e| match e {
            e @ JoinTokenError::IdentityExists(_) => AdminError::Conflict(e.to_string()),
            JoinTokenError::Store(e) => AdminError::Read(store_err(e)),
        })?;
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
        let known = clusters::exists(&self.store, cluster.as_str())
            .await
            .map_err(|e| AdminError::Read(store_err(e)))?;
        if !known {
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
            .start(request, actor)
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

    async fn create_api_token(
        &self,
        name: &str,
        role: drover_graphql::access::Role,
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
        actor: &str,
    ) -> Result<(drover_graphql::admin::ApiTokenRecord, String), AdminError> {
        use crate::store::tokens::CreateTokenError;
        let result = crate::store::tokens::TokenRows::new(self.store.clone())
            .create(name, role.as_str(), expires_at, actor)
            .await;
        // The secret never reaches the audit log.
        let (outcome, details) = match &result {
            Ok(_) => (
                "ok",
                json!({"role": role.as_str(), "expiresAt": expires_at}),
            ),
            Err(e) => (
                "refused",
                json!({"role": role.as_str(), "error": e.to_string()}),
            ),
        };
        self.audit(actor, "createApiToken", name, outcome, details)
            .await;
        match result {
            Ok((record, secret)) => Ok((token_record(record), secret)),
            Err(CreateTokenError::NameTaken(n)) => Err(AdminError::Conflict(format!(
                "a token named {n:?} exists already; pick another name or revoke that one first"
            ))),
            Err(CreateTokenError::Store(e)) => Err(AdminError::Read(store_err(e))),
        }
    }

    async fn revoke_api_token(&self, name: &str, actor: &str) -> Result<bool, AdminError> {
        let result = crate::store::tokens::TokenRows::new(self.store.clone())
            .revoke(name)
            .await;
        self.auth.forget();
        let outcome = match &result {
            Ok(true) => "ok",
            Ok(false) => "not-found",
            Err(_) => "failed",
        };
        self.audit(actor, "revokeApiToken", name, outcome, json!({}))
            .await;
        result.map_err(|e| AdminError::Read(store_err(e)))
    }

    async fn api_tokens(&self) -> Result<Vec<drover_graphql::admin::ApiTokenRecord>, AdminError> {
        Ok(crate::store::tokens::TokenRows::new(self.store.clone())
            .list()
            .await
            .map_err(|e| AdminError::Read(store_err(e)))?
            .into_iter()
            .map(token_record)
            .collect())
    }
}

impl HubAdmin {
    async fn remove(&self, name: &ClusterName) -> Result<RemovedCluster, AdminError> {
        let (revoked, forgotten) = match clusters::remove(&self.store, name.as_str())
            .await
            .map_err(|e| AdminError::Read(store_err(e)))?
        {
            ClusterRemoval::InFlight(in_flight) => {
                return Err(AdminError::Conflict(format!(
                    "cluster {name} has {in_flight} migrations in flight; cancel them or wait for them to finish, then remove it"
                )));
            }
            ClusterRemoval::NotFound => {
                return Err(AdminError::NotFound(format!(
                    "cluster \"{name}\" is neither in the fleet nor joined; `clusters` lists the clusters there are"
                )));
            }
            ClusterRemoval::Removed {
                certificates_revoked,
                virtual_machines_forgotten,
            } => (certificates_revoked, virtual_machines_forgotten),
        };
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
