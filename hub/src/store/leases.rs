//! Driver leases: which hub replica drives each in-flight migration. A replica claims every
//! in-flight migration whose lease is free or ran out, renews its own on every scheduler round,
//! and learns which of the migrations it drove another replica took over (it stops driving
//! them). A replica that dies stops renewing; another takes its migrations over once the lease
//! time has passed. On SQLite there is one replica, which holds everything.
//!
//! Times are the replicas' own clocks (milliseconds since the epoch), passed in by the caller:
//! replicas whose clocks disagree by less than a second (NTP) lose nothing with a lease of
//! several seconds, and tests move time forward without waiting.

use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_shared::inventory::MigrationPhase;
use sea_orm::{ConnectionTrait, Value};
use uuid::Uuid;

use crate::store::sql::Sql;
use crate::store::{Store, StoreError};

/// The default lease time: how long a replica may go silent before another takes over.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

/// What one claim found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Every in-flight migration this replica now holds (newly claimed or renewed).
    pub held: Vec<Uuid>,
    /// The ones among `held` taken over from another replica whose lease ran out, with that
    /// replica's name.
    pub taken_over: Vec<(Uuid, String)>,
    /// In-flight migrations another replica holds now (this one must not drive them).
    pub elsewhere: Vec<Uuid>,
}

#[derive(Clone)]
pub struct Leases {
    store: Store,
    replica: String,
    lease: Duration,
}

impl Leases {
    pub fn new(store: Store, replica: String, lease: Duration) -> Self {
        Self {
            store,
            replica,
            lease,
        }
    }

    /// This replica's name, as leases record it.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Claims every in-flight migration whose lease is this replica's, free, or expired at
    /// `now`, until `now` + the lease time; forgets the leases of migrations that ended.
    pub async fn claim(&self, now: DateTime<Utc>) -> Result<Claim, StoreError> {
        let backend = self.store.backend();
        let now_ms = now.timestamp_millis();
        let until_ms = now_ms.saturating_add(self.lease.as_millis() as i64);
        let in_flight = MigrationPhase::IN_FLIGHT.map(|p| p.as_str().to_owned());

        let mut forget = Sql::new(backend);
        forget
            .push("DELETE FROM migration_leases WHERE migration_id NOT IN (SELECT id FROM migrations WHERE phase IN ")
            .bind_list(in_flight.clone())
            .push(")");
        self.store.db.execute(forget.build()).await?;

        // One statement decides every lease: a conflict (someone holds it) updates only when
        // the holder is this replica or its lease ran out. Every SET expression reads the row
        // as it was, so the previous owner is recorded before the owner changes.
        let mut claim = Sql::new(backend);
        claim
            .push("INSERT INTO migration_leases (migration_id, owner, expires_at_ms, acquired_at_ms, previous_owner) SELECT id, ")
            .bind(self.replica.clone())
            .push(", ")
            .bind(until_ms)
            .push(", ")
            .bind(now_ms)
            .push(", NULL FROM migrations WHERE phase IN ")
            .bind_list(in_flight.clone())
            .push(
                " ON CONFLICT (migration_id) DO UPDATE SET \
                 previous_owner = CASE WHEN migration_leases.owner = excluded.owner \
                   THEN migration_leases.previous_owner ELSE migration_leases.owner END, \
                 acquired_at_ms = CASE WHEN migration_leases.owner = excluded.owner \
                   THEN migration_leases.acquired_at_ms ELSE excluded.acquired_at_ms END, \
                 owner = excluded.owner, expires_at_ms = excluded.expires_at_ms \
                 WHERE migration_leases.owner = excluded.owner \
                   OR migration_leases.expires_at_ms < excluded.acquired_at_ms \
                 RETURNING migration_id, acquired_at_ms, previous_owner",
            );
        let mut found = Claim::default();
        for row in self.store.db.query_all(claim.build()).await? {
            let id: Uuid = row.try_get("", "migration_id")?;
            let acquired: i64 = row.try_get("", "acquired_at_ms")?;
            let previous: Option<String> = row.try_get("", "previous_owner")?;
            if let (true, Some(previous)) = (acquired == now_ms, previous) {
                found.taken_over.push((id, previous));
            }
            found.held.push(id);
        }

        let mut elsewhere = Sql::new(backend);
        elsewhere
            .push("SELECT migration_id FROM migration_leases WHERE owner <> ")
            .bind(self.replica.clone());
        for row in self.store.db.query_all(elsewhere.build()).await? {
            found.elsewhere.push(row.try_get("", "migration_id")?);
        }
        Ok(found)
    }

    /// Gives up every lease this replica holds (it is stopping): another replica takes the
    /// migrations over at its next round instead of after the lease time.
    pub async fn release_all(&self) -> Result<u64, StoreError> {
        let mut release = Sql::new(self.store.backend());
        release
            .push("UPDATE migration_leases SET expires_at_ms = ")
            .bind(Value::BigInt(Some(0)))
            .push(" WHERE owner = ")
            .bind(self.replica.clone());
        Ok(self
            .store
            .db
            .execute(release.build())
            .await?
            .rows_affected())
    }
}

/// A replica name for this process: `name` if given, else the one stored in `data_dir` (made
/// once, so a restarted replica takes its own migrations back at once).
pub fn replica_name(
    name: Option<&str>,
    data_dir: &std::path::Path,
) -> Result<String, std::io::Error> {
    if let Some(name) = name {
        return Ok(name.to_owned());
    }
    let path = data_dir.join("replica-name");
    match std::fs::read_to_string(&path) {
        Ok(stored) if !stored.trim().is_empty() => Ok(stored.trim().to_owned()),
        Ok(_) | Err(_) => {
            let name = fresh_replica_name();
            std::fs::create_dir_all(data_dir)?;
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, &name)?;
            std::fs::rename(&tmp, &path)?;
            Ok(name)
        }
    }
}

/// A new replica name: the host's name and eight random hex digits.
pub fn fresh_replica_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "hub".into());
    format!("{host}-{}", &Uuid::new_v4().simple().to_string()[..8])
}
