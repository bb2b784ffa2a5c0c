//! The placement engine: what every target cluster can still take (memory per node after
//! reservations and earlier placements, the spare kept for node drains), who uses which MAC
//! address, name and group where, and the choice of a target and node for each VM, or the reasons
//! none fits. Built once per plan from indexes over the fleet; see the planner's module doc for
//! the rules.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;

use drover_shared::inventory::{ClusterHealth, VmInfo, VmPhase};
use drover_shared::VmRef;
use uuid::Uuid;

use super::blockers::{Blocker, BlockerKind, TargetReasons};
use super::policy::{namespace_labels_of, options_for};
use super::{
    estimate, move_id, vm_ref, CannotMove, ClusterLimits, Enforcement, Fleet, FleetCluster,
    LimitsInForce, Plan, PlanKind, PlanOptions, PlannedMove, AFFINITY_LABEL, ANTI_AFFINITY_LABEL,
    LIVE_MIGRATION_GATE, PINNED_LABEL,
};
use crate::core::admission::{pair_budgets, AdmissionLimits, ClusterSlots, PairBudget};

/// A fast, non-cryptographic hasher (FxHash's multiply-rotate) for the planner's own indexes of
/// MACs and names: these are hashed a few hundred thousand times per plan, and SipHash's
/// resistance to chosen collisions buys nothing in a computation that only slows down.
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
        for &b in chunks.remainder() {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;
type FastSet<K> = HashSet<K, std::hash::BuildHasherDefault<FastHasher>>;

/// Parses a MAC address ("02:00:00:ab:cd:ef" or with '-') into 48 bits, without allocating.
pub(crate) fn mac_key(mac: &str) -> Option<u64> {
    let bytes = mac.as_bytes();
    if bytes.len() != 17 {
        return None;
    }
    fn hex(b: u8) -> Option<u64> {
        match b {
            b'0'..=b'9' => Some(u64::from(b - b'0')),
            b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
            b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
            _ => None,
        }
    }
    let mut value = 0u64;
    for i in 0..6 {
        let at = i * 3;
        if i < 5 && bytes[at + 2] != b':' && bytes[at + 2] != b'-' {
            return None;
        }
        value = (value << 8) | (hex(bytes[at])? << 4) | hex(bytes[at + 1])?;
    }
    Some(value)
}

fn mac_text(key: u64) -> String {
    let b = key.to_be_bytes();
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[2], b[3], b[4], b[5], b[6], b[7]
    )
}

pub(crate) fn major_minor(version: &str) -> &str {
    match version.match_indices('.').nth(1) {
        Some((i, _)) => &version[..i],
        None => version,
    }
}

pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

pub(crate) fn has_live_migration_gate(cluster: &FleetCluster) -> bool {
    cluster
        .info
        .feature_gates
        .iter()
        .any(|g| g.eq_ignore_ascii_case(LIVE_MIGRATION_GATE))
}

pub(crate) fn disk_bytes(vm: &VmInfo) -> u64 {
    vm.disks.iter().map(|d| d.size_bytes).sum()
}

/// Utilisations within this step count as equal when spreading; between such targets, the one
/// with the fewest bytes already planned towards it per migration slot wins, so that an
/// evacuation spreads over many pairs and slots and ends sooner.
pub(crate) const SPREAD_STEP: f64 = 0.005;

/// How a target ranks for a VM, smallest first: misses its affinity group, meets its
/// anti-affinity group, utilisation after in [`SPREAD_STEP`]s, bytes planned towards it per slot,
/// exact utilisation after (as f64 bits), place in name order.
type TargetRank = (bool, bool, u64, u64, u64, usize);

/// A schedulable node's memory: what it has and what is asked of it.
#[derive(Debug, Clone)]
pub(crate) struct NodeLoad<'a> {
    pub name: &'a str,
    pub allocatable: u64,
    /// Requests on it, plus reservations and placements of this plan.
    pub load: u64,
}

impl NodeLoad<'_> {
    fn free(&self) -> u64 {
        self.allocatable.saturating_sub(self.load)
    }
}

/// A cluster's memory as placements accumulate (schedulable nodes only).
#[derive(Debug, Clone, Default)]
pub(crate) struct ClusterLoad<'a> {
    pub nodes: Vec<NodeLoad<'a>>,
    pub allocatable: u64,
    pub load: u64,
    pub free: u64,
    max_free: u64,
    max_load: u64,
}

impl<'a> ClusterLoad<'a> {
    /// A node's load is what is requested of it, and never less than the memory of the VMs
    /// the cluster reports on it: a node report that lags behind its VMs must neither make
    /// room that is not there nor let a VM that leaves take less off than it holds.
    pub(crate) fn of(cluster: &'a FleetCluster) -> Self {
        let mut held: HashMap<&str, u64> = HashMap::new();
        for vm in cluster.vms.iter().filter(|v| holds_memory(v.phase)) {
            if let Some(node) = vm.node.as_deref() {
                *held.entry(node).or_default() += vm.memory_bytes;
            }
        }
        let mut load = Self {
            nodes: cluster
                .nodes
                .iter()
                .filter(|n| n.schedulable)
                .map(|n| NodeLoad {
                    name: &n.name,
                    allocatable: n.allocatable_memory_bytes,
                    load: n
                        .requested_memory_bytes
                        .max(held.get(n.name.as_str()).copied().unwrap_or(0)),
                })
                .collect(),
            ..Self::default()
        };
        load.refresh();
        load
    }

    fn refresh(&mut self) {
        self.allocatable = self.nodes.iter().map(|n| n.allocatable).sum();
        self.load = self.nodes.iter().map(|n| n.load).sum();
        self.free = self.nodes.iter().map(NodeLoad::free).sum();
        self.max_free = self.nodes.iter().map(NodeLoad::free).max().unwrap_or(0);
        self.max_load = self.nodes.iter().map(|n| n.load).max().unwrap_or(0);
    }

    /// Memory utilisation after adding `extra` in steps of [`SPREAD_STEP`]: targets in the
    /// same step count as equally loaded.
    pub(crate) fn utilisation_step(&self, extra: u64) -> u64 {
        if self.allocatable == 0 {
            return u64::MAX;
        }
        ((self.load as f64 + extra as f64) / self.allocatable as f64 / SPREAD_STEP) as u64
    }

    /// Memory utilisation after adding `extra`, as the bits of a non-negative f64 (which order
    /// like the numbers); a cluster with no memory counts as full.
    pub(crate) fn utilisation_key(&self, extra: u64) -> u64 {
        if self.allocatable == 0 {
            return u64::MAX;
        }
        ((self.load as f64 + extra as f64) / self.allocatable as f64).to_bits()
    }

