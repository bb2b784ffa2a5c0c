//! Why a VM cannot move, in words an operator can act on: each [`Blocker`] says what is wrong,
//! where (the target clusters it concerns, all of them) and what to do about it. Reasons about
//! targets are gathered per kind so that a fleet of 500 clusters yields a few sentences, not 500.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{LIVE_MIGRATION_GATE, PINNED_LABEL};

/// How many clusters a message names before it says "and N more" (all are in `clusters`).
const NAMED_IN_MESSAGE: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BlockerKind {
    // About the VM itself, wherever it would go.
    NotMigratable,
    NotRunning,
    Pinned,
    AlreadyMigrating,
    SourceNotReady,
    SourceFeatureGateOff,
    NoTargets,
    // About targets.
    NotAllowedTarget,
    TargetNotReady,
    TargetCordoned,
    RuntimeMismatch,
    PlatformVersionMismatch,
    VirtualizationVersionMismatch,
    FeatureGateOff,
    NoSyncEndpoint,
    CpuModelMissing,
    StorageClassMissing,
    NetworkMissing,
    MacInUse,
    NameTaken,
    AntiAffinity,
    AffinityGroup,
    NotEnoughMemory,
}

impl BlockerKind {
    /// What the targets of this kind have in common, after "N clusters ...".
    fn about_targets(self) -> &'static str {
        match self {
            Self::NotAllowedTarget => "are outside the targets this plan may use",
            Self::TargetNotReady => "are not Ready",
            Self::TargetCordoned => "are cordoned for maintenance",
            Self::RuntimeMismatch => "use another runtime",
            Self::PlatformVersionMismatch => "run another platform minor version",
            Self::VirtualizationVersionMismatch => "run another virtualization minor version",
            Self::FeatureGateOff => "do not enable the decentralizedLiveMigration feature gate",
            Self::NoSyncEndpoint => "report no sync endpoint for migrations",
            Self::CpuModelMissing => "do not offer the VM's CPU model",
            Self::StorageClassMissing => "lack a storage class the VM's disks need",
            Self::NetworkMissing => "lack a network the VM's interfaces need",
            Self::MacInUse => "already use one of the VM's MAC addresses",
            Self::NameTaken => "already have a VM of this namespace and name",
            Self::AntiAffinity => "already run a VM of its anti-affinity group",
            Self::AffinityGroup => "cannot take its affinity group",
            Self::NotEnoughMemory => "lack the memory",
            _ => "cannot take it",
        }
    }

    /// What the operator can do.
    pub fn remedy(self) -> String {
        match self {
            Self::NotMigratable => "remove what prevents live migration (host devices, shareable disks, LUNs, virtiofs), or move the VM cold outside Drover".into(),
            Self::NotRunning => "start the VM (only a running VM live-migrates), or move it while stopped outside Drover".into(),
            Self::Pinned => format!("remove the label {PINNED_LABEL} to let Drover move it"),
            Self::AlreadyMigrating => "wait for its migration to end, or cancel it".into(),
            Self::SourceNotReady => "wait until the source cluster reports Ready again (check its agent)".into(),
            Self::SourceFeatureGateOff => format!("enable the {LIVE_MIGRATION_GATE} feature gate on the source cluster too"),
            Self::NoTargets => "join another cluster to the fleet".into(),
            Self::NotAllowedTarget => "allow more target clusters in the plan".into(),
            Self::TargetNotReady => "wait until they report Ready (check their agents), or add capacity elsewhere".into(),
            Self::TargetCordoned => "end their maintenance (setClusterMaintenance off) or add capacity elsewhere".into(),
            Self::RuntimeMismatch => "a live migration needs the same runtime on both sides: add a cluster of the VM's runtime".into(),
            Self::PlatformVersionMismatch | Self::VirtualizationVersionMismatch => "upgrade the clusters to the same minor version".into(),
            Self::FeatureGateOff => format!("enable {LIVE_MIGRATION_GATE} on them (HyperConverged spec.featureGates)"),
            Self::NoSyncEndpoint => "configure their agents' sync endpoint".into(),
            Self::CpuModelMissing => "use a CPU model every cluster offers for the VM, or add nodes with this model".into(),
            Self::StorageClassMissing => "create the storage class on the targets, or map it to one they have (storage-class map)".into(),
            Self::NetworkMissing => "create the network on the targets, or map it to one they have (network map)".into(),
            Self::MacInUse => "give this VM or the other one another MAC address".into(),
            Self::NameTaken => "rename or remove the other VM, or move into another namespace".into(),
            Self::AntiAffinity => "add capacity on clusters without its group, or let the anti-affinity rule bend (Preferred)".into(),
            Self::AffinityGroup => "add capacity where the whole group fits, or let the affinity rule bend (Preferred)".into(),
            Self::NotEnoughMemory => "free or add memory on the targets; each keeps room for its node drains".into(),
        }
    }
}

