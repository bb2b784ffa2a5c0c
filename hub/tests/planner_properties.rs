//! Property-style tests of the planner, scheduler admission and the virtual-time simulator over
//! random small fleets and queues (proptest): every planned target satisfies every hard
//! constraint (checked here by an independent, naive implementation of the rules), capacity is
//! never overcommitted, no VM is planned or scheduled twice, no limit is exceeded at any virtual
//! instant (replayed here from the simulator's log), admission leaves nothing admissible waiting,
//! a fleet without room names who cannot move and admits nothing, and policies pick the most
//! matching labels, then the first name.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use drover_hub::core::admission::{
    admit, pair_reservation, AdmissionLimits, ClusterSlots, MigrationRequest, PairBudget,
    WaitReason,
};
use drover_hub::core::planner::simulation::{
    simulate, simulate_evacuation, simulate_plan, Dispatch, Event, SimulationSettings,
};
use drover_hub::core::planner::{
    effective_limits, plan_evacuation, plan_rebalance, policy_for, vm_ref, BlockerKind,
    Enforcement, Fleet, FleetCluster, MigrationPolicy, Plan, PlanOptions, RebalanceOptions,
    Reservation, AFFINITY_LABEL, ANTI_AFFINITY_LABEL, PINNED_LABEL,
};
use drover_shared::inventory::{
    ClusterHealth, ClusterInfo, Disk, Interface, MigrationConfig, NodeInfo, RunStrategy,
    RuntimeKind, StorageClass, VmInfo, VmPhase,
};
use drover_shared::{ClusterName, Namespace, VmName, VmRef};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, RngSeed};
use uuid::Uuid;

/// Cases found failing once; they replay first, before any new case (commit new lines).
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/planner_properties.proptest-regressions"
);

/// The suite's seed: CI explores the same cases every run, so a red run means a change broke
/// something, not that chance found an old bug. `scripts/explore-properties.sh` explores
/// thousands of new cases with random seeds (`PROPTEST_RNG_SEED`, `PROPTEST_CASES`).
const SUITE_SEED: u64 = 0x0d20_7e12_2026;

fn config(cases: u32) -> ProptestConfig {
    // `default()` reads PROPTEST_CASES and PROPTEST_RNG_SEED when they are set.
    let from_env = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            from_env.cases
        } else {
            cases
        },
        rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
            from_env.rng_seed
        } else {
            RngSeed::Fixed(SUITE_SEED)
        },
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        ..from_env
    }
}

const GIB: u64 = 1 << 30;
const CLASSES: [&str; 3] = ["standard", "fast", ""];
const NETWORKS: [&str; 2] = ["default", "vlan-100"];
const VERSIONS: [&str; 3] = ["8.2.1", "8.2.7", "9.0.0"];
const CPUS: [&str; 2] = ["host", "Skylake-Server"];
const GROUPS: [&str; 2] = ["g1", "g2"];

#[derive(Debug, Clone)]
struct VmSpec {
    name: u8,
    memory_gib: u64,
    mac: u8,
    class: usize,
    network: usize,
    running: bool,
    migratable: bool,
    pinned: bool,
    affinity: Option<usize>,
    anti_affinity: Option<usize>,
    node: usize,
}

fn vm_spec() -> impl Strategy<Value = VmSpec> {
    (
        0u8..30,
        1u64..8,
        0u8..60,
        0usize..3,
        0usize..2,
        prop::bool::weighted(0.95),
        prop::bool::weighted(0.95),
        prop::bool::weighted(0.05),
        prop::option::weighted(0.25, 0usize..2),
        prop::option::weighted(0.25, 0usize..2),
        0usize..4,
    )
        .prop_map(
            |(
                name,
                memory_gib,
                mac,
                class,
                network,
                running,
                migratable,
                pinned,
                affinity,
                anti_affinity,
                node,
            )| VmSpec {
                name,
                memory_gib,
                mac,
                class,
                network,
                running,
                migratable,
                pinned,
                affinity,
                anti_affinity,
                node,
            },
        )
}

#[derive(Debug, Clone)]
struct ClusterSpec {
    health: u8,
    cordoned: bool,
    version: usize,
    gate: bool,
    sync_endpoint: bool,
    classes: u8,
    networks: u8,
    cpu: usize,
    /// (allocatable GiB, requested percent)
    nodes: Vec<(u64, u64)>,
    vms: Vec<VmSpec>,
    parallel: u32,
    per_node: u32,
}

fn cluster_spec(max_vms: usize) -> impl Strategy<Value = ClusterSpec> {
    (
        0u8..20,
        prop::bool::weighted(0.1),
        prop::sample::select(vec![0usize, 0, 0, 0, 1, 2]),
        prop::bool::weighted(0.95),
        prop::bool::weighted(0.97),
        prop::sample::select(vec![3u8, 3, 3, 1, 2]),
        prop::sample::select(vec![3u8, 3, 3, 1, 2]),
        prop::sample::select(vec![0usize, 0, 0, 0, 1]),
        prop::collection::vec((16u64..128, 0u64..60), 1..4),
        prop::collection::vec(vm_spec(), 0..max_vms),
        1u32..4,
        1u32..3,
    )
        .prop_map(
            |(
                health,
                cordoned,
                version,
                gate,
                sync_endpoint,
                classes,
                networks,
                cpu,
                nodes,
                vms,
                parallel,
                per_node,
            )| ClusterSpec {
                health,
                cordoned,
                version,
                gate,
                sync_endpoint,
                classes,
                networks,
                cpu,
                nodes,
                vms,
                parallel,
                per_node,
            },
        )
}

