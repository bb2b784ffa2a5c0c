//! `drover-agent`: run the agent (the default: join once if needed, then keep the hub session,
//! report the cluster and execute commands), or `join` / `check` / `renew` its identity.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use drover_agent::commands::CommandExecutor;
use drover_agent::identity::{AgentIdentity, IdentityError};
use drover_agent::migrate::MigrationController;
use drover_agent::runtime::qemu::{Accel, QemuOptions, QemuRuntime};
use drover_agent::runtime::{QemuAgent, QemuMigrations};
use drover_agent::session::{self, SessionStatus};
use drover_agent::sync::SyncEndpoint;
use drover_shared::telemetry::TraceExport;
use drover_shared::ClusterName;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Drover's spoke agent: joins the hub, reports this cluster, runs the hub's commands"
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    run: RunArgs,
    /// Without a command the agent runs.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug)]
struct Common {
    /// The hub's agent endpoint, e.g. https://hub.example:8443; repeat the flag (or separate
    /// with commas) for the replicas of a hub: the session fails over from one to the next.
    /// Joining, renewing and checking use the first.
    #[arg(long = "hub", env = "DROVER_HUB", value_delimiter = ',', global = true)]
    hubs: Vec<String>,
    /// Where the agent keeps its key, certificate, command journal and (qemu) VMs.
    #[arg(
        long,
        env = "DROVER_AGENT_DATA_DIR",
        default_value = "./drover-agent-data",
        global = true
    )]
    data_dir: PathBuf,
    /// This cluster's name in the fleet (a DNS-1123 label); needed to join.
    #[arg(long, env = "DROVER_CLUSTER", global = true)]
    cluster: Option<ClusterName>,
    /// The one-time token from `createJoinToken` (it also pins the hub's CA); used only when
    /// the data dir holds no identity yet.
    #[arg(long, env = "DROVER_JOIN_TOKEN", global = true)]
    join_token: Option<String>,
    /// Export each migration's spans to this OTLP/HTTP collector (base URL, e.g.
    /// http://collector:4318; spans go to /v1/traces). Without it nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RuntimeChoice {
    /// VMs as local QEMU processes (plain KVM hosts, the demo fleet, the tests).
    Qemu,
    /// A KubeVirt / OpenShift Virtualization cluster.
    Kubevirt,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AccelChoice {
    /// KVM when /dev/kvm is usable, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[arg(long, env = "DROVER_RUNTIME", value_enum, default_value = "qemu")]
    runtime: RuntimeChoice,
    /// qemu runtime: the accelerator.
    #[arg(long, env = "DROVER_QEMU_ACCEL", value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// qemu runtime: the QEMU system emulator.
    #[arg(long, env = "DROVER_QEMU_BINARY", default_value = "qemu-system-x86_64")]
    qemu_binary: PathBuf,
    /// qemu runtime: qemu-img.
    #[arg(long, env = "DROVER_QEMU_IMG", default_value = "qemu-img")]
    qemu_img: PathBuf,
    /// qemu runtime: a directory VM specs may take disk images, kernels and initrds from
    /// (repeat the flag, or separate with commas). Paths are resolved (`..`, symlinks) and must
    /// lie inside one of these; without any, VMs may only have blank disks and no boot files.
    #[arg(long = "image-dir", env = "DROVER_IMAGE_DIRS", value_delimiter = ',')]
    image_dirs: Vec<PathBuf>,
    /// Where this agent's sync endpoint listens for peer agents (migrations into this cluster).
    #[arg(long, env = "DROVER_SYNC_LISTEN", default_value = "0.0.0.0:9185")]
    sync_listen: std::net::SocketAddr,
    /// The address peer agents reach the sync endpoint at (host:port), reported to the hub;
    /// defaults to the listen address.
    #[arg(long, env = "DROVER_SYNC_ADVERTISE")]
    sync_advertise: Option<String>,
    /// Bytes per second each migration from this cluster may use (disk copy and memory stream
    /// each); 0 = unlimited.
    #[arg(long, env = "DROVER_BANDWIDTH_PER_MIGRATION", default_value_t = 0)]
    bandwidth_per_migration: u64,
    /// Seconds without progress before a migration from this cluster is given up.
    #[arg(long, env = "DROVER_PROGRESS_TIMEOUT_SECS", default_value_t = 150)]
    progress_timeout_secs: u32,
    /// Allow auto-converge (throttling the guest's vCPUs) for migrations from this cluster.
    #[arg(long, env = "DROVER_ALLOW_AUTO_CONVERGE")]
    allow_auto_converge: bool,
    /// Migrations this cluster takes part in at once (as source or target); the hub's
    /// scheduler keeps to it.
    #[arg(long, env = "DROVER_PARALLEL_MIGRATIONS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    parallel_migrations: u32,
    /// Outbound migrations from one node at once.
    #[arg(long, env = "DROVER_PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100))]
    parallel_outbound_migrations_per_node: u32,
    /// Labels of this cluster, key=value (repeat or comma-separate).
    #[arg(long = "label", env = "DROVER_CLUSTER_LABELS", value_delimiter = ',')]
    labels: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join the hub once with --cluster and --join-token; stores this cluster's identity.
    Join,
    /// Check the stored identity against the hub over mutual TLS.
    Check,
    /// Renew this agent's certificate now (the running agent also renews it when it is due).
    Renew,
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term => {} }
}

