//! Sibling batches: the relations of every item of one list load together, in one query per
//! relation, when the first item asks. Unlike a time-window DataLoader this does not depend on
//! how quickly the siblings' resolvers are polled, so the number of SQL statements a request
//! costs is fixed by its shape, never by its result count or by machine load.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode};
use crate::model::*;
use crate::reader::FleetReader;

pub type Reader = Arc<dyn FleetReader>;

type Labels = BTreeMap<String, String>;
/// One lazily loaded result per distinct set of arguments.
type CellsByArgs<K, V> = Mutex<HashMap<K, Arc<OnceCell<V>>>>;

fn group_labels(rows: Vec<(Uuid, String, String)>) -> HashMap<Uuid, Labels> {
    let mut out: HashMap<Uuid, Labels> = HashMap::new();
    for (id, k, v) in rows {
        out.entry(id).or_default().insert(k, v);
    }
    out
}

/// Looks up a per-argument cell, creating it on first use.
fn cell<K: std::hash::Hash + Eq, V>(
    map: &Mutex<HashMap<K, Arc<OnceCell<V>>>>,
    key: K,
) -> Arc<OnceCell<V>> {
    let mut map = map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    map.entry(key).or_default().clone()
}

/// The clusters of one list (a page, or the clusters some virtual machines or migrations
/// point at) and their relations.
pub struct ClusterBatch {
    reader: Reader,
    ids: Vec<Uuid>,
    labels: OnceCell<HashMap<Uuid, Labels>>,
    nodes: OnceCell<HashMap<Uuid, Vec<NodeRecord>>>,
    capacity: OnceCell<HashMap<Uuid, Capacity>>,
    vm_pages: CellsByArgs<(VmFilter, PageRequest), VmPages>,
    vm_counts: CellsByArgs<VmFilter, HashMap<Uuid, i64>>,
}

/// One page of virtual machines for each cluster of a batch, and the batch those VMs share.
pub struct VmPages {
    pages: HashMap<Uuid, Page<VmRecord>>,
    batch: Arc<VmBatch>,
}

impl ClusterBatch {
    pub fn new(reader: Reader, ids: Vec<Uuid>) -> Arc<Self> {
        Arc::new(Self {
            reader,
            ids,
            labels: OnceCell::new(),
            nodes: OnceCell::new(),
            capacity: OnceCell::new(),
            vm_pages: Mutex::default(),
            vm_counts: Mutex::default(),
        })
    }

    pub async fn labels(&self, id: Uuid) -> Result<Labels, ApiError> {
        let all = self
            .labels
            .get_or_try_init(|| async {
                Ok::<_, ApiError>(group_labels(self.reader.cluster_labels(&self.ids).await?))
            })
            .await?;
        Ok(all.get(&id).cloned().unwrap_or_default())
    }

    pub async fn nodes(&self, id: Uuid) -> Result<Vec<NodeRecord>, ApiError> {
        let all = self
            .nodes
            .get_or_try_init(|| async {
                let mut out: HashMap<Uuid, Vec<NodeRecord>> = HashMap::new();
                for n in self.reader.nodes_of_clusters(&self.ids).await? {
                    out.entry(n.cluster_id).or_default().push(n);
                }
                Ok::<_, ApiError>(out)
            })
            .await?;
        Ok(all.get(&id).cloned().unwrap_or_default())
    }

    pub async fn capacity(&self, id: Uuid) -> Result<Capacity, ApiError> {
        let all = self
            .capacity
            .get_or_try_init(|| async {
                Ok::<_, ApiError>(self.reader.capacity_of_clusters(&self.ids).await?)
            })
            .await?;
        Ok(all.get(&id).copied().unwrap_or_default())
    }

