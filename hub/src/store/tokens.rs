//! API tokens as stored: created with a name, a role and an optional expiry (the secret is made
//! here, returned once, and kept only as its SHA-256), found by their secret, listed without it,
//! revoked, and stamped when used.

use chrono::{DateTime, Utc};
use rand::RngCore as _;
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::store::entities::api_token;
use crate::store::{Store, StoreError};

/// Every token starts with this, so a leaked one is easy to recognise (and to scan for).
pub const TOKEN_PREFIX: &str = "drover_";

/// A token as listed: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: Uuid,
    pub name: String,
    pub role: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl From<api_token::Model> for TokenRecord {
    fn from(m: api_token::Model) -> Self {
        Self {
            id: m.id,
            name: m.name,
            role: m.role,
            created_by: m.created_by,
            created_at: m.created_at,
            expires_at: m.expires_at,
            revoked_at: m.revoked_at,
            last_used_at: m.last_used_at,
        }
    }
}

/// Why a token was not created.
#[derive(Debug, thiserror::Error)]
pub enum CreateTokenError {
    #[error("a token named {0:?} exists already; pick another name or revoke that one first")]
    NameTaken(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The SHA-256 of a presented secret, hex: what the table is searched by.
pub fn secret_digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The `api_tokens` table.
#[derive(Clone)]
pub struct TokenRows {
    store: Store,
}

impl TokenRows {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Creates a token; returns it and its secret (shown once, never stored).
    pub async fn create(
        &self,
        name: &str,
        role: &str,
        expires_at: Option<DateTime<Utc>>,
        created_by: &str,
    ) -> Result<(TokenRecord, String), CreateTokenError> {
        let taken = api_token::Entity::find()
            .filter(api_token::Column::Name.eq(name))
            .one(&self.store.db)
            .await
            .map_err(StoreError::from)?;
        if taken.is_some() {
            return Err(CreateTokenError::NameTaken(name.to_owned()));
        }
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let secret = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
        let row = api_token::ActiveModel {
            id: Set(Uuid::now_v7()),
            name: Set(name.to_owned()),
            role: Set(role.to_owned()),
            secret_sha256: Set(secret_digest(&secret)),
            created_by: Set(created_by.to_owned()),
            created_at: Set(self.store.clock.now()),
            expires_at: Set(expires_at),
            revoked_at: Set(None),
            last_used_at: Set(None),
        };
        let model = api_token::Entity::insert(row)
            .exec_with_returning(&self.store.db)
            .await
            .map_err(|e| {
                // Two creates racing for one name: the unique index decides.
                if e.to_string().to_ascii_lowercase().contains("unique") {
                    CreateTokenError::NameTaken(name.to_owned())
                } else {
                    CreateTokenError::Store(e.into())
                }
            })?;
        Ok((model.into(), secret))
    }

    /// The token whose secret is `secret`, whatever its state (the caller checks expiry and
    /// revocation).
    pub async fn by_secret(&self, secret: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(api_token::Entity::find()
            .filter(api_token::Column::SecretSha256.eq(secret_digest(secret)))
            .one(&self.store.db)
            .await?
            .map(Into::into))
    }

    /// Every token, by name.
    pub async fn list(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(api_token::Entity::find()
            .order_by_asc(api_token::Column::Name)
            .all(&self.store.db)
            .await?
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// Revokes the token `name`; false when there is none or it was revoked already.
    pub async fn revoke(&self, name: &str) -> Result<bool, StoreError> {
        let done = api_token::Entity::update_many()
            .col_expr(
                api_token::Column::RevokedAt,
                Expr::value(Some(self.store.clock.now())),
            )
            .filter(api_token::Column::Name.eq(name))
            .filter(api_token::Column::RevokedAt.is_null())
            .exec(&self.store.db)
            .await?;
        Ok(done.rows_affected > 0)
    }

    /// Records that `id` was used at `at`.
    pub async fn touch(&self, id: Uuid, at: DateTime<Utc>) -> Result<(), StoreError> {
        api_token::Entity::update_many()
            .col_expr(api_token::Column::LastUsedAt, Expr::value(Some(at)))
            .filter(api_token::Column::Id.eq(id))
            .exec(&self.store.db)
            .await?;
        Ok(())
    }
}
