//! drover-plan-bench: the planner and the scheduler in virtual time on a modelled fleet (issue 5's
//! benchmark). Builds a fleet of N clusters of M VMs in which one cluster holds S VMs to
//! evacuate, times `plan_evacuation` (median of several runs, release build), then runs the plan
//! through the scheduler's admission in virtual time twice — keeping slots full, and in batch
//! waves (start what fits, wait for all of it) — and prints makespan over the lower bound the
//! limits imply, slot utilisation, and the baseline's ratios. No hub, database or network.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use anyhow::{ensure, Context};
use chrono::{DateTime, Utc};
use clap::Parser;
use drover_hub::core::admission::{AdmissionLimits, PairBandwidth};
use drover_hub::core::planner::simulation::{
    simulate_plan, Dispatch, SimulationReport, SimulationSettings,
};
use drover_hub::core::planner::{
    effective_limits, plan_evacuation, DurationModel, Fleet, FleetCluster, MigrationPolicy,
    PlanOptions, AFFINITY_LABEL, ANTI_AFFINITY_LABEL, LIVE_MIGRATION_GATE, PINNED_LABEL,
};
use drover_shared::inventory::{
    ClusterHealth, ClusterInfo, Disk, Interface, MigrationConfig, NodeInfo, RunStrategy,
    RuntimeKind, StorageClass, VmInfo, VmPhase,
};
use drover_shared::ClusterName;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

#[derive(Parser, Debug)]
#[command(about = "Planner and scheduler in virtual time on a modelled fleet")]
struct Args {
    /// Clusters in the fleet (the one to evacuate included).
    #[arg(long, default_value_t = 500)]
    clusters: usize,
    /// VMs on every other cluster.
    #[arg(long, default_value_t = 200)]
    vms_per_cluster: usize,
    /// VMs on the cluster to evacuate.
    #[arg(long, default_value_t = 2000)]
    source_vms: usize,
    /// Timed planning runs (the median is reported).
    #[arg(long, default_value_t = 9)]
    runs: usize,
    /// Seed of the fleet and of the simulated durations and failures.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fleet-wide cap on migrations in flight.
    #[arg(long, default_value_t = 100)]
    max_in_flight: usize,
    /// parallelMigrationsPerCluster of the cluster to evacuate (others keep KubeVirt's 5).
    #[arg(long, default_value_t = 50)]
    source_parallel: u32,
    /// bandwidthPerMigration of every cluster, MiB/s.
    #[arg(long, default_value_t = 256)]
    bandwidth_per_migration_mib: u64,
    /// Bandwidth budget of every cluster pair, MiB/s (10 Gbit/s).
    #[arg(long, default_value_t = 1192)]
    pair_budget_mib: u64,
    /// Durations vary uniformly by this fraction either way.
    #[arg(long, default_value_t = 0.2)]
    jitter: f64,
    /// Chance that an attempt fails (then 90 % are safe to retry).
    #[arg(long, default_value_t = 0.02)]
    failure_probability: f64,
}

fn cluster_name(i: usize) -> ClusterName {
    ClusterName::new(format!("c{i:03}")).expect("valid cluster name")
}

