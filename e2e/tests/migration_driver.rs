//! The hub's migration driver after an interruption, with a real agent session (in-process
//! agent, real mutual TLS) on PostgreSQL and SQLite: a migration whose `Running` was recorded
//! but whose send was never stored (the database or the hub went away in between) sends it when
//! its driver resumes, instead of failing an attempt that never moved anything; one that an
//! operator cancelled meanwhile ends with the cancel's reason and sends nothing. And the leases
//! that let several hub replicas share the drivers: one holder per migration, taken over only
//! once its holder stopped renewing, given back at once by a replica that stops.

use std::time::Duration;

use drover_e2e::agents::{eventually, join, RunningAgent};
use drover_e2e::on_both_backends;
use drover_e2e::testbed::{node, snapshot, vm, AgentEndpoint, Backend, TestCluster, TestHub};
use drover_hub::agents::sessions::SessionTiming;
use drover_hub::orchestration::migrations::QueuedMigration;
use drover_hub::store::entities::{cluster, migration};
use drover_hub::store::leases::Leases;
use drover_shared::migration::MigrationOptions;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::json;
use uuid::Uuid;

on_both_backends!(
    a_resumed_driver_sends_what_was_never_sent,
    a_lease_has_one_holder_and_passes_on_only_when_it_runs_out,
    a_cancel_is_refused_once_the_switchover_began,
    a_target_that_never_answers_fails_at_the_prepare_timeout_in_virtual_time
);

const TIMING: SessionTiming = SessionTiming {
    heartbeat_interval: Duration::from_secs(1),
    silence_limit: Duration::from_secs(30),
    hello_timeout: Duration::from_secs(30),
};

const PATIENCE: Duration = Duration::from_secs(60);

async fn cluster_id(e: &AgentEndpoint, name: &str) -> Uuid {
    cluster::Entity::find()
        .filter(cluster::Column::Name.eq(name))
        .one(&e.hub.hub.store.db)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{name} is in the fleet"))
        .id
}

/// A migration of `web/<name>` from east-1 to west-1, left in `Running` without its send.
async fn running_without_send(e: &AgentEndpoint, name: &str, cancel_reason: Option<&str>) -> Uuid {
    let phases = [
        "Pending",
        "Scheduled",
        "PreparingTarget",
        "TargetReady",
        "Running",
    ];
    left_in(e, name, &phases, cancel_reason).await
}

/// A migration of `web/<name>` from east-1 to west-1, left in the last of `phases` (each
/// stamped now, on the hub's clock), with no driver.
async fn left_in(
    e: &AgentEndpoint,
    name: &str,
    phases: &[&str],
    cancel_reason: Option<&str>,
) -> Uuid {
    let (east, west) = (cluster_id(e, "east-1").await, cluster_id(e, "west-1").await);
    let migrations = &e.hub.hub.migrations;
    let id = migrations
        .enqueue(
            QueuedMigration {
                vm_uid: format!("uid-web-{name}"),
                namespace: "web".into(),
                name: name.into(),
                source_cluster: (east, "east-1".into()),
                target_cluster: (west, "west-1".into()),
                target_namespace: "web".into(),
                source_node: "node-a".into(),
                planned_bytes: 1 << 30,
                options: MigrationOptions {
                    bandwidth_bytes_per_sec: 0,
                    allow_auto_converge: false,
                    allow_post_copy: false,
                    completion_timeout_per_gib: 150,
                    progress_timeout_secs: 150,
                },
                evacuation_id: None,
                queue_position: 0,
                attempt: 1,
            },
            "test",
        )
        .await
        .unwrap();
    let now = e.hub.clock.now();
    let stamps: serde_json::Map<String, serde_json::Value> = phases
        .iter()
        .map(|p| ((*p).to_owned(), json!(now)))
        .collect();
    migration::Entity::update_many()
        .col_expr(migration::Column::Phase, phases[phases.len() - 1].into())
        .col_expr(migration::Column::PhaseTimestamps, json!(stamps).into())
        .col_expr(
            migration::Column::FailureReason,
            cancel_reason.map(str::to_owned).into(),
        )
        .filter(migration::Column::Id.eq(id))
        .exec(&e.hub.hub.store.db)
        .await
        .unwrap();
    id
}

async fn row(e: &AgentEndpoint, id: Uuid) -> migration::Model {
    migration::Entity::find_by_id(id)
        .one(&e.hub.hub.store.db)
        .await
        .unwrap()
        .unwrap()
}

