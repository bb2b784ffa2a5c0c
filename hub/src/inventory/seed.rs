//! `drover-hub seed`: a realistic synthetic fleet (varied sizes, labels, versions, CPU models,
//! health, some unmovable VMs), loaded through the same ingest path agents use.

use std::collections::BTreeMap;

use chrono::Utc;
use drover_shared::inventory::*;
use drover_shared::ClusterName;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use crate::inventory::ingest::{Ingest, IngestError};

const GIB: u64 = 1 << 30;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    pub clusters: usize,
    pub vms_per_cluster: usize,
    /// The same seed gives the same fleet.
    pub seed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedReport {
    pub clusters: usize,
    pub nodes: usize,
    pub vms: usize,
    pub not_migratable: usize,
    pub degraded: usize,
    pub unreachable: usize,
    pub in_maintenance: usize,
}

const REGIONS: &[&str] = &["eu-west", "eu-central", "us-east", "us-west", "ap-south"];
const PLATFORMS: &[(&str, &str)] = &[
    ("4.18.9", "1.4.2"),
    ("4.19.4", "1.5.1"),
    ("4.20.3", "1.6.0"),
    ("4.20.5", "1.6.0"),
];
const CPU_MODELS: &[&[&str]] = &[
    &["Skylake-Server", "Cascadelake-Server"],
    &["Cascadelake-Server", "Icelake-Server"],
    &["Icelake-Server", "SapphireRapids"],
    &["EPYC-Rome", "EPYC-Milan"],
];
const NAMESPACES: &[&str] = &["payments", "web", "ci", "analytics", "identity", "default"];
const APPS: &[&str] = &["api", "db", "cache", "worker", "frontend", "queue", "batch"];
const TIERS: &[&str] = &["gold", "silver", "bronze"];
const PINNED_REASONS: &[&str] = &[
    "HostDevice: GPU passthrough (nvidia.com/GA102GL_A10)",
    "ShareableDisk: disk \"shared-data\" is shareable",
    "LUN: disk \"san-lun\" is a LUN",
    "Virtiofs: filesystem \"config\" is shared with virtiofs",
];

