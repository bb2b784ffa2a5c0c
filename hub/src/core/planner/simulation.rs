//! A virtual-time discrete-event simulator of the planner and the scheduler: it runs a queue of
//! migrations (usually a plan's) through [`crate::core::admission`] exactly as the hub would — admit
//! what fits, and whenever a migration ends, admit again at once — with modelled durations and
//! failures, and checks at every instant, from its own record of what runs, that no limit is
//! exceeded and no VM runs or moves twice. It reports the makespan, the lower bound the limits
//! imply, how busy the slots were, and a log. A batch-wave baseline (admit a wave, wait for all
//! of it to end, admit the next) runs on the same attempts for comparison.
//!
//! Model. Time is in microseconds. An attempt holds its slots for
//! `(setup + bytes / rate) x jitter`, its rate being reserved (see
//! [`crate::core::planner::estimate`]): the pair budget is never oversubscribed, so migrations do not
//! slow each other. `jitter` is drawn uniformly from `[1 - j, 1 + j]`; with probability `p` an
//! attempt fails part-way (uniformly between 10 % and 90 % of its duration) and is safe to retry
//! unless a further draw says otherwise. Every draw is a hash of (seed, migration id, attempt),
//! so an attempt lasts the same in both dispatch modes and a run is reproducible from its seed.
//!
//! Lower bound. With `d_a` the time attempt `a` held its slots (as it happened), no schedule that
//! respects the limits and runs the same attempts can end before the largest of:
//! - one VM's attempts back to back: `max_vm Σ_{a of vm} d_a` (a VM never runs twice at once);
//! - the fleet cap: `Σ_a d_a / maxInFlight`;
//! - each cluster: `Σ_{a at c} d_a / parallelMigrationsPerCluster(c)`, counting `a` at its source
//!   and at its target;
//! - each source node: `Σ_{a from n} d_a / parallelOutboundMigrationsPerNode`;
//! - each pair with a budget `B`: `Σ_{a on pair} d_a x reserved_a / B` (bandwidth x time cannot
//!   exceed `B x T`).
//!
//! It is a bound, not always reachable: it treats each limit alone and knows the durations in
//! advance, while the scheduler does neither.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::core::admission::{
    pair_reservation, AdmissionLimits, Admitter, FailureSafety, Finished, MigrationRequest, Outcome,
};
use crate::core::planner::{self, DurationModel, Fleet, Plan, PlanOptions};
use drover_shared::ClusterName;

const MICROS: f64 = 1_000_000.0;

/// When admission runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Dispatch {
    /// Whenever a migration ends (the scheduler's way).
    KeepSlotsFull,
    /// Only when everything admitted before has ended (the baseline).
    BatchWaves,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulationSettings {
    pub seed: u64,
    pub dispatch: Dispatch,
    pub durations: DurationModel,
    /// Durations are scaled by a factor drawn from `[1 - jitter, 1 + jitter]` (0..1).
    pub duration_jitter: f64,
    /// Chance that an attempt fails.
    pub failure_probability: f64,
    /// Chance that a failure leaves things unsafe to retry.
    pub unsafe_failure_share: f64,
    /// Keep every event in the report's log (the violations are kept regardless).
    pub keep_log: bool,
    /// Recount every limit at every instant (the check log); off only for the planner's
    /// estimate, which needs the makespan alone.
    pub check_limits: bool,
}

