//! Evacuations, rebalances, maintenance and migration policies through GraphQL, against real
//! PostgreSQL and the embedded SQLite file (no agents: the scheduler's admissions are checked
//! where they are recorded, in the migrations' rows).

use std::collections::{BTreeMap, HashMap};

use drover_e2e::testbed::*;
use drover_hub::config::SchedulerSettings;
use drover_hub::orchestration::scheduler::Scheduler;
use drover_hub::store::entities::migration;
use drover_shared::inventory::*;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use serde_json::{json, Value};

use drover_e2e::on_both_backends;

on_both_backends!(
    maintenance_cordons_and_a_cordoned_cluster_receives_nothing,
    a_fleet_without_room_names_who_cannot_move_and_nothing_starts,
    an_evacuation_is_admitted_under_every_limit_and_cancels_cleanly,
    policies_choose_each_vms_settings,
    a_rebalance_moves_towards_the_band_and_holds_down,
    migration_events_follow_an_evacuation,
    evacuations_page_newest_first_in_a_constant_number_of_statements,
);

const EVACUATIONS_PAGE: &str = r#"query($first: Int!, $after: String) {
  evacuations(first: $first, after: $after) {
    edges { node { id kind state cluster counters { planned queued running succeeded failed } estimatedFinishAt } }
    pageInfo { hasNextPage endCursor } } }"#;

async fn evacuations_page_newest_first_in_a_constant_number_of_statements(b: Backend) {
    let h = TestHub::new(b, "evac_page").await.unwrap();
    for (i, name) in ["c0", "c1", "c2", "c3", "c4", "c5"].iter().enumerate() {
        cluster(&h, name, i as u32 + 1, 1, 1, 64, 5).await;
    }
    let start = r#"mutation($c: String!) { startEvacuation(input: {cluster: $c, allowPartial: true}) { id } }"#;
    let statements = async |first: i64| {
        let before = h.hub.store.statements.get();
        let page = h.data(EVACUATIONS_PAGE, json!({"first": first})).await;
        (h.hub.store.statements.get() - before, page)
    };
    let mut started = Vec::new();
    started.push(h.data(start, json!({"c": "c0"})).await["startEvacuation"]["id"].clone());
    let (one, page) = statements(10).await;
    assert_eq!(
        page["evacuations"]["edges"].as_array().map(Vec::len),
        Some(1),
        "{page}"
    );
    for c in ["c1", "c2", "c3", "c4"] {
        started.push(h.data(start, json!({"c": c})).await["startEvacuation"]["id"].clone());
    }
    let (five, page) = statements(10).await;
    assert_eq!(
        page["evacuations"]["edges"].as_array().map(Vec::len),
        Some(5),
        "{page}"
    );
    assert_eq!(one, five, "the same statements for 1 and 5 evacuations");
    assert_eq!(
        page["evacuations"]["edges"][0]["node"]["counters"]["planned"], 1,
        "counters come along: {page}"
    );

    // Two at a time, newest first, each once.
    let mut seen = Vec::new();
    let mut after = Value::Null;
    loop {
        let page = h
            .data(EVACUATIONS_PAGE, json!({"first": 2, "after": after}))
            .await;
        let conn = &page["evacuations"];
        seen.extend(
            conn["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["node"]["id"].clone()),
        );
        if conn["pageInfo"]["hasNextPage"] != true {
            break;
        }
        after = conn["pageInfo"]["endCursor"].clone();
    }
    started.reverse();
    assert_eq!(seen, started, "newest first, each once");
    let bad = h
        .gql(EVACUATIONS_PAGE, json!({"first": 2, "after": "nope"}))
        .await;
    assert_eq!(error_code(&bad).as_deref(), Some("BAD_USER_INPUT"), "{bad}");
}

/// Two hub replicas admitting at once: the second waits for the first's admission transaction
/// (PostgreSQL advisory lock) and sees what it admitted. Without the lock, the second would read
/// the queue while the first's admissions are uncommitted and fill the same slots again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_admits_only_after_another_replicas_admission_commits() {
    use drover_hub::orchestration::scheduler::ADMISSION_LOCK;
    use sea_orm::{ConnectionTrait, DbBackend, QueryOrder, Statement, TransactionTrait};

    let h = TestHub::new(Backend::Postgres, "admission_lock")
        .await
        .unwrap();
    cluster(&h, "east", 1, 10, 1, 64, 3).await;
    cluster(&h, "west", 2, 0, 1, 64, 10).await;
    cluster(&h, "north", 3, 0, 1, 64, 10).await;
    h.data(
        r#"mutation { startEvacuation(input: {cluster: "east"}) { id } }"#,
        json!({}),
    )
    .await;
    // "Replica A": inside its admission transaction, holding the lock, it admits the last
    // three of the queue (east's three slots); "replica B" then runs its admission.
    let a = h.hub.store.db.begin().await.unwrap();
    a.execute(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_advisory_xact_lock($1)",
        [ADMISSION_LOCK.into()],
    ))
    .await
    .unwrap();
    let last_three: Vec<uuid::Uuid> = migration::Entity::find()
        .order_by_desc(migration::Column::QueuePosition)
        .all(&a)
        .await
        .unwrap()
        .into_iter()
        .take(3)
        .map(|m| m.id)
        .collect();
    migration::Entity::update_many()
        .col_expr(migration::Column::Phase, "Scheduled".into())
        .filter(migration::Column::Id.is_in(last_three.clone()))
        .exec(&a)
        .await
        .unwrap();
    let b = Scheduler::new(
        h.hub.store.clone(),
        h.hub.migrations.clone(),
        SchedulerSettings::default(),
    );
    let b = tokio::spawn(async move { b.admit().await.unwrap() });
    // B must wait for A whatever the machine's speed; give it time to go wrong if it did not.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(
        !b.is_finished(),
        "replica B admitted while replica A held the admission lock"
    );
    a.commit().await.unwrap();
    let admitted_by_b = tokio::time::timeout(std::time::Duration::from_secs(60), b)
        .await
        .expect("B admits once A committed")
        .unwrap();
    assert!(
        admitted_by_b.is_empty(),
        "east's three slots are taken by A: B admits nothing, not {admitted_by_b:?}"
    );
    assert_within_limits(&migrations_of(&h).await, 3, 20);
}

