//! Scheduler admission as a plain function over plain data: which queued migrations may start
//! now, under every limit at once — the fleet-wide in-flight cap, `parallelMigrationsPerCluster`
//! at the source **and** at the target (a migration holds a slot on both sides),
//! `parallelOutboundMigrationsPerNode` on the source node, and the bandwidth budget of each
//! cluster pair — plus when a failed migration gets a fresh attempt. No database, clock or
//! network: the durable scheduler feeds it rows, the simulator feeds it virtual time.
//!
//! Order and fairness. The queue is served FIFO by plan position (ties by id). A migration that
//! does not fit is skipped, not waited for, so a busy cluster, node or pair never holds up
//! migrations that need none of them. Every limit but the pair budget is a count of one slot per
//! migration, so nothing queued later can overtake a blocked migration on the same slot. A pair
//! budget is different — a later, thinner migration could fit where an earlier, wider one does
//! not and starve it forever — so once a migration waits for a pair's bandwidth, that pair
//! admits nothing else until it has gone (head-of-line reservation, per pair only).
//!
//! Bandwidth model. A pair `(source, target)` has a budget in bytes per second (0: no budget).
//! An admitted migration reserves its per-migration bandwidth from it (`bandwidthPerMigration`
//! or its policy's); a migration with no per-migration limit, or one wider than the budget,
//! reserves the whole budget. A pair with nothing running always admits one migration, so a
//! budget smaller than one migration slows a pair down but never blocks it.
//!
//! Keeping slots full is the caller's loop: call [`Admitter::admit_now`] whenever a migration is
//! queued or ends, never in waves.

use std::collections::{BTreeMap, HashMap};

use drover_shared::inventory::MigrationConfig;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// KubeVirt's defaults, for a cluster the limits do not name.
pub const DEFAULT_PARALLEL_MIGRATIONS_PER_CLUSTER: u32 = 5;
pub const DEFAULT_PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE: u32 = 2;

/// The per-cluster slot limits (from the cluster's migration configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSlots {
    pub parallel_migrations_per_cluster: u32,
    pub parallel_outbound_migrations_per_node: u32,
}

impl Default for ClusterSlots {
    fn default() -> Self {
        Self {
            parallel_migrations_per_cluster: DEFAULT_PARALLEL_MIGRATIONS_PER_CLUSTER,
            parallel_outbound_migrations_per_node: DEFAULT_PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE,
        }
    }
}

impl From<&MigrationConfig> for ClusterSlots {
    fn from(config: &MigrationConfig) -> Self {
        Self {
            parallel_migrations_per_cluster: config.parallel_migrations_per_cluster,
            parallel_outbound_migrations_per_node: config.parallel_outbound_migrations_per_node,
        }
    }
}

/// The bandwidth budget of one (directed) cluster pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairBudget {
    pub source: String,
    pub target: String,
    /// Bytes per second; 0: no budget.
    pub bytes_per_sec: u64,
}

/// Bandwidth budgets per cluster pair: named pairs, and a default for every other pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PairBandwidth {
    /// Bytes per second for a pair not listed; 0: no budget.
    pub default_bytes_per_sec: u64,
    pub pairs: Vec<PairBudget>,
}

impl PairBandwidth {
    /// The budget of `source -> target` (0: none).
    pub fn budget(&self, source: &str, target: &str) -> u64 {
        self.pairs
            .iter()
            .find(|p| p.source == source && p.target == target)
            .map_or(self.default_bytes_per_sec, |p| p.bytes_per_sec)
    }

    /// A lookup table for many pairs (the linear `budget` is for a handful).
    fn table(&self) -> HashMap<(&str, &str), u64> {
        self.pairs
            .iter()
            .map(|p| ((p.source.as_str(), p.target.as_str()), p.bytes_per_sec))
            .collect()
    }
}

/// What a migration reserves from a pair whose budget is `budget` (see the module doc).
pub fn pair_reservation(bandwidth_bytes_per_sec: u64, budget: u64) -> u64 {
    if bandwidth_bytes_per_sec == 0 || bandwidth_bytes_per_sec > budget {
        budget
    } else {
        bandwidth_bytes_per_sec
    }
}

