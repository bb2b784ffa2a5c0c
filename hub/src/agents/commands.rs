//! Durable hub -> agent commands: stored with an idempotency key before anything is sent,
//! re-sent until the agent acknowledges them, their outcome recorded. Delivery itself belongs to
//! the agent's session (`sessions`); this module owns the table and the waiting.

use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_shared::commands::{AgentCommand, CommandOutcome, MAX_KEY_LEN};
use drover_shared::ClusterName;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use tokio::sync::broadcast;

use crate::replicas::{Notice, ReplicaBus};
use crate::store::entities::agent_command;
use crate::store::{Store, StoreError};

/// A command's state in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandState {
    Pending,
    Succeeded,
    Failed,
}

impl CommandState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "Succeeded" => Self::Succeeded,
            "Failed" => Self::Failed,
            _ => Self::Pending,
        }
    }
}

/// A command as stored.
#[derive(Debug, Clone)]
pub struct StoredCommand {
    pub id: i64,
    pub cluster: String,
    pub key: String,
    pub command: AgentCommand,
    pub state: CommandState,
    pub result_message: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub send_count: i32,
    pub acked_at: Option<DateTime<Utc>>,
}

impl StoredCommand {
    fn from_row(row: agent_command::Model) -> Result<Self, StoreError> {
        let command = serde_json::from_value(row.payload).map_err(|e| {
            StoreError::Database(sea_orm::DbErr::Custom(format!(
                "stored command {} of cluster {} is unreadable: {e}",
                row.idempotency_key, row.cluster_name
            )))
        })?;
        Ok(Self {
            id: row.id,
            cluster: row.cluster_name,
            key: row.idempotency_key,
            command,
            state: CommandState::parse(&row.state),
            result_message: row.result_message,
            created_by: row.created_by,
            created_at: row.created_at,
            sent_at: row.sent_at,
            send_count: row.send_count,
            acked_at: row.acked_at,
        })
    }

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

impl From<sea_orm::DbErr> for CommandError {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::Store(e.into())
    }
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
        let payload = serde_json::to_value(command).unwrap_or_default();
        let row = agent_command::ActiveModel {
            cluster_name: Set(cluster.to_string()),
            idempotency_key: Set(key.to_owned()),
            kind: Set(command.kind().to_owned()),
            payload: Set(payload),
            state: Set(CommandState::Pending.as_str().to_owned()),
            result_message: Set(None),
            created_by: Set(actor.to_owned()),
            created_at: Set(self.store.clock.now()),
            sent_at: Set(None),
            send_count: Set(0),
            acked_at: Set(None),
            ..Default::default()
        };
        let inserted = agent_command::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([
                    agent_command::Column::ClusterName,
                    agent_command::Column::IdempotencyKey,
                ])
                .do_nothing()
                .to_owned(),
            )
            .exec_without_returning(&self.store.db)
            .await?;
        let stored = self
            .get(cluster.as_str(), key)
            .await?
            .ok_or_else(|| sea_orm::DbErr::RecordNotFound("the command just stored".into()))?;
        if inserted == 0 && &stored.command != command {
            return Err(CommandError::KeyReused {
                cluster: cluster.to_string(),
                key: key.to_owned(),
            });
        }
        if inserted > 0 {
            metrics::counter!("drover_commands_submitted_total", "kind" => command.kind())
                .increment(1);
            // The agent's session may be on another replica.
            self.replicas.tell(Notice::Command {
                cluster: cluster.to_string(),
                key: key.to_owned(),
            });
        }
        Ok((stored, inserted > 0))
    }

    pub async fn get(&self, cluster: &str, key: &str) -> Result<Option<StoredCommand>, StoreError> {
        agent_command::Entity::find()
            .filter(agent_command::Column::ClusterName.eq(cluster))
            .filter(agent_command::Column::IdempotencyKey.eq(key))
            .one(&self.store.db)
            .await?
            .map(StoredCommand::from_row)
            .transpose()
    }

    /// `cluster`'s unacknowledged commands, oldest first.
    pub async fn pending_for(&self, cluster: &str) -> Result<Vec<StoredCommand>, StoreError> {
        agent_command::Entity::find()
            .filter(agent_command::Column::State.eq(CommandState::Pending.as_str()))
            .filter(agent_command::Column::ClusterName.eq(cluster))
            .order_by_asc(agent_command::Column::Id)
            .all(&self.store.db)
            .await?
            .into_iter()
            .map(StoredCommand::from_row)
            .collect()
    }

    /// Unacknowledged commands sent at least `RESEND_AFTER` ago, or never sent and stored at
    /// least `NEVER_SENT_AFTER` ago, oldest first (callers check each one's own backoff with
    /// `resend_due`).
    pub async fn unacknowledged(&self) -> Result<Vec<StoredCommand>, StoreError> {
        let now = self.store.clock.now();
        let cutoff = now - chrono::Duration::from_std(RESEND_AFTER).unwrap_or_default();
        let unsent_cutoff = now - chrono::Duration::from_std(NEVER_SENT_AFTER).unwrap_or_default();
        agent_command::Entity::find()
            .filter(agent_command::Column::State.eq(CommandState::Pending.as_str()))
            .filter(
                sea_orm::Condition::any()
                    .add(agent_command::Column::SentAt.lt(cutoff))
                    .add(
                        sea_orm::Condition::all()
                            .add(agent_command::Column::SentAt.is_null())
                            .add(agent_command::Column::CreatedAt.lt(unsent_cutoff)),
                    ),
            )
            .order_by_asc(agent_command::Column::Id)
            .limit(RESEND_BATCH)
            .all(&self.store.db)
            .await?
            .into_iter()
            .map(StoredCommand::from_row)
            .collect()
    }

    /// Records that the command with row `id` went out once more.
    pub async fn mark_sent(&self, id: i64) -> Result<(), StoreError> {
        agent_command::Entity::update_many()
            .col_expr(
                agent_command::Column::SentAt,
                Some(self.store.clock.now()).into(),
            )
            .col_expr(
                agent_command::Column::SendCount,
                sea_orm::sea_query::Expr::col(agent_command::Column::SendCount).add(1),
            )
            .filter(agent_command::Column::Id.eq(id))
            .exec(&self.store.db)
            .await?;
        Ok(())
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
        let updated = agent_command::Entity::update_many()
            .col_expr(agent_command::Column::State, state.as_str().into())
            .col_expr(
                agent_command::Column::ResultMessage,
                Some(outcome.message().to_owned()).into(),
            )
            .col_expr(
                agent_command::Column::AckedAt,
                Some(self.store.clock.now()).into(),
            )
            .filter(agent_command::Column::ClusterName.eq(cluster))
            .filter(agent_command::Column::IdempotencyKey.eq(key))
            .filter(agent_command::Column::State.eq(CommandState::Pending.as_str()))
            .exec(&self.store.db)
            .await?
            .rows_affected;
        if updated > 0 {
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
        Ok(updated > 0)
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
        Ok(agent_command::Entity::delete_many()
            .filter(agent_command::Column::ClusterName.eq(cluster))
            .exec(&self.store.db)
            .await?
            .rows_affected)
    }
}
