//! Migration mutations: `migrateVirtualMachine` (preflight, then one Migration driven by the hub
//! through both agents) and `cancelMigration`. Both answer with the Migration as it now is.

use std::sync::Arc;

use async_graphql::{Context, InputObject, Object, Result, ID};
use drover_shared::{ClusterName, Namespace, VmName};

use crate::admin::{FleetAdmin, MigrateRequest};
use crate::batch::{ClusterRefs, Reader};
use crate::error::ApiError;
use crate::schema::Migration;

#[derive(InputObject)]
pub struct MigrateVirtualMachineInput {
    /// Where the VM runs now.
    pub cluster: String,
    pub namespace: String,
    pub name: String,
    pub target_cluster: String,
    /// Defaults to the VM's namespace.
    pub target_namespace: Option<String>,
}

async fn migration(ctx: &Context<'_>, id: uuid::Uuid) -> Result<Migration> {
    let reader = ctx.data_unchecked::<Reader>();
    let m = reader
        .migrations_by_id(&[id])
        .await
        .map_err(ApiError::from)?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("migration {id} does not exist")))?;
    let clusters = Arc::new(ClusterRefs::new(
        reader.clone(),
        [m.source_cluster_id, m.target_cluster_id]
            .into_iter()
            .flatten(),
    ));
    Ok(Migration(m, clusters))
}

#[derive(Default)]
pub struct MigrationMutation;

#[Object]
impl MigrationMutation {
    /// Moves a running VM to another cluster without stopping it. Runs the preflight checks that
    /// apply to one VM (target Ready and not cordoned, same runtime and virtualization minor
    /// version, CPU model, capacity, MACs free, name free), then creates the Migration whose id
    /// both agents share and returns it; follow it with `migration(id)`.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Migrator)")]
    async fn migrate_virtual_machine(
        &self,
        ctx: &Context<'_>,
        input: MigrateVirtualMachineInput,
    ) -> Result<Migration> {
        let request = MigrateRequest {
            cluster: ClusterName::new(input.cluster).map_err(ApiError::from)?,
            namespace: Namespace::new(input.namespace.clone())
                .map_err(ApiError::from)?
                .to_string(),
            name: VmName::new(input.name).map_err(ApiError::from)?.to_string(),
            target_cluster: ClusterName::new(input.target_cluster).map_err(ApiError::from)?,
            target_namespace: Namespace::new(input.target_namespace.unwrap_or(input.namespace))
                .map_err(ApiError::from)?
                .to_string(),
        };
        let admin = ctx.data_unchecked::<Arc<dyn FleetAdmin>>();
        let id = admin
            .migrate_virtual_machine(request, &crate::access::actor(ctx))
            .await
            .map_err(ApiError::from)?;
        migration(ctx, id).await
    }

    /// Cancels a migration before switchover: the source keeps running and everything on the
    /// target (VM, volumes, endpoints) is removed. Refused once the migration has ended.
    #[graphql(guard = "crate::access::RoleGuard(crate::access::Role::Migrator)")]
    async fn cancel_migration(&self, ctx: &Context<'_>, id: ID) -> Result<Migration> {
        let id = uuid::Uuid::parse_str(&id).map_err(|_| {
            ApiError::bad_input(format!("id: {:?} is not a migration id", id.as_str()))
        })?;
        let admin = ctx.data_unchecked::<Arc<dyn FleetAdmin>>();
        admin
            .cancel_migration(id, &crate::access::actor(ctx))
            .await
            .map_err(ApiError::from)?;
        migration(ctx, id).await
    }
}
