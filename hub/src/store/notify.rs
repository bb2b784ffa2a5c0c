//! PostgreSQL NOTIFY/LISTEN for hub replicas: the statement that tells a channel, and the
//! connection that listens on one. What the payloads mean belongs to `replicas`.

use sea_orm::sqlx::postgres::PgListener;
pub use sea_orm::DbBackend;
use sea_orm::{ConnectionTrait, DbErr, Statement};

use crate::store::Store;

/// Why notifying or listening failed (shown in logs, never acted on).
pub type NotifyError = DbErr;
/// Why the listening connection failed.
pub type ListenError = sea_orm::sqlx::Error;

/// Whether replicas on `backend` can tell each other anything (PostgreSQL).
pub fn carries_notices(backend: DbBackend) -> bool {
    backend == DbBackend::Postgres
}

/// Sends `payload` on `channel` (`SELECT pg_notify`).
pub async fn notify(store: &Store, channel: &str, payload: String) -> Result<(), NotifyError> {
    let statement = Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [channel.into(), payload.into()],
    );
    store.db.execute(statement).await?;
    Ok(())
}

/// A connection listening on one channel.
pub struct NoticeListener(PgListener);

impl NoticeListener {
    /// Opens a connection from the store's pool's settings and listens on `channel`.
    pub async fn connect(store: &Store, channel: &str) -> Result<Self, ListenError> {
        let pool = store.db.get_postgres_connection_pool();
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(channel).await?;
        Ok(Self(listener))
    }

    /// The next payload told on the channel. After an error the listener reconnects on the
    /// next call, if it can.
    pub async fn recv(&mut self) -> Result<String, ListenError> {
        Ok(self.0.recv().await?.payload().to_owned())
    }
}