#[derive(Debug, Clone)]
struct FleetSpec {
    clusters: Vec<ClusterSpec>,
    /// (target cluster, memory GiB, MAC, node)
    reservations: Vec<(usize, u64, u8, usize)>,
    drains: u32,
    affinity_required: bool,
    anti_affinity_required: bool,
}

fn fleet_spec(max_vms: usize) -> impl Strategy<Value = FleetSpec> {
    (
        prop::collection::vec(cluster_spec(max_vms), 2..8),
        prop::collection::vec((0usize..8, 1u64..4, 0u8..60, 0usize..4), 0..3),
        prop::sample::select(vec![1u32, 1, 0, 2]),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(clusters, reservations, drains, affinity_required, anti_affinity_required)| {
                FleetSpec {
                    clusters,
                    reservations,
                    drains,
                    affinity_required,
                    anti_affinity_required,
                }
            },
        )
}

fn name(n: &str) -> ClusterName {
    ClusterName::new(n).unwrap()
}

fn mac(i: u8) -> String {
    format!("02:00:00:00:00:{i:02x}")
}

fn build_cluster(index: usize, spec: &ClusterSpec) -> FleetCluster {
    let nodes: Vec<NodeInfo> = spec
        .nodes
        .iter()
        .enumerate()
        .map(|(i, &(alloc, percent))| NodeInfo {
            name: format!("n{}", i + 1),
            cpu_model: CPUS[spec.cpu].into(),
            allocatable_memory_bytes: alloc * GIB,
            allocatable_cpu_millis: 32_000,
            requested_memory_bytes: alloc * GIB * percent / 100,
            requested_cpu_millis: 0,
            schedulable: true,
            labels: BTreeMap::new(),
        })
        .collect();
    let mut names = HashSet::new();
    let mut macs = HashSet::new();
    let mut vms = Vec::new();
    for v in &spec.vms {
        if !names.insert(v.name) || !macs.insert(v.mac) {
            continue;
        }
        let mut labels = BTreeMap::new();
        if v.pinned {
            labels.insert(PINNED_LABEL.to_owned(), "true".to_owned());
        }
        if let Some(g) = v.affinity {
            labels.insert(AFFINITY_LABEL.to_owned(), GROUPS[g].to_owned());
        }
        if let Some(g) = v.anti_affinity {
            labels.insert(ANTI_AFFINITY_LABEL.to_owned(), GROUPS[g].to_owned());
        }
        vms.push(VmInfo {
            namespace: "web".into(),
            name: format!("vm-{}", v.name),
            uid: format!("uid-{index}-{}", v.name),
            run_strategy: RunStrategy::Always,
            phase: if v.running {
                VmPhase::Running
            } else {
                VmPhase::Stopped
            },
            node: Some(format!("n{}", v.node % nodes.len() + 1)),
            memory_bytes: v.memory_gib * GIB,
            vcpus: 1,
            disks: vec![Disk {
                name: "root".into(),
                size_bytes: 5 * GIB,
                storage_class: CLASSES[v.class].into(),
                access_mode: "ReadWriteOnce".into(),
            }],
            interfaces: vec![Interface {
                name: "eth0".into(),
                network: NETWORKS[v.network].into(),
                mac: mac(v.mac),
            }],
            labels,
            migratable: v.migratable,
            non_migratable_reasons: if v.migratable {
                vec![]
            } else {
                vec!["host device".into()]
            },
            generation: 1,
        });
    }
    let storage_classes = ["standard", "fast"]
        .iter()
        .enumerate()
        .filter(|(i, _)| spec.classes & (1 << i) != 0)
        .map(|(i, c)| StorageClass {
            name: (*c).into(),
            provisioner: String::new(),
            is_default: i == 0,
        })
        .collect();
    let networks = NETWORKS
        .iter()
        .enumerate()
        .filter(|(i, _)| spec.networks & (1 << i) != 0)
        .map(|(_, n)| (*n).to_owned())
        .collect();
    FleetCluster {
        name: name(&format!("c{index}")),
        health: match spec.health {
            0..=16 => ClusterHealth::Ready,
            17 | 18 => ClusterHealth::Degraded,
            _ => ClusterHealth::Unreachable,
        },
        cordoned: spec.cordoned,
        info: ClusterInfo {
            runtime: RuntimeKind::Qemu,
            platform_version: "6.1.0".into(),
            virtualization_version: VERSIONS[spec.version].into(),
            labels: BTreeMap::new(),
            cpu_models: vec![CPUS[spec.cpu].into()],
            feature_gates: if spec.gate {
                vec!["DecentralizedLiveMigration".into()]
            } else {
                vec![]
            },
            migration_config: MigrationConfig {
                parallel_migrations_per_cluster: spec.parallel,
                parallel_outbound_migrations_per_node: spec.per_node,
                ..MigrationConfig::default()
            },
            storage_classes,
            networks,
            sync_endpoint: spec.sync_endpoint.then(|| format!("https://c{index}:8443")),
        },
        nodes,
        vms,
        namespace_labels: BTreeMap::new(),
    }
}

