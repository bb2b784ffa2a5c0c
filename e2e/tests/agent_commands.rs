//! Durable hub -> agent commands over the real session and real mutual TLS, on PostgreSQL and
//! SQLite: a VM lifecycle mutation reaches the agent and answers with its outcome; a repeated
//! idempotency key never runs twice (also after a lost acknowledgement and an agent restart);
//! a command for an offline agent waits on the hub and runs when it comes back; a command for
//! one cluster never reaches another.

use std::sync::atomic::Ordering;
use std::time::Duration;

use drover_e2e::agents::{eventually, join, RunningAgent};
use drover_e2e::testbed::{error_code, vm, AgentEndpoint, Backend, TestCluster, TestHub};
use drover_hub::agents::sessions::SessionTiming;
use sea_orm::ConnectionTrait;
use serde_json::{json, Value};

/// Frequent heartbeats, but a silence limit far above any pause a loaded machine causes: no
/// test here waits for silence, and a session dropped by accident would re-send commands
/// (`sendCount` > 1) and run them on a new session.
const TIMING: SessionTiming = SessionTiming {
    heartbeat_interval: Duration::from_secs(1),
    silence_limit: Duration::from_secs(30),
    hello_timeout: Duration::from_secs(30),
};

/// How long to wait for something that will happen (a loaded CI machine can be slow).
const PATIENCE: Duration = Duration::from_secs(60);

const CREATE: &str = r#"mutation($input: CreateVirtualMachineInput!) {
  createVirtualMachine(input: $input) {
    cluster idempotencyKey kind state message sendCount acknowledgedAt
  }
}"#;

const START: &str = r#"mutation($c: String!, $ns: String!, $n: String!, $key: String, $wait: Int!) {
  startVirtualMachine(cluster: $c, namespace: $ns, name: $n, idempotencyKey: $key, waitSeconds: $wait) {
    idempotencyKey kind state message sendCount
  }
}"#;

const STOP: &str = r#"mutation($c: String!, $ns: String!, $n: String!, $key: String) {
  stopVirtualMachine(cluster: $c, namespace: $ns, name: $n, gracePeriodSeconds: 0, idempotencyKey: $key, waitSeconds: 1) {
    idempotencyKey kind state message
  }
}"#;

async fn vm_phase(hub: &TestHub, cluster: &str, ns: &str, name: &str) -> Value {
    hub.gql(
        "query($c: String!, $ns: String!, $n: String!) {
           virtualMachine(cluster: $c, namespace: $ns, name: $n) { phase memoryBytes interfaces { macAddress } } }",
        json!({"c": cluster, "ns": ns, "n": name}),
    )
    .await["data"]["virtualMachine"]
        .clone()
}

async fn command_state(hub: &TestHub, cluster: &str, key: &str) -> Value {
    hub.gql(
        "query($c: String!, $k: String!) { agentCommand(cluster: $c, idempotencyKey: $k) { state message sendCount } }",
        json!({"c": cluster, "k": key}),
    )
    .await["data"]["agentCommand"]
        .clone()
}

