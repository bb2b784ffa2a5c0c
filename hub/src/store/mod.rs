//! The hub's inventory store: connecting to PostgreSQL or the embedded SQLite file, running
//! migrations, classifying database failures, and a small SQL builder for the queries that need
//! more than the ORM gives (window functions, keyset pagination, label selectors).

pub mod clusters;
pub mod commands;
pub mod entities;
pub mod evacuations;
pub mod fleet;
pub mod identities;
pub mod inventory;
pub mod leases;
pub mod migration;
pub mod migrations;
pub mod notify;
pub mod policies;
pub mod sql;
pub mod tokens;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr,
    TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

/// The advisory lock key hub replicas take while migrating ("drover" in ASCII).
const MIGRATION_LOCK: i64 = 0x6472_6f76_6572;

/// What went wrong with the store, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("inventory database unavailable: {0}")]
    Unavailable(#[source] DbErr),
    #[error("inventory database error: {0}")]
    Database(#[source] DbErr),
    #[error("cannot open database {url}: {source}; check --database-url / DATABASE_URL")]
    Connect {
        url: String,
        #[source]
        source: DbErr,
    },
    #[error("migrating the inventory schema failed: {0}")]
    Migrate(#[source] DbErr),
}

impl From<DbErr> for StoreError {
    fn from(e: DbErr) -> Self {
        let unavailable = is_unavailable(&e);
        metrics::counter!(
            "drover_database_errors_total",
            "kind" => if unavailable { "unavailable" } else { "error" }
        )
        .increment(1);
        if unavailable {
            Self::Unavailable(e)
        } else {
            Self::Database(e)
        }
    }
}

/// Whether an error means "the database cannot be reached right now" rather than a bug.
pub fn is_unavailable(e: &DbErr) -> bool {
    use sea_orm::error::SqlxError;
    let sqlx = match e {
        DbErr::ConnectionAcquire(_) => return true,
        DbErr::Conn(sea_orm::RuntimeErr::SqlxError(s))
        | DbErr::Exec(sea_orm::RuntimeErr::SqlxError(s))
        | DbErr::Query(sea_orm::RuntimeErr::SqlxError(s)) => s,
        DbErr::Conn(_) => return true,
        _ => return false,
    };
    match sqlx {
        SqlxError::Io(_)
        | SqlxError::Tls(_)
        | SqlxError::PoolTimedOut
        | SqlxError::PoolClosed
        | SqlxError::WorkerCrashed
        | SqlxError::Protocol(_) => true,
        SqlxError::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 57P0x: server shutting down or starting up.
            code.starts_with("08") || code.starts_with("57P")
        }),
        _ => false,
    }
}

/// Counts every SQL statement the hub runs (for /metrics and the benchmark).
#[derive(Debug, Default)]
pub struct StatementCounter(AtomicU64);

impl StatementCounter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The connected store.
#[derive(Clone)]
pub struct Store {
    pub db: DatabaseConnection,
    pub statements: Arc<StatementCounter>,
    /// The hub's one clock: every stamp and deadline reads it.
    pub clock: crate::clock::Clock,
}

/// The URL of the embedded SQLite file in `data_dir`.
pub fn sqlite_url(data_dir: &Path) -> String {
    format!(
        "sqlite://{}?mode=rwc",
        data_dir.join("drover.sqlite").display()
    )
}

impl Store {
    /// Connects without touching the schema.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let mut opts = ConnectOptions::new(url.to_owned());
        let sqlite = url.starts_with("sqlite:");
        opts.max_connections(if sqlite { 8 } else { 24 })
            .min_connections(0)
            .connect_timeout(Duration::from_secs(5))
            .acquire_timeout(Duration::from_secs(5))
            .idle_timeout(Duration::from_secs(300))
            .sqlx_logging(false);
        if sqlite {
            opts.map_sqlx_sqlite_opts(|o| {
                o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
            });
        } else {
            opts.map_sqlx_postgres_opts(|o| o.application_name("drover-hub"));
        }
        let mut db = Database::connect(opts)
            .await
            .map_err(|source| StoreError::Connect {
                url: redact(url),
                source,
            })?;
        let statements = Arc::new(StatementCounter::default());
        let counter = statements.clone();
        db.set_metric_callback(move |info| {
            counter.0.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(target: "drover_hub::sql", elapsed = ?info.elapsed, failed = info.failed, sql = %info.statement.sql);
            metrics::counter!("drover_db_statements_total", "failed" => if info.failed { "true" } else { "false" })
                .increment(1);
            metrics::histogram!("drover_db_statement_seconds").record(info.elapsed.as_secs_f64());
        });
        Ok(Self {
            db,
            statements,
            clock: crate::clock::Clock::system(),
        })
    }

    /// The same store on another clock (tests pause and advance an adjustable one).
    pub fn with_clock(mut self, clock: crate::clock::Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Connects and brings the schema up to date. On PostgreSQL, hub replicas starting together
    /// take turns: an advisory lock held for the migration's transaction serialises them.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect(url).await?;
        if store.backend() == DbBackend::Postgres {
            let txn = store.db.begin().await?;
            txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
                .await?;
            migration::Migrator::up(&txn, None)
                .await
                .map_err(StoreError::Migrate)?;
            txn.commit().await?;
        } else {
            migration::Migrator::up(&store.db, None)
                .await
                .map_err(StoreError::Migrate)?;
        }
        Ok(store)
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// A cheap round trip, bounded in time, for /readyz.
    pub async fn ping(&self, timeout: Duration) -> Result<(), StoreError> {
        match tokio::time::timeout(timeout, self.db.execute_unprepared("SELECT 1")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StoreError::from(e)),
            Err(_) => Err(StoreError::Unavailable(DbErr::ConnectionAcquire(
                sea_orm::error::ConnAcquireErr::Timeout,
            ))),
        }
    }
}

/// Hides a password in a database URL before it is logged or shown.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact("postgres://drover:s3cret@db:5432/drover"),
            "postgres://drover:***@db:5432/drover"
        );
        assert_eq!(super::redact("sqlite://x.db"), "sqlite://x.db");
    }
}
