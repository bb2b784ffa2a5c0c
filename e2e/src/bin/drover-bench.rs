//! `drover-bench`: benchmarks that print figures as ratios against a baseline measured in the
//! same run. `drover-bench inventory` measures the hub's fleet page against hand-written SQL,
//! SQL statements per request, and inventory ingest rates on PostgreSQL and SQLite.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use drover_e2e::postgres::PgCluster;
use drover_e2e::testbed::{snapshot, vm, Backend, TestHub};
use drover_hub::seed::SeedPlan;
use drover_hub::store::sql::Sql;
use drover_shared::inventory::{InventoryChange, InventoryDelta};
use drover_shared::ClusterName;
use sea_orm::{ConnectionTrait, DatabaseConnection, QueryResult};
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Parser)]
#[command(about = "Drover benchmarks; figures go to docs/benchmarks.md")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
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
    let report = drover_hub::seed::seed(
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
        async move {
            let body = http
                .post(url)
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
    drop(served);

    println!("\ninventory ingest (VM deltas, each delta one transaction):");
    for backend in [Backend::Postgres, Backend::Sqlite] {
        let (single, batched) = ingest_rates(backend, deltas).await?;
        println!("  {backend:?}: {single:.0} single-VM deltas/s, {batched:.0} VM changes/s in deltas of 100");
    }
    let _ = pg;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    drover_shared::telemetry::init_with_default("warn");
    let cli = Cli::parse();
    match cli.bench {
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
