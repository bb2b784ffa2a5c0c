//! Agent sessions on the hub: one WebSocket per agent on the mutual-TLS endpoint, bound to the
//! cluster its certificate names. The session ingests what the agent reports through the normal
//! ingest path, records heartbeats, and ends on silence; a newer session of the same cluster
//! replaces an older one. A sweeper marks clusters whose agents fell silent `Unreachable`.
//! Sessions also carry the hub's durable commands: every pending command goes out when a session
//! opens, new ones as they are stored, and unacknowledged ones again after a backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use drover_shared::inventory::ClusterHealth;
use drover_shared::migration::MigrationStatus;
use drover_shared::protocol::{negotiate, AgentMessage, HubMessage, ReportedHealth};
use drover_shared::ClusterName;
use tokio::sync::{mpsc, oneshot};

use crate::agents::commands::{CommandStore, StoredCommand};
use crate::inventory::ingest::{Ingest, IngestError};

/// Timing of sessions; tests shorten it.
#[derive(Debug, Clone, Copy)]
pub struct SessionTiming {
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// Silence after which a session is closed and its cluster counts as unreachable.
    pub silence_limit: Duration,
    /// How long an agent may take to say hello.
    pub hello_timeout: Duration,
}

impl Default for SessionTiming {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(10),
            silence_limit: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// Where the migration status an agent reports goes (the migration lifecycle records it; the
/// agent edge does not know what it means).
#[async_trait::async_trait]
pub trait MigrationReports: Send + Sync + 'static {
    /// `from` reported `status` of a migration it takes part in.
    async fn migration_status(&self, from: &ClusterName, status: &MigrationStatus);
}

/// A live session: its id, how to tell it to end, and where to hand it commands.
struct LiveSession {
    id: u64,
    end: oneshot::Sender<String>,
    commands: mpsc::Sender<StoredCommand>,
}

/// Commands queued for one session before it pushes back (the re-send sweep catches the rest).
const COMMAND_QUEUE: usize = 1024;
/// How often unacknowledged commands are looked for.
const RESEND_SWEEP: Duration = Duration::from_secs(2);

/// The live sessions, one per cluster.
#[derive(Clone)]
pub struct Sessions {
    ingest: Ingest,
    commands: CommandStore,
    timing: SessionTiming,
    live: Arc<Mutex<HashMap<ClusterName, LiveSession>>>,
    next_id: Arc<AtomicU64>,
    /// Where agents' migration status reports go (the orchestration records them).
    reports: Arc<dyn MigrationReports>,
}

/// Largest message an agent may send (a snapshot of a big cluster fits comfortably).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

impl Sessions {
    pub fn new(
        ingest: Ingest,
        commands: CommandStore,
        timing: SessionTiming,
        reports: Arc<dyn MigrationReports>,
    ) -> Self {
        Self {
            ingest,
            commands,
            timing,
            reports,
            live: Arc::default(),
            next_id: Arc::default(),
        }
    }

    /// The same sessions with other timing (tests use short heartbeats).
    pub fn retimed(&self, timing: SessionTiming) -> Self {
        Self {
            timing,
            ..self.clone()
        }
    }

    /// Ends `cluster`'s session, if it has one; true when there was one.
    pub fn end(&self, cluster: &ClusterName, reason: &str) -> bool {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let ended = live
            .remove(cluster)
            .map(|session| session.end.send(reason.to_owned()));
        metrics::gauge!("drover_agent_sessions").set(live.len() as f64);
        ended.is_some()
    }

    /// How many sessions are open now.
    pub fn live_count(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Upgrades an authenticated connection to a session for `cluster`.
    pub fn accept(
        &self,
        upgrade: WebSocketUpgrade,
        cluster: ClusterName,
    ) -> axum::response::Response {
        let sessions = self.clone();
        upgrade
            .max_message_size(MAX_MESSAGE_BYTES)
            .on_upgrade(move |socket| async move { sessions.run(socket, cluster).await })
    }

    /// Hands a stored command to its cluster's session on this hub, if there is one; false when
    /// there is none or it is backed up (the command stays pending and goes out later).
    pub fn deliver(&self, command: StoredCommand) -> bool {
        let Ok(cluster) = ClusterName::new(command.cluster.clone()) else {
            return false;
        };
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(&cluster)
            .is_some_and(|session| session.commands.try_send(command).is_ok())
    }

    /// Re-sends every unacknowledged command whose backoff has passed to its live session.
    async fn resend_unacknowledged(&self) -> Result<(), crate::store::StoreError> {
        let now = self.commands.store().clock.now();
        for command in self.commands.unacknowledged().await? {
            if command.resend_due().is_some_and(|due| due <= now) {
                tracing::debug!(cluster = %command.cluster, key = %command.key, sends = command.send_count, "re-sending an unacknowledged command");
                self.deliver(command);
            }
        }
        Ok(())
    }

    fn register(
        &self,
        cluster: &ClusterName,
    ) -> (
        u64,
        oneshot::Receiver<String>,
        mpsc::Receiver<StoredCommand>,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (end, ended) = oneshot::channel();
        let (commands, queued) = mpsc::channel(COMMAND_QUEUE);
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = live.insert(cluster.clone(), LiveSession { id, end, commands }) {
            let _ = old
                .end
                .send("replaced by a newer session of the same cluster".into());
        }
        metrics::gauge!("drover_agent_sessions").set(live.len() as f64);
        (id, ended, queued)
    }

    fn unregister(&self, cluster: &ClusterName, id: u64) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(cluster).is_some_and(|session| session.id == id) {
            live.remove(cluster);
        }
        metrics::gauge!("drover_agent_sessions").set(live.len() as f64);
    }