impl SimulationSettings {
    /// Modelled durations exactly, no failures, no log, limits checked.
    pub fn deterministic(durations: DurationModel) -> Self {
        Self {
            seed: 0,
            dispatch: Dispatch::KeepSlotsFull,
            durations,
            duration_jitter: 0.0,
            failure_probability: 0.0,
            unsafe_failure_share: 0.0,
            keep_log: false,
            check_limits: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "event")]
pub enum Event {
    Admitted,
    Succeeded,
    Failed { safe: bool },
    Requeued,
    GaveUp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogEntry {
    pub at_seconds: f64,
    #[serde(flatten)]
    pub event: Event,
    pub migration: Uuid,
    pub vm: String,
    pub source_cluster: String,
    pub source_node: String,
    pub target_cluster: String,
    pub attempt: u32,
    /// Bytes per second it reserved from its pair (0 when the pair has no budget).
    pub reserved_bytes_per_sec: u64,
    /// Migrations in flight right after the event.
    pub in_flight: usize,
}

/// One term of the lower bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BoundTerm {
    pub limit: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LowerBound {
    pub seconds: f64,
    /// The limit of the largest term.
    pub binding: String,
    /// The largest term of each kind.
    pub terms: Vec<BoundTerm>,
}

/// How busy a limit was: slot-seconds used over slot-seconds available in the makespan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LimitUtilisation {
    pub limit: String,
    pub busy_fraction: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GaveUp {
    pub migration: Uuid,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimulationReport {
    pub dispatch: Dispatch,
    pub makespan_seconds: f64,
    pub lower_bound: LowerBound,
    /// 1.0 is perfect.
    pub makespan_over_lower_bound: f64,
    /// Busy share of the fleet-wide cap.
    pub fleet_slot_utilisation: f64,
    /// Busy share of the limit that sets the lower bound (its slots or bandwidth).
    pub bottleneck_utilisation: LimitUtilisation,
    /// The busiest cluster, node and pair.
    pub utilisation: Vec<LimitUtilisation>,
    pub migrations: usize,
    pub attempts: usize,
    pub succeeded: usize,
    pub gave_up: Vec<GaveUp>,
    /// Queued migrations no limit ever let in (a limit of 0).
    pub never_admitted: Vec<Uuid>,
    pub peak_in_flight: usize,
    /// Instants at which every limit was checked.
    pub checks: usize,
    /// Every broken rule, with its instant; empty when all checks passed.
    pub violations: Vec<String>,
    pub log: Vec<LogEntry>,
}

/// 64 pseudo-random bits from (seed, id, attempt, salt): splitmix64 over their mix.
fn draw(seed: u64, id: Uuid, attempt: u32, salt: u64) -> f64 {
    let (hi, lo) = id.as_u64_pair();
    let mut x = seed
        ^ hi.rotate_left(17)
        ^ lo
        ^ (u64::from(attempt) << 48)
        ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    next();
    (next() >> 11) as f64 / (1u64 << 53) as f64
}

/// What happened to one attempt, for the bound and the utilisation.
#[derive(Debug, Clone)]
struct Attempt {
    vm: String,
    source: String,
    node: String,
    target: String,
    seconds: f64,
    reserved: u64,
    budget: u64,
}

/// A running attempt as the simulator records it (independently of the admitter).
#[derive(Debug, Clone)]
struct Running {
    request: MigrationRequest,
    reserved: u64,
    budget: u64,
    ends: u64,
    fails: Option<bool>,
}

struct Sim<'a> {
    limits: &'a AdmissionLimits,
    settings: &'a SimulationSettings,
    admitter: Admitter,
    heap: BinaryHeap<Reverse<(u64, u64, Uuid)>>,
    seq: u64,
    running: HashMap<Uuid, Running>,
    attempts: Vec<Attempt>,
    moved: HashSet<String>,
    log: Vec<LogEntry>,
    violations: Vec<String>,
    checks: usize,
    peak: usize,
    succeeded: usize,
    gave_up: Vec<GaveUp>,
}

impl Sim<'_> {
    fn record(&mut self, now: u64, event: Event, r: &Running) {
        if self.settings.keep_log {
            self.log.push(LogEntry {
                at_seconds: now as f64 / MICROS,
                event,
                migration: r.request.id,
                vm: r.request.vm.clone(),
                source_cluster: r.request.source_cluster.clone(),
                source_node: r.request.source_node.clone(),
                target_cluster: r.request.target_cluster.clone(),
                attempt: r.request.attempt,
                reserved_bytes_per_sec: r.reserved,
                in_flight: self.running.len(),
            });
        }
    }

