//! Live migration between two QEMU runtimes, at the QEMU level: the receiving VM, the transfer
//! of disks and memory, the switchover and the cleanup on either side. Every byte between the two
//! QEMUs goes through unix sockets the caller owns (the agents' tunnel): QEMU never connects to
//! the other side itself.
//!
//! ```text
//! target <data_dir>/vms/<namespace>/<name>/
//!   migration.json   {"migrationId", "role": "receiver", "spec": <VmSpec, WaitAsReceiver>}
//!                    until the switchover; there is no vm.json before it, so nothing that
//!                    scans declarations mistakes a half-received VM for a VM to start
//!   nbd.sock         QEMU's NBD server: one writable export per disk, named `disk-<disk>`
//!   migrate.sock     QEMU's incoming migration listener
//! source <data_dir>/vms/<namespace>/<name>/
//!   migration.json   {"migrationId", "role": "sender"} from the start of a send until the
//!                    VM is removed (switchover) or resumed; the monitor never (re)starts a VM
//!                    that carries it
//! ```
//!
//! The QMP sequence, and why:
//! - Receiver: QEMU with the same hardware plus `-incoming defer -S`, then `migrate-set-capabilities`
//!   postcopy-ram (both sides need it for post-copy; best effort), `nbd-server-start` on
//!   `nbd.sock`, `block-export-add` (nbd, writable) per disk, `migrate-incoming unix:migrate.sock`.
//!   `-S` keeps the guest paused after the memory arrives: the target runs only when
//!   `finish_receiver` says so, which is what makes "exactly one side authoritative" hold.
//! - Sender, disks: per disk `blockdev-add` an NBD client node through the caller's socket and
//!   `blockdev-mirror` (sync full, **write-blocking**) onto it, until every job is ready.
//!   Write-blocking copies each guest write to the target before it completes: a guest that
//!   writes faster than the link is slowed to the link's pace instead of growing a backlog that
//!   would have to be copied while the guest is stopped. The price is the link's latency on
//!   guest writes during the migration.
//! - Sender, memory: `migrate-set-capabilities` (pause-before-switchover, return-path, and
//!   auto-converge / postcopy-ram only if allowed), `migrate-set-parameters` (max-bandwidth,
//!   downtime-limit 300 ms), `migrate unix:<socket>`, `query-migrate` every 50 ms (progress
//!   every 250 ms). At `pre-switchover` the guest is stopped but its disks still active: each
//!   ready mirror gets `block-job-cancel` (which, on a ready mirror, *completes* it: the target
//!   holds every write made before the stop), the NBD nodes are deleted, then `migrate-continue`.
//!   With return-path, `completed` means the target loaded the whole state; if it cannot, QEMU
//!   fails the migration and resumes the source itself.
//! - Failure or cancel: `migrate_cancel`, `block-job-cancel` (force) and `job-dismiss` every
//!   mirror, `blockdev-del` every NBD node, `cont` if the guest was left stopped. The target's
//!   QEMU exits by itself when its incoming stream breaks; `abort_receiver` removes what is left.
//! - Switchover: target `query-migrate` until completed, `nbd-server-stop`, `cont`; then the
//!   source's paused QEMU is told to `quit` and its directory removed.
//! - Post-copy (only if allowed, when pre-copy stalls): `migrate-start-postcopy`. The target
//!   stays paused (`-S`) until `finish_receiver`, so the rest of memory is pushed while neither
//!   side runs: it always completes, but the guest is stopped for that time.
//!
//! Where things are: `receiver` (prepare, finish, abort), `sender` (send, cancel, finish,
//! resume), `monitor` (what the runtime's monitor does with VMs carrying a marker, also after an
//! agent restart), `progress` (when a send counts as stalled), `commands` (the QMP exchanges).
//!
//! A link that stops carrying data without closing keeps QEMU's NBD requests (and, with
//! write-blocking, the guest's disk writes) waiting until the tunnel closes the socket: the
//! tunnel must close sockets it gives up on. Every wait here is bounded regardless.

pub(crate) mod commands;
mod monitor;
mod progress;
mod receiver;
mod sender;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use drover_shared::commands::VmSpec;
use qapi::qmp::MigrationStatus;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::layout::{self, VmDir, VmKey};
use super::qmp::QmpError;
use super::{lock, QemuRuntime, RuntimeError};

