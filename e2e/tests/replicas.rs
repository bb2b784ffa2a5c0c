//! Two hub replicas on one PostgreSQL share an evacuation of real QEMU guests: each in-flight
//! migration is driven by the replica that holds its lease; the agents know both replicas. The
//! replica driving migrations is killed (-9) halfway; the other takes its migrations over when
//! their leases run out and finishes the evacuation: every VM moved exactly once, resumed on its
//! target, and the survivor's `migrationEvents` subscription saw every move, those the dead
//! replica made included.

use std::path::Path;
use std::time::{Duration, Instant};

use drover_e2e::agents::eventually;
use drover_e2e::guest_fleet::{assert_resumed, declare_guest, moves_seen, wait_until_counting};
use drover_e2e::postgres::PgCluster;
use drover_e2e::process::{AgentProcess, HubProcess, QemuReaper};
use drover_e2e::subscription::Subscription;
use drover_e2e::testbed::test_guest;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use serde_json::{json, Value};

/// Two guests: both in flight at once (one on each target), few migrations for the suite.
const VMS: usize = 2;
const LEASE_SECS: u64 = 5;
const REPLICAS: [&str; 2] = ["hub-a", "hub-b"];

/// Per-cluster slots (the agents report them) and the fleet's cap, as in the evacuation test.
fn limit(cluster: &str) -> &'static str {
    if cluster == "east-1" {
        "2"
    } else {
        "1"
    }
}

async fn start_hub(dir: &Path, url: &str, name: &str, ca_of: Option<&Path>) -> HubProcess {
    let lease = LEASE_SECS.to_string();
    let mut args = vec![
        "--heartbeat-interval-secs",
        "1",
        "--silence-limit-secs",
        "30",
        "--max-migrations-in-flight",
        "2",
        "--lease-secs",
        &lease,
        "--replica-name",
        name,
    ];
    let (cert, key);
    if let Some(first) = ca_of {
        cert = first.join("pki/ca.pem").display().to_string();
        key = first.join("pki/ca-key.pem").display().to_string();
        args.extend(["--ca-cert", &cert, "--ca-key", &key]);
    }
    HubProcess::start_with_args(dir, Some(url), 0, &args).await
}

/// In-flight migrations with the replica that holds each one's lease: (owner, id, phase,
/// bytes remaining, bytes total).
async fn leases(db: &DatabaseConnection) -> Vec<(String, String, String, i64, i64)> {
    let rows = db
        .query_all(Statement::from_string(
            DbBackend::Postgres,
            "SELECT l.owner, m.id::text AS id, m.phase, m.bytes_remaining, m.bytes_total \
             FROM migration_leases l JOIN migrations m ON m.id = l.migration_id \
             WHERE m.phase IN ('Scheduling', 'Scheduled', 'PreparingTarget', 'TargetReady', 'Running')",
        ))
        .await
        .unwrap_or_default();
    rows.iter()
        .map(|r| {
            (
                r.try_get("", "owner").unwrap(),
                r.try_get("", "id").unwrap(),
                r.try_get("", "phase").unwrap(),
                r.try_get("", "bytes_remaining").unwrap(),
                r.try_get("", "bytes_total").unwrap(),
            )
        })
        .collect()
}

