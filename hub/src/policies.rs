//! Migration policies (as KubeVirt's MigrationPolicy): label selectors on the VM and on its
//! namespace choose a VM's bandwidth, completion timeout, auto-converge and post-copy. The
//! policy whose selectors match the most labels wins, ties go to the name that sorts first; what
//! a policy leaves unset comes from the source cluster's migration configuration.

use std::collections::BTreeMap;

use chrono::Utc;
use drover_shared::inventory::MigrationConfig;
use drover_shared::migration::MigrationOptions;
use sea_orm::{ActiveValue::Set, EntityTrait, QueryOrder};
use serde_json::json;

use crate::store::entities::migration_policy;
use crate::store::{Store, StoreError};

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

fn labels(value: &serde_json::Value) -> BTreeMap<String, String> {
    serde_json::from_value(value.clone()).unwrap_or_default()
}

/// Every stored policy, by name.
pub async fn load(store: &Store) -> Result<Vec<MigrationPolicy>, StoreError> {
    Ok(migration_policy::Entity::find()
        .order_by_asc(migration_policy::Column::Name)
        .all(&store.db)
        .await?
        .into_iter()
        .map(|p| MigrationPolicy {
            vm_selector: labels(&p.vm_selector),
            namespace_selector: labels(&p.namespace_selector),
            bandwidth_per_migration: p.bandwidth_per_migration.map(|b| b.max(0) as u64),
            completion_timeout_per_gib: p.completion_timeout_per_gib.map(|t| t.max(0) as u32),
            allow_auto_converge: p.allow_auto_converge,
            allow_post_copy: p.allow_post_copy,
            name: p.name,
        })
        .collect())
}

/// Creates or replaces a policy.
pub async fn save(store: &Store, policy: &MigrationPolicy) -> Result<(), StoreError> {
    let row = migration_policy::ActiveModel {
        name: Set(policy.name.clone()),
        vm_selector: Set(json!(policy.vm_selector)),
        namespace_selector: Set(json!(policy.namespace_selector)),
        bandwidth_per_migration: Set(policy
            .bandwidth_per_migration
            .map(|b| b.min(i64::MAX as u64) as i64)),
        completion_timeout_per_gib: Set(policy.completion_timeout_per_gib.map(|t| t as i32)),
        allow_auto_converge: Set(policy.allow_auto_converge),
        allow_post_copy: Set(policy.allow_post_copy),
        updated_at: Set(Utc::now()),
    };
    migration_policy::Entity::insert(row)
        .on_conflict(
            sea_orm::sea_query::OnConflict::column(migration_policy::Column::Name)
                .update_columns([
                    migration_policy::Column::VmSelector,
                    migration_policy::Column::NamespaceSelector,
                    migration_policy::Column::BandwidthPerMigration,
                    migration_policy::Column::CompletionTimeoutPerGib,
                    migration_policy::Column::AllowAutoConverge,
                    migration_policy::Column::AllowPostCopy,
                    migration_policy::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec(&store.db)
        .await?;
    Ok(())
}

/// Deletes a policy; false when there was none of that name.
pub async fn delete(store: &Store, name: &str) -> Result<bool, StoreError> {
    Ok(migration_policy::Entity::delete_by_id(name.to_owned())
        .exec(&store.db)
        .await?
        .rows_affected
        > 0)
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
