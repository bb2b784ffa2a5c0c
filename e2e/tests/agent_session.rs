//! Agent sessions over the real protocol and real mutual TLS: an agent that joined reports its
//! cluster (snapshot, then deltas) and heartbeats; silence makes the cluster Unreachable without
//! losing its inventory; a certificate cannot report for another cluster; agents reconnect and
//! resynchronise after the hub is killed and restarted.

use std::sync::Arc;
use std::time::Duration;

use drover_agent::identity::AgentIdentity;
use drover_e2e::agents::{eventually, join, RunningAgent};
use drover_e2e::testbed::{vm, AgentEndpoint, TestCluster, TestHub};
use drover_hub::agents::sessions::SessionTiming;
use drover_shared::protocol::{AgentMessage, HubMessage};
use drover_shared::ClusterName;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Heartbeats every second; silence for 15 s ends a session and makes its cluster Unreachable.
/// The limit is far above any pause a loaded machine causes (a heartbeat late by a few seconds
/// must not end a session, nor a raw test session that sends no heartbeats), and short enough
/// for the test that waits for it.
const TIMING: SessionTiming = SessionTiming {
    heartbeat_interval: Duration::from_secs(1),
    silence_limit: Duration::from_secs(15),
    hello_timeout: Duration::from_secs(30),
};

/// How long to wait for something that will happen (a loaded CI machine can be slow).
const PATIENCE: Duration = Duration::from_secs(60);

async fn endpoint(name: &str) -> AgentEndpoint {
    AgentEndpoint::start(name, Some(TIMING)).await.unwrap()
}

