//! The hub's migration driver after an interruption, with a real agent session (in-process
//! agent, real mutual TLS) on PostgreSQL and SQLite: a migration whose `Running` was recorded
//! but whose send was never stored (the database or the hub went away in between) sends it when
//! its driver resumes, instead of failing an attempt that never moved anything; one that an
//! operator cancelled meanwhile ends with the cancel's reason and sends nothing.

use std::time::Duration;

use drover_e2e::agents::{eventually, join, RunningAgent};
use drover_e2e::on_both_backends;
use drover_e2e::testbed::{node, snapshot, vm, AgentEndpoint, Backend, TestCluster};
use drover_hub::migrations::QueuedMigration;
use drover_hub::sessions::SessionTiming;
use drover_hub::store::entities::{cluster, migration};
use drover_shared::migration::MigrationOptions;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::json;
use uuid::Uuid;

on_both_backends!(a_resumed_driver_sends_what_was_never_sent);

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
    let now = chrono::Utc::now();
    migration::Entity::update_many()
        .col_expr(migration::Column::Phase, "Running".into())
        .col_expr(
            migration::Column::PhaseTimestamps,
            json!({"Pending": now, "Scheduled": now, "PreparingTarget": now, "TargetReady": now, "Running": now}).into(),
        )
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
