//! Cluster administration as stored: whether a cluster is in the fleet, removing one (its row,
//! its inventory, its agent certificates revoked) in one transaction, and the audit log every
//! administrative action writes a row to.

use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait, QueryFilter, TransactionTrait,
};

use drover_shared::inventory::MigrationPhase;

use crate::store::entities::{agent_certificate, cluster, migration, vm};
use crate::store::{sql::Sql, Store, StoreError};

/// What removing a cluster did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterRemoval {
    /// Nothing changed: this many migrations from or to the cluster have not ended.
    InFlight(u64),
    /// Nothing changed: the cluster is neither in the fleet nor has an unrevoked certificate.
    NotFound,
    /// The cluster's row (with its inventory) is gone and its certificates are revoked.
    Removed {
        certificates_revoked: i64,
        virtual_machines_forgotten: i64,
    },
}

/// Whether a cluster of that name is in the fleet.
pub async fn exists(store: &Store, name: &str) -> Result<bool, StoreError> {
    let known = cluster::Entity::find()
        .filter(cluster::Column::Name.eq(name))
        .count(&store.db)
        .await?;
    Ok(known > 0)
}

/// Removes a cluster in one transaction: refused while migrations from or to it have not ended;
/// otherwise its row goes (its nodes, VMs and labels with it) and every unrevoked agent
/// certificate of that name is revoked now.
pub async fn remove(store: &Store, name: &str) -> Result<ClusterRemoval, StoreError> {
    let tx = store.db.begin().await?;
    let row = cluster::Entity::find()
        .filter(cluster::Column::Name.eq(name))
        .one(&tx)
        .await?;
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
                    .is_in(MigrationPhase::NOT_ENDED.iter().map(|p| p.as_str())),
            )
            .count(&tx)
            .await?;
        if in_flight > 0 {
            return Ok(ClusterRemoval::InFlight(in_flight));
        }
        forgotten = vm::Entity::find()
            .filter(vm::Column::ClusterId.eq(row.id))
            .count(&tx)
            .await? as i64;
        cluster::Entity::delete_by_id(row.id).exec(&tx).await?;
    }
    let revoked = agent_certificate::Entity::update_many()
        .col_expr(
            agent_certificate::Column::RevokedAt,
            Some(store.clock.now()).into(),
        )
        .filter(agent_certificate::Column::ClusterName.eq(name))
        .filter(agent_certificate::Column::RevokedAt.is_null())
        .exec(&tx)
        .await?
        .rows_affected as i64;
    if row.is_none() && revoked == 0 {
        return Ok(ClusterRemoval::NotFound);
    }
    tx.commit().await?;
    Ok(ClusterRemoval::Removed {
        certificates_revoked: revoked,
        virtual_machines_forgotten: forgotten,
    })
}

/// Appends a row to the audit log, stamped now: who did what to what, with what result and
/// details. The error is the database's own (callers log it; the action stands).
pub async fn audit(
    store: &Store,
    actor: &str,
    action: &str,
    target: &str,
    result: &str,
    details: serde_json::Value,
) -> Result<(), DbErr> {
    let mut sql = Sql::new(store.backend());
    sql.push("INSERT INTO audit_log (at, actor, action, target, result, details) VALUES (")
        .bind(store.clock.now())
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
    store.db.execute(sql.build()).await?;
    Ok(())
}

/// One audit record as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    pub at: chrono::DateTime<chrono::Utc>,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub result: String,
    pub details: serde_json::Value,
}

/// The audit log, oldest first.
pub async fn audit_rows(store: &Store) -> Result<Vec<AuditRow>, DbErr> {
    let mut sql = Sql::new(store.backend());
    sql.push("SELECT at, actor, action, target, result, details FROM audit_log ORDER BY id");
    store
        .db
        .query_all(sql.build())
        .await?
        .into_iter()
        .map(|row| {
            Ok(AuditRow {
                at: row.try_get("", "at")?,
                actor: row.try_get("", "actor")?,
                action: row.try_get("", "action")?,
                target: row.try_get("", "target")?,
                result: row.try_get("", "result")?,
                details: row.try_get("", "details")?,
            })
        })
        .collect()
}