/// Every limit admission enforces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionLimits {
    /// Migrations in flight in the whole fleet at most.
    pub max_in_flight: usize,
    /// Attempts per migration at most (the first one counts).
    pub max_attempts: u32,
    /// Slot limits by cluster name; a cluster not named gets KubeVirt's defaults.
    pub clusters: BTreeMap<String, ClusterSlots>,
    pub pair_bandwidth: PairBandwidth,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self {
            max_in_flight: 20,
            max_attempts: 3,
            clusters: BTreeMap::new(),
            pair_bandwidth: PairBandwidth::default(),
        }
    }
}

impl AdmissionLimits {
    pub fn slots(&self, cluster: &str) -> ClusterSlots {
        self.clusters.get(cluster).copied().unwrap_or_default()
    }
}

/// One migration as admission sees it, queued or in flight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationRequest {
    pub id: Uuid,
    /// The VM's stable key (its uid): one VM never migrates twice at once.
    pub vm: String,
    /// Plan order: smaller first.
    pub position: u64,
    pub source_cluster: String,
    pub source_node: String,
    pub target_cluster: String,
    /// Memory plus disks.
    pub bytes: u64,
    /// Per-migration bandwidth (0: unlimited).
    pub bandwidth_bytes_per_sec: u64,
    /// 1 for the first attempt.
    pub attempt: u32,
}

/// Why a queued migration is not admitted now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum WaitReason {
    /// The fleet-wide in-flight cap is reached.
    FleetCap {
        max_in_flight: usize,
    },
    SourceClusterSlots {
        cluster: String,
        limit: u32,
    },
    TargetClusterSlots {
        cluster: String,
        limit: u32,
    },
    SourceNodeSlots {
        cluster: String,
        node: String,
        limit: u32,
    },
    PairBandwidth {
        source: String,
        target: String,
        budget_bytes_per_sec: u64,
        reserved_bytes_per_sec: u64,
        needed_bytes_per_sec: u64,
    },
    /// An earlier migration waits for this pair's bandwidth; it goes first.
    PairHeldForEarlier {
        source: String,
        target: String,
        earlier: Uuid,
    },
    /// The same VM is migrating (or queued earlier).
    VmBusy {
        vm: String,
    },
}

impl std::fmt::Display for WaitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FleetCap { max_in_flight } => {
                write!(f, "the fleet runs {max_in_flight} migrations, its cap")
            }
            Self::SourceClusterSlots { cluster, limit } => write!(
                f,
                "source cluster {cluster} runs {limit} migrations (parallelMigrationsPerCluster)"
            ),
            Self::TargetClusterSlots { cluster, limit } => write!(
                f,
                "target cluster {cluster} runs {limit} migrations (parallelMigrationsPerCluster)"
            ),
            Self::SourceNodeSlots {
                cluster,
                node,
                limit,
            } => write!(
                f,
                "node {node} of {cluster} sends {limit} migrations (parallelOutboundMigrationsPerNode)"
            ),
            Self::PairBandwidth {
                source,
                target,
                budget_bytes_per_sec,
                reserved_bytes_per_sec,
                needed_bytes_per_sec,
            } => write!(
                f,
                "{source} -> {target} has {reserved_bytes_per_sec} of {budget_bytes_per_sec} bytes/s reserved; this migration needs {needed_bytes_per_sec}"
            ),
            Self::PairHeldForEarlier {
                source,
                target,
                earlier,
            } => write!(
                f,
                "{source} -> {target} is held for migration {earlier}, queued earlier and waiting for bandwidth"
            ),
            Self::VmBusy { vm } => write!(f, "virtual machine {vm} is already migrating"),
        }
    }
}

/// A queued migration that waits, and everything it waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Waiting {
    pub id: Uuid,
    pub reasons: Vec<WaitReason>,
}

/// What one admission round decided.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionDecision {
    /// In queue order.
    pub admitted: Vec<Uuid>,
    /// In queue order.
    pub waiting: Vec<Waiting>,
}

/// Admits what fits now: `queue` (any order; served by position) given what is `in_flight`.
/// One call is one round of [`Admitter::admit_now`]; the durable scheduler calls it in the
/// transaction that marks the admitted rows.
pub fn admit(
    limits: &AdmissionLimits,
    queue: &[MigrationRequest],
    in_flight: &[MigrationRequest],
) -> AdmissionDecision {
    let mut admitter = Admitter::new(limits.clone());
    for m in in_flight {
        admitter.insert_running(m.clone());
    }
    for m in queue {
        admitter.enqueue(m.clone());
    }
    let admitted = admitter.admit_now();
    AdmissionDecision {
        admitted,
        waiting: admitter.waiting(),
    }
}

