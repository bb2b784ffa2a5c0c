//! What hub replicas on one PostgreSQL tell each other at once, over LISTEN/NOTIFY: a command
//! stored for an agent whose session may be on another replica, an acknowledgement a driver on
//! another replica waits for, and the migration and inventory events every replica's
//! subscribers see. Notices are news, never the record: what the tables hold is recovered
//! without them (unsent commands by the re-send sweep, acknowledgements by polling), so a
//! notice lost while the database was away delays, and loses nothing but an event. SQLite has
//! one hub and nothing to tell.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_shared::events::{InventoryChange, MigrationChange};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::store::notify::{self, DbBackend, NoticeListener};
use crate::store::Store;

/// The one channel replicas listen on.
const CHANNEL: &str = "drover_replicas";
/// PostgreSQL refuses payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7_900;
/// Notices waiting to go out; beyond that they are dropped (they are news, not the record).
const OUTBOX: usize = 4_096;

/// One thing a replica tells the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// A command was stored for `cluster`: the replica with its session sends it now.
    Command {
        cluster: String,
        key: String,
    },
    /// `cluster` acknowledged `key`: drivers waiting for it look again.
    Acked {
        cluster: String,
        key: String,
    },
    Migration {
        event: MigrationChange,
    },
    Inventory {
        event: InventoryChange,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    notice: Notice,
}

/// The sending side, cloned into everything that has news; `run` carries it out.
#[derive(Clone)]
pub struct ReplicaBus {
    replica: Arc<str>,
    outbox: Option<mpsc::Sender<Notice>>,
    unsent: Arc<Mutex<Option<mpsc::Receiver<Notice>>>>,
}

impl ReplicaBus {
    /// A bus for `replica` on `backend` (silent on SQLite).
    pub fn new(replica: &str, backend: DbBackend) -> Self {
        let (outbox, unsent) = if notify::carries_notices(backend) {
            let (tx, rx) = mpsc::channel(OUTBOX);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Self {
            replica: replica.into(),
            outbox,
            unsent: Arc::new(Mutex::new(unsent)),
        }
    }

    /// Whether other replicas may listen (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.outbox.is_some()
    }

    /// Tells the other replicas (without waiting; dropped when the outbox is full).
    pub fn tell(&self, notice: Notice) {
        if let Some(outbox) = &self.outbox {
            if outbox.try_send(notice).is_err() {
                metrics::counter!("drover_replica_notices_dropped_total").increment(1);
            }
        }
    }

    /// Sends what this replica tells and hands `deliver` what the others tell it, until `stop`
    /// resolves. Returns at once on SQLite, or when called a second time.
    pub async fn run<F, Heard>(
        &self,
        store: Store,
        deliver: F,
        stop: impl std::future::Future<Output = ()>,
    ) where
        F: Fn(Notice) -> Heard,
        Heard: std::future::Future<Output = ()>,
    {
        let Some(mut unsent) = self.unsent.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        tokio::pin!(stop);
        tokio::select! {
            () = &mut stop => {}
            () = send_all(&store, &self.replica, &mut unsent) => {}
            () = listen(&store, &self.replica, &deliver) => {}
        }
    }
}

async fn send_all(store: &Store, replica: &str, unsent: &mut mpsc::Receiver<Notice>) {
    while let Some(notice) = unsent.recv().await {
        let envelope = Envelope {
            from: replica.to_owned(),
            notice,
        };
        let Ok(payload) = serde_json::to_string(&envelope) else {
            continue;
        };
        if payload.len() > MAX_PAYLOAD {
            tracing::debug!(
                bytes = payload.len(),
                "a notice too large for NOTIFY stays on this replica"
            );
            continue;
        }
        match tokio::time::timeout(
            Duration::from_secs(5),
            notify::notify(store, CHANNEL, payload),
        )
        .await
        {
            Ok(Ok(_)) => metrics::counter!("drover_replica_notices_sent_total").increment(1),
            Ok(Err(e)) => {
                metrics::counter!("drover_replica_notices_dropped_total").increment(1);
                tracing::debug!(error = %e, "a notice to the other replicas was lost; the tables still hold what it said");
            }
            Err(_) => {
                metrics::counter!("drover_replica_notices_dropped_total").increment(1);
                tracing::debug!(
                    "a notice to the other replicas timed out; the tables still hold what it said"
                );
            }
        }
    }
}

/// Listens until the process stops; a lost connection is opened again with backoff.
async fn listen<F, Heard>(store: &Store, replica: &str, deliver: &F)
where
    F: Fn(Notice) -> Heard,
    Heard: std::future::Future<Output = ()>,
{
    let cap = Duration::from_secs(10);
    let mut delays = crate::retry::delays(Duration::from_millis(200), cap);
    loop {
        let mut listener = match NoticeListener::connect(store, CHANNEL).await {
            Ok(l) => l,
            Err(e) => {
                let wait = crate::retry::next(&mut delays, cap);
                tracing::warn!(error = %e, retry_in = ?wait, "cannot listen for the other replicas yet");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        delays = crate::retry::delays(Duration::from_millis(200), cap);
        loop {
            match listener.recv().await {
                Ok(payload) => match serde_json::from_str::<Envelope>(&payload) {
                    Ok(envelope) if envelope.from != replica => {
                        metrics::counter!("drover_replica_notices_received_total").increment(1);
                        deliver(envelope.notice).await
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "an unreadable notice from another replica (another version?); ignored")
                    }
                },
                Err(e) => {
                    // The listener reconnects on the next call; if it cannot, start over.
                    tracing::warn!(error = %e, "lost the connection that listens for the other replicas; listening again");
                    let wait = crate::retry::next(&mut delays, cap);
                    tokio::time::sleep(wait).await;
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_reads_back_as_it_was_told() {
        let envelope = Envelope {
            from: "hub-a".into(),
            notice: Notice::Command {
                cluster: "east-1".into(),
                key: "migration/x/send".into(),
            },
        };
        let text = serde_json::to_string(&envelope).unwrap();
        assert!(text.contains(r#""kind":"command""#), "{text}");
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.from, "hub-a");
        assert!(
            matches!(back.notice, Notice::Command { cluster, key } if cluster == "east-1" && key == "migration/x/send")
        );
    }
}