fn build(spec: &FleetSpec) -> (Fleet, PlanOptions) {
    let clusters: Vec<FleetCluster> = spec
        .clusters
        .iter()
        .enumerate()
        .map(|(i, c)| build_cluster(i, c))
        .collect();
    let mut reservations = Vec::new();
    for (i, &(target, memory, mac_index, node)) in spec.reservations.iter().enumerate() {
        let target = &clusters[target % clusters.len()];
        reservations.push(Reservation {
            migration_id: Uuid::from_u128(1000 + i as u128),
            vm: VmRef {
                cluster: name("remote"),
                namespace: Namespace::new("web").unwrap(),
                name: VmName::new(format!("incoming-{i}")).unwrap(),
            },
            target_cluster: target.name.clone(),
            target_node: Some(target.nodes[node % target.nodes.len()].name.clone()),
            target_namespace: "web".into(),
            memory_bytes: memory * GIB,
            macs: vec![mac(mac_index)],
            labels: BTreeMap::from([(ANTI_AFFINITY_LABEL.to_owned(), GROUPS[0].to_owned())]),
        });
    }
    let mut options = PlanOptions::new(Uuid::from_u128(77), now());
    options.nodes_draining_in_parallel = spec.drains;
    options.affinity = if spec.affinity_required {
        Enforcement::Required
    } else {
        Enforcement::Preferred
    };
    options.anti_affinity = if spec.anti_affinity_required {
        Enforcement::Required
    } else {
        Enforcement::Preferred
    };
    options.limits.max_in_flight = 4;
    (
        Fleet {
            clusters,
            reservations,
            ..Fleet::default()
        },
        options,
    )
}

fn one_vm() -> VmInfo {
    let spec = ClusterSpec {
        health: 0,
        cordoned: false,
        version: 0,
        gate: true,
        sync_endpoint: true,
        classes: 1,
        networks: 1,
        cpu: 0,
        nodes: vec![(8, 0)],
        vms: vec![VmSpec {
            name: 0,
            memory_gib: 1,
            mac: 0,
            class: 0,
            network: 0,
            running: true,
            migratable: true,
            pinned: false,
            affinity: None,
            anti_affinity: None,
            node: 0,
        }],
        parallel: 1,
        per_node: 1,
    };
    build_cluster(0, &spec).vms.remove(0)
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-22T02:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn major_minor(v: &str) -> String {
    v.split('.').take(2).collect::<Vec<_>>().join(".")
}

fn find<'a>(fleet: &'a Fleet, cluster: &str) -> &'a FleetCluster {
    fleet
        .clusters
        .iter()
        .find(|c| c.name.as_str() == cluster)
        .unwrap()
}