    async fn run(self, mut socket: WebSocket, cluster: ClusterName) {
        let hello = match tokio::time::timeout(self.timing.hello_timeout, recv(&mut socket)).await {
            Ok(Some(AgentMessage::Hello {
                cluster: claimed,
                protocol_versions,
                agent_version,
            })) => {
                if claimed != cluster {
                    tracing::warn!(%cluster, %claimed, "agent refused: its certificate is for another cluster");
                    refuse(
                        &mut socket,
                        "WRONG_CLUSTER",
                        format!("this certificate speaks for cluster {cluster}, not {claimed}"),
                        false,
                    )
                    .await;
                    return;
                }
                (protocol_versions, agent_version)
            }
            Ok(_) => {
                refuse(
                    &mut socket,
                    "PROTOCOL",
                    "the first message must be hello".into(),
                    false,
                )
                .await;
                return;
            }
            Err(_) => {
                tracing::warn!(%cluster, "agent session closed: no hello in time");
                return;
            }
        };
        let Some(version) = negotiate(&hello.0) else {
            refuse(
                &mut socket,
                "UNSUPPORTED_VERSION",
                format!(
                    "this hub speaks protocol versions {:?}; upgrade the agent",
                    drover_shared::protocol::PROTOCOL_VERSIONS
                ),
                false,
            )
            .await;
            return;
        };
        if send(
            &mut socket,
            &HubMessage::Welcome {
                protocol_version: version,
                heartbeat_interval_secs: self.timing.heartbeat_interval.as_secs().max(1) as u32,
            },
        )
        .await
        .is_err()
        {
            return;
        }
        let (id, mut replaced, mut queued) = self.register(&cluster);
        tracing::info!(%cluster, agent_version = %hello.1, "agent session open");
        // Everything still unacknowledged goes out first, oldest first.
        match self.commands.pending_for(cluster.as_str()).await {
            Ok(pending) => {
                for command in pending {
                    if !self.send_command(&mut socket, command).await {
                        self.unregister(&cluster, id);
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%cluster, error = %e, "loading pending commands failed; the re-send sweep retries")
            }
        }
        // The health this session last recorded: a heartbeat that repeats it is not news.
        let mut recorded_health = None;
        loop {
            tokio::select! {
                reason = &mut replaced => {
                    let reason = reason.unwrap_or_else(|_| "hub shutting down".into());
                    let _ = send(&mut socket, &HubMessage::Goodbye { reason }).await;
                    break;
                }
                Some(command) = queued.recv() => {
                    if !self.send_command(&mut socket, command).await {
                        break;
                    }
                }
                msg = tokio::time::timeout(self.timing.silence_limit, recv(&mut socket)) => {
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(_) => {
                            tracing::warn!(%cluster, "agent session closed: silent for {:?}", self.timing.silence_limit);
                            let _ = send(&mut socket, &HubMessage::Goodbye { reason: "no heartbeat".into() }).await;
                            break;
                        }
                    };
                    if !self.handle(&mut socket, &cluster, msg, &mut recorded_health).await {
                        break;
                    }
                }
            }
        }
        self.unregister(&cluster, id);
        tracing::info!(%cluster, "agent session closed");
    }

    /// Sends one command and records that it went out; false when the socket is gone.
    async fn send_command(&self, socket: &mut WebSocket, command: StoredCommand) -> bool {
        let id = command.id;
        let message = HubMessage::Command {
            key: command.key,
            command: command.command,
        };
        if send(socket, &message).await.is_err() {
            return false;
        }
        if let Err(e) = self.commands.mark_sent(id).await {
            tracing::warn!(error = %e, "recording a command send failed");
        }
        true
    }

