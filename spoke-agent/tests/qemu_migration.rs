//! Live migration between two QEMU runtimes on one host (two data dirs stand for two clusters),
//! against real QEMU under TCG with the test guest (scripts/build-guest.sh). The two QEMUs only
//! ever talk through unix sockets this test splices together, the way the agents' tunnel will:
//! the guest keeps counting across a move, its disk writes all arrive, and a cancel, a guest
//! that outruns the link and a cut link all leave the source running and nothing on the target.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use drover_agent::runtime::qemu::{
    Accel, MigrationFailure, MigrationProgress, MigrationStage, QemuOptions, QemuRuntime,
    RuntimeError, SendOptions,
};
use drover_agent::session::InventorySource;
use drover_shared::commands::{BootSpec, DiskSpec, VmSpec};
use drover_shared::inventory::{Interface, RunStrategy, VmInfo, VmPhase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Waits for the guest to count (boot, or go on counting). Generous: the guest boots under TCG
/// in seconds on an idle machine, much later on a busy CI machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// The sends' own completion timeout here: far above what a move of these small guests takes
/// even on a busy machine, so that only a send that really cannot finish runs into it.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

/// The tests run one at a time: two TCG guests each already fill the two cores this suite is
/// sized for, and the rate-based tests need the guests' pace to be predictable.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Builds the guest once per test run (the script skips work already done).
fn guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let out = workspace().join("target/guest");
        let status = std::process::Command::new("bash")
            .arg(workspace().join("scripts/build-guest.sh"))
            .arg(&out)
            .status()
            .expect("run scripts/build-guest.sh");
        assert!(status.success(), "building the guest failed");
        out
    })
}

/// Kills every QEMU of these data dirs when the test ends, passed or failed.
struct KillQemusOnDrop {
    data_dirs: Vec<PathBuf>,
}

