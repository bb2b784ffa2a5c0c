//! In-process agents for tests: join a hub with a token, run the agent's real session and
//! command code over a `TestCluster`, stop it; and `eventually`, the bounded wait tests use.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use drover_agent::identity::AgentIdentity;
use drover_agent::session::{self, SessionStatus};
use drover_shared::ClusterName;
use tokio::sync::watch;

use crate::testbed::{TestCluster, TestHub};

/// Joins `cluster` to the hub behind `base` (agent endpoint) with a fresh token; the identity
/// is stored in `dir`.
pub async fn join(hub: &TestHub, base: &str, cluster: &str, dir: &Path) -> Arc<AgentIdentity> {
    let cluster = ClusterName::new(cluster).unwrap();
    let token = hub
        .hub
        .identities
        .create_join_token(&cluster, Duration::from_secs(600), "test", false)
        .await
        .unwrap();
    Arc::new(
        AgentIdentity::join(dir, base, &cluster, &token.token)
            .await
            .unwrap(),
    )
}

/// The agent's session and command executor running in this process.
pub struct RunningAgent {
    pub status: watch::Receiver<SessionStatus>,
    stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<()>,
}

impl RunningAgent {
    /// Starts the agent whose identity and command journal are in `dir`.
    pub fn start(dir: &Path, base: &str, source: Arc<TestCluster>) -> Self {
        let identity = AgentIdentity::load(dir).unwrap();
        let (status_tx, status) = watch::channel(SessionStatus::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(session::run(
            identity,
            dir.to_owned(),
            vec![base.to_owned()],
            source.clone(),
            source.commands(dir),
            status_tx,
            stopped,
        ));
        Self { status, stop, task }
    }

    /// Stops the agent and waits until its session task has ended (its connection to the hub
    /// is then closed), so that what a test does next happens while the agent is offline.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the agent stops within 60 s")
            .expect("the agent's session task ended cleanly");
    }
}

/// Waits until `probe` holds, checking every 100 ms, failing the test after `timeout`.
pub async fn eventually(what: &str, timeout: Duration, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !probe().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