/// One reason a VM cannot move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Blocker {
    pub kind: BlockerKind,
    /// What is wrong.
    pub message: String,
    /// What the operator can do.
    pub remedy: String,
    /// The target clusters it is about (empty for reasons about the VM itself).
    pub clusters: Vec<String>,
}

impl Blocker {
    /// A reason about the VM itself.
    pub fn about_vm(kind: BlockerKind, message: String) -> Self {
        Self {
            kind,
            message,
            remedy: kind.remedy(),
            clusters: Vec::new(),
        }
    }
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.remedy)
    }
}

/// Gathers "target X fails Y because Z" into one blocker per kind.
#[derive(Debug, Default)]
pub(crate) struct TargetReasons {
    by_kind: BTreeMap<BlockerKind, Vec<(String, String)>>,
}

impl TargetReasons {
    /// Target `cluster` fails `kind`; `detail` says how (e.g. "b is Degraded").
    pub fn add(&mut self, kind: BlockerKind, cluster: &str, detail: String) {
        self.by_kind
            .entry(kind)
            .or_default()
            .push((cluster.to_owned(), detail));
    }

    pub fn into_blockers(self) -> Vec<Blocker> {
        self.by_kind
            .into_iter()
            .map(|(kind, mut entries)| {
                entries.sort();
                let count = entries.len();
                let named: Vec<&str> = entries
                    .iter()
                    .take(NAMED_IN_MESSAGE)
                    .map(|(_, d)| d.as_str())
                    .collect();
                let more = match count.saturating_sub(NAMED_IN_MESSAGE) {
                    0 => String::new(),
                    n => format!("; and {n} more"),
                };
                let clusters_word = if count == 1 {
                    "1 cluster".to_owned()
                } else {
                    format!("{count} clusters")
                };
                let about = if count == 1 {
                    singular(kind.about_targets())
                } else {
                    kind.about_targets().to_owned()
                };
                Blocker {
                    kind,
                    message: format!("{clusters_word} {about}: {}{more}", named.join("; ")),
                    remedy: kind.remedy(),
                    clusters: entries.into_iter().map(|(c, _)| c).collect(),
                }
            })
            .collect()
    }
}

/// "are not Ready" -> "is not Ready", "lack ..." -> "lacks ...".
fn singular(phrase: &str) -> String {
    let (verb, rest) = phrase.split_once(' ').unwrap_or((phrase, ""));
    let verb = match verb {
        "are" => "is".to_owned(),
        "have" => "has".to_owned(),
        "do" => "does".to_owned(),
        "cannot" => "cannot".to_owned(),
        "already" => return format!("already {}", singular(rest)),
        v => format!("{v}s"),
    };
    if rest.is_empty() {
        verb
    } else {
        format!("{verb} {rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_gathered_per_kind_and_name_every_cluster() {
        let mut reasons = TargetReasons::default();
        for i in 0..7 {
            reasons.add(
                BlockerKind::TargetNotReady,
                &format!("c{i}"),
                format!("c{i} is Degraded"),
            );
        }
        reasons.add(
            BlockerKind::MacInUse,
            "x",
            "x uses 02:00:00:00:00:01 (web/a)".into(),
        );
        let blockers = reasons.into_blockers();
        assert_eq!(blockers.len(), 2);
        assert_eq!(
            blockers[0].message,
            "7 clusters are not Ready: c0 is Degraded; c1 is Degraded; c2 is Degraded; c3 is Degraded; c4 is Degraded; and 2 more"
        );
        assert_eq!(blockers[0].clusters.len(), 7);
        assert_eq!(
            blockers[1].message,
            "1 cluster already uses one of the VM's MAC addresses: x uses 02:00:00:00:00:01 (web/a)"
        );
        assert!(blockers[1].remedy.contains("MAC"));
    }

    #[test]
    fn singular_verbs_read_right() {
        assert_eq!(singular("lack the memory"), "lacks the memory");
        assert_eq!(
            singular("do not enable the gate"),
            "does not enable the gate"
        );
        assert_eq!(
            singular("already have a VM of this name"),
            "already has a VM of this name"
        );
        assert_eq!(singular("cannot take it"), "cannot take it");
    }
}
