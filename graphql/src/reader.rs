//! The trait through which the API reads the fleet. The hub implements it over its store; every
//! method is shaped for batching so that a request costs a bounded number of queries however
//! many results it returns.

use std::collections::HashMap;

use async_trait::async_trait;
use uuid::Uuid;

use crate::model::*;

/// Why a read failed, as far as the API needs to know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The database cannot be reached now (connection refused, pool timed out, ...).
    #[error("inventory database unavailable: {0}")]
    Unavailable(String),
    #[error("inventory read failed: {0}")]
    Internal(String),
}

#[async_trait]
pub trait FleetReader: Send + Sync + 'static {
    async fn fleet_summary(&self) -> Result<FleetSummary, ReadError>;

    /// Clusters ordered by name; the cursor is `[name]`.
    async fn clusters(
        &self,
        filter: &ClusterFilter,
        page: &PageRequest,
    ) -> Result<Page<ClusterRecord>, ReadError>;
    async fn count_clusters(&self, filter: &ClusterFilter) -> Result<i64, ReadError>;
    async fn clusters_by_name(&self, names: &[String]) -> Result<Vec<ClusterRecord>, ReadError>;
    async fn clusters_by_id(&self, ids: &[Uuid]) -> Result<Vec<ClusterRecord>, ReadError>;
    /// `(cluster id, key, value)` for every label of these clusters.
    async fn cluster_labels(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, String, String)>, ReadError>;
    async fn nodes_of_clusters(&self, ids: &[Uuid]) -> Result<Vec<NodeRecord>, ReadError>;
    async fn capacity_of_clusters(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Capacity>, ReadError>;

    /// Virtual machines across clusters ordered by cluster name, namespace, name; the cursor is
    /// `[cluster, namespace, name]`.
    async fn vms(&self, filter: &VmFilter, page: &PageRequest)
        -> Result<Page<VmRecord>, ReadError>;
    async fn count_vms(&self, filter: &VmFilter) -> Result<i64, ReadError>;
    /// One page per cluster, ordered by namespace, name; the cursor is `[namespace, name]`.
    /// `filter.cluster_id` is ignored.
    async fn vms_of_clusters(
        &self,
        cluster_ids: &[Uuid],
        filter: &VmFilter,
        page: &PageRequest,
    ) -> Result<HashMap<Uuid, Page<VmRecord>>, ReadError>;
    async fn count_vms_of_clusters(
        &self,
        cluster_ids: &[Uuid],
        filter: &VmFilter,
    ) -> Result<HashMap<Uuid, i64>, ReadError>;
    async fn vm_by_ref(
        &self,
        cluster_id: Uuid,
        namespace: &str,
        name: &str,
    ) -> Result<Option<VmRecord>, ReadError>;
    /// `(vm id, key, value)` for every label of these virtual machines.
    async fn vm_labels(&self, vm_ids: &[Uuid]) -> Result<Vec<(Uuid, String, String)>, ReadError>;

    /// Migrations, newest first; the cursor is `[id]`.
    async fn migrations(
        &self,
        filter: &MigrationFilter,
        page: &PageRequest,
    ) -> Result<Page<MigrationRecord>, ReadError>;
    async fn migrations_by_id(&self, ids: &[Uuid]) -> Result<Vec<MigrationRecord>, ReadError>;
}
