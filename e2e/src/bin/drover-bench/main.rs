//! `drover-bench`: benchmarks that print figures as ratios against a baseline measured in the
//! same run. `drover-bench inventory` measures the hub's fleet page against hand-written SQL,
//! SQL statements per request, and inventory ingest rates on PostgreSQL and SQLite.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use drover_e2e::postgres::PgCluster;
use drover_e2e::process::process_cpu_seconds;
use drover_e2e::testbed::{snapshot, vm, Backend, TestHub};
use drover_hub::inventory::seed::SeedPlan;
use drover_hub::store::sql::Sql;
use drover_shared::inventory::{InventoryChange, InventoryDelta};
use drover_shared::ClusterName;
use sea_orm::{ConnectionTrait, DatabaseConnection, QueryResult};
use serde_json::{json, Value};
use uuid::Uuid;

mod migration;
mod tunnel;

#[derive(Parser)]
#[command(about = "Drover benchmarks; figures go to docs/benchmarks.md")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Agent sessions over the real protocol and TLS against a real hub process: hub CPU and
    /// memory under heartbeats and deltas, then how many sessions it holds.
    Sessions {
        /// Sessions in the steady phase.
        #[arg(long, default_value_t = 1000)]
        sessions: u32,
        #[arg(long, default_value_t = 10)]
        vms_per_cluster: u32,
        /// VM deltas per second across all sessions in the steady phase.
        #[arg(long, default_value_t = 100)]
        deltas_per_sec: u32,
        /// Length of the steady phase.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Commands per second (startVirtualMachine on random clusters) in the steady phase.
        #[arg(long, default_value_t = 10)]
        commands_per_sec: u32,
        /// The capacity phase adds sessions in steps up to this many.
        #[arg(long, default_value_t = 10_000)]
        max_sessions: u32,
        #[arg(long, default_value_t = 1000)]
        step: u32,
    },
    /// Live migrations of a 1 GiB guest with a 2 GiB disk: QEMU directly over plain loopback
    /// TCP and over QEMU's own TLS (the baselines), then Drover's whole stack (hub, two agent
    /// processes, the agents' TLS tunnel) back and forth: throughput ratios, switchover
    /// downtime, CPU seconds per GiB moved.
    Migration(migration::MigrationArgs),
    /// The agents' mutual-TLS tunnel alone (no QEMU): throughput and CPU seconds per GiB
    /// against plain loopback TCP between the same writer and reader.
    Tunnel(tunnel::TunnelArgs),
    /// Fleet page latency vs hand-written SQL, SQL statements per request, ingest rates.
    Inventory {
        #[arg(long, default_value_t = 500)]
        clusters: u32,
        #[arg(long, default_value_t = 100)]
        vms_per_cluster: u32,
        /// Timed requests per variant.
        #[arg(long, default_value_t = 60)]
        iterations: u32,
        /// VM deltas per ingest measurement.
        #[arg(long, default_value_t = 2000)]
        deltas: u32,
    },
}

/// The portal's fleet page: totals plus the first N clusters with nodes and first 100 VMs each.
fn fleet_page(clusters: u32) -> String {
    format!(
        "{{
  fleet {{ clusters {{ total ready degraded unreachable inMaintenance }}
          virtualMachines {{ total running notMigratable memoryBytes vcpus byPhase {{ phase count }} }}
          capacity {{ nodes allocatableMemoryBytes requestedMemoryBytes allocatableCpuMillis requestedCpuMillis }}
          migrationsInFlight }}
  clusters(first: {clusters}) {{
    pageInfo {{ hasNextPage endCursor }}
    edges {{ node {{
      name health maintenance platformVersion virtualizationVersion labels {{ key value }}
      capacity {{ allocatableMemoryBytes requestedMemoryBytes }}
      nodes {{ name cpuModel allocatableMemoryBytes requestedMemoryBytes schedulable }}
      virtualMachines(first: 100) {{ pageInfo {{ hasNextPage endCursor }} edges {{ node {{
        namespace name phase node memoryBytes vcpus migratable labels {{ key value }} }} }} }}
    }} }}
  }}
}}"
    )
}

