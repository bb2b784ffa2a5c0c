//! Rebalancing: moves that bring every cluster's memory utilisation within a band around the
//! fleet's utilisation `ū = Σ requests / Σ allocatable` (over the clusters that may take part:
//! Ready, not cordoned, gate on, sync endpoint, some memory). `ū` does not change when VMs move,
//! so it is a fixed aim.
//!
//! Greedy, one move at a time, at most `max_moves`: take the cluster furthest above `ū`; for each
//! VM there that may move, find its best target (every hard constraint, least utilised after,
//! only clusters below `ū`); the gain of a move is how much it lowers `Σ (u_c - ū)²`. Among the
//! moves with at least half the best gain, the one copying the fewest bytes wins (fewest bytes
//! moved without many tiny moves), ties by VM. A cluster that gave never takes and one that took
//! never gives in the same plan (no churn). It stops when every cluster is within the band, no
//! move gains, or the cap is reached.
//!
//! Hysteresis: nothing is planned within `hold_down_secs` of the previous rebalance, nor when the
//! plan would lower the largest deviation from `ū` by less than `min_improvement`. VMs that moved
//! in the last `recently_moved_secs`, pinned VMs and members of affinity groups (moving one alone
//! would split its group) stay; anti-affinity is never broken by a rebalance.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::targets::{self, Engine, Mode};
use super::{Enforcement, Fleet, Plan, PlanKind, PlanOptions, PINNED_LABEL};
use drover_shared::inventory::ClusterHealth;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceOptions {
    /// Width of the band around the fleet utilisation (0.10: within ū ± 0.05 is balanced).
    pub band: f64,
    /// The plan must lower the largest deviation from ū by at least this much (utilisation
    /// points, 0.02 = 2 %), or nothing moves.
    pub min_improvement: f64,
    pub max_moves: usize,
    /// Seconds after the previous rebalance during which nothing is planned.
    pub hold_down_secs: u64,
    pub last_rebalance_at: Option<DateTime<Utc>>,
    /// A VM that finished moving less than this many seconds ago stays.
    pub recently_moved_secs: u64,
}

impl Default for RebalanceOptions {
    fn default() -> Self {
        Self {
            band: 0.10,
            min_improvement: 0.02,
            max_moves: 20,
            hold_down_secs: 3600,
            last_rebalance_at: None,
            recently_moved_secs: 24 * 3600,
        }
    }
}

/// The largest |u_c - ū| over `clusters`.
fn largest_deviation(engine: &Engine, clusters: &[usize], mean: f64) -> f64 {
    clusters
        .iter()
        .map(|&c| (engine.loads[c].utilisation() - mean).abs())
        .fold(0.0, f64::max)
}