/// Every hard constraint, re-checked naively for every move of `plan`, plus capacity.
fn check_plan(fleet: &Fleet, options: &PlanOptions, plan: &Plan) -> Result<(), String> {
    let mut ids = HashSet::new();
    let mut vms = HashSet::new();
    for m in &plan.moves {
        if !ids.insert(m.id) || !vms.insert(m.vm.clone()) {
            return Err(format!("{} planned twice", m.vm));
        }
    }
    for c in &plan.cannot_move {
        if !vms.insert(c.vm.clone()) {
            return Err(format!("{} both moves and cannot move", c.vm));
        }
        if c.reasons.is_empty()
            || c.reasons
                .iter()
                .any(|r| r.message.is_empty() || r.remedy.is_empty())
        {
            return Err(format!("{} cannot move without a clear reason", c.vm));
        }
    }
    let gate = |c: &FleetCluster| {
        c.info
            .feature_gates
            .iter()
            .any(|g| g.eq_ignore_ascii_case("decentralizedLiveMigration"))
    };
    let reserved_sources: HashSet<&VmRef> = fleet.reservations.iter().map(|r| &r.vm).collect();
    for m in &plan.moves {
        let s = find(fleet, m.vm.cluster.as_str());
        let t = find(fleet, m.target_cluster.as_str());
        let vm = s
            .vms
            .iter()
            .find(|v| v.namespace == m.vm.namespace.as_str() && v.name == m.vm.name.as_str())
            .unwrap();
        let fail = |rule: &str| Err(format!("{} -> {}: {rule}", m.vm, t.name));
        if s.name == t.name {
            return fail("target is the source");
        }
        if t.health != ClusterHealth::Ready || s.health != ClusterHealth::Ready {
            return fail("not Ready");
        }
        if t.cordoned {
            return fail("cordoned");
        }
        if t.info.runtime != s.info.runtime
            || major_minor(&t.info.platform_version) != major_minor(&s.info.platform_version)
            || major_minor(&t.info.virtualization_version)
                != major_minor(&s.info.virtualization_version)
        {
            return fail("versions differ");
        }
        if !gate(t) || !gate(s) {
            return fail("gate off");
        }
        if t.info.sync_endpoint.is_none() {
            return fail("no sync endpoint");
        }
        if let Some(cpu) = s.info.cpu_models.first() {
            if !t.info.cpu_models.contains(cpu) {
                return fail("CPU model");
            }
        }
        for d in &vm.disks {
            let class = options
                .storage_class_map
                .get(&d.storage_class)
                .unwrap_or(&d.storage_class);
            let ok = if class.is_empty() {
                t.info.storage_classes.iter().any(|c| c.is_default)
            } else {
                t.info.storage_classes.iter().any(|c| &c.name == class)
            };
            if !ok {
                return fail("storage class");
            }
        }
        for i in &vm.interfaces {
            if !t.info.networks.contains(&i.network) {
                return fail("network");
            }
        }
        if !vm.migratable
            || vm.phase != VmPhase::Running
            || vm.labels.get(PINNED_LABEL).is_some_and(|p| p == "true")
            || reserved_sources.contains(&m.vm)
        {
            return fail("the VM may not move");
        }
        let my_macs: HashSet<&str> = vm.interfaces.iter().map(|i| i.mac.as_str()).collect();
        let used_by_vms = t
            .vms
            .iter()
            .flat_map(|v| v.interfaces.iter().map(|i| i.mac.as_str()));
        let used_by_reservations = fleet
            .reservations
            .iter()
            .filter(|r| r.target_cluster == t.name)
            .flat_map(|r| r.macs.iter().map(String::as_str));
        let used_by_plan = plan
            .moves
            .iter()
            .filter(|o| o.target_cluster == t.name && o.vm != m.vm)
            .flat_map(|o| {
                find(fleet, o.vm.cluster.as_str())
                    .vms
                    .iter()
                    .filter(|v| v.name == o.vm.name.as_str())
                    .flat_map(|v| v.interfaces.iter().map(|i| i.mac.as_str()))
            });
        if used_by_vms
            .chain(used_by_reservations)
            .chain(used_by_plan)
            .any(|x| my_macs.contains(x))
        {
            return fail("MAC in use");
        }
        let name_taken = t
            .vms
            .iter()
            .any(|v| v.namespace == vm.namespace && v.name == vm.name)
            || fleet.reservations.iter().any(|r| {
                r.target_cluster == t.name
                    && r.target_namespace == vm.namespace
                    && r.vm.name.as_str() == vm.name
            })
            || plan
                .moves
                .iter()
                .any(|o| o.target_cluster == t.name && o.vm != m.vm && o.vm.name == m.vm.name);
        if name_taken {
            return fail("name taken");
        }
        if options.anti_affinity == Enforcement::Required {
            if let Some(g) = vm.labels.get(ANTI_AFFINITY_LABEL) {
                let on_target = t
                    .vms
                    .iter()
                    .any(|v| v.labels.get(ANTI_AFFINITY_LABEL) == Some(g))
                    || fleet.reservations.iter().any(|r| {
                        r.target_cluster == t.name && r.labels.get(ANTI_AFFINITY_LABEL) == Some(g)
                    })
                    || plan.moves.iter().any(|o| {
                        o.target_cluster == t.name
                            && o.vm != m.vm
                            && find(fleet, o.vm.cluster.as_str()).vms.iter().any(|v| {
                                v.name == o.vm.name.as_str()
                                    && v.labels.get(ANTI_AFFINITY_LABEL) == Some(g)
                            })
                    });
                if on_target {
                    return fail("anti-affinity");
                }
            }
        }
    }
    // Capacity: per node and the spare for node drains on every cluster that receives.
    let receiving: BTreeSet<&str> = plan
        .moves
        .iter()
        .map(|m| m.target_cluster.as_str())
        .collect();
    for t in receiving {
        let cluster = find(fleet, t);
        let mut loads: BTreeMap<&str, (u64, u64)> = cluster
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.as_str(),
                    (n.allocatable_memory_bytes, n.requested_memory_bytes),
                )
            })
            .collect();
        for r in fleet
            .reservations
            .iter()
            .filter(|r| r.target_cluster.as_str() == t)
        {
            loads.get_mut(r.target_node.as_deref().unwrap()).unwrap().1 += r.memory_bytes;
        }
        for m in plan.moves.iter().filter(|m| m.target_cluster.as_str() == t) {
            loads
                .get_mut(m.target_node.as_str())
                .ok_or_else(|| format!("{} goes to unknown node {}", m.vm, m.target_node))?
                .1 += m.memory_bytes;
        }
        let planned_nodes: HashSet<&str> = plan
            .moves
            .iter()
            .filter(|m| m.target_cluster.as_str() == t)
            .map(|m| m.target_node.as_str())
            .collect();
        for (node, (alloc, load)) in &loads {
            if planned_nodes.contains(node) && load > alloc {
                return Err(format!("{t}/{node} overcommitted: {load} > {alloc}"));
            }
        }
        let free: u64 = loads.values().map(|(a, l)| a.saturating_sub(*l)).sum();
        let spare = u64::from(options.nodes_draining_in_parallel)
            * loads.values().map(|l| l.1).max().unwrap();
        if free < spare {
            return Err(format!(
                "{t} keeps {free} free, below the spare {spare} for node drains"
            ));
        }
    }
    Ok(())
}

