//! An evacuation with real processes and real QEMU guests on a real PostgreSQL: six running
//! VMs leave a cluster for two others with one mutation, under per-cluster limits, while the
//! database is stopped and started again with migrations in flight (the hub carries on without
//! a restart) and then the hub is killed (-9) and restarted. Every VM ends running elsewhere,
//! moved exactly once, without a reboot; the phase timestamps the hub recorded show no limit
//! was ever exceeded; the evacuated (cordoned) cluster received nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_e2e::agents::eventually;
use drover_e2e::guest_fleet::{assert_resumed, declare_guest, vms_on, wait_until_counting};
use drover_e2e::postgres::PgCluster;
use drover_e2e::process::{AgentProcess, HubProcess, QemuReaper};
use drover_e2e::prometheus::Prometheus;
use drover_e2e::testbed::test_guest;
use serde_json::{json, Value};

const VMS: usize = 6;
/// Migrations each cluster takes part in at once (the agents report it; the hub keeps to it).
const LIMITS: [(&str, usize); 3] = [("east-1", 2), ("west-1", 1), ("north-1", 1)];
const MAX_IN_FLIGHT: usize = 2;

/// Heartbeats every second, but a silence limit (30 s) that six TCG guests migrating on a
/// busy 2-core machine never trip by accident: a cluster that turned Unreachable for a late
/// heartbeat would hold up or fail the evacuation. Nothing here waits for silence.
fn hub_args() -> Vec<String> {
    [
        "--heartbeat-interval-secs",
        "1",
        "--silence-limit-secs",
        "30",
        "--max-migrations-in-flight",
        &MAX_IN_FLIGHT.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn gql(hub: &HubProcess, query: &str, variables: Value) -> Value {
    hub.gql(query, variables).await
}

async fn start_agent(
    dir: &Path,
    hub: &HubProcess,
    cluster: &str,
    token: Option<&str>,
) -> AgentProcess {
    let limit = LIMITS
        .iter()
        .find(|l| l.0 == cluster)
        .unwrap()
        .1
        .to_string();
    AgentProcess::start_with_args(
        dir,
        &hub.agents,
        token.map(|t| (cluster, t)),
        &["--parallel-migrations", &limit],
    )
    .await
}

const EVACUATION: &str = r#"query($id: ID!) { evacuation(id: $id) { state
  counters { planned queued running succeeded failed cannotMove } } }"#;

const MIGRATIONS: &str = r#"query($e: ID!) { migrations(first: 100, filter: {evacuationId: $e}) {
  edges { node { id phase attempt virtualMachine { name } sourceClusterName targetClusterName failureReason
  phaseTimestamps { phase at } } } } }"#;