/// What the executor knows after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureSafety {
    /// The source VM still runs where it ran.
    pub source_running: bool,
    /// Nothing of the migration is left on the target (VM, volumes, endpoints).
    pub target_cleaned_up: bool,
}

impl FailureSafety {
    pub const SAFE: Self = Self {
        source_running: true,
        target_cleaned_up: true,
    };

    pub fn is_safe(self) -> bool {
        self.source_running && self.target_cleaned_up
    }
}

/// Whether a failed attempt gets another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "decision")]
pub enum RetryDecision {
    Retry { next_attempt: u32 },
    GiveUp { reason: String },
}

/// A failed attempt `attempt` (1-based) is retried only when it is safe and attempts remain.
pub fn retry_decision(attempt: u32, max_attempts: u32, safety: FailureSafety) -> RetryDecision {
    if !safety.source_running {
        return RetryDecision::GiveUp {
            reason: "the source VM is no longer running; an operator must look at it before it moves again".into(),
        };
    }
    if !safety.target_cleaned_up {
        return RetryDecision::GiveUp {
            reason: "the target still holds parts of the failed attempt; clean them up, then start the migration again".into(),
        };
    }
    if attempt >= max_attempts {
        return RetryDecision::GiveUp {
            reason: format!(
                "failed {attempt} times, the limit of {max_attempts} attempts; raise the limit or look at the failure reasons"
            ),
        };
    }
    RetryDecision::Retry {
        next_attempt: attempt + 1,
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum Outcome {
    Succeeded,
    Failed { safety: FailureSafety },
}

/// What the admitter did with a migration that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum Finished {
    Succeeded,
    Requeued { attempt: u32 },
    GaveUp { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("migration {0} is not in flight; only an admitted migration can finish")]
    NotInFlight(Uuid),
}

/// What keeps a migration waiting, without the words (the hot path of a round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    FleetCap,
    /// A cluster, node or VM slot.
    Slots,
    PairHeld,
    PairBandwidth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    InFlight,
    Succeeded,
    GaveUp,
    /// Its VM already moved through another entry: it will not move again.
    Superseded,
}

#[derive(Debug, Clone)]
struct Entry {
    request: MigrationRequest,
    state: State,
    seq: u64,
    source: usize,
    target: usize,
    node: usize,
    pair: usize,
    vm: usize,
}

/// Interns names into dense indexes so that a round costs a few array reads per migration.
#[derive(Debug, Default, Clone)]
struct Names {
    ids: HashMap<String, usize>,
}

impl Names {
    fn id(&mut self, name: &str) -> usize {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.ids.len();
        self.ids.insert(name.to_owned(), id);
        id
    }
}

/// Admission with its counters kept between rounds: enqueue, admit, finish, admit again. The
/// same rules as [`admit`], at a cost per round linear in the queue with no hashing.
#[derive(Debug, Clone)]
pub struct Admitter {
    limits: AdmissionLimits,
    entries: Vec<Entry>,
    by_id: HashMap<Uuid, usize>,
    /// Entry indexes by (position, seq); rebuilt when an enqueue makes it unsorted.
    order: Vec<usize>,
    order_dirty: bool,
    /// Everything before this index of `order` has left the queue for good or is in flight.
    scan_from: usize,
    next_seq: u64,
    clusters: Names,
    nodes: Names,
    vms: Names,
    pairs: HashMap<(usize, usize), usize>,
    // Per-resource state, by dense index.
    cluster_limit: Vec<u32>,
    node_limit: Vec<u32>,
    cluster_busy: Vec<u32>,
    node_busy: Vec<u32>,
    pair_budget: Vec<u64>,
    pair_reserved: Vec<u64>,
    pair_running: Vec<u32>,
    vm_busy: Vec<bool>,
    vm_moved: Vec<bool>,
    /// Queued migrations by source cluster: a round ends once no source with queued work
    /// has a free slot.
    queued_at_source: Vec<u32>,
    in_flight: usize,
}