    fn dispatch(&mut self, now: u64) {
        if self.settings.dispatch == Dispatch::BatchWaves && !self.running.is_empty() {
            return;
        }
        for id in self.admitter.admit_now() {
            let Some(request) = self.admitter.request(id).cloned() else {
                continue;
            };
            let budget = self
                .admitter
                .pair_budget(&request.source_cluster, &request.target_cluster);
            let rate = self
                .settings
                .durations
                .rate(request.bandwidth_bytes_per_sec, budget);
            let nominal = self.settings.durations.seconds(request.bytes, rate);
            let seed = self.settings.seed;
            let j = self.settings.duration_jitter.clamp(0.0, 1.0);
            let factor = 1.0 - j + 2.0 * j * draw(seed, id, request.attempt, 1);
            let mut seconds = nominal * factor;
            let fails = (draw(seed, id, request.attempt, 2) < self.settings.failure_probability)
                .then(|| {
                    seconds *= 0.1 + 0.8 * draw(seed, id, request.attempt, 3);
                    draw(seed, id, request.attempt, 4) >= self.settings.unsafe_failure_share
                });
            let micros = ((seconds * MICROS).round() as u64).max(1);
            let reserved = if budget > 0 {
                pair_reservation(request.bandwidth_bytes_per_sec, budget)
            } else {
                0
            };
            self.attempts.push(Attempt {
                vm: request.vm.clone(),
                source: request.source_cluster.clone(),
                node: request.source_node.clone(),
                target: request.target_cluster.clone(),
                seconds: micros as f64 / MICROS,
                reserved,
                budget,
            });
            let running = Running {
                request,
                reserved,
                budget,
                ends: now + micros,
                fails,
            };
            self.heap.push(Reverse((running.ends, self.seq, id)));
            self.seq += 1;
            if self.running.contains_key(&id) {
                self.violations.push(format!(
                    "t={:.3}s: migration {id} admitted while it runs",
                    now as f64 / MICROS
                ));
            }
            self.running.insert(id, running.clone());
            self.record(now, Event::Admitted, &running);
        }
        self.peak = self.peak.max(self.running.len());
        self.check(now);
    }

    /// Recounts every limit from what runs now.
    fn check(&mut self, now: u64) {
        if !self.settings.check_limits {
            return;
        }
        self.checks += 1;
        let at = now as f64 / MICROS;
        let limits = self.limits;
        if self.running.len() > limits.max_in_flight {
            self.violations.push(format!(
                "t={at:.3}s: {} in flight, cap {}",
                self.running.len(),
                limits.max_in_flight
            ));
        }
        let mut clusters: BTreeMap<&str, u32> = BTreeMap::new();
        let mut nodes: BTreeMap<(&str, &str), u32> = BTreeMap::new();
        let mut pairs: BTreeMap<(&str, &str), (u64, u64, u32)> = BTreeMap::new();
        let mut vms: HashSet<&str> = HashSet::new();
        for r in self.running.values() {
            let q = &r.request;
            *clusters.entry(&q.source_cluster).or_default() += 1;
            *clusters.entry(&q.target_cluster).or_default() += 1;
            *nodes
                .entry((&q.source_cluster, &q.source_node))
                .or_default() += 1;
            let pair = pairs
                .entry((&q.source_cluster, &q.target_cluster))
                .or_insert((0, r.budget, 0));
            pair.0 += r.reserved;
            pair.2 += 1;
            if !vms.insert(&q.vm) {
                self.violations
                    .push(format!("t={at:.3}s: VM {} runs twice", q.vm));
            }
            if q.attempt > limits.max_attempts {
                self.violations.push(format!(
                    "t={at:.3}s: migration {} runs attempt {} of at most {}",
                    q.id, q.attempt, limits.max_attempts
                ));
            }
        }
        for (c, n) in clusters {
            let limit = limits.slots(c).parallel_migrations_per_cluster;
            if n > limit {
                self.violations.push(format!(
                    "t={at:.3}s: cluster {c} runs {n} migrations, limit {limit}"
                ));
            }
        }
        for ((c, node), n) in nodes {
            let limit = limits.slots(c).parallel_outbound_migrations_per_node;
            if n > limit {
                self.violations.push(format!(
                    "t={at:.3}s: node {node} of {c} sends {n} migrations, limit {limit}"
                ));
            }
        }
        for ((s, t), (reserved, budget, count)) in pairs {
            if budget > 0 && count > 1 && reserved > budget {
                self.violations.push(format!(
                    "t={at:.3}s: pair {s} -> {t} reserves {reserved} of {budget} bytes/s"
                ));
            }
        }
    }

