//! Who is calling the API: an `Authorization: Bearer <token>` header (or, on the WebSocket, the
//! same in `connection_init`) becomes a [`Caller`] with the token's role, or a refusal that says
//! why. Lookups are cached for a few seconds, so authentication costs a hash and a map lookup on
//! most requests; a revoked or expired token is refused within that time on every replica (at
//! once on the replica that revoked it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drover_graphql::access::{Caller, Role, Unauthenticated};

use crate::store::tokens::{secret_digest, TokenRecord, TokenRows};
use crate::store::Store;

/// How long a token's lookup is trusted before the table is read again.
pub const CACHE_FOR: Duration = Duration::from_secs(5);
/// How often a token's `lastUsedAt` is written at most.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Lookups kept at most (beyond, the cache starts over).
const CACHE_ENTRIES: usize = 10_000;

struct Cached {
    token: Option<TokenRecord>,
    fetched: Instant,
    touched: Option<Instant>,
}

/// Authenticates API requests against the stored tokens.
pub struct Authenticator {
    tokens: TokenRows,
    store: Store,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Authenticator {
    pub fn new(store: Store) -> Self {
        Self {
            tokens: TokenRows::new(store.clone()),
            store,
            cache: Mutex::default(),
        }
    }

    /// Forgets every cached lookup (after a revocation on this replica).
    pub fn forget(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The caller an `Authorization` header value names, or why there is none.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<Caller, Unauthenticated> {
        let Some(value) = authorization else {
            return Err(Unauthenticated("no credential was sent".into()));
        };
        let Some(secret) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
        else {
            return Err(Unauthenticated(
                "the Authorization header is not \"Bearer <token>\"".into(),
            ));
        };
        let digest = secret_digest(secret);
        let now = Instant::now();
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .get(&digest)
                .filter(|c| now.duration_since(c.fetched) < CACHE_FOR)
                .map(|c| (c.token.clone(), c.touched))
        };
        let (token, touched) = match cached {
            Some(hit) => hit,
            None => {
                let token = self.tokens.by_secret(secret).await.map_err(|e| {
                    tracing::warn!(error = %e, "cannot read API tokens");
                    Unauthenticated(
                        "the hub cannot check tokens right now (its database is away); retry"
                            .into(),
                    )
                })?;
                let touched = {
                    let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    if cache.len() >= CACHE_ENTRIES {
                        cache.clear();
                    }
                    let touched = cache.get(&digest).and_then(|c| c.touched);
                    cache.insert(
                        digest.clone(),
                        Cached {
                            token: token.clone(),
                            fetched: now,
                            touched,
                        },
                    );
                    touched
                };
                (token, touched)
            }
        };
        let caller = self.check(token.as_ref())?;
        if let Some(token) = token {
            if touched.is_none_or(|t| now.duration_since(t) >= TOUCH_EVERY) {
                if let Some(c) = self
                    .cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(&digest)
                {
                    c.touched = Some(now);
                }
                if let Err(e) = self.tokens.touch(token.id, self.store.clock.now()).await {
                    tracing::debug!(error = %e, token = %token.name, "cannot record a token's use");
                }
            }
        }
        Ok(caller)
    }

    /// Whether a stored token may be used now.
    fn check(&self, token: Option<&TokenRecord>) -> Result<Caller, Unauthenticated> {
        let Some(token) = token else {
            return Err(Unauthenticated("the token is not known to this hub".into()));
        };
        if let Some(at) = token.revoked_at {
            return Err(Unauthenticated(format!(
                "the token {:?} was revoked at {at}",
                token.name
            )));
        }
        if let Some(at) = token.expires_at.filter(|at| *at <= self.store.clock.now()) {
            return Err(Unauthenticated(format!(
                "the token {:?} expired at {at}",
                token.name
            )));
        }
        let role = Role::parse(&token.role).ok_or_else(|| {
            Unauthenticated(format!(
                "the token {:?} has the unknown role {:?}",
                token.name, token.role
            ))
        })?;
        Ok(Caller {
            actor: format!("token:{}", token.name),
            role,
        })
    }
}