/// What the command phase measured.
struct RoundTrips {
    sent: usize,
    succeeded: usize,
    /// Hub-recorded: command stored -> agent acknowledgement recorded.
    stored_to_ack: Vec<Duration>,
    /// Client-observed: mutation sent -> answer with the outcome.
    mutation: Vec<Duration>,
    /// Baseline in the same run: a trivial GraphQL query.
    query: Vec<Duration>,
}

impl RoundTrips {
    fn print(self) {
        println!(
            "  commands: {} sent, {} acknowledged as succeeded",
            self.sent, self.succeeded
        );
        if self.stored_to_ack.is_empty() || self.mutation.is_empty() || self.query.is_empty() {
            println!("  (no round trips measured)");
            return;
        }
        let ack = percentiles(self.stored_to_ack);
        let mutation = percentiles(self.mutation);
        let query = percentiles(self.query);
        println!(
            "  command round trip (hub stores -> agent ack recorded): p50 {}, p99 {}",
            ms(ack.p50),
            ms(ack.p99)
        );
        println!(
            "  lifecycle mutation answered with the outcome: p50 {}, p99 {}; trivial query (baseline): p50 {}, p99 {}; ratio p50 {:.2}x, p99 {:.2}x",
            ms(mutation.p50),
            ms(mutation.p99),
            ms(query.p50),
            ms(query.p99),
            mutation.p50.as_secs_f64() / query.p50.as_secs_f64(),
            mutation.p99.as_secs_f64() / query.p99.as_secs_f64()
        );
    }
}

/// Sends `per_sec` startVirtualMachine commands a second to random clusters for `seconds`,
/// interleaved with a trivial query as the baseline, and collects the round trips.
async fn command_round_trips(
    http: reqwest::Client,
    graphql: String,
    clusters: Vec<String>,
    per_sec: u32,
    seconds: u64,
) -> anyhow::Result<RoundTrips> {
    let mut trips = RoundTrips {
        sent: 0,
        succeeded: 0,
        stored_to_ack: Vec::new(),
        mutation: Vec::new(),
        query: Vec::new(),
    };
    if per_sec == 0 || clusters.is_empty() {
        return Ok(trips);
    }
    let mutation = "mutation($c: String!) { startVirtualMachine(cluster: $c, namespace: \"web\", name: \"vm-000\", waitSeconds: 10) { state createdAt acknowledgedAt } }";
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sec as f64));
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        tick.tick().await;
        let cluster = &clusters[rand::random_range(0..clusters.len())];
        let t = Instant::now();
        let resp: Value = http
            .post(&graphql)
            .json(&json!({"query": mutation, "variables": {"c": cluster}}))
            .send()
            .await?
            .json()
            .await?;
        trips.mutation.push(t.elapsed());
        trips.sent += 1;
        let c = &resp["data"]["startVirtualMachine"];
        if c["state"] == "SUCCEEDED" {
            trips.succeeded += 1;
            let at = |f: &str| {
                c[f].as_str()
                    .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            };
            if let (Some(created), Some(acked)) = (at("createdAt"), at("acknowledgedAt")) {
                trips
                    .stored_to_ack
                    .push((acked - created).to_std().unwrap_or_default());
            }
        }
        let t = Instant::now();
        let _: Value = http
            .post(&graphql)
            .json(&json!({"query": "{ fleet { clusters { total } } }"}))
            .send()
            .await?
            .json()
            .await?;
        trips.query.push(t.elapsed());
    }
    Ok(trips)
}

struct Latency {
    p50: Duration,
    p99: Duration,
}

