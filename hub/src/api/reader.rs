//! The hub's side of the GraphQL API: [`FleetReader`] over the inventory store. Each method is
//! one SQL statement (the fleet summary a few), whatever the number of rows, so a request's cost
//! does not grow with its results. The queries are [`FleetRows`]'; this maps their rows onto the
//! API's records.

use std::collections::HashMap;

use async_trait::async_trait;
use drover_graphql::model::*;
use drover_graphql::{FleetReader, ReadError};
use uuid::Uuid;

use crate::store::fleet::{FleetRows, NodeTotals, ReadFailure};
use crate::store::Store;

#[derive(Clone)]
pub struct StoreReader {
    rows: FleetRows,
}

impl StoreReader {
    pub fn new(store: Store) -> Self {
        Self {
            rows: FleetRows::new(store),
        }
    }
}

fn read_err(e: ReadFailure) -> ReadError {
    match e {
        ReadFailure::Unavailable(m) => ReadError::Unavailable(m),
        ReadFailure::Internal(m) => ReadError::Internal(m),
    }
}

fn capacity(t: NodeTotals) -> Capacity {
    Capacity {
        nodes: t.nodes,
        allocatable_memory_bytes: t.allocatable_memory_bytes,
        requested_memory_bytes: t.requested_memory_bytes,
        allocatable_cpu_millis: t.allocatable_cpu_millis,
        requested_cpu_millis: t.requested_cpu_millis,
    }
}

#[async_trait]
impl FleetReader for StoreReader {
    async fn fleet_summary(&self) -> Result<FleetSummary, ReadError> {
        let rows = self.rows.summary().await.map_err(read_err)?;
        let mut summary = FleetSummary::default();
        for (health, n, cordoned) in rows.clusters_by_health {
            summary.clusters_by_health.push((health, n));
            summary.clusters_in_maintenance += cordoned;
        }
        for p in rows.vms_by_phase {
            summary.vms_by_phase.push((p.phase, p.vms));
            summary.vm_memory_bytes += p.memory_bytes;
            summary.vm_vcpus += p.vcpus;
            summary.vms_not_migratable += p.not_migratable;
        }
        if let Some(totals) = rows.capacity {
            summary.capacity = capacity(totals);
        }
        if let Some(n) = rows.migrations_in_flight {
            summary.migrations_in_flight = n;
        }
        Ok(summary)
    }

    async fn clusters(
        &self,
        filter: &ClusterFilter,
        page: &PageRequest,
    ) -> Result<Page<ClusterRecord>, ReadError> {
        let rows = self.rows.clusters(filter, page).await.map_err(read_err)?;
        Ok(Page::from_overfetch(rows, page.first))
    }

    async fn count_clusters(&self, filter: &ClusterFilter) -> Result<i64, ReadError> {
        self.rows.count_clusters(filter).await.map_err(read_err)
    }

    async fn clusters_by_name(&self, names: &[String]) -> Result<Vec<ClusterRecord>, ReadError> {
        Ok(self
            .rows
            .clusters_by_name(names)
            .await
            .map_err(read_err)?
            .into_iter()
            .collect())
    }

    async fn clusters_by_id(&self, ids: &[Uuid]) -> Result<Vec<ClusterRecord>, ReadError> {
        Ok(self
            .rows
            .clusters_by_id(ids)
            .await
            .map_err(read_err)?
            .into_iter()
            .collect())
    }

    async fn cluster_labels(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, String, String)>, ReadError> {
        self.rows.cluster_labels(ids).await.map_err(read_err)
    }

    async fn nodes_of_clusters(&self, ids: &[Uuid]) -> Result<Vec<NodeRecord>, ReadError> {
        Ok(self
            .rows
            .nodes_of_clusters(ids)
            .await
            .map_err(read_err)?
            .into_iter()
            .collect())
    }

    async fn capacity_of_clusters(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Capacity>, ReadError> {
        Ok(self
            .rows
            .capacity_of_clusters(ids)
            .await
            .map_err(read_err)?
            .into_iter()
            .map(|(id, totals)| (id, capacity(totals)))
            .collect())
    }

    async fn vms(
        &self,
        filter: &VmFilter,
        page: &PageRequest,
    ) -> Result<Page<VmRecord>, ReadError> {
        let rows = self.rows.vms(filter, page).await.map_err(read_err)?;
        Ok(Page::from_overfetch(rows, page.first))
    }

    async fn count_vms(&self, filter: &VmFilter) -> Result<i64, ReadError> {
        self.rows.count_vms(filter).await.map_err(read_err)
    }

    async fn vms_of_clusters(
        &self,
        cluster_ids: &[Uuid],
        filter: &VmFilter,
        page: &PageRequest,
    ) -> Result<HashMap<Uuid, Page<VmRecord>>, ReadError> {
        let rows = self
            .rows
            .vms_of_clusters(cluster_ids, filter, page)
            .await
            .map_err(read_err)?;
        let mut grouped: HashMap<Uuid, Vec<VmRecord>> = HashMap::new();
        for v in rows {
            grouped.entry(v.cluster_id).or_default().push(v);
        }
        Ok(grouped
            .into_iter()
            .map(|(id, rows)| (id, Page::from_overfetch(rows, page.first)))
            .collect())
    }

    async fn count_vms_of_clusters(
        &self,
        cluster_ids: &[Uuid],
        filter: &VmFilter,
    ) -> Result<HashMap<Uuid, i64>, ReadError> {
        Ok(self
            .rows
            .count_vms_of_clusters(cluster_ids, filter)
            .await
            .map_err(read_err)?
            .into_iter()
            .collect())
    }

    async fn vm_by_ref(
        &self,
        cluster_id: Uuid,
        namespace: &str,
        name: &str,
    ) -> Result<Option<VmRecord>, ReadError> {
        self.rows
            .vm_by_ref(cluster_id, namespace, name)
            .await
            .map_err(read_err)
    }

    async fn vm_labels(&self, vm_ids: &[Uuid]) -> Result<Vec<(Uuid, String, String)>, ReadError> {
        self.rows.vm_labels(vm_ids).await.map_err(read_err)
    }

    async fn migrations(
        &self,
        filter: &MigrationFilter,
        page: &PageRequest,
    ) -> Result<Page<MigrationRecord>, ReadError> {
        let rows = self.rows.migrations(filter, page).await.map_err(read_err)?;
        Ok(Page::from_overfetch(rows, page.first))
    }

    async fn migrations_by_id(&self, ids: &[Uuid]) -> Result<Vec<MigrationRecord>, ReadError> {
        Ok(self
            .rows
            .migrations_by_id(ids)
            .await
            .map_err(read_err)?
            .into_iter()
            .collect())
    }
}
