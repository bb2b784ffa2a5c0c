//! Placement, as plain functions over plain data: for every VM of an evacuation or a rebalance,
//! a target cluster and node, or every reason it cannot move. Hard constraints: target Ready and
//! not cordoned, same runtime and virtualization minor version, the VM's CPU model offered, the
//! live-migration feature gate on, a sync endpoint, its storage classes and networks present,
//! none of its MACs in use there (also by VMs already placed there), the VM migratable and
//! running, and memory on a node after what migrations already queued or running hold, keeping
//! the target's spare capacity for one node drain (the seeds' rule). Soft: spread memory
//! utilisation, keep `drover.io/affinity-group` together and `drover.io/anti-affinity-group`
//! apart; `drover.io/pinned=true` never moves.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// VMs with the same value are placed on the same target cluster.
pub const AFFINITY_LABEL: &str = "drover.io/affinity-group";
/// VMs with the same value are never placed on the same target cluster.
pub const ANTI_AFFINITY_LABEL: &str = "drover.io/anti-affinity-group";
/// `true`: the VM stays where it is (rebalances skip it; evacuations say it cannot move).
pub const PINNED_LABEL: &str = "drover.io/pinned";
/// The feature gate both clusters need for a cross-cluster live migration.
pub const LIVE_MIGRATION_GATE: &str = "decentralizedLiveMigration";

#[derive(Debug, Clone)]
pub struct NodeView {
    pub name: String,
    pub cpu_model: String,
    pub allocatable_memory_bytes: u64,
    pub requested_memory_bytes: u64,
    pub schedulable: bool,
}

#[derive(Debug, Clone)]
pub struct VmView {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: Option<String>,
    pub running: bool,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub storage_classes: Vec<String>,
    pub networks: Vec<String>,
    pub macs: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub migratable: bool,
    pub non_migratable_reasons: Vec<String>,
    /// When it last finished moving (rebalances leave recently moved VMs alone).
    pub last_moved_at: Option<DateTime<Utc>>,
    /// It is queued or migrating already.
    pub migrating: bool,
}

#[derive(Debug, Clone)]
pub struct ClusterView {
    pub name: String,
    pub ready: bool,
    pub health: String,
    pub cordoned: bool,
    pub runtime: String,
    pub virtualization_version: String,
    pub cpu_models: Vec<String>,
    pub feature_gates: Vec<String>,
    pub storage_classes: Vec<String>,
    pub networks: Vec<String>,
    pub sync_endpoint: bool,
    pub nodes: Vec<NodeView>,
    pub vms: Vec<VmView>,
    /// Memory held on this cluster by migrations queued or running towards it.
    pub reserved_memory_bytes: u64,
    /// Bytes per second one migration from this cluster may use (0: unlimited).
    pub bandwidth_per_migration: u64,
    pub parallel_migrations: usize,
}