fn percentiles(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Latency {
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn get<T: sea_orm::TryGetable>(row: &QueryResult, col: &str) -> anyhow::Result<T> {
    Ok(row.try_get("", col)?)
}

/// The same page as `fleet_page(100)`, fetched with hand-written SQL and rendered to the same
/// JSON shape: what a hand-built endpoint would cost.
async fn fleet_page_by_hand(db: &DatabaseConnection) -> anyhow::Result<Vec<u8>> {
    let be = db.get_database_backend();
    let q = |sql: &str| sea_orm::Statement::from_string(be, sql.to_owned());
    let health = db
        .query_all(q("SELECT health, COUNT(*) AS n, SUM(CASE WHEN maintenance THEN 1 ELSE 0 END)::bigint AS m FROM clusters GROUP BY health"))
        .await?;
    let mut counts = HashMap::new();
    let mut cordoned = 0i64;
    for r in &health {
        counts.insert(get::<String>(r, "health")?, get::<i64>(r, "n")?);
        cordoned += get::<i64>(r, "m")?;
    }
    let phases = db
        .query_all(q("SELECT phase, COUNT(*) AS n, SUM(memory_bytes)::bigint AS mem, SUM(vcpus)::bigint AS cpu, SUM(CASE WHEN migratable THEN 0 ELSE 1 END)::bigint AS pinned FROM virtual_machines GROUP BY phase ORDER BY phase"))
        .await?;
    let mut by_phase = Vec::new();
    let (mut total, mut mem, mut cpu, mut pinned, mut running) = (0i64, 0i64, 0i64, 0i64, 0i64);
    for r in &phases {
        let phase: String = get(r, "phase")?;
        let n: i64 = get(r, "n")?;
        total += n;
        if phase == "Running" {
            running = n;
        }
        mem += get::<i64>(r, "mem")?;
        cpu += get::<i64>(r, "cpu")?;
        pinned += get::<i64>(r, "pinned")?;
        by_phase.push(json!({"phase": phase, "count": n}));
    }
    let cap = db
        .query_one(q("SELECT COUNT(*) AS n, SUM(allocatable_memory_bytes)::bigint AS am, SUM(requested_memory_bytes)::bigint AS rm, SUM(allocatable_cpu_millis)::bigint AS ac, SUM(requested_cpu_millis)::bigint AS rc FROM nodes"))
        .await?
        .context("capacity row")?;
    let inflight = db
        .query_one(q("SELECT COUNT(*) AS n FROM migrations WHERE phase IN ('Scheduling','Scheduled','PreparingTarget','TargetReady','Running')"))
        .await?
        .context("migrations row")?;
    let clusters = db
        .query_all(q("SELECT id, name, health, maintenance, platform_version, virtualization_version FROM clusters ORDER BY name LIMIT 101"))
        .await?;
    let has_next = clusters.len() > 100;
    let ids: Vec<Uuid> = clusters
        .iter()
        .take(100)
        .map(|r| get(r, "id"))
        .collect::<Result<_, _>>()?;
    let in_ids = |prefix: &str, column: &str, suffix: &str| {
        let mut sql = Sql::new(be);
        sql.push(prefix).in_ids(column, &ids).push(suffix);
        sql.build()
    };
    let labels = db
        .query_all(in_ids(
            "SELECT cluster_id, key, value FROM cluster_labels WHERE ",
            "cluster_id",
            " ORDER BY cluster_id, key",
        ))
        .await?;
    let nodes = db.query_all(in_ids("SELECT cluster_id, name, cpu_model, allocatable_memory_bytes, requested_memory_bytes, schedulable FROM nodes WHERE ", "cluster_id", " ORDER BY cluster_id, name")).await?;
    let caps = db.query_all(in_ids("SELECT cluster_id, SUM(allocatable_memory_bytes)::bigint AS am, SUM(requested_memory_bytes)::bigint AS rm FROM nodes WHERE ", "cluster_id", " GROUP BY cluster_id")).await?;
    let vms = db.query_all(in_ids(
        "SELECT v.id, v.cluster_id, v.namespace, v.name, v.phase, v.node_name, v.memory_bytes, v.vcpus, v.migratable \
         FROM clusters c CROSS JOIN LATERAL (SELECT * FROM virtual_machines v WHERE v.cluster_id = c.id ORDER BY v.namespace, v.name LIMIT 101) v WHERE ",
        "c.id",
        " ORDER BY v.cluster_id, v.namespace, v.name",
    )).await?;
    let vm_ids: Vec<Uuid> = vms.iter().map(|r| get(r, "id")).collect::<Result<_, _>>()?;
    let mut sql = Sql::new(be);
    sql.push("SELECT vm_id, key, value FROM vm_labels WHERE ")
        .in_ids("vm_id", &vm_ids)
        .push(" ORDER BY vm_id, key");
    let vm_labels = db.query_all(sql.build()).await?;

    let mut labels_of: HashMap<Uuid, Vec<Value>> = HashMap::new();
    for r in &labels {
        labels_of
            .entry(get(r, "cluster_id")?)
            .or_default()
            .push(json!({"key": get::<String>(r, "key")?, "value": get::<String>(r, "value")?}));
    }
    let mut vm_labels_of: HashMap<Uuid, Vec<Value>> = HashMap::new();
    for r in &vm_labels {
        vm_labels_of
            .entry(get(r, "vm_id")?)
            .or_default()
            .push(json!({"key": get::<String>(r, "key")?, "value": get::<String>(r, "value")?}));
    }
    let mut nodes_of: HashMap<Uuid, Vec<Value>> = HashMap::new();
    for r in &nodes {
        nodes_of
            .entry(get(r, "cluster_id")?)
            .or_default()
            .push(json!({
            "name": get::<String>(r, "name")?, "cpuModel": get::<String>(r, "cpu_model")?,
            "allocatableMemoryBytes": get::<i64>(r, "allocatable_memory_bytes")?,
            "requestedMemoryBytes": get::<i64>(r, "requested_memory_bytes")?,
            "schedulable": get::<bool>(r, "schedulable")?}));
    }
    let mut cap_of: HashMap<Uuid, Value> = HashMap::new();
    for r in &caps {
        cap_of.insert(get(r, "cluster_id")?, json!({"allocatableMemoryBytes": get::<i64>(r, "am")?, "requestedMemoryBytes": get::<i64>(r, "rm")?}));
    }
    let mut vms_of: HashMap<Uuid, Vec<Value>> = HashMap::new();
    for r in &vms {
        let id: Uuid = get(r, "id")?;
        vms_of
            .entry(get(r, "cluster_id")?)
            .or_default()
            .push(json!({"node": {
            "namespace": get::<String>(r, "namespace")?, "name": get::<String>(r, "name")?,
            "phase": get::<String>(r, "phase")?, "node": get::<Option<String>>(r, "node_name")?,
            "memoryBytes": get::<i64>(r, "memory_bytes")?, "vcpus": get::<i32>(r, "vcpus")?,
            "migratable": get::<bool>(r, "migratable")?,
            "labels": vm_labels_of.remove(&id).unwrap_or_default()}}));
    }
    let mut edges = Vec::new();
    for r in clusters.iter().take(100) {
        let id: Uuid = get(r, "id")?;
        let mut vms = vms_of.remove(&id).unwrap_or_default();
        let more = vms.len() > 100;
        vms.truncate(100);
        edges.push(json!({"node": {
            "name": get::<String>(r, "name")?, "health": get::<String>(r, "health")?,
            "maintenance": get::<bool>(r, "maintenance")?,
            "platformVersion": get::<String>(r, "platform_version")?,
            "virtualizationVersion": get::<String>(r, "virtualization_version")?,
            "labels": labels_of.remove(&id).unwrap_or_default(),
            "capacity": cap_of.remove(&id).unwrap_or(Value::Null),
            "nodes": nodes_of.remove(&id).unwrap_or_default(),
            "virtualMachines": {"pageInfo": {"hasNextPage": more}, "edges": vms}}}));
    }
    let page = json!({"data": {
        "fleet": {
            "clusters": {"total": counts.values().sum::<i64>(), "ready": counts.get("Ready"), "degraded": counts.get("Degraded"),
                          "unreachable": counts.get("Unreachable"), "inMaintenance": cordoned},
            "virtualMachines": {"total": total, "running": running, "notMigratable": pinned, "memoryBytes": mem, "vcpus": cpu, "byPhase": by_phase},
            "capacity": {"nodes": get::<i64>(&cap, "n")?, "allocatableMemoryBytes": get::<i64>(&cap, "am")?, "requestedMemoryBytes": get::<i64>(&cap, "rm")?,
                         "allocatableCpuMillis": get::<i64>(&cap, "ac")?, "requestedCpuMillis": get::<i64>(&cap, "rc")?},
            "migrationsInFlight": get::<i64>(&inflight, "n")?},
        "clusters": {"pageInfo": {"hasNextPage": has_next}, "edges": edges}}});
    Ok(serde_json::to_vec(&page)?)
}

async fn timed<F, Fut>(iterations: u32, mut f: F) -> anyhow::Result<(Latency, usize)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    for _ in 0..5 {
        f().await?; // warm caches and connections
    }
    let mut samples = Vec::with_capacity(iterations as usize);
    let mut size = 0;
    for _ in 0..iterations {
        let t = Instant::now();
        size = f().await?;
        samples.push(t.elapsed());
    }
    Ok((percentiles(samples), size))
}

/// Ingest rates: single-VM deltas (one transaction each) and deltas of 100 VM changes.
async fn ingest_rates(backend: Backend, deltas: u32) -> anyhow::Result<(f64, f64)> {
    let h = TestHub::new(backend, "bench_ingest").await?;
    let cluster = ClusterName::new("bench-ingest")?;
    let vms = (0..1000)
        .map(|i| vm("web", &format!("vm-{i:04}"), i))
        .collect();
    h.hub
        .ingest
        .apply_snapshot(&snapshot(cluster.as_str(), 1, vec![], vms))
        .await?;
    let mut generation = 1;
    let t = Instant::now();
    for i in 0..deltas {
        generation += 1;
        let mut v = vm("web", &format!("vm-{:04}", i % 1000), i % 1000);
        v.generation = i as u64;
        h.hub
            .ingest
            .apply_delta(&InventoryDelta {
                cluster: cluster.clone(),
                generation,
                changes: vec![InventoryChange::VmUpserted { vm: v }],
            })
            .await?;
    }
    let single = deltas as f64 / t.elapsed().as_secs_f64();
    let batches = (deltas / 100).max(1);
    let t = Instant::now();
    for b in 0..batches {
        generation += 1;
        let changes = (0..100)
            .map(|i| {
                let mut v = vm(
                    "web",
                    &format!("vm-{:04}", (b * 100 + i) % 1000),
                    (b * 100 + i) % 1000,
                );
                v.generation = (b * 100 + i) as u64;
                InventoryChange::VmUpserted { vm: v }
            })
            .collect();
        h.hub
            .ingest
            .apply_delta(&InventoryDelta {
                cluster: cluster.clone(),
                generation,
                changes,
            })
            .await?;
    }
    let batched = (batches * 100) as f64 / t.elapsed().as_secs_f64();
    Ok((single, batched))
}

async fn inventory(
    clusters: u32,
    vms_per_cluster: u32,
    iterations: u32,
    deltas: u32,
) -> anyhow::Result<()> {
    let pg = PgCluster::shared().await?;
    let h = TestHub::new(Backend::Postgres, "bench_fleet").await?;
    println!("seeding {clusters} clusters x {vms_per_cluster} VMs on PostgreSQL through the ingest path ...");
    let t = Instant::now();
    let report = drover_hub::inventory::seed::seed(
        &h.hub.ingest,
        &SeedPlan {
            clusters: clusters as usize,
            vms_per_cluster: vms_per_cluster as usize,
            seed: 7,
        },
        |_| {},
    )
    .await?;
    let seed_secs = t.elapsed().as_secs_f64();
    println!(
        "  {} VMs, {} nodes in {:.1} s: snapshot ingest {:.0} VMs/s",
        report.vms,
        report.nodes,
        seed_secs,
        report.vms as f64 / seed_secs
    );
    h.hub.store.db.execute_unprepared("ANALYZE").await?;
    let served = h.serve().await?;
    let http = reqwest::Client::new();
    let url = served.url("/graphql");
    let query = fleet_page(100);
    let statements_before = h.hub.store.statements.get();
    let (gql, gql_bytes) = timed(iterations, || {
        let http = http.clone();
        let url = url.clone();
        let query = query.clone();
        let token = h.token.clone();
        async move {
            let body = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({"query": query}))
                .send()
                .await?
                .bytes()
                .await?;
            anyhow::ensure!(
                !body.starts_with(b"{\"data\":null"),
                "fleet page failed: {}",
                String::from_utf8_lossy(&body[..body.len().min(500)])
            );
            Ok(body.len())
        }
    })
    .await?;
    let statements =
        (h.hub.store.statements.get() - statements_before) as f64 / (iterations + 5) as f64;
    let db = h.hub.store.db.clone();
    let (sql, sql_bytes) = timed(iterations, || {
        let db = db.clone();
        async move { Ok(fleet_page_by_hand(&db).await?.len()) }
    })
    .await?;
    println!("\nfleet page (fleet + first 100 clusters with nodes and first 100 VMs each), {iterations} requests:");
    println!(
        "  GraphQL over HTTP:   p50 {}  p99 {}  ({} KiB)",
        ms(gql.p50),
        ms(gql.p99),
        gql_bytes / 1024
    );
    println!(
        "  hand-written SQL:    p50 {}  p99 {}  ({} KiB, rendered to JSON, no HTTP)",
        ms(sql.p50),
        ms(sql.p99),
        sql_bytes / 1024
    );
    println!(
        "  ratio GraphQL/SQL:   p50 {:.2}x  p99 {:.2}x  (goal <= 2x)",
        gql.p50.as_secs_f64() / sql.p50.as_secs_f64(),
        gql.p99.as_secs_f64() / sql.p99.as_secs_f64()
    );
    println!("  SQL statements per fleet page: {statements:.1} (hand-written: 10)");

    println!("\nSQL statements per request by page size (must not grow with results):");
    for n in [1u32, 10, 50, 100] {
        let q = fleet_page(n);
        let before = h.hub.store.statements.get();
        let resp: Value = http
            .post(&url)
            .bearer_auth(&h.token)
            .json(&json!({"query": q}))
            .send()
            .await?
            .json()
            .await?;
        let vms: usize = resp["data"]["clusters"]["edges"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|c| {
                        c["node"]["virtualMachines"]["edges"]
                            .as_array()
                            .map_or(0, Vec::len)
                    })
                    .sum()
            })
            .unwrap_or(0);
        println!(
            "  clusters(first: {n:>3}): {:>5} VMs returned, {} statements",
            vms,
            h.hub.store.statements.get() - before
        );
    }
    // What authentication and authorization cost: the same requests with an API token against
    // the hub as served, and with authentication off, alternating rounds so both see the same
    // machine.
    let open = h.serve_without_authentication().await?;
    let open_url = open.url("/graphql");
    println!("\nauthentication cost (API token vs. authentication off, {iterations} requests each, alternating rounds):");
    for (what, query) in [
        (
            "trivial query",
            "{ fleet { clusters { total } } }".to_owned(),
        ),
        ("fleet page", fleet_page(100)),
    ] {
        let mut with_token = Vec::new();
        let mut without = Vec::new();
        for _round in 0..3 {
            for (url, token, into) in [
                (&url, Some(h.token.clone()), &mut with_token),
                (&open_url, None, &mut without),
            ] {
                let (latency, _) = timed(iterations, || {
                    let (http, url, query, token) =
                        (http.clone(), url.clone(), query.clone(), token.clone());
                    async move {
                        let mut request = http.post(url).json(&json!({"query": query}));
                        if let Some(token) = token {
                            request = request.bearer_auth(token);
                        }
                        let body = request.send().await?.bytes().await?;
                        anyhow::ensure!(
                            !body.windows(7).any(|w| w == b"\"errors"),
                            "request failed: {}",
                            String::from_utf8_lossy(&body[..body.len().min(300)])
                        );
                        Ok(body.len())
                    }
                })
                .await?;
                into.push(latency);
            }
        }
        let median = |v: &[Latency], f: fn(&Latency) -> Duration| {
            let mut x: Vec<Duration> = v.iter().map(f).collect();
            x.sort();
            x[x.len() / 2]
        };
        let (on50, on99) = (
            median(&with_token, |l| l.p50),
            median(&with_token, |l| l.p99),
        );
        let (off50, off99) = (median(&without, |l| l.p50), median(&without, |l| l.p99));
        println!(
            "  {what:<14} token: p50 {} p99 {}   off: p50 {} p99 {}   ratio p50 {:.3}x p99 {:.3}x  (goal <= 1.05x)",
            ms(on50),
            ms(on99),
            ms(off50),
            ms(off99),
            on50.as_secs_f64() / off50.as_secs_f64(),
            on99.as_secs_f64() / off99.as_secs_f64()
        );
    }
    drop(open);
    drop(served);

    println!("\ninventory ingest (VM deltas, each delta one transaction):");
    for backend in [Backend::Postgres, Backend::Sqlite] {
        let (single, batched) = ingest_rates(backend, deltas).await?;
        println!("  {backend:?}: {single:.0} single-VM deltas/s, {batched:.0} VM changes/s in deltas of 100");
    }
    let _ = pg;
    Ok(())
}