impl Drop for KillQemusOnDrop {
    fn drop(&mut self) {
        for data_dir in &self.data_dirs {
            for pid in live_qemu_pids(data_dir) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The pids of live QEMUs recorded under `data_dir/vms/*/*/qemu.pid`.
fn live_qemu_pids(data_dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(data_dir.join("vms")) else {
        return pids;
    };
    for namespace in namespaces.flatten() {
        let Ok(vms) = std::fs::read_dir(namespace.path()) else {
            continue;
        };
        for vm in vms.flatten() {
            if let Some(pid) = qemu_pid(&vm.path()) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// The VM's QEMU pid if that process is alive and really is this VM's QEMU.
fn qemu_pid(vm_dir: &Path) -> Option<u32> {
    let pidfile = vm_dir.join("qemu.pid");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    process_is_qemu_of(pid, &pidfile).then_some(pid)
}

fn process_is_qemu_of(pid: u32, pidfile: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let pidfile = pidfile.to_string_lossy().into_owned();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == pidfile.as_bytes())
}

/// Two agents ("clusters") on this host. Fields drop in order: QEMUs die before their
/// directories go.
struct Bed {
    _killer: KillQemusOnDrop,
    dir: tempfile::TempDir,
    source_dir: PathBuf,
    target_dir: PathBuf,
}

impl Bed {
    fn new() -> Self {
        // RUST_LOG=info shows what the runtimes decided and why.
        if std::env::var_os("RUST_LOG").is_some() {
            drover_shared::telemetry::init();
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let (source_dir, target_dir) = (root.join("a"), root.join("b"));
        Self {
            _killer: KillQemusOnDrop {
                data_dirs: vec![source_dir.clone(), target_dir.clone()],
            },
            dir,
            source_dir,
            target_dir,
        }
    }

    async fn open(&self, data_dir: &Path) -> Arc<QemuRuntime> {
        QemuRuntime::open(QemuOptions {
            accel: Accel::Tcg,
            poll_interval: Duration::from_millis(200),
            image_dirs: vec![guest().to_path_buf()],
            cluster_labels: BTreeMap::new(),
            ..QemuOptions::new(data_dir)
        })
        .await
        .unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().canonicalize().unwrap().join(name)
    }

    fn no_qemu_left(&self) {
        for data_dir in [&self.source_dir, &self.target_dir] {
            assert_eq!(
                live_qemu_pids(data_dir),
                Vec::<u32>::new(),
                "QEMUs left behind under {}",
                data_dir.display()
            );
        }
    }
}

fn vm_dir(data_dir: &Path, namespace: &str, name: &str) -> PathBuf {
    data_dir.join("vms").join(namespace).join(name)
}

/// The counting test guest with one 32 MiB disk.
fn counter_vm(name: &str, mac: &str, memory_mib: u64, knobs: &str) -> VmSpec {
    let guest = guest();
    VmSpec {
        namespace: "default".into(),
        name: name.into(),
        memory_bytes: memory_mib * MIB,
        vcpus: 1,
        disks: vec![DiskSpec {
            name: "root".into(),
            size_bytes: 32 * MIB,
            image: None,
        }],
        interfaces: vec![Interface {
            name: "nic0".into(),
            network: "default".into(),
            mac: mac.into(),
        }],
        labels: BTreeMap::from([("app".into(), "counter".into())]),
        run_strategy: RunStrategy::Always,
        boot: Some(BootSpec {
            kernel: guest.join("vmlinuz").to_string_lossy().into_owned(),
            initrd: Some(guest.join("initramfs.gz").to_string_lossy().into_owned()),
            cmdline: format!("console=ttyS0 quiet panic=-1 {knobs}"),
        }),
    }
}

/// What the guest printed: how many times it booted, and its counter values in order.
fn serial(vm_dir: &Path) -> (usize, Vec<u64>) {
    let text = std::fs::read_to_string(vm_dir.join("serial.log")).unwrap_or_default();
    let banners = text.matches("drover-guest: up").count();
    let counters = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("drover-counter "))
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    (banners, counters)
}

fn last_counter(vm_dir: &Path) -> Option<u64> {
    serial(vm_dir).1.last().copied()
}

/// Polls `check` (files and /proc have no events to await) until it holds or `timeout` passes.
async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_counter_above(vm_dir: &Path, above: Option<u64>) -> u64 {
    wait_until("the guest's counter to grow", BOOT_TIMEOUT, || {
        last_counter(vm_dir) > above
    })
    .await;
    last_counter(vm_dir).unwrap()
}

fn vm_in(runtime: &QemuRuntime, namespace: &str, name: &str) -> Option<VmInfo> {
    runtime
        .snapshot()
        .2
        .into_iter()
        .find(|vm| vm.namespace == namespace && vm.name == name)
}

/// The test's stand-in for the agents' tunnel: listens on a unix socket and connects each
/// accepted connection to `target`, copying both ways, at most `rate` bytes/s per direction
/// (0: unlimited). `cut` closes every connection and stops listening.
struct Splice {
    cut: watch::Sender<bool>,
    listener: JoinHandle<()>,
}

impl Splice {
    fn start(listen: &Path, target: &Path, rate: u64) -> Self {
        let listener = UnixListener::bind(listen).unwrap();
        let target = target.to_owned();
        let (cut, cut_rx) = watch::channel(false);
        let mut cut_accept = cut_rx.clone();
        let listener = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = cut_accept.changed() => return,
                };
                let Ok((inbound, _)) = accepted else { return };
                let Ok(outbound) = UnixStream::connect(&target).await else {
                    continue;
                };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                tokio::spawn(pump(in_read, out_write, rate, cut_rx.clone()));
                tokio::spawn(pump(out_read, in_write, rate, cut_rx.clone()));
            }
        });
        Self { cut, listener }
    }

    fn cut(&self) {
        let _ = self.cut.send(true);
        self.listener.abort();
    }
}

impl Drop for Splice {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::unix::OwnedReadHalf,
    mut to: tokio::net::unix::OwnedWriteHalf,
    rate: u64,
    mut cut: watch::Receiver<bool>,
) {
    // Small chunks when throttled, so that the pace is even.
    let chunk = if rate == 0 {
        256 * 1024
    } else {
        (rate / 20).clamp(4096, 256 * 1024) as usize
    };
    let mut buffer = vec![0u8; chunk];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = cut.changed() => return,
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let written = tokio::select! {
            written = to.write_all(&buffer[..n]) => written,
            _ = cut.changed() => return,
        };
        if written.is_err() {
            return;
        }
        if rate > 0 {
            let pause = Duration::from_secs_f64(n as f64 / rate as f64);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = cut.changed() => return,
            }
        }
    }
}

