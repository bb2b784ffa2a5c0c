//! `drover-hub`: serve the hub (the default command) or seed a synthetic fleet.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use drover_hub::config::{HubConfig, ReplicaSettings};
use drover_hub::inventory::seed::SeedPlan;
use drover_hub::store::{redact, sqlite_url};
use drover_hub::Hub;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Drover's hub: fleet inventory, GraphQL API, migration orchestration"
)]
struct Cli {
    #[command(flatten)]
    db: DatabaseArgs,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug, Clone)]
struct DatabaseArgs {
    /// PostgreSQL URL (postgres://user:password@host/db). Without it the hub keeps an embedded
    /// SQLite file in --data-dir.
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// Where the embedded database and other state live.
    #[arg(
        long,
        env = "DROVER_DATA_DIR",
        default_value = "./drover-data",
        global = true
    )]
    data_dir: PathBuf,
    /// How long to wait for the database at start-up.
    #[arg(
        long,
        env = "DROVER_DATABASE_WAIT_SECS",
        default_value_t = 60,
        global = true
    )]
    database_wait_secs: u64,
    /// The CA certificate (PEM) to issue agent certificates with; without it the hub creates
    /// its own CA in --data-dir on first start.
    #[arg(long, env = "DROVER_CA_CERT", requires = "ca_key", global = true)]
    ca_cert: Option<PathBuf>,
    /// The CA's private key (PKCS#8 PEM).
    #[arg(long, env = "DROVER_CA_KEY", requires = "ca_cert", global = true)]
    ca_key: Option<PathBuf>,
    /// Export each migration's trace to this OTLP/HTTP collector (base URL, e.g.
    /// http://collector:4318; spans go to /v1/traces). Without it nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    otlp_endpoint: Option<String>,
    /// This hub's name among replicas on one PostgreSQL (recorded on the leases of the
    /// migrations it drives). Without it a name is made once and kept in --data-dir.
    #[arg(long, env = "DROVER_REPLICA_NAME", global = true, value_parser = parse_replica_name)]
    replica_name: Option<String>,
    /// Seconds another replica waits for this one to renew its leases before it takes this
    /// one's migrations over (the hub renews them every second).
    #[arg(long, env = "DROVER_LEASE_SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=3600), global = true)]
    lease_secs: u64,
}

fn parse_replica_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 200 || !s.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "{s:?} is not a usable replica name: use 1 to 200 printable ASCII characters without spaces"
        ));
    }
    Ok(s.to_owned())
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the GraphQL API and health endpoints (the default).
    Serve,
    /// Load a synthetic fleet through the ingest path, for demos and benchmarks.
    Seed(SeedArgs),
    /// Manage API tokens directly in the database (no running hub needed: the break-glass way
    /// to the first admin token).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token and print its secret (shown once).
    Create {
        /// A name for the token (who or what uses it), unique.
        #[arg(long)]
        name: String,
        /// viewer (reads), migrator (also moves VMs) or admin (everything).
        #[arg(long, value_parser = parse_role)]
        role: drover_graphql::access::Role,
        /// Days until it expires; without it the token does not expire.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3650))]
        expires_in_days: Option<u32>,
    },
    /// Revoke a token by name.
    Revoke { name: String },
    /// List the tokens (never their secrets).
    List,
}