    fn finish(&mut self, now: u64, id: Uuid) {
        let Some(running) = self.running.remove(&id) else {
            return;
        };
        let outcome = match running.fails {
            None => Outcome::Succeeded,
            Some(safe) => Outcome::Failed {
                safety: if safe {
                    FailureSafety::SAFE
                } else {
                    FailureSafety {
                        source_running: true,
                        target_cleaned_up: false,
                    }
                },
            },
        };
        match outcome {
            Outcome::Succeeded => {
                self.succeeded += 1;
                if !self.moved.insert(running.request.vm.clone()) {
                    self.violations.push(format!(
                        "t={:.3}s: VM {} moved a second time",
                        now as f64 / MICROS,
                        running.request.vm
                    ));
                }
                self.record(now, Event::Succeeded, &running);
            }
            Outcome::Failed { safety } => {
                self.record(
                    now,
                    Event::Failed {
                        safe: safety.is_safe(),
                    },
                    &running,
                );
            }
        }
        match self.admitter.finish(id, outcome) {
            Ok(Finished::Requeued { .. }) => self.record(now, Event::Requeued, &running),
            Ok(Finished::GaveUp { reason }) => {
                self.record(now, Event::GaveUp, &running);
                self.gave_up.push(GaveUp {
                    migration: id,
                    reason,
                });
            }
            Ok(Finished::Succeeded) => {}
            Err(e) => self
                .violations
                .push(format!("t={:.3}s: {e}", now as f64 / MICROS)),
        }
    }
}

/// Runs `queue` under `limits` in virtual time (see the module doc).
pub fn simulate(
    queue: Vec<MigrationRequest>,
    limits: &AdmissionLimits,
    settings: &SimulationSettings,
) -> SimulationReport {
    let migrations = queue.len();
    let mut admitter = Admitter::new(limits.clone());
    for request in queue {
        admitter.enqueue(request);
    }
    let mut sim = Sim {
        limits,
        settings,
        admitter,
        heap: BinaryHeap::new(),
        seq: 0,
        running: HashMap::new(),
        attempts: Vec::new(),
        moved: HashSet::new(),
        log: Vec::new(),
        violations: Vec::new(),
        checks: 0,
        peak: 0,
        succeeded: 0,
        gave_up: Vec::new(),
    };
    let mut now = 0u64;
    sim.dispatch(now);
    while let Some(Reverse((ends, _, id))) = sim.heap.pop() {
        now = ends;
        sim.finish(now, id);
        sim.check(now);
        sim.dispatch(now);
    }
    let never_admitted: Vec<Uuid> = sim.admitter.queued().map(|r| r.id).collect();
    let makespan = now as f64 / MICROS;
    let lower_bound = lower_bound(&sim.attempts, limits);
    let (fleet_slot_utilisation, bottleneck_utilisation, utilisation) =
        utilisation(&sim.attempts, limits, makespan, &lower_bound);
    SimulationReport {
        dispatch: settings.dispatch,
        makespan_seconds: makespan,
        makespan_over_lower_bound: if lower_bound.seconds > 0.0 {
            makespan / lower_bound.seconds
        } else {
            1.0
        },
        lower_bound,
        fleet_slot_utilisation,
        bottleneck_utilisation,
        utilisation,
        migrations,
        attempts: sim.attempts.len(),
        succeeded: sim.succeeded,
        gave_up: sim.gave_up,
        never_admitted,
        peak_in_flight: sim.peak,
        checks: sim.checks,
        violations: sim.violations,
        log: sim.log,
    }
}

/// The largest term of each kind and the bound (see the module doc).
fn lower_bound(attempts: &[Attempt], limits: &AdmissionLimits) -> LowerBound {
    let mut per_vm: HashMap<&str, f64> = HashMap::new();
    let mut per_cluster: HashMap<&str, f64> = HashMap::new();
    let mut per_node: HashMap<(&str, &str), f64> = HashMap::new();
    let mut per_pair: HashMap<(&str, &str), f64> = HashMap::new();
    let mut total = 0.0;
    for a in attempts {
        total += a.seconds;
        *per_vm.entry(&a.vm).or_default() += a.seconds;
        *per_cluster.entry(&a.source).or_default() += a.seconds;
        *per_cluster.entry(&a.target).or_default() += a.seconds;
        *per_node.entry((&a.source, &a.node)).or_default() += a.seconds;
        if a.budget > 0 {
            *per_pair.entry((&a.source, &a.target)).or_default() +=
                a.seconds * a.reserved as f64 / a.budget as f64;
        }
    }
    let largest = |terms: Vec<(String, f64)>| {
        terms
            .into_iter()
            .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
    };
    let mut terms = Vec::new();
    terms.extend(largest(
        per_vm
            .iter()
            .map(|(vm, s)| (format!("VM {vm} (its attempts back to back)"), *s))
            .collect(),
    ));
    if limits.max_in_flight > 0 {
        terms.push((
            format!("fleet cap of {} in flight", limits.max_in_flight),
            total / limits.max_in_flight as f64,
        ));
    }
    terms.extend(largest(
        per_cluster
            .iter()
            .filter_map(|(c, s)| {
                let slots = limits.slots(c).parallel_migrations_per_cluster;
                (slots > 0).then(|| {
                    (
                        format!("cluster {c} ({slots} parallel migrations)"),
                        s / f64::from(slots),
                    )
                })
            })
            .collect(),
    ));
    terms.extend(largest(
        per_node
            .iter()
            .filter_map(|((c, n), s)| {
                let slots = limits.slots(c).parallel_outbound_migrations_per_node;
                (slots > 0).then(|| {
                    (
                        format!("node {n} of {c} ({slots} outbound)"),
                        s / f64::from(slots),
                    )
                })
            })
            .collect(),
    ));
    terms.extend(largest(
        per_pair
            .iter()
            .map(|((s, t), area)| (format!("bandwidth of pair {s} -> {t}"), *area))
            .collect(),
    ));
    let (binding, seconds) = largest(terms.clone()).unwrap_or_default();
    LowerBound {
        seconds,
        binding,
        terms: terms
            .into_iter()
            .map(|(limit, seconds)| BoundTerm { limit, seconds })
            .collect(),
    }
}

fn utilisation(
    attempts: &[Attempt],
    limits: &AdmissionLimits,
    makespan: f64,
    bound: &LowerBound,
) -> (f64, LimitUtilisation, Vec<LimitUtilisation>) {
    if makespan <= 0.0 {
        return (
            0.0,
            LimitUtilisation {
                limit: bound.binding.clone(),
                busy_fraction: 0.0,
            },
            Vec::new(),
        );
    }
    let busy: f64 = attempts.iter().map(|a| a.seconds).sum();
    let fleet = if limits.max_in_flight > 0 {
        busy / (limits.max_in_flight as f64 * makespan)
    } else {
        0.0
    };
    // Every bound term except the per-VM chain is "busy slot-seconds / slots"; over the makespan
    // it is that limit's busy share.
    let utilisation = bound
        .terms
        .iter()
        .filter(|t| !t.limit.starts_with("VM "))
        .map(|t| LimitUtilisation {
            limit: t.limit.clone(),
            busy_fraction: t.seconds / makespan,
        })
        .collect();
    let bottleneck = LimitUtilisation {
        limit: bound.binding.clone(),
        busy_fraction: bound.seconds / makespan,
    };
    (fleet, bottleneck, utilisation)
}

/// Runs a plan's migrations in virtual time.
pub fn simulate_plan(
    plan: &Plan,
    limits: &AdmissionLimits,
    settings: &SimulationSettings,
) -> SimulationReport {
    simulate(plan.requests(), limits, settings)
}

/// Plans the evacuation of `source` and runs it in virtual time, under the limits the plan
/// states (the options' limits and each cluster's configuration).
pub fn simulate_evacuation(
    fleet: &Fleet,
    source: &ClusterName,
    options: &PlanOptions,
    settings: &SimulationSettings,
) -> (Plan, SimulationReport) {
    let plan = planner::plan_evacuation(fleet, source, options);
    let limits = planner::effective_limits(fleet, options);
    let report = simulate_plan(&plan, &limits, settings);
    (plan, report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::admission::{ClusterSlots, PairBudget};

    fn request(n: u128, s: &str, node: &str, t: &str, gib: u64) -> MigrationRequest {
        MigrationRequest {
            id: Uuid::from_u128(n),
            vm: format!("vm-{n}"),
            position: n as u64,
            source_cluster: s.into(),
            source_node: node.into(),
            target_cluster: t.into(),
            bytes: gib << 30,
            bandwidth_bytes_per_sec: 0,
            attempt: 1,
        }
    }

    fn settings(dispatch: Dispatch) -> SimulationSettings {
        SimulationSettings {
            dispatch,
            keep_log: true,
            durations: DurationModel {
                setup_seconds: 0.0,
                unlimited_link_bytes_per_sec: 1 << 30,
            },
            ..SimulationSettings::deterministic(DurationModel::default())
        }
    }

    fn limits(per_cluster: u32) -> AdmissionLimits {
        AdmissionLimits {
            max_in_flight: 100,
            clusters: ["a", "b", "c"]
                .into_iter()
                .map(|c| {
                    (
                        c.to_owned(),
                        ClusterSlots {
                            parallel_migrations_per_cluster: per_cluster,
                            parallel_outbound_migrations_per_node: 10,
                        },
                    )
                })
                .collect(),
            ..AdmissionLimits::default()
        }
    }

    #[test]
    fn keeping_slots_full_beats_waves_and_meets_the_bound() {
        // Two slots at a; jobs of 10, 1, 1, 1, ... seconds.
        let mut queue = vec![request(0, "a", "n1", "b", 10)];
        queue.extend((1..=10).map(|n| request(n, "a", "n1", "c", 1)));
        let full = simulate(
            queue.clone(),
            &limits(2),
            &settings(Dispatch::KeepSlotsFull),
        );
        let waves = simulate(queue, &limits(2), &settings(Dispatch::BatchWaves));
        assert!(full.violations.is_empty(), "{:?}", full.violations);
        assert!(waves.violations.is_empty(), "{:?}", waves.violations);
        // Busy time 20 over two slots: the bound is 10 and the long job alone is 10.
        assert!((full.lower_bound.seconds - 10.0).abs() < 1e-6);
        assert!((full.makespan_seconds - 10.0).abs() < 1e-6, "{full:?}");
        // Waves: {10, 1} then five waves of {1, 1}... 10 + 1 + 4 + ... = 15.
        assert!((waves.makespan_seconds - 15.0).abs() < 1e-6, "{waves:?}");
        assert_eq!(full.succeeded, 11);
        assert_eq!(full.peak_in_flight, 2);
        assert!(full.bottleneck_utilisation.busy_fraction > 0.99);
    }

    #[test]
    fn the_pair_budget_bounds_the_makespan_and_is_never_oversubscribed() {
        let mut l = limits(100);
        l.pair_bandwidth.pairs.push(PairBudget {
            source: "a".into(),
            target: "b".into(),
            bytes_per_sec: 2 << 30,
        });
        let queue: Vec<_> = (0..8)
            .map(|n| MigrationRequest {
                bandwidth_bytes_per_sec: 1 << 30,
                ..request(n, "a", &format!("n{n}"), "b", 4)
            })
            .collect();
        let report = simulate(queue, &l, &settings(Dispatch::KeepSlotsFull));
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        // 8 x 4 GiB over 2 GiB/s: 16 s; two at a time at 1 GiB/s, 4 s each.
        assert!((report.makespan_seconds - 16.0).abs() < 1e-6, "{report:?}");
        assert!(report.lower_bound.binding.contains("pair a -> b"));
        assert_eq!(report.peak_in_flight, 2);
    }

    #[test]
    fn failures_retry_when_safe_and_runs_are_reproducible() {
        let queue: Vec<_> = (0..40).map(|n| request(n, "a", "n1", "b", 1)).collect();
        let s = SimulationSettings {
            failure_probability: 0.4,
            unsafe_failure_share: 0.2,
            duration_jitter: 0.3,
            seed: 7,
            ..settings(Dispatch::KeepSlotsFull)
        };
        let mut l = limits(5);
        l.max_attempts = 3;
        let one = simulate(queue.clone(), &l, &s);
        let two = simulate(queue, &l, &s);
        assert_eq!(one, two, "the same seed gives the same run");
        assert!(one.violations.is_empty(), "{:?}", one.violations);
        assert!(one.attempts > 40, "some attempts failed and were retried");
        assert_eq!(one.succeeded + one.gave_up.len(), 40);
        assert!(!one.gave_up.is_empty());
        assert!(one.makespan_seconds >= one.lower_bound.seconds - 1e-6);
        let retried = one
            .log
            .iter()
            .filter(|e| e.event == Event::Requeued)
            .count();
        assert!(retried > 0);
        assert!(one
            .log
            .iter()
            .all(|e| e.event != Event::Requeued || e.attempt < 3));
        let json = serde_json::to_string(&one).unwrap();
        let back: SimulationReport = serde_json::from_str(&json).unwrap();
        // serde_json may round the last bit of a float; the log's instants are whole
        // microseconds and survive exactly.
        assert_eq!(back.log, one.log, "the log survives JSON");
        assert_eq!(back.gave_up, one.gave_up);
        assert_eq!(back.lower_bound.binding, one.lower_bound.binding);
        assert!((back.lower_bound.seconds - one.lower_bound.seconds).abs() < 1e-9);
    }

    #[test]
    fn a_limit_of_zero_strands_migrations_and_says_so() {
        let mut l = limits(0);
        l.max_in_flight = 5;
        let report = simulate(
            vec![request(1, "a", "n1", "b", 1)],
            &l,
            &settings(Dispatch::KeepSlotsFull),
        );
        assert_eq!(report.never_admitted, vec![Uuid::from_u128(1)]);
        assert_eq!(report.attempts, 0);
    }
}
