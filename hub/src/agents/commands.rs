//! Durable hub -> agent commands: stored with an idempotency key before anything is sent,
//! re-sent until the agent acknowledges them, their outcome recorded. Delivery itself belongs to
//! the agent's session (`sessions`); this module owns the table and the waiting.

use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_shared::commands::{AgentCommand, CommandOutcome, MAX_KEY_LEN};
use drover_shared::ClusterName;
use tokio::sync::broadcast;

use crate::replicas::{Notice, ReplicaBus};
use crate::store::commands as rows;
pub use crate::store::commands::{CommandState, StoredCommand};
use crate::store::{Store, StoreError};

impl StoredCommand {
    /// When this command is due to be sent again if still unacknowledged: 5 s after the first
    /// send, doubling up to a minute (a command that takes long to run is not hammered). One
    /// never sent (its cluster's session was on no replica then) is due at once.
    pub fn resend_due(&self) -> Option<DateTime<Utc>> {
        let Some(sent) = self.sent_at else {
            return Some(self.created_at);
        };
        let backoff = RESEND_AFTER
            .saturating_mul(1 << self.send_count.clamp(1, 8).saturating_sub(1))
            .min(MAX_RESEND_AFTER);
        Some(sent + chrono::Duration::from_std(backoff).unwrap_or_default())
    }
}