fn parse_role(s: &str) -> Result<drover_graphql::access::Role, String> {
    drover_graphql::access::Role::parse(s)
        .ok_or_else(|| format!("{s:?} is not a role: use viewer, migrator or admin"))
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "DROVER_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    listen: SocketAddr,
    /// A web origin (scheme://host[:port]) whose pages may call the API, e.g. a console served
    /// elsewhere; repeat for more. Requests from other origins are refused (the hub's own
    /// GraphiQL and clients that are not browsers are always let through).
    #[arg(
        long = "allowed-origin",
        env = "DROVER_ALLOWED_ORIGINS",
        value_delimiter = ',',
        global = true
    )]
    allowed_origins: Vec<String>,
    /// Address of the agent endpoint (mutual TLS).
    #[arg(
        long,
        env = "DROVER_AGENT_LISTEN",
        default_value = "127.0.0.1:8443",
        global = true
    )]
    agent_listen: SocketAddr,
    /// Names agents reach the hub by (DNS names or IP addresses), for its server certificate.
    #[arg(
        long = "agent-server-name",
        env = "DROVER_AGENT_SERVER_NAMES",
        value_delimiter = ',',
        default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()],
        global = true
    )]
    agent_server_names: Vec<String>,
    /// How often agents send heartbeats (the hub tells them at hello).
    #[arg(long, env = "DROVER_HEARTBEAT_INTERVAL_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300), global = true)]
    heartbeat_interval_secs: u64,
    /// Silence after which an agent's session is closed and its cluster is Unreachable (it is
    /// never evacuated for that alone). Must exceed the heartbeat interval.
    #[arg(long, env = "DROVER_SILENCE_LIMIT_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..=3600), global = true)]
    silence_limit_secs: u64,
    /// Migrations in flight in the whole fleet at most (each cluster's own
    /// parallelMigrationsPerCluster and parallelOutboundMigrationsPerNode apply as well).
    #[arg(long, env = "DROVER_MAX_MIGRATIONS_IN_FLIGHT", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000), global = true)]
    max_migrations_in_flight: u64,
    /// Bytes per second the migrations between one pair of clusters may use together (each
    /// reserves its bandwidth limit); 0 means unlimited.
    #[arg(
        long,
        env = "DROVER_PAIR_BANDWIDTH",
        default_value_t = 0,
        global = true
    )]
    pair_bandwidth_bytes_per_sec: u64,
    /// The budget of one (directed) cluster pair, over --pair-bandwidth:
    /// SOURCE:TARGET=BYTES_PER_SEC (0: unlimited); repeat the flag or separate with commas.
    #[arg(
        long = "pair-bandwidth-for",
        env = "DROVER_PAIR_BANDWIDTH_FOR",
        value_delimiter = ',',
        value_parser = parse_pair_budget,
        global = true
    )]
    pair_budgets: Vec<drover_hub::core::admission::PairBudget>,
    /// How many times an evacuation tries to move one VM (a retry only when the source still
    /// runs and the target was cleaned up).
    #[arg(long, env = "DROVER_MIGRATION_ATTEMPTS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20), global = true)]
    migration_attempts: u64,
    /// No rebalance starts within this many seconds of the previous one; a request's
    /// holdDownSeconds may only make it longer.
    #[arg(long, env = "DROVER_REBALANCE_HOLD_DOWN_SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(0..=30 * 86_400), global = true)]
    rebalance_hold_down_secs: u64,
}

/// `east-1:west-1=268435456`: the budget of migrations from east-1 to west-1.
fn parse_pair_budget(text: &str) -> Result<drover_hub::core::admission::PairBudget, String> {
    let usage = "expected SOURCE:TARGET=BYTES_PER_SEC, e.g. east-1:west-1=268435456";
    let (pair, bytes) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: {usage}"))?;
    let (source, target) = pair
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: {usage}"))?;
    let name = |n: &str| {
        drover_shared::ClusterName::new(n.trim().to_owned())
            .map(|c| c.to_string())
            .map_err(|e| format!("{text:?}: {e}"))
    };
    let bytes_per_sec = bytes.trim().parse::<u64>().map_err(|e| {
        format!("{text:?}: the budget {bytes:?} is not a number of bytes per second ({e}); {usage}")
    })?;
    Ok(drover_hub::core::admission::PairBudget {
        source: name(source)?,
        target: name(target)?,
        bytes_per_sec,
    })
}

impl ServeArgs {
    fn scheduler_settings(&self) -> drover_hub::config::SchedulerSettings {
        drover_hub::config::SchedulerSettings {
            max_in_flight: self.max_migrations_in_flight as usize,
            pair_bandwidth_bytes_per_sec: self.pair_bandwidth_bytes_per_sec,
            pair_budgets: self.pair_budgets.clone(),
            max_attempts: self.migration_attempts as i32,
            rebalance_hold_down_secs: self.rebalance_hold_down_secs,
        }
    }

    fn session_timing(&self) -> anyhow::Result<drover_hub::agents::sessions::SessionTiming> {
        anyhow::ensure!(
            self.silence_limit_secs > self.heartbeat_interval_secs,
            "--silence-limit-secs ({}) must be longer than --heartbeat-interval-secs ({}), or every cluster would flap to Unreachable",
            self.silence_limit_secs,
            self.heartbeat_interval_secs
        );
        Ok(drover_hub::agents::sessions::SessionTiming {
            heartbeat_interval: Duration::from_secs(self.heartbeat_interval_secs),
            silence_limit: Duration::from_secs(self.silence_limit_secs),
            ..Default::default()
        })
    }
}