impl Admitter {
    pub fn new(limits: AdmissionLimits) -> Self {
        Self {
            limits,
            entries: Vec::new(),
            by_id: HashMap::new(),
            order: Vec::new(),
            order_dirty: false,
            scan_from: 0,
            next_seq: 0,
            clusters: Names::default(),
            nodes: Names::default(),
            vms: Names::default(),
            pairs: HashMap::new(),
            cluster_limit: Vec::new(),
            node_limit: Vec::new(),
            cluster_busy: Vec::new(),
            node_busy: Vec::new(),
            pair_budget: Vec::new(),
            pair_reserved: Vec::new(),
            pair_running: Vec::new(),
            vm_busy: Vec::new(),
            vm_moved: Vec::new(),
            queued_at_source: Vec::new(),
            in_flight: 0,
        }
    }

    pub fn limits(&self) -> &AdmissionLimits {
        &self.limits
    }

    fn cluster(&mut self, name: &str) -> usize {
        let id = self.clusters.id(name);
        if id == self.cluster_limit.len() {
            self.cluster_limit
                .push(self.limits.slots(name).parallel_migrations_per_cluster);
            self.cluster_busy.push(0);
            self.queued_at_source.push(0);
        }
        id
    }

    fn node(&mut self, cluster: &str, node: &str) -> usize {
        let id = self.nodes.id(&format!("{cluster}\u{0}{node}"));
        if id == self.node_limit.len() {
            self.node_limit.push(
                self.limits
                    .slots(cluster)
                    .parallel_outbound_migrations_per_node,
            );
            self.node_busy.push(0);
        }
        id
    }

    fn pair(&mut self, source: usize, target: usize, names: (&str, &str)) -> usize {
        if let Some(&id) = self.pairs.get(&(source, target)) {
            return id;
        }
        let id = self.pair_budget.len();
        self.pairs.insert((source, target), id);
        self.pair_budget
            .push(self.limits.pair_bandwidth.budget(names.0, names.1));
        self.pair_reserved.push(0);
        self.pair_running.push(0);
        id
    }

    fn vm(&mut self, vm: &str) -> usize {
        let id = self.vms.id(vm);
        if id == self.vm_busy.len() {
            self.vm_busy.push(false);
            self.vm_moved.push(false);
        }
        id
    }

    fn entry_of(&mut self, request: MigrationRequest, state: State) -> usize {
        let source = self.cluster(&request.source_cluster);
        let target = self.cluster(&request.target_cluster);
        let node = self.node(&request.source_cluster, &request.source_node);
        let pair = self.pair(
            source,
            target,
            (&request.source_cluster, &request.target_cluster),
        );
        let vm = self.vm(&request.vm);
        let index = self.entries.len();
        self.by_id.insert(request.id, index);
        self.entries.push(Entry {
            request,
            state,
            seq: self.next_seq,
            source,
            target,
            node,
            pair,
            vm,
        });
        self.next_seq += 1;
        if state == State::Queued {
            self.queued_at_source[source] += 1;
        }
        self.order.push(index);
        self.order_dirty = true;
        index
    }

    /// Queues a migration. A second request with an id already known is ignored (queuing is
    /// idempotent by id).
    pub fn enqueue(&mut self, request: MigrationRequest) {
        if self.by_id.contains_key(&request.id) {
            return;
        }
        self.entry_of(request, State::Queued);
    }

    /// Records a migration that already runs (admitted before, e.g. by a hub that restarted):
    /// it holds its slots even if that puts a counter over its limit.
    pub fn insert_running(&mut self, request: MigrationRequest) {
        if self.by_id.contains_key(&request.id) {
            return;
        }
        let index = self.entry_of(request, State::InFlight);
        self.hold(index);
    }

    fn hold(&mut self, index: usize) {
        let e = &self.entries[index];
        let (s, t, n, p, v) = (e.source, e.target, e.node, e.pair, e.vm);
        let reserve = pair_reservation(e.request.bandwidth_bytes_per_sec, self.pair_budget[p]);
        self.cluster_busy[s] += 1;
        self.cluster_busy[t] += 1;
        self.node_busy[n] += 1;
        self.pair_reserved[p] += reserve;
        self.pair_running[p] += 1;
        self.vm_busy[v] = true;
        self.in_flight += 1;
    }

    fn release(&mut self, index: usize) {
        let e = &self.entries[index];
        let (s, t, n, p, v) = (e.source, e.target, e.node, e.pair, e.vm);
        let reserve = pair_reservation(e.request.bandwidth_bytes_per_sec, self.pair_budget[p]);
        self.cluster_busy[s] -= 1;
        self.cluster_busy[t] -= 1;
        self.node_busy[n] -= 1;
        self.pair_reserved[p] -= reserve;
        self.pair_running[p] -= 1;
        self.vm_busy[v] = false;
        self.in_flight -= 1;
    }

