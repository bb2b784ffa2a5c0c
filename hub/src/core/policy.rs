//! Migration policies (as KubeVirt's MigrationPolicy): label selectors on the VM and on its
//! namespace choose a VM's bandwidth, completion timeout, auto-converge and post-copy. The
//! policy whose selectors match the most labels wins, ties go to the name that sorts first; what
//! a policy leaves unset comes from the source cluster's migration configuration.

use std::collections::BTreeMap;

use drover_shared::inventory::MigrationConfig;
use drover_shared::migration::MigrationOptions;

/// The label every Kubernetes namespace carries with its own name; a namespace selector can
/// always match on it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A policy as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationPolicy {
    pub name: String,
    /// Labels the VM must carry (all of them).
    pub vm_selector: BTreeMap<String, String>,
    /// Labels the VM's namespace must carry (all of them).
    pub namespace_selector: BTreeMap<String, String>,
    pub bandwidth_per_migration: Option<u64>,
    pub completion_timeout_per_gib: Option<u32>,
    pub allow_auto_converge: Option<bool>,
    pub allow_post_copy: Option<bool>,
}

/// The policy for a VM: among those whose selectors all match, the one matching the most
/// labels; ties go to the first name. A policy with empty selectors matches every VM with
/// zero labels.
pub fn policy_for<'a>(
    vm_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
    policies: &'a [MigrationPolicy],
) -> Option<&'a MigrationPolicy> {
    let matches = |selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>| {
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    policies
        .iter()
        .filter(|p| {
            matches(&p.vm_selector, vm_labels) && matches(&p.namespace_selector, namespace_labels)
        })
        .min_by(|a, b| {
            let score = |p: &MigrationPolicy| p.vm_selector.len() + p.namespace_selector.len();
            score(b).cmp(&score(a)).then_with(|| a.name.cmp(&b.name))
        })
}

/// The options a VM migrates with: its policy's settings over the source cluster's defaults.
pub fn options_for(
    vm_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
    policies: &[MigrationPolicy],
    cluster: &MigrationConfig,
) -> MigrationOptions {
    let policy = policy_for(vm_labels, namespace_labels, policies);
    MigrationOptions {
        bandwidth_bytes_per_sec: policy
            .and_then(|p| p.bandwidth_per_migration)
            .unwrap_or(cluster.bandwidth_per_migration),
        allow_auto_converge: policy
            .and_then(|p| p.allow_auto_converge)
            .unwrap_or(cluster.allow_auto_converge),
        allow_post_copy: policy
            .and_then(|p| p.allow_post_copy)
            .unwrap_or(cluster.allow_post_copy),
        completion_timeout_per_gib: policy
            .and_then(|p| p.completion_timeout_per_gib)
            .unwrap_or(cluster.completion_timeout_per_gib),
        progress_timeout_secs: cluster.progress_timeout,
    }
}

/// The labels a namespace is known to carry (its name label; the inventory reports no others).
pub fn namespace_labels(namespace: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned())])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, vm: &[(&str, &str)], ns: &[(&str, &str)], bw: u64) -> MigrationPolicy {
        let map = |l: &[(&str, &str)]| {
            l.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        MigrationPolicy {
            name: name.into(),
            vm_selector: map(vm),
            namespace_selector: map(ns),
            bandwidth_per_migration: Some(bw),
            completion_timeout_per_gib: None,
            allow_auto_converge: None,
            allow_post_copy: Some(true),
        }
    }

    #[test]
    fn the_policy_matching_most_labels_wins_and_ties_go_by_name() {
        let policies = vec![
            policy("b-any", &[], &[], 1),
            policy("a-prod", &[("env", "prod")], &[], 2),
            policy("c-prod-db", &[("env", "prod"), ("tier", "db")], &[], 3),
            policy(
                "b-prod-ns",
                &[("env", "prod")],
                &[(NAMESPACE_NAME_LABEL, "pay")],
                4,
            ),
            policy(
                "a-prod-ns",
                &[("env", "prod")],
                &[(NAMESPACE_NAME_LABEL, "pay")],
                5,
            ),
        ];
        let vm = |l: &[(&str, &str)]| -> BTreeMap<String, String> {
            l.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ns = namespace_labels("web");
        let chosen = |labels, ns| policy_for(&labels, &ns, &policies).map(|p| p.name.as_str());
        assert_eq!(chosen(vm(&[]), ns.clone()), Some("b-any"));
        assert_eq!(chosen(vm(&[("env", "prod")]), ns.clone()), Some("a-prod"));
        assert_eq!(
            chosen(vm(&[("env", "prod"), ("tier", "db")]), ns.clone()),
            Some("c-prod-db")
        );
        // Two labels each (one on the VM, one on the namespace): the first name wins.
        assert_eq!(
            chosen(vm(&[("env", "prod")]), namespace_labels("pay")),
            Some("a-prod-ns")
        );
        assert_eq!(policy_for(&vm(&[]), &ns, &policies[1..2]), None);
    }

    #[test]
    fn a_policy_overrides_only_what_it_sets() {
        let cluster = MigrationConfig {
            bandwidth_per_migration: 10,
            completion_timeout_per_gib: 99,
            allow_auto_converge: true,
            ..MigrationConfig::default()
        };
        let policies = vec![policy("p", &[("env", "prod")], &[], 64)];
        let prod = BTreeMap::from([("env".to_owned(), "prod".to_owned())]);
        let o = options_for(&prod, &BTreeMap::new(), &policies, &cluster);
        assert_eq!(o.bandwidth_bytes_per_sec, 64);
        assert!(o.allow_post_copy && o.allow_auto_converge);
        assert_eq!(o.completion_timeout_per_gib, 99);
        let o = options_for(&BTreeMap::new(), &BTreeMap::new(), &policies, &cluster);
        assert_eq!(o.bandwidth_bytes_per_sec, 10);
        assert!(!o.allow_post_copy);
    }
}