#[derive(Args, Debug)]
struct SeedArgs {
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    clusters: u32,
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    vms_per_cluster: u32,
    /// Random seed: the same seed gives the same fleet.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl DatabaseArgs {
    fn url(&self) -> anyhow::Result<String> {
        match &self.database_url {
            Some(url) => Ok(url.clone()),
            None => {
                std::fs::create_dir_all(&self.data_dir).with_context(|| {
                    format!(
                        "cannot create data directory {}; pass --data-dir with a writable path",
                        self.data_dir.display()
                    )
                })?;
                Ok(sqlite_url(&self.data_dir))
            }
        }
    }
}

impl Cli {
    /// The one typed configuration, read and checked once: every later step is given it.
    fn config(&self) -> anyhow::Result<HubConfig> {
        let db = &self.db;
        let serve = &self.serve;
        let database_url = db.url()?;
        let name = drover_hub::store::leases::replica_name(db.replica_name.as_deref(), &db.data_dir)
            .with_context(|| {
                format!(
                    "cannot keep this replica's name in {}; pass --replica-name or a writable --data-dir",
                    db.data_dir.display()
                )
            })?;
        Ok(HubConfig {
            database_url,
            database_wait: Duration::from_secs(db.database_wait_secs),
            data_dir: db.data_dir.clone(),
            ca: db.ca_cert.clone().zip(db.ca_key.clone()),
            otlp_endpoint: db.otlp_endpoint.clone(),
            replica: ReplicaSettings {
                name,
                lease: Duration::from_secs(db.lease_secs),
            },
            listen: serve.listen,
            allowed_origins: serve.allowed_origins.clone(),
            agent_listen: serve.agent_listen,
            agent_server_names: serve.agent_server_names.clone(),
            sessions: serve.session_timing()?,
            scheduler: serve.scheduler_settings(),
        })
    }
}

async fn open(config: &HubConfig) -> anyhow::Result<Hub> {
    tracing::info!(database = %redact(&config.database_url), replica = %config.replica.name, lease = ?config.replica.lease, "opening inventory store");
    Hub::open_configured(config)
        .await
        .context("cannot open the inventory store")
}

/// How long SIGTERM or Ctrl-C waits for open work to end before the hub exits anyway.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.config()?;
    let export =
        config
            .otlp_endpoint
            .clone()
            .map(|endpoint| drover_shared::telemetry::TraceExport {
                endpoint,
                service: "drover-hub".into(),
                attributes: Vec::new(),
            });
    let telemetry =
        drover_shared::telemetry::init_with_export(export).map_err(anyhow::Error::msg)?;
    let result = execute(cli.command.unwrap_or(Command::Serve), config).await;
    telemetry.shutdown();
    result
}

