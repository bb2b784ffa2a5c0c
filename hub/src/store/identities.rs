//! Cluster identities as stored: the `join_tokens` table (token hashes, expiry, redemption) and
//! the `agent_certificates` table (issued certificates and their revocation). Redeeming a token
//! and recording the certificate it buys happen in one transaction.

use chrono::{DateTime, Utc};
use drover_shared::ClusterName;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, TransactionTrait,
};
use uuid::Uuid;

use crate::store::entities::{agent_certificate, join_token};
use crate::store::{Store, StoreError};

/// An issued certificate, as recorded so that it can be checked and revoked.
#[derive(Debug, Clone)]
pub struct CertificateRecord {
    pub serial: String,
    pub fingerprint_sha256: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

/// Stores a one-time join token for `cluster` by its hash, valid until `expires_at`.
pub async fn insert_join_token(
    store: &Store,
    cluster: &ClusterName,
    token_hash: String,
    expires_at: DateTime<Utc>,
    created_by: &str,
    created_at: DateTime<Utc>,
    replaces_identity: bool,
) -> Result<(), StoreError> {
    join_token::Entity::insert(join_token::ActiveModel {
        replaces_identity: Set(replaces_identity),
        id: Set(Uuid::now_v7()),
        cluster_name: Set(cluster.to_string()),
        token_hash: Set(token_hash),
        expires_at: Set(expires_at),
        used_at: Set(None),
        created_by: Set(created_by.to_owned()),
        created_at: Set(created_at),
    })
    .exec_without_returning(&store.db)
    .await?;
    Ok(())
}

/// What redeeming a join token did.
#[derive(Debug)]
pub enum Redemption<T> {
    /// Joined; `revoked` certificates of a replaced identity were revoked.
    Joined { issued: T, revoked: u64 },
    /// No such unused, unexpired token for this cluster.
    Refused,
    /// The cluster has an identity and the token was not made to replace it.
    IdentityExists,
}

/// Whether `cluster` has an identity: an unrevoked certificate that has not expired.
pub async fn has_identity(
    db: &impl ConnectionTrait,
    cluster: &ClusterName,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    Ok(agent_certificate::Entity::find()
        .filter(agent_certificate::Column::ClusterName.eq(cluster.as_str()))
        .filter(agent_certificate::Column::RevokedAt.is_null())
        .filter(agent_certificate::Column::NotAfter.gt(now))
        .one(db)
        .await?
        .is_some())
}

/// In one transaction: marks `cluster`'s unused, unexpired token with hash `token_hash` used
/// (refused when the cluster has an identity the token was not made to replace; a replacing
/// token revokes it), then runs `issue` and records the certificate it returns. When `issue`
/// fails, the redemption is rolled back (the token stays usable) and its error returned.
pub async fn redeem_join_token<T, E>(
    store: &Store,
    cluster: &ClusterName,
    token_hash: &str,
    issue: impl FnOnce() -> Result<(T, CertificateRecord), E>,
) -> Result<Redemption<T>, E>
where
    E: From<StoreError>,
{
    let now = store.clock.now();
    let tx = store.db.begin().await.map_err(StoreError::from)?;
    // Claim the token first: the transaction writes at once (on SQLite a read that later
    // writes could be refused as "database is locked" when another writer came in between).
    let redeemed = join_token::Entity::update_many()
        .col_expr(join_token::Column::UsedAt, Some(now).into())
        .filter(join_token::Column::TokenHash.eq(token_hash))
        .filter(join_token::Column::ClusterName.eq(cluster.as_str()))
        .filter(join_token::Column::UsedAt.is_null())
        .filter(join_token::Column::ExpiresAt.gt(now))
        .exec(&tx)
        .await
        .map_err(StoreError::from)?;
    if redeemed.rows_affected != 1 {
        return Ok(Redemption::Refused);
    }
    let replaces = join_token::Entity::find()
        .filter(join_token::Column::TokenHash.eq(token_hash))
        .one(&tx)
        .await
        .map_err(StoreError::from)?
        .is_some_and(|t| t.replaces_identity);
    let mut revoked = 0;
    if replaces {
        revoked = agent_certificate::Entity::update_many()
            .col_expr(agent_certificate::Column::RevokedAt, Some(now).into())
            .filter(agent_certificate::Column::ClusterName.eq(cluster.as_str()))
            .filter(agent_certificate::Column::RevokedAt.is_null())
            .exec(&tx)
            .await
            .map_err(StoreError::from)?
            .rows_affected;
    } else if has_identity(&tx, cluster, now).await? {
        // Rolled back: the token stays unused.
        return Ok(Redemption::IdentityExists);
    }
    let (issued, record) = issue()?;
    insert_certificate(&tx, cluster, record, store.clock.now())
        .await
        .map_err(StoreError::from)?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(Redemption::Joined { issued, revoked })
}

/// Records an issued certificate, so that it can be checked and revoked.
pub async fn record_certificate(
    store: &Store,
    cluster: &ClusterName,
    record: CertificateRecord,
) -> Result<(), StoreError> {
    insert_certificate(&store.db, cluster, record, store.clock.now()).await?;
    Ok(())
}

async fn insert_certificate(
    db: &impl ConnectionTrait,
    cluster: &ClusterName,
    record: CertificateRecord,
    now: DateTime<Utc>,
) -> Result<(), sea_orm::DbErr> {
    agent_certificate::Entity::insert(agent_certificate::ActiveModel {
        serial: Set(record.serial),
        cluster_name: Set(cluster.to_string()),
        fingerprint_sha256: Set(record.fingerprint_sha256),
        not_before: Set(record.not_before),
        not_after: Set(record.not_after),
        revoked_at: Set(None),
        created_at: Set(now),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// The certificate recorded under `serial`, if any.
pub async fn certificate(
    store: &Store,
    serial: &str,
) -> Result<Option<agent_certificate::Model>, StoreError> {
    Ok(agent_certificate::Entity::find_by_id(serial.to_owned())
        .one(&store.db)
        .await?)
}

/// Revokes every unrevoked certificate of `cluster`; returns how many.
pub async fn revoke_cluster_certificates(
    store: &Store,
    cluster: &ClusterName,
) -> Result<u64, StoreError> {
    let res = agent_certificate::Entity::update_many()
        .col_expr(
            agent_certificate::Column::RevokedAt,
            Some(store.clock.now()).into(),
        )
        .filter(agent_certificate::Column::ClusterName.eq(cluster.as_str()))
        .filter(agent_certificate::Column::RevokedAt.is_null())
        .exec(&store.db)
        .await?;
    Ok(res.rows_affected)
}