    /// Moves entry `index` to `state`, keeping the per-source queue counts.
    fn set_state(&mut self, index: usize, state: State) {
        let e = &mut self.entries[index];
        let source = e.source;
        match (e.state == State::Queued, state == State::Queued) {
            (true, false) => self.queued_at_source[source] -= 1,
            (false, true) => self.queued_at_source[source] += 1,
            _ => {}
        }
        e.state = state;
    }

    /// A source with queued work and a free slot: something might still be admitted from it.
    fn source_open(&self, cluster: usize) -> bool {
        self.queued_at_source[cluster] > 0
            && self.cluster_busy[cluster] < self.cluster_limit[cluster]
    }

    fn sort_order(&mut self) {
        if self.order_dirty {
            let entries = &self.entries;
            self.order
                .sort_by_key(|&i| (entries[i].request.position, entries[i].seq));
            self.order_dirty = false;
            self.scan_from = 0;
        }
    }

    /// The first limit that keeps entry `index` waiting, with the pairs held in this round; the
    /// same checks as [`Self::blocks`] in the same order, without building the words.
    fn first_block(&self, index: usize, held_pairs: &[Option<Uuid>]) -> Option<Block> {
        let e = &self.entries[index];
        if self.in_flight >= self.limits.max_in_flight {
            return Some(Block::FleetCap);
        }
        if self.cluster_busy[e.source] >= self.cluster_limit[e.source]
            || self.cluster_busy[e.target] >= self.cluster_limit[e.target]
            || self.node_busy[e.node] >= self.node_limit[e.node]
            || self.vm_busy[e.vm]
        {
            return Some(Block::Slots);
        }
        if held_pairs
            .get(e.pair)
            .copied()
            .flatten()
            .is_some_and(|earlier| earlier != e.request.id)
        {
            return Some(Block::PairHeld);
        }
        let budget = self.pair_budget[e.pair];
        if budget > 0
            && self.pair_running[e.pair] > 0
            && self.pair_reserved[e.pair]
                + pair_reservation(e.request.bandwidth_bytes_per_sec, budget)
                > budget
        {
            return Some(Block::PairBandwidth);
        }
        None
    }

    /// Every limit (but the fleet cap) that keeps `e` waiting, in words.
    fn blocks(&self, e: &Entry, held_pairs: &[Option<Uuid>]) -> Vec<WaitReason> {
        let mut reasons = Vec::new();
        let r = &e.request;
        if self.cluster_busy[e.source] >= self.cluster_limit[e.source] {
            reasons.push(WaitReason::SourceClusterSlots {
                cluster: r.source_cluster.clone(),
                limit: self.cluster_limit[e.source],
            });
        }
        if self.cluster_busy[e.target] >= self.cluster_limit[e.target] {
            reasons.push(WaitReason::TargetClusterSlots {
                cluster: r.target_cluster.clone(),
                limit: self.cluster_limit[e.target],
            });
        }
        if self.node_busy[e.node] >= self.node_limit[e.node] {
            reasons.push(WaitReason::SourceNodeSlots {
                cluster: r.source_cluster.clone(),
                node: r.source_node.clone(),
                limit: self.node_limit[e.node],
            });
        }
        if self.vm_busy[e.vm] {
            reasons.push(WaitReason::VmBusy { vm: r.vm.clone() });
        }
        if let Some(earlier) = held_pairs.get(e.pair).copied().flatten() {
            if earlier != r.id {
                reasons.push(WaitReason::PairHeldForEarlier {
                    source: r.source_cluster.clone(),
                    target: r.target_cluster.clone(),
                    earlier,
                });
            }
        }
        let budget = self.pair_budget[e.pair];
        if budget > 0 && self.pair_running[e.pair] > 0 {
            let needed = pair_reservation(r.bandwidth_bytes_per_sec, budget);
            let reserved = self.pair_reserved[e.pair];
            if reserved + needed > budget {
                reasons.push(WaitReason::PairBandwidth {
                    source: r.source_cluster.clone(),
                    target: r.target_cluster.clone(),
                    budget_bytes_per_sec: budget,
                    reserved_bytes_per_sec: reserved,
                    needed_bytes_per_sec: needed,
                });
            }
        }
        reasons
    }