/// Builds cluster `index`'s snapshot; MACs are unique across the whole fleet.
pub fn cluster_snapshot(
    rng: &mut StdRng,
    index: usize,
    vms_per_cluster: usize,
    generation: u64,
) -> InventorySnapshot {
    let region = REGIONS[index % REGIONS.len()];
    let (platform, virt) = *PLATFORMS.choose(rng).unwrap_or(&PLATFORMS[0]);
    let cpus = *CPU_MODELS.choose(rng).unwrap_or(&CPU_MODELS[0]);
    let name = format!("{region}-{index:04}");
    let node_count = vms_per_cluster.div_ceil(25).max(2);
    let nodes: Vec<NodeInfo> = (0..node_count)
        .map(|n| {
            let mem_gib = *[256u64, 384, 512, 768, 1024].choose(rng).unwrap_or(&512);
            let cores = *[32u64, 48, 64, 96, 128].choose(rng).unwrap_or(&64);
            NodeInfo {
                name: format!("worker-{n:03}"),
                cpu_model: cpus[n % cpus.len()].to_string(),
                allocatable_memory_bytes: mem_gib * GIB,
                allocatable_cpu_millis: cores * 1000,
                requested_memory_bytes: 0,
                requested_cpu_millis: 0,
                schedulable: rng.random_bool(0.97),
                labels: BTreeMap::from([
                    (
                        "kubernetes.io/hostname".to_string(),
                        format!("worker-{n:03}"),
                    ),
                    (
                        "topology.kubernetes.io/zone".to_string(),
                        format!("{region}-{}", n % 3),
                    ),
                ]),
            }
        })
        .collect();
    let mut nodes = nodes;
    let mut vms = Vec::with_capacity(vms_per_cluster);
    for v in 0..vms_per_cluster {
        let namespace = *NAMESPACES.choose(rng).unwrap_or(&"default");
        let app = *APPS.choose(rng).unwrap_or(&"api");
        let memory = *[1u64, 2, 2, 4, 4, 8, 8, 16, 32].choose(rng).unwrap_or(&4) * GIB;
        let vcpus = *[1u32, 2, 2, 4, 4, 8, 16].choose(rng).unwrap_or(&2);
        let phase_roll: f64 = rng.random();
        let phase = if phase_roll < 0.88 {
            VmPhase::Running
        } else if phase_roll < 0.97 {
            VmPhase::Stopped
        } else if phase_roll < 0.99 {
            VmPhase::Paused
        } else {
            VmPhase::Failed
        };
        let node = (phase != VmPhase::Stopped).then(|| {
            let n = rng.random_range(0..nodes.len());
            nodes[n].requested_memory_bytes += memory;
            nodes[n].requested_cpu_millis += vcpus as u64 * 1000;
            nodes[n].name.clone()
        });
        let pinned = rng.random_bool(0.05);
        let mut disks = vec![Disk {
            name: "rootdisk".into(),
            size_bytes: *[20u64, 30, 50, 100].choose(rng).unwrap_or(&30) * GIB,
            storage_class: "ceph-rbd".into(),
            access_mode: "ReadWriteMany".into(),
        }];
        if rng.random_bool(0.4) {
            disks.push(Disk {
                name: "data".into(),
                size_bytes: *[100u64, 200, 500].choose(rng).unwrap_or(&100) * GIB,
                storage_class: "ceph-rbd".into(),
                access_mode: "ReadWriteMany".into(),
            });
        }
        let nic_count = if rng.random_bool(0.2) { 2 } else { 1 };
        let interfaces = (0..nic_count)
            .map(|nic| Interface {
                name: if nic == 0 {
                    "default".into()
                } else {
                    format!("net{nic}")
                },
                network: if nic == 0 {
                    "pod".into()
                } else {
                    "vlan-100".into()
                },
                // 02: locally administered; cluster, VM and NIC make it unique fleet-wide.
                mac: format!(
                    "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    (index >> 8) & 0xff,
                    index & 0xff,
                    (v >> 8) & 0xff,
                    v & 0xff,
                    nic
                ),
            })
            .collect();
        let mut labels = BTreeMap::from([
            ("app".to_string(), app.to_string()),
            (
                "tier".to_string(),
                TIERS.choose(rng).unwrap_or(&"gold").to_string(),
            ),
            ("team".to_string(), namespace.to_string()),
            (
                "app.kubernetes.io/part-of".to_string(),
                format!("{namespace}-{app}"),
            ),
        ]);
        if rng.random_bool(0.1) {
            labels.insert("drover.io/anti-affinity".into(), format!("{app}-ha"));
        }
        vms.push(VmInfo {
            namespace: namespace.into(),
            name: format!("{app}-{v:05}"),
            uid: uuid::Uuid::new_v4().to_string(),
            run_strategy: if phase == VmPhase::Stopped {
                RunStrategy::Halted
            } else {
                RunStrategy::Always
            },
            phase,
            node,
            memory_bytes: memory,
            vcpus,
            disks,
            interfaces,
            labels,
            migratable: !pinned,
            non_migratable_reasons: if pinned {
                vec![PINNED_REASONS
                    .choose(rng)
                    .unwrap_or(&PINNED_REASONS[0])
                    .to_string()]
            } else {
                vec![]
            },
            generation: rng.random_range(1..20),
        });
    }
    let runtime = if index % 10 == 9 {
        RuntimeKind::Qemu
    } else {
        RuntimeKind::Kubevirt
    };
    InventorySnapshot {
        cluster: ClusterName::new(name.clone()).expect("generated names are DNS-1123 labels"),
        generation,
        info: ClusterInfo {
            runtime,
            platform_version: platform.into(),
            virtualization_version: virt.into(),
            labels: BTreeMap::from([
                ("region".to_string(), region.to_string()),
                (
                    "env".to_string(),
                    if index % 4 == 0 { "staging" } else { "prod" }.to_string(),
                ),
                ("tier".to_string(), TIERS[index % TIERS.len()].to_string()),
            ]),
            cpu_models: cpus.iter().map(|c| c.to_string()).collect(),
            feature_gates: if rng.random_bool(0.9) {
                vec!["DecentralizedLiveMigration".into(), "LiveMigration".into()]
            } else {
                vec!["LiveMigration".into()]
            },
            migration_config: MigrationConfig {
                bandwidth_per_migration: if rng.random_bool(0.3) { 64 << 20 } else { 0 },
                ..MigrationConfig::default()
            },
            storage_classes: vec![StorageClass {
                name: "ceph-rbd".into(),
                provisioner: "rbd.csi.ceph.com".into(),
                is_default: true,
            }],
            networks: vec!["pod".into(), "vlan-100".into()],
            sync_endpoint: Some(format!("https://sync.{name}.example.internal:9443")),
        },
        nodes,
        vms,
    }
}

/// Seeds the fleet through `ingest`, calling `progress(done)` after each cluster.
pub async fn seed(
    ingest: &Ingest,
    plan: &SeedPlan,
    mut progress: impl FnMut(usize),
) -> Result<SeedReport, IngestError> {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    // Microseconds since the epoch (a version number, not a time of the fleet): newer than
    // whatever an earlier seed wrote.
    let generation = Utc::now().timestamp_micros().max(1) as u64;
    let mut report = SeedReport::default();
    for index in 0..plan.clusters {
        let snap = cluster_snapshot(&mut rng, index, plan.vms_per_cluster, generation);
        report.clusters += 1;
        report.nodes += snap.nodes.len();
        report.vms += snap.vms.len();
        report.not_migratable += snap.vms.iter().filter(|v| !v.migratable).count();
        ingest.apply_snapshot(&snap).await?;
        let health = match rng.random_range(0..100) {
            0..=2 => ClusterHealth::Degraded,
            3 => ClusterHealth::Unreachable,
            _ => ClusterHealth::Ready,
        };
        match health {
            ClusterHealth::Degraded => report.degraded += 1,
            ClusterHealth::Unreachable => report.unreachable += 1,
            ClusterHealth::Ready => {}
        }
        ingest
            .set_cluster_health(snap.cluster.as_str(), health)
            .await?;
        let cordon = rng.random_bool(0.02);
        if cordon {
            report.in_maintenance += 1;
        }
        crate::store::inventory::set_maintenance(
            ingest.store(),
            snap.cluster.as_str(),
            cordon,
            cordon.then(|| ingest.store().clock.now()),
        )
        .await?;
        progress(index + 1);
    }
    Ok(report)
}
