//! The QEMU runtime against real QEMU under TCG with the test guest (scripts/build-guest.sh):
//! VMs boot and count on their serial console, survive a restart of the runtime (adopted, not
//! restarted), follow their run strategy, and bad input is refused before anything is created.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use drover_agent::runtime::qemu::{Accel, QemuOptions, QemuRuntime, RuntimeError};
use drover_agent::session::InventorySource;
use drover_shared::commands::{BootSpec, DiskSpec, VmSpec};
use drover_shared::inventory::{
    Interface, InventoryChange, RunStrategy, RuntimeKind, VmInfo, VmPhase,
};
use drover_shared::protocol::ReportedHealth;
use tokio::sync::broadcast;
use tokio::time::Instant;

/// Waits for things that will happen. Generous: the guest boots under TCG in seconds on an idle
/// machine, much later on a busy CI machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Kills every QEMU this test's data dir started when the test ends, passed or failed.
struct KillQemusOnDrop {
    data_dir: PathBuf,
}

impl Drop for KillQemusOnDrop {
    fn drop(&mut self) {
        for pid in live_qemu_pids(&self.data_dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
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
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let pidfile = pidfile.to_string_lossy().into_owned();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == pidfile.as_bytes())
        .then_some(pid)
}

fn process_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// Fields drop in order: QEMUs are killed before their directory is removed.
struct TestBed {
    _killer: KillQemusOnDrop,
    _dir: tempfile::TempDir,
    data_dir: PathBuf,
}

impl TestBed {
    fn new() -> Self {
        // RUST_LOG=info shows what the runtime decided and why.
        if std::env::var_os("RUST_LOG").is_some() {
            drover_shared::telemetry::init();
        }
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().canonicalize().unwrap().join("agent");
        Self {
            _killer: KillQemusOnDrop {
                data_dir: data_dir.clone(),
            },
            _dir: dir,
            data_dir,
        }
    }

    fn options(&self) -> QemuOptions {
        QemuOptions {
            accel: Accel::Tcg,
            poll_interval: Duration::from_millis(200),
            image_dirs: vec![guest().to_path_buf()],
            cluster_labels: BTreeMap::from([("site".into(), "lab".into())]),
            ..QemuOptions::new(&self.data_dir)
        }
    }