/// Every migration's [admitted, ended) interval never overlaps more of them than a limit allows.
fn assert_limits_kept(migrations: &[Value]) {
    let mut events: Vec<(DateTime<Utc>, i32, String, String)> = Vec::new();
    for m in migrations {
        let stamps: BTreeMap<String, DateTime<Utc>> = m["phaseTimestamps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["phase"].as_str().unwrap().to_owned(),
                    p["at"].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect();
        let admitted = stamps["SCHEDULED"];
        let ended = stamps
            .get("SUCCEEDED")
            .or(stamps.get("FAILED"))
            .copied()
            .expect("every migration ended");
        let (s, t) = (
            m["sourceClusterName"].as_str().unwrap().to_owned(),
            m["targetClusterName"].as_str().unwrap().to_owned(),
        );
        events.push((admitted, 1, s.clone(), t.clone()));
        events.push((ended, -1, s, t));
    }
    // Ends before starts at the same instant: a freed slot may be taken at once.
    events.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut per: BTreeMap<String, i32> = BTreeMap::new();
    let mut total = 0;
    let mut peak: BTreeMap<String, i32> = BTreeMap::new();
    for (at, delta, s, t) in events {
        total += delta;
        assert!(total <= MAX_IN_FLIGHT as i32, "{total} in flight at {at}");
        for c in [s, t] {
            let n = per.entry(c.clone()).or_default();
            *n += delta;
            let limit = LIMITS.iter().find(|l| l.0 == c).unwrap().1 as i32;
            assert!(
                *n <= limit,
                "{c} took part in {n} migrations at {at} (limit {limit})"
            );
            let p = peak.entry(c).or_default();
            *p = (*p).max(*n);
        }
    }
    // The slots were used: the source ran two at once at some point.
    assert_eq!(peak["east-1"], 2, "east-1's slots were kept full: {peak:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_is_evacuated_under_its_limits_across_a_database_outage_and_a_hub_crash() {
    let guest = test_guest();
    let hub_dir = tempfile::tempdir().unwrap();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let _reaper = QemuReaper(dirs.iter().map(|d| d.path().into()).collect());
    let (east_dir, west_dir, north_dir) = (dirs[0].path(), dirs[1].path(), dirs[2].path());
    for i in 0..VMS {
        declare_guest(east_dir, &guest, i);
    }
    let pg = PgCluster::start_dedicated().await.unwrap();
    let url = pg.create_database("evacuation").await.unwrap();
    let args = hub_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut hub = HubProcess::start_with_args(hub_dir.path(), Some(&url), 0, &args).await;
    let agent_port: u16 = hub.agents.rsplit(':').next().unwrap().parse().unwrap();
    // An operator's Prometheus scrapes the hub all along (the restarted hub too).
    let target = |hub: &HubProcess| hub.url("").trim_start_matches("http://").to_owned();
    let mut prometheus = Prometheus::start(&target(&hub)).await.unwrap();
    let http = reqwest::Client::new();
    let mut agents = Vec::new();
    for (dir, cluster) in [
        (east_dir, "east-1"),
        (west_dir, "west-1"),
        (north_dir, "north-1"),
    ] {
        let token = hub.create_join_token(&http, cluster).await.unwrap();
        agents.push(start_agent(dir, &hub, cluster, Some(&token)).await);
    }
    wait_until_counting(&hub, 3, "east-1", east_dir, VMS).await;

    // The dry run: every VM has a target, the limits are stated.
    let plan = gql(
        &hub,
        r#"mutation { planEvacuation(input: {cluster: "east-1"}) { moves { name targetCluster }
           cannotMove { name reasons } estimatedDurationSeconds
           limits { maxInFlight clusters { cluster parallelMigrationsPerCluster } } } }"#,
        json!({}),
    )
    .await;
    let p = &plan["data"]["planEvacuation"];
    assert_eq!(p["moves"].as_array().map(Vec::len), Some(VMS), "{plan}");
    assert_eq!(p["cannotMove"], json!([]), "{plan}");
    assert_eq!(p["limits"]["maxInFlight"], MAX_IN_FLIGHT);
    assert!(p["estimatedDurationSeconds"].as_f64().unwrap() > 0.0);

    let started = gql(
        &hub,
        r#"mutation { startEvacuation(input: {cluster: "east-1"}) { id state counters { planned } } }"#,
        json!({}),
    )
    .await;
    let id = started["data"]["startEvacuation"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{started}"))
        .to_owned();
    assert_eq!(
        started["data"]["startEvacuation"]["counters"]["planned"],
        VMS
    );

    // With migrations in flight after the first move: the database goes away and comes back.
    // The drivers and the scheduler wait it out and carry on, without a hub restart.
    let succeeded = async |hub: &HubProcess| {
        gql(hub, EVACUATION, json!({"id": id})).await["data"]["evacuation"]["counters"]["succeeded"]
            .as_i64()
    };
    eventually(
        "the first move done and the next ones in flight",
        Duration::from_secs(600),
        async || {
            let e = gql(&hub, EVACUATION, json!({"id": id})).await;
            let c = &e["data"]["evacuation"]["counters"];
            c["succeeded"].as_i64().is_some_and(|n| n >= 1)
                && c["running"].as_i64().is_some_and(|n| n >= 1)
        },
    )
    .await;
    let before_outage = succeeded(&hub).await.unwrap_or_default();
    pg.stop().await.unwrap();
    // Long enough for every driver and the scheduler to fail against it several times.
    tokio::time::sleep(Duration::from_secs(8)).await;
    pg.start().await.unwrap();
    let back = std::time::Instant::now();
    // Recovery, read from the hub's /metrics every 100 ms: the first scheduling round that
    // succeeds, every driver resumed (none waits for the database), the first admission.
    let counter = |metrics: &str, name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let at_back = hub.metrics(&http).await;
    let (rounds_before, admitted_before) = (
        counter(&at_back, "drover_scheduler_rounds_total"),
        counter(&at_back, "drover_admission_wait_seconds_count"),
    );
    let (mut first_round, mut drivers_resumed, mut first_admission) = (None, None, None);
    while back.elapsed() < Duration::from_secs(30)
        && (first_round.is_none() || drivers_resumed.is_none() || first_admission.is_none())
    {
        let m = hub.metrics(&http).await;
        let now = back.elapsed().as_secs_f64();
        if first_round.is_none() && counter(&m, "drover_scheduler_rounds_total") > rounds_before {
            first_round = Some(now);
        }
        if drivers_resumed.is_none()
            && counter(&m, "drover_migration_driver_retries_total") > 0.0
            && counter(&m, "drover_migration_drivers_waiting") == 0.0
        {
            drivers_resumed = Some(now);
        }
        if first_admission.is_none()
            && counter(&m, "drover_admission_wait_seconds_count") > admitted_before
        {
            first_admission = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "recovery after the database came back: first scheduling round {first_round:?} s, every driver resumed {drivers_resumed:?} s, first admission {first_admission:?} s"
    );
    eventually(
        "moves completing after the database came back",
        Duration::from_secs(600),
        async || {
            succeeded(&hub)
                .await
                .is_some_and(|n| n > before_outage && n >= 3)
        },
    )
    .await;
    eprintln!(
        "a move completed {:.1} s after the database came back",
        back.elapsed().as_secs_f64()
    );
    // What the hub went through (its /metrics): drivers and scheduler rounds that failed
    // against the missing database and were retried.
    let metrics = hub.metrics(&http).await;
    for line in metrics.lines().filter(|l| {
        l.starts_with("drover_migration_driver_retries_total")
            || l.starts_with("drover_scheduler_round_failures_total")
    }) {
        eprintln!("hub metrics after the outage: {line}");
    }

    // Then kill -9 the hub and start it again on the same store.
    hub.child.start_kill().unwrap();
    hub.child.wait().await.unwrap();
    hub = HubProcess::start_with_args(hub_dir.path(), Some(&url), agent_port, &args).await;
    prometheus.scrape(&[&target(&hub)]).unwrap();

    let mut last = Value::Null;
    eventually(
        "the evacuation to end",
        Duration::from_secs(600),
        async || {
            last = gql(&hub, EVACUATION, json!({"id": id})).await;
            last["data"]["evacuation"]["state"] != "RUNNING" && !last.is_null()
        },
    )
    .await;
    let e = &last["data"]["evacuation"];
    assert_eq!(e["state"], "SUCCEEDED", "{last}");
    assert_eq!(e["counters"]["succeeded"], VMS, "{last}");
    assert_eq!(e["counters"]["failed"], 0);

    // Every VM was migrated exactly once, and the recorded times keep every limit.
    let history = gql(&hub, MIGRATIONS, json!({"e": id})).await;
    let migrations: Vec<Value> = history["data"]["migrations"]["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("{history}"))
        .iter()
        .map(|e| e["node"].clone())
        .collect();
    assert_eq!(migrations.len(), VMS, "one migration per VM: {history}");
    let mut names: Vec<&str> = migrations
        .iter()
        .map(|m| m["virtualMachine"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), VMS, "no VM moved twice: {names:?}");
    assert!(
        migrations
            .iter()
            .all(|m| m["phase"] == "SUCCEEDED" && m["attempt"] == 1),
        "{history}"
    );
    assert_limits_kept(&migrations);

    // They all run on west-1 and north-1 now, each once, and kept counting without a reboot.
    assert!(
        QemuReaper::running(east_dir).is_empty(),
        "nothing left on east-1"
    );
    let (west, north) = (
        QemuReaper::running(west_dir).len(),
        QemuReaper::running(north_dir).len(),
    );
    assert_eq!(west + north, VMS, "west {west} + north {north}");
    assert!(
        west > 0 && north > 0,
        "the load was spread: west {west}, north {north}"
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
    eventually(
        "the hub sees every VM on its target",
        Duration::from_secs(120),
        async || {
            vms_on(&hub, "east-1").await.is_empty()
                && vms_on(&hub, "west-1").await.len() + vms_on(&hub, "north-1").await.len() == VMS
        },
    )
    .await;
    let east = gql(
        &hub,
        r#"{ cluster(name: "east-1") { maintenance } }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        east["data"]["cluster"]["maintenance"], true,
        "the evacuated cluster stays cordoned"
    );

    // What Prometheus stored: the series operators alert on, from both hubs (a target that
    // went away leaves its samples, so `max_over_time`). Database errors and failed rounds are
    // not among them: whether an 8 s outage fails a statement or only delays it (the pool
    // waits for a connection) depends on the moment.
    let expected = [
        r#"max_over_time(up{job="drover-hub"}[1h]) == 1"#,
        r#"max_over_time(drover_migrations_ended_total{result="Succeeded"}[1h]) > 0"#,
        "max_over_time(drover_admission_wait_seconds_count[1h]) > 0",
        r#"max_over_time(drover_scheduler_slots_in_use{cluster="east-1"}[1h]) > 0"#,
        "max_over_time(drover_migrations_waiting[1h])",
        r#"max_over_time(drover_evacuation_moves{state="planned"}[1h]) > 0"#,
        "max_over_time(drover_scheduler_rounds_total[1h]) > 0",
    ];
    let missing = prometheus
        .wait_for(&expected, Duration::from_secs(60))
        .await;
    if !missing.is_empty() {
        let exposed = hub.metrics(&http).await;
        panic!(
            "Prometheus does not hold {missing:?}\ntargets: {}\nthe hub exposes:\n{}",
            prometheus.targets().await,
            exposed
                .lines()
                .filter(|l| l.starts_with("drover_"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // Every move ended and nothing waits: no slots gauge still shows the last admission's.
    eventually(
        "no cluster's slots gauge stays above 0",
        Duration::from_secs(15),
        async || {
            let exposed = hub.metrics(&http).await;
            !exposed
                .lines()
                .any(|l| l.starts_with("drover_scheduler_slots_in_use{") && !l.ends_with(" 0"))
        },
    )
    .await;
    drop(agents);
}