async fn a_resumed_driver_sends_what_was_never_sent(b: Backend) {
    let e = AgentEndpoint::start_on(b, "driver_resume", Some(TIMING))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    join(&e.hub, &e.base, "east-1", dir.path()).await;
    // The source's agent answers every command; a test cluster cannot send a VM, so the send
    // reaching it shows as its refusal in the migration's failure reason.
    let east = TestCluster::new(vec![vm("web", "api-1", 1), vm("web", "api-2", 2)]);
    let agent = RunningAgent::start(dir.path(), &e.base, east.clone());
    let mut west = snapshot("west-1", 1, vec![node("node-a", 64, 32)], Vec::new());
    west.info.sync_endpoint = Some("west-1.example:9185".into());
    e.hub.hub.ingest.apply_snapshot(&west).await.unwrap();
    eventually("east-1 in the fleet", PATIENCE, async || {
        cluster::Entity::find()
            .filter(cluster::Column::Name.eq("east-1"))
            .one(&e.hub.hub.store.db)
            .await
            .unwrap()
            .is_some()
    })
    .await;

    let unsent = running_without_send(&e, "api-1", None).await;
    let cancelled = running_without_send(&e, "api-2", Some("cancelled by alice")).await;
    e.hub.hub.migrations.resume().await.unwrap();
    eventually("both migrations ended", PATIENCE, async || {
        row(&e, unsent).await.phase == "Failed" && row(&e, cancelled).await.phase == "Failed"
    })
    .await;

    let sent = row(&e, unsent).await;
    assert!(
        sent.failure_reason
            .as_deref()
            .unwrap_or_default()
            .contains("cannot run sendVm"),
        "the send went out to the source's agent: {:?}",
        sent.failure_reason
    );
    let stopped = row(&e, cancelled).await;
    assert_eq!(
        stopped.failure_reason.as_deref(),
        Some("cancelled by alice")
    );
    let send_of_cancelled = e
        .hub
        .hub
        .commands
        .get("east-1", &format!("{cancelled}/send"))
        .await
        .unwrap();
    assert!(
        send_of_cancelled.is_none(),
        "a cancelled migration's send never goes out"
    );
    agent.stop().await;
}

/// Replica clocks are passed in: the lease's expiry is tested in virtual time.
async fn a_lease_has_one_holder_and_passes_on_only_when_it_runs_out(b: Backend) {
    let e = AgentEndpoint::start_on(b, "driver_leases", Some(TIMING))
        .await
        .unwrap();
    let mut west = snapshot("west-1", 1, vec![node("node-a", 64, 32)], Vec::new());
    west.info.sync_endpoint = Some("west-1.example:9185".into());
    e.hub.hub.ingest.apply_snapshot(&west).await.unwrap();
    let mut east = snapshot("east-1", 1, vec![node("node-a", 64, 32)], Vec::new());
    east.info.sync_endpoint = Some("east-1.example:9185".into());
    e.hub.hub.ingest.apply_snapshot(&east).await.unwrap();
    let first = running_without_send(&e, "api-1", None).await;
    let second = running_without_send(&e, "api-2", None).await;
    leases_pass_on(&e.hub, first, second).await;
}

async fn leases_pass_on(hub: &TestHub, first: Uuid, second: Uuid) {
    let store = hub.hub.store.clone();
    let lease = Duration::from_secs(10);
    let a = Leases::new(store.clone(), "hub-a".into(), lease);
    let b = Leases::new(store.clone(), "hub-b".into(), lease);
    let t0 = chrono::Utc::now();
    let at = |secs: i64| t0 + chrono::Duration::seconds(secs);
    let sorted = |mut ids: Vec<Uuid>| {
        ids.sort();
        ids
    };
    let both = sorted(vec![first, second]);

    let claim = a.claim(at(0)).await.unwrap();
    assert_eq!(sorted(claim.held), both, "the first replica takes both");
    assert!(claim.taken_over.is_empty(), "nobody held them before");
    let claim = b.claim(at(1)).await.unwrap();
    assert!(claim.held.is_empty(), "a held lease is not shared");
    assert_eq!(sorted(claim.elsewhere), both);

    // A renews; B finds it held until 10 s after the renewal, not after the first claim.
    assert_eq!(a.claim(at(5)).await.unwrap().held.len(), 2);
    assert!(
        b.claim(at(12)).await.unwrap().held.is_empty(),
        "renewed at 5 s, held until 15 s"
    );

    // A stops renewing: B takes both over once the lease ran out, and says from whom.
    let claim = b.claim(at(16)).await.unwrap();
    assert_eq!(sorted(claim.held), both);
    let mut from: Vec<(Uuid, String)> = claim.taken_over;
    from.sort();
    assert_eq!(
        from,
        both.iter()
            .map(|id| (*id, "hub-a".to_owned()))
            .collect::<Vec<_>>()
    );
    // A, back, learns it holds nothing any more: its drivers stop.
    let claim = a.claim(at(17)).await.unwrap();
    assert!(claim.held.is_empty());
    assert_eq!(sorted(claim.elsewhere), both);
    // Renewing is not taking over again.
    assert!(b.claim(at(20)).await.unwrap().taken_over.is_empty());

    // A migration that ended is nobody's to drive: its lease is gone.
    migration::Entity::update_many()
        .col_expr(migration::Column::Phase, "Succeeded".into())
        .filter(migration::Column::Id.eq(first))
        .exec(&store.db)
        .await
        .unwrap();
    let claim = b.claim(at(21)).await.unwrap();
    assert_eq!(claim.held, vec![second]);
    assert!(a.claim(at(21)).await.unwrap().elsewhere == vec![second]);

    // A replica that stops gives its leases back: the other takes over at once.
    assert_eq!(b.release_all().await.unwrap(), 1);
    let claim = a.claim(at(22)).await.unwrap();
    assert_eq!(claim.held, vec![second]);
    assert_eq!(claim.taken_over, vec![(second, "hub-b".to_owned())]);
}