/// Replays a simulation log and checks every limit after every event.
fn replay_log(
    log: &[drover_hub::core::planner::simulation::LogEntry],
    limits: &AdmissionLimits,
) -> Result<(), String> {
    let mut running: HashMap<Uuid, &drover_hub::core::planner::simulation::LogEntry> =
        HashMap::new();
    let mut moved = HashSet::new();
    let mut last = 0.0;
    for e in log {
        if e.at_seconds < last {
            return Err("time went backwards".into());
        }
        last = e.at_seconds;
        match e.event {
            Event::Admitted => {
                if running.insert(e.migration, e).is_some() {
                    return Err(format!("{} admitted twice", e.migration));
                }
                if e.attempt > limits.max_attempts {
                    return Err(format!("attempt {} over the limit", e.attempt));
                }
            }
            Event::Succeeded => {
                running.remove(&e.migration);
                if !moved.insert(e.vm.clone()) {
                    return Err(format!("VM {} moved twice", e.vm));
                }
            }
            Event::Failed { .. } => {
                running.remove(&e.migration);
            }
            Event::Requeued | Event::GaveUp => {}
        }
        if running.len() > limits.max_in_flight {
            return Err(format!("{} in flight at {}", running.len(), e.at_seconds));
        }
        let mut clusters: HashMap<&str, u32> = HashMap::new();
        let mut nodes: HashMap<(&str, &str), u32> = HashMap::new();
        let mut pairs: HashMap<(&str, &str), (u64, u32)> = HashMap::new();
        let mut vms = HashSet::new();
        for r in running.values() {
            *clusters.entry(&r.source_cluster).or_default() += 1;
            *clusters.entry(&r.target_cluster).or_default() += 1;
            *nodes
                .entry((&r.source_cluster, &r.source_node))
                .or_default() += 1;
            let p = pairs
                .entry((&r.source_cluster, &r.target_cluster))
                .or_default();
            p.0 += r.reserved_bytes_per_sec;
            p.1 += 1;
            if !vms.insert(&r.vm) {
                return Err(format!("VM {} runs twice at {}", r.vm, e.at_seconds));
            }
        }
        for (c, n) in clusters {
            if n > limits.slots(c).parallel_migrations_per_cluster {
                return Err(format!("cluster {c} runs {n} at {}", e.at_seconds));
            }
        }
        for ((c, node), n) in nodes {
            if n > limits.slots(c).parallel_outbound_migrations_per_node {
                return Err(format!("node {c}/{node} sends {n} at {}", e.at_seconds));
            }
        }
        for ((s, t), (reserved, count)) in pairs {
            let budget = limits.pair_bandwidth.budget(s, t);
            if budget > 0 && count > 1 && reserved > budget {
                return Err(format!("pair {s}->{t} reserves {reserved} of {budget}"));
            }
        }
    }
    if !running.is_empty() {
        return Err("migrations still running at the end".into());
    }
    Ok(())
}

fn random_settings(seed: u64, dispatch: Dispatch) -> SimulationSettings {
    SimulationSettings {
        seed,
        dispatch,
        duration_jitter: 0.3,
        failure_probability: 0.2,
        unsafe_failure_share: 0.3,
        keep_log: true,
        ..SimulationSettings::deterministic(Default::default())
    }
}

#[derive(Debug, Clone)]
struct QueueSpec {
    /// (source, node, target, GiB, bandwidth MiB/s or 0)
    migrations: Vec<(usize, usize, usize, u64, u64)>,
    per_cluster: Vec<u32>,
    per_node: u32,
    max_in_flight: usize,
    budget_mib: u64,
    max_attempts: u32,
    seed: u64,
}

const QUEUE_CLUSTERS: [&str; 4] = ["a", "b", "c", "d"];

fn queue_spec() -> impl Strategy<Value = QueueSpec> {
    (
        prop::collection::vec(
            (
                0usize..4,
                0usize..3,
                0usize..4,
                1u64..16,
                prop::sample::select(vec![0u64, 100, 250, 500]),
            ),
            0..40,
        ),
        prop::collection::vec(1u32..4, 4),
        1u32..3,
        1usize..8,
        prop::sample::select(vec![0u64, 400, 1000]),
        1u32..4,
        any::<u64>(),
    )
        .prop_map(
            |(migrations, per_cluster, per_node, max_in_flight, budget_mib, max_attempts, seed)| {
                QueueSpec {
                    migrations,
                    per_cluster,
                    per_node,
                    max_in_flight,
                    budget_mib,
                    max_attempts,
                    seed,
                }
            },
        )
}