/// A cluster with `vms` VMs of `vm_gib` on one node of `node_gib`, `parallel` migrations at a
/// time, reporting a sync endpoint.
async fn cluster(
    h: &TestHub,
    name: &str,
    seed: u32,
    vms: u32,
    vm_gib: u64,
    node_gib: u64,
    parallel: u32,
) {
    let mut s = snapshot(
        name,
        1,
        vec![node("node-a", node_gib, 64)],
        (0..vms)
            .map(|i| {
                let mut v = vm("web", &format!("{name}-vm-{i}"), seed * 1000 + i);
                v.memory_bytes = vm_gib << 30;
                v
            })
            .collect(),
    );
    s.nodes[0].requested_memory_bytes = vms as u64 * (vm_gib << 30);
    s.info.sync_endpoint = Some(format!("{name}.example:9185"));
    s.info.migration_config.parallel_migrations_per_cluster = parallel;
    s.info
        .migration_config
        .parallel_outbound_migrations_per_node = parallel;
    h.hub.ingest.apply_snapshot(&s).await.unwrap();
}

const PLAN: &str = r#"query($c: String!) { r: planEvacuation(input: {cluster: $c}) {
  kind cluster estimatedDurationSeconds
  moves { namespace name sourceCluster targetCluster targetNode memoryBytes }
  cannotMove { namespace name cluster reasons }
  limits { maxInFlight maxAttempts clusters { cluster parallelMigrationsPerCluster } } } }"#;