/// First re-send of an unacknowledged command.
pub const RESEND_AFTER: Duration = Duration::from_secs(5);
/// A command no session sent this long after it was stored (its agent's session was on no
/// replica, or a notice to the replica with the session was lost) is sent by the sweep.
const NEVER_SENT_AFTER: Duration = Duration::from_secs(2);
const MAX_RESEND_AFTER: Duration = Duration::from_secs(60);
/// How many due commands one re-send sweep looks at.
const RESEND_BATCH: u64 = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("idempotency key {key:?} was already used for a different command on cluster {cluster}; use a new key")]
    KeyReused { cluster: String, key: String },
    #[error("idempotency key must be 1 to {MAX_KEY_LEN} printable characters, got {0:?}")]
    BadKey(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An acknowledgement, announced to whoever waits for it on this hub.
#[derive(Debug, Clone)]
pub struct Acked {
    pub cluster: String,
    pub key: String,
}

#[derive(Clone)]
pub struct CommandStore {
    store: Store,
    acked: broadcast::Sender<Acked>,
    /// Tells the other hub replicas of new commands and acknowledgements.
    replicas: ReplicaBus,
}

impl CommandStore {
    pub fn new(store: Store, replicas: ReplicaBus) -> Self {
        let (acked, _) = broadcast::channel(4096);
        Self {
            store,
            acked,
            replicas,
        }
    }

    /// What tells the other hub replicas.
    pub fn replicas(&self) -> &ReplicaBus {
        &self.replicas
    }

    /// Wakes whoever waits on this replica for `key` (another replica took the answer).
    pub fn announce_acked(&self, cluster: String, key: String) {
        let _ = self.acked.send(Acked { cluster, key });
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stores `command` for `cluster` under `key`. Submitting the same command under the same
    /// key again returns the stored one (and `false`); a different command under a used key is
    /// refused.
    pub async fn submit(
        &self,
        cluster: &ClusterName,
        key: &str,
        command: &AgentCommand,
        actor: &str,
    ) -> Result<(StoredCommand, bool), CommandError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(|c| c.is_control()) {
            return Err(CommandError::BadKey(key.to_owned()));
        }
        let (stored, inserted) =
            rows::insert_if_absent(&self.store, cluster, key, command, actor).await?;
        if !inserted && &stored.command != command {
            return Err(CommandError::KeyReused {
                cluster: cluster.to_string(),
                key: key.to_owned(),
            });
        }
        if inserted {
            metrics::counter!("drover_commands_submitted_total", "kind" => command.kind())
                .increment(1);
            // The agent's session may be on another replica.
            self.replicas.tell(Notice::Command {
                cluster: cluster.to_string(),
                key: key.to_owned(),
            });
        }
        Ok((stored, inserted))
    }

    pub async fn get(&self, cluster: &str, key: &str) -> Result<Option<StoredCommand>, StoreError> {
        rows::get(&self.store, cluster, key).await
    }

    /// `cluster`'s unacknowledged commands, oldest first.
    pub async fn pending_for(&self, cluster: &str) -> Result<Vec<StoredCommand>, StoreError> {
        rows::pending_for(&self.store, cluster).await
    }

    /// Unacknowledged commands sent at least `RESEND_AFTER` ago, or never sent and stored at
    /// least `NEVER_SENT_AFTER` ago, oldest first (callers check each one's own backoff with
    /// `resend_due`).
    pub async fn unacknowledged(&self) -> Result<Vec<StoredCommand>, StoreError> {
        let now = self.store.clock.now();
        let cutoff = now - chrono::Duration::from_std(RESEND_AFTER).unwrap_or_default();
        let unsent_cutoff = now - chrono::Duration::from_std(NEVER_SENT_AFTER).unwrap_or_default();
        rows::unacknowledged(&self.store, cutoff, unsent_cutoff, RESEND_BATCH).await
    }

    /// Records that the command with row `id` went out once more.
    pub async fn mark_sent(&self, id: i64) -> Result<(), StoreError> {
        rows::mark_sent(&self.store, id).await
    }

    /// Records `cluster`'s acknowledgement of `key`. Only the first acknowledgement counts;
    /// false when there was nothing pending under that key.
    pub async fn acknowledge(
        &self,
        cluster: &str,
        key: &str,
        outcome: &CommandOutcome,
    ) -> Result<bool, StoreError> {
        let state = if outcome.succeeded() {
            CommandState::Succeeded
        } else {
            CommandState::Failed
        };
        let updated =
            rows::acknowledge(&self.store, cluster, key, state, outcome.message()).await?;
        if updated {
            metrics::counter!("drover_commands_acknowledged_total", "result" => state.as_str())
                .increment(1);
            let _ = self.acked.send(Acked {
                cluster: cluster.to_owned(),
                key: key.to_owned(),
            });
            self.replicas.tell(Notice::Acked {
                cluster: cluster.to_owned(),
                key: key.to_owned(),
            });
        }
        Ok(updated)
    }

    /// Waits up to `wait` for `key` to be acknowledged and returns the command as it then is
    /// (still Pending when the agent did not answer in time). Acknowledgements taken by another
    /// hub replica are announced by it
    /// (`replicas`) and, should that notice be lost, seen by polling the table once a second.
    pub async fn wait(
        &self,
        cluster: &str,
        key: &str,
        wait: Duration,
    ) -> Result<Option<StoredCommand>, StoreError> {
        let mut acked = self.acked.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        // The hub's clock may be moved on (tests in virtual time): its deadline counts too.
        let until = self.store.clock.now()
            + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
        loop {
            let current = self.get(cluster, key).await?;
            match &current {
                Some(c) if c.state == CommandState::Pending => {}
                _ => return Ok(current),
            }
            let poll = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            loop {
                tokio::select! {
                    event = acked.recv() => match event {
                        Ok(a) if a.cluster == cluster && a.key == key => break,
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            tokio::time::sleep_until(poll).await;
                            break;
                        }
                    },
                    _ = tokio::time::sleep_until(poll) => break,
                }
            }
            if tokio::time::Instant::now() >= deadline || self.store.clock.now() >= until {
                return self.get(cluster, key).await;
            }
        }
    }

    /// Forgets every command of a cluster removed from the fleet.
    pub async fn forget_cluster(&self, cluster: &str) -> Result<u64, StoreError> {
        rows::forget_cluster(&self.store, cluster).await
    }
}