/// A VM running on the source, a receiver on the target, and the tunnel between them.
struct Move {
    source: Arc<QemuRuntime>,
    target: Arc<QemuRuntime>,
    source_vm: PathBuf,
    target_vm: PathBuf,
    nbd: Splice,
    migration: Splice,
    options: SendOptions,
}

const TARGET_NAMESPACE: &str = "landing";

async fn set_up_move(bed: &Bed, spec: VmSpec, migration_id: &str, link_rate: u64) -> Move {
    let source = bed.open(&bed.source_dir).await;
    let target = bed.open(&bed.target_dir).await;
    let name = spec.name.clone();
    source.create_vm(spec.clone()).await.unwrap();
    let source_vm = vm_dir(&bed.source_dir, "default", &name);
    wait_for_counter_above(&source_vm, Some(5)).await;

    // The receiver lands in another namespace, with the same hardware.
    let mut receiving = spec;
    receiving.namespace = TARGET_NAMESPACE.into();
    let endpoints = target
        .prepare_receiver(receiving, migration_id)
        .await
        .unwrap();
    let target_vm = vm_dir(&bed.target_dir, TARGET_NAMESPACE, &name);
    let nbd_socket = bed.path("tunnel-nbd.sock");
    let migration_socket = bed.path("tunnel-migration.sock");
    let nbd = Splice::start(&nbd_socket, &endpoints.nbd_socket, link_rate);
    let migration = Splice::start(&migration_socket, &endpoints.migration_socket, link_rate);
    Move {
        source,
        target,
        source_vm,
        target_vm,
        nbd,
        migration,
        options: SendOptions {
            nbd_socket,
            migration_socket,
            bandwidth_bytes_per_sec: 0,
            allow_auto_converge: false,
            allow_post_copy: false,
            completion_timeout: COMPLETION_TIMEOUT,
            progress_timeout: Duration::from_secs(15),
        },
    }
}

/// Starts a send in the background; progress reports arrive on the returned channel.
fn spawn_send(
    source: &Arc<QemuRuntime>,
    name: &str,
    migration_id: &str,
    options: SendOptions,
) -> (
    JoinHandle<Result<drover_agent::runtime::qemu::SendOutcome, RuntimeError>>,
    mpsc::UnboundedReceiver<MigrationProgress>,
) {
    let (reports, progress) = mpsc::unbounded_channel();
    let source = source.clone();
    let (name, migration_id) = (name.to_owned(), migration_id.to_owned());
    let send = tokio::spawn(async move {
        source
            .send("default", &name, &migration_id, options, move |p| {
                let _ = reports.send(p);
            })
            .await
    });
    (send, progress)
}

/// Waits (bounded) for a report of memory being copied with at least `bytes` sent.
async fn wait_for_memory_transfer(
    progress: &mut mpsc::UnboundedReceiver<MigrationProgress>,
    bytes: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let report = tokio::time::timeout_at(deadline, progress.recv())
            .await
            .expect("memory transfer under way within 120 s")
            .expect("the send still reports");
        if report.stage == MigrationStage::Memory
            && report.transferred_bytes - (report.disk_total_bytes - report.disk_remaining_bytes)
                >= bytes
        {
            return;
        }
    }
}