    /// Admits, in queue order, every queued migration that fits all limits together with what
    /// runs and what this round admitted before it. Returns their ids in that order.
    pub fn admit_now(&mut self) -> Vec<Uuid> {
        self.sort_order();
        let mut admitted = Vec::new();
        let mut held_pairs: Vec<Option<Uuid>> = vec![None; self.pair_budget.len()];
        let mut first_waiting = None;
        // Sources that might still give: once none is left the round is over (an evacuation
        // from one full cluster costs one step, not a scan of the whole queue).
        let mut open: Vec<bool> = (0..self.cluster_limit.len())
            .map(|c| self.source_open(c))
            .collect();
        let mut open_count = open.iter().filter(|o| **o).count();
        let mut k = self.scan_from;
        while k < self.order.len() && open_count > 0 {
            let index = self.order[k];
            k += 1;
            if self.entries[index].state != State::Queued {
                continue;
            }
            if self.in_flight >= self.limits.max_in_flight {
                first_waiting.get_or_insert(k - 1);
                break;
            }
            let (source, target) = (self.entries[index].source, self.entries[index].target);
            if self.vm_moved[self.entries[index].vm] {
                self.set_state(index, State::Superseded);
            } else {
                match self.first_block(index, &held_pairs) {
                    None => {
                        self.set_state(index, State::InFlight);
                        self.hold(index);
                        admitted.push(self.entries[index].request.id);
                    }
                    Some(block) => {
                        first_waiting.get_or_insert(k - 1);
                        if block == Block::PairBandwidth {
                            let pair = self.entries[index].pair;
                            held_pairs[pair] = Some(self.entries[index].request.id);
                        }
                        continue;
                    }
                }
            }
            for c in [source, target] {
                if open[c] && !self.source_open(c) {
                    open[c] = false;
                    open_count -= 1;
                }
            }
        }
        // Everything before `scan_from` has left the queue or is in flight; only a retry puts
        // an entry back there, and it resets the scan start.
        self.scan_from = first_waiting.unwrap_or(k).min(self.order.len());
        admitted
    }

    /// Every queued migration and all it waits for, in queue order, as things stand (call it
    /// after [`Self::admit_now`] to explain why the rest waits).
    pub fn waiting(&mut self) -> Vec<Waiting> {
        self.sort_order();
        let mut held_pairs: Vec<Option<Uuid>> = vec![None; self.pair_budget.len()];
        let mut waiting = Vec::new();
        for k in 0..self.order.len() {
            let index = self.order[k];
            let e = &self.entries[index];
            if e.state != State::Queued || self.vm_moved[e.vm] {
                continue;
            }
            let mut reasons = Vec::new();
            if self.in_flight >= self.limits.max_in_flight {
                reasons.push(WaitReason::FleetCap {
                    max_in_flight: self.limits.max_in_flight,
                });
            }
            let rest = self.blocks(e, &held_pairs);
            // As in `admit_now`: a pair is held for a migration that waits for its bandwidth
            // and for nothing else.
            if matches!(rest.as_slice(), [WaitReason::PairBandwidth { .. }])
                && held_pairs[e.pair].is_none()
            {
                held_pairs[e.pair] = Some(e.request.id);
            }
            reasons.extend(rest);
            waiting.push(Waiting {
                id: e.request.id,
                reasons,
            });
        }
        waiting
    }

    /// Records how an admitted migration ended; its slots are free at once. A failed one is
    /// queued again at its old position when [`retry_decision`] allows.
    pub fn finish(&mut self, id: Uuid, outcome: Outcome) -> Result<Finished, AdmissionError> {
        let Some(&index) = self.by_id.get(&id) else {
            return Err(AdmissionError::NotInFlight(id));
        };
        if self.entries[index].state != State::InFlight {
            return Err(AdmissionError::NotInFlight(id));
        }
        self.release(index);
        match outcome {
            Outcome::Succeeded => {
                self.set_state(index, State::Succeeded);
                let vm = self.entries[index].vm;
                self.vm_moved[vm] = true;
                Ok(Finished::Succeeded)
            }
            Outcome::Failed { safety } => {
                let attempt = self.entries[index].request.attempt;
                match retry_decision(attempt, self.limits.max_attempts, safety) {
                    RetryDecision::Retry { next_attempt } => {
                        self.entries[index].request.attempt = next_attempt;
                        self.set_state(index, State::Queued);
                        self.scan_from = 0;
                        Ok(Finished::Requeued {
                            attempt: next_attempt,
                        })
                    }
                    RetryDecision::GiveUp { reason } => {
                        self.set_state(index, State::GaveUp);
                        Ok(Finished::GaveUp { reason })
                    }
                }
            }
        }
    }