/// The stored identity, or a new one from joining with the token.
async fn identity(common: &Common, hub: &str) -> anyhow::Result<AgentIdentity> {
    match AgentIdentity::load(&common.data_dir) {
        Ok(identity) => {
            if let Some(cluster) = &common.cluster {
                anyhow::ensure!(
                    *cluster == identity.cluster,
                    "{} holds the identity of cluster {}, not {cluster}; use another --data-dir for another cluster",
                    common.data_dir.display(),
                    identity.cluster
                );
            }
            Ok(identity)
        }
        Err(IdentityError::NotJoined { .. }) => {
            let (Some(cluster), Some(token)) = (&common.cluster, &common.join_token) else {
                anyhow::bail!(
                    "{} holds no identity yet: pass --cluster NAME and --join-token TOKEN (from the hub's createJoinToken mutation) to join",
                    common.data_dir.display()
                );
            };
            let identity = AgentIdentity::join(&common.data_dir, hub, cluster, token)
                .await
                .context("joining the hub failed")?;
            println!("joined {hub} as cluster {}", identity.cluster);
            Ok(identity)
        }
        Err(e) => Err(e).context("cannot load this agent's identity"),
    }
}

/// This host's name, for the advertised sync endpoint when listening on all addresses.
fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

fn labels(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .with_context(|| format!("label {p:?} is not key=value"))
        })
        .collect()
}

