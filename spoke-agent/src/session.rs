//! The agent's session with the hub: dial (the hub never dials a cluster), say hello, send a full
//! snapshot, then deltas as the cluster changes and a heartbeat every interval. On any failure
//! it reconnects with exponential backoff and jitter and resynchronises with a fresh snapshot.
//! Commands from the hub go to the executor (at most once per key); their acknowledgements go
//! back on whichever session is open when they finish.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover_shared::inventory::{
    ClusterInfo, InventoryChange, InventoryDelta, InventorySnapshot, NodeInfo, VmInfo,
};
use drover_shared::protocol::{
    AgentMessage, HubMessage, ReportedHealth, PROTOCOL_VERSIONS, SESSION_PATH,
};
use futures::{SinkExt, StreamExt};
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::commands::Commands;
use crate::identity::AgentIdentity;

/// Where the session's inventory comes from: a runtime (QEMU, KubeVirt) implements this.
pub trait InventorySource: Send + Sync + 'static {
    /// The cluster's whole inventory now.
    fn snapshot(&self) -> (ClusterInfo, Vec<NodeInfo>, Vec<VmInfo>);
    /// Changes as they happen, in order.
    fn subscribe(&self) -> broadcast::Receiver<Vec<InventoryChange>>;
    /// The agent's own judgement of its cluster.
    fn health(&self) -> (ReportedHealth, Option<String>);
}

/// What the session is doing, for logs, metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStatus {
    pub connected: bool,
    /// Generation the hub last confirmed.
    pub applied_generation: Option<u64>,
    /// Sessions opened so far (1 + reconnects).
    pub sessions_opened: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("the hub refused the session: {0}")]
    Refused(String),
    /// Permanent: retrying cannot help.
    #[error("the hub no longer accepts this agent's certificate (revoked, or the cluster was removed); join again with a new token")]
    Revoked,
    #[error("the connection broke: {0}")]
    Broken(String),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
}