/// What the estimate assumes for a link whose bandwidth nobody limits.
pub const ASSUMED_LINK_BYTES_PER_SEC: u64 = 1 << 30;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlannedMove {
    pub namespace: String,
    pub name: String,
    pub vm_uid: String,
    pub source_cluster: String,
    pub source_node: String,
    pub target_cluster: String,
    pub target_node: String,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CannotMove {
    pub namespace: String,
    pub name: String,
    pub cluster: String,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub moves: Vec<PlannedMove>,
    pub cannot_move: Vec<CannotMove>,
    /// Seconds, if the moves run under the limits at the bandwidth they are given.
    pub estimated_seconds: f64,
}

fn major_minor(version: &str) -> String {
    version.split('.').take(2).collect::<Vec<_>>().join(".")
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Free memory per node and MACs in use, as placements accumulate.
struct TargetState {
    free: Vec<u64>,
    macs: HashSet<String>,
    names: HashSet<(String, String)>,
    /// Memory kept free for one node to drain (the seeds' spare-capacity rule).
    spare: u64,
    allocatable: u64,
    requested: u64,
    anti_affinity: HashSet<String>,
}

impl TargetState {
    fn of(c: &ClusterView) -> Self {
        let schedulable: Vec<&NodeView> = c.nodes.iter().filter(|n| n.schedulable).collect();
        let mut free: Vec<u64> = schedulable
            .iter()
            .map(|n| {
                n.allocatable_memory_bytes
                    .saturating_sub(n.requested_memory_bytes)
            })
            .collect();
        // Reservations come off the nodes with the most room first.
        let mut reserved = c.reserved_memory_bytes;
        while reserved > 0 {
            let Some((i, _)) = free.iter().enumerate().max_by_key(|(_, f)| **f) else {
                break;
            };
            let take = reserved.min(free[i]);
            if take == 0 {
                break;
            }
            free[i] -= take;
            reserved -= take;
        }
        Self {
            free,
            macs: c.vms.iter().flat_map(|v| v.macs.iter().cloned()).collect(),
            names: c
                .vms
                .iter()
                .map(|v| (v.namespace.clone(), v.name.clone()))
                .collect(),
            spare: schedulable
                .iter()
                .map(|n| n.requested_memory_bytes)
                .max()
                .unwrap_or(0),
            allocatable: schedulable.iter().map(|n| n.allocatable_memory_bytes).sum(),
            requested: schedulable
                .iter()
                .map(|n| n.requested_memory_bytes)
                .sum::<u64>()
                + c.reserved_memory_bytes,
            anti_affinity: c
                .vms
                .iter()
                .filter_map(|v| v.labels.get(ANTI_AFFINITY_LABEL).cloned())
                .collect(),
        }
    }

    fn utilisation_after(&self, memory: u64) -> f64 {
        if self.allocatable == 0 {
            return f64::INFINITY;
        }
        (self.requested + memory) as f64 / self.allocatable as f64
    }

    /// The node (index) that fits `memory` best, keeping the spare capacity.
    fn node_for(&self, memory: u64) -> Option<usize> {
        let total_free: u64 = self.free.iter().sum();
        if total_free < memory + self.spare {
            return None;
        }
        self.free
            .iter()
            .enumerate()
            .filter(|(_, f)| **f >= memory)
            .max_by_key(|(_, f)| **f)
            .map(|(i, _)| i)
    }
}

/// Why `vm` from `source` cannot go to `target` (empty: it can, as far as the cluster goes).
fn cluster_problems(source: &ClusterView, vm: &VmView, target: &ClusterView) -> Vec<String> {
    let mut p = Vec::new();
    if !target.ready {
        p.push(format!("{} is {}, not Ready", target.name, target.health));
    }
    if target.cordoned {
        p.push(format!("{} is cordoned for maintenance", target.name));
    }
    if target.runtime != source.runtime {
        p.push(format!(
            "{} runs {} (the VM runs on {})",
            target.name, target.runtime, source.runtime
        ));
    }
    if major_minor(&target.virtualization_version) != major_minor(&source.virtualization_version) {
        p.push(format!(
            "{} runs virtualization {} (the source runs {}; minor versions must match)",
            target.name, target.virtualization_version, source.virtualization_version
        ));
    }
    let cpu = vm
        .node
        .as_ref()
        .and_then(|n| source.nodes.iter().find(|x| &x.name == n))
        .map(|n| n.cpu_model.clone())
        .or_else(|| source.cpu_models.first().cloned());
    if let Some(cpu) = cpu {
        if !target.cpu_models.contains(&cpu) && !target.nodes.iter().any(|n| n.cpu_model == cpu) {
            p.push(format!("{} offers no {cpu} CPU model", target.name));
        }
    }
    if !target
        .feature_gates
        .iter()
        .any(|g| g.eq_ignore_ascii_case(LIVE_MIGRATION_GATE))
    {
        p.push(format!(
            "{} does not enable {LIVE_MIGRATION_GATE}",
            target.name
        ));
    }
    if !target.sync_endpoint {
        p.push(format!("{} reports no sync endpoint", target.name));
    }
    for class in &vm.storage_classes {
        if !class.is_empty() && !target.storage_classes.contains(class) {
            p.push(format!("{} has no storage class {class}", target.name));
        }
    }
    for network in &vm.networks {
        if !target.networks.is_empty() && !target.networks.contains(network) {
            p.push(format!("{} has no network {network}", target.name));
        }
    }
    p
}

/// Why `vm` cannot move at all, wherever it would go.
fn vm_problems(vm: &VmView) -> Vec<String> {
    let mut p = Vec::new();
    if !vm.migratable {
        p.push(format!(
            "not migratable: {}",
            vm.non_migratable_reasons.join(", ")
        ));
    }
    if !vm.running {
        p.push("not running (only running VMs live-migrate)".into());
    }
    if vm.labels.get(PINNED_LABEL).is_some_and(|v| v == "true") {
        p.push(format!("pinned ({PINNED_LABEL}=true)"));
    }
    if vm.migrating {
        p.push("already migrating".into());
    }
    p
}

struct Placer<'a> {
    clusters: &'a [ClusterView],
    states: Vec<TargetState>,
    /// Affinity group -> the target chosen for its first member.
    groups: HashMap<String, usize>,
}

impl<'a> Placer<'a> {
    fn new(clusters: &'a [ClusterView]) -> Self {
        Self {
            states: clusters.iter().map(TargetState::of).collect(),
            clusters,
            groups: HashMap::new(),
        }
    }

    /// Places `vm` on one of `targets` (indexes), or says why none works.
    fn place(
        &mut self,
        source: &ClusterView,
        vm: &VmView,
        targets: &[usize],
    ) -> Result<PlannedMove, Vec<String>> {
        let problems = vm_problems(vm);
        if !problems.is_empty() {
            return Err(problems);
        }
        let group = vm.labels.get(AFFINITY_LABEL);
        let apart = vm.labels.get(ANTI_AFFINITY_LABEL);
        let mut reasons = Vec::new();
        let mut best: Option<(usize, usize, f64)> = None;
        for &t in targets {
            let target = &self.clusters[t];
            let state = &self.states[t];
            let mut p = cluster_problems(source, vm, target);
            if let Some(g) = group {
                if let Some(&chosen) = self.groups.get(g) {
                    if chosen != t {
                        p.push(format!(
                            "its affinity group {g} goes to {}",
                            self.clusters[chosen].name
                        ));
                    }
                }
            }
            if let Some(g) = apart {
                if state.anti_affinity.contains(g) {
                    p.push(format!(
                        "{} already runs a VM of anti-affinity group {g}",
                        target.name
                    ));
                }
            }
            for mac in &vm.macs {
                if state.macs.contains(mac) {
                    p.push(format!("MAC {mac} is in use on {}", target.name));
                }
            }
            if state
                .names
                .contains(&(vm.namespace.clone(), vm.name.clone()))
            {
                p.push(format!(
                    "{} already has a VM {}/{}",
                    target.name, vm.namespace, vm.name
                ));
            }
            let node = state.node_for(vm.memory_bytes);
            if node.is_none() && p.is_empty() {
                p.push(format!(
                    "{} has no node with {} free (after {} held by queued migrations and {} kept for a node drain)",
                    target.name,
                    gib(vm.memory_bytes),
                    gib(target.reserved_memory_bytes),
                    gib(state.spare)
                ));
            }
            match (p.is_empty(), node) {
                (true, Some(n)) => {
                    let score = state.utilisation_after(vm.memory_bytes);
                    if best.is_none_or(|(_, _, s)| score < s) {
                        best = Some((t, n, score));
                    }
                }
                _ => reasons.extend(p),
            }
        }
        let Some((t, n, _)) = best else {
            if reasons.is_empty() {
                reasons.push("no other cluster to move it to".into());
            }
            reasons.sort();
            reasons.dedup();
            return Err(reasons);
        };
        let state = &mut self.states[t];
        state.free[n] -= vm.memory_bytes;
        state.requested += vm.memory_bytes;
        state.macs.extend(vm.macs.iter().cloned());
        state.names.insert((vm.namespace.clone(), vm.name.clone()));
        if let Some(g) = apart {
            state.anti_affinity.insert(g.clone());
        }
        if let Some(g) = group {
            self.groups.entry(g.clone()).or_insert(t);
        }
        let target = &self.clusters[t];
        let target_node = target
            .nodes
            .iter()
            .filter(|x| x.schedulable)
            .nth(n)
            .map(|x| x.name.clone())
            .unwrap_or_default();
        Ok(PlannedMove {
            namespace: vm.namespace.clone(),
            name: vm.name.clone(),
            vm_uid: vm.uid.clone(),
            source_cluster: source.name.clone(),
            source_node: vm.node.clone().unwrap_or_default(),
            target_cluster: target.name.clone(),
            target_node,
            memory_bytes: vm.memory_bytes,
            disk_bytes: vm.disk_bytes,
        })
    }
}

/// How long the moves take when each cluster runs `parallel_migrations` at a time at its
/// per-migration bandwidth (or the assumed link speed when unlimited), capped fleet-wide at
/// `max_in_flight`: the busiest cluster's bytes over its throughput, or the whole over the cap.
pub fn estimate_seconds(
    plan: &[PlannedMove],
    clusters: &[ClusterView],
    max_in_flight: usize,
) -> f64 {
    let by_name: HashMap<&str, &ClusterView> =
        clusters.iter().map(|c| (c.name.as_str(), c)).collect();
    let rate = |c: &ClusterView| {
        let per = match c.bandwidth_per_migration {
            0 => ASSUMED_LINK_BYTES_PER_SEC,
            b => b,
        };
        per as f64 * c.parallel_migrations.max(1) as f64
    };
    let mut per_cluster: HashMap<&str, f64> = HashMap::new();
    let mut total = 0.0;
    let mut slowest_rate = f64::INFINITY;
    for m in plan {
        let bytes = (m.memory_bytes + m.disk_bytes) as f64;
        total += bytes;
        for name in [&m.source_cluster, &m.target_cluster] {
            if let Some(c) = by_name.get(name.as_str()) {
                *per_cluster.entry(name.as_str()).or_default() += bytes / rate(c);
            }
        }
        if let Some(c) = by_name.get(m.source_cluster.as_str()) {
            let per = match c.bandwidth_per_migration {
                0 => ASSUMED_LINK_BYTES_PER_SEC,
                b => b,
            };
            slowest_rate = slowest_rate.min(per as f64);
        }
    }
    let busiest = per_cluster.values().copied().fold(0.0, f64::max);
    let fleet = if slowest_rate.is_finite() {
        total / (slowest_rate * max_in_flight.max(1) as f64)
    } else {
        0.0
    };
    busiest.max(fleet)
}

/// Every VM of `source` gets a target among the other clusters, or the reasons it cannot move.
/// Big VMs are placed first (they are the hardest to fit); affinity groups stay together.
pub fn plan_evacuation(clusters: &[ClusterView], source: &str, max_in_flight: usize) -> Plan {
    let Some(s) = clusters.iter().position(|c| c.name == source) else {
        return Plan::default();
    };
    let targets: Vec<usize> = (0..clusters.len()).filter(|&i| i != s).collect();
    let mut placer = Placer::new(clusters);
    let source = &clusters[s];
    let mut order: Vec<&VmView> = source.vms.iter().collect();
    order.sort_by(|a, b| {
        b.memory_bytes
            .cmp(&a.memory_bytes)
            .then_with(|| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)))
    });
    let mut plan = Plan::default();
    for vm in order {
        match placer.place(source, vm, &targets) {
            Ok(m) => plan.moves.push(m),
            Err(reasons) => plan.cannot_move.push(CannotMove {
                namespace: vm.namespace.clone(),
                name: vm.name.clone(),
                cluster: source.name.clone(),
                reasons,
            }),
        }
    }
    plan.estimated_seconds = estimate_seconds(&plan.moves, clusters, max_in_flight);
    plan
}

