//! `drover-agent`: the spoke agent binary (skeleton: the hub session arrives with the agent issue).

use clap::Parser;

/// Drover's spoke agent. Joining a hub is not implemented yet; this binary only validates its
/// arguments so that deployment tooling can already call it.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The hub's agent URL, e.g. https://hub.example:8443
    #[arg(long, env = "DROVER_HUB")]
    hub: Option<String>,
    /// This cluster's name in the fleet (a DNS-1123 label).
    #[arg(long, env = "DROVER_CLUSTER")]
    cluster: Option<drover_shared::ClusterName>,
}

fn main() -> anyhow::Result<()> {
    drover_shared::telemetry::init();
    let args = Args::parse();
    tracing::info!(?args, "drover-agent skeleton");
    anyhow::bail!(
        "drover-agent cannot join a hub yet: the hub session is not implemented in this version"
    )
}