/// Resident memory of a process in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no VmRSS")?
        .parse()?;
    Ok(kib / 1024.0)
}

async fn live_sessions(http: &reqwest::Client, hub: &drover_e2e::process::HubProcess) -> f64 {
    let Ok(resp) = http.get(hub.url("/metrics")).send().await else {
        return -1.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("drover_agent_sessions "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

type Agent = (
    std::path::PathBuf,
    std::sync::Arc<drover_e2e::testbed::TestCluster>,
);

/// Joins clusters `range` (16 at a time) and gives each a test inventory of `vms` VMs.
async fn join_many(
    http: &reqwest::Client,
    hub: &drover_e2e::process::HubProcess,
    root: &std::path::Path,
    range: std::ops::Range<u32>,
    vms: u32,
) -> anyhow::Result<Vec<Agent>> {
    use futures::StreamExt;
    let results: Vec<anyhow::Result<Agent>> = futures::stream::iter(range)
        .map(|i| async move {
            let name = ClusterName::new(format!("c-{i:05}"))?;
            let token = hub.create_join_token(http, name.as_str()).await?;
            let dir = root.join(name.as_str());
            drover_agent::identity::AgentIdentity::join(&dir, &hub.agents, &name, &token).await?;
            let list = (0..vms)
                .map(|j| vm("web", &format!("vm-{j:03}"), (i << 8) + j))
                .collect();
            Ok((dir, drover_e2e::testbed::TestCluster::new(list)))
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

fn start_sessions(
    agents: &[Agent],
    hub: &str,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::with_capacity(agents.len());
    for (dir, cluster) in agents {
        let identity = drover_agent::identity::AgentIdentity::load(dir)?;
        let (status, _) =
            tokio::sync::watch::channel(drover_agent::session::SessionStatus::default());
        tasks.push(tokio::spawn(drover_agent::session::run(
            identity,
            dir.clone(),
            vec![hub.to_owned()],
            cluster.clone(),
            cluster.commands(dir),
            status,
            stop.clone(),
        )));
    }
    Ok(tasks)
}

async fn wait_for_sessions(
    http: &reqwest::Client,
    hub: &drover_e2e::process::HubProcess,
    n: u32,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if live_sessions(http, hub).await >= n as f64 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

#[allow(clippy::too_many_arguments)]
async fn sessions(
    sessions: u32,
    vms_per_cluster: u32,
    deltas_per_sec: u32,
    seconds: u64,
    commands_per_sec: u32,
    max_sessions: u32,
    step: u32,
) -> anyhow::Result<()> {
    let pg = PgCluster::shared().await?;
    let url = pg.create_database("bench_sessions").await?;
    let dir = tempfile::tempdir()?;
    let hub = drover_e2e::process::HubProcess::start(dir.path(), Some(&url)).await;
    let pid = hub.child.id().context("hub has no pid")?;
    let http = reqwest::Client::new();
    let root = tempfile::tempdir()?;
    println!("hub pid {pid} on PostgreSQL; heartbeats every 10 s (the hub's default)");

    let t = Instant::now();
    let mut agents = join_many(&http, &hub, root.path(), 0..sessions, vms_per_cluster).await?;
    println!(
        "joined {sessions} clusters in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let t = Instant::now();
    let mut tasks = start_sessions(&agents, &hub.agents, &stop)?;
    anyhow::ensure!(
        wait_for_sessions(&http, &hub, sessions, Duration::from_secs(180)).await,
        "only {} of {sessions} sessions came up",
        live_sessions(&http, &hub).await
    );
    println!(
        "{sessions} sessions open (snapshots of {vms_per_cluster} VMs each) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(5)).await; // let the snapshot burst settle

    let cpu0 = process_cpu_seconds(pid)?;
    let t = Instant::now();
    let clusters: Vec<String> = agents
        .iter()
        .map(|(dir, _)| {
            dir.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let commands = tokio::spawn(command_round_trips(
        http.clone(),
        hub.url("/graphql"),
        clusters,
        commands_per_sec,
        seconds,
    ));
    let total = deltas_per_sec as u64 * seconds;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / deltas_per_sec as f64));
    for k in 0..total {
        tick.tick().await;
        let (_, cluster) = &agents[(k % agents.len() as u64) as usize];
        cluster.add_vm(vm("web", &format!("delta-{k:07}"), 0x0100_0000 + k as u32));
    }
    let wall = t.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds(pid)? - cpu0;
    let rss = rss_mib(pid)?;
    let expected = sessions as i64 * vms_per_cluster as i64 + total as i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut applied = 0;
    while Instant::now() < deadline {
        let resp: Value = http
            .post(hub.url("/graphql"))
            .json(&json!({"query": "{ fleet { virtualMachines { total } clusters { ready } } }"}))
            .send()
            .await?
            .json()
            .await?;
        applied = resp["data"]["fleet"]["virtualMachines"]["total"]
            .as_i64()
            .unwrap_or(0);
        if applied >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("\nsteady phase: {sessions} sessions, heartbeats every 10 s, {deltas_per_sec} VM deltas/s for {wall:.0} s");
    println!(
        "  hub CPU: {:.1}% of one core ({cpu:.1} CPU-s over {wall:.1} s)",
        cpu / wall * 100.0
    );
    println!("  hub memory (RSS): {rss:.0} MiB");
    println!(
        "  VMs in the inventory: {applied} of {expected} expected (every delta applied: {})",
        applied >= expected
    );
    let trips = commands.await??;
    trips.print();

    println!("\ncapacity phase: sessions added in steps of {step} (empty clusters), up to {max_sessions}:");
    let mut held = sessions;
    let mut target = sessions + step;
    while target <= max_sessions {
        let t = Instant::now();
        let more = join_many(&http, &hub, root.path(), held..target, 0).await?;
        tasks.extend(start_sessions(&more, &hub.agents, &stop)?);
        agents.extend(more);
        let ok = wait_for_sessions(&http, &hub, target, Duration::from_secs(240)).await;
        let live = live_sessions(&http, &hub).await;
        println!(
            "  {target:>6} sessions: {} live, hub RSS {:.0} MiB, step took {:.0} s{}",
            live,
            rss_mib(pid)?,
            t.elapsed().as_secs_f64(),
            if ok { "" } else { "  <- not all came up" }
        );
        if !ok {
            break;
        }
        held = target;
        target += step;
    }
    // Hold the largest count for one heartbeat period and measure the hub at rest.
    let cpu0 = process_cpu_seconds(pid)?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let cpu = process_cpu_seconds(pid)? - cpu0;
    println!(
        "  holding {} sessions: hub CPU {:.1}% of one core (heartbeats only), RSS {:.0} MiB",
        live_sessions(&http, &hub).await,
        cpu / t.elapsed().as_secs_f64() * 100.0,
        rss_mib(pid)?
    );
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    drover_shared::telemetry::init_with_default("warn");
    let cli = Cli::parse();
    match cli.bench {
        Bench::Sessions {
            sessions: n,
            vms_per_cluster,
            deltas_per_sec,
            seconds,
            commands_per_sec,
            max_sessions,
            step,
        } => {
            sessions(
                n,
                vms_per_cluster,
                deltas_per_sec,
                seconds,
                commands_per_sec,
                max_sessions,
                step,
            )
            .await
        }
        Bench::Migration(args) => migration::run(args).await,
        Bench::Tunnel(args) => tunnel::run(args).await,
        Bench::Inventory {
            clusters,
            vms_per_cluster,
            iterations,
            deltas,
        } => {
            println!(
                "machine: {} cores, {}",
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                std::fs::read_to_string("/proc/cpuinfo")
                    .ok()
                    .and_then(
                        |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                            .split(':')
                            .nth(1)
                            .unwrap_or("")
                            .trim()
                            .to_owned())
                    )
                    .unwrap_or_default()
            );
            inventory(clusters, vms_per_cluster, iterations, deltas).await
        }
    }
}