async fn run(common: &Common, args: &RunArgs, hub: &str) -> anyhow::Result<()> {
    if let RuntimeChoice::Kubevirt = args.runtime {
        anyhow::bail!(
            "the kubevirt runtime is not available in this build yet; use --runtime qemu"
        );
    }
    let identity = identity(common, hub).await?;
    let cluster = identity.cluster.clone();
    // The sync endpoint authenticates peers with this agent's certificate.
    let peer_identity = Arc::new(AgentIdentity::load(&common.data_dir)?);
    let sync = SyncEndpoint::new(&peer_identity).context("cannot set up the sync endpoint")?;
    let sync_listener = tokio::net::TcpListener::bind(args.sync_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for peer agents on {}; pass --sync-listen",
                args.sync_listen
            )
        })?;
    let sync_addr = sync_listener.local_addr()?;
    let advertise = args.sync_advertise.clone().unwrap_or_else(|| {
        if sync_addr.ip().is_unspecified() {
            format!("{}:{}", local_host_name(), sync_addr.port())
        } else {
            sync_addr.to_string()
        }
    });
    let mut options = QemuOptions::new(&common.data_dir);
    options.qemu_binary = args.qemu_binary.clone();
    options.qemu_img = args.qemu_img.clone();
    options.image_dirs = args.image_dirs.clone();
    options.accel = match args.accel {
        AccelChoice::Auto => Accel::Auto,
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
    };
    options.cluster_labels = labels(&args.labels)?;
    options.sync_endpoint = Some(advertise.clone());
    options.migration_config.bandwidth_per_migration = args.bandwidth_per_migration;
    options.migration_config.progress_timeout = args.progress_timeout_secs;
    options.migration_config.allow_auto_converge = args.allow_auto_converge;
    options.migration_config.parallel_migrations_per_cluster = args.parallel_migrations;
    options
        .migration_config
        .parallel_outbound_migrations_per_node = args.parallel_outbound_migrations_per_node;
    let runtime = QemuRuntime::open(options)
        .await
        .context("cannot start the qemu runtime")?;
    let (outbox, outbox_rx) = tokio::sync::mpsc::unbounded_channel();
    let migrations = MigrationController::new(
        Arc::new(QemuMigrations {
            runtime: runtime.clone(),
            vms_dir: common.data_dir.join("vms"),
        }),
        sync.clone(),
        peer_identity,
        &common.data_dir,
        outbox.clone(),
    );
    let handler = Arc::new(QemuAgent {
        runtime: runtime.clone(),
        migrations,
    });
    let commands =
        CommandExecutor::open_with_outbox(&common.data_dir, handler, (outbox, outbox_rx))
            .context("cannot open the command journal")?;
    let (status_tx, status) = tokio::sync::watch::channel(SessionStatus::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(sync.serve(sync_listener, stop.clone()));
    let session = tokio::spawn(session::run(
        identity,
        common.data_dir.clone(),
        common.hubs.clone(),
        runtime.clone(),
        commands,
        status_tx,
        stop,
    ));
    println!(
        "drover-agent running as cluster {cluster} (runtime qemu, data dir {}); hub {}; sync endpoint {advertise}",
        common.data_dir.display(),
        common.hubs.join(", ")
    );
    tokio::pin!(session);
    let ended_by_itself = tokio::select! {
        _ = shutdown_signal() => false,
        _ = &mut session => true,
    };
    if !ended_by_itself {
        tracing::info!("shutting down; the VMs keep running");
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut session).await;
    }
    // Never stops VMs: a restarted agent adopts them.
    runtime.shutdown();
    let last_error = status.borrow().last_error.clone();
    match last_error {
        Some(e) if ended_by_itself => anyhow::bail!("the agent stopped: {e}"),
        _ => Ok(()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let export = cli.common.otlp_endpoint.clone().map(|endpoint| {
        // The cluster names every span this agent exports (from the flag, or its identity).
        let cluster = cli.common.cluster.clone().or_else(|| {
            AgentIdentity::load(&cli.common.data_dir)
                .ok()
                .map(|identity| identity.cluster)
        });
        TraceExport {
            endpoint,
            service: "drover-agent".into(),
            attributes: cluster
                .iter()
                .map(|c| ("drover.cluster".to_owned(), c.to_string()))
                .collect(),
        }
    });
    let telemetry =
        drover_shared::telemetry::init_with_export(export).map_err(anyhow::Error::msg)?;
    let result = execute(cli).await;
    telemetry.shutdown();
    result
}

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let common = &cli.common;
    let hub = common
        .hubs
        .first()
        .cloned()
        .context("--hub (or DROVER_HUB) is required: the hub's agent endpoint, e.g. https://hub.example:8443")?;
    match cli.command {
        None => run(common, &cli.run, &hub).await?,
        Some(Command::Join) => {
            let (Some(cluster), Some(token)) = (&common.cluster, &common.join_token) else {
                anyhow::bail!("join needs --cluster NAME and --join-token TOKEN (from the hub's createJoinToken mutation)");
            };
            let identity = AgentIdentity::join(&common.data_dir, &hub, cluster, token)
                .await
                .context("joining the hub failed")?;
            println!(
                "joined {hub} as cluster {}; identity stored in {}",
                identity.cluster,
                common.data_dir.display()
            );
        }
        Some(Command::Renew) => {
            let mut identity = AgentIdentity::load(&common.data_dir)?;
            identity
                .renew(&common.data_dir, &hub)
                .await
                .context("renewing the certificate failed")?;
            println!("renewed the certificate of cluster {}", identity.cluster);
        }
        Some(Command::Check) => {
            let identity = AgentIdentity::load(&common.data_dir)?;
            let cluster = identity
                .check(&hub)
                .await
                .context("checking the identity with the hub failed")?;
            println!("the hub knows this agent as cluster {cluster}");
        }
    }
    Ok(())
}