/// What a rebalance aims for.
#[derive(Debug, Clone, Copy)]
pub struct RebalanceGoal {
    /// Clusters within mean ± band/2 of memory utilisation are balanced (e.g. 0.10).
    pub band: f64,
    /// A move must lower the spread (max - min utilisation) by at least this much.
    pub min_improvement: f64,
    pub max_moves: usize,
    /// VMs moved after this instant stay where they are.
    pub not_moved_since: DateTime<Utc>,
}

fn utilisation(c: &ClusterView, states: &[TargetState], i: usize) -> f64 {
    let _ = c;
    states[i].utilisation_after(0)
}

/// Moves that bring the clusters' memory utilisation within the band, most effective first,
/// at most `max_moves`, each improving the spread by at least `min_improvement`; pinned VMs and
/// VMs moved recently stay; cordoned or unready clusters neither give nor take.
pub fn plan_rebalance(clusters: &[ClusterView], goal: RebalanceGoal, max_in_flight: usize) -> Plan {
    let mut placer = Placer::new(clusters);
    let eligible: Vec<usize> = (0..clusters.len())
        .filter(|&i| clusters[i].ready && !clusters[i].cordoned && placer.states[i].allocatable > 0)
        .collect();
    let mut plan = Plan::default();
    let mut moved: HashSet<String> = HashSet::new();
    while plan.moves.len() < goal.max_moves && eligible.len() > 1 {
        let util: Vec<(usize, f64)> = eligible
            .iter()
            .map(|&i| (i, utilisation(&clusters[i], &placer.states, i)))
            .collect();
        let mean = util.iter().map(|u| u.1).sum::<f64>() / util.len() as f64;
        let (hot, hot_u) =
            util.iter()
                .copied()
                .fold((usize::MAX, f64::MIN), |a, b| if b.1 > a.1 { b } else { a });
        let (_, cold_u) =
            util.iter()
                .copied()
                .fold((usize::MAX, f64::MAX), |a, b| if b.1 < a.1 { b } else { a });
        if hot_u - mean <= goal.band / 2.0 && mean - cold_u <= goal.band / 2.0 {
            break;
        }
        let spread = hot_u - cold_u;
        let source = &clusters[hot];
        // The VM whose move lowers the spread most.
        let mut best: Option<(f64, &VmView)> = None;
        for vm in &source.vms {
            if moved.contains(&vm.uid)
                || !vm_problems(vm).is_empty()
                || vm.last_moved_at.is_some_and(|t| t > goal.not_moved_since)
                || vm.labels.contains_key(AFFINITY_LABEL)
            {
                continue;
            }
            let freed = vm.memory_bytes as f64 / placer.states[hot].allocatable as f64;
            for &t in &eligible {
                if t == hot {
                    continue;
                }
                let added = placer.states[t].utilisation_after(vm.memory_bytes);
                let after: Vec<f64> = util
                    .iter()
                    .map(|&(i, u)| match i {
                        i if i == hot => u - freed,
                        i if i == t => added,
                        _ => u,
                    })
                    .collect();
                let new_spread = after.iter().copied().fold(f64::MIN, f64::max)
                    - after.iter().copied().fold(f64::MAX, f64::min);
                let gain = spread - new_spread;
                if gain >= goal.min_improvement && best.is_none_or(|(g, _)| gain > g) {
                    best = Some((gain, vm));
                }
            }
        }
        let Some((_, vm)) = best else { break };
        let targets: Vec<usize> = eligible.iter().copied().filter(|&t| t != hot).collect();
        match placer.place(source, vm, &targets) {
            Ok(m) => {
                let freed = vm.memory_bytes;
                let state = &mut placer.states[hot];
                state.requested = state.requested.saturating_sub(freed);
                moved.insert(vm.uid.clone());
                plan.moves.push(m);
            }
            Err(_) => {
                moved.insert(vm.uid.clone());
            }
        }
    }
    plan.estimated_seconds = estimate_seconds(&plan.moves, clusters, max_in_flight);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, alloc_gib: u64, used_gib: u64) -> NodeView {
        NodeView {
            name: name.into(),
            cpu_model: "Skylake".into(),
            allocatable_memory_bytes: alloc_gib << 30,
            requested_memory_bytes: used_gib << 30,
            schedulable: true,
        }
    }

    fn vm(name: &str, gib: u64, mac: &str) -> VmView {
        VmView {
            uid: format!("uid-{name}"),
            namespace: "web".into(),
            name: name.into(),
            node: Some("n1".into()),
            running: true,
            memory_bytes: gib << 30,
            disk_bytes: 1 << 30,
            storage_classes: vec![],
            networks: vec!["default".into()],
            macs: vec![mac.into()],
            labels: BTreeMap::new(),
            migratable: true,
            non_migratable_reasons: vec![],
            last_moved_at: None,
            migrating: false,
        }
    }

    fn cluster(name: &str, nodes: Vec<NodeView>, vms: Vec<VmView>) -> ClusterView {
        ClusterView {
            name: name.into(),
            ready: true,
            health: "Ready".into(),
            cordoned: false,
            runtime: "qemu".into(),
            virtualization_version: "7.2.1".into(),
            cpu_models: vec!["Skylake".into()],
            feature_gates: vec![LIVE_MIGRATION_GATE.into()],
            storage_classes: vec![],
            networks: vec!["default".into()],
            sync_endpoint: true,
            nodes,
            vms,
            reserved_memory_bytes: 0,
            bandwidth_per_migration: 0,
            parallel_migrations: 5,
        }
    }

    #[test]
    fn an_evacuation_spreads_and_names_who_cannot_move() {
        let mut pinned = vm("pinned", 1, "02:00:00:00:00:09");
        pinned.labels.insert(PINNED_LABEL.into(), "true".into());
        let mut clash = vm("clash", 1, "02:00:00:00:00:aa");
        clash.macs = vec!["02:00:00:00:00:bb".into()];
        let source = cluster(
            "a",
            vec![node("n1", 64, 10)],
            vec![
                vm("v1", 4, "02:00:00:00:00:01"),
                vm("v2", 4, "02:00:00:00:00:02"),
                pinned,
                clash,
            ],
        );
        let b = cluster(
            "b",
            vec![node("n1", 32, 0)],
            vec![vm("x", 1, "02:00:00:00:00:bb")],
        );
        let mut c = cluster("c", vec![node("n1", 32, 0)], vec![]);
        c.vms.push(vm("y", 1, "02:00:00:00:00:bb"));
        let mut d = cluster("d", vec![node("n1", 64, 0)], vec![]);
        d.cordoned = true;
        let plan = plan_evacuation(&[source, b, c, d], "a", 10);
        let targets: Vec<&str> = plan
            .moves
            .iter()
            .map(|m| m.target_cluster.as_str())
            .collect();
        assert_eq!(plan.moves.len(), 2, "{plan:?}");
        assert!(
            targets.contains(&"b") && targets.contains(&"c"),
            "spread: {targets:?}"
        );
        assert!(
            !targets.contains(&"d"),
            "the cordoned cluster receives nothing"
        );
        let why = |n: &str| {
            plan.cannot_move
                .iter()
                .find(|c| c.name == n)
                .map(|c| c.reasons.join("; "))
                .unwrap_or_default()
        };
        assert!(why("pinned").contains("pinned"), "{}", why("pinned"));
        assert!(
            why("clash").contains("MAC 02:00:00:00:00:bb is in use on b"),
            "{}",
            why("clash")
        );
        assert!(why("clash").contains("d is cordoned"), "{}", why("clash"));
        assert!(plan.estimated_seconds > 0.0);
    }

    #[test]
    fn capacity_counts_reservations_and_the_spare_for_a_node_drain() {
        let source = cluster(
            "a",
            vec![node("n1", 64, 0)],
            vec![
                vm("big", 8, "02:00:00:00:00:01"),
                vm("small", 2, "02:00:00:00:00:02"),
            ],
        );
        // 16 GiB per node, 4 GiB used on the fullest node (kept spare), 6 GiB held.
        let mut b = cluster("b", vec![node("n1", 16, 4), node("n2", 16, 0)], vec![]);
        b.reserved_memory_bytes = 6 << 30;
        let plan = plan_evacuation(&[source, b], "a", 10);
        // Free: 12 + 16 - 6 = 22 GiB, minus 4 spare = 18: both fit (10 GiB).
        assert_eq!(plan.moves.len(), 2, "{plan:?}");
        let source = cluster(
            "a",
            vec![node("n1", 64, 0)],
            vec![vm("huge", 20, "02:00:00:00:00:03")],
        );
        let mut b = cluster("b", vec![node("n1", 16, 4), node("n2", 16, 0)], vec![]);
        b.reserved_memory_bytes = 6 << 30;
        let plan = plan_evacuation(&[source, b], "a", 10);
        assert_eq!(plan.cannot_move.len(), 1);
        assert!(
            plan.cannot_move[0].reasons[0].contains("no node with 20.0 GiB free"),
            "{plan:?}"
        );
    }

    #[test]
    fn affinity_keeps_groups_together_and_anti_affinity_apart() {
        let mut vms = Vec::new();
        for i in 0..4 {
            let mut v = vm(&format!("g{i}"), 1, &format!("02:00:00:00:01:0{i}"));
            v.labels.insert(AFFINITY_LABEL.into(), "db".into());
            vms.push(v);
        }
        for i in 0..2 {
            let mut v = vm(&format!("h{i}"), 1, &format!("02:00:00:00:02:0{i}"));
            v.labels.insert(ANTI_AFFINITY_LABEL.into(), "ha".into());
            vms.push(v);
        }
        let source = cluster("a", vec![node("n1", 64, 0)], vms);
        let b = cluster("b", vec![node("n1", 32, 0)], vec![]);
        let c = cluster("c", vec![node("n1", 32, 0)], vec![]);
        let plan = plan_evacuation(&[source, b, c], "a", 10);
        assert!(plan.cannot_move.is_empty(), "{plan:?}");
        let target = |n: &str| {
            plan.moves
                .iter()
                .find(|m| m.name == n)
                .unwrap()
                .target_cluster
                .clone()
        };
        let g: HashSet<String> = (0..4).map(|i| target(&format!("g{i}"))).collect();
        assert_eq!(g.len(), 1, "the affinity group stays together");
        assert_ne!(
            target("h0"),
            target("h1"),
            "the anti-affinity group is kept apart"
        );
    }

    #[test]
    fn a_rebalance_moves_towards_the_band_and_respects_its_limits() {
        let hot_vms: Vec<VmView> = (0..8)
            .map(|i| vm(&format!("v{i}"), 2, &format!("02:00:00:00:03:0{i}")))
            .collect();
        let hot = cluster("hot", vec![node("n1", 20, 16)], hot_vms);
        let cold = cluster("cold", vec![node("n1", 20, 0)], vec![]);
        let goal = RebalanceGoal {
            band: 0.1,
            min_improvement: 0.01,
            max_moves: 10,
            not_moved_since: Utc::now() - chrono::Duration::hours(1),
        };
        let plan = plan_rebalance(&[hot.clone(), cold.clone()], goal, 10);
        // 16 of 20 vs 0 of 20: four 2 GiB moves make it 8 vs 8.
        assert_eq!(plan.moves.len(), 4, "{plan:?}");
        let capped = plan_rebalance(
            &[hot.clone(), cold.clone()],
            RebalanceGoal {
                max_moves: 2,
                ..goal
            },
            10,
        );
        assert_eq!(capped.moves.len(), 2);
        let mut recent = hot.clone();
        for v in &mut recent.vms {
            v.last_moved_at = Some(Utc::now());
        }
        assert!(
            plan_rebalance(&[recent, cold.clone()], goal, 10)
                .moves
                .is_empty(),
            "recently moved VMs stay"
        );
        let mut pinned = hot;
        for v in &mut pinned.vms {
            v.labels.insert(PINNED_LABEL.into(), "true".into());
        }
        assert!(
            plan_rebalance(&[pinned, cold], goal, 10).moves.is_empty(),
            "pinned VMs stay"
        );
    }
}