fn plan_of(resp: &Value) -> &Value {
    &resp["r"]
}

async fn plan(h: &TestHub, c: &str) -> Value {
    h.gql(
        PLAN.replacen("query(", "mutation(", 1).as_str(),
        json!({"c": c}),
    )
    .await["data"]
        .clone()
}

async fn migrations_of(h: &TestHub) -> Vec<migration::Model> {
    migration::Entity::find()
        .all(&h.hub.store.db)
        .await
        .unwrap()
}

async fn maintenance_cordons_and_a_cordoned_cluster_receives_nothing(b: Backend) {
    let h = TestHub::new(b, "evac_cordon").await.unwrap();
    cluster(&h, "east", 1, 3, 2, 64, 5).await;
    cluster(&h, "west", 2, 0, 2, 64, 5).await;
    cluster(&h, "north", 3, 0, 2, 64, 5).await;
    let set = r#"mutation($c: String!, $m: Boolean!) { setClusterMaintenance(cluster: $c, maintenance: $m) { name maintenance maintenanceSince } }"#;
    let on = h.data(set, json!({"c": "north", "m": true})).await;
    assert_eq!(on["setClusterMaintenance"]["maintenance"], true, "{on}");
    let since = on["setClusterMaintenance"]["maintenanceSince"].clone();
    assert!(since.is_string());
    // Cordoning again keeps the first time.
    let again = h.data(set, json!({"c": "north", "m": true})).await;
    assert_eq!(again["setClusterMaintenance"]["maintenanceSince"], since);

    let p = plan(&h, "east").await;
    let moves = plan_of(&p)["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 3, "{p}");
    assert!(
        moves.iter().all(|m| m["targetCluster"] == "west"),
        "the cordoned cluster receives nothing: {p}"
    );

    let off = h.data(set, json!({"c": "north", "m": false})).await;
    assert_eq!(off["setClusterMaintenance"]["maintenance"], false);
    assert!(off["setClusterMaintenance"]["maintenanceSince"].is_null());
    let p = plan(&h, "east").await;
    let targets: Vec<&str> = plan_of(&p)["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["targetCluster"].as_str().unwrap())
        .collect();
    assert!(
        targets.contains(&"north") && targets.contains(&"west"),
        "load is spread: {targets:?}"
    );

    // Bad input says what is wrong.
    let bad = h.gql(set, json!({"c": "Not A Name", "m": true})).await;
    assert_eq!(error_code(&bad).as_deref(), Some("INVALID_NAME"), "{bad}");
    let missing = h.gql(set, json!({"c": "nowhere", "m": true})).await;
    assert_eq!(
        error_code(&missing).as_deref(),
        Some("NOT_FOUND"),
        "{missing}"
    );
}

async fn a_fleet_without_room_names_who_cannot_move_and_nothing_starts(b: Backend) {
    let h = TestHub::new(b, "evac_no_room").await.unwrap();
    // 4 VMs of 8 GiB; the only target has one 40 GiB node with 4 GiB in use, and keeps room
    // for that node to drain: two fit, two do not.
    cluster(&h, "east", 1, 4, 8, 64, 5).await;
    cluster(&h, "west", 2, 1, 4, 40, 5).await;
    let p = plan(&h, "east").await;
    let plan = plan_of(&p);
    assert_eq!(plan["moves"].as_array().unwrap().len(), 2, "{p}");
    let cannot = plan["cannotMove"].as_array().unwrap();
    assert_eq!(cannot.len(), 2, "{p}");
    for c in cannot {
        let reasons = c["reasons"].to_string();
        assert!(
            reasons.contains("west needs 8.0 GiB") && reasons.contains("node drain"),
            "the reason says what is short where: {reasons}"
        );
    }
    let start = h
        .gql(
            r#"mutation { startEvacuation(input: {cluster: "east"}) { id } }"#,
            json!({}),
        )
        .await;
    assert_eq!(
        error_code(&start).as_deref(),
        Some("PREFLIGHT_FAILED"),
        "{start}"
    );
    assert!(error_message(&start).contains("east-vm-"), "{start}");
    assert!(migrations_of(&h).await.is_empty(), "nothing started");
    let evacuations = h
        .data("{ evacuations { edges { node { id } } } }", json!({}))
        .await;
    assert_eq!(evacuations["evacuations"]["edges"], json!([]));
}

/// Whether the admitted migrations (phase past Pending) keep every limit.
fn assert_within_limits(rows: &[migration::Model], per_cluster: usize, total: usize) {
    let admitted: Vec<&migration::Model> = rows
        .iter()
        .filter(|m| {
            MigrationPhase::parse(&m.phase).is_some_and(|p| {
                p != MigrationPhase::Pending && MigrationPhase::IN_FLIGHT.contains(&p)
            })
        })
        .collect();
    assert!(
        admitted.len() <= total,
        "fleet cap {total}: {}",
        admitted.len()
    );
    let mut per: HashMap<&str, usize> = HashMap::new();
    for m in &admitted {
        *per.entry(&m.source_cluster_name).or_default() += 1;
        *per.entry(&m.target_cluster_name).or_default() += 1;
    }
    for (c, n) in per {
        assert!(n <= per_cluster, "{c} holds {n} > {per_cluster} slots");
    }
}

async fn an_evacuation_is_admitted_under_every_limit_and_cancels_cleanly(b: Backend) {
    let h = TestHub::new(b, "evac_limits").await.unwrap();
    cluster(&h, "east", 1, 10, 1, 64, 3).await;
    cluster(&h, "west", 2, 0, 1, 64, 3).await;
    cluster(&h, "north", 3, 0, 1, 64, 3).await;
    let started = h
        .data(
            r#"mutation { startEvacuation(input: {cluster: "east"}) { id state cluster counters { planned queued running succeeded failed cannotMove } } }"#,
            json!({}),
        )
        .await;
    let e = &started["startEvacuation"];
    assert_eq!(e["state"], "RUNNING", "{started}");
    assert_eq!(e["counters"]["planned"], 10);
    assert_eq!(e["counters"]["queued"], 10);
    let id = e["id"].as_str().unwrap().to_owned();
    let east = h
        .data(r#"{ cluster(name: "east") { maintenance } }"#, json!({}))
        .await;
    assert_eq!(
        east["cluster"]["maintenance"], true,
        "an evacuated cluster is cordoned"
    );

    // Eight schedulers (as hub replicas on one database) admit at the same time.
    let settings = SchedulerSettings {
        max_in_flight: 20,
        ..SchedulerSettings::default()
    };
    let a = Scheduler::new(
        h.hub.store.clone(),
        h.hub.migrations.clone(),
        settings.clone(),
    );
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let replicas = (0..8).map(|_| {
        let (scheduler, start) = (a.clone(), start.clone());
        tokio::spawn(async move {
            start.wait().await;
            scheduler.admit().await.unwrap()
        })
    });
    let mut all: Vec<uuid::Uuid> = futures::future::join_all(replicas)
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "no migration admitted twice");
    // east holds a slot in each (limit 3): three migrations at once, no more.
    assert_eq!(n, 3, "east's three slots are filled at once");
    let rows = migrations_of(&h).await;
    assert_within_limits(&rows, 3, 20);
    // Another round admits nothing while the slots are held.
    assert!(a.admit().await.unwrap().is_empty());

    // A finished migration frees its slot at once.
    let running: Vec<&migration::Model> = rows.iter().filter(|m| m.phase == "Scheduled").collect();
    migration::Entity::update_many()
        .col_expr(migration::Column::Phase, "Succeeded".into())
        .filter(migration::Column::Id.eq(running[0].id))
        .exec(&h.hub.store.db)
        .await
        .unwrap();
    assert_eq!(
        a.admit().await.unwrap().len(),
        1,
        "the freed slot is filled"
    );
    assert_within_limits(&migrations_of(&h).await, 3, 20);

    // The fleet cap applies too.
    let capped = Scheduler::new(
        h.hub.store.clone(),
        h.hub.migrations.clone(),
        SchedulerSettings {
            max_in_flight: 1,
            ..settings
        },
    );
    assert!(
        capped.admit().await.unwrap().is_empty(),
        "3 in flight > cap 1"
    );

    let q = r#"query($id: ID!) { evacuation(id: $id) { state counters { planned queued running succeeded failed } estimatedFinishAt } }"#;
    let now = h.data(q, json!({"id": id})).await;
    let c = &now["evacuation"]["counters"];
    assert_eq!(
        (
            c["queued"].as_i64(),
            c["running"].as_i64(),
            c["succeeded"].as_i64()
        ),
        (Some(6), Some(3), Some(1)),
        "{now}"
    );
    assert!(now["evacuation"]["estimatedFinishAt"].is_string());

    let cancelled = h
        .data(
            r#"mutation($id: ID!) { cancelEvacuation(id: $id) { state counters { queued running failed succeeded } } }"#,
            json!({"id": id}),
        )
        .await;
    assert_eq!(
        cancelled["cancelEvacuation"]["state"], "CANCELLED",
        "{cancelled}"
    );
    let rows = migrations_of(&h).await;
    assert_eq!(rows.iter().filter(|m| m.phase == "Succeeded").count(), 1);
    for m in rows.iter().filter(|m| m.phase != "Succeeded") {
        assert_eq!(m.phase, "Failed", "{m:?}");
        assert_eq!(m.failure_reason.as_deref(), Some("cancelled by test-admin"));
    }
    assert!(
        a.admit().await.unwrap().is_empty(),
        "nothing is admitted after a cancel"
    );
    let again = h
        .gql(
            r#"mutation($id: ID!) { cancelEvacuation(id: $id) { state } }"#,
            json!({"id": id}),
        )
        .await;
    assert_eq!(error_code(&again).as_deref(), Some("CONFLICT"), "{again}");
}

async fn policies_choose_each_vms_settings(b: Backend) {
    let h = TestHub::new(b, "evac_policies").await.unwrap();
    let mut s = snapshot(
        "east",
        1,
        vec![node("node-a", 64, 16)],
        vec![
            vm("web", "api", 1),
            vm("payments", "db", 2),
            vm("web", "batch", 3),
        ],
    );
    s.vms[1].labels.insert("tier".into(), "db".into());
    s.vms[2].labels.clear();
    s.info.sync_endpoint = Some("east.example:9185".into());
    s.info.migration_config.bandwidth_per_migration = 111;
    h.hub.ingest.apply_snapshot(&s).await.unwrap();
    cluster(&h, "west", 2, 0, 1, 64, 5).await;
    let set = r#"mutation($in: MigrationPolicyInput!) { setMigrationPolicy(input: $in) { name bandwidthPerMigration allowPostCopy vmSelector { key value } } }"#;
    for input in [
        json!({"name": "any-app", "vmSelector": [{"key": "app", "value": "api"}], "bandwidthPerMigration": 222}),
        json!({"name": "databases", "vmSelector": [{"key": "tier", "value": "db"}],
               "namespaceSelector": [{"key": "kubernetes.io/metadata.name", "value": "payments"}],
               "bandwidthPerMigration": 333, "allowPostCopy": true}),
    ] {
        let r = h.data(set, json!({"in": input})).await;
        assert!(r["setMigrationPolicy"]["name"].is_string(), "{r}");
    }
    let bad = h
        .gql(
            set,
            json!({"in": {"name": "Bad Name", "bandwidthPerMigration": 1}}),
        )
        .await;
    assert_eq!(error_code(&bad).as_deref(), Some("BAD_USER_INPUT"), "{bad}");
    let listed = h.data("{ migrationPolicies { name } }", json!({})).await;
    assert_eq!(
        listed["migrationPolicies"],
        json!([{"name": "any-app"}, {"name": "databases"}])
    );

    h.data(
        r#"mutation { startEvacuation(input: {cluster: "east"}) { id } }"#,
        json!({}),
    )
    .await;
    let options: BTreeMap<String, Value> = migrations_of(&h)
        .await
        .into_iter()
        .map(|m| (m.vm_name, m.options.unwrap()))
        .collect();
    assert_eq!(options["api"]["bandwidthBytesPerSec"], 222, "{options:?}");
    assert_eq!(options["db"]["bandwidthBytesPerSec"], 333);
    assert_eq!(options["db"]["allowPostCopy"], true);
    assert_eq!(
        options["batch"]["bandwidthBytesPerSec"], 111,
        "no policy: the cluster's setting"
    );
    let deleted = h
        .data(
            r#"mutation { deleteMigrationPolicy(name: "any-app") }"#,
            json!({}),
        )
        .await;
    assert_eq!(deleted["deleteMigrationPolicy"], true);
}

async fn a_rebalance_moves_towards_the_band_and_holds_down(b: Backend) {
    let h = TestHub::new(b, "rebalance").await.unwrap();
    cluster(&h, "hot", 1, 8, 2, 20, 5).await;
    cluster(&h, "cold", 2, 0, 2, 20, 5).await;
    let q = r#"mutation { r: planRebalance(input: {band: 0.1, minImprovement: 0.01, maxMoves: 10}) { kind moves { name sourceCluster targetCluster } } }"#;
    let p = h.data(q, json!({})).await;
    assert_eq!(p["r"]["kind"], "REBALANCE");
    let moves = p["r"]["moves"].as_array().unwrap();
    assert_eq!(
        moves.len(),
        4,
        "16 of 20 GiB vs 0 of 20: four 2 GiB moves balance it: {p}"
    );
    assert!(moves
        .iter()
        .all(|m| m["sourceCluster"] == "hot" && m["targetCluster"] == "cold"));
    let start = r#"mutation { startRebalance(input: {maxMoves: 2, holdDownSeconds: 600}) { id kind counters { planned } } }"#;
    // Two requests at once: the hold-down check and the new rebalance are one step, so
    // exactly one starts.
    let (first, second) = futures::join!(h.gql(start, json!({})), h.gql(start, json!({})));
    let (s, other) = if first["data"]["startRebalance"].is_object() {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(
        s["data"]["startRebalance"]["counters"]["planned"], 2,
        "capped at maxMoves: {s}"
    );
    assert_eq!(
        error_code(&other).as_deref(),
        Some("CONFLICT"),
        "only one of two racing rebalances starts: {other}"
    );
    let again = h.gql(start, json!({})).await;
    assert_eq!(
        error_code(&again).as_deref(),
        Some("CONFLICT"),
        "the hold-down time: {again}"
    );
    // A request cannot shorten the hub's minimum hold-down (an hour here).
    let impatient = h
        .gql(
            r#"mutation { startRebalance(input: {maxMoves: 2, holdDownSeconds: 0}) { id } }"#,
            json!({}),
        )
        .await;
    assert_eq!(
        error_code(&impatient).as_deref(),
        Some("CONFLICT"),
        "holdDownSeconds: 0 does not bypass the hub's hold-down: {impatient}"
    );
    // In virtual time: ten seconds before the hour is up, still refused; once it is, the next
    // rebalance starts.
    h.clock.advance(std::time::Duration::from_secs(3590));
    let early = h.gql(start, json!({})).await;
    assert_eq!(error_code(&early).as_deref(), Some("CONFLICT"), "{early}");
    h.clock.advance(std::time::Duration::from_secs(11));
    let later = h.data(start, json!({})).await;
    assert_eq!(
        later["startRebalance"]["counters"]["planned"], 2,
        "the hold-down is over after the hub's hour: {later}"
    );
    let bad = h
        .gql(
            r#"mutation { planRebalance(input: {band: 2.0}) { kind } }"#,
            json!({}),
        )
        .await;
    assert_eq!(error_code(&bad).as_deref(), Some("BAD_USER_INPUT"), "{bad}");
}

async fn migration_events_follow_an_evacuation(b: Backend) {
    use futures::StreamExt;
    let h = TestHub::new(b, "evac_events").await.unwrap();
    cluster(&h, "east", 1, 3, 1, 64, 2).await;
    cluster(&h, "west", 2, 0, 1, 64, 2).await;
    let mut events = h.hub.schema.execute_stream(
        async_graphql::Request::new("subscription { migrationEvents { migrationId evacuationId vmName phase sourceCluster targetCluster } }")
            .data(test_admin()),
    );
    // The subscription starts listening when first polled.
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(200), events.next()).await;
    assert!(quiet.is_err(), "nothing happened yet");
    let started = h
        .data(
            r#"mutation { startEvacuation(input: {cluster: "east"}) { id } }"#,
            json!({}),
        )
        .await;
    let id = started["startEvacuation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let scheduler = Scheduler::new(
        h.hub.store.clone(),
        h.hub.migrations.clone(),
        SchedulerSettings::default(),
    );
    let admitted = scheduler.admit().await.unwrap();
    assert_eq!(admitted.len(), 2, "two slots on each side");
    let mut seen: Vec<(String, String)> = Vec::new();
    while seen.len() < 5 {
        // Generous: the events are already published; a loaded machine may deliver them late.
        let next = tokio::time::timeout(std::time::Duration::from_secs(60), events.next())
            .await
            .expect("an event within 60 s")
            .expect("the subscription stays open");
        assert!(next.errors.is_empty(), "{:?}", next.errors);
        let ev = next.data.into_json().unwrap()["migrationEvents"].clone();
        assert_eq!(ev["evacuationId"], id.as_str(), "{ev}");
        assert_eq!(
            (ev["sourceCluster"].as_str(), ev["targetCluster"].as_str()),
            (Some("east"), Some("west"))
        );
        seen.push((
            ev["vmName"].as_str().unwrap().to_owned(),
            ev["phase"].as_str().unwrap().to_owned(),
        ));
    }
    let pending = seen.iter().filter(|e| e.1 == "PENDING").count();
    let scheduled = seen.iter().filter(|e| e.1 == "SCHEDULED").count();
    assert_eq!(
        (pending, scheduled),
        (3, 2),
        "queued three, admitted two: {seen:?}"
    );
    // A filter on another evacuation sees none of it.
    let mut other = h.hub.schema.execute_stream(
        async_graphql::Request::new("subscription { migrationEvents(evacuationId: \"00000000-0000-0000-0000-000000000000\") { phase } }")
            .data(test_admin()),
    );
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(200), other.next()).await;
    assert!(quiet.is_err());
    let migration = migrations_of(&h)
        .await
        .into_iter()
        .find(|m| m.phase == "Pending")
        .unwrap();
    h.hub
        .migrations
        .cancel(migration.id, "tester")
        .await
        .unwrap();
    let failed = tokio::time::timeout(std::time::Duration::from_secs(60), events.next())
        .await
        .expect("the cancel's event")
        .unwrap()
        .data
        .into_json()
        .unwrap();
    assert_eq!(failed["migrationEvents"]["phase"], "FAILED", "{failed}");
    assert_eq!(
        failed["migrationEvents"]["vmName"],
        migration.vm_name.as_str()
    );
    // Only now, with the cancel's event published to every subscriber (the unfiltered one got
    // it), is the other subscription's silence meaningful: an unfiltered stream would already
    // hold the event and yield it at once.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(500), other.next())
            .await
            .is_err(),
        "a subscription for another evacuation stays quiet"
    );
}