/// The source VM keeps running, counting and reported Running, with no migration left on it.
async fn assert_source_keeps_running(source: &QemuRuntime, source_vm: &Path) {
    let before = last_counter(source_vm).unwrap();
    wait_for_counter_above(source_vm, Some(before + 5)).await;
    assert!(
        !source_vm.join("migration.json").exists(),
        "the migration marker is gone"
    );
    let name = source_vm.file_name().unwrap().to_str().unwrap();
    wait_until(
        "the source to be reported Running",
        Duration::from_secs(60),
        || vm_in(source, "default", name).is_some_and(|vm| vm.phase == VmPhase::Running),
    )
    .await;
    let (banners, counters) = serial(source_vm);
    if banners != 1 {
        let console = std::fs::read_to_string(source_vm.join("serial.log")).unwrap_or_default();
        let qemu_log = std::fs::read_to_string(source_vm.join("qemu.log")).unwrap_or_default();
        panic!(
            "the source guest rebooted ({banners} boot banners)\n--- serial.log ---\n{console}\n--- qemu.log ---\n{qemu_log}"
        );
    }
    let expected: Vec<u64> = (counters[0]..counters[0] + counters.len() as u64).collect();
    assert_eq!(counters, expected, "the source's counter never skipped");
}

/// Aborts the receiver and checks that nothing of it is left on the target.
async fn abort_and_check_target_is_empty(moving: &Move, name: &str) {
    let receiver_pid = qemu_pid(&moving.target_vm);
    let message = moving
        .target
        .abort_receiver(TARGET_NAMESPACE, name)
        .await
        .unwrap();
    assert!(message.contains("removed the receiver"), "{message}");
    assert!(
        !moving.target_vm.exists(),
        "the receiver's directory is gone"
    );
    if let Some(pid) = receiver_pid {
        assert!(
            !process_is_qemu_of(pid, &moving.target_vm.join("qemu.pid")),
            "the receiving QEMU is gone"
        );
    }
    assert!(vm_in(&moving.target, TARGET_NAMESPACE, name).is_none());
    assert!(moving.target.snapshot().2.is_empty());
    // Aborting twice is harmless.
    moving
        .target
        .abort_receiver(TARGET_NAMESPACE, name)
        .await
        .unwrap();
}

/// The 512-byte blocks of a qcow2 disk (read while QEMU may have it open).
fn disk_blocks(disk: &Path, scratch: &Path) -> Vec<u8> {
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(disk)
        .arg(scratch)
        .status()
        .unwrap();
    assert!(status.success(), "qemu-img convert {}", disk.display());
    std::fs::read(scratch).unwrap()
}

