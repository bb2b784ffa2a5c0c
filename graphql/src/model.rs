//! Plain read models the hub hands to the API, filters and page requests. No behaviour beyond
//! cursor encoding: these are what the [`crate::FleetReader`] trait speaks.

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use drover_shared::inventory::{
    ClusterHealth, Disk, Interface, MigrationConfig, MigrationPhase, RunStrategy, RuntimeKind,
    StorageClass, VmPhase,
};
use drover_shared::labels::LabelSelector;
use uuid::Uuid;

use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRecord {
    pub id: Uuid,
    pub name: String,
    pub runtime: RuntimeKind,
    pub platform_version: String,
    pub virtualization_version: String,
    pub cpu_models: Vec<String>,
    pub feature_gates: Vec<String>,
    pub migration_config: MigrationConfig,
    pub storage_classes: Vec<StorageClass>,
    pub networks: Vec<String>,
    pub sync_endpoint: Option<String>,
    pub health: ClusterHealth,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub maintenance: bool,
    pub maintenance_since: Option<DateTime<Utc>>,
    pub inventory_generation: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    pub id: Uuid,
    pub cluster_id: Uuid,
    pub name: String,
    pub cpu_model: String,
    pub allocatable_memory_bytes: i64,
    pub allocatable_cpu_millis: i64,
    pub requested_memory_bytes: i64,
    pub requested_cpu_millis: i64,
    pub schedulable: bool,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub id: Uuid,
    pub cluster_id: Uuid,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub run_strategy: RunStrategy,
    pub phase: VmPhase,
    pub node: Option<String>,
    pub memory_bytes: i64,
    pub vcpus: i32,
    pub disks: Vec<Disk>,
    pub interfaces: Vec<Interface>,
    pub migratable: bool,
    pub non_migratable_reasons: Vec<String>,
    pub generation: i64,
    pub updated_at: DateTime<Utc>,
}

/// Allocatable and requested resources, summed over nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    pub nodes: i64,
    pub allocatable_memory_bytes: i64,
    pub requested_memory_bytes: i64,
    pub allocatable_cpu_millis: i64,
    pub requested_cpu_millis: i64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetSummary {
    pub clusters_by_health: Vec<(ClusterHealth, i64)>,
    pub clusters_in_maintenance: i64,
    pub vms_by_phase: Vec<(VmPhase, i64)>,
    pub vms_not_migratable: i64,
    /// Memory and vCPUs the fleet's virtual machines ask for.
    pub vm_memory_bytes: i64,
    pub vm_vcpus: i64,
    pub capacity: Capacity,
    pub migrations_in_flight: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MigrationRecord {
    pub id: Uuid,
    pub vm_namespace: String,
    pub vm_name: String,
    pub vm_uid: String,
    /// None once the cluster was removed from the fleet; the name stays.
    pub source_cluster_id: Option<Uuid>,
    pub target_cluster_id: Option<Uuid>,
    pub source_cluster_name: String,
    pub target_cluster_name: String,
    pub target_namespace: String,
    pub phase: MigrationPhase,
    pub phase_timestamps: BTreeMap<String, DateTime<Utc>>,
    pub bytes_total: i64,
    pub bytes_transferred: i64,
    pub bytes_remaining: i64,
    pub dirty_rate_bytes_per_sec: i64,
    pub throughput_bytes_per_sec: i64,
    pub failure_reason: Option<String>,
    pub attempt: i32,
    pub evacuation_id: Option<Uuid>,
    pub trace_id: Option<String>,
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ClusterFilter {
    pub label_selector: Option<LabelSelector>,
    pub health: Option<ClusterHealth>,
    pub maintenance: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VmFilter {
    pub cluster_id: Option<Uuid>,
    pub namespace: Option<String>,
    pub label_selector: Option<LabelSelector>,
    pub phase: Option<VmPhase>,
    pub node: Option<String>,
    pub migratable: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct MigrationFilter {
    /// Migrations whose source or target is this cluster.
    pub cluster_id: Option<Uuid>,
    pub phase: Option<MigrationPhase>,
    pub evacuation_id: Option<Uuid>,
    /// Migrations of one virtual machine, by its uid.
    pub vm_uid: Option<String>,
}

/// Forward pagination: at most `first` items after the position `after`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PageRequest {
    pub first: u32,
    /// The sort key of the last item already seen; its shape depends on the list.
    pub after: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_next_page: bool,
}

impl<T> Page<T> {
    pub fn empty() -> Self {
        Self {
            items: Vec::new(),
            has_next_page: false,
        }
    }

    /// Builds a page from up to `first + 1` rows: the extra row only says there is more.
    pub fn from_overfetch(mut rows: Vec<T>, first: u32) -> Self {
        let has_next_page = rows.len() > first as usize;
        rows.truncate(first as usize);
        Self {
            items: rows,
            has_next_page,
        }
    }
}

/// Cursors are opaque to clients: base64url of the sort key as a JSON array.
pub fn encode_cursor(key: &[&str]) -> String {
    let json = serde_json::to_vec(key).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

pub fn decode_cursor(cursor: &str, parts: usize) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::bad_input(format!(
            "after: {:?} is not a cursor this list issued; pass an endCursor from a previous page of the same list",
            cursor.chars().take(100).collect::<String>()
        ))
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let key: Vec<String> = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if key.len() != parts {
        return Err(bad());
    }
    Ok(key)
}
