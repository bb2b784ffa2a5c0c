//! DataLoaders: every relation in the schema loads through one of these, so that N parents cost
//! one query per relation instead of N.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_graphql::dataloader::{DataLoader, Loader};
use uuid::Uuid;

use crate::error::ApiError;
use crate::model::*;
use crate::reader::FleetReader;

pub type Reader = Arc<dyn FleetReader>;

/// All loaders of the schema, shared by its requests (no caching, batching only).
pub struct Loaders {
    pub cluster_by_id: DataLoader<ClusterById>,
    pub cluster_labels: DataLoader<ClusterLabels>,
    pub nodes: DataLoader<NodesOfCluster>,
    pub capacity: DataLoader<CapacityOfCluster>,
    pub vm_pages: DataLoader<VmPagesOfCluster>,
    pub vm_counts: DataLoader<VmCountsOfCluster>,
    pub vm_labels: DataLoader<VmLabels>,
}

impl Loaders {
    pub fn new(reader: Reader) -> Self {
        let spawn = |f| tokio::spawn(f);
        Self {
            cluster_by_id: DataLoader::new(ClusterById(reader.clone()), spawn),
            cluster_labels: DataLoader::new(ClusterLabels(reader.clone()), spawn),
            nodes: DataLoader::new(NodesOfCluster(reader.clone()), spawn),
            capacity: DataLoader::new(CapacityOfCluster(reader.clone()), spawn),
            vm_pages: DataLoader::new(VmPagesOfCluster(reader.clone()), spawn),
            vm_counts: DataLoader::new(VmCountsOfCluster(reader.clone()), spawn),
            // A page holds up to 100 x 100 virtual machines: one batch for all of them.
            vm_labels: DataLoader::new(VmLabels(reader), spawn).max_batch_size(10_000),
        }
    }
}

pub struct ClusterById(Reader);

impl Loader<Uuid> for ClusterById {
    type Value = ClusterRecord;
    type Error = ApiError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, ClusterRecord>, ApiError> {
        let rows = self.0.clusters_by_id(keys).await?;
        Ok(rows.into_iter().map(|c| (c.id, c)).collect())
    }
}

fn group_labels(rows: Vec<(Uuid, String, String)>) -> HashMap<Uuid, BTreeMap<String, String>> {
    let mut out: HashMap<Uuid, BTreeMap<String, String>> = HashMap::new();
    for (id, k, v) in rows {
        out.entry(id).or_default().insert(k, v);
    }
    out
}

pub struct ClusterLabels(Reader);

impl Loader<Uuid> for ClusterLabels {
    type Value = BTreeMap<String, String>;
    type Error = ApiError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, ApiError> {
        Ok(group_labels(self.0.cluster_labels(keys).await?))
    }
}

pub struct VmLabels(Reader);

impl Loader<Uuid> for VmLabels {
    type Value = BTreeMap<String, String>;
    type Error = ApiError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, ApiError> {
        Ok(group_labels(self.0.vm_labels(keys).await?))
    }
}

pub struct NodesOfCluster(Reader);

impl Loader<Uuid> for NodesOfCluster {
    type Value = Vec<NodeRecord>;
    type Error = ApiError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Self::Value>, ApiError> {
        let mut out: HashMap<Uuid, Vec<NodeRecord>> = HashMap::new();
        for n in self.0.nodes_of_clusters(keys).await? {
            out.entry(n.cluster_id).or_default().push(n);
        }
        Ok(out)
    }
}

pub struct CapacityOfCluster(Reader);

impl Loader<Uuid> for CapacityOfCluster {
    type Value = Capacity;
    type Error = ApiError;

    async fn load(&self, keys: &[Uuid]) -> Result<HashMap<Uuid, Capacity>, ApiError> {
        Ok(self.0.capacity_of_clusters(keys).await?)
    }
}

/// A page of one cluster's virtual machines; keys asking for the same page shape are batched
/// into one query whatever the number of clusters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmPageKey {
    pub cluster_id: Uuid,
    pub filter: Arc<VmFilter>,
    pub page: Arc<PageRequest>,
}

pub struct VmPagesOfCluster(Reader);

impl Loader<VmPageKey> for VmPagesOfCluster {
    type Value = Page<VmRecord>;
    type Error = ApiError;

    async fn load(
        &self,
        keys: &[VmPageKey],
    ) -> Result<HashMap<VmPageKey, Page<VmRecord>>, ApiError> {
        let mut groups: HashMap<(Arc<VmFilter>, Arc<PageRequest>), Vec<Uuid>> = HashMap::new();
        for k in keys {
            groups
                .entry((k.filter.clone(), k.page.clone()))
                .or_default()
                .push(k.cluster_id);
        }
        let mut out = HashMap::with_capacity(keys.len());
        for ((filter, page), ids) in groups {
            let mut pages = self.0.vms_of_clusters(&ids, &filter, &page).await?;
            for id in ids {
                let p = pages.remove(&id).unwrap_or_else(Page::empty);
                out.insert(
                    VmPageKey {
                        cluster_id: id,
                        filter: filter.clone(),
                        page: page.clone(),
                    },
                    p,
                );
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmCountKey {
    pub cluster_id: Uuid,
    pub filter: Arc<VmFilter>,
}

pub struct VmCountsOfCluster(Reader);

impl Loader<VmCountKey> for VmCountsOfCluster {
    type Value = i64;
    type Error = ApiError;

    async fn load(&self, keys: &[VmCountKey]) -> Result<HashMap<VmCountKey, i64>, ApiError> {
        let mut groups: HashMap<Arc<VmFilter>, Vec<Uuid>> = HashMap::new();
        for k in keys {
            groups
                .entry(k.filter.clone())
                .or_default()
                .push(k.cluster_id);
        }
        let mut out = HashMap::with_capacity(keys.len());
        for (filter, ids) in groups {
            let counts = self.0.count_vms_of_clusters(&ids, &filter).await?;
            for id in ids {
                let n = counts.get(&id).copied().unwrap_or(0);
                out.insert(
                    VmCountKey {
                        cluster_id: id,
                        filter: filter.clone(),
                    },
                    n,
                );
            }
        }
        Ok(out)
    }
}