const MARKER_FILE: &str = "migration.json";
const NBD_SOCKET: &str = "nbd.sock";
const MIGRATION_SOCKET: &str = "migrate.sock";
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// How often the sender asks QEMU how far it is.
const POLL: Duration = Duration::from_millis(50);
/// How often it asks once QEMU may stop the guest any moment: the stopped guest waits at
/// `pre-switchover` until the sender notices and hands the disks over.
pub const SWITCHOVER_POLL: Duration = Duration::from_millis(5);
/// How often the sender reports progress and checks for stalls.
const REPORT_EVERY: Duration = Duration::from_millis(250);
/// What QEMU aims for when it stops the guest for the last pass: it stops once what is left of
/// memory fits into this much time at the current throughput. The guest's whole pause also
/// holds the device state, the disks' hand-over and the target's take-over, and Drover keeps
/// the pause under 300 ms; QEMU's own default of 300 ms for the memory alone would not.
pub const DOWNTIME_LIMIT_MS: u64 = 150;
/// QEMU's own default caps a migration at 128 MiB/s; "unlimited" has to be said explicitly.
const UNLIMITED_BANDWIDTH: u64 = 1 << 40;
/// Completing the mirrors while the guest is stopped (write-blocking leaves little to copy).
const SWITCHOVER_DISK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long cleanup waits for QEMU to end a migration or a mirror job.
const CLEANUP_WAIT: Duration = Duration::from_secs(10);
/// How long the target waits for the incoming migration to be complete at switchover.
const RECEIVE_COMPLETION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `cancel_send` waits for a running send to clean up.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the sender waits before asking QEMU again about a memory transfer in the state
/// `info`: `SWITCHOVER_POLL` once what is left is within four times what QEMU sends within
/// `DOWNTIME_LIMIT_MS` (so the stop can come any moment) or the guest is already stopped,
/// else `POLL`.
pub fn next_poll(info: &commands::MigrationInfo) -> Duration {
    match info.status {
        Some(MigrationStatus::pre_switchover | MigrationStatus::device) => SWITCHOVER_POLL,
        Some(MigrationStatus::active) => {
            let Some(ram) = &info.ram else { return POLL };
            let bytes_per_sec = ram.mbps * 1e6 / 8.0;
            let stop_at = bytes_per_sec * DOWNTIME_LIMIT_MS as f64 / 1000.0;
            if ram.transferred > 0 && (ram.remaining as f64) <= 4.0 * stop_at {
                SWITCHOVER_POLL
            } else {
                POLL
            }
        }
        _ => POLL,
    }
}

/// Where the target's QEMU listens for one migration; the caller's tunnel connects to these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverEndpoints {
    /// One NBD server for all disks; each disk is the export `disk-<disk name>`.
    pub nbd_socket: PathBuf,
    /// The incoming memory migration stream.
    pub migration_socket: PathBuf,
}

/// How to send a VM: local sockets that reach the target's endpoints, and the limits.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// A local unix socket that reaches the target's NBD server (`ReceiverEndpoints::nbd_socket`).
    pub nbd_socket: PathBuf,
    /// A local unix socket that reaches the target's incoming migration.
    pub migration_socket: PathBuf,
    /// For the disk copy and the memory stream each; 0 = unlimited.
    pub bandwidth_bytes_per_sec: u64,
    pub allow_auto_converge: bool,
    pub allow_post_copy: bool,
    /// The whole send, disks and memory.
    pub completion_timeout: Duration,
    /// How long the remaining bytes may fail to fall (see `progress`) before the send gives up.
    pub progress_timeout: Duration,
}

/// What a send is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationStage {
    /// Copying disks to the target (mirrors not yet in sync).
    Disks,
    /// Pre-copy of memory; disk writes are mirrored synchronously.
    Memory,
    /// Post-copy: the rest of memory is pushed to the target, the source is stopped.
    PostCopy,
    /// The guest is stopped for the last pass and the disk handover.
    Switchover,
}

/// One progress report of a send. Totals are memory plus disks.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationProgress {
    pub stage: MigrationStage,
    pub elapsed: Duration,
    pub total_bytes: u64,
    /// Bytes sent so far; memory pages sent again count again, so this may exceed the total.
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub disk_total_bytes: u64,
    pub disk_remaining_bytes: u64,
    pub memory_total_bytes: u64,
    pub memory_remaining_bytes: u64,
    /// Passes over memory so far (QEMU's dirty-sync-count).
    pub memory_passes: u64,
    /// How fast the guest dirties memory, measured over the last pass.
    pub dirty_rate_bytes_per_sec: u64,
    pub throughput_bytes_per_sec: u64,
    /// How much auto-converge throttles the guest's vCPUs.
    pub cpu_throttle_percent: u64,
}

/// A completed send: the target holds the VM's whole state; the source is paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    /// How long QEMU had the guest stopped on the source (as QEMU measures it). The guest stays
    /// stopped until the target's `finish_receiver`, so the guest sees this plus the switchover.
    pub downtime_ms: u64,
    /// The whole send: disks and memory.
    pub total_time_ms: u64,
    /// `memory_bytes + disk_bytes`.
    pub bytes: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// How long the disks took to get in sync (before the memory transfer started).
    pub disk_time_ms: u64,
    /// Whether the send had to switch to post-copy.
    pub post_copy: bool,
    /// When the sender saw the transfer complete: the guest has been stopped since
    /// `downtime_ms` before, until the target resumes it.
    pub completed_at: tokio::time::Instant,
}

/// Why a migration step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationFailure {
    /// The VM is not in a state that allows the step (not running, not a receiver, ...).
    Precondition,
    /// An operator cancelled it.
    Cancelled,
    /// The remaining bytes did not fall for the progress timeout.
    Stalled,
    /// The completion timeout passed.
    TimedOut,
    /// The disk or memory stream failed: link cut, target gone, QEMU gave up.
    TransferFailed,
    /// QEMU refused a command or did not answer.
    Qemu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Role {
    Sender,
    Receiver,
}