    async fn open(&self) -> Arc<QemuRuntime> {
        QemuRuntime::open(self.options()).await.unwrap()
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.data_dir.join("vms/default").join(name)
    }
}

/// The counting test guest: 256 MiB, 1 vCPU, a 64 MiB disk, one NIC.
fn counter_vm(name: &str, mac: &str, run_strategy: RunStrategy) -> VmSpec {
    let guest = guest();
    VmSpec {
        namespace: "default".into(),
        name: name.into(),
        memory_bytes: 256 << 20,
        vcpus: 1,
        disks: vec![DiskSpec {
            name: "root".into(),
            size_bytes: 64 << 20,
            image: None,
        }],
        interfaces: vec![Interface {
            name: "nic0".into(),
            network: "default".into(),
            mac: mac.into(),
        }],
        labels: BTreeMap::from([("app".into(), "counter".into())]),
        run_strategy,
        boot: Some(BootSpec {
            kernel: guest.join("vmlinuz").to_string_lossy().into_owned(),
            initrd: Some(guest.join("initramfs.gz").to_string_lossy().into_owned()),
            cmdline: "console=ttyS0 quiet panic=-1 drover.disk_writes=1".into(),
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

/// Receives changes until one matches, at most `CHANGE_TIMEOUT`.
async fn wait_for_change(
    changes: &mut broadcast::Receiver<Vec<InventoryChange>>,
    what: &str,
    matches: impl Fn(&InventoryChange) -> bool,
) -> InventoryChange {
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    loop {
        let batch = tokio::time::timeout_at(deadline, changes.recv())
            .await
            .unwrap_or_else(|_| panic!("no change {what} within {CHANGE_TIMEOUT:?}"))
            .expect("the change stream stays open");
        if let Some(change) = batch.into_iter().find(|c| matches(c)) {
            return change;
        }
    }
}

fn vm_in(runtime: &QemuRuntime, name: &str) -> Option<VmInfo> {
    runtime.snapshot().2.into_iter().find(|vm| vm.name == name)
}

fn upserted(name: &'static str, phase: VmPhase) -> impl Fn(&InventoryChange) -> bool {
    move |c| matches!(c, InventoryChange::VmUpserted { vm } if vm.name == name && vm.phase == phase)
}

/// Unix sockets bound to `path`: QEMU's listener plus one per accepted QMP connection.
fn qmp_connections(path: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let path = path.to_string_lossy();
    table
        .lines()
        .filter(|l| l.split_whitespace().last() == Some(&*path))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_vm_boots_counts_and_is_reported_running() {
    let bed = TestBed::new();
    let runtime = bed.open().await;
    let mut changes = runtime.subscribe();

    let message = runtime
        .create_vm(counter_vm(
            "counter",
            "02:00:00:AA:BB:01",
            RunStrategy::Always,
        ))
        .await
        .unwrap();
    assert!(message.contains("started"), "{message}");
    let vm_dir = bed.vm_dir("counter");
    let first = wait_for_counter_above(&vm_dir, None).await;
    wait_for_counter_above(&vm_dir, Some(first + 3)).await;

    let (cluster, nodes, vms) = runtime.snapshot();
    assert_eq!(cluster.runtime, RuntimeKind::Qemu);
    assert!(
        cluster
            .virtualization_version
            .starts_with(|c: char| c.is_ascii_digit()),
        "QEMU version {:?}",
        cluster.virtualization_version
    );
    assert_eq!(cluster.cpu_models, vec!["max".to_owned()]);
    assert_eq!(cluster.labels.get("site").map(String::as_str), Some("lab"));
    assert_eq!(nodes.len(), 1);
    let node = &nodes[0];
    assert_eq!(node.requested_memory_bytes, 256 << 20);
    assert_eq!(node.requested_cpu_millis, 1000);
    assert!(node.allocatable_memory_bytes > 256 << 20);
    let vm = vms.iter().find(|vm| vm.name == "counter").unwrap();
    assert_eq!(vm.phase, VmPhase::Running);
    assert_eq!(vm.run_strategy, RunStrategy::Always);
    assert_eq!(vm.memory_bytes, 256 << 20);
    assert_eq!(vm.vcpus, 1);
    assert_eq!(vm.disks[0].size_bytes, 64 << 20);
    assert_eq!(vm.disks[0].storage_class, "qcow2");
    assert_eq!(vm.interfaces[0].mac, "02:00:00:aa:bb:01", "normalised");
    assert_eq!(vm.labels.get("app").map(String::as_str), Some("counter"));
    assert_eq!(vm.node.as_deref(), Some(node.name.as_str()));
    uuid::Uuid::parse_str(&vm.uid).expect("the uid is a uuid");
    assert_eq!(
        std::fs::read_to_string(vm_dir.join("uid")).unwrap().trim(),
        vm.uid
    );
    assert_eq!(runtime.health(), (ReportedHealth::Ready, None));

    wait_for_change(
        &mut changes,
        "upserting the running VM",
        upserted("counter", VmPhase::Running),
    )
    .await;

    // The monitor polls over QMP every 200 ms; no connection stays open between polls.
    let socket = vm_dir.join("qmp.sock");
    wait_until(
        "QMP to have no open client connection",
        CHANGE_TIMEOUT,
        || qmp_connections(&socket) == 1,
    )
    .await;

    runtime.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_runtime_adopts_its_running_vms_without_restarting_them() {
    let bed = TestBed::new();
    let runtime = bed.open().await;
    runtime
        .create_vm(counter_vm(
            "adopted",
            "02:00:00:aa:bb:02",
            RunStrategy::Always,
        ))
        .await
        .unwrap();
    let vm_dir = bed.vm_dir("adopted");
    let before = wait_for_counter_above(&vm_dir, None).await;
    let pid = qemu_pid(&vm_dir).expect("QEMU runs");
    let uid = vm_in(&runtime, "adopted").unwrap().uid;

    runtime.shutdown();
    drop(runtime);
    // With no runtime at all, the guest keeps counting.
    let meanwhile = wait_for_counter_above(&vm_dir, Some(before + 3)).await;

    let reopened = bed.open().await;
    let vm = vm_in(&reopened, "adopted").expect("the VM is found again");
    assert_eq!(vm.phase, VmPhase::Running);
    assert_eq!(vm.uid, uid, "the uid is stable");
    assert_eq!(qemu_pid(&vm_dir), Some(pid), "the very same QEMU");
    assert_eq!(reopened.snapshot().1[0].requested_memory_bytes, 256 << 20);

    wait_for_counter_above(&vm_dir, Some(meanwhile + 5)).await;
    assert_eq!(qemu_pid(&vm_dir), Some(pid));
    let (banners, counters) = serial(&vm_dir);
    assert_eq!(banners, 1, "the guest booted once");
    let expected: Vec<u64> = (0..counters.len() as u64).collect();
    assert_eq!(counters, expected, "the counter never restarted or skipped");
    reopened.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_starts_hand_declared_vms_and_skips_malformed_declarations() {
    let bed = TestBed::new();
    let by_hand = bed.vm_dir("by-hand");
    std::fs::create_dir_all(&by_hand).unwrap();
    let spec = counter_vm("by-hand", "02:00:00:aa:bb:03", RunStrategy::Always);
    std::fs::write(
        by_hand.join("vm.json"),
        serde_json::to_vec_pretty(&spec).unwrap(),
    )
    .unwrap();
    let broken = bed.vm_dir("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("vm.json"), "{ this is not json").unwrap();

    let runtime = bed.open().await;
    let vm = vm_in(&runtime, "by-hand").expect("the hand-declared VM is reported");
    assert_eq!(vm.phase, VmPhase::Running, "open started it");
    assert!(
        by_hand.join("disk-root.qcow2").is_file(),
        "its disk was created"
    );
    assert!(by_hand.join("uid").is_file());
    assert!(vm_in(&runtime, "broken").is_none());
    assert!(
        broken.join("vm.json").is_file(),
        "a malformed declaration is never deleted"
    );
    let (health, reason) = runtime.health();
    assert_eq!(health, ReportedHealth::Degraded);
    let reason = reason.unwrap();
    assert!(
        reason.contains("broken/vm.json") && reason.contains("not a VM spec"),
        "{reason}"
    );
    wait_for_counter_above(&by_hand, None).await;

    // Declarations dropped in later are picked up by the monitor.
    let mut changes = runtime.subscribe();
    let later = bed.vm_dir("later");
    std::fs::create_dir_all(&later).unwrap();
    let later_spec = counter_vm("later", "02:00:00:aa:bb:04", RunStrategy::Halted);
    std::fs::write(
        later.join("vm.json"),
        serde_json::to_vec(&later_spec).unwrap(),
    )
    .unwrap();
    wait_for_change(
        &mut changes,
        "reporting the later declaration",
        upserted("later", VmPhase::Stopped),
    )
    .await;
    // Others still work beside the broken file.
    runtime
        .create_vm(counter_vm(
            "created",
            "02:00:00:aa:bb:05",
            RunStrategy::Halted,
        ))
        .await
        .unwrap();
    assert_eq!(vm_in(&runtime, "created").unwrap().phase, VmPhase::Stopped);

    // Fixing the file clears the complaint.
    std::fs::remove_file(broken.join("vm.json")).unwrap();
    wait_until("health to recover", CHANGE_TIMEOUT, || {
        runtime.health().0 == ReportedHealth::Ready
    })
    .await;
    runtime.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_restart_and_delete_follow_the_run_strategy() {
    let bed = TestBed::new();
    let runtime = bed.open().await;
    let mut changes = runtime.subscribe();
    runtime
        .create_vm(counter_vm(
            "cycle",
            "02:00:00:aa:bb:06",
            RunStrategy::Always,
        ))
        .await
        .unwrap();
    let vm_dir = bed.vm_dir("cycle");
    wait_for_counter_above(&vm_dir, None).await;
    let first_pid = qemu_pid(&vm_dir).unwrap();

    // Stop at once: quit over QMP.
    let message = runtime
        .stop_vm("default", "cycle", Duration::ZERO)
        .await
        .unwrap();
    assert!(message.contains("QEMU quit"), "{message}");
    assert!(!process_alive(first_pid), "QEMU is gone");
    let vm = vm_in(&runtime, "cycle").unwrap();
    assert_eq!(
        (vm.phase, vm.run_strategy),
        (VmPhase::Stopped, RunStrategy::Halted)
    );
    let declared: VmSpec =
        serde_json::from_slice(&std::fs::read(vm_dir.join("vm.json")).unwrap()).unwrap();
    assert_eq!(declared.run_strategy, RunStrategy::Halted, "persisted");
    assert_eq!(runtime.snapshot().1[0].requested_memory_bytes, 0);
    let message = runtime
        .stop_vm("default", "cycle", Duration::ZERO)
        .await
        .unwrap();
    assert!(message.contains("already stopped"), "{message}");

    // Start again: a new QEMU boots the guest a second time, the disk is kept.
    runtime.start_vm("default", "cycle").await.unwrap();
    let second_pid = qemu_pid(&vm_dir).unwrap();
    assert_ne!(second_pid, first_pid);
    assert_eq!(
        vm_in(&runtime, "cycle").unwrap().run_strategy,
        RunStrategy::Always
    );
    wait_until("the second boot", BOOT_TIMEOUT, || serial(&vm_dir).0 == 2).await;

    // A VM that should run and dies is restarted by the monitor.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(
        "the monitor to restart the killed VM",
        CHANGE_TIMEOUT,
        || qemu_pid(&vm_dir).is_some_and(|pid| pid != second_pid),
    )
    .await;
    wait_until(
        "the VM to be reported running again",
        CHANGE_TIMEOUT,
        || vm_in(&runtime, "cycle").unwrap().phase == VmPhase::Running,
    )
    .await;

    // The busybox guest ignores ACPI power-down: after the grace QEMU is told to quit. The
    // grace is waited in full, and not replaced by a longer one (the API's default is 30 s);
    // the upper bound leaves a loaded machine 20 s for the QMP round trips and QEMU's exit.
    let grace = Duration::from_secs(2);
    let started = Instant::now();
    let message = runtime.stop_vm("default", "cycle", grace).await.unwrap();
    let took = started.elapsed();
    assert!(message.contains("QEMU quit"), "{message}");
    assert!(
        took >= grace && took < grace + Duration::from_secs(20),
        "{took:?}"
    );
    assert!(qemu_pid(&vm_dir).is_none());

    // Delete a running VM: stopped without grace, directory gone, VmRemoved emitted.
    runtime.start_vm("default", "cycle").await.unwrap();
    let last_pid = qemu_pid(&vm_dir).unwrap();
    let message = runtime.delete_vm("default", "cycle").await.unwrap();
    assert!(message.contains("deleted"), "{message}");
    assert!(!vm_dir.exists(), "the VM's directory is gone");
    assert!(!process_alive(last_pid), "its QEMU is gone");
    assert!(vm_in(&runtime, "cycle").is_none());
    wait_for_change(
        &mut changes,
        "removing the VM",
        |c| matches!(c, InventoryChange::VmRemoved { name, .. } if name == "cycle"),
    )
    .await;
    let err = runtime.delete_vm("default", "cycle").await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { .. }), "{err}");
    runtime.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_leaves_nothing_behind() {
    let bed = TestBed::new();
    let runtime = bed.open().await;
    runtime
        .create_vm(counter_vm(
            "first",
            "02:00:00:aa:bb:07",
            RunStrategy::Halted,
        ))
        .await
        .unwrap();
    let namespace_dir = bed.data_dir.join("vms/default");
    let entries = || {
        let mut names: Vec<String> = std::fs::read_dir(&namespace_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    let err = runtime
        .create_vm(counter_vm(
            "first",
            "02:00:00:aa:bb:08",
            RunStrategy::Halted,
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::AlreadyExists { .. }), "{err}");
    assert!(
        err.to_string().contains("default/first already exists"),
        "{err}"
    );

    let err = runtime
        .create_vm(counter_vm(
            "second",
            "02-00-00-AA-BB-07",
            RunStrategy::Halted,
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::MacInUse { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("02:00:00:aa:bb:07") && text.contains("default/first"),
        "{text}"
    );

    let mut invalid = counter_vm("Bad_Name", "not-a-mac", RunStrategy::Halted);
    invalid.memory_bytes = 0;
    let err = runtime.create_vm(invalid).await.unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidSpec(_)), "{err}");
    let text = err.to_string();
    for needle in ["Bad_Name", "not-a-mac", "memory"] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }

    let mut missing_kernel = counter_vm("third", "02:00:00:aa:bb:09", RunStrategy::Always);
    missing_kernel.boot.as_mut().unwrap().kernel = "/nonexistent/vmlinuz".into();
    let err = runtime.create_vm(missing_kernel).await.unwrap_err();
    assert!(err.to_string().contains("/nonexistent/vmlinuz"), "{err}");
    let mut outside_kernel = counter_vm("third", "02:00:00:aa:bb:09", RunStrategy::Always);
    outside_kernel.boot.as_mut().unwrap().kernel = "/etc/hostname".into();
    let err = runtime.create_vm(outside_kernel).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("outside the agent's image directories"),
        "{err}"
    );
    let mut relative_kernel = counter_vm("third", "02:00:00:aa:bb:09", RunStrategy::Always);
    relative_kernel.boot.as_mut().unwrap().kernel = "target/guest/vmlinuz".into();
    let err = runtime.create_vm(relative_kernel).await.unwrap_err();
    assert!(
        err.to_string().contains("must be an absolute path"),
        "{err}"
    );

    let mut long_disk = counter_vm("fourth", "02:00:00:aa:bb:0a", RunStrategy::Halted);
    long_disk.disks[0].name = "a-disk-name-longer-than-qemu-allows".into();
    let err = runtime.create_vm(long_disk).await.unwrap_err();
    assert!(err.to_string().contains("QEMU's limit"), "{err}");

    let err = runtime.start_vm("default", "nobody").await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { .. }), "{err}");
    let err = runtime
        .stop_vm("..", "etc", Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidName(_)), "{err}");

    assert_eq!(
        entries(),
        vec!["first".to_owned()],
        "nothing else was created"
    );
    assert_eq!(runtime.snapshot().2.len(), 1);
    assert!(
        live_qemu_pids(&bed.data_dir).is_empty(),
        "no QEMU was started"
    );
    runtime.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_qemu_is_reported_and_the_vm_stays_declared() {
    let bed = TestBed::new();
    let runtime = QemuRuntime::open(QemuOptions {
        qemu_binary: "/nonexistent/qemu-system-x86_64".into(),
        ..bed.options()
    })
    .await
    .unwrap();
    let (health, reason) = runtime.health();
    assert_eq!(health, ReportedHealth::Degraded);
    assert!(reason.unwrap().contains("install QEMU"));
    assert_eq!(runtime.snapshot().0.virtualization_version, "unknown");

    let err = runtime
        .create_vm(counter_vm(
            "doomed",
            "02:00:00:aa:bb:0b",
            RunStrategy::Always,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err, RuntimeError::CreatedButNotStarted { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("/nonexistent/qemu-system-x86_64"), "{text}");
    assert_eq!(vm_in(&runtime, "doomed").unwrap().phase, VmPhase::Failed);
    let reason = runtime.health().1.unwrap();
    assert!(
        reason.contains("default/doomed failed to start"),
        "{reason}"
    );

    // Stopping it is what an operator does next; it then no longer counts against health.
    runtime
        .stop_vm("default", "doomed", Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(vm_in(&runtime, "doomed").unwrap().phase, VmPhase::Stopped);
    assert!(!runtime.health().1.unwrap().contains("doomed"));
    runtime.shutdown();
}
