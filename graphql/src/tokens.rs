//! API tokens through GraphQL (admins only): `apiTokens` lists them without their secrets,
//! `createApiToken` makes one and shows its secret once, `revokeApiToken` ends one.

use std::sync::Arc;

use async_graphql::{Context, Object, Result, SimpleObject};
use chrono::{DateTime, Utc};

use crate::access::{actor, Role, RoleGuard};
use crate::admin::{ApiTokenRecord, FleetAdmin};
use crate::error::{ApiError, ErrorCode};

/// An API token (its secret is shown only when it is created).
#[derive(SimpleObject)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl From<ApiTokenRecord> for ApiToken {
    fn from(r: ApiTokenRecord) -> Self {
        Self {
            name: r.name,
            role: r.role,
            created_by: r.created_by,
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            last_used_at: r.last_used_at,
        }
    }
}

/// A token just created: `token` is its secret, shown only here.
#[derive(SimpleObject)]
pub struct CreatedApiToken {
    /// Send it as `Authorization: Bearer <token>`.
    pub token: String,
    pub api_token: ApiToken,
}

#[derive(Default)]
pub struct TokenQuery;

#[Object]
impl TokenQuery {
    /// Every API token, by name, without secrets.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn api_tokens(&self, ctx: &Context<'_>) -> Result<Vec<ApiToken>> {
        let admin = ctx.data_unchecked::<Arc<dyn FleetAdmin>>();
        Ok(admin
            .api_tokens()
            .await
            .map_err(ApiError::from)?
            .into_iter()
            .map(Into::into)
            .collect())
    }
}

#[derive(Default)]
pub struct TokenMutation;

/// The longest a token may live.
const MAX_DAYS: i32 = 3650;

#[Object]
impl TokenMutation {
    /// Creates an API token for automation with `role`, expiring after `expiresInDays` (none:
    /// never). Its secret is in the answer and nowhere else.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn create_api_token(
        &self,
        ctx: &Context<'_>,
        name: String,
        role: Role,
        expires_in_days: Option<i32>,
    ) -> Result<CreatedApiToken> {
        let name = name.trim().to_owned();
        if name.is_empty()
            || name.len() > 200
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@:".contains(c))
        {
            return Err(ApiError::new(
                ErrorCode::BadUserInput,
                format!("{name:?} is not a usable token name: use 1 to 200 letters, digits and - _ . @ :"),
            )
            .into());
        }
        let expires_at = match expires_in_days {
            None => None,
            Some(d) if (1..=MAX_DAYS).contains(&d) => {
                Some(Utc::now() + chrono::Duration::days(d as i64))
            }
            Some(d) => {
                return Err(ApiError::new(
                    ErrorCode::BadUserInput,
                    format!("expiresInDays is {d}; give 1 to {MAX_DAYS}, or leave it out for a token that does not expire"),
                )
                .into())
            }
        };
        let admin = ctx.data_unchecked::<Arc<dyn FleetAdmin>>();
        let (record, token) = admin
            .create_api_token(&name, role, expires_at, &actor(ctx))
            .await
            .map_err(ApiError::from)?;
        Ok(CreatedApiToken {
            token,
            api_token: record.into(),
        })
    }

    /// Revokes the API token `name`: every request with it is refused from now on (within a
    /// few seconds on other hub replicas). False when no such unrevoked token exists.
    #[graphql(guard = "RoleGuard(Role::Admin)")]
    async fn revoke_api_token(&self, ctx: &Context<'_>, name: String) -> Result<bool> {
        let admin = ctx.data_unchecked::<Arc<dyn FleetAdmin>>();
        Ok(admin
            .revoke_api_token(&name, &actor(ctx))
            .await
            .map_err(ApiError::from)?)
    }
}