/// One cluster: `nodes` nodes of 512 GiB, `vm_count` VMs, with a few clusters different enough
/// that the planner must refuse them (another version, cordoned, unready, no gate, another CPU
/// model, a missing storage class or network).
fn cluster(rng: &mut StdRng, index: usize, vm_count: usize, nodes: usize) -> FleetCluster {
    let mut info = ClusterInfo {
        runtime: RuntimeKind::Kubevirt,
        platform_version: "4.20.3".into(),
        virtualization_version: "1.6.2".into(),
        labels: BTreeMap::new(),
        cpu_models: vec!["Cascadelake-Server".into(), "Skylake-Server".into()],
        feature_gates: vec![LIVE_MIGRATION_GATE.into()],
        migration_config: MigrationConfig::default(),
        storage_classes: vec![
            StorageClass {
                name: "ocs-rbd".into(),
                provisioner: "openshift-storage.rbd.csi.ceph.com".into(),
                is_default: true,
            },
            StorageClass {
                name: "fast-nvme".into(),
                provisioner: "topolvm.io".into(),
                is_default: false,
            },
        ],
        networks: vec!["pod".into(), "vlan-100".into(), "vlan-200".into()],
        sync_endpoint: Some(format!("https://sync.c{index:03}.example:9443")),
    };
    let mut health = ClusterHealth::Ready;
    let mut cordoned = false;
    if index > 0 {
        match index % 50 {
            7 => info.virtualization_version = "1.5.0".into(),
            13 => cordoned = true,
            21 => health = ClusterHealth::Degraded,
            29 => info.feature_gates.clear(),
            33 => info.cpu_models = vec!["Icelake-Server".into()],
            41 => info.storage_classes.truncate(1),
            47 => info.networks.truncate(2),
            _ => {}
        }
    }
    let node_infos: Vec<NodeInfo> = (0..nodes)
        .map(|n| NodeInfo {
            name: format!("worker-{n:03}"),
            cpu_model: "Cascadelake-Server".into(),
            allocatable_memory_bytes: 512 * GIB,
            allocatable_cpu_millis: 128_000,
            requested_memory_bytes: 0,
            requested_cpu_millis: 0,
            schedulable: true,
            labels: BTreeMap::new(),
        })
        .collect();
    let mut fleet_cluster = FleetCluster {
        name: cluster_name(index),
        health,
        cordoned,
        info,
        nodes: node_infos,
        vms: Vec::with_capacity(vm_count),
        namespace_labels: BTreeMap::from([(
            "payments".to_owned(),
            BTreeMap::from([("priority".to_owned(), "high".to_owned())]),
        )]),
    };
    for v in 0..vm_count {
        let memory = [2, 4, 4, 8, 8, 8, 16, 16, 32][rng.random_range(0..9)] * GIB;
        let node = rng.random_range(0..nodes);
        let mut labels = BTreeMap::new();
        let namespace = ["web", "payments", "batch", "infra"][v % 4];
        if rng.random_bool(0.1) {
            labels.insert("tier".to_owned(), "db".to_owned());
        }
        if index == 0 && v % 100 == 1 {
            labels.insert(AFFINITY_LABEL.to_owned(), format!("shop-{}", v / 100));
        }
        if index == 0 && v % 50 == 3 {
            labels.insert(ANTI_AFFINITY_LABEL.to_owned(), format!("ha-{}", v / 200));
        }
        if index == 0 && v % 250 == 5 {
            labels.insert(PINNED_LABEL.to_owned(), "true".to_owned());
        }
        let migratable = !(index == 0 && v % 400 == 7);
        let disk_gib = rng.random_range(20..=120);
        fleet_cluster.vms.push(VmInfo {
            namespace: namespace.into(),
            name: format!("vm-{index:03}-{v:04}"),
            uid: format!("uid-{index:03}-{v:04}"),
            run_strategy: RunStrategy::Always,
            phase: VmPhase::Running,
            node: Some(format!("worker-{node:03}")),
            memory_bytes: memory,
            vcpus: (memory / GIB / 2).max(1) as u32,
            disks: vec![Disk {
                name: "rootdisk".into(),
                size_bytes: disk_gib * GIB,
                storage_class: if v % 7 == 0 { "fast-nvme" } else { "ocs-rbd" }.into(),
                access_mode: "ReadWriteMany".into(),
            }],
            interfaces: vec![Interface {
                name: "default".into(),
                network: if v % 5 == 0 { "vlan-200" } else { "pod" }.into(),
                // Unique per VM, except a few on the source that clash with another cluster.
                mac: mac_of(if index == 0 && v % 500 == 9 { 1 } else { index }, v),
            }],
            labels,
            migratable,
            non_migratable_reasons: if migratable {
                vec![]
            } else {
                vec!["host device (vGPU)".into()]
            },
            generation: 1,
        });
        fleet_cluster.nodes[node].requested_memory_bytes += memory;
    }
    fleet_cluster
}

fn mac_of(cluster: usize, vm: usize) -> String {
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:00",
        cluster >> 8,
        cluster & 0xff,
        vm >> 8,
        vm & 0xff
    )
}

fn fleet(args: &Args, rng: &mut StdRng) -> Fleet {
    let mut clusters = Vec::with_capacity(args.clusters);
    // The source runs 20 VMs per node; the others 20 per node too.
    clusters.push(cluster(
        rng,
        0,
        args.source_vms,
        args.source_vms.div_ceil(20),
    ));
    for i in 1..args.clusters {
        clusters.push(cluster(
            rng,
            i,
            args.vms_per_cluster,
            args.vms_per_cluster.div_ceil(20),
        ));
    }
    for c in &mut clusters {
        c.info.migration_config.bandwidth_per_migration = args.bandwidth_per_migration_mib * MIB;
    }
    clusters[0]
        .info
        .migration_config
        .parallel_migrations_per_cluster = args.source_parallel;
    Fleet {
        clusters,
        reservations: Vec::new(),
        policies: vec![MigrationPolicy {
            name: "databases".into(),
            vm_selector: BTreeMap::from([("tier".to_owned(), "db".to_owned())]),
            namespace_selector: BTreeMap::new(),
            bandwidth_per_migration: Some(512 * MIB),
            completion_timeout_per_gib: Some(300),
            allow_auto_converge: Some(true),
            allow_post_copy: Some(false),
        }],
        last_moved: Default::default(),
    }
}