    /// The migration as admission knows it (its attempt counts up on retries).
    pub fn request(&self, id: Uuid) -> Option<&MigrationRequest> {
        self.by_id.get(&id).map(|&i| &self.entries[i].request)
    }

    pub fn in_flight_count(&self) -> usize {
        self.in_flight
    }

    pub fn in_flight(&self) -> impl Iterator<Item = &MigrationRequest> {
        self.entries
            .iter()
            .filter(|e| e.state == State::InFlight)
            .map(|e| &e.request)
    }

    pub fn queued(&self) -> impl Iterator<Item = &MigrationRequest> {
        self.entries
            .iter()
            .filter(|e| e.state == State::Queued && !self.vm_moved[e.vm])
            .map(|e| &e.request)
    }

    /// Nothing queued and nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.queued().next().is_none()
    }

    /// The budget of the pair `source -> target` as this admitter resolves it (0: none).
    pub fn pair_budget(&self, source: &str, target: &str) -> u64 {
        self.limits.pair_bandwidth.budget(source, target)
    }
}

/// Resolves budgets for many pairs at once (for reports over whole plans).
pub fn pair_budgets<'a>(
    bandwidth: &PairBandwidth,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<(String, String), u64> {
    let table = bandwidth.table();
    pairs
        .into_iter()
        .map(|(s, t)| {
            (
                (s.to_owned(), t.to_owned()),
                table
                    .get(&(s, t))
                    .copied()
                    .unwrap_or(bandwidth.default_bytes_per_sec),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: u128, vm: &str, s: &str, node: &str, t: &str, bw: u64) -> MigrationRequest {
        MigrationRequest {
            id: Uuid::from_u128(n),
            vm: vm.into(),
            position: n as u64,
            source_cluster: s.into(),
            source_node: node.into(),
            target_cluster: t.into(),
            bytes: 1 << 30,
            bandwidth_bytes_per_sec: bw,
            attempt: 1,
        }
    }

    fn limits(max_in_flight: usize, per_cluster: u32, per_node: u32) -> AdmissionLimits {
        AdmissionLimits {
            max_in_flight,
            max_attempts: 3,
            clusters: ["a", "b", "c", "d"]
                .into_iter()
                .map(|c| {
                    (
                        c.to_owned(),
                        ClusterSlots {
                            parallel_migrations_per_cluster: per_cluster,
                            parallel_outbound_migrations_per_node: per_node,
                        },
                    )
                })
                .collect(),
            pair_bandwidth: PairBandwidth::default(),
        }
    }

    fn ids(ns: &[u128]) -> Vec<Uuid> {
        ns.iter().map(|&n| Uuid::from_u128(n)).collect()
    }

    #[test]
    fn a_migration_holds_a_slot_at_its_source_and_its_target() {
        // b can run 2: a->b and c->b fill it, so d->b waits while a->c still goes.
        let queue = vec![
            request(1, "v1", "a", "n1", "b", 0),
            request(2, "v2", "c", "n1", "b", 0),
            request(3, "v3", "d", "n1", "b", 0),
            request(4, "v4", "a", "n2", "c", 0),
        ];
        let decision = admit(&limits(10, 2, 2), &queue, &[]);
        assert_eq!(decision.admitted, ids(&[1, 2, 4]));
        assert_eq!(
            decision.waiting[0].reasons,
            vec![WaitReason::TargetClusterSlots {
                cluster: "b".into(),
                limit: 2
            }]
        );
    }

    #[test]
    fn the_fleet_cap_and_the_node_limit_hold_with_what_already_runs() {
        let running = vec![request(10, "r1", "a", "n1", "b", 0)];
        let queue = vec![
            request(1, "v1", "a", "n1", "c", 0),
            request(2, "v2", "a", "n2", "c", 0),
            request(3, "v3", "d", "n1", "c", 0),
        ];
        // One outbound per node: n1 of a is busy. Fleet cap 2: one more only.
        let decision = admit(&limits(2, 5, 1), &queue, &running);
        assert_eq!(decision.admitted, ids(&[2]));
        let why: Vec<String> = decision.waiting[0]
            .reasons
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(why[0].contains("cap"), "{why:?}");
        assert!(
            why.iter()
                .any(|w| w.contains("node n1 of a sends 1 migrations")),
            "{why:?}"
        );
    }

    #[test]
    fn a_pair_budget_is_shared_by_reservations_and_a_wide_migration_is_not_starved() {
        let mut l = limits(10, 10, 10);
        l.pair_bandwidth.pairs.push(PairBudget {
            source: "a".into(),
            target: "b".into(),
            bytes_per_sec: 100,
        });
        let queue = vec![
            request(1, "v1", "a", "n1", "b", 60),
            // Unlimited: reserves the whole budget, so it waits for v1...
            request(2, "v2", "a", "n2", "b", 0),
            // ...and v3 (40 would fit) does not overtake it on that pair.
            request(3, "v3", "a", "n3", "b", 40),
            // Another pair is not held.
            request(4, "v4", "a", "n4", "c", 0),
        ];
        let mut admitter = Admitter::new(l);
        for q in queue {
            admitter.enqueue(q);
        }
        assert_eq!(admitter.admit_now(), ids(&[1, 4]));
        let waiting = admitter.waiting();
        assert!(matches!(
            waiting[1].reasons[0],
            WaitReason::PairHeldForEarlier { .. }
        ));
        admitter
            .finish(Uuid::from_u128(1), Outcome::Succeeded)
            .unwrap();
        assert_eq!(admitter.admit_now(), ids(&[2]), "the wide one goes alone");
        admitter
            .finish(Uuid::from_u128(2), Outcome::Succeeded)
            .unwrap();
        assert_eq!(admitter.admit_now(), ids(&[3]));
    }

    #[test]
    fn a_finished_migration_frees_its_slots_at_once() {
        let mut admitter = Admitter::new(limits(10, 1, 1));
        for n in 1..=3 {
            admitter.enqueue(request(n, &format!("v{n}"), "a", "n1", "b", 0));
        }
        assert_eq!(admitter.admit_now(), ids(&[1]));
        assert!(admitter.admit_now().is_empty());
        admitter
            .finish(Uuid::from_u128(1), Outcome::Succeeded)
            .unwrap();
        assert_eq!(admitter.admit_now(), ids(&[2]));
    }

    #[test]
    fn failures_are_retried_only_when_safe_and_up_to_the_limit() {
        let mut admitter = Admitter::new(limits(10, 5, 5));
        admitter.enqueue(request(1, "v1", "a", "n1", "b", 0));
        admitter.enqueue(request(2, "v2", "a", "n1", "b", 0));
        assert_eq!(admitter.admit_now().len(), 2);
        let unsafe_failure = Outcome::Failed {
            safety: FailureSafety {
                source_running: true,
                target_cleaned_up: false,
            },
        };
        match admitter.finish(Uuid::from_u128(2), unsafe_failure).unwrap() {
            Finished::GaveUp { reason } => assert!(reason.contains("clean them up"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let safe_failure = Outcome::Failed {
            safety: FailureSafety::SAFE,
        };
        for attempt in 2..=3 {
            assert_eq!(
                admitter.finish(Uuid::from_u128(1), safe_failure).unwrap(),
                Finished::Requeued { attempt }
            );
            assert_eq!(admitter.admit_now(), ids(&[1]));
        }
        match admitter.finish(Uuid::from_u128(1), safe_failure).unwrap() {
            Finished::GaveUp { reason } => assert!(reason.contains("3 attempts"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(admitter.is_idle());
        assert_eq!(
            admitter.finish(Uuid::from_u128(1), Outcome::Succeeded),
            Err(AdmissionError::NotInFlight(Uuid::from_u128(1)))
        );
    }

    #[test]
    fn a_vm_never_runs_twice_and_never_moves_again_once_moved() {
        let mut admitter = Admitter::new(limits(10, 5, 5));
        admitter.enqueue(request(1, "same", "a", "n1", "b", 0));
        admitter.enqueue(request(2, "same", "a", "n2", "c", 0));
        assert_eq!(admitter.admit_now(), ids(&[1]));
        assert!(matches!(
            admitter.waiting()[0].reasons[0],
            WaitReason::VmBusy { .. }
        ));
        admitter
            .finish(Uuid::from_u128(1), Outcome::Succeeded)
            .unwrap();
        assert!(admitter.admit_now().is_empty());
        assert!(admitter.is_idle());
    }
}
