//! The hub's configuration, read once (from flags and environment, in `main`) into one typed
//! struct that everything else is given: where the database is, who this replica is, where to
//! listen, and the limits of sessions and of the scheduler.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::agents::sessions::SessionTiming;
use crate::core::admission::{self, PairBandwidth};

/// Everything a hub process is told.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The database: a PostgreSQL URL or the embedded SQLite file's.
    pub database_url: String,
    /// How long to wait for the database at start-up.
    pub database_wait: Duration,
    /// Where the embedded database, the CA (unless given) and the replica's name live.
    pub data_dir: PathBuf,
    /// The CA to issue agent certificates with (certificate, key); else one in `data_dir`.
    pub ca: Option<(PathBuf, PathBuf)>,
    /// Where each migration's trace is exported (OTLP/HTTP base URL), if anywhere.
    pub otlp_endpoint: Option<String>,
    /// Who this hub is among the replicas on one database.
    pub replica: ReplicaSettings,
    /// The HTTP API's address.
    pub listen: SocketAddr,
    /// Web origins whose pages may call the API besides the hub's own.
    pub allowed_origins: Vec<String>,
    /// The agent endpoint's address (mutual TLS).
    pub agent_listen: SocketAddr,
    /// Names agents reach the hub by, for its server certificate.
    pub agent_server_names: Vec<String>,
    /// Heartbeats and silence of agent sessions.
    pub sessions: SessionTiming,
    /// The fleet-wide limits the scheduler admits under.
    pub scheduler: SchedulerSettings,
}

/// Who this hub is among the replicas on one database.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// Recorded on the leases of the migrations it drives.
    pub name: String,
    /// How long another replica waits for this one to renew a lease before taking over.
    pub lease: Duration,
}

impl Default for ReplicaSettings {
    /// A fresh name (a process that restarts under it takes its own migrations back at once;
    /// under a new one, after the lease time).
    fn default() -> Self {
        Self {
            name: crate::store::leases::fresh_replica_name(),
            lease: crate::store::leases::DEFAULT_LEASE,
        }
    }
}

/// Fleet-wide settings of the scheduler (hub flags).
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// Migrations in flight in the whole fleet at most.
    pub max_in_flight: usize,
    /// Bytes per second one cluster pair may carry (0: unlimited), for pairs not in
    /// `pair_budgets`.
    pub pair_bandwidth_bytes_per_sec: u64,
    /// Budgets of named (directed) cluster pairs, over the default.
    pub pair_budgets: Vec<admission::PairBudget>,
    /// How many times an evacuation's migration of one VM may be attempted.
    pub max_attempts: i32,
    /// No rebalance starts within this many seconds of the previous one, whatever a request
    /// asks for (a request may only ask for longer).
    pub rebalance_hold_down_secs: u64,
}

impl SchedulerSettings {
    /// The bandwidth budgets of cluster pairs: the named ones, and the default for the rest.
    pub fn pair_bandwidth(&self) -> PairBandwidth {
        PairBandwidth {
            default_bytes_per_sec: self.pair_bandwidth_bytes_per_sec,
            pairs: self.pair_budgets.clone(),
        }
    }
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 20,
            pair_bandwidth_bytes_per_sec: 0,
            pair_budgets: Vec::new(),
            max_attempts: 3,
            rebalance_hold_down_secs: 3600,
        }
    }
}
