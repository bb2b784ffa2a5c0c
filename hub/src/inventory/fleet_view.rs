//! The fleet as the planner sees it, read from the store: every cluster with its nodes and VMs,
//! the memory, MACs and names that queued and running migrations hold on their targets, the
//! migration policies, and when each VM last moved. Evacuations, rebalances and single moves all
//! plan over this one view.

use std::collections::{BTreeMap, HashMap};

use drover_shared::inventory::{
    ClusterHealth, ClusterInfo, MigrationPhase, NodeInfo, RunStrategy, RuntimeKind, VmInfo, VmPhase,
};
use drover_shared::{ClusterName, Namespace, VmName, VmRef};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use uuid::Uuid;

use crate::core::planner::{Fleet, FleetCluster, Reservation};
use crate::store::entities::{cluster, cluster_label, migration, node, vm, vm_label};
use crate::store::{Store, StoreError};

fn json_list(value: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(value.clone()).unwrap_or_default()
}

/// The fleet as the planner sees it: every cluster with its nodes and VMs, the memory, MACs and
/// names that queued and running migrations hold on their targets, the policies, and when each
/// VM last moved.
pub async fn load_fleet(store: &Store) -> Result<Fleet, StoreError> {
    let db = &store.db;
    let clusters = cluster::Entity::find()
        .order_by_asc(cluster::Column::Name)
        .all(db)
        .await?;
    let mut cluster_labels: HashMap<Uuid, BTreeMap<String, String>> = HashMap::new();
    for l in cluster_label::Entity::find().all(db).await? {
        cluster_labels
            .entry(l.cluster_id)
            .or_default()
            .insert(l.key, l.value);
    }
    let nodes = node::Entity::find().all(db).await?;
    let vms = vm::Entity::find().all(db).await?;
    let mut labels: HashMap<Uuid, BTreeMap<String, String>> = HashMap::new();
    for l in vm_label::Entity::find().all(db).await? {
        labels.entry(l.vm_id).or_default().insert(l.key, l.value);
    }
    let names: HashMap<Uuid, &str> = clusters.iter().map(|c| (c.id, c.name.as_str())).collect();
    let vm_info = |v: &vm::Model, labels: BTreeMap<String, String>| VmInfo {
        namespace: v.namespace.clone(),
        name: v.name.clone(),
        uid: v.uid.clone(),
        run_strategy: RunStrategy::parse(&v.run_strategy).unwrap_or(RunStrategy::Always),
        phase: VmPhase::parse(&v.phase).unwrap_or(VmPhase::Unknown),
        node: v.node_name.clone(),
        memory_bytes: v.memory_bytes.max(0) as u64,
        vcpus: v.vcpus.max(0) as u32,
        disks: serde_json::from_value(v.disks.clone()).unwrap_or_default(),
        interfaces: serde_json::from_value(v.interfaces.clone()).unwrap_or_default(),
        labels,
        migratable: v.migratable,
        non_migratable_reasons: json_list(&v.non_migratable_reasons),
        generation: v.generation.max(0) as u64,
    };
    let mut by_uid: HashMap<&str, (&vm::Model, BTreeMap<String, String>)> = HashMap::new();
    for v in &vms {
        by_uid.insert(
            v.uid.as_str(),
            (v, labels.get(&v.id).cloned().unwrap_or_default()),
        );
    }
    let mut fleet = Fleet::default();
    for c in &clusters {
        let Ok(name) = ClusterName::new(c.name.clone()) else {
            continue;
        };
        fleet.clusters.push(FleetCluster {
            name,
            health: ClusterHealth::parse(&c.health).unwrap_or(ClusterHealth::Unreachable),
            cordoned: c.maintenance,
            info: ClusterInfo {
                runtime: RuntimeKind::parse(&c.runtime).unwrap_or(RuntimeKind::Kubevirt),
                platform_version: c.platform_version.clone(),
                virtualization_version: c.virtualization_version.clone(),
                labels: cluster_labels.remove(&c.id).unwrap_or_default(),
                cpu_models: json_list(&c.cpu_models),
                feature_gates: json_list(&c.feature_gates),
                migration_config: serde_json::from_value(c.migration_config.clone())
                    .unwrap_or_default(),
                storage_classes: serde_json::from_value(c.storage_classes.clone())
                    .unwrap_or_default(),
                networks: json_list(&c.networks),
                sync_endpoint: c.sync_endpoint.clone().filter(|s| !s.is_empty()),
            },
            nodes: nodes
                .iter()
                .filter(|n| n.cluster_id == c.id)
                .map(|n| NodeInfo {
                    name: n.name.clone(),
                    cpu_model: n.cpu_model.clone(),
                    allocatable_memory_bytes: n.allocatable_memory_bytes.max(0) as u64,
                    allocatable_cpu_millis: n.allocatable_cpu_millis.max(0) as u64,
                    requested_memory_bytes: n.requested_memory_bytes.max(0) as u64,
                    requested_cpu_millis: n.requested_cpu_millis.max(0) as u64,
                    schedulable: n.schedulable,
                    labels: serde_json::from_value(n.labels.clone()).unwrap_or_default(),
                })
                .collect(),
            vms: vms
                .iter()
                .filter(|v| v.cluster_id == c.id)
                .map(|v| vm_info(v, labels.get(&v.id).cloned().unwrap_or_default()))
                .collect(),
            namespace_labels: BTreeMap::new(),
        });
    }
    for m in migration::Entity::find()
        .filter(
            migration::Column::Phase.is_in(MigrationPhase::NOT_ENDED.iter().map(|p| p.as_str())),
        )
        .all(db)
        .await?
    {
        let (Ok(source), Ok(target), Ok(namespace), Ok(name)) = (
            ClusterName::new(m.source_cluster_name.clone()),
            ClusterName::new(m.target_cluster_name.clone()),
            Namespace::new(m.vm_namespace.clone()),
            VmName::new(m.vm_name.clone()),
        ) else {
            continue;
        };
        let (memory, macs, labels) = match by_uid.get(m.vm_uid.as_str()) {
            Some((v, labels)) => (
                v.memory_bytes.max(0) as u64,
                vm_info(v, BTreeMap::new())
                    .interfaces
                    .into_iter()
                    .map(|i| i.mac)
                    .collect(),
                labels.clone(),
            ),
            None => (0, Vec::new(), BTreeMap::new()),
        };
        fleet.reservations.push(Reservation {
            migration_id: m.id,
            vm: VmRef {
                cluster: source,
                namespace,
                name,
            },
            target_cluster: target,
            target_node: None,
            target_namespace: m.target_namespace.clone(),
            memory_bytes: memory,
            macs,
            labels,
        });
    }
    fleet.policies = crate::store::policies::load(store).await?;
    for m in migration::Entity::find()
        .filter(migration::Column::Phase.eq(MigrationPhase::Succeeded.as_str()))
        .all(db)
        .await?
    {
        let (Some(at), Some(Ok(cluster)), Ok(namespace), Ok(name)) = (
            m.finished_at,
            m.target_cluster_id
                .and_then(|t| names.get(&t).map(|n| ClusterName::new(n.to_string()))),
            Namespace::new(m.target_namespace.clone()),
            VmName::new(m.vm_name.clone()),
        ) else {
            continue;
        };
        let key = VmRef {
            cluster,
            namespace,
            name,
        };
        let e = fleet.last_moved.entry(key).or_insert(at);
        *e = (*e).max(at);
    }
    Ok(fleet)
}