fn build_queue(spec: &QueueSpec) -> (Vec<MigrationRequest>, AdmissionLimits) {
    let queue = spec
        .migrations
        .iter()
        .enumerate()
        .filter(|(_, m)| m.0 != m.2)
        .map(|(i, &(s, node, t, gib, bw))| MigrationRequest {
            id: Uuid::from_u128(i as u128 + 1),
            vm: format!("vm-{i}"),
            position: i as u64,
            source_cluster: QUEUE_CLUSTERS[s].into(),
            source_node: format!("n{node}"),
            target_cluster: QUEUE_CLUSTERS[t].into(),
            bytes: gib * GIB,
            bandwidth_bytes_per_sec: bw << 20,
            attempt: 1,
        })
        .collect();
    let limits = AdmissionLimits {
        max_in_flight: spec.max_in_flight,
        max_attempts: spec.max_attempts,
        clusters: QUEUE_CLUSTERS
            .iter()
            .zip(&spec.per_cluster)
            .map(|(c, &p)| {
                (
                    (*c).to_owned(),
                    ClusterSlots {
                        parallel_migrations_per_cluster: p,
                        parallel_outbound_migrations_per_node: spec.per_node,
                    },
                )
            })
            .collect(),
        pair_bandwidth: drover_hub::core::admission::PairBandwidth {
            default_bytes_per_sec: spec.budget_mib << 20,
            pairs: vec![PairBudget {
                source: "a".into(),
                target: "b".into(),
                bytes_per_sec: 300 << 20,
            }],
        },
    };
    (queue, limits)
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn every_planned_target_satisfies_every_hard_constraint_and_capacity(spec in fleet_spec(8)) {
        let (fleet, options) = build(&spec);
        let plan = plan_evacuation(&fleet, &name("c0"), &options);
        check_plan(&fleet, &options, &plan).map_err(TestCaseError::fail)?;
        // Every VM of the source is accounted for exactly once.
        let source = &fleet.clusters[0];
        prop_assert_eq!(plan.moves.len() + plan.cannot_move.len(), source.vms.len());
        prop_assert!(plan.estimate.seconds + 1e-6 >= plan.estimate.lower_bound_seconds);
        // Nothing lands on a cordoned, unready or gate-less cluster.
        for m in &plan.moves {
            let t = find(&fleet, m.target_cluster.as_str());
            prop_assert!(!t.cordoned && t.health == ClusterHealth::Ready);
        }
    }

    #[test]
    fn an_evacuation_runs_in_virtual_time_without_breaking_a_limit(spec in fleet_spec(8), seed in any::<u64>()) {
        let (fleet, options) = build(&spec);
        for dispatch in [Dispatch::KeepSlotsFull, Dispatch::BatchWaves] {
            let (plan, report) =
                simulate_evacuation(&fleet, &name("c0"), &options, &random_settings(seed, dispatch));
            prop_assert!(report.violations.is_empty(), "{:?}", report.violations);
            let limits = effective_limits(&fleet, &options);
            replay_log(&report.log, &limits).map_err(TestCaseError::fail)?;
            prop_assert!(report.never_admitted.is_empty());
            prop_assert_eq!(report.succeeded + report.gave_up.len(), plan.moves.len());
            prop_assert!(report.makespan_seconds + 1e-6 >= report.lower_bound.seconds);
            // Only planned VMs are ever admitted.
            let planned: HashSet<&str> = plan.moves.iter().map(|m| m.vm_uid.as_str()).collect();
            prop_assert!(report.log.iter().all(|e| planned.contains(e.vm.as_str())));
        }
    }

    #[test]
    fn a_rebalance_keeps_every_rule_and_never_worsens_the_balance(spec in fleet_spec(8), max_moves in 1usize..6) {
        let (fleet, options) = build(&spec);
        let goal = RebalanceOptions {
            band: 0.1,
            min_improvement: 0.0,
            max_moves,
            hold_down_secs: 0,
            last_rebalance_at: None,
            recently_moved_secs: 3600,
        };
        let mut strict = options.clone();
        strict.anti_affinity = Enforcement::Required;
        let plan = plan_rebalance(&fleet, &options, &goal);
        check_plan(&fleet, &strict, &plan).map_err(TestCaseError::fail)?;
        prop_assert!(plan.moves.len() <= max_moves);
        let mut gave = HashSet::new();
        let mut took = HashSet::new();
        for m in &plan.moves {
            let vm = find(&fleet, m.vm.cluster.as_str())
                .vms
                .iter()
                .find(|v| v.name == m.vm.name.as_str())
                .unwrap();
            prop_assert!(!vm.labels.contains_key(AFFINITY_LABEL), "an affinity member moved alone");
            gave.insert(m.vm.cluster.clone());
            took.insert(m.target_cluster.clone());
        }
        prop_assert!(gave.is_disjoint(&took), "a cluster both gave and took");
        // The largest deviation from the fleet's utilisation does not grow.
        let eligible: Vec<&FleetCluster> = fleet
            .clusters
            .iter()
            .filter(|c| {
                c.health == ClusterHealth::Ready
                    && !c.cordoned
                    && !c.info.feature_gates.is_empty()
                    && c.info.sync_endpoint.is_some()
            })
            .collect();
        let mut load: BTreeMap<&str, (f64, f64)> = eligible
            .iter()
            .map(|c| {
                let reserved: u64 = fleet
                    .reservations
                    .iter()
                    .filter(|r| r.target_cluster == c.name)
                    .map(|r| r.memory_bytes)
                    .sum();
                // A node holds what is requested of it, and at least its running VMs.
                let node_load = |n: &NodeInfo| {
                    let vms: u64 = c
                        .vms
                        .iter()
                        .filter(|v| v.phase == VmPhase::Running && v.node.as_deref() == Some(n.name.as_str()))
                        .map(|v| v.memory_bytes)
                        .sum();
                    n.requested_memory_bytes.max(vms) as f64
                };
                (
                    c.name.as_str(),
                    (
                        c.nodes.iter().map(|n| n.allocatable_memory_bytes as f64).sum(),
                        c.nodes.iter().map(node_load).sum::<f64>() + reserved as f64,
                    ),
                )
            })
            .collect();
        let mean = load.values().map(|l| l.1).sum::<f64>() / load.values().map(|l| l.0).sum::<f64>();
        let deviation = |load: &BTreeMap<&str, (f64, f64)>| {
            load.values().map(|(a, l)| (l / a - mean).abs()).fold(0.0, f64::max)
        };
        let before = deviation(&load);
        for m in &plan.moves {
            load.get_mut(m.vm.cluster.as_str()).unwrap().1 -= m.memory_bytes as f64;
            load.get_mut(m.target_cluster.as_str()).unwrap().1 += m.memory_bytes as f64;
        }
        prop_assert!(deviation(&load) <= before + 1e-9);
    }

    #[test]
    fn admission_admits_everything_that_fits_and_says_why_the_rest_waits(spec in queue_spec(), running in 0usize..6) {
        let (queue, limits) = build_queue(&spec);
        let split = running.min(queue.len());
        let (in_flight, queued) = queue.split_at(split);
        // What runs may already be over a limit (a restarted hub); admission adds nothing then.
        let decision = admit(&limits, queued, in_flight);
        let admitted: HashSet<Uuid> = decision.admitted.iter().copied().collect();
        prop_assert_eq!(admitted.len() + decision.waiting.len(), queued.len());
        let mut now_running: Vec<MigrationRequest> = in_flight.to_vec();
        now_running.extend(queued.iter().filter(|q| admitted.contains(&q.id)).cloned());
        let rest: Vec<MigrationRequest> =
            queued.iter().filter(|q| !admitted.contains(&q.id)).cloned().collect();
        // Maximal: nothing left waiting fits once these run, apart from what a pair holds.
        let again = admit(&limits, &rest, &now_running);
        prop_assert!(again.admitted.is_empty(), "left admissible work waiting: {:?}", again.admitted);
        // Every wait has a reason, and each reason is true.
        let count = |c: &str| {
            now_running.iter().filter(|r| r.source_cluster == c).count()
                + now_running.iter().filter(|r| r.target_cluster == c).count()
        };
        for w in &decision.waiting {
            prop_assert!(!w.reasons.is_empty());
            for reason in &w.reasons {
                match reason {
                    WaitReason::FleetCap { max_in_flight } => {
                        prop_assert!(now_running.len() >= *max_in_flight)
                    }
                    WaitReason::SourceClusterSlots { cluster, limit }
                    | WaitReason::TargetClusterSlots { cluster, limit } => {
                        prop_assert!(count(cluster) >= *limit as usize)
                    }
                    WaitReason::SourceNodeSlots { cluster, node, limit } => prop_assert!(
                        now_running
                            .iter()
                            .filter(|r| &r.source_cluster == cluster && &r.source_node == node)
                            .count()
                            >= *limit as usize
                    ),
                    WaitReason::PairBandwidth { source, target, budget_bytes_per_sec, needed_bytes_per_sec, .. } => {
                        let reserved: u64 = now_running
                            .iter()
                            .filter(|r| &r.source_cluster == source && &r.target_cluster == target)
                            .map(|r| pair_reservation(r.bandwidth_bytes_per_sec, *budget_bytes_per_sec))
                            .sum();
                        prop_assert!(reserved + needed_bytes_per_sec > *budget_bytes_per_sec)
                    }
                    WaitReason::PairHeldForEarlier { earlier, .. } => {
                        prop_assert!(decision.waiting.iter().any(|o| o.id == *earlier))
                    }
                    WaitReason::VmBusy { .. } => {}
                }
            }
        }
    }

    #[test]
    fn keeping_slots_full_never_breaks_a_limit_or_runs_a_vm_twice(spec in queue_spec()) {
        let (queue, limits) = build_queue(&spec);
        for dispatch in [Dispatch::KeepSlotsFull, Dispatch::BatchWaves] {
            let report = simulate(queue.clone(), &limits, &random_settings(spec.seed, dispatch));
            prop_assert!(report.violations.is_empty(), "{:?}", report.violations);
            replay_log(&report.log, &limits).map_err(TestCaseError::fail)?;
            prop_assert_eq!(report.succeeded + report.gave_up.len(), queue.len());
            prop_assert!(report.makespan_seconds + 1e-6 >= report.lower_bound.seconds);
            prop_assert!(report.peak_in_flight <= limits.max_in_flight);
            let attempts = report.log.iter().filter(|e| e.event == Event::Admitted).count();
            prop_assert_eq!(attempts, report.attempts);
            // A retried migration was safe to retry and under its attempt limit.
            for e in report.log.iter().filter(|e| e.event == Event::Requeued) {
                prop_assert!(e.attempt < limits.max_attempts);
            }
        }
    }

    #[test]
    fn policies_pick_the_most_matching_labels_then_the_first_name(
        policies in prop::collection::vec(
            (0u8..6, prop::collection::btree_map(0u8..4, 0u8..2, 0..3), prop::collection::btree_map(0u8..2, 0u8..2, 0..2)),
            0..8,
        ),
        vm_labels in prop::collection::btree_map(0u8..4, 0u8..2, 0..4),
        ns_labels in prop::collection::btree_map(0u8..2, 0u8..2, 0..2),
    ) {
        let text = |m: &BTreeMap<u8, u8>, prefix: &str| -> BTreeMap<String, String> {
            m.iter().map(|(k, v)| (format!("{prefix}{k}"), format!("v{v}"))).collect()
        };
        let policies: Vec<MigrationPolicy> = policies
            .iter()
            .map(|(n, vm, ns)| MigrationPolicy {
                name: format!("policy-{n}"),
                vm_selector: text(vm, "vm-key-"),
                namespace_selector: text(ns, "ns-key-"),
                bandwidth_per_migration: None,
                completion_timeout_per_gib: None,
                allow_auto_converge: None,
                allow_post_copy: None,
            })
            .collect();
        let vm_info = VmInfo {
            labels: text(&vm_labels, "vm-key-"),
            ..one_vm()
        };
        let ns = text(&ns_labels, "ns-key-");
        let matches = |p: &MigrationPolicy| {
            p.vm_selector.iter().all(|(k, v)| vm_info.labels.get(k) == Some(v))
                && p.namespace_selector.iter().all(|(k, v)| ns.get(k) == Some(v))
        };
        let score = |p: &MigrationPolicy| p.vm_selector.len() + p.namespace_selector.len();
        match policy_for(&vm_info, &ns, &policies) {
            None => prop_assert!(policies.iter().all(|p| !matches(p))),
            Some(chosen) => {
                prop_assert!(matches(chosen));
                for p in policies.iter().filter(|p| matches(p)) {
                    prop_assert!(score(p) <= score(chosen));
                    if score(p) == score(chosen) {
                        prop_assert!(chosen.name <= p.name);
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config(100))]

    #[test]
    fn a_fleet_without_room_names_who_cannot_move_and_admits_nothing(spec in fleet_spec(8)) {
        let (mut fleet, options) = build(&spec);
        // Every target is full: its nodes' requests equal what they have.
        for c in fleet.clusters.iter_mut().skip(1) {
            for n in &mut c.nodes {
                n.requested_memory_bytes = n.allocatable_memory_bytes;
            }
        }
        let plan = plan_evacuation(&fleet, &name("c0"), &options);
        prop_assert!(plan.moves.is_empty(), "{:?}", plan.moves);
        prop_assert_eq!(plan.cannot_move.len(), fleet.clusters[0].vms.len());
        for c in &plan.cannot_move {
            let vm = fleet.clusters[0].vms.iter().find(|v| v.name == c.vm.name.as_str()).unwrap();
            let movable = vm.migratable
                && vm.phase == VmPhase::Running
                && !vm.labels.contains_key(PINNED_LABEL)
                && fleet.clusters[0].health == ClusterHealth::Ready
                && !fleet.clusters[0].info.feature_gates.is_empty();
            if movable {
                // Every other cluster is full, so each is named for memory.
                let named: BTreeSet<&str> = c
                    .reasons
                    .iter()
                    .filter(|r| r.kind == BlockerKind::NotEnoughMemory)
                    .flat_map(|r| r.clusters.iter().map(String::as_str))
                    .collect();
                let others: BTreeSet<&str> =
                    fleet.clusters.iter().skip(1).map(|c| c.name.as_str()).collect();
                prop_assert_eq!(named, others, "{:?}", c.reasons);
            }
            prop_assert!(vm_ref(&fleet.clusters[0].name, vm).as_ref() == Some(&c.vm));
        }
        let limits = effective_limits(&fleet, &options);
        let report = simulate_plan(&plan, &limits, &random_settings(1, Dispatch::KeepSlotsFull));
        prop_assert_eq!(report.attempts, 0);
        prop_assert!(admit(&limits, &plan.requests(), &[]).admitted.is_empty());
    }
}

#[test]
fn a_full_fleet_says_memory_is_what_is_missing() {
    let spec = FleetSpec {
        clusters: (0..3)
            .map(|i| ClusterSpec {
                health: 0,
                cordoned: false,
                version: 0,
                gate: true,
                sync_endpoint: true,
                classes: 3,
                networks: 3,
                cpu: 0,
                nodes: vec![(32, if i == 0 { 10 } else { 89 })],
                vms: (0..4)
                    .map(|v| VmSpec {
                        name: v + 10 * i as u8,
                        memory_gib: 4,
                        mac: v + 6 * i as u8,
                        class: 0,
                        network: 0,
                        running: true,
                        migratable: true,
                        pinned: false,
                        affinity: None,
                        anti_affinity: None,
                        node: 0,
                    })
                    .collect(),
                parallel: 2,
                per_node: 1,
            })
            .collect(),
        reservations: vec![],
        drains: 1,
        affinity_required: false,
        anti_affinity_required: false,
    };
    let (fleet, options) = build(&spec);
    let plan = plan_evacuation(&fleet, &name("c0"), &options);
    assert!(plan.moves.is_empty());
    assert_eq!(plan.cannot_move.len(), 4);
    for c in &plan.cannot_move {
        assert_eq!(c.reasons.len(), 1, "{:?}", c.reasons);
        assert_eq!(c.reasons[0].kind, BlockerKind::NotEnoughMemory);
        assert_eq!(c.reasons[0].clusters, vec!["c1", "c2"]);
        assert!(c.reasons[0]
            .message
            .starts_with("2 clusters lack the memory: c1 needs 4.0 GiB"));
    }
}