const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps a session with one of `hubs` (the agent endpoints of the hub's replicas; at least one)
/// until `shutdown` turns true, renewing the agent's certificate (stored in `data_dir`) whenever
/// it is due before connecting. A session that fails or ends moves on to the next address at
/// once; only when every address failed in turn does the agent back off. Gives up only when a
/// hub refuses the certificate for good (revoked); `status.last_error` then says so.
pub async fn run(
    mut identity: AgentIdentity,
    data_dir: PathBuf,
    hubs: Vec<String>,
    source: Arc<dyn InventorySource>,
    mut commands: Commands,
    status: watch::Sender<SessionStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = INITIAL_BACKOFF;
    let mut generation = 0u64;
    // Which address to try, and how many in a row failed since the last good session.
    let (mut current, mut failed_in_a_row) = (0usize, 0usize);
    loop {
        if *shutdown.borrow() || hubs.is_empty() {
            return;
        }
        let hub = hubs[current % hubs.len()].clone();
        if identity.renewal_due() {
            match identity.renew(&data_dir, &hub).await {
                Ok(()) => tracing::info!(cluster = %identity.cluster, "certificate renewed"),
                // The old certificate may still work; the next attempt tries again.
                Err(e) => tracing::warn!(error = %e, "certificate renewal failed"),
            }
        }
        status.send_modify(|s| s.sessions_opened += 1);
        let outcome = tokio::select! {
            r = session(&identity, &hub, source.as_ref(), &mut commands, &status, &mut generation) => r,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        // A session that got as far as the hello was a good one: the count starts over.
        if status.borrow().connected {
            failed_in_a_row = 0;
            backoff = INITIAL_BACKOFF;
        }
        status.send_modify(|s| s.connected = false);
        // Whatever ended this session, the next attempt goes to the next address.
        current += 1;
        match outcome {
            // The hub said goodbye (replaced, restarting): come back soon, gently.
            Ok(reason) => {
                tracing::info!(%reason, %hub, "hub ended the session");
                backoff = INITIAL_BACKOFF;
                failed_in_a_row = 0;
            }
            Err(e @ SessionError::Revoked) => {
                tracing::error!(error = %e, %hub, "giving up the hub session");
                status.send_modify(|s| s.last_error = Some(e.to_string()));
                return;
            }
            Err(e) => {
                failed_in_a_row += 1;
                tracing::warn!(error = %e, %hub, "hub session failed");
                status.send_modify(|s| s.last_error = Some(e.to_string()));
            }
        }
        // Another address not tried yet since the last good session: at once. Every one
        // failed: back off, with jitter to spread a fleet of agents reconnecting after a hub
        // restart.
        if failed_in_a_row > 0 && failed_in_a_row % hubs.len() != 0 {
            continue;
        }
        let jittered = backoff.mul_f64(rand::random_range(0.5..1.5));
        tracing::info!(retry_in = ?jittered, "no hub address answered; backing off");
        tokio::select! {
            _ = tokio::time::sleep(jittered) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A generation newer than any before it, even across agent restarts.
fn next_generation(last: &mut u64) -> u64 {
    let now = chrono::Utc::now().timestamp_micros().max(0) as u64;
    *last = (*last + 1).max(now);
    *last
}

fn text(msg: &AgentMessage) -> Message {
    Message::Text(serde_json::to_string(msg).unwrap_or_default().into())
}

/// One session, from connect to its end; Ok carries the hub's goodbye.
async fn session(
    identity: &AgentIdentity,
    hub: &str,
    source: &dyn InventorySource,
    commands: &mut Commands,
    status: &watch::Sender<SessionStatus>,
    generation: &mut u64,
) -> Result<String, SessionError> {
    let url = format!(
        "{}{SESSION_PATH}",
        hub.trim_end_matches('/').replacen("https://", "wss://", 1)
    );
    let connector = tokio_tungstenite::Connector::Rustls(Arc::new(identity.client_config()?));
    let (mut ws, _) = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::connect_async_tls_with_config(&url, None, false, Some(connector)),
    )
    .await
    .map_err(|_| SessionError::Connect {
        url: url.clone(),
        detail: "timed out".into(),
    })?
    .map_err(|e| match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) if resp.status() == 403 => {
            SessionError::Revoked
        }
        e => SessionError::Connect {
            url: url.clone(),
            detail: e.to_string(),
        },
    })?;
    let broken = |e: tokio_tungstenite::tungstenite::Error| SessionError::Broken(e.to_string());

    ws.send(text(&AgentMessage::Hello {
        cluster: identity.cluster.clone(),
        protocol_versions: PROTOCOL_VERSIONS.to_vec(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    }))
    .await
    .map_err(broken)?;
    let interval = match tokio::time::timeout(HANDSHAKE_TIMEOUT, next_message(&mut ws)).await {
        Ok(Ok(HubMessage::Welcome {
            heartbeat_interval_secs,
            ..
        })) => Duration::from_secs(heartbeat_interval_secs.max(1) as u64),
        Ok(Ok(HubMessage::Refused { message, .. })) => return Err(SessionError::Refused(message)),
        Ok(Ok(other)) => return Err(SessionError::Refused(format!("unexpected {other:?}"))),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(SessionError::Broken("no welcome from the hub".into())),
    };
    status.send_modify(|s| {
        s.connected = true;
        s.last_error = None;
    });

    // Subscribe before the snapshot so nothing between the two is lost.
    let mut changes = source.subscribe();
    send_snapshot(&mut ws, identity, source, generation).await?;
    let mut heartbeat = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                let (health, reason) = source.health();
                ws.send(text(&AgentMessage::Heartbeat { health, reason })).await.map_err(broken)?;
            }
            change = changes.recv() => match change {
                Ok(changes) if !changes.is_empty() => {
                    let delta = InventoryDelta {
                        cluster: identity.cluster.clone(),
                        generation: next_generation(generation),
                        changes,
                    };
                    ws.send(text(&AgentMessage::Delta(delta))).await.map_err(broken)?;
                }
                Ok(_) => {}
                // Missed changes: the only safe answer is the whole inventory again.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    send_snapshot(&mut ws, identity, source, generation).await?;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(SessionError::Broken("the runtime stopped reporting".into()));
                }
            },
            Some(message) = commands.acks.recv() => {
                // Lost if the connection breaks now: the hub re-sends, the journal answers.
                ws.send(text(&message)).await.map_err(broken)?;
            }
            msg = next_message(&mut ws) => match msg? {
                HubMessage::Command { key, command } => {
                    if let Some(ack) = commands.executor.receive(key, command) {
                        ws.send(text(&ack.message())).await.map_err(broken)?;
                    }
                }
                HubMessage::Applied { generation: applied } => {
                    status.send_modify(|s| s.applied_generation = Some(applied));
                }
                HubMessage::Refused { code, message, resync } => {
                    tracing::warn!(%code, %message, "hub refused inventory");
                    if resync {
                        send_snapshot(&mut ws, identity, source, generation).await?;
                    } else {
                        return Err(SessionError::Refused(message));
                    }
                }
                HubMessage::Goodbye { reason } => return Ok(reason),
                HubMessage::Welcome { .. } => {}
            },
        }
    }
}

async fn send_snapshot<S>(
    ws: &mut S,
    identity: &AgentIdentity,
    source: &dyn InventorySource,
    generation: &mut u64,
) -> Result<(), SessionError>
where
    S: futures::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let (info, nodes, vms) = source.snapshot();
    let snap = InventorySnapshot {
        cluster: identity.cluster.clone(),
        generation: next_generation(generation),
        info,
        nodes,
        vms,
    };
    ws.send(text(&AgentMessage::Snapshot(Box::new(snap))))
        .await
        .map_err(|e| SessionError::Broken(e.to_string()))
}

async fn next_message<S>(ws: &mut S) -> Result<HubMessage, SessionError>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(&t)
                    .map_err(|e| SessionError::Broken(format!("unreadable hub message: {e}")))
            }
            Some(Ok(Message::Close(_))) | None => {
                return Err(SessionError::Broken("the hub closed the connection".into()))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(SessionError::Broken(e.to_string())),
        }
    }
}
