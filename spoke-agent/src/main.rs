//! `drover-agent`: join a hub (`join`), check the stored identity (`check`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use drover_agent::identity::AgentIdentity;
use drover_shared::ClusterName;

#[derive(Parser, Debug)]
#[command(version, about = "Drover's spoke agent")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Common {
    /// The hub's agent endpoint, e.g. https://hub.example:8443
    #[arg(long, env = "DROVER_HUB", global = true)]
    hub: Option<String>,
    /// Where the agent keeps its key, certificate and state.
    #[arg(
        long,
        env = "DROVER_AGENT_DATA_DIR",
        default_value = "./drover-agent-data",
        global = true
    )]
    data_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join the hub once with a token from `createJoinToken`; stores this cluster's identity.
    Join {
        /// This cluster's name in the fleet (a DNS-1123 label).
        #[arg(long, env = "DROVER_CLUSTER")]
        cluster: ClusterName,
        /// The one-time token (it also pins the hub's CA).
        #[arg(long, env = "DROVER_JOIN_TOKEN")]
        join_token: String,
    },
    /// Check the stored identity against the hub over mutual TLS.
    Check,
    /// Renew this agent's certificate now (the session also renews it when it is due).
    Renew,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    drover_shared::telemetry::init();
    let cli = Cli::parse();
    let hub = cli
        .common
        .hub
        .context("--hub (or DROVER_HUB) is required: the hub's agent endpoint, e.g. https://hub.example:8443")?;
    match cli.command {
        Command::Join {
            cluster,
            join_token,
        } => {
            let identity = AgentIdentity::join(&cli.common.data_dir, &hub, &cluster, &join_token)
                .await
                .context("joining the hub failed")?;
            println!(
                "joined {hub} as cluster {}; identity stored in {}",
                identity.cluster,
                cli.common.data_dir.display()
            );
        }
        Command::Renew => {
            let mut identity = AgentIdentity::load(&cli.common.data_dir)?;
            identity
                .renew(&cli.common.data_dir, &hub)
                .await
                .context("renewing the certificate failed")?;
            println!("renewed the certificate of cluster {}", identity.cluster);
        }
        Command::Check => {
            let identity = AgentIdentity::load(&cli.common.data_dir)?;
            let cluster = identity
                .check(&hub)
                .await
                .context("checking the identity with the hub failed")?;
            println!("the hub knows this agent as cluster {cluster}");
        }
    }
    Ok(())
}