fn report_line(name: &str, r: &SimulationReport) {
    println!(
        "  {name:<16} makespan {:>9.0} s ({:.2} h)   lower bound {:>9.0} s   makespan/bound {:.3}   bottleneck busy {:.1} %   fleet cap busy {:.1} %   attempts {}   retried/gave up {}/{}   checks {}   violations {}",
        r.makespan_seconds,
        r.makespan_seconds / 3600.0,
        r.lower_bound.seconds,
        r.makespan_over_lower_bound,
        r.bottleneck_utilisation.busy_fraction * 100.0,
        r.fleet_slot_utilisation * 100.0,
        r.attempts,
        r.attempts - r.migrations,
        r.gave_up.len(),
        r.checks,
        r.violations.len()
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.clusters >= 2, "a fleet needs at least two clusters");
    ensure!(args.runs >= 1, "at least one planning run");
    let mut rng = StdRng::seed_from_u64(args.seed);
    let built = Instant::now();
    let fleet = fleet(&args, &mut rng);
    let vm_total: usize = fleet.clusters.iter().map(|c| c.vms.len()).sum();
    println!(
        "fleet: {} clusters, {} VMs ({} on {} to evacuate), built in {:.2} s",
        fleet.clusters.len(),
        vm_total,
        args.source_vms,
        fleet.clusters[0].name,
        built.elapsed().as_secs_f64()
    );

    let now: DateTime<Utc> = DateTime::parse_from_rfc3339("2026-11-28T02:00:00Z")
        .context("fixed instant")?
        .with_timezone(&Utc);
    let mut options = PlanOptions::new(Uuid::from_u128(0x5eed), now);
    options.limits = AdmissionLimits {
        max_in_flight: args.max_in_flight,
        max_attempts: 3,
        clusters: BTreeMap::new(),
        pair_bandwidth: PairBandwidth {
            default_bytes_per_sec: args.pair_budget_mib * MIB,
            pairs: Vec::new(),
        },
    };
    options.durations = DurationModel::default();
    let source = fleet.clusters[0].name.clone();

    let mut times = Vec::with_capacity(args.runs);
    let mut plan = None;
    for _ in 0..args.runs {
        let started = Instant::now();
        let p = plan_evacuation(&fleet, &source, &options);
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        plan = Some(p);
    }
    let plan = plan.context("at least one run")?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let targets: BTreeSet<&str> = plan
        .moves
        .iter()
        .map(|m| m.target_cluster.as_str())
        .collect();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for c in &plan.cannot_move {
        for r in &c.reasons {
            *reasons.entry(format!("{:?}", r.kind)).or_default() += 1;
        }
    }
    println!(
        "planning: median {median:.1} ms over {} runs (min {:.1}, max {:.1}), estimate included",
        args.runs,
        times[0],
        times[times.len() - 1]
    );
    println!(
        "plan: {} moves onto {} clusters, {} cannot move {:?}, {} with warnings; estimate {:.0} s (bound {:.0} s, {})",
        plan.moves.len(),
        targets.len(),
        plan.cannot_move.len(),
        reasons,
        plan.moves.iter().filter(|m| !m.warnings.is_empty()).count(),
        plan.estimate.seconds,
        plan.estimate.lower_bound_seconds,
        plan.estimate.bottleneck
    );
    if let Some(example) = plan.cannot_move.iter().find(|c| c.reasons.len() > 1) {
        println!("  e.g. {}: {}", example.vm, example.reasons[0]);
    }

    let limits = effective_limits(&fleet, &options);
    let settings = |dispatch| SimulationSettings {
        seed: args.seed,
        dispatch,
        durations: options.durations,
        duration_jitter: args.jitter,
        failure_probability: args.failure_probability,
        unsafe_failure_share: 0.1,
        keep_log: false,
        check_limits: true,
    };
    let started = Instant::now();
    let full = simulate_plan(&plan, &limits, &settings(Dispatch::KeepSlotsFull));
    let waves = simulate_plan(&plan, &limits, &settings(Dispatch::BatchWaves));
    println!(
        "virtual time (jitter ±{:.0} %, {:.0} % of attempts fail), simulated in {:.2} s:",
        args.jitter * 100.0,
        args.failure_probability * 100.0,
        started.elapsed().as_secs_f64()
    );
    report_line("keep slots full", &full);
    report_line("batch waves", &waves);
    println!("  binding limit: {}", full.lower_bound.binding);
    for u in &full.utilisation {
        println!("    {:<60} busy {:.1} %", u.limit, u.busy_fraction * 100.0);
    }
    println!(
        "result: planning {median:.1} ms (goal <= 100); makespan/lower bound {:.3} (goal <= 1.05); bottleneck slot utilisation {:.1} %; batch waves: makespan/lower bound {:.3}, {:.2}x the keep-slots-full makespan, bottleneck utilisation {:.1} %",
        full.makespan_over_lower_bound,
        full.bottleneck_utilisation.busy_fraction * 100.0,
        waves.makespan_over_lower_bound,
        waves.makespan_seconds / full.makespan_seconds,
        waves.bottleneck_utilisation.busy_fraction * 100.0
    );
    ensure!(
        full.violations.is_empty() && waves.violations.is_empty(),
        "a limit was broken: {:?} {:?}",
        full.violations.first(),
        waves.violations.first()
    );
    Ok(())
}