    pub(crate) fn utilisation(&self) -> f64 {
        if self.allocatable == 0 {
            return f64::INFINITY;
        }
        self.load as f64 / self.allocatable as f64
    }

    /// The memory kept free for `drains` node drains: drains x the highest node request total.
    pub(crate) fn spare(&self, drains: u64) -> u64 {
        drains.saturating_mul(self.max_load)
    }

    /// A cheap test that never says no to a placement `choose_node` would accept.
    fn might_fit(&self, memory: u64, drains: u64) -> bool {
        self.max_free >= memory
            && self.free - memory >= drains.saturating_mul(self.max_load.max(memory))
    }

    /// The node with the most room that takes `memory` while the cluster keeps its spare.
    pub(crate) fn choose_node(&self, memory: u64, drains: u64) -> Option<usize> {
        if self.max_free < memory {
            return None;
        }
        let free_after = self.free - memory;
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                n.free() >= memory
                    && free_after >= drains.saturating_mul(self.max_load.max(n.load + memory))
            })
            .max_by(|(i, a), (j, b)| a.free().cmp(&b.free()).then(j.cmp(i)))
            .map(|(i, _)| i)
    }

    pub(crate) fn add(&mut self, node: usize, memory: u64) {
        self.nodes[node].load += memory;
        self.refresh();
    }

    /// Takes `memory` off `node` (by name), and whatever that node does not hold (it is not a
    /// schedulable node here, or its report lags) off the busiest nodes: the cluster's load
    /// always falls by the VM's memory, as far as it has any.
    pub(crate) fn remove(&mut self, node: Option<&str>, memory: u64) {
        let mut left = memory;
        if let Some(i) = node.and_then(|name| self.nodes.iter().position(|n| n.name == name)) {
            let taken = left.min(self.nodes[i].load);
            self.nodes[i].load -= taken;
            left -= taken;
        }
        while left > 0 {
            let Some(i) = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].load > 0)
                .max_by_key(|&i| (self.nodes[i].load, usize::MAX - i))
            else {
                break;
            };
            let taken = left.min(self.nodes[i].load);
            self.nodes[i].load -= taken;
            left -= taken;
        }
        self.refresh();
    }

    /// Adds a reservation: on its node if known, else on the node with most room.
    fn reserve(&mut self, node: Option<&str>, memory: u64) {
        let index = node
            .and_then(|name| self.nodes.iter().position(|n| n.name == name))
            .or_else(|| {
                (0..self.nodes.len()).max_by_key(|&i| (self.nodes[i].free(), usize::MAX - i))
            });
        if let Some(i) = index {
            self.nodes[i].load += memory;
            self.refresh();
        }
    }
}

/// Whether a VM in `phase` holds memory on its node (a stopped or failed one has no process).
pub(crate) fn holds_memory(phase: VmPhase) -> bool {
    !matches!(phase, VmPhase::Stopped | VmPhase::Failed)
}

/// The memory of every cluster after the fleet's reservations.
pub(crate) fn cluster_loads(fleet: &Fleet) -> Vec<ClusterLoad<'_>> {
    let mut loads: Vec<ClusterLoad> = fleet.clusters.iter().map(ClusterLoad::of).collect();
    let index: HashMap<&str, usize> = fleet
        .clusters
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
    for r in &fleet.reservations {
        if let Some(&t) = index.get(r.target_cluster.as_str()) {
            loads[t].reserve(r.target_node.as_deref(), r.memory_bytes);
        }
    }
    loads
}

/// Who holds a MAC address or a name on a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// A VM of the fleet: (cluster, vm) indexes.
    Vm(usize, usize),
    /// A migration queued or running towards the cluster.
    Reservation(usize),
    /// A VM this plan puts there: (its source cluster, vm) indexes.
    Planned(usize, usize),
}

/// What a VM needs of a target beyond its cluster-level rules: (source cluster, storage classes,
/// networks), after the plan's maps. VMs that need the same share one candidate list.
type Needs<'a> = (usize, Vec<&'a str>, Vec<&'a str>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum GroupRule {
    Together,
    Apart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Evacuation,
    Move,
    Rebalance,
}

/// A VM to place, with what it needs.
#[derive(Debug)]
pub(crate) struct Mover<'a> {
    pub cluster: usize,
    /// Its index among its cluster's VMs.
    pub vm_index: usize,
    pub vm: &'a VmInfo,
    pub key: Option<VmRef>,
    pub memory: u64,
    pub disks: u64,
    macs: Vec<u64>,
    /// (source class, target class) of each disk, deduplicated.
    classes: Vec<(&'a str, &'a str)>,
    networks: Vec<(&'a str, &'a str)>,
    pub affinity: Option<&'a str>,
    pub anti_affinity: Option<&'a str>,
    /// Reasons it cannot move wherever it would go.
    pub vm_blockers: Vec<Blocker>,
    candidates: Rc<Vec<usize>>,
}

/// A chosen target.
#[derive(Debug, Clone)]
pub(crate) struct Choice {
    pub target: usize,
    pub node: usize,
    pub warnings: Vec<String>,
}

struct Placed {
    mover: usize,
    target: usize,
    node_name: String,
    warnings: Vec<String>,
}

