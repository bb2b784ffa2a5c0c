//! Migration policies as stored: the `migration_policies` table read into [`MigrationPolicy`]
//! values (selectors decoded from JSON), written and deleted.

use std::collections::BTreeMap;

use sea_orm::{ActiveValue::Set, EntityTrait, QueryOrder};
use serde_json::json;

use crate::core::policy::MigrationPolicy;
use crate::store::entities::migration_policy;
use crate::store::{Store, StoreError};

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
        updated_at: Set(store.clock.now()),
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
