//! Who is calling and what they may do: the roles (`viewer` reads and subscribes, `migrator`
//! also plans and moves VMs, `admin` also manages clusters, VMs, policies and tokens), the
//! caller the HTTP layer authenticated, and the guard every root field carries.

use async_graphql::{Context, ErrorExtensions, Guard};

/// A role; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, async_graphql::Enum)]
pub enum Role {
    /// Reads the fleet and subscribes to its events.
    Viewer,
    /// Also plans, starts and cancels migrations, evacuations and rebalances.
    Migrator,
    /// Also manages clusters, join tokens, maintenance, VM lifecycle, policies and API tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Migrator => "migrator",
            Self::Admin => "admin",
        }
    }

    /// `viewer`, `migrator` or `admin` (any case).
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "viewer" => Some(Self::Viewer),
            "migrator" => Some(Self::Migrator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated caller of a request: who (recorded as the actor of what they change) and
/// with which role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `token:<name>` for an API token.
    pub actor: String,
    pub role: Role,
}

/// Why a request carried no caller: no credential, or one that was refused (the message says
/// which and why, without echoing the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unauthenticated(pub String);

/// The caller of this request, if it authenticated.
pub fn caller<'a>(ctx: &'a Context<'_>) -> Option<&'a Caller> {
    ctx.data_opt::<Caller>()
}

/// The actor to record for what this request changes (guards make sure there is a caller).
pub fn actor(ctx: &Context<'_>) -> String {
    caller(ctx).map_or_else(|| "unauthenticated".to_owned(), |c| c.actor.clone())
}

/// Lets a root field run only for a caller with at least `role`.
pub struct RoleGuard(pub Role);

impl Guard for RoleGuard {
    async fn check(&self, ctx: &Context<'_>) -> async_graphql::Result<()> {
        match caller(ctx) {
            Some(c) if c.role >= self.0 => Ok(()),
            Some(c) => Err(async_graphql::Error::new(format!(
                "{} has the role {}; this needs {} (ask an admin for a token with that role)",
                c.actor, c.role, self.0
            ))
            .extend_with(|_, e| {
                e.set("code", crate::ErrorCode::Forbidden.as_str());
                e.set("requiredRole", self.0.as_str());
            })),
            None => {
                let why = ctx
                    .data_opt::<Unauthenticated>()
                    .map_or("no credential was sent", |u| u.0.as_str());
                Err(async_graphql::Error::new(format!(
                    "authentication required: {why}; send the header \"Authorization: Bearer <token>\" (an admin creates tokens with `drover-hub token create` or createApiToken)"
                ))
                .extend_with(|_, e| {
                    e.set("code", crate::ErrorCode::Unauthenticated.as_str());
                    e.set("requiredRole", self.0.as_str());
                }))
            }
        }
    }
}