pub(crate) struct Engine<'a> {
    fleet: &'a Fleet,
    options: &'a PlanOptions,
    mode: Mode,
    drains: u64,
    pub loads: Vec<ClusterLoad<'a>>,
    /// Each cluster's place in name order (ties go to the first name).
    rank: Vec<usize>,
    macs: FastMap<u64, Vec<(usize, Holder)>>,
    names: FastMap<(&'a str, &'a str), Vec<(usize, Holder)>>,
    groups: FastMap<(GroupRule, &'a str), BTreeMap<usize, u32>>,
    migrating: FastMap<(&'a str, &'a str, &'a str), Uuid>,
    cluster_compat: HashMap<usize, Rc<Vec<usize>>>,
    pub movers: Vec<Mover<'a>>,
    placed: Vec<Placed>,
    cannot: Vec<CannotMove>,
    notes: Vec<String>,
    /// Clusters that gave or took VMs in this plan (a rebalance never does both to one).
    pub gave: Vec<bool>,
    pub took: Vec<bool>,
    /// Rebalances: only these clusters may receive.
    pub receiving: Option<Vec<bool>>,
    /// Bytes this plan sends to each cluster, per migration slot it has.
    inbound_per_slot: Vec<u64>,
    slots: Vec<u64>,
}

impl<'a> Engine<'a> {
    /// Indexes the fleet for placing the VMs `movers` ((cluster, vm) indexes); their MACs, names
    /// and groups are looked up in one pass over the fleet.
    pub(crate) fn new(
        fleet: &'a Fleet,
        options: &'a PlanOptions,
        movers: &[(usize, usize)],
        mode: Mode,
    ) -> Self {
        let n = fleet.clusters.len();
        let mut by_name: Vec<usize> = (0..n).collect();
        by_name.sort_by(|&a, &b| fleet.clusters[a].name.cmp(&fleet.clusters[b].name));
        let mut rank = vec![0; n];
        for (r, &c) in by_name.iter().enumerate() {
            rank[c] = r;
        }
        let mut engine = Self {
            fleet,
            options,
            mode,
            drains: u64::from(options.nodes_draining_in_parallel),
            loads: cluster_loads(fleet),
            rank,
            macs: FastMap::default(),
            names: FastMap::default(),
            groups: FastMap::default(),
            migrating: FastMap::default(),
            cluster_compat: HashMap::new(),
            movers: Vec::new(),
            placed: Vec::new(),
            cannot: Vec::new(),
            notes: Vec::new(),
            gave: vec![false; n],
            took: vec![false; n],
            receiving: None,
            inbound_per_slot: vec![0; n],
            slots: fleet
                .clusters
                .iter()
                .map(|c| {
                    let slots = options.limits.clusters.get(c.name.as_str()).map_or(
                        c.info.migration_config.parallel_migrations_per_cluster,
                        |s| s.parallel_migrations_per_cluster,
                    );
                    u64::from(slots.max(1))
                })
                .collect(),
        };
        engine.index(movers);
        let mut signatures: HashMap<Needs, Rc<Vec<usize>>> = HashMap::new();
        for &(c, v) in movers {
            let mover = engine.mover(c, v, &mut signatures);
            engine.movers.push(mover);
        }
        engine
    }

    /// One pass over the fleet and its reservations for the MACs, names and groups that matter.
    fn index(&mut self, movers: &[(usize, usize)]) {
        let fleet = self.fleet;
        let mut watched_macs: FastSet<u64> = FastSet::default();
        let mut watched_names: FastSet<(&str, &str)> = FastSet::default();
        let mut watched_groups: FastSet<(GroupRule, &str)> = FastSet::default();
        let options = self.options;
        for &(c, v) in movers {
            let vm = &fleet.clusters[c].vms[v];
            watched_macs.extend(vm.interfaces.iter().filter_map(|i| mac_key(&i.mac)));
            let namespace = options.target_namespace.as_deref().unwrap_or(&vm.namespace);
            watched_names.insert((namespace, vm.name.as_str()));
            if let Some(g) = vm.labels.get(AFFINITY_LABEL) {
                watched_groups.insert((GroupRule::Together, g.as_str()));
            }
            if let Some(g) = vm.labels.get(ANTI_AFFINITY_LABEL) {
                watched_groups.insert((GroupRule::Apart, g.as_str()));
            }
        }
        let watch_groups = !watched_groups.is_empty();
        for (c, cluster) in fleet.clusters.iter().enumerate() {
            for (v, vm) in cluster.vms.iter().enumerate() {
                for iface in &vm.interfaces {
                    if let Some(mac) = mac_key(&iface.mac) {
                        if watched_macs.contains(&mac) {
                            self.macs
                                .entry(mac)
                                .or_default()
                                .push((c, Holder::Vm(c, v)));
                        }
                    }
                }
                let name = (vm.namespace.as_str(), vm.name.as_str());
                if watched_names.contains(&name) {
                    self.names
                        .entry(name)
                        .or_default()
                        .push((c, Holder::Vm(c, v)));
                }
                if watch_groups && !vm.labels.is_empty() {
                    self.count_groups(&vm.labels, c, &watched_groups, 1);
                }
                if vm.phase == VmPhase::Migrating {
                    self.migrating
                        .insert((cluster.name.as_str(), name.0, name.1), Uuid::nil());
                }
            }
        }
        let index: HashMap<&str, usize> = fleet
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        for (r, reservation) in fleet.reservations.iter().enumerate() {
            self.migrating.insert(
                (
                    reservation.vm.cluster.as_str(),
                    reservation.vm.namespace.as_str(),
                    reservation.vm.name.as_str(),
                ),
                reservation.migration_id,
            );
            let Some(&t) = index.get(reservation.target_cluster.as_str()) else {
                continue;
            };
            for mac in reservation.macs.iter().filter_map(|m| mac_key(m)) {
                if watched_macs.contains(&mac) {
                    self.macs
                        .entry(mac)
                        .or_default()
                        .push((t, Holder::Reservation(r)));
                }
            }
            let name = (
                reservation.target_namespace.as_str(),
                reservation.vm.name.as_str(),
            );
            if watched_names.contains(&name) {
                self.names
                    .entry(name)
                    .or_default()
                    .push((t, Holder::Reservation(r)));
            }
            self.count_groups(&reservation.labels, t, &watched_groups, 1);
        }
    }

    fn count_groups(
        &mut self,
        labels: &'a BTreeMap<String, String>,
        cluster: usize,
        watched: &FastSet<(GroupRule, &str)>,
        delta: i64,
    ) {
        for (rule, key) in [
            (GroupRule::Together, AFFINITY_LABEL),
            (GroupRule::Apart, ANTI_AFFINITY_LABEL),
        ] {
            if let Some(g) = labels.get(key) {
                if watched.contains(&(rule, g.as_str())) {
                    let count = self
                        .groups
                        .entry((rule, g.as_str()))
                        .or_default()
                        .entry(cluster)
                        .or_default();
                    *count = (i64::from(*count) + delta).max(0) as u32;
                }
            }
        }
    }

    /// Targets of `source` that pass every cluster-level rule, in name order.
    fn compatible_clusters(&mut self, source: usize) -> Rc<Vec<usize>> {
        if let Some(list) = self.cluster_compat.get(&source) {
            return list.clone();
        }
        let mut list: Vec<usize> = (0..self.fleet.clusters.len())
            .filter(|&t| self.allowed(source, t) && self.cluster_problems(source, t, None))
            .collect();
        list.sort_by_key(|&t| self.rank[t]);
        let list = Rc::new(list);
        self.cluster_compat.insert(source, list.clone());
        list
    }

    fn allowed(&self, source: usize, target: usize) -> bool {
        source != target
            && self
                .options
                .target_clusters
                .as_ref()
                .is_none_or(|allowed| allowed.contains(&self.fleet.clusters[target].name))
    }

    /// True when `target` passes every cluster-level rule for VMs of `source`; otherwise
    /// records why in `reasons` (if given) and returns false.
    fn cluster_problems(
        &self,
        source: usize,
        target: usize,
        mut reasons: Option<&mut TargetReasons>,
    ) -> bool {
        let s = &self.fleet.clusters[source];
        let t = &self.fleet.clusters[target];
        let name = t.name.as_str();
        let mut ok = true;
        let mut fail = |kind: BlockerKind, detail: String| {
            ok = false;
            if let Some(r) = reasons.as_deref_mut() {
                r.add(kind, name, detail);
            }
        };
        if t.health != ClusterHealth::Ready {
            fail(
                BlockerKind::TargetNotReady,
                format!("{name} is {}", t.health.as_str()),
            );
        }
        if t.cordoned {
            fail(BlockerKind::TargetCordoned, name.to_owned());
        }
        if t.info.runtime != s.info.runtime {
            fail(
                BlockerKind::RuntimeMismatch,
                format!(
                    "{name} runs {} (the VM runs on {})",
                    t.info.runtime.as_str(),
                    s.info.runtime.as_str()
                ),
            );
        }
        if major_minor(&t.info.platform_version) != major_minor(&s.info.platform_version) {
            fail(
                BlockerKind::PlatformVersionMismatch,
                format!(
                    "{name} runs {} (the source runs {})",
                    t.info.platform_version, s.info.platform_version
                ),
            );
        }
        if major_minor(&t.info.virtualization_version)
            != major_minor(&s.info.virtualization_version)
        {
            fail(
                BlockerKind::VirtualizationVersionMismatch,
                format!(
                    "{name} runs {} (the source runs {})",
                    t.info.virtualization_version, s.info.virtualization_version
                ),
            );
        }
        if !has_live_migration_gate(t) {
            fail(BlockerKind::FeatureGateOff, name.to_owned());
        }
        if t.info.sync_endpoint.as_deref().unwrap_or("").is_empty() {
            fail(BlockerKind::NoSyncEndpoint, name.to_owned());
        }
        ok
    }

    /// True when `target` offers what the VM needs (CPU model, storage classes, networks);
    /// otherwise records why (if asked) and returns false.
    fn vm_static_problems(
        &self,
        source: usize,
        classes: &[(&str, &str)],
        networks: &[(&str, &str)],
        target: usize,
        mut reasons: Option<&mut TargetReasons>,
    ) -> bool {
        let s = &self.fleet.clusters[source];
        let t = &self.fleet.clusters[target];
        let name = t.name.as_str();
        let mut ok = true;
        let mut fail = |kind: BlockerKind, detail: String| {
            ok = false;
            if let Some(r) = reasons.as_deref_mut() {
                r.add(kind, name, detail);
            }
        };
        if let Some(cpu) = s.info.cpu_models.first() {
            if !t.info.cpu_models.contains(cpu) {
                fail(
                    BlockerKind::CpuModelMissing,
                    format!(
                        "{name} offers no {cpu} (it offers {})",
                        list_or_none(&t.info.cpu_models)
                    ),
                );
            }
        }
        for &(from, to) in classes {
            let present = if to.is_empty() {
                t.info.storage_classes.iter().any(|c| c.is_default)
            } else {
                t.info.storage_classes.iter().any(|c| c.name == to)
            };
            if !present {
                let what = match (from == to, to.is_empty()) {
                    (_, true) => "a default storage class".to_owned(),
                    (true, false) => format!("storage class {to}"),
                    (false, false) => format!("storage class {to} (mapped from {from})"),
                };
                fail(
                    BlockerKind::StorageClassMissing,
                    format!("{name} has no {what}"),
                );
            }
        }
        for &(from, to) in networks {
            if !t.info.networks.iter().any(|n| n == to) {
                let what = if from == to {
                    format!("network {to}")
                } else {
                    format!("network {to} (mapped from {from})")
                };
                fail(BlockerKind::NetworkMissing, format!("{name} has no {what}"));
            }
        }
        ok
    }

    fn mover(
        &mut self,
        c: usize,
        v: usize,
        signatures: &mut HashMap<Needs<'a>, Rc<Vec<usize>>>,
    ) -> Mover<'a> {
        let fleet = self.fleet;
        let options = self.options;
        let cluster = &fleet.clusters[c];
        let vm = &cluster.vms[v];
        let map = |m: &'a BTreeMap<String, String>, from: &'a str| -> &'a str {
            m.get(from).map_or(from, String::as_str)
        };
        let mut classes: Vec<(&str, &str)> = vm
            .disks
            .iter()
            .map(|d| {
                let from = d.storage_class.as_str();
                (from, map(&options.storage_class_map, from))
            })
            .collect();
        classes.sort_unstable();
        classes.dedup();
        let mut networks: Vec<(&str, &str)> = vm
            .interfaces
            .iter()
            .map(|i| {
                let from = i.network.as_str();
                (from, map(&options.network_map, from))
            })
            .collect();
        networks.sort_unstable();
        networks.dedup();
        let signature = (
            c,
            classes.iter().map(|x| x.1).collect::<Vec<_>>(),
            networks.iter().map(|x| x.1).collect::<Vec<_>>(),
        );
        let candidates = match signatures.get(&signature) {
            Some(list) => list.clone(),
            None => {
                let compatible = self.compatible_clusters(c);
                let list: Vec<usize> = compatible
                    .iter()
                    .copied()
                    .filter(|&t| self.vm_static_problems(c, &classes, &networks, t, None))
                    .collect();
                let list = Rc::new(list);
                signatures.insert(signature, list.clone());
                list
            }
        };
        let key = vm_ref(&cluster.name, vm);
        let mut vm_blockers = Vec::new();
        if !vm.migratable {
            let why = if vm.non_migratable_reasons.is_empty() {
                "the cluster gives no reason".to_owned()
            } else {
                vm.non_migratable_reasons.join(", ")
            };
            vm_blockers.push(Blocker::about_vm(
                BlockerKind::NotMigratable,
                format!("the VM is not live-migratable: {why}"),
            ));
        }
        if vm.phase != VmPhase::Running && vm.phase != VmPhase::Migrating {
            vm_blockers.push(Blocker::about_vm(
                BlockerKind::NotRunning,
                format!(
                    "the VM is {}; only a running VM live-migrates",
                    vm.phase.as_str()
                ),
            ));
        }
        if vm.labels.get(PINNED_LABEL).is_some_and(|p| p == "true") {
            vm_blockers.push(Blocker::about_vm(
                BlockerKind::Pinned,
                format!("the VM is pinned ({PINNED_LABEL}=true)"),
            ));
        }
        if let Some(id) = self.migrating.get(&(
            cluster.name.as_str(),
            vm.namespace.as_str(),
            vm.name.as_str(),
        )) {
            let message = if id.is_nil() {
                "the VM is already migrating (its cluster reports it Migrating)".to_owned()
            } else {
                format!("the VM is already migrating (migration {id})")
            };
            vm_blockers.push(Blocker::about_vm(BlockerKind::AlreadyMigrating, message));
        }
        if cluster.health != ClusterHealth::Ready {
            vm_blockers.push(Blocker::about_vm(
                BlockerKind::SourceNotReady,
                format!(
                    "its cluster {} is {}; a live migration needs the source Ready",
                    cluster.name,
                    cluster.health.as_str()
                ),
            ));
        }
        if !has_live_migration_gate(cluster) {
            vm_blockers.push(Blocker::about_vm(
                BlockerKind::SourceFeatureGateOff,
                format!(
                    "its cluster {} does not enable {LIVE_MIGRATION_GATE}",
                    cluster.name
                ),
            ));
        }
        Mover {
            cluster: c,
            vm_index: v,
            vm,
            key,
            memory: vm.memory_bytes,
            disks: disk_bytes(vm),
            macs: vm
                .interfaces
                .iter()
                .filter_map(|i| mac_key(&i.mac))
                .collect(),
            classes,
            networks,
            affinity: vm.labels.get(AFFINITY_LABEL).map(String::as_str),
            anti_affinity: vm.labels.get(ANTI_AFFINITY_LABEL).map(String::as_str),
            vm_blockers,
            candidates,
        }
    }

    /// Clusters where a MAC or the name of mover `m` is taken.
    fn taken(&self, m: &Mover) -> Vec<usize> {
        let mut taken: Vec<usize> = m
            .macs
            .iter()
            .filter_map(|mac| self.macs.get(mac))
            .flatten()
            .map(|&(t, _)| t)
            .collect();
        if let Some(holders) = self
            .names
            .get(&(self.target_namespace(m.vm), m.vm.name.as_str()))
        {
            taken.extend(holders.iter().map(|&(t, _)| t));
        }
        taken.sort_unstable();
        taken.dedup();
        taken
    }

    /// Clusters holding members of `group` under `rule`, but `except`.
    fn group_clusters(&self, rule: GroupRule, group: Option<&str>, except: usize) -> Vec<usize> {
        group
            .and_then(|g| self.groups.get(&(rule, g)))
            .map(|m| {
                m.iter()
                    .filter(|&(&c, &n)| n > 0 && c != except)
                    .map(|(&c, _)| c)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The best target for mover `m` among `candidates` (its own if None), or None.
    pub(crate) fn choose(&self, m: usize, only: Option<&[usize]>) -> Option<Choice> {
        let mover = &self.movers[m];
        let candidates: &[usize] = only.unwrap_or(&mover.candidates);
        let taken = self.taken(mover);
        let together = self.group_clusters(GroupRule::Together, mover.affinity, mover.cluster);
        let apart = self.group_clusters(GroupRule::Apart, mover.anti_affinity, mover.cluster);
        let affinity = self.options.affinity;
        let anti_affinity = self.options.anti_affinity;
        let mut rejected: Vec<usize> = Vec::new();
        loop {
            let mut best: Option<(TargetRank, usize)> = None;
            for &t in candidates {
                if taken.binary_search(&t).is_ok() || rejected.contains(&t) {
                    continue;
                }
                if self.gave[t] && self.mode == Mode::Rebalance
                    || self.receiving.as_ref().is_some_and(|r| !r[t])
                {
                    continue;
                }
                let miss_together = !together.is_empty() && !together.contains(&t);
                let hit_apart = apart.contains(&t);
                if (miss_together && affinity == Enforcement::Required)
                    || (hit_apart && anti_affinity == Enforcement::Required)
                {
                    continue;
                }
                let load = &self.loads[t];
                if !load.might_fit(mover.memory, self.drains) {
                    continue;
                }
                let score = (
                    miss_together,
                    hit_apart,
                    load.utilisation_step(mover.memory),
                    self.inbound_per_slot[t],
                    load.utilisation_key(mover.memory),
                    self.rank[t],
                );
                if best.as_ref().is_none_or(|(s, _)| score < *s) {
                    best = Some((score, t));
                }
            }
            let ((miss_together, hit_apart, ..), t) = best?;
            match self.loads[t].choose_node(mover.memory, self.drains) {
                None => rejected.push(t),
                Some(node) => {
                    let mut warnings = Vec::new();
                    let target_name = &self.fleet.clusters[t].name;
                    if miss_together {
                        warnings.push(format!(
                            "its affinity group {} runs on {}, which cannot take it; it goes to {target_name}",
                            mover.affinity.unwrap_or_default(),
                            self.names_of(&together)
                        ));
                    }
                    if hit_apart {
                        warnings.push(format!(
                            "{target_name} already runs a VM of its anti-affinity group {}: no cluster without one can take it",
                            mover.anti_affinity.unwrap_or_default()
                        ));
                    }
                    return Some(Choice {
                        target: t,
                        node,
                        warnings,
                    });
                }
            }
        }
    }

    fn names_of(&self, clusters: &[usize]) -> String {
        clusters
            .iter()
            .map(|&c| self.fleet.clusters[c].name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Places mover `m` as chosen: its memory, MACs, name and groups count on the target.
    pub(crate) fn commit(&mut self, m: usize, choice: Choice) {
        let mover = &self.movers[m];
        let (c, v) = (mover.cluster, mover.vm_index);
        let t = choice.target;
        let node_name = self.loads[t].nodes[choice.node].name.to_owned();
        self.loads[t].add(choice.node, mover.memory);
        self.inbound_per_slot[t] += (mover.memory + mover.disks) / self.slots[t];
        for mac in &mover.macs {
            self.macs
                .entry(*mac)
                .or_default()
                .push((t, Holder::Planned(c, v)));
        }
        let namespace = self.target_namespace(mover.vm);
        self.names
            .entry((namespace, mover.vm.name.as_str()))
            .or_default()
            .push((t, Holder::Planned(c, v)));
        for (rule, group) in [
            (GroupRule::Together, mover.affinity),
            (GroupRule::Apart, mover.anti_affinity),
        ] {
            if let Some(g) = group {
                *self
                    .groups
                    .entry((rule, g))
                    .or_default()
                    .entry(t)
                    .or_default() += 1;
                if self.mode != Mode::Evacuation {
                    // The VM leaves its cluster (an evacuation empties the source anyway).
                    if let Some(n) = self.groups.get_mut(&(rule, g)).and_then(|m| m.get_mut(&c)) {
                        *n = n.saturating_sub(1);
                    }
                }
            }
        }
        if self.mode == Mode::Rebalance {
            let node = mover.vm.node.as_deref();
            let memory = mover.memory;
            self.loads[c].remove(node, memory);
        }
        self.gave[c] = true;
        self.took[t] = true;
        self.placed.push(Placed {
            mover: m,
            target: t,
            node_name,
            warnings: choice.warnings,
        });
    }

    /// Every reason mover `m` fits none of the targets it may use.
    pub(crate) fn explain(&self, m: usize, only: Option<&[usize]>) -> Vec<Blocker> {
        let mover = &self.movers[m];
        let s = mover.cluster;
        let mut reasons = TargetReasons::default();
        let together = self.group_clusters(GroupRule::Together, mover.affinity, s);
        let apart = self.group_clusters(GroupRule::Apart, mover.anti_affinity, s);
        let mut considered = 0;
        for t in 0..self.fleet.clusters.len() {
            if t == s || only.is_some_and(|o| !o.contains(&t)) {
                continue;
            }
            considered += 1;
            let name = self.fleet.clusters[t].name.as_str();
            if !self.allowed(s, t) {
                reasons.add(BlockerKind::NotAllowedTarget, name, name.to_owned());
                continue;
            }
            self.cluster_problems(s, t, Some(&mut reasons));
            self.vm_static_problems(s, &mover.classes, &mover.networks, t, Some(&mut reasons));
            for mac in &mover.macs {
                for &(at, holder) in self.macs.get(mac).into_iter().flatten() {
                    if at == t {
                        reasons.add(
                            BlockerKind::MacInUse,
                            name,
                            format!(
                                "{name}: {} is used by {}",
                                mac_text(*mac),
                                self.holder(holder)
                            ),
                        );
                    }
                }
            }
            for &(at, holder) in self
                .names
                .get(&(self.target_namespace(mover.vm), mover.vm.name.as_str()))
                .into_iter()
                .flatten()
            {
                if at == t {
                    reasons.add(
                        BlockerKind::NameTaken,
                        name,
                        format!("{name}: {}", self.holder(holder)),
                    );
                }
            }
            if self.options.anti_affinity == Enforcement::Required && apart.contains(&t) {
                reasons.add(
                    BlockerKind::AntiAffinity,
                    name,
                    format!(
                        "{name} runs a VM of group {}",
                        mover.anti_affinity.unwrap_or_default()
                    ),
                );
            }
            if self.options.affinity == Enforcement::Required
                && !together.is_empty()
                && !together.contains(&t)
            {
                reasons.add(
                    BlockerKind::AffinityGroup,
                    name,
                    format!(
                        "{name} is not where its group {} runs ({})",
                        mover.affinity.unwrap_or_default(),
                        self.names_of(&together)
                    ),
                );
            }
            if self.mode == Mode::Rebalance && self.gave[t] {
                reasons.add(
                    BlockerKind::NotAllowedTarget,
                    name,
                    format!("{name} gives VMs away in this rebalance"),
                );
            }
            let load = &self.loads[t];
            if load.choose_node(mover.memory, self.drains).is_none() {
                let detail = if load.nodes.is_empty() {
                    format!("{name} reports no schedulable node")
                } else {
                    format!(
                        "{name} needs {} on one node; its roomiest node has {}, the cluster {} of which {} stays free for {} node drain(s)",
                        gib(mover.memory),
                        gib(load.max_free),
                        gib(load.free),
                        gib(load.spare(self.drains)),
                        self.drains
                    )
                };
                reasons.add(BlockerKind::NotEnoughMemory, name, detail);
            }
        }
        if considered == 0 {
            return vec![Blocker::about_vm(
                BlockerKind::NoTargets,
                "the fleet has no other cluster to move it to".into(),
            )];
        }
        reasons.into_blockers()
    }

    fn holder(&self, holder: Holder) -> String {
        match holder {
            Holder::Vm(c, v) => {
                let vm = &self.fleet.clusters[c].vms[v];
                format!("{}/{}", vm.namespace, vm.name)
            }
            Holder::Reservation(r) => {
                let r = &self.fleet.reservations[r];
                format!("{} (migration {} on its way there)", r.vm, r.migration_id)
            }
            Holder::Planned(c, v) => {
                let vm = &self.fleet.clusters[c].vms[v];
                format!(
                    "{}/{}/{} (placed there by this plan)",
                    self.fleet.clusters[c].name, vm.namespace, vm.name
                )
            }
        }
    }

    /// The namespace `vm` gets on its target.
    fn target_namespace(&self, vm: &'a VmInfo) -> &'a str {
        self.options
            .target_namespace
            .as_deref()
            .unwrap_or(vm.namespace.as_str())
    }

    pub(crate) fn refuse(&mut self, m: usize, reasons: Vec<Blocker>) {
        let mover = &self.movers[m];
        match &mover.key {
            Some(key) => self.cannot.push(CannotMove {
                vm: key.clone(),
                vm_uid: mover.vm.uid.clone(),
                reasons,
            }),
            None => self.notes.push(format!(
                "virtual machine {}/{} on {} has an invalid name and was left out",
                mover.vm.namespace, mover.vm.name, self.fleet.clusters[mover.cluster].name
            )),
        }
    }

    pub(crate) fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Places one mover or records why it cannot move.
    fn place_one(&mut self, m: usize) {
        if !self.movers[m].vm_blockers.is_empty() {
            let reasons = self.movers[m].vm_blockers.clone();
            self.refuse(m, reasons);
            return;
        }
        match self.choose(m, None) {
            Some(choice) => self.commit(m, choice),
            None => {
                let reasons = self.explain(m, None);
                self.refuse(m, reasons);
            }
        }
    }

    /// Places an affinity group on one cluster if one takes all of it; otherwise (Preferred)
    /// member by member, or (Required) not at all.
    fn place_group(&mut self, group: &str, members: &[usize]) {
        let mut candidates: Vec<usize> = self.movers[members[0]].candidates.to_vec();
        let mut taken = Vec::new();
        let mut apart = Vec::new();
        for &m in members {
            let own = &self.movers[m].candidates;
            candidates.retain(|t| own.contains(t));
            taken.extend(self.taken(&self.movers[m]));
            apart.extend(self.group_clusters(
                GroupRule::Apart,
                self.movers[m].anti_affinity,
                self.movers[m].cluster,
            ));
        }
        let source = self.movers[members[0]].cluster;
        let together = self.group_clusters(GroupRule::Together, Some(group), source);
        let total: u64 = members.iter().map(|&m| self.movers[m].memory).sum();
        let required_apart = self.options.anti_affinity == Enforcement::Required;
        // Members that share an anti-affinity group cannot all run on one cluster: required
        // anti-affinity then splits the group (or, with required affinity, keeps it home).
        let mut seen = HashSet::new();
        let clash = members
            .iter()
            .filter_map(|&m| self.movers[m].anti_affinity)
            .find(|g| !seen.insert(*g));
        if let (Some(apart_group), true) = (clash, required_apart) {
            self.place_group_apart(group, apart_group, members, total);
            return;
        }
        let required_together =
            self.options.affinity == Enforcement::Required && !together.is_empty();
        let mut order: Vec<(TargetRank, usize)> = candidates
            .iter()
            .copied()
            .filter(|t| {
                let refused = taken.contains(t)
                    || (required_apart && apart.contains(t))
                    || (required_together && !together.contains(t));
                !refused
            })
            .map(|t| {
                (
                    (
                        !together.is_empty() && !together.contains(&t),
                        apart.contains(&t),
                        self.loads[t].utilisation_step(total),
                        self.inbound_per_slot[t],
                        self.loads[t].utilisation_key(total),
                        self.rank[t],
                    ),
                    t,
                )
            })
            .collect();
        order.sort_unstable();
        for (_, t) in order {
            let mut trial = self.loads[t].clone();
            let mut nodes = Vec::new();
            for &m in members {
                match trial.choose_node(self.movers[m].memory, self.drains) {
                    Some(node) => {
                        trial.add(node, self.movers[m].memory);
                        nodes.push(node);
                    }
                    None => break,
                }
            }
            if nodes.len() < members.len() {
                continue;
            }
            for (&m, node) in members.iter().zip(nodes) {
                let mut warnings = Vec::new();
                if let Some(apart_group) = clash {
                    warnings.push(format!(
                        "members of its anti-affinity group {apart_group} run together on {}: its affinity group {group} keeps them together",
                        self.fleet.clusters[t].name
                    ));
                }
                if apart.contains(&t) {
                    warnings.push(format!(
                        "{} already runs a VM of an anti-affinity group of its affinity group {group}",
                        self.fleet.clusters[t].name
                    ));
                }
                if !together.is_empty() && !together.contains(&t) {
                    warnings.push(format!(
                        "its affinity group {group} also runs on {}, which cannot take all of it",
                        self.names_of(&together)
                    ));
                }
                self.commit(
                    m,
                    Choice {
                        target: t,
                        node,
                        warnings,
                    },
                );
            }
            return;
        }
        self.group_not_together(
            members,
            format!(
                "its affinity group {group} ({} VMs, {}) fits on no single target cluster",
                members.len(),
                gib(total)
            ),
            format!("its affinity group {group} fits on no single target cluster and is split"),
        );
    }

    /// An affinity group whose members share the anti-affinity group `apart_group`, under
    /// required anti-affinity: both rules cannot hold on one cluster.
    fn place_group_apart(&mut self, group: &str, apart_group: &str, members: &[usize], total: u64) {
        self.group_not_together(
            members,
            format!(
                "its affinity group {group} ({} VMs, {}) has several members of the anti-affinity group {apart_group}: both rules are required and cannot hold on one cluster",
                members.len(),
                gib(total)
            ),
            format!(
                "its affinity group {group} is split: members of its anti-affinity group {apart_group} must run apart"
            ),
        );
    }

    /// An affinity group that cannot move as a whole: with required affinity none of it moves
    /// (`refusal` says why, after each member's own reasons); with preferred affinity each member
    /// is placed on its own and carries the `split` warning.
    fn group_not_together(&mut self, members: &[usize], refusal: String, split: String) {
        match self.options.affinity {
            Enforcement::Required => {
                for &m in members {
                    let mut reasons = self.explain(m, None);
                    reasons.push(Blocker {
                        kind: BlockerKind::AffinityGroup,
                        message: refusal.clone(),
                        remedy: BlockerKind::AffinityGroup.remedy(),
                        clusters: Vec::new(),
                    });
                    self.refuse(m, reasons);
                }
            }
            Enforcement::Preferred => {
                for &m in members {
                    self.place_one(m);
                    if let Some(last) = self.placed.last_mut() {
                        if last.mover == m {
                            last.warnings.push(split.clone());
                        }
                    }
                }
            }
        }
    }

    /// Places every mover: affinity groups first (biggest first), then the rest biggest first.
    pub(crate) fn place_all(&mut self) {
        let mut groups: BTreeMap<&'a str, Vec<usize>> = BTreeMap::new();
        let mut singles = Vec::new();
        for (m, mover) in self.movers.iter().enumerate() {
            match mover.affinity {
                Some(g) if mover.vm_blockers.is_empty() => groups.entry(g).or_default().push(m),
                _ => singles.push(m),
            }
        }
        let mut groups: Vec<(&str, Vec<usize>)> = groups.into_iter().collect();
        let memory = |ms: &[usize]| -> u64 { ms.iter().map(|&m| self.movers[m].memory).sum() };
        groups.sort_by(|a, b| memory(&b.1).cmp(&memory(&a.1)).then(a.0.cmp(b.0)));
        let key = |m: usize| {
            let v = self.movers[m].vm;
            (
                std::cmp::Reverse(v.memory_bytes),
                v.namespace.clone(),
                v.name.clone(),
            )
        };
        singles.sort_by_cached_key(|&m| key(m));
        for (_, members) in &mut groups {
            members.sort_by_cached_key(|&m| key(m));
        }
        for (group, members) in groups {
            self.place_group(group, &members);
        }
        for m in singles {
            self.place_one(m);
        }
    }

    /// The moves (not yet ordered or estimated), who cannot move, and notes.
    pub(crate) fn into_results(self) -> (Vec<PlannedMove>, Vec<CannotMove>, Vec<String>) {
        let fleet = self.fleet;
        let options = self.options;
        let mut notes = self.notes;
        let mut moves = Vec::with_capacity(self.placed.len());
        for placed in self.placed {
            let mover = &self.movers[placed.mover];
            let source = &fleet.clusters[mover.cluster];
            let Some(key) = mover.key.clone() else {
                notes.push(format!(
                    "virtual machine {}/{} on {} has an invalid name and was left out",
                    mover.vm.namespace, mover.vm.name, source.name
                ));
                continue;
            };
            let (migration_options, policy) = options_for(
                mover.vm,
                &namespace_labels_of(source, &mover.vm.namespace),
                &fleet.policies,
                &source.info.migration_config,
            );
            moves.push(PlannedMove {
                id: move_id(options.plan_id, &mover.vm.uid),
                position: 0,
                vm: key,
                vm_uid: mover.vm.uid.clone(),
                source_node: mover.vm.node.clone().unwrap_or_default(),
                target_cluster: fleet.clusters[placed.target].name.clone(),
                target_node: placed.node_name,
                target_namespace: options
                    .target_namespace
                    .clone()
                    .unwrap_or_else(|| mover.vm.namespace.clone()),
                memory_bytes: mover.memory,
                disk_bytes: mover.disks,
                bytes: mover.memory.saturating_add(mover.disks),
                assumed_bytes_per_sec: 0,
                estimated_seconds: 0.0,
                policy,
                options: migration_options,
                storage_class_map: mover
                    .classes
                    .iter()
                    .map(|&(a, b)| (a.to_owned(), b.to_owned()))
                    .collect(),
                network_map: mover
                    .networks
                    .iter()
                    .map(|&(a, b)| (a.to_owned(), b.to_owned()))
                    .collect(),
                warnings: placed.warnings,
            });
        }
        (moves, self.cannot, notes)
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// The admission limits for the fleet: the options' limits, and each cluster's own migration
/// configuration for clusters the options do not name.
pub(crate) fn effective_limits(fleet: &Fleet, options: &PlanOptions) -> AdmissionLimits {
    let mut limits = options.limits.clone();
    for c in &fleet.clusters {
        limits
            .clusters
            .entry(c.name.to_string())
            .or_insert_with(|| ClusterSlots::from(&c.info.migration_config));
    }
    limits
}

/// Orders the moves (longest estimated migration first), estimates them, and states the limits.
pub(crate) fn finish_plan(
    fleet: &Fleet,
    options: &PlanOptions,
    kind: PlanKind,
    mut moves: Vec<PlannedMove>,
    mut cannot_move: Vec<CannotMove>,
    notes: Vec<String>,
) -> Plan {
    let limits = effective_limits(fleet, options);
    let budgets = pair_budgets(
        &limits.pair_bandwidth,
        moves
            .iter()
            .map(|m| (m.vm.cluster.as_str(), m.target_cluster.as_str())),
    );
    for m in &mut moves {
        let budget = budgets
            .get(&(m.vm.cluster.to_string(), m.target_cluster.to_string()))
            .copied()
            .unwrap_or(0);
        m.assumed_bytes_per_sec = options
            .durations
            .rate(m.options.bandwidth_bytes_per_sec, budget);
        m.estimated_seconds = options.durations.seconds(m.bytes, m.assumed_bytes_per_sec);
    }
    moves.sort_by(|a, b| {
        b.estimated_seconds
            .total_cmp(&a.estimated_seconds)
            .then_with(|| a.vm.cmp(&b.vm))
    });
    for (position, m) in moves.iter_mut().enumerate() {
        m.position = position as u64;
    }
    cannot_move.sort_by(|a, b| a.vm.cmp(&b.vm));
    let mut touched: Vec<&str> = moves
        .iter()
        .flat_map(|m| [m.vm.cluster.as_str(), m.target_cluster.as_str()])
        .collect();
    touched.sort_unstable();
    touched.dedup();
    let clusters = touched
        .iter()
        .filter_map(|name| fleet.clusters.iter().find(|c| c.name.as_str() == *name))
        .map(|c| {
            let slots = limits.slots(c.name.as_str());
            ClusterLimits {
                cluster: c.name.clone(),
                parallel_migrations_per_cluster: slots.parallel_migrations_per_cluster,
                parallel_outbound_migrations_per_node: slots.parallel_outbound_migrations_per_node,
                bandwidth_per_migration: c.info.migration_config.bandwidth_per_migration,
            }
        })
        .collect();
    let pairs = budgets
        .into_iter()
        .map(|((source, target), bytes_per_sec)| PairBudget {
            source,
            target,
            bytes_per_sec,
        })
        .collect();
    let requests: Vec<_> = moves.iter().map(PlannedMove::request).collect();
    let estimate = estimate::estimate(&requests, &limits, &options.durations);
    Plan {
        id: options.plan_id,
        kind,
        planned_at: options.now,
        moves,
        cannot_move,
        limits: LimitsInForce {
            max_in_flight: limits.max_in_flight,
            max_attempts: limits.max_attempts,
            nodes_draining_in_parallel: options.nodes_draining_in_parallel,
            affinity: options.affinity,
            anti_affinity: options.anti_affinity,
            clusters,
            pairs,
        },
        estimate,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_in_both_spellings_and_refuse_garbage() {
        assert_eq!(mac_key("02:00:00:ab:cd:ef"), Some(0x0200_00ab_cdef));
        assert_eq!(mac_key("02-00-00-AB-CD-EF"), Some(0x0200_00ab_cdef));
        assert_eq!(mac_key("02:00:00:ab:cd"), None);
        assert_eq!(mac_key("zz:00:00:ab:cd:ef"), None);
        assert_eq!(mac_key("02:00:00:ab:cd:ef:"), None);
        assert_eq!(mac_text(0x0200_00ab_cdef), "02:00:00:ab:cd:ef");
    }

    #[test]
    fn versions_compare_by_major_and_minor() {
        assert_eq!(major_minor("4.20.3"), "4.20");
        assert_eq!(major_minor("1.6"), "1.6");
        assert_eq!(major_minor("8"), "8");
        assert_eq!(major_minor("6.1.0-18-amd64"), "6.1");
    }

    fn load(nodes: &[(u64, u64)]) -> ClusterLoad<'static> {
        let mut l = ClusterLoad {
            nodes: nodes
                .iter()
                .map(|&(a, r)| NodeLoad {
                    name: "n",
                    allocatable: a,
                    load: r,
                })
                .collect(),
            ..ClusterLoad::default()
        };
        l.refresh();
        l
    }

    #[test]
    fn a_node_is_chosen_only_if_the_cluster_keeps_room_for_a_node_drain() {
        // Two nodes of 100: loads 60 and 20. Free 40 + 80 = 120.
        let l = load(&[(100, 60), (100, 20)]);
        // 30 on node 2 (most room): free after 90 >= spare max(60, 50) = 60.
        assert_eq!(l.choose_node(30, 1), Some(1));
        // 50: node 2 gets 70, spare 70, free after 70: fits exactly.
        assert_eq!(l.choose_node(50, 1), Some(1));
        // 51: free after 69 < spare 71 on node 2; node 1 has only 40 free.
        assert_eq!(l.choose_node(51, 1), None);
        assert!(!l.might_fit(51, 1) || l.choose_node(51, 1).is_none());
        // With no spare kept, 80 fits on node 2.
        assert_eq!(l.choose_node(80, 0), Some(1));
        // Two drains: spare 120 already exceeds the 120 free minus anything.
        assert_eq!(l.choose_node(1, 2), None);
    }
}
