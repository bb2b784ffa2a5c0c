//! What the QEMU runtime knows about its VMs and what it has reported: the tracked VMs, the
//! inventory derived from them, and the changes between two inventories. Pure data and
//! decisions; the runtime does the I/O and holds this under one lock.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_shared::commands::VmSpec;
use drover_shared::inventory::{InventoryChange, NodeInfo, RunStrategy, VmInfo, VmPhase};
use qapi::qmp::RunState;
use tokio::time::Instant;

use super::layout::VmKey;

/// A VM that has run this long since its last start is healthy again: its restart backoff resets.
pub(crate) const STABLE_RUN: Duration = Duration::from_secs(60);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(60);

/// One VM as the runtime tracks it.
#[derive(Debug, Clone)]
pub(crate) struct TrackedVm {
    /// The last declaration that could be read (a later malformed edit does not erase it).
    pub spec: VmSpec,
    pub uid: String,
    /// The live QEMU, if any.
    pub pid: Option<u32>,
    pub phase: VmPhase,
    /// Start failures and unexpected exits in a row; drives the restart backoff.
    pub failures: u32,
    pub next_start_at: Option<Instant>,
    /// Why the last start failed, until a start succeeds.
    pub last_start_error: Option<String>,
    pub running_since: Option<Instant>,
}

impl TrackedVm {
    pub(crate) fn new(spec: VmSpec, uid: String) -> Self {
        Self {
            spec,
            uid,
            pid: None,
            phase: VmPhase::Stopped,
            failures: 0,
            next_start_at: None,
            last_start_error: None,
            running_since: None,
        }
    }

    /// Records a failed start (or an unexpected exit) and when the next attempt may happen.
    pub(crate) fn record_failure(&mut self, now: Instant, start_error: Option<String>) {
        self.failures = self.failures.saturating_add(1);
        self.next_start_at = Some(now + restart_backoff(self.failures));
        if start_error.is_some() {
            self.last_start_error = start_error;
        }
    }

    /// The phase of a VM without a process.
    pub(crate) fn phase_when_not_running(&self) -> VmPhase {
        if self.last_start_error.is_some() && self.spec.run_strategy != RunStrategy::Halted {
            VmPhase::Failed
        } else {
            VmPhase::Stopped
        }
    }

    /// Whether the monitor should (re)start this VM now.
    pub(crate) fn start_due(&self, now: Instant) -> bool {
        self.spec.run_strategy == RunStrategy::Always
            && self.pid.is_none()
            && self.next_start_at.is_none_or(|at| now >= at)
    }
}

/// 1 s after the first failure, doubling up to a minute.
pub(crate) fn restart_backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let exponent = (failures - 1).min(6);
    (Duration::from_secs(1) * 2u32.pow(exponent)).min(MAX_RESTART_BACKOFF)
}

/// QEMU's run state as a VM phase.
pub(crate) fn phase_of(state: RunState) -> VmPhase {
    match state {
        RunState::running => VmPhase::Running,
        RunState::paused
        | RunState::suspended
        | RunState::prelaunch
        | RunState::debug
        | RunState::watchdog
        | RunState::save_vm
        | RunState::restore_vm => VmPhase::Paused,
        RunState::inmigrate => VmPhase::WaitingForReceiver,
        RunState::postmigrate | RunState::finish_migrate => VmPhase::Migrating,
        RunState::shutdown => VmPhase::Stopping,
        RunState::internal_error | RunState::io_error | RunState::guest_panicked => VmPhase::Failed,
        RunState::colo => VmPhase::Unknown,
    }
}

/// The inventory records of all tracked VMs.
pub(crate) fn vm_infos(
    tracked: &BTreeMap<VmKey, TrackedVm>,
    node_name: &str,
) -> BTreeMap<VmKey, VmInfo> {
    tracked
        .iter()
        .map(|(key, vm)| {
            (
                key.clone(),
                vm.spec
                    .to_info(&vm.uid, vm.phase, Some(node_name.to_owned())),
            )
        })
        .collect()
}

/// The node with what its live VMs request.
pub(crate) fn node_with_requests(
    allocatable: &NodeInfo,
    tracked: &BTreeMap<VmKey, TrackedVm>,
) -> NodeInfo {
    let live = tracked.values().filter(|vm| vm.pid.is_some());
    let (memory, cpu) = live.fold((0u64, 0u64), |(memory, cpu), vm| {
        (
            memory.saturating_add(vm.spec.memory_bytes),
            cpu.saturating_add(u64::from(vm.spec.vcpus) * 1000),
        )
    });
    NodeInfo {
        requested_memory_bytes: memory,
        requested_cpu_millis: cpu,
        ..allocatable.clone()
    }
}