    /// Cluster `id`'s page of virtual machines; every cluster of the batch asking with the same
    /// filter and page shares one query.
    pub async fn vm_page(
        &self,
        id: Uuid,
        filter: VmFilter,
        page: PageRequest,
    ) -> Result<(Page<VmRecord>, Arc<VmBatch>), ApiError> {
        let cell = cell(&self.vm_pages, (filter.clone(), page.clone()));
        let pages = cell
            .get_or_try_init(|| async {
                let pages = self
                    .reader
                    .vms_of_clusters(&self.ids, &filter, &page)
                    .await?;
                let all: Vec<&VmRecord> = pages.values().flat_map(|p| &p.items).collect();
                let batch = VmBatch::new(self.reader.clone(), all);
                Ok::<_, ApiError>(VmPages { pages, batch })
            })
            .await?;
        let page = pages.pages.get(&id).cloned().unwrap_or_else(Page::empty);
        Ok((page, pages.batch.clone()))
    }

    pub async fn vm_count(&self, id: Uuid, filter: VmFilter) -> Result<i64, ApiError> {
        let cell = cell(&self.vm_counts, filter.clone());
        let counts = cell
            .get_or_try_init(|| async {
                Ok::<_, ApiError>(
                    self.reader
                        .count_vms_of_clusters(&self.ids, &filter)
                        .await?,
                )
            })
            .await?;
        Ok(counts.get(&id).copied().unwrap_or(0))
    }
}

/// Clusters referred to by id from a list of other things (virtual machines, migrations).
pub struct ClusterRefs {
    reader: Reader,
    ids: Vec<Uuid>,
    clusters: OnceCell<(HashMap<Uuid, ClusterRecord>, Arc<ClusterBatch>)>,
}

impl ClusterRefs {
    pub fn new(reader: Reader, ids: impl IntoIterator<Item = Uuid>) -> Self {
        let mut ids: Vec<Uuid> = ids.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        Self {
            reader,
            ids,
            clusters: OnceCell::new(),
        }
    }

    /// The cluster with this id, and the batch it shares with the other referenced clusters.
    pub async fn get(
        &self,
        id: Uuid,
    ) -> Result<Option<(ClusterRecord, Arc<ClusterBatch>)>, ApiError> {
        let (all, batch) = self
            .clusters
            .get_or_try_init(|| async {
                let rows = self.reader.clusters_by_id(&self.ids).await?;
                let batch = ClusterBatch::new(self.reader.clone(), self.ids.clone());
                Ok::<_, ApiError>((rows.into_iter().map(|c| (c.id, c)).collect(), batch))
            })
            .await?;
        Ok(all.get(&id).map(|c| (c.clone(), batch.clone())))
    }

    pub async fn require(&self, id: Uuid) -> Result<(ClusterRecord, Arc<ClusterBatch>), ApiError> {
        self.get(id).await?.ok_or_else(|| {
            ApiError::new(
                ErrorCode::Internal,
                format!("cluster {id} vanished while the request was read; retry"),
            )
        })
    }
}

/// The virtual machines of one list and their relations.
pub struct VmBatch {
    reader: Reader,
    ids: Vec<Uuid>,
    labels: OnceCell<HashMap<Uuid, Labels>>,
    pub clusters: ClusterRefs,
}

impl VmBatch {
    pub fn new<'a>(reader: Reader, vms: impl IntoIterator<Item = &'a VmRecord>) -> Arc<Self> {
        let (ids, cluster_ids): (Vec<Uuid>, Vec<Uuid>) =
            vms.into_iter().map(|v| (v.id, v.cluster_id)).unzip();
        Arc::new(Self {
            clusters: ClusterRefs::new(reader.clone(), cluster_ids),
            reader,
            ids,
            labels: OnceCell::new(),
        })
    }

    pub async fn labels(&self, id: Uuid) -> Result<Labels, ApiError> {
        let all = self
            .labels
            .get_or_try_init(|| async {
                Ok::<_, ApiError>(group_labels(self.reader.vm_labels(&self.ids).await?))
            })
            .await?;
        Ok(all.get(&id).cloned().unwrap_or_default())
    }
}