async fn commands_travel_durably_and_run_at_most_once(backend: Backend, name: &str) {
    let e = AgentEndpoint::start_on(backend, name, Some(TIMING))
        .await
        .unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    join(&e.hub, &e.base, "east-1", dir_a.path()).await;
    join(&e.hub, &e.base, "west-1", dir_b.path()).await;
    let east = TestCluster::new(vec![vm("web", "api-1", 1)]);
    let west = TestCluster::new(vec![vm("web", "db-1", 2)]);
    let agent_a = RunningAgent::start(dir_a.path(), &e.base, east.clone());
    let agent_b = RunningAgent::start(dir_b.path(), &e.base, west.clone());
    eventually("both clusters in the fleet", PATIENCE, async || {
        !vm_phase(&e.hub, "east-1", "web", "api-1").await.is_null()
            && !vm_phase(&e.hub, "west-1", "web", "db-1").await.is_null()
    })
    .await;

    // Create by command: the mutation answers with the agent's outcome, and the VM shows up.
    let input = json!({
        "cluster": "east-1", "namespace": "web", "name": "api-2",
        "memoryBytes": 268435456, "vcpus": 1,
        "disks": [{"name": "root", "sizeBytes": 67108864}],
        "interfaces": [{"name": "nic0"}],
        "idempotencyKey": "create-api-2",
    });
    let created = e.hub.gql(CREATE, json!({ "input": input })).await;
    let c = &created["data"]["createVirtualMachine"];
    assert_eq!(c["state"], "SUCCEEDED", "{created}");
    assert_eq!(c["kind"], "createVm");
    assert_eq!(c["sendCount"], 1);
    eventually("the created VM in GraphQL", PATIENCE, async || {
        vm_phase(&e.hub, "east-1", "web", "api-2").await["phase"] == "RUNNING"
    })
    .await;
    let mac = vm_phase(&e.hub, "east-1", "web", "api-2").await["interfaces"][0]["macAddress"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        mac.starts_with("02:"),
        "a derived, locally administered MAC: {mac}"
    );

    // The same key again: the same command, not a second VM.
    let again = e.hub.gql(CREATE, json!({ "input": input })).await;
    assert_eq!(again["data"]["createVirtualMachine"]["state"], "SUCCEEDED");
    assert_eq!(east.executed.load(Ordering::SeqCst), 1);
    // The same key for something else is refused.
    let mut other = input.clone();
    other["memoryBytes"] = json!(536870912);
    let reused = e.hub.gql(CREATE, json!({ "input": other })).await;
    assert_eq!(error_code(&reused).as_deref(), Some("CONFLICT"), "{reused}");

    // A lost acknowledgement: the hub re-sends, the agent answers from its journal without
    // running it again — also after the agent restarted.
    agent_a.stop().await;
    let agent_a = RunningAgent::start(dir_a.path(), &e.base, east.clone());
    // Connected and past its snapshot, so the re-send comes from the sweep, not the reconnect.
    eventually("the restarted agent's session", PATIENCE, async || {
        agent_a.status.borrow().applied_generation.is_some()
    })
    .await;
    e.hub
        .hub
        .store
        .db
        .execute_unprepared(
            "UPDATE agent_commands SET state = 'Pending', acked_at = NULL, result_message = NULL \
             WHERE idempotency_key = 'create-api-2'",
        )
        .await
        .unwrap();
    eventually(
        "the re-sent command acknowledged again",
        PATIENCE,
        async || command_state(&e.hub, "east-1", "create-api-2").await["state"] == "SUCCEEDED",
    )
    .await;
    assert_eq!(east.executed.load(Ordering::SeqCst), 1, "ran at most once");
    assert!(
        command_state(&e.hub, "east-1", "create-api-2").await["sendCount"]
            .as_i64()
            .unwrap()
            >= 2
    );

    // An offline agent: the command waits on the hub, answers PENDING, runs when it is back.
    agent_a.stop().await;
    let stop = e
        .hub
        .gql(
            STOP,
            json!({"c": "east-1", "ns": "web", "n": "api-1", "key": "stop-api-1"}),
        )
        .await;
    let pending = e
        .hub
        .gql(
            START,
            json!({"c": "east-1", "ns": "web", "n": "api-2", "key": "start-api-2", "wait": 1}),
        )
        .await;
    assert_eq!(
        pending["data"]["startVirtualMachine"]["state"], "PENDING",
        "{pending}"
    );
    assert_eq!(
        stop["data"]["stopVirtualMachine"]["state"], "PENDING",
        "{stop}"
    );
    assert_eq!(east.executed.load(Ordering::SeqCst), 1);
    let agent_a = RunningAgent::start(dir_a.path(), &e.base, east.clone());
    eventually(
        "pending commands run after reconnect",
        PATIENCE,
        async || {
            command_state(&e.hub, "east-1", "stop-api-1").await["state"] == "SUCCEEDED"
                && command_state(&e.hub, "east-1", "start-api-2").await["state"] == "SUCCEEDED"
        },
    )
    .await;
    eventually("api-1 stopped in GraphQL", PATIENCE, async || {
        vm_phase(&e.hub, "east-1", "web", "api-1").await["phase"] == "STOPPED"
    })
    .await;
    assert_eq!(east.executed.load(Ordering::SeqCst), 3);

    // A failing command reports why; commands never cross to another cluster. (The mutation
    // answers as soon as the agent does; the long wait only matters on a slow machine.)
    let missing = e
        .hub
        .gql(
            START,
            json!({"c": "east-1", "ns": "web", "n": "nope", "key": null, "wait": 120}),
        )
        .await;
    let m = &missing["data"]["startVirtualMachine"];
    assert_eq!(m["state"], "FAILED", "{missing}");
    assert!(
        m["message"].as_str().unwrap().contains("web/nope"),
        "{missing}"
    );
    assert_eq!(
        west.executed.load(Ordering::SeqCst),
        0,
        "west never got east's commands"
    );

    // Bad input is refused before anything is stored.
    let unknown = e
        .hub
        .gql(
            START,
            json!({"c": "north-9", "ns": "web", "n": "api-1", "key": null, "wait": 0}),
        )
        .await;
    assert_eq!(
        error_code(&unknown).as_deref(),
        Some("NOT_FOUND"),
        "{unknown}"
    );
    let mut bad = input.clone();
    bad["idempotencyKey"] = json!("bad-1");
    bad["interfaces"] = json!([{"name": "nic0", "macAddress": "zz"}]);
    let refused = e.hub.gql(CREATE, json!({ "input": bad })).await;
    assert_eq!(
        error_code(&refused).as_deref(),
        Some("BAD_USER_INPUT"),
        "{refused}"
    );
    let mut bad = input.clone();
    bad["idempotencyKey"] = json!("bad-2");
    bad["vcpus"] = json!(0);
    let refused = e.hub.gql(CREATE, json!({ "input": bad })).await;
    assert_eq!(
        error_code(&refused).as_deref(),
        Some("BAD_USER_INPUT"),
        "{refused}"
    );
    assert!(command_state(&e.hub, "east-1", "bad-1").await.is_null());
    assert!(command_state(&e.hub, "east-1", "bad-2").await.is_null());

    agent_a.stop().await;
    agent_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_postgres() {
    commands_travel_durably_and_run_at_most_once(Backend::Postgres, "commands_pg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_sqlite() {
    commands_travel_durably_and_run_at_most_once(Backend::Sqlite, "commands_sqlite").await;
}