    /// Handles one message; false ends the session.
    async fn handle(
        &self,
        socket: &mut WebSocket,
        cluster: &ClusterName,
        msg: AgentMessage,
        recorded_health: &mut Option<ClusterHealth>,
    ) -> bool {
        let result = match msg {
            AgentMessage::Hello { .. } => {
                refuse(socket, "PROTOCOL", "hello was already said".into(), false).await;
                return false;
            }
            AgentMessage::Snapshot(snap) => {
                if &snap.cluster != cluster {
                    tracing::warn!(%cluster, claimed = %snap.cluster, "agent refused: reported for another cluster");
                    refuse(
                        socket,
                        "WRONG_CLUSTER",
                        format!(
                            "this session is for cluster {cluster}, not {}",
                            snap.cluster
                        ),
                        false,
                    )
                    .await;
                    return false;
                }
                self.ingest
                    .apply_snapshot(&snap)
                    .await
                    .map(|o| o.generation)
            }
            AgentMessage::Delta(delta) => {
                if &delta.cluster != cluster {
                    tracing::warn!(%cluster, claimed = %delta.cluster, "agent refused: reported for another cluster");
                    refuse(
                        socket,
                        "WRONG_CLUSTER",
                        format!(
                            "this session is for cluster {cluster}, not {}",
                            delta.cluster
                        ),
                        false,
                    )
                    .await;
                    return false;
                }
                self.ingest.apply_delta(&delta).await.map(|o| o.generation)
            }
            AgentMessage::Heartbeat { health, reason } => {
                let health = match health {
                    ReportedHealth::Ready => ClusterHealth::Ready,
                    ReportedHealth::Degraded => ClusterHealth::Degraded,
                };
                if let Some(reason) = reason {
                    tracing::debug!(%cluster, %reason, "agent reports degraded");
                }
                let changed = *recorded_health != Some(health);
                match self
                    .ingest
                    .record_heartbeat(cluster.as_str(), health, changed)
                    .await
                {
                    Ok(()) => *recorded_health = Some(health),
                    // The cluster has no inventory yet (its snapshot was refused): nothing to mark.
                    Err(IngestError::NoSuchCluster { .. }) => {}
                    Err(e) => tracing::warn!(%cluster, error = %e, "recording a heartbeat failed"),
                }
                return true;
            }
            AgentMessage::MigrationStatus(status) => {
                if &status.cluster != cluster {
                    tracing::warn!(%cluster, claimed = %status.cluster, "migration status for another cluster ignored");
                    return true;
                }
                self.reports.migration_status(cluster, &status).await;
                return true;
            }
            AgentMessage::CommandAck { key, outcome } => {
                match self
                    .commands
                    .acknowledge(cluster.as_str(), &key, &outcome)
                    .await
                {
                    Ok(true) => {
                        tracing::info!(%cluster, %key, succeeded = outcome.succeeded(), message = %outcome.message(), "command acknowledged")
                    }
                    Ok(false) => {
                        tracing::debug!(%cluster, %key, "acknowledgement of a command not pending (a repeat)")
                    }
                    // Not recorded: the command stays pending, is re-sent, and the agent answers
                    // again from its journal.
                    Err(e) => {
                        tracing::warn!(%cluster, %key, error = %e, "recording an acknowledgement failed")
                    }
                }
                return true;
            }
        };
        let reply = match result {
            Ok(generation) => HubMessage::Applied { generation },
            Err(e) => {
                let (code, resync) = match &e {
                    IngestError::StaleGeneration { .. } => ("STALE_GENERATION", true),
                    IngestError::UnknownCluster { .. } => ("SNAPSHOT_REQUIRED", true),
                    IngestError::Invalid(_) => ("INVALID_INVENTORY", false),
                    _ => ("UNAVAILABLE", true),
                };
                tracing::warn!(%cluster, error = %e, "agent inventory refused");
                HubMessage::Refused {
                    code: code.into(),
                    message: e.to_string(),
                    resync,
                }
            }
        };
        send(socket, &reply).await.is_ok()
    }

    /// Runs the unreachable sweep every heartbeat interval, and the command re-send sweep,
    /// until `shutdown` resolves.
    pub async fn sweep(&self, shutdown: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.timing.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut resend = tokio::time::interval(RESEND_SWEEP);
        resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = resend.tick() => {
                    if let Err(e) = self.resend_unacknowledged().await {
                        tracing::warn!(error = %e, "command re-send sweep failed; retrying");
                    }
                }
                _ = tick.tick() => {
                    if let Err(e) = self.ingest.mark_silent_clusters_unreachable(self.timing.silence_limit).await {
                        tracing::warn!(error = %e, "unreachable sweep failed; retrying next interval");
                    }
                }
            }
        }
    }
}

async fn recv(socket: &mut WebSocket) -> Option<AgentMessage> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(text)) => match serde_json::from_str(&text) {
                Ok(m) => return Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "agent sent a message this hub cannot read");
                    let _ = send(
                        socket,
                        &HubMessage::Refused {
                            code: "MALFORMED".into(),
                            message: format!("unreadable message: {e}"),
                            resync: false,
                        },
                    )
                    .await;
                    return None;
                }
            },
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue, // pings are answered by the library
        }
    }
}

async fn send(socket: &mut WebSocket, msg: &HubMessage) -> Result<(), axum::Error> {
    let text = serde_json::to_string(msg).unwrap_or_default();
    tokio::time::timeout(
        Duration::from_secs(10),
        socket.send(Message::Text(text.into())),
    )
    .await
    .map_err(|_| axum::Error::new(std::io::Error::other("send timed out")))?
}

async fn refuse(socket: &mut WebSocket, code: &str, message: String, resync: bool) {
    let _ = send(
        socket,
        &HubMessage::Refused {
            code: code.into(),
            message,
            resync,
        },
    )
    .await;
    let _ = socket.send(Message::Close(None)).await;
}
