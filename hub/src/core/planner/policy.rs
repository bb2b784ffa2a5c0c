//! Migration policies as the planner applies them (issue 5 §5, the seeds' MigrationPolicy): a
//! policy's VM selector and namespace selector must both match entirely; among the policies that
//! match, the one whose selectors name the most labels wins, and a tie goes to the policy whose
//! name sorts first. What the winner leaves unset comes from the source cluster's migration
//! configuration. The rules live in [`crate::core::policy`] (the store keeps the policies); this
//! module applies them to a VM as the inventory reports it.

use std::collections::BTreeMap;

use drover_shared::inventory::{MigrationConfig, VmInfo};
use drover_shared::migration::MigrationOptions;

use super::FleetCluster;
use crate::core::policy::{self as policies, MigrationPolicy};

/// The policy that applies to `vm` in a namespace labelled `namespace_labels`, if any.
pub fn policy_for<'a>(
    vm: &VmInfo,
    namespace_labels: &BTreeMap<String, String>,
    policies: &'a [MigrationPolicy],
) -> Option<&'a MigrationPolicy> {
    policies::policy_for(&vm.labels, namespace_labels, policies)
}

/// The options `vm` migrates with, and the name of the policy that set them.
pub fn options_for(
    vm: &VmInfo,
    namespace_labels: &BTreeMap<String, String>,
    policies: &[MigrationPolicy],
    source: &MigrationConfig,
) -> (MigrationOptions, Option<String>) {
    let name = policy_for(vm, namespace_labels, policies).map(|p| p.name.clone());
    let options = policies::options_for(&vm.labels, namespace_labels, policies, source);
    (options, name)
}

/// The labels of `namespace` on `cluster`: what the inventory knows, always with the namespace's
/// own name label.
pub fn namespace_labels_of(cluster: &FleetCluster, namespace: &str) -> BTreeMap<String, String> {
    let mut labels = policies::namespace_labels(namespace);
    if let Some(known) = cluster.namespace_labels.get(namespace) {
        labels.extend(known.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::inventory::{RunStrategy, VmPhase};

    fn vm(labels: &[(&str, &str)]) -> VmInfo {
        VmInfo {
            namespace: "pay".into(),
            name: "db".into(),
            uid: "u".into(),
            run_strategy: RunStrategy::Always,
            phase: VmPhase::Running,
            node: None,
            memory_bytes: 1 << 30,
            vcpus: 1,
            disks: vec![],
            interfaces: vec![],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            migratable: true,
            non_migratable_reasons: vec![],
            generation: 1,
        }
    }

    fn policy(name: &str, vm: &[(&str, &str)], ns: &[(&str, &str)]) -> MigrationPolicy {
        let map = |l: &[(&str, &str)]| {
            l.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        MigrationPolicy {
            name: name.into(),
            vm_selector: map(vm),
            namespace_selector: map(ns),
            bandwidth_per_migration: Some(64 << 20),
            completion_timeout_per_gib: Some(300),
            allow_auto_converge: Some(true),
            allow_post_copy: None,
        }
    }

    #[test]
    fn namespace_labels_count_and_the_policy_name_is_reported() {
        let policies = vec![
            policy("z-vm", &[("tier", "db")], &[]),
            policy("a-both", &[("tier", "db")], &[("hpc-workload", "true")]),
        ];
        let cluster = FleetCluster {
            name: drover_shared::ClusterName::new("east").unwrap(),
            health: drover_shared::inventory::ClusterHealth::Ready,
            cordoned: false,
            info: serde_json::from_value(serde_json::json!({
                "runtime": "qemu", "platformVersion": "1.0", "virtualizationVersion": "1.0"
            }))
            .unwrap(),
            nodes: vec![],
            vms: vec![],
            namespace_labels: BTreeMap::from([(
                "pay".to_owned(),
                BTreeMap::from([("hpc-workload".to_owned(), "true".to_owned())]),
            )]),
        };
        let labels = namespace_labels_of(&cluster, "pay");
        assert_eq!(
            labels
                .get("kubernetes.io/metadata.name")
                .map(String::as_str),
            Some("pay")
        );
        let config = MigrationConfig::default();
        let (options, name) = options_for(&vm(&[("tier", "db")]), &labels, &policies, &config);
        assert_eq!(name.as_deref(), Some("a-both"));
        assert_eq!(options.bandwidth_bytes_per_sec, 64 << 20);
        assert!(options.allow_auto_converge && !options.allow_post_copy);
        let (options, name) = options_for(&vm(&[]), &labels, &policies, &config);
        assert_eq!(name, None);
        assert_eq!(options.bandwidth_bytes_per_sec, 0);
    }
}