async fn cluster_view(hub: &TestHub, name: &str) -> Value {
    let resp = hub
        .gql(
            "query($c: String!) { cluster(name: $c) { health inventoryGeneration lastHeartbeatAt
               virtualMachines { totalCount edges { node { name } } } } }",
            json!({"c": name}),
        )
        .await;
    resp["data"]["cluster"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reports_its_cluster_and_a_silent_one_becomes_unreachable() {
    let e = endpoint("session_report").await;
    let dir = tempfile::tempdir().unwrap();
    join(&e.hub, &e.base, "east-1", dir.path()).await;
    let cluster = TestCluster::new(vec![vm("web", "api-1", 1), vm("web", "api-2", 2)]);
    let agent = RunningAgent::start(dir.path(), &e.base, cluster.clone());

    eventually("the snapshot in GraphQL", PATIENCE, async || {
        cluster_view(&e.hub, "east-1").await["virtualMachines"]["totalCount"] == 2
    })
    .await;
    cluster.add_vm(vm("web", "api-3", 3));
    eventually("the delta in GraphQL", PATIENCE, async || {
        cluster_view(&e.hub, "east-1").await["virtualMachines"]["totalCount"] == 3
    })
    .await;
    let view = cluster_view(&e.hub, "east-1").await;
    assert_eq!(view["health"], "READY");
    assert!(agent.status.borrow().connected);
    assert_eq!(e.hub.hub.sessions.live_count(), 1);

    // The agent goes silent: the cluster becomes Unreachable (after the silence limit), its
    // inventory stays.
    agent.stop().await;
    eventually("UNREACHABLE", TIMING.silence_limit + PATIENCE, async || {
        cluster_view(&e.hub, "east-1").await["health"] == "UNREACHABLE"
    })
    .await;
    assert_eq!(
        cluster_view(&e.hub, "east-1").await["virtualMachines"]["totalCount"],
        3
    );

    // It comes back: Ready again, resynchronised by a newer snapshot.
    let before = cluster_view(&e.hub, "east-1").await["inventoryGeneration"]
        .as_i64()
        .unwrap();
    let again = RunningAgent::start(dir.path(), &e.base, cluster);
    eventually("READY again", PATIENCE, async || {
        let v = cluster_view(&e.hub, "east-1").await;
        v["health"] == "READY" && v["inventoryGeneration"].as_i64().unwrap() > before
    })
    .await;
    again.stop().await;
}

/// A raw protocol client presenting `identity`'s certificate.
async fn raw_session(
    identity: &AgentIdentity,
    base: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!(
        "{}{}",
        base.replacen("https://", "wss://", 1),
        drover_shared::protocol::SESSION_PATH
    );
    let connector =
        tokio_tungstenite::Connector::Rustls(Arc::new(identity.client_config().unwrap()));
    tokio_tungstenite::connect_async_tls_with_config(&url, None, false, Some(connector))
        .await
        .unwrap()
        .0
}

/// The hub's next message; None when the hub closed the session. A hub that says nothing at
/// all fails the test (rather than counting as closed, which a slow machine could fake).
async fn next_hub_message<S>(ws: &mut S) -> Option<HubMessage>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let next = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("the hub answers or closes the session within 60 s")?;
        match next {
            Ok(Message::Text(t)) => return serde_json::from_str(&t).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// A hello for `cluster` offering one protocol version.
fn hello(cluster: &str, version: u32) -> AgentMessage {
    AgentMessage::Hello {
        cluster: ClusterName::new(cluster).unwrap(),
        protocol_versions: vec![version],
        agent_version: "test".into(),
    }
}

fn send(msg: &AgentMessage) -> Message {
    Message::Text(serde_json::to_string(msg).unwrap().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_cannot_report_for_another_cluster() {
    let e = endpoint("session_wrong_cluster").await;
    let dir = tempfile::tempdir().unwrap();
    let east = join(&e.hub, &e.base, "east-1", dir.path()).await;

    // Hello naming another cluster.
    let mut ws = raw_session(&east, &e.base).await;
    ws.send(send(&hello("west-1", 1))).await.unwrap();
    match next_hub_message(&mut ws).await {
        Some(HubMessage::Refused { code, .. }) => assert_eq!(code, "WRONG_CLUSTER"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A proper hello, then a snapshot for another cluster: refused and the session ends.
    let mut ws = raw_session(&east, &e.base).await;
    ws.send(send(&hello("east-1", 1))).await.unwrap();
    assert!(matches!(
        next_hub_message(&mut ws).await,
        Some(HubMessage::Welcome {
            protocol_version: 1,
            ..
        })
    ));
    let snap = drover_e2e::testbed::snapshot("west-1", 1, vec![], vec![vm("web", "intruder", 9)]);
    ws.send(send(&AgentMessage::Snapshot(Box::new(snap))))
        .await
        .unwrap();
    match next_hub_message(&mut ws).await {
        Some(HubMessage::Refused { code, .. }) => assert_eq!(code, "WRONG_CLUSTER"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        next_hub_message(&mut ws).await.is_none(),
        "the hub ends the session"
    );
    let resp = e
        .hub
        .gql(r#"{ cluster(name: "west-1") { name } }"#, json!({}))
        .await;
    assert_eq!(
        drover_e2e::testbed::error_code(&resp).as_deref(),
        Some("NOT_FOUND"),
        "nothing was written for west-1"
    );

    // An unsupported protocol version is refused with a hint.
    let mut ws = raw_session(&east, &e.base).await;
    ws.send(send(&hello("east-1", 99))).await.unwrap();
    match next_hub_message(&mut ws).await {
        Some(HubMessage::Refused { code, message, .. }) => {
            assert_eq!(code, "UNSUPPORTED_VERSION");
            assert!(message.contains("upgrade"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_session_replaces_an_older_one() {
    let e = endpoint("session_replace").await;
    let dir = tempfile::tempdir().unwrap();
    let east = join(&e.hub, &e.base, "east-1", dir.path()).await;
    let hello = hello("east-1", 1);
    let mut first = raw_session(&east, &e.base).await;
    first.send(send(&hello)).await.unwrap();
    assert!(matches!(
        next_hub_message(&mut first).await,
        Some(HubMessage::Welcome { .. })
    ));
    let mut second = raw_session(&east, &e.base).await;
    second.send(send(&hello)).await.unwrap();
    assert!(matches!(
        next_hub_message(&mut second).await,
        Some(HubMessage::Welcome { .. })
    ));
    match next_hub_message(&mut first).await {
        Some(HubMessage::Goodbye { reason }) => assert!(reason.contains("replaced"), "{reason}"),
        other => panic!("expected goodbye, got {other:?}"),
    }
    assert_eq!(e.hub.hub.sessions.live_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_cluster_revokes_its_agent_and_ends_its_session() {
    let e = endpoint("session_remove").await;
    let dir = tempfile::tempdir().unwrap();
    join(&e.hub, &e.base, "east-1", dir.path()).await;
    let cluster = TestCluster::new(vec![vm("web", "api-1", 1), vm("web", "api-2", 2)]);
    let mut agent = RunningAgent::start(dir.path(), &e.base, cluster);
    eventually("the snapshot in GraphQL", PATIENCE, async || {
        cluster_view(&e.hub, "east-1").await["virtualMachines"]["totalCount"] == 2
    })
    .await;

    // Not while a migration is in flight.
    let cluster_id = {
        use drover_hub::store::entities::cluster;
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
        cluster::Entity::find()
            .filter(cluster::Column::Name.eq("east-1"))
            .one(&e.hub.hub.store.db)
            .await
            .unwrap()
            .unwrap()
            .id
    };
    let migration_id = uuid::Uuid::now_v7();
    {
        use drover_hub::store::entities::migration;
        use sea_orm::{ActiveValue::Set, EntityTrait};
        let now = chrono::Utc::now();
        migration::Entity::insert(migration::ActiveModel {
            id: Set(migration_id),
            vm_namespace: Set("web".into()),
            vm_name: Set("api-1".into()),
            vm_uid: Set("uid-web-api-1".into()),
            source_cluster_id: Set(Some(cluster_id)),
            target_cluster_id: Set(Some(cluster_id)),
            source_cluster_name: Set("east-1".into()),
            target_cluster_name: Set("east-1".into()),
            target_namespace: Set("web".into()),
            storage_class_map: Set(json!({})),
            network_map: Set(json!({})),
            phase: Set("Running".into()),
            phase_timestamps: Set(json!({})),
            bytes_total: Set(0),
            bytes_transferred: Set(0),
            bytes_remaining: Set(0),
            dirty_rate_bytes_per_sec: Set(0),
            throughput_bytes_per_sec: Set(0),
            failure_reason: Set(None),
            attempt: Set(1),
            evacuation_id: Set(None),
            trace_id: Set(None),
            requested_by: Set("test".into()),
            created_at: Set(now),
            updated_at: Set(now),
            finished_at: Set(None),
            queue_position: Set(0),
            source_node: Set(String::new()),
            planned_bytes: Set(0),
            bandwidth_bytes_per_sec: Set(0),
            options: Set(None),
            switchover_at: Set(None),
        })
        .exec_without_returning(&e.hub.hub.store.db)
        .await
        .unwrap();
    }
    let remove = r#"mutation { removeCluster(name: "east-1") { cluster certificatesRevoked virtualMachinesForgotten sessionEnded } }"#;
    let refused = e.hub.gql(remove, json!({})).await;
    assert_eq!(
        drover_e2e::testbed::error_code(&refused).as_deref(),
        Some("CONFLICT"),
        "{refused}"
    );
    assert!(
        agent.status.borrow().connected,
        "a refused removal changes nothing"
    );
    // Once the migration has finished, removal goes ahead and its history stays.
    {
        use drover_hub::store::entities::migration;
        use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
        migration::Entity::update_many()
            .col_expr(migration::Column::Phase, "Succeeded".into())
            .filter(migration::Column::Id.eq(migration_id))
            .exec(&e.hub.hub.store.db)
            .await
            .unwrap();
    }

    let d = e.hub.data(remove, json!({})).await;
    assert_eq!(
        d["removeCluster"],
        json!({"cluster": "east-1", "certificatesRevoked": 1, "virtualMachinesForgotten": 2, "sessionEnded": true})
    );
    tokio::time::timeout(PATIENCE, agent.status.wait_for(|s| !s.connected))
        .await
        .expect("the agent is disconnected")
        .unwrap();
    // The agent's certificate no longer opens anything: it gives up and says why (a revoked
    // agent that kept retrying would never end).
    let task_ended = tokio::time::timeout(PATIENCE, &mut agent.task).await;
    assert!(task_ended.is_ok(), "a revoked agent stops retrying");
    let last_error = agent.status.borrow().last_error.clone().unwrap_or_default();
    assert!(last_error.contains("join again"), "{last_error}");
    let resp = e
        .hub
        .gql(r#"{ cluster(name: "east-1") { name } }"#, json!({}))
        .await;
    assert_eq!(
        drover_e2e::testbed::error_code(&resp).as_deref(),
        Some("NOT_FOUND"),
        "{resp}"
    );
    let err = AgentIdentity::load(dir.path())
        .unwrap()
        .check(&e.base)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");

    let history = e
        .hub
        .data(
            "query($id: ID!) { migration(id: $id) { phase sourceClusterName targetClusterName sourceCluster { name } } }",
            json!({"id": migration_id.to_string()}),
        )
        .await;
    assert_eq!(
        history["migration"],
        json!({"phase": "SUCCEEDED", "sourceClusterName": "east-1", "targetClusterName": "east-1", "sourceCluster": null}),
        "migration history outlives the cluster"
    );

    let again = e.hub.gql(remove, json!({})).await;
    assert_eq!(
        drover_e2e::testbed::error_code(&again).as_deref(),
        Some("NOT_FOUND"),
        "{again}"
    );
    let bad = e
        .hub
        .gql(
            r#"mutation { removeCluster(name: "Nope!") { cluster } }"#,
            json!({}),
        )
        .await;
    assert_eq!(
        drover_e2e::testbed::error_code(&bad).as_deref(),
        Some("INVALID_NAME"),
        "{bad}"
    );
}
