//! `drover-agent`: run the agent (the default: join once if needed, then keep the hub session,
//! report the cluster and execute commands), or `join` / `check` / `renew` its identity.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use drover_agent::commands::CommandExecutor;
use drover_agent::identity::{AgentIdentity, IdentityError};
use drover_agent::runtime::qemu::{Accel, QemuOptions, QemuRuntime};
use drover_agent::session::{self, SessionStatus};
use drover_shared::ClusterName;

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
    /// The hub's agent endpoint, e.g. https://hub.example:8443
    #[arg(long, env = "DROVER_HUB", global = true)]
    hub: Option<String>,
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
    let mut options = QemuOptions::new(&common.data_dir);
    options.qemu_binary = args.qemu_binary.clone();
    options.qemu_img = args.qemu_img.clone();
    options.accel = match args.accel {
        AccelChoice::Auto => Accel::Auto,
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
    };
    options.cluster_labels = labels(&args.labels)?;
    let runtime = QemuRuntime::open(options)
        .await
        .context("cannot start the qemu runtime")?;
    let commands = CommandExecutor::open(&common.data_dir, runtime.clone())
        .context("cannot open the command journal")?;
    let (status_tx, status) = tokio::sync::watch::channel(SessionStatus::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let session = tokio::spawn(session::run(
        identity,
        common.data_dir.clone(),
        hub.to_owned(),
        runtime.clone(),
        commands,
        status_tx,
        stop,
    ));
    println!(
        "drover-agent running as cluster {cluster} (runtime qemu, data dir {}); hub {hub}",
        common.data_dir.display()
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
    drover_shared::telemetry::init();
    let cli = Cli::parse();
    let common = &cli.common;
    let hub = common
        .hub
        .clone()
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
