//! Hub -> agent commands as stored: the `agent_commands` table read into [`StoredCommand`]
//! values (payload decoded from JSON), submitted idempotently, marked sent, acknowledged and
//! forgotten with their cluster.

use chrono::{DateTime, Utc};
use drover_shared::commands::AgentCommand;
use drover_shared::ClusterName;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

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
            StoreError::Database(DbErr::Custom(format!(
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
}

/// Stores `command` for `cluster` under `key` unless that key is already used, and returns the
/// command stored under it with whether this call inserted it (a command stored earlier under
/// the key is returned as it is, whatever it says).
pub async fn insert_if_absent(
    store: &Store,
    cluster: &ClusterName,
    key: &str,
    command: &AgentCommand,
    actor: &str,
) -> Result<(StoredCommand, bool), StoreError> {
    let payload = serde_json::to_value(command).unwrap_or_default();
    let row = agent_command::ActiveModel {
        cluster_name: Set(cluster.to_string()),
        idempotency_key: Set(key.to_owned()),
        kind: Set(command.kind().to_owned()),
        payload: Set(payload),
        state: Set(CommandState::Pending.as_str().to_owned()),
        result_message: Set(None),
        created_by: Set(actor.to_owned()),
        created_at: Set(store.clock.now()),
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
        .exec_without_returning(&store.db)
        .await?;
    let stored = get(store, cluster.as_str(), key)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("the command just stored".into()))?;
    Ok((stored, inserted > 0))
}

/// The command `cluster` has under `key`, if any.
pub async fn get(
    store: &Store,
    cluster: &str,
    key: &str,
) -> Result<Option<StoredCommand>, StoreError> {
    agent_command::Entity::find()
        .filter(agent_command::Column::ClusterName.eq(cluster))
        .filter(agent_command::Column::IdempotencyKey.eq(key))
        .one(&store.db)
        .await?
        .map(StoredCommand::from_row)
        .transpose()
}

/// `cluster`'s unacknowledged commands, oldest first.
pub async fn pending_for(store: &Store, cluster: &str) -> Result<Vec<StoredCommand>, StoreError> {
    agent_command::Entity::find()
        .filter(agent_command::Column::State.eq(CommandState::Pending.as_str()))
        .filter(agent_command::Column::ClusterName.eq(cluster))
        .order_by_asc(agent_command::Column::Id)
        .all(&store.db)
        .await?
        .into_iter()
        .map(StoredCommand::from_row)
        .collect()
}

/// Up to `limit` unacknowledged commands sent before `sent_before`, or never sent and stored
/// before `unsent_before`, oldest first.
pub async fn unacknowledged(
    store: &Store,
    sent_before: DateTime<Utc>,
    unsent_before: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<StoredCommand>, StoreError> {
    agent_command::Entity::find()
        .filter(agent_command::Column::State.eq(CommandState::Pending.as_str()))
        .filter(
            Condition::any()
                .add(agent_command::Column::SentAt.lt(sent_before))
                .add(
                    Condition::all()
                        .add(agent_command::Column::SentAt.is_null())
                        .add(agent_command::Column::CreatedAt.lt(unsent_before)),
                ),
        )
        .order_by_asc(agent_command::Column::Id)
        .limit(limit)
        .all(&store.db)
        .await?
        .into_iter()
        .map(StoredCommand::from_row)
        .collect()
}

/// Records that the command with row `id` went out once more.
pub async fn mark_sent(store: &Store, id: i64) -> Result<(), StoreError> {
    agent_command::Entity::update_many()
        .col_expr(
            agent_command::Column::SentAt,
            Some(store.clock.now()).into(),
        )
        .col_expr(
            agent_command::Column::SendCount,
            Expr::col(agent_command::Column::SendCount).add(1),
        )
        .filter(agent_command::Column::Id.eq(id))
        .exec(&store.db)
        .await?;
    Ok(())
}

/// Records the outcome of `cluster`'s pending command `key` as `state` with `message`; false
/// when there was nothing pending under that key (only the first acknowledgement counts).
pub async fn acknowledge(
    store: &Store,
    cluster: &str,
    key: &str,
    state: CommandState,
    message: &str,
) -> Result<bool, StoreError> {
    let updated = agent_command::Entity::update_many()
        .col_expr(agent_command::Column::State, state.as_str().into())
        .col_expr(
            agent_command::Column::ResultMessage,
            Some(message.to_owned()).into(),
        )
        .col_expr(
            agent_command::Column::AckedAt,
            Some(store.clock.now()).into(),
        )
        .filter(agent_command::Column::ClusterName.eq(cluster))
        .filter(agent_command::Column::IdempotencyKey.eq(key))
        .filter(agent_command::Column::State.eq(CommandState::Pending.as_str()))
        .exec(&store.db)
        .await?
        .rows_affected;
    Ok(updated > 0)
}

/// Forgets every command of a cluster removed from the fleet; returns how many.
pub async fn forget_cluster(store: &Store, cluster: &str) -> Result<u64, StoreError> {
    Ok(agent_command::Entity::delete_many()
        .filter(agent_command::Column::ClusterName.eq(cluster))
        .exec(&store.db)
        .await?
        .rows_affected)
}
