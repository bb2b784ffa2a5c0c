//! The real `drover-hub` binary: the README's quick start on the embedded SQLite file, its HTTP
//! endpoints, bad command-line input, and a PostgreSQL restart under a running hub.

use std::path::Path;
use std::time::Duration;

use drover_e2e::postgres::PgCluster;
use drover_e2e::process::HubProcess;
use drover_e2e::testbed::{binary, error_code};
use serde_json::{json, Value};

fn seed(data_dir: &Path, database_url: Option<&str>, clusters: u32, vms: u32) -> String {
    let mut cmd = std::process::Command::new(binary("drover-hub").unwrap());
    cmd.args(["seed", "--clusters", &clusters.to_string()])
        .args(["--vms-per-cluster", &vms.to_string()])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn");
    if let Some(url) = database_url {
        cmd.arg("--database-url").arg(url);
    }
    let out = cmd.output().expect("run drover-hub seed");
    assert!(
        out.status.success(),
        "seed failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const FLEET: &str = "{ fleet { clusters { total } virtualMachines { total } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_start_on_embedded_sqlite_serves_graphiql_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let out = seed(dir.path(), None, 3, 4);
    assert!(out.contains("seeded 3 clusters"), "{out}");
    assert!(
        dir.path().join("drover.sqlite").exists(),
        "the embedded store is a file in --data-dir"
    );
    let hub = HubProcess::start(dir.path(), None).await;
    let http = reqwest::Client::new();

    let health = http.get(hub.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = http.get(hub.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let page = http.get(hub.url("/graphql")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("graphiql"), "GET /graphql serves GraphiQL");

    let d = hub.post_gql(&http, FLEET).await.unwrap();
    assert_eq!(d["data"]["fleet"]["clusters"]["total"], 3, "{d}");
    assert_eq!(d["data"]["fleet"]["virtualMachines"]["total"], 12, "{d}");

    // Bad requests: clear errors with stable codes.
    let huge = "x".repeat(300 * 1024);
    let resp = http
        .post(hub.url("/graphql"))
        .json(&json!({ "query": huge }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        error_code(&body).as_deref(),
        Some("QUERY_TOO_LARGE"),
        "{body}"
    );
    let resp = http
        .post(hub.url("/graphql"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        error_code(&body).as_deref(),
        Some("BAD_USER_INPUT"),
        "{body}"
    );

    let metrics = hub.metrics(&http).await;
    for name in [
        "drover_graphql_requests_total",
        "drover_graphql_request_seconds",
        "drover_db_statements_total",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }

    // Seeding again (a newer generation) while the hub serves: the same store, updated.
    let out = seed(dir.path(), None, 5, 2);
    assert!(out.contains("seeded 5 clusters"), "{out}");
    let d = hub.post_gql(&http, FLEET).await.unwrap();
    assert_eq!(d["data"]["fleet"]["clusters"]["total"], 5, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_command_lines_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let hub = binary("drover-hub").unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(&hub)
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("DATABASE_URL")
            .output()
            .unwrap()
    };
    let out = run(&["seed", "--clusters", "0"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--clusters"),
        "{out:?}"
    );
    let out = run(&["--listen", "not-an-address"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--listen"),
        "{out:?}"
    );
    // Nothing listens on port 1: the hub gives up after the wait and says what to check.
    let out = run(&[
        "--database-url",
        "postgres://drover@127.0.0.1:1/drover",
        "--database-wait-secs",
        "1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the inventory store"), "{err}");
    assert!(err.contains("DATABASE_URL"), "{err}");
}

/// A hub still waiting for its database stops on SIGTERM at once, not after the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_waiting_for_its_database_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut hub = tokio::process::Command::new(binary("drover-hub").unwrap())
        .args([
            "--database-url",
            "postgres://drover@127.0.0.1:1/drover",
            "--database-wait-secs",
            "600",
            "--listen",
            "127.0.0.1:0",
            "--agent-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Let it start waiting (it retries the database with backoff).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        hub.try_wait().unwrap().is_none(),
        "still waiting for PostgreSQL"
    );
    let pid = hub.id().unwrap().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(10), hub.wait())
        .await
        .expect("the hub exits within 10 s of SIGTERM while waiting for its database")
        .unwrap();
    assert!(
        status.success(),
        "a requested stop is a clean exit: {status:?}"
    );
}

async fn poll<T>(what: &str, timeout: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_reports_and_recovers_from_a_postgres_restart() {
    let pg = PgCluster::start_dedicated().await.unwrap();
    let url = pg.create_database("restart").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path(), Some(&url), 2, 3);
    let mut hub = HubProcess::start(dir.path(), Some(&url)).await;
    // Bounded, so that a hub hanging on the dead database fails the test rather than hanging
    // it; the hub itself gives up on the database after 5 s.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let before = hub.post_gql(&http, FLEET).await.unwrap();
    assert_eq!(
        before["data"]["fleet"]["virtualMachines"]["total"], 6,
        "{before}"
    );

    pg.stop().await.unwrap();
    let status = poll("/readyz to say 503", Duration::from_secs(60), async || {
        let r = http.get(hub.url("/readyz")).send().await.ok()?;
        (r.status() == 503).then(|| r.status())
    })
    .await;
    assert_eq!(status, 503);
    let during = hub.post_gql(&http, FLEET).await.unwrap();
    assert_eq!(
        error_code(&during).as_deref(),
        Some("DATABASE_UNAVAILABLE"),
        "{during}"
    );
    assert!(
        during["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("retry"),
        "{during}"
    );
    let health = http.get(hub.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "the hub itself is alive");

    pg.start().await.unwrap();
    poll("/readyz to recover", Duration::from_secs(120), async || {
        let r = http.get(hub.url("/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let after = hub.post_gql(&http, FLEET).await.unwrap();
    assert_eq!(after, before, "the same inventory after the restart");
    assert!(
        hub.child.try_wait().unwrap().is_none(),
        "the hub never exited"
    );
}

fn agent(args: &[&str], data_dir: &Path) -> std::process::Output {
    std::process::Command::new(binary("drover-agent").unwrap())
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run drover-agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joins_a_hub_started_from_the_readme_once() {
    let dir = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(dir.path(), None).await;
    assert!(
        dir.path().join("pki/ca.pem").exists(),
        "the hub made its CA in --data-dir"
    );
    let http = reqwest::Client::new();
    let token = hub.create_join_token(&http, "east-1").await.unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let out = agent(
        &[
            "join",
            "--hub",
            &hub.agents,
            "--cluster",
            "east-1",
            "--join-token",
            &token,
        ],
        agent_dir.path(),
    );
    assert!(
        out.status.success(),
        "join failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("as cluster east-1"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(agent_dir.path().join("agent-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the agent's key is private");
    }
    let out = agent(&["check", "--hub", &hub.agents], agent_dir.path());
    assert!(
        out.status.success(),
        "check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cluster east-1"));

    // The same token again: refused, with a clear message.
    let other_dir = tempfile::tempdir().unwrap();
    let out = agent(
        &[
            "join",
            "--hub",
            &hub.agents,
            "--cluster",
            "east-1",
            "--join-token",
            &token,
        ],
        other_dir.path(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already used"), "{err}");

    // A token whose CA pin is not this hub's: the agent refuses to talk to the hub.
    let token = hub.create_join_token(&http, "east-2").await.unwrap();
    let (head, _) = token.rsplit_once('.').unwrap();
    let wrong_pin = format!("{head}.{}", "ab".repeat(32));
    let out = agent(
        &[
            "join",
            "--hub",
            &hub.agents,
            "--cluster",
            "east-2",
            "--join-token",
            &wrong_pin,
        ],
        other_dir.path(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CA pin"), "{err}");

    // Checking without an identity says what to do.
    let empty = tempfile::tempdir().unwrap();
    let out = agent(&["check", "--hub", &hub.agents], empty.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("join first"));
}

/// An in-process agent session for cluster `identity.cluster` with `hubs`, reporting `cluster`:
/// its status, the sender that stops it, and its task.
fn spawn_session(
    identity: drover_agent::identity::AgentIdentity,
    dir: &Path,
    hubs: Vec<String>,
    cluster: std::sync::Arc<drover_e2e::testbed::TestCluster>,
) -> (
    tokio::sync::watch::Receiver<drover_agent::session::SessionStatus>,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (status_tx, status) = tokio::sync::watch::channel(Default::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(drover_agent::session::run(
        identity,
        dir.to_owned(),
        hubs,
        cluster.clone(),
        cluster.commands(dir),
        status_tx,
        stopped,
    ));
    (status, stop, task)
}

/// How many VMs the hub shows for east-1 (None while it cannot say).
async fn east_vm_count(hub: &HubProcess) -> Option<i64> {
    let d = hub
        .post_gql(
            &reqwest::Client::new(),
            r#"{ cluster(name: "east-1") { virtualMachines { totalCount } } }"#,
        )
        .await
        .ok()?;
    d["data"]["cluster"]["virtualMachines"]["totalCount"].as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_and_resync_after_the_hub_is_killed() {
    use drover_e2e::testbed::{vm, TestCluster};
    let agent_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let mut hub = HubProcess::start_with_agent_port(dir.path(), None, agent_port).await;
    let http = reqwest::Client::new();
    let token = hub.create_join_token(&http, "east-1").await.unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let cluster_name = drover_shared::ClusterName::new("east-1").unwrap();
    let identity = drover_agent::identity::AgentIdentity::join(
        agent_dir.path(),
        &hub.agents,
        &cluster_name,
        &token,
    )
    .await
    .unwrap();
    let cluster = TestCluster::new(vec![vm("web", "api-1", 1), vm("web", "api-2", 2)]);
    let (mut status, stop, agent) = spawn_session(
        identity,
        agent_dir.path(),
        vec![hub.agents.clone()],
        cluster.clone(),
    );
    let count = east_vm_count;
    poll(
        "the agent's snapshot",
        Duration::from_secs(60),
        async || (count(&hub).await == Some(2)).then_some(()),
    )
    .await;

    // kill -9: the agent notices, the cluster changes meanwhile.
    hub.child.start_kill().unwrap();
    let _ = hub.child.wait().await;
    tokio::time::timeout(Duration::from_secs(60), status.wait_for(|s| !s.connected))
        .await
        .expect("the agent notices the hub is gone")
        .unwrap();
    cluster.add_vm(vm("web", "api-3", 3));

    let hub = HubProcess::start_with_agent_port(dir.path(), None, agent_port).await;
    // The agent retries with exponential backoff (up to 30 s, +-50 % jitter) while the hub is
    // down, so after a slow restart its next attempt may be up to 45 s away.
    poll(
        "the agent to reconnect and resynchronise",
        Duration::from_secs(120),
        async || (count(&hub).await == Some(3)).then_some(()),
    )
    .await;
    assert!(
        status.borrow().sessions_opened >= 2,
        "{:?}",
        *status.borrow()
    );
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
}

/// Two hub replicas on one PostgreSQL, sharing one CA; an agent given both addresses fails over
/// to the second when the first is killed, and reports the cluster's change through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_to_another_hub_replica() {
    use drover_e2e::testbed::{vm, TestCluster};
    let pg = PgCluster::start_dedicated().await.unwrap();
    let url = pg.create_database("failover").await.unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = HubProcess::start(dir_a.path(), Some(&url)).await;
    let (ca_cert, ca_key) = (
        dir_a.path().join("pki/ca.pem"),
        dir_a.path().join("pki/ca-key.pem"),
    );
    let b = HubProcess::start_with_args(
        dir_b.path(),
        Some(&url),
        0,
        &[
            "--ca-cert",
            ca_cert.to_str().unwrap(),
            "--ca-key",
            ca_key.to_str().unwrap(),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let token = a.create_join_token(&http, "east-1").await.unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let identity = drover_agent::identity::AgentIdentity::join(
        agent_dir.path(),
        &a.agents,
        &drover_shared::ClusterName::new("east-1").unwrap(),
        &token,
    )
    .await
    .unwrap();
    let cluster = TestCluster::new(vec![vm("web", "api-1", 1)]);
    let (mut status, stop, agent) = spawn_session(
        identity,
        agent_dir.path(),
        vec![a.agents.clone(), b.agents.clone()],
        cluster.clone(),
    );
    let count = east_vm_count;
    poll(
        "the agent's snapshot through the first replica",
        Duration::from_secs(60),
        async || (count(&a).await == Some(1)).then_some(()),
    )
    .await;
    let sessions = |metrics: &str| metrics.contains("drover_agent_sessions 1");
    assert!(
        sessions(&a.metrics(&http).await),
        "the session is on the first replica"
    );

    a.child.start_kill().unwrap();
    let _ = a.child.wait().await;
    tokio::time::timeout(Duration::from_secs(60), status.wait_for(|s| !s.connected))
        .await
        .expect("the agent notices the first replica is gone")
        .unwrap();
    cluster.add_vm(vm("web", "api-2", 2));
    // The next address is tried at once, not after a back-off.
    poll(
        "the agent on the second replica, with the change",
        Duration::from_secs(60),
        async || (count(&b).await == Some(2)).then_some(()),
    )
    .await;
    assert!(
        sessions(&b.metrics(&http).await),
        "the session is on the second replica"
    );
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
}
