//! How long a plan takes. The model: a migration copies `bytes = memory + disks` at its rate and
//! holds its slots for `setup + bytes / rate` seconds (setup: preparing the receiver and the
//! switchover). Its rate is its per-migration bandwidth (policy or `bandwidthPerMigration`),
//! capped by its pair's budget; a migration that neither limits gets the whole pair budget, and
//! where there is no budget either, [`DurationModel::unlimited_link_bytes_per_sec`]. Rates are
//! reserved, never shared (as admission reserves them), so one migration's speed does not depend
//! on the others. The plan's estimate runs the scheduler's admission over the plan's queue in
//! virtual time with exactly these durations (no jitter, no failures) and reports when the last
//! migration ends, next to the lower bound the limits allow (see [`crate::core::planner::simulation`]).

use serde::{Deserialize, Serialize};

use crate::core::admission::{AdmissionLimits, MigrationRequest};
use crate::core::planner::simulation::{self, SimulationSettings};

/// What the estimate assumes for a link nobody limits: 1 GiB/s.
pub const ASSUMED_LINK_BYTES_PER_SEC: u64 = 1 << 30;
/// Preparing the receiver and switching over, per migration.
pub const DEFAULT_SETUP_SECONDS: f64 = 10.0;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DurationModel {
    /// Seconds per migration on top of its copy.
    pub setup_seconds: f64,
    /// Bytes per second of a migration that neither it nor its pair limits.
    pub unlimited_link_bytes_per_sec: u64,
}

impl Default for DurationModel {
    fn default() -> Self {
        Self {
            setup_seconds: DEFAULT_SETUP_SECONDS,
            unlimited_link_bytes_per_sec: ASSUMED_LINK_BYTES_PER_SEC,
        }
    }
}

impl DurationModel {
    /// The rate of a migration limited to `bandwidth` (0: unlimited) on a pair with `budget`
    /// (0: none).
    pub fn rate(&self, bandwidth: u64, budget: u64) -> u64 {
        let limit = match (bandwidth, budget) {
            (0, 0) => self.unlimited_link_bytes_per_sec,
            (0, b) => b,
            (m, 0) => m,
            (m, b) => m.min(b),
        };
        limit.max(1)
    }

    /// Seconds a migration of `bytes` at `rate` holds its slots.
    pub fn seconds(&self, bytes: u64, rate: u64) -> f64 {
        self.setup_seconds + bytes as f64 / rate.max(1) as f64
    }
}

/// The plan's estimated duration.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanEstimate {
    /// When the last migration would end, from the start, if every one takes its modelled time.
    pub seconds: f64,
    /// No schedule under these limits can be shorter.
    pub lower_bound_seconds: f64,
    /// The limit that sets the lower bound.
    pub bottleneck: String,
    pub total_bytes: u64,
    /// The model in one sentence.
    pub model: String,
}

/// Estimates the queue `requests` under `limits`.
pub fn estimate(
    requests: &[MigrationRequest],
    limits: &AdmissionLimits,
    durations: &DurationModel,
) -> PlanEstimate {
    let total_bytes = requests.iter().map(|r| r.bytes).sum();
    let model = format!(
        "each migration holds its slots for {:.0} s + (memory + disks) / rate; its rate is its bandwidth limit capped by its pair's budget ({} MiB/s where neither limits it); slots refill as soon as one frees",
        durations.setup_seconds,
        durations.unlimited_link_bytes_per_sec >> 20
    );
    if requests.is_empty() {
        return PlanEstimate {
            total_bytes,
            model,
            ..PlanEstimate::default()
        };
    }
    let settings = SimulationSettings {
        check_limits: false,
        ..SimulationSettings::deterministic(*durations)
    };
    let report = simulation::simulate(requests.to_vec(), limits, &settings);
    PlanEstimate {
        seconds: report.makespan_seconds,
        lower_bound_seconds: report.lower_bound.seconds,
        bottleneck: report.lower_bound.binding.clone(),
        total_bytes,
        model,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_the_tighter_of_the_migration_and_pair_limits() {
        let d = DurationModel::default();
        assert_eq!(d.rate(0, 0), ASSUMED_LINK_BYTES_PER_SEC);
        assert_eq!(d.rate(0, 100), 100);
        assert_eq!(d.rate(50, 0), 50);
        assert_eq!(d.rate(50, 100), 50);
        assert_eq!(d.rate(500, 100), 100);
        assert_eq!(d.seconds(1000, 100), DEFAULT_SETUP_SECONDS + 10.0);
    }
}