fn record(blocks: &[u8], n: u64) -> String {
    let block = &blocks[n as usize * 512..(n as usize + 1) * 512];
    String::from_utf8_lossy(block)
        .trim_end_matches('\0')
        .trim_end()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_moves_to_another_runtime_and_keeps_counting_where_it_stopped() {
    let _one = ONE_AT_A_TIME.lock().await;
    let bed = Bed::new();
    let spec = counter_vm(
        "mover",
        "02:00:00:cc:00:01",
        128,
        "drover.disk_writes=1 drover.dirty_mib_per_s=2",
    );
    // The tunnel, not QEMU, is the bottleneck here: 32 MiB/s each way.
    let moving = set_up_move(&bed, spec, "mig-happy", 32 * MIB).await;

    // The receiver waits: no declaration yet, a marker, reported WaitingForReceiver.
    let receiver = vm_in(&moving.target, TARGET_NAMESPACE, "mover").expect("receiver reported");
    assert_eq!(receiver.phase, VmPhase::WaitingForReceiver);
    assert_eq!(receiver.run_strategy, RunStrategy::WaitAsReceiver);
    assert_eq!(receiver.interfaces[0].mac, "02:00:00:cc:00:01", "same MAC");
    assert_eq!(receiver.disks[0].size_bytes, 32 * MIB, "same disk size");
    assert!(moving.target_vm.join("migration.json").is_file());
    assert!(!moving.target_vm.join("vm.json").exists());
    assert!(moving.target_vm.join("nbd.sock").exists());
    // A restarted target agent adopts the receiver as such and does not start it as a VM.
    let reopened = bed.open(&bed.target_dir).await;
    let adopted = vm_in(&reopened, TARGET_NAMESPACE, "mover").expect("adopted after restart");
    assert_eq!(
        (adopted.phase, adopted.run_strategy),
        (VmPhase::WaitingForReceiver, RunStrategy::WaitAsReceiver)
    );
    reopened.shutdown();
    drop(reopened);

    // The test guest itself now and then loses one of its first disk records while its kernel
    // is still settling (seen without any migration too), so the move starts after that.
    let counter_at_send = wait_for_counter_above(&moving.source_vm, Some(25)).await;
    let (send, mut progress) =
        spawn_send(&moving.source, "mover", "mig-happy", moving.options.clone());
    let outcome = tokio::time::timeout(COMPLETION_TIMEOUT + Duration::from_secs(60), send)
        .await
        .expect("the send ends within its completion timeout")
        .unwrap()
        .unwrap();
    let mut reports = Vec::new();
    while let Ok(report) = progress.try_recv() {
        reports.push(report);
    }

    // The source is paused, awaiting the switchover, and its counter has stopped.
    let source_pid = qemu_pid(&moving.source_vm).expect("the paused source QEMU stays");
    assert_eq!(
        vm_in(&moving.source, "default", "mover").unwrap().phase,
        VmPhase::Migrating
    );
    let last_on_source = last_counter(&moving.source_vm).unwrap();
    // Something that must not happen: a running guest prints every 100 ms, so a second without
    // a new counter says it is paused (a slow machine can only hide a bug here, never fail a
    // correct implementation).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        last_counter(&moving.source_vm),
        Some(last_on_source),
        "the source stopped"
    );
    // Both guests are stopped: the target disk must equal the source disk byte for byte.
    let compare = std::process::Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(moving.source_vm.join("disk-root.qcow2"))
        .arg(moving.target_vm.join("disk-root.qcow2"))
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "source and target disks differ: {}",
        String::from_utf8_lossy(&compare.stdout)
    );

    // Switchover: the target resumes, then the source goes.
    let switchover = Instant::now();
    let message = moving
        .target
        .finish_receiver(TARGET_NAMESPACE, "mover")
        .await
        .unwrap();
    let switchover = switchover.elapsed();
    assert!(message.contains("runs here now"), "{message}");
    let message = moving
        .source
        .finish_sender("default", "mover")
        .await
        .unwrap();
    assert!(message.contains("runs on the target"), "{message}");
    eprintln!(
        "moved in {} ms: QEMU downtime {} ms, target resumed {} ms later; {} MiB sent ({} MiB memory, {} MiB disk); {} progress reports",
        outcome.total_time_ms,
        outcome.downtime_ms,
        switchover.as_millis(),
        outcome.bytes / MIB,
        outcome.memory_bytes / MIB,
        outcome.disk_bytes / MIB,
        reports.len()
    );

    // The guest carries on where it stopped: no reboot, no gap, and keeps counting.
    wait_for_counter_above(&moving.target_vm, None).await;
    let first_target = serial(&moving.target_vm).1[0];
    assert!(
        first_target.abs_diff(last_on_source + 1) <= 1,
        "the target's first counter {first_target} does not follow the source's last {last_on_source}"
    );
    let later = wait_for_counter_above(&moving.target_vm, Some(first_target + 15)).await;
    let (banners, counters) = serial(&moving.target_vm);
    assert_eq!(banners, 0, "the guest did not boot again on the target");
    let expected: Vec<u64> = (first_target..first_target + counters.len() as u64).collect();
    assert_eq!(
        counters, expected,
        "the counter never skipped on the target"
    );

    // Every record the guest wrote from the start of the move on, on the source and then on
    // the target, is on the target's disk in its block (earlier ones are the source disk's,
    // which the comparison above covers).
    let blocks = disk_blocks(
        &moving.target_vm.join("disk-root.qcow2"),
        &bed.path("target.raw"),
    );
    for n in counter_at_send..=later.saturating_sub(2) {
        assert_eq!(
            record(&blocks, n),
            format!("drover-seq {n:010}"),
            "record {n} (move started at {counter_at_send}, last on source {last_on_source})"
        );
    }

    // Inventories: the target runs a normal VM; the source has forgotten it.
    let moved = vm_in(&moving.target, TARGET_NAMESPACE, "mover").unwrap();
    assert_eq!(
        (moved.phase, moved.run_strategy),
        (VmPhase::Running, RunStrategy::Always)
    );
    assert!(moving.target_vm.join("vm.json").is_file());
    assert!(!moving.target_vm.join("migration.json").exists());
    assert!(vm_in(&moving.source, "default", "mover").is_none());
    assert!(!moving.source_vm.exists(), "the source's directory is gone");
    assert!(!process_is_qemu_of(
        source_pid,
        &moving.source_vm.join("qemu.pid")
    ));

    // Progress was reported with sound numbers.
    assert!(!reports.is_empty());
    assert!(reports.iter().any(|r| r.stage == MigrationStage::Memory));
    for report in &reports {
        assert_eq!(
            report.total_bytes,
            report.disk_total_bytes + report.memory_total_bytes
        );
        assert!(report.remaining_bytes <= report.total_bytes, "{report:?}");
        assert!(report.memory_total_bytes >= 128 * MIB, "{report:?}");
    }
    assert!(outcome.memory_bytes > 0 && outcome.bytes >= outcome.memory_bytes);
    assert!(outcome.downtime_ms < 5_000, "{outcome:?}");

    moving
        .target
        .delete_vm(TARGET_NAMESPACE, "mover")
        .await
        .unwrap();
    drop(moving);
    bed.no_qemu_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_send_keeps_the_source_running_and_the_receiver_leaves_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let bed = Bed::new();
    let spec = counter_vm(
        "cancelled",
        "02:00:00:cc:00:02",
        128,
        "drover.disk_writes=1 drover.dirty_mib_per_s=2",
    );
    let moving = set_up_move(&bed, spec, "mig-cancel", 0).await;
    let options = SendOptions {
        bandwidth_bytes_per_sec: 4 * MIB,
        ..moving.options.clone()
    };
    let (send, mut progress) = spawn_send(&moving.source, "cancelled", "mig-cancel", options);
    wait_for_memory_transfer(&mut progress, 4 * MIB).await;

    let message = moving
        .source
        .cancel_send("default", "cancelled")
        .await
        .unwrap();
    assert!(message.contains("keeps running here"), "{message}");
    // The outcome, not the time, shows the cancel worked: a send that ignored it would go on
    // and succeed (or fail otherwise) instead of ending Cancelled.
    let err = tokio::time::timeout(Duration::from_secs(60), send)
        .await
        .expect("the send ended with the cancel")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::Migration {
                kind: MigrationFailure::Cancelled,
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("cancelled by the operator") && text.contains("keeps running here"),
        "{text}"
    );
    assert_source_keeps_running(&moving.source, &moving.source_vm).await;
    // Cancelling again finds nothing to do.
    let again = moving
        .source
        .cancel_send("default", "cancelled")
        .await
        .unwrap();
    assert!(again.contains("no migration"), "{again}");

    abort_and_check_target_is_empty(&moving, "cancelled").await;
    moving
        .source
        .delete_vm("default", "cancelled")
        .await
        .unwrap();
    drop(moving);
    bed.no_qemu_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_dirtying_memory_faster_than_the_link_fails_the_send_with_the_reason() {
    let _one = ONE_AT_A_TIME.lock().await;
    let bed = Bed::new();
    let spec = counter_vm(
        "busy",
        "02:00:00:cc:00:03",
        128,
        // Asked for 32 MiB/s into an 8 MiB buffer over a 1 MiB/s link: a guest slowed down
        // many times by a busy machine still re-dirties its whole buffer every pass.
        "drover.dirty_mib_per_s=32 drover.dirty_buffer_mib=8",
    );
    let moving = set_up_move(&bed, spec, "mig-busy", 0).await;
    let progress_timeout = Duration::from_secs(4);
    // The completion timeout stays far away (COMPLETION_TIMEOUT): the send must give up on
    // its own, for want of progress, however slowly a loaded machine runs the first pass.
    let options = SendOptions {
        bandwidth_bytes_per_sec: MIB,
        progress_timeout,
        ..moving.options.clone()
    };
    let started = Instant::now();
    let (send, _progress) = spawn_send(&moving.source, "busy", "mig-busy", options);
    let err = tokio::time::timeout(COMPLETION_TIMEOUT + Duration::from_secs(60), send)
        .await
        .expect("the send gives up within its timeouts")
        .unwrap()
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("gave up after {took:?}: {err}");
    assert!(
        matches!(
            err,
            RuntimeError::Migration {
                kind: MigrationFailure::Stalled,
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    for needle in [
        "made no progress for 4s",
        "the guest dirties memory faster than the link carries it",
        "dirty rate",
        "throughput",
        "neither auto-converge nor post-copy is allowed",
        "keeps running here",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from {text}");
    }
    assert_source_keeps_running(&moving.source, &moving.source_vm).await;
    abort_and_check_target_is_empty(&moving, "busy").await;
    moving.source.delete_vm("default", "busy").await.unwrap();
    drop(moving);
    bed.no_qemu_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_mid_transfer_fails_the_send_and_the_source_keeps_running() {
    let _one = ONE_AT_A_TIME.lock().await;
    let bed = Bed::new();
    let spec = counter_vm(
        "cut",
        "02:00:00:cc:00:04",
        128,
        "drover.disk_writes=1 drover.dirty_mib_per_s=2",
    );
    // A slow tunnel, so that the memory transfer is still going when the link goes.
    let moving = set_up_move(&bed, spec, "mig-cut", 4 * MIB).await;
    let (send, mut progress) = spawn_send(&moving.source, "cut", "mig-cut", moving.options.clone());
    wait_for_memory_transfer(&mut progress, 4 * MIB).await;

    moving.migration.cut();
    moving.nbd.cut();
    let cut_at = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(120), send)
        .await
        .expect("the send fails instead of hanging")
        .unwrap()
        .unwrap_err();
    let took = cut_at.elapsed();
    eprintln!("failed {took:?} after the cut: {err}");
    assert!(
        matches!(
            err,
            RuntimeError::Migration {
                kind: MigrationFailure::TransferFailed,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("keeps running here"), "{err}");
    // Failed by the cut itself, before the stall detector would have given up (the kind above
    // says so as well). Timing-bound, with a wide margin: the cut is seen at once.
    assert!(took < moving.options.progress_timeout, "{took:?}");
    assert_source_keeps_running(&moving.source, &moving.source_vm).await;
    abort_and_check_target_is_empty(&moving, "cut").await;
    moving.source.delete_vm("default", "cut").await.unwrap();
    drop(moving);
    bed.no_qemu_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_interrupted_by_an_agent_restart_is_undone_and_the_source_keeps_running() {
    let _one = ONE_AT_A_TIME.lock().await;
    let bed = Bed::new();
    let spec = counter_vm(
        "interrupted",
        "02:00:00:cc:00:05",
        128,
        "drover.disk_writes=1 drover.dirty_mib_per_s=2",
    );
    let moving = set_up_move(&bed, spec, "mig-restart", 0).await;
    let options = SendOptions {
        bandwidth_bytes_per_sec: 4 * MIB,
        ..moving.options.clone()
    };
    let (send, mut progress) = spawn_send(&moving.source, "interrupted", "mig-restart", options);
    wait_for_memory_transfer(&mut progress, 2 * MIB).await;

    // The agent stops mid-send: nothing undoes the transfer, QEMU keeps migrating.
    moving.source.shutdown();
    send.abort();
    let _ = send.await;
    assert!(moving.source_vm.join("migration.json").is_file());
    let pid = qemu_pid(&moving.source_vm).unwrap();

    // The restarted agent finds the marker and undoes the send instead of leaving the VM
    // half-migrated (or restarting it).
    let restarted = bed.open(&bed.source_dir).await;
    wait_until(
        "the interrupted send to be undone",
        Duration::from_secs(60),
        || !moving.source_vm.join("migration.json").exists(),
    )
    .await;
    assert_eq!(qemu_pid(&moving.source_vm), Some(pid), "the very same QEMU");
    assert_source_keeps_running(&restarted, &moving.source_vm).await;
    abort_and_check_target_is_empty(&moving, "interrupted").await;
    restarted.delete_vm("default", "interrupted").await.unwrap();
    drop(moving);
    bed.no_qemu_left();
}