async fn phase_of(db: &DatabaseConnection, id: &str) -> String {
    db.query_one(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT phase FROM migrations WHERE id::text = $1",
        [id.into()],
    ))
    .await
    .ok()
    .flatten()
    .and_then(|r| r.try_get::<String>("", "phase").ok())
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_halfway_through_an_evacuation_hands_its_migrations_to_the_other() {
    let guest = test_guest();
    let hub_dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let _reaper = QemuReaper(dirs.iter().map(|d| d.path().into()).collect());
    let (east_dir, west_dir, north_dir) = (dirs[0].path(), dirs[1].path(), dirs[2].path());
    for i in 0..VMS {
        declare_guest(east_dir, &guest, i);
    }
    let pg = PgCluster::shared().await.unwrap();
    let url = pg.create_database("replicas").await.unwrap();
    let db = Database::connect(&url).await.unwrap();
    let first = start_hub(hub_dirs[0].path(), &url, REPLICAS[0], None).await;
    let second = start_hub(
        hub_dirs[1].path(),
        &url,
        REPLICAS[1],
        Some(hub_dirs[0].path()),
    )
    .await;
    let mut hubs = [Some(first), Some(second)];
    let (a, b) = (hubs[0].as_ref().unwrap(), hubs[1].as_ref().unwrap());

    // A portal's subscription on each replica, from before anything moves.
    let query = "subscription { migrationEvents { vmName phase } }";
    let subscriptions = [
        Subscription::start(&a.base, &a.token, query).await.unwrap(),
        Subscription::start(&b.base, &b.token, query).await.unwrap(),
    ];

    // Each agent knows both replicas; east-1 (the source) starts on the second, the targets on
    // the first, so commands cross replicas from the start.
    let http = reqwest::Client::new();
    let mut agents = Vec::new();
    for (dir, cluster, order) in [
        (east_dir, "east-1", [b, a]),
        (west_dir, "west-1", [a, b]),
        (north_dir, "north-1", [a, b]),
    ] {
        let token = a.create_join_token(&http, cluster).await.unwrap();
        agents.push(
            AgentProcess::start_with_args(
                dir,
                &order[1].agents,
                Some((cluster, &token)),
                &[
                    "--parallel-migrations",
                    limit(cluster),
                    "--hub",
                    &order[0].agents,
                ],
            )
            .await,
        );
    }
    wait_until_counting(a, 3, "east-1", east_dir, VMS).await;

    let started = b
        .gql(
            r#"mutation { startEvacuation(input: {cluster: "east-1"}) { id } }"#,
            json!({}),
        )
        .await;
    let id = started["data"]["startEvacuation"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{started}"))
        .to_owned();

    // Halfway: a replica holds leases on migrations that are all transferring (none about to
    // end or to be admitted, so nothing it is about to tell the other is lost with it).
    let mut victim_and_held: Option<(usize, Vec<String>)> = None;
    eventually(
        "a replica driving migrations that are transferring",
        Duration::from_secs(600),
        async || {
            let now = leases(&db).await;
            let transferring = |l: &(String, String, String, i64, i64)| {
                l.2 == "Running" && l.4 > 0 && l.3 * 2 > l.4
            };
            if now.is_empty() || !now.iter().all(transferring) {
                return false;
            }
            let owner = now[0].0.clone();
            let index = REPLICAS.iter().position(|r| *r == owner).unwrap();
            let held = now
                .iter()
                .filter(|l| l.0 == owner)
                .map(|l| l.1.clone())
                .collect();
            victim_and_held = Some((index, held));
            true
        },
    )
    .await;
    let (victim, held) = victim_and_held.unwrap();
    let survivor = 1 - victim;
    let mut dead = hubs[victim].take().unwrap();
    dead.child.start_kill().unwrap();
    dead.child.wait().await.unwrap();
    let killed = Instant::now();
    eprintln!(
        "killed {} (-9) while it drove {} migration(s)",
        REPLICAS[victim],
        held.len()
    );
    let live = hubs[survivor].as_ref().unwrap();

    // The survivor takes every one of them over once their leases ran out.
    eventually(
        "the survivor driving the dead replica's migrations",
        Duration::from_secs(120),
        async || {
            let now = leases(&db).await;
            let mut all = true;
            for id in &held {
                let owner = now.iter().find(|l| &l.1 == id).map(|l| l.0.clone());
                let taken = match owner {
                    Some(owner) => owner == REPLICAS[survivor],
                    // Ended: only the survivor can have ended it.
                    None => phase_of(&db, id).await == "Succeeded",
                };
                all &= taken;
            }
            all
        },
    )
    .await;
    eprintln!(
        "lease takeover: {} drove them {:.1} s after the kill (lease {LEASE_SECS} s)",
        REPLICAS[survivor],
        killed.elapsed().as_secs_f64()
    );

    let mut last = Value::Null;
    eventually("the evacuation to end", Duration::from_secs(600), async || {
        last = live
            .gql(
                r#"query($id: ID!) { evacuation(id: $id) { state counters { succeeded failed } } }"#,
                json!({"id": id}),
            )
            .await;
        !last.is_null() && last["data"]["evacuation"]["state"] != "RUNNING"
    })
    .await;
    assert_eq!(last["data"]["evacuation"]["state"], "SUCCEEDED", "{last}");
    assert_eq!(last["data"]["evacuation"]["counters"]["succeeded"], VMS);

    let history = live
        .gql(
            r#"query($e: ID!) { migrations(first: 100, filter: {evacuationId: $e}) {
                edges { node { phase attempt virtualMachine { name } } } } }"#,
            json!({"e": id}),
        )
        .await;
    let migrations = history["data"]["migrations"]["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("{history}"))
        .clone();
    assert_eq!(migrations.len(), VMS, "one migration per VM: {history}");
    assert!(
        migrations
            .iter()
            .all(|m| m["node"]["phase"] == "SUCCEEDED" && m["node"]["attempt"] == 1),
        "every VM moved once, at the first attempt: {history}"
    );

    assert!(
        QemuReaper::running(east_dir).is_empty(),
        "nothing left on east-1"
    );
    for i in 0..VMS {
        let name = format!("app-{i}");
        let target = [west_dir, north_dir]
            .into_iter()
            .map(|d| d.join("vms/web").join(&name))
            .find(|d| d.exists())
            .unwrap_or_else(|| panic!("{name} runs somewhere"));
        assert_resumed(&name, &target).await;
    }

    // The survivor's subscription saw every move admitted and ended, whichever replica made it.
    let seen = moves_seen(&subscriptions[survivor].events());
    for i in 0..VMS {
        let name = format!("app-{i}");
        for phase in ["SCHEDULED", "SUCCEEDED"] {
            assert!(
                seen.iter().any(|(vm, p)| *vm == name && p == phase),
                "the survivor's subscription did not see {name} {phase}: {seen:?}"
            );
        }
    }
    let metrics = live.metrics(&http).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("drover_lease_takeovers_total") && !l.ends_with(" 0")),
        "the survivor counted its takeovers:\n{metrics}"
    );
    drop(agents);
}