/// `migration.json`: this VM takes part in a migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Marker {
    pub migration_id: String,
    pub role: Role,
    /// The receiver's declaration until the switchover (run strategy WaitAsReceiver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<VmSpec>,
    pub started_at: chrono::DateTime<chrono::Utc>,
}

fn marker_file(dir: &VmDir) -> PathBuf {
    dir.path.join(MARKER_FILE)
}

/// `Ok(None)`: the VM takes part in no migration.
pub(crate) fn read_marker(dir: &VmDir) -> Result<Option<Marker>, String> {
    let path = marker_file(dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is unreadable: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

pub(crate) fn has_marker(dir: &VmDir) -> bool {
    marker_file(dir).exists()
}

fn write_marker(dir: &VmDir, marker: &Marker) -> io::Result<()> {
    let mut json = serde_json::to_vec_pretty(marker).map_err(io::Error::other)?;
    json.push(b'\n');
    layout::write_atomically(&marker_file(dir), &json)
}

fn remove_marker(dir: &VmDir) -> io::Result<()> {
    match std::fs::remove_file(marker_file(dir)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every VM directory with a migration marker (receivers have no `vm.json` to be found by).
pub(crate) fn marked_vms(vms_root: &Path) -> Vec<VmKey> {
    let mut keys = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(vms_root) else {
        return keys;
    };
    for namespace in namespaces.flatten() {
        let Ok(vms) = std::fs::read_dir(namespace.path()) else {
            continue;
        };
        for vm in vms.flatten() {
            if !vm.path().join(MARKER_FILE).is_file() {
                continue;
            }
            let (namespace, name) = (namespace.file_name(), vm.file_name());
            let (Some(namespace), Some(name)) = (namespace.to_str(), name.to_str()) else {
                continue;
            };
            if let Ok(key) = VmKey::checked(namespace, name) {
                keys.push(key);
            }
        }
    }
    keys
}

/// The sends running in this process, so that `cancel_send` can reach one.
#[derive(Debug, Default)]
pub(crate) struct Sends(Mutex<HashMap<VmKey, watch::Sender<bool>>>);

/// Removes a send from `Sends` when it ends, however it ends.
struct Registered<'a> {
    sends: &'a Sends,
    key: VmKey,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.sends.0).remove(&self.key);
    }
}

fn disk_node(disk: &str) -> String {
    format!("disk-{disk}")
}
fn nbd_node(disk: &str) -> String {
    format!("nbd-{disk}")
}
fn mirror_job(disk: &str) -> String {
    format!("mirror-{disk}")
}
fn export_id(disk: &str) -> String {
    format!("export-{disk}")
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Migration ids end up in files and messages: keep them plain.
fn check_migration_id(migration_id: &str) -> Result<(), RuntimeError> {
    let plain = !migration_id.is_empty()
        && migration_id.len() <= 128
        && migration_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if plain {
        Ok(())
    } else {
        Err(RuntimeError::InvalidSpec(format!(
            "migration id {migration_id:?} must be 1 to 128 letters, digits, '-', '_' or '.'"
        )))
    }
}

fn check_socket_path(what: &str, path: &Path) -> Result<(), String> {
    let length = path.as_os_str().len();
    if length > MAX_SOCKET_PATH {
        return Err(format!(
            "{what} {} is {length} bytes long, more than a unix socket path may be ({MAX_SOCKET_PATH}); use a shorter data directory",
            path.display()
        ));
    }
    if path.to_str().is_none() {
        return Err(format!("{what} {} is not UTF-8", path.display()));
    }
    Ok(())
}

fn remove_stale(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Migration states in which QEMU still works on an outgoing migration.
fn in_progress(status: Option<MigrationStatus>) -> bool {
    use MigrationStatus::*;
    matches!(
        status,
        Some(
            setup
                | active
                | pre_switchover
                | device
                | wait_unplug
                | postcopy_active
                | postcopy_paused
                | postcopy_recover_setup
                | postcopy_recover
                | cancelling
                | colo
        )
    )
}

/// A failed send: what kind, and what the user reads.
struct Failure {
    kind: MigrationFailure,
    detail: String,
}

impl Failure {
    fn new(kind: MigrationFailure, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    fn qemu(what: &str, error: QmpError) -> Self {
        Self::new(MigrationFailure::Qemu, format!("{what}: {error}"))
    }
}

impl QemuRuntime {
    fn remove_dir_locked(&self, key: &VmKey, dir: &VmDir) -> Result<(), RuntimeError> {
        match std::fs::remove_dir_all(&dir.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(RuntimeError::Io {
                    vm: key.to_string(),
                    action: "cannot remove",
                    path: dir.path.clone(),
                    source: e,
                })
            }
            _ => {}
        }
        if let Some(namespace_dir) = dir.path.parent() {
            let _ = std::fs::remove_dir(namespace_dir);
        }
        self.update(|state| {
            state.tracked.remove(key);
        });
        Ok(())
    }
}