/// Plans a rebalance (see the module doc).
pub fn plan_rebalance(fleet: &Fleet, options: &PlanOptions, goal: &RebalanceOptions) -> Plan {
    let finish = |moves, notes| {
        targets::finish_plan(
            fleet,
            options,
            PlanKind::Rebalance,
            moves,
            Vec::new(),
            notes,
        )
    };
    if let Some(last) = goal.last_rebalance_at {
        let until =
            last + chrono::Duration::seconds(goal.hold_down_secs.min(i64::MAX as u64) as i64);
        if options.now < until {
            return finish(
                Vec::new(),
                vec![format!(
                    "held down: the previous rebalance was at {last}; the next may run from {until}"
                )],
            );
        }
    }
    let loads = targets::cluster_loads(fleet);
    let eligible: Vec<usize> = (0..fleet.clusters.len())
        .filter(|&c| {
            let cluster = &fleet.clusters[c];
            cluster.health == ClusterHealth::Ready
                && !cluster.cordoned
                && targets::has_live_migration_gate(cluster)
                && !cluster
                    .info
                    .sync_endpoint
                    .as_deref()
                    .unwrap_or("")
                    .is_empty()
                && loads[c].allocatable > 0
        })
        .collect();
    if eligible.len() < 2 {
        return finish(
            Vec::new(),
            vec!["fewer than two clusters can take part (Ready, not cordoned, live migration on, with memory): nothing to balance".into()],
        );
    }
    let total_load: u128 = eligible.iter().map(|&c| loads[c].load as u128).sum();
    let total_allocatable: u128 = eligible.iter().map(|&c| loads[c].allocatable as u128).sum();
    let mean = total_load as f64 / total_allocatable as f64;
    let half_band = goal.band / 2.0;
    let above: Vec<usize> = eligible
        .iter()
        .copied()
        .filter(|&c| loads[c].utilisation() > mean)
        .collect();
    let mut receiving = vec![false; fleet.clusters.len()];
    for &c in &eligible {
        receiving[c] = loads[c].utilisation() < mean;
    }

    // Who may move: VMs of clusters above the mean, but pinned, recent and grouped ones.
    let recent_window =
        chrono::Duration::seconds(goal.recently_moved_secs.min(i64::MAX as u64) as i64);
    let (mut pinned, mut recent, mut grouped) = (0usize, 0usize, 0usize);
    let mut movers = Vec::new();
    for &c in &above {
        let cluster = &fleet.clusters[c];
        for (v, vm) in cluster.vms.iter().enumerate() {
            if vm.labels.get(PINNED_LABEL).is_some_and(|p| p == "true") {
                pinned += 1;
                continue;
            }
            if vm.labels.contains_key(super::AFFINITY_LABEL) {
                grouped += 1;
                continue;
            }
            let moved_lately = super::vm_ref(&cluster.name, vm)
                .and_then(|key| fleet.last_moved.get(&key))
                .is_some_and(|at| options.now - *at < recent_window);
            if moved_lately {
                recent += 1;
                continue;
            }
            movers.push((c, v));
        }
    }
    let mut strict = options.clone();
    strict.anti_affinity = Enforcement::Required;
    let mut engine = Engine::new(fleet, &strict, &movers, Mode::Rebalance);
    engine.receiving = Some(receiving);
    let before = largest_deviation(&engine, &eligible, mean);
    let mut notes = vec![format!(
        "fleet memory utilisation {:.1} %; band ±{:.1} %; largest deviation before {:.1} %",
        mean * 100.0,
        half_band * 100.0,
        before * 100.0
    )];
    for (count, why) in [
        (pinned, format!("pinned ({PINNED_LABEL}=true)")),
        (recent, "moved in the recently-moved window".to_owned()),
        (grouped, "in an affinity group".to_owned()),
    ] {
        if count > 0 {
            notes.push(format!("{count} VMs stay: {why}"));
        }
    }
    if before <= half_band {
        notes.push("every cluster is within the band: nothing to do".into());
        return finish(Vec::new(), notes);
    }

    let mut done = vec![false; engine.movers.len()];
    let mut exhausted = vec![false; fleet.clusters.len()];
    let mut moves = 0usize;
    let deviation = |engine: &Engine, c: usize, extra: i128| {
        let load = &engine.loads[c];
        (load.load as i128 + extra) as f64 / load.allocatable as f64 - mean
    };
    while moves < goal.max_moves {
        if largest_deviation(&engine, &eligible, mean) <= half_band {
            break;
        }
        let hot = above
            .iter()
            .copied()
            .filter(|&c| !exhausted[c] && !engine.took[c])
            .max_by(|&a, &b| {
                deviation(&engine, a, 0)
                    .total_cmp(&deviation(&engine, b, 0))
                    .then(b.cmp(&a))
            });
        let Some(hot) = hot else { break };
        if deviation(&engine, hot, 0) <= 0.0 {
            break;
        }
        // (gain, bytes, mover, choice) of every move off `hot` that gains.
        let mut options_here = Vec::new();
        for (m, mover) in engine.movers.iter().enumerate() {
            if done[m] || mover.cluster != hot || !mover.vm_blockers.is_empty() {
                continue;
            }
            let Some(choice) = engine.choose(m, None) else {
                continue;
            };
            let memory = mover.memory as i128;
            let (h0, t0) = (
                deviation(&engine, hot, 0),
                deviation(&engine, choice.target, 0),
            );
            let (h1, t1) = (
                deviation(&engine, hot, -memory),
                deviation(&engine, choice.target, memory),
            );
            let gain = h0 * h0 + t0 * t0 - h1 * h1 - t1 * t1;
            if gain > 1e-12 {
                options_here.push((gain, mover.memory + mover.disks, m, choice));
            }
        }
        let best_gain = options_here.iter().map(|o| o.0).fold(0.0, f64::max);
        let pick = options_here
            .into_iter()
            .filter(|o| o.0 >= best_gain / 2.0)
            .min_by(|a, b| {
                a.1.cmp(&b.1).then_with(|| {
                    let key = |m: usize| {
                        let v = engine.movers[m].vm;
                        (v.namespace.as_str(), v.name.as_str())
                    };
                    key(a.2).cmp(&key(b.2))
                })
            });
        match pick {
            None => exhausted[hot] = true,
            Some((_, _, m, choice)) => {
                engine.commit(m, choice);
                done[m] = true;
                moves += 1;
            }
        }
    }
    let after = largest_deviation(&engine, &eligible, mean);
    let improvement = before - after;
    if improvement < goal.min_improvement {
        notes.push(format!(
            "the best plan lowers the largest deviation by only {:.2} % (minimum {:.2} %): nothing moves",
            improvement * 100.0,
            goal.min_improvement * 100.0
        ));
        return finish(Vec::new(), notes);
    }
    notes.push(format!(
        "largest deviation after {:.1} % ({} moves{})",
        after * 100.0,
        moves,
        if moves == goal.max_moves && after > half_band {
            ", the cap per run; the next run continues"
        } else {
            ""
        }
    ));
    for note in notes {
        engine.note(note);
    }
    let (planned, _, notes) = engine.into_results();
    finish(planned, notes)
}