async fn execute(command: Command, config: HubConfig) -> anyhow::Result<()> {
    match command {
        Command::Serve => {
            let args = &config;
            // Waiting for the database (up to --database-wait-secs) yields to SIGTERM.
            let hub = tokio::select! {
                hub = open(&config) => hub?,
                () = shutdown_signal() => return Ok(()),
            };
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {}; is another process using it? pass --listen",
                        args.listen
                    )
                })?;
            let addr = listener.local_addr()?;
            let agent_tcp = tokio::net::TcpListener::bind(args.agent_listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen for agents on {}; is another process using it? pass --agent-listen",
                        args.agent_listen
                    )
                })?;
            let agent_addr = agent_tcp.local_addr()?;
            let agents = hub
                .agent_listener(agent_tcp, &args.agent_server_names)
                .context("cannot set up the agent endpoint's TLS")?;
            println!("drover-hub listening on http://{addr}");
            println!("  GraphiQL:  http://{addr}/graphql   (try: {{ fleet {{ clusters {{ total ready }} virtualMachines {{ total running }} }} }})");
            println!("  health:    http://{addr}/healthz  http://{addr}/readyz  metrics: http://{addr}/metrics");
            println!("  agents:    https://{agent_addr} (mutual TLS; join tokens: mutation {{ createJoinToken(cluster: \"east-1\") {{ token }} }})");
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            let api = hub.serve(listener, stopped(stop_rx.clone()));
            let agent_api = hub.serve_agents(agents, stopped(stop_rx.clone()));
            let replicas = hub.run_replicas(stopped(stop_rx.clone()));
            let background = hub.run_scheduler(stopped(stop_rx));
            let work = async { tokio::join!(api, agent_api, background, replicas) };
            tokio::pin!(work);
            let (api, agent_api, (), ()) = tokio::select! {
                ended = &mut work => ended,
                () = shutdown_signal() => {
                    // Drain within a bound: open subscriptions and agent sessions end, the
                    // drivers stop at their next step (the rows say where each was; the next
                    // start resumes them), then the process exits whatever is still open.
                    tracing::info!(grace = ?SHUTDOWN_GRACE, "stopping");
                    let _ = stop_tx.send(true);
                    if !hub.migrations.stop_drivers(SHUTDOWN_GRACE).await {
                        tracing::warn!("some migration drivers did not stop in time");
                    }
                    match tokio::time::timeout(SHUTDOWN_GRACE, &mut work).await {
                        Ok(ended) => ended,
                        Err(_) => {
                            tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; exiting");
                            return Ok(());
                        }
                    }
                }
            };
            api?;
            agent_api?;
        }
        Command::Token(command) => {
            let store = drover_hub::store::Store::open(&config.database_url)
                .await
                .context("cannot open the inventory store")?;
            let tokens = drover_hub::store::tokens::TokenRows::new(store.clone());
            match command {
                TokenCommand::Create {
                    name,
                    role,
                    expires_in_days,
                } => {
                    let expires_at = expires_in_days
                        .map(|d| store.clock.now() + chrono::Duration::days(d as i64));
                    let actor = format!(
                        "cli:{}",
                        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
                    );
                    let (record, secret) = tokens
                        .create(&name, role.as_str(), expires_at, &actor)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    drover_hub::store::clusters::audit(
                        &store,
                        &actor,
                        "createApiToken",
                        &record.name,
                        "ok",
                        serde_json::json!({"role": record.role, "expiresAt": record.expires_at, "via": "drover-hub token create"}),
                    )
                    .await
                    .context("the token was created but the audit log could not be written")?;
                    eprintln!(
                        "created token {:?} with role {}{}; it is shown once:",
                        record.name,
                        record.role,
                        record
                            .expires_at
                            .map(|at| format!(", expiring {at}"))
                            .unwrap_or_default()
                    );
                    println!("{secret}");
                }
                TokenCommand::Revoke { name } => {
                    let revoked = tokens.revoke(&name).await?;
                    anyhow::ensure!(
                        revoked,
                        "no unrevoked token is named {name:?}; `drover-hub token list` shows them"
                    );
                    drover_hub::store::clusters::audit(
                        &store,
                        &format!(
                            "cli:{}",
                            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
                        ),
                        "revokeApiToken",
                        &name,
                        "ok",
                        serde_json::json!({"via": "drover-hub token revoke"}),
                    )
                    .await?;
                    eprintln!("revoked {name:?} (hubs refuse it within 5 s)");
                }
                TokenCommand::List => {
                    for t in tokens.list().await? {
                        println!(
                            "{}\t{}\tcreated {} by {}\texpires {}\t{}",
                            t.name,
                            t.role,
                            t.created_at,
                            t.created_by,
                            t.expires_at.map_or("never".into(), |e| e.to_string()),
                            t.revoked_at
                                .map_or("active".into(), |r| format!("revoked {r}")),
                        );
                    }
                }
            }
        }
        Command::Seed(args) => {
            let hub = open(&config).await?;
            let plan = SeedPlan {
                clusters: args.clusters as usize,
                vms_per_cluster: args.vms_per_cluster as usize,
                seed: args.seed,
            };
            let started = std::time::Instant::now();
            let total = plan.clusters;
            let report = drover_hub::inventory::seed::seed(&hub.ingest, &plan, |done| {
                if done % 50 == 0 || done == total {
                    eprintln!("seeded {done}/{total} clusters");
                }
            })
            .await
            .context("seeding failed; nothing of the failing cluster was written")?;
            println!(
                "seeded {} clusters, {} nodes, {} virtual machines ({} not migratable; {} degraded, {} unreachable, {} in maintenance) in {:.1}s",
                report.clusters,
                report.nodes,
                report.vms,
                report.not_migratable,
                report.degraded,
                report.unreachable,
                report.in_maintenance,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_budget_reads_source_target_and_bytes_or_says_what_is_wrong() {
        let budget = parse_pair_budget("east-1:west-1=268435456").unwrap();
        assert_eq!(
            (
                budget.source.as_str(),
                budget.target.as_str(),
                budget.bytes_per_sec
            ),
            ("east-1", "west-1", 268_435_456)
        );
        for (bad, says) in [
            ("east-1=5", "SOURCE:TARGET=BYTES_PER_SEC"),
            ("east-1:west-1", "SOURCE:TARGET=BYTES_PER_SEC"),
            ("east-1:west-1=fast", "not a number"),
            ("East_1:west-1=5", "East_1"),
        ] {
            let err = parse_pair_budget(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