/// The source reported its switchover (the agent's status): a cancel is refused and says why;
/// the migration keeps no cancel reason.
async fn a_cancel_is_refused_once_the_switchover_began(b: Backend) {
    let e = AgentEndpoint::start_on(b, "switchover_cancel", Some(TIMING))
        .await
        .unwrap();
    for name in ["east-1", "west-1"] {
        let mut s = snapshot(name, 1, vec![node("node-a", 64, 32)], Vec::new());
        s.info.sync_endpoint = Some(format!("{name}.example:9185"));
        e.hub.hub.ingest.apply_snapshot(&s).await.unwrap();
    }
    let id = running_without_send(&e, "api-1", None).await;
    let status = drover_shared::migration::MigrationStatus {
        migration_id: drover_shared::MigrationId(id),
        phase: drover_shared::inventory::MigrationPhase::Running,
        progress: None,
        message: None,
        switchover: true,
        cluster: drover_shared::ClusterName::new("east-1").unwrap(),
    };
    let (events, _) = tokio::sync::broadcast::channel(8);
    drover_hub::orchestration::migrations::record_status(
        &e.hub.hub.store,
        &events,
        e.hub.hub.commands.replicas(),
        &status.cluster,
        &status,
    )
    .await
    .unwrap();
    let refused = e
        .hub
        .gql(
            "mutation($id: ID!) { cancelMigration(id: $id) { phase } }",
            json!({"id": id.to_string()}),
        )
        .await;
    let message = drover_e2e::testbed::error_message(&refused);
    assert!(
        message.contains("switchover began"),
        "the cancel is refused with the reason: {refused}"
    );
    let after = row(&e, id).await;
    assert_eq!(after.phase, "Running");
    assert_eq!(after.failure_reason, None, "no cancel was recorded");
}

/// The prepare timeout (300 s) in virtual time: the target's agent is away, its command stays
/// unanswered; nothing fails while the hub's clock stands still, and the migration fails with
/// the timeout's reason as soon as the clock is moved past it.
async fn a_target_that_never_answers_fails_at_the_prepare_timeout_in_virtual_time(b: Backend) {
    let e = AgentEndpoint::start_on(b, "prepare_timeout", Some(TIMING))
        .await
        .unwrap();
    for name in ["east-1", "west-1"] {
        let mut s = snapshot(name, 1, vec![node("node-a", 64, 32)], Vec::new());
        s.info.sync_endpoint = Some(format!("{name}.example:9185"));
        e.hub.hub.ingest.apply_snapshot(&s).await.unwrap();
    }
    e.hub.clock.pause();
    let id = left_in(&e, "api-1", &["Pending", "Scheduled"], None).await;
    e.hub.hub.migrations.resume().await.unwrap();
    // The driver records the phase, then stores the command for the target.
    eventually("the target was asked to prepare", PATIENCE, async || {
        row(&e, id).await.phase == "PreparingTarget"
            && e.hub
                .hub
                .commands
                .get("west-1", &format!("{id}/prepare-receiver"))
                .await
                .unwrap()
                .is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        row(&e, id).await.phase,
        "PreparingTarget",
        "no time passed on the hub's clock: still waiting"
    );
    e.hub
        .clock
        .advance(drover_hub::core::lifecycle::PREPARE_TIMEOUT + Duration::from_secs(1));
    eventually(
        "the migration failed at its timeout",
        Duration::from_secs(20),
        async || row(&e, id).await.phase == "Failed",
    )
    .await;
    let failed = row(&e, id).await;
    assert_eq!(
        failed.failure_reason.as_deref(),
        Some("the target was not ready within 300 s"),
        "{failed:?}"
    );
    e.hub
        .hub
        .migrations
        .stop_drivers(Duration::from_secs(10))
        .await;
}