/// What changed from one inventory to the next, in a stable order.
pub(crate) fn changes_between(
    old_node: &NodeInfo,
    old_vms: &BTreeMap<VmKey, VmInfo>,
    new_node: &NodeInfo,
    new_vms: &BTreeMap<VmKey, VmInfo>,
) -> Vec<InventoryChange> {
    let mut changes = Vec::new();
    if old_node != new_node {
        changes.push(InventoryChange::NodeUpserted {
            node: new_node.clone(),
        });
    }
    for (key, vm) in new_vms {
        if old_vms.get(key) != Some(vm) {
            changes.push(InventoryChange::VmUpserted { vm: vm.clone() });
        }
    }
    for key in old_vms.keys() {
        if !new_vms.contains_key(key) {
            changes.push(InventoryChange::VmRemoved {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            namespace: "default".into(),
            name: name.into(),
            memory_bytes: 256 << 20,
            vcpus: 2,
            disks: vec![],
            interfaces: vec![],
            labels: Default::default(),
            run_strategy: RunStrategy::Always,
            boot: None,
        }
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "host".into(),
            cpu_model: "cpu".into(),
            allocatable_memory_bytes: 1 << 34,
            allocatable_cpu_millis: 4000,
            requested_memory_bytes: 0,
            requested_cpu_millis: 0,
            schedulable: true,
            labels: Default::default(),
        }
    }

    fn key(name: &str) -> VmKey {
        VmKey::checked("default", name).unwrap()
    }

    #[test]
    fn only_what_changed_is_reported() {
        let mut tracked = BTreeMap::new();
        tracked.insert(key("a"), TrackedVm::new(spec("a"), "uid-a".into()));
        tracked.insert(key("b"), TrackedVm::new(spec("b"), "uid-b".into()));
        let before_vms = vm_infos(&tracked, "host");
        let before_node = node_with_requests(&node(), &tracked);
        assert!(changes_between(&before_node, &before_vms, &before_node, &before_vms).is_empty());

        let a = tracked.get_mut(&key("a")).unwrap();
        a.pid = Some(42);
        a.phase = VmPhase::Running;
        tracked.remove(&key("b"));
        let after_vms = vm_infos(&tracked, "host");
        let after_node = node_with_requests(&node(), &tracked);
        assert_eq!(after_node.requested_memory_bytes, 256 << 20);
        assert_eq!(after_node.requested_cpu_millis, 2000);

        let changes = changes_between(&before_node, &before_vms, &after_node, &after_vms);
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert!(
            matches!(&changes[0], InventoryChange::NodeUpserted { node } if node.requested_cpu_millis == 2000)
        );
        assert!(
            matches!(&changes[1], InventoryChange::VmUpserted { vm } if vm.name == "a" && vm.phase == VmPhase::Running && vm.node.as_deref() == Some("host"))
        );
        assert!(matches!(&changes[2], InventoryChange::VmRemoved { name, .. } if name == "b"));
    }

    #[test]
    fn restarts_back_off_and_failed_starts_show() {
        assert_eq!(restart_backoff(0), Duration::ZERO);
        assert_eq!(restart_backoff(1), Duration::from_secs(1));
        assert_eq!(restart_backoff(3), Duration::from_secs(4));
        assert_eq!(restart_backoff(30), Duration::from_secs(60));

        let now = Instant::now();
        let mut vm = TrackedVm::new(spec("a"), "uid".into());
        assert!(vm.start_due(now));
        vm.record_failure(now, Some("no such kernel".into()));
        assert!(!vm.start_due(now));
        assert!(vm.start_due(now + Duration::from_secs(1)));
        assert_eq!(vm.phase_when_not_running(), VmPhase::Failed);
        vm.spec.run_strategy = RunStrategy::Halted;
        assert_eq!(vm.phase_when_not_running(), VmPhase::Stopped);
        assert!(!vm.start_due(now + Duration::from_secs(100)));
    }

    #[test]
    fn qemu_run_states_map_to_phases() {
        assert_eq!(phase_of(RunState::running), VmPhase::Running);
        assert_eq!(phase_of(RunState::paused), VmPhase::Paused);
        assert_eq!(phase_of(RunState::inmigrate), VmPhase::WaitingForReceiver);
        assert_eq!(phase_of(RunState::postmigrate), VmPhase::Migrating);
        assert_eq!(phase_of(RunState::guest_panicked), VmPhase::Failed);
    }
}
