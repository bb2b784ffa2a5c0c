//! A running VM moves between two agents' clusters with one GraphQL mutation, through the
//! agents' own mutual-TLS tunnel (real hub and agent processes, real QEMU under TCG): the
//! guest's counter keeps counting on the target without a reboot, every disk record it wrote
//! arrived, the source side is gone, the hub records the new location and the migration's
//! phases; and the VM moves back again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_e2e::agents::eventually;
use drover_e2e::otlp::{OtlpReceiver, ReceivedSpan};
use drover_e2e::process::{guest_console, AgentProcess, CuttableProxy, HubProcess, QemuReaper};
use drover_e2e::testbed::test_guest;
use serde_json::{json, Value};

/// Heartbeats every second, but a silence limit (30 s) that agents busy with TCG guests and a
/// migration never trip by accident: a cluster that turned Unreachable for a late heartbeat
/// fails the migration's preflight. No test here waits for silence (a killed agent or a cut
/// link shows in the transfer itself).
const HUB_TIMING: &[&str] = &[
    "--heartbeat-interval-secs",
    "1",
    "--silence-limit-secs",
    "30",
];

/// Waits for something that will happen: guests boot under TCG in seconds on an idle machine,
/// much later on a busy one.
const PATIENCE: Duration = Duration::from_secs(180);

/// Longer than the hub's own limits for a migration of these small VMs (preparing the target
/// 300 s, then the send 150 s per GiB, at least one, plus 120 s), so that a migration ends by
/// the hub's decision, not the test's.
const MIGRATION_PATIENCE: Duration = Duration::from_secs(600);

async fn gql(hub: &HubProcess, query: &str, variables: Value) -> Value {
    hub.gql(query, variables).await
}

fn declare(data_dir: &Path, guest: &Path, name: &str, knobs: &str) -> PathBuf {
    let dir = data_dir.join("vms/web").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = json!({
        "namespace": "web", "name": name, "memoryBytes": 128u64 << 20, "vcpus": 1,
        "disks": [{"name": "root", "sizeBytes": 32u64 << 20}],
        "interfaces": [{"name": "nic0", "network": "default", "mac": "02:00:00:00:b0:01"}],
        "runStrategy": "Always",
        "boot": {
            "kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"),
            "cmdline": format!("console=ttyS0 quiet panic=-1 drover.disk_writes=1 {knobs}"),
        },
    });
    std::fs::write(dir.join("vm.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    dir
}

async fn vm_phase(hub: &HubProcess, cluster: &str, name: &str) -> Option<String> {
    let v = gql(
        hub,
        "query($c: String!, $n: String!) { virtualMachine(cluster: $c, namespace: \"web\", name: $n) { phase } }",
        json!({"c": cluster, "n": name}),
    )
    .await;
    v["data"]["virtualMachine"]["phase"]
        .as_str()
        .map(str::to_owned)
}

const MIGRATION: &str = r#"query($id: ID!) { migration(id: $id) {
  id traceId phase failureReason sourceClusterName targetClusterName phaseTimestamps { phase at }
  progress { bytesTotal bytesTransferred }
} }"#;

async fn start_migration(hub: &HubProcess, name: &str, from: &str, to: &str) -> String {
    let started = gql(
        hub,
        r#"mutation($in: MigrateVirtualMachineInput!) { migrateVirtualMachine(input: $in) { id phase } }"#,
        json!({"in": {"cluster": from, "namespace": "web", "name": name, "targetCluster": to}}),
    )
    .await;
    started["data"]["migrateVirtualMachine"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("migrateVirtualMachine: {started}"))
        .to_owned()
}

/// Migrates `name` from `from` to `to` and waits for the outcome; returns the migration.
async fn migrate(hub: &HubProcess, name: &str, from: &str, to: &str) -> Value {
    let id = start_migration(hub, name, from, to).await;
    wait_for_end(hub, &id).await
}

async fn wait_for_end(hub: &HubProcess, id: &str) -> Value {
    let mut last = Value::Null;
    let deadline = tokio::time::Instant::now() + MIGRATION_PATIENCE;
    while tokio::time::Instant::now() < deadline {
        last = gql(hub, MIGRATION, json!({"id": id})).await["data"]["migration"].clone();
        if last["phase"] == "SUCCEEDED" || last["phase"] == "FAILED" {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the migration did not end within {MIGRATION_PATIENCE:?}: {last}");
}

/// Every `drover-seq N` record up to `upto` is in block N of the qcow2 disk.
fn disk_has_records(disk: &Path, upto: u64) {
    let raw = disk.with_extension("raw");
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(disk)
        .arg(&raw)
        .status()
        .unwrap()
        .success();
    assert!(ok, "qemu-img convert {}", disk.display());
    let bytes = std::fs::read(&raw).unwrap();
    let _ = std::fs::remove_file(&raw);
    for n in 0..upto as usize {
        let block = &bytes[n * 512..n * 512 + 22];
        assert_eq!(
            std::str::from_utf8(block).unwrap_or("<binary>"),
            format!("drover-seq {n:010}\n"),
            "record {n} on the target disk"
        );
    }
}

/// The spans the hub and both agents exported for migration `m` form one trace: the hub's
/// root and phase spans, the source's send with its steps, the target's receive with its steps,
/// each linked to its parent across processes (commands carry the hub's span, the sync channel
/// carries the sender's).
async fn assert_one_trace(traces: &OtlpReceiver, m: &Value, source: &str, target: &str) {
    let trace_id = m["traceId"]
        .as_str()
        .unwrap_or_else(|| panic!("traceId: {m}"));
    assert_eq!(trace_id.len(), 32, "{trace_id}");
    const HUB: [&str; 6] = [
        "phase Pending",
        "phase Scheduling",
        "phase Scheduled",
        "phase PreparingTarget",
        "phase TargetReady",
        "phase Running",
    ];
    const SOURCE: [&str; 6] = [
        "send",
        "prepare target",
        "transfer",
        "disk copy",
        "memory copy",
        "switchover",
    ];
    const TARGET: [&str; 4] = ["prepare receiver", "receive", "prepare vm", "take over"];
    let has = |spans: &[ReceivedSpan], name: &str| spans.iter().any(|s| s.name == name);
    let spans = traces
        .wait_for_trace(trace_id, Duration::from_secs(60), |spans| {
            spans.iter().any(|s| s.parent_span_id.is_empty())
                && HUB
                    .iter()
                    .chain(&SOURCE)
                    .chain(&TARGET)
                    .all(|n| has(spans, n))
        })
        .await;
    let names: Vec<(&str, &str)> = spans
        .iter()
        .map(|s| (s.service.as_str(), s.name.as_str()))
        .collect();
    let one = |name: &str| -> &ReceivedSpan {
        let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one span {name:?} in the trace: {names:?}");
        found[0]
    };
    let roots: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root span: {names:?}");
    let root = roots[0];
    assert_eq!(root.service, "drover-hub");
    assert_eq!(root.attributes["drover.result"], "Succeeded", "{root:?}");
    assert_eq!(root.attributes["drover.source.cluster"], source);
    assert_eq!(root.attributes["drover.target.cluster"], target);
    assert!(
        root.attributes["drover.bytes.transferred"]
            .parse::<u64>()
            .unwrap()
            > 0,
        "{root:?}"
    );
    for name in HUB {
        let span = one(name);
        assert_eq!(span.service, "drover-hub", "{span:?}");
        assert_eq!(
            span.parent_span_id, root.span_id,
            "{name} is a child of the root"
        );
    }
    for (side, names) in [(source, &SOURCE[..]), (target, &TARGET[..])] {
        for name in names {
            let span = one(name);
            assert_eq!(span.service, "drover-agent", "{span:?}");
            assert_eq!(
                span.attributes["drover.cluster"], side,
                "{name} runs on {side}"
            );
            assert_ne!(span.status_code, 2, "{name} ended well: {span:?}");
        }
    }
    // Every span's parent is in the trace, and the links cross processes as they should.
    for span in &spans {
        assert!(
            span.parent_span_id.is_empty()
                || spans.iter().any(|p| p.span_id == span.parent_span_id),
            "the parent of {:?} is in the trace: {names:?}",
            span.name
        );
    }
    assert_eq!(one("send").parent_span_id, one("phase Running").span_id);
    assert_eq!(
        one("prepare receiver").parent_span_id,
        one("phase PreparingTarget").span_id
    );
    assert_eq!(
        one("receive").parent_span_id,
        one("send").span_id,
        "the sync channel carried the sender's span"
    );
    for step in ["prepare target", "transfer", "switchover"] {
        assert_eq!(one(step).parent_span_id, one("send").span_id, "{step}");
    }
    for step in ["disk copy", "memory copy"] {
        assert_eq!(one(step).parent_span_id, one("transfer").span_id, "{step}");
    }
    assert!(
        one("disk copy").attributes["drover.bytes"]
            .parse::<u64>()
            .unwrap()
            > 0
    );
    let downtime: u64 = one("switchover").attributes["drover.downtime_ms"]
        .parse()
        .unwrap();
    assert!(downtime < 5_000, "downtime {downtime} ms");
    assert!(one("send").attributes.contains_key("drover.downtime_ms"));
}

/// A hub and two agents (east-1 with the guest `vm` declared, west-1 empty) as real processes,
/// ready: the guest runs and west-1 is Ready with its sync endpoint. Fields drop in order: the
/// reaper kills the guests before their directories go.
struct Fleet {
    _reaper: QemuReaper,
    /// Where the hub and both agents export their spans.
    traces: OtlpReceiver,
    _east: AgentProcess,
    west: AgentProcess,
    hub: HubProcess,
    source_vm: PathBuf,
    east_dir: tempfile::TempDir,
    west_dir: tempfile::TempDir,
    _hub_dir: tempfile::TempDir,
}

async fn fleet(vm: &str, knobs: &str, east_args: &[&str], west_args: &[&str]) -> Fleet {
    let guest = test_guest();
    let hub_dir = tempfile::tempdir().unwrap();
    let (east_dir, west_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let reaper = QemuReaper(vec![east_dir.path().into(), west_dir.path().into()]);
    let source_vm = declare(east_dir.path(), &guest, vm, knobs);
    let traces = OtlpReceiver::start().await;
    let otlp = ["--otlp-endpoint", traces.endpoint.as_str()];
    let hub_args: Vec<&str> = HUB_TIMING.iter().copied().chain(otlp).collect();
    let east_args: Vec<&str> = east_args.iter().copied().chain(otlp).collect();
    let west_args: Vec<&str> = west_args.iter().copied().chain(otlp).collect();
    let hub = HubProcess::start_with_args(hub_dir.path(), None, 0, &hub_args).await;
    let http = reqwest::Client::new();
    let east_token = hub.create_join_token(&http, "east-1").await.unwrap();
    let west_token = hub.create_join_token(&http, "west-1").await.unwrap();
    let east = AgentProcess::start_with_args(
        east_dir.path(),
        &hub.agents,
        Some(("east-1", &east_token)),
        &east_args,
    )
    .await;
    let west = AgentProcess::start_with_args(
        west_dir.path(),
        &hub.agents,
        Some(("west-1", &west_token)),
        &west_args,
    )
    .await;
    eventually("the guest RUNNING and west-1 READY", PATIENCE, async || {
        let w = gql(
            &hub,
            r#"{ cluster(name: "west-1") { health syncEndpoint } }"#,
            json!({}),
        )
        .await;
        vm_phase(&hub, "east-1", vm).await.as_deref() == Some("RUNNING")
            && w["data"]["cluster"]["health"] == "READY"
            && w["data"]["cluster"]["syncEndpoint"].is_string()
    })
    .await;
    Fleet {
        _reaper: reaper,
        traces,
        _east: east,
        west,
        hub,
        source_vm,
        east_dir,
        west_dir,
        _hub_dir: hub_dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_moves_between_clusters_and_back_without_stopping() {
    let f = fleet(
        "mover",
        "drover.dirty_mib_per_s=1 drover.dirty_buffer_mib=8",
        &[],
        &[],
    )
    .await;
    let (hub, east_dir, west_dir, source_vm) = (&f.hub, &f.east_dir, &f.west_dir, &f.source_vm);
    eventually("the guest counting", PATIENCE, async || {
        guest_console(source_vm).0.is_some_and(|n| n >= 20)
    })
    .await;

    // east-1 -> west-1
    let m = migrate(hub, "mover", "east-1", "west-1").await;
    assert_eq!(m["phase"], "SUCCEEDED", "{m}");
    assert_one_trace(&f.traces, &m, "east-1", "west-1").await;
    let phases: Vec<&str> = m["phaseTimestamps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    for expected in [
        "PENDING",
        "SCHEDULED",
        "PREPARING_TARGET",
        "TARGET_READY",
        "RUNNING",
        "SUCCEEDED",
    ] {
        assert!(
            phases.contains(&expected),
            "phase {expected} recorded: {phases:?}"
        );
    }
    assert!(
        !source_vm.exists(),
        "the source VM is removed after switchover"
    );
    assert!(
        QemuReaper::running(east_dir.path()).is_empty(),
        "no QEMU left on the source"
    );
    let target_vm = west_dir.path().join("vms/web/mover");
    assert_eq!(
        QemuReaper::running(west_dir.path()).len(),
        1,
        "exactly one copy runs"
    );

    // The guest kept counting on the target, without booting again: its counter carries on
    // from where it was on the source (a reboot would start again at 0 and print a banner).
    eventually("the guest counting on the target", PATIENCE, async || {
        guest_console(&target_vm).0.is_some()
    })
    .await;
    let (first_on_target, banners) = guest_console(&target_vm);
    assert_eq!(
        banners, 0,
        "the target never booted the guest: it resumed it"
    );
    let first = first_on_target.unwrap();
    assert!(
        first >= 20,
        "the counter continued from the source's ({first})"
    );
    // It keeps counting there (however slowly the machine runs it).
    eventually(
        "the guest counting on, on the target",
        PATIENCE,
        async || guest_console(&target_vm).0 > Some(first),
    )
    .await;
    eventually("the hub sees the VM on west-1 only", PATIENCE, async || {
        vm_phase(hub, "west-1", "mover").await.as_deref() == Some("RUNNING")
            && vm_phase(hub, "east-1", "mover").await.is_none()
    })
    .await;
    // Every record written before and during the migration is on the target's disk.
    disk_has_records(&target_vm.join("disk-root.qcow2"), first);

    // And back: west-1 -> east-1.
    let back = migrate(hub, "mover", "west-1", "east-1").await;
    assert_eq!(back["phase"], "SUCCEEDED", "{back}");
    assert!(!target_vm.exists());
    assert_eq!(QemuReaper::running(east_dir.path()).len(), 1);
    assert!(QemuReaper::running(west_dir.path()).is_empty());
    let history = gql(
        hub,
        r#"{ migrations(first: 10) { edges { node { phase sourceClusterName targetClusterName } } } }"#,
        json!({}),
    )
    .await;
    let moves: Vec<(String, String, String)> = history["data"]["migrations"]["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("{history}"))
        .iter()
        .map(|e| {
            let n = &e["node"];
            let s = |k: &str| n[k].as_str().unwrap_or_default().to_owned();
            (s("phase"), s("sourceClusterName"), s("targetClusterName"))
        })
        .collect();
    assert_eq!(moves.len(), 2, "the VM's migration history: {history}");
    assert!(moves.iter().all(|m| m.0 == "SUCCEEDED"), "{moves:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_a_killed_target_leave_the_source_running_and_nothing_on_the_target() {
    let mut f = fleet(
        "slow",
        "drover.dirty_mib_per_s=1 drover.dirty_buffer_mib=32",
        &["--bandwidth-per-migration", "1048576"],
        &[],
    )
    .await;
    let (hub, east_dir, west_dir, source_vm) = (&f.hub, &f.east_dir, &f.west_dir, &f.source_vm);
    let receiving = async || !QemuReaper::running(west_dir.path()).is_empty();
    let phase = async |id: &str| {
        gql(hub, MIGRATION, json!({"id": id})).await["data"]["migration"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };

    // Cancel mid-transfer.
    let id = start_migration(hub, "slow", "east-1", "west-1").await;
    eventually("the transfer running", PATIENCE, async || {
        phase(&id).await == "RUNNING" && receiving().await
    })
    .await;
    let cancelled = gql(
        hub,
        "mutation($id: ID!) { cancelMigration(id: $id) { phase failureReason } }",
        json!({"id": id}),
    )
    .await;
    // The transfer was running: the cancel is recorded at once, the source's answer ends it.
    // The reason names the real caller: the test's admin token.
    let reason = format!("cancelled by token:{}", hub.token_name);
    assert_eq!(
        cancelled["data"]["cancelMigration"]["failureReason"], reason,
        "{cancelled}"
    );
    let ended = wait_for_end(hub, &id).await;
    assert_eq!(ended["phase"], "FAILED", "{ended}");
    assert_eq!(ended["failureReason"], reason, "{ended}");
    // Its trace says so too: the root span failed with the reason, the source's send span
    // ended in error, and both sides ran their cancel under the migration's trace.
    let trace_id = ended["traceId"].as_str().unwrap().to_owned();
    let spans = f
        .traces
        .wait_for_trace(&trace_id, Duration::from_secs(60), |spans| {
            spans.iter().any(|s| s.parent_span_id.is_empty())
                && spans.iter().filter(|s| s.name == "cancel").count() == 2
                && spans.iter().any(|s| s.name == "send")
        })
        .await;
    let root = spans
        .iter()
        .find(|s| s.parent_span_id.is_empty())
        .unwrap_or_else(|| panic!("a root span: {spans:?}"));
    assert_eq!(root.status_code, 2, "{root:?}");
    assert_eq!(root.attributes["drover.result"], "Failed");
    assert!(root.status_message.contains(&reason), "{root:?}");
    let send = spans.iter().find(|s| s.name == "send").unwrap();
    assert_eq!(send.status_code, 2, "{send:?}");
    let cancels: Vec<&str> = spans
        .iter()
        .filter(|s| s.name == "cancel")
        .map(|s| s.attributes["drover.cluster"].as_str())
        .collect();
    assert!(
        cancels.contains(&"east-1") && cancels.contains(&"west-1"),
        "{cancels:?}"
    );
    eventually("nothing left on the target", PATIENCE, async || {
        QemuReaper::running(west_dir.path()).is_empty()
            && !west_dir.path().join("vms/web/slow").exists()
    })
    .await;
    assert_eq!(
        QemuReaper::running(east_dir.path()).len(),
        1,
        "one copy, on the source"
    );
    let before = guest_console(source_vm).0;
    eventually("the source keeps counting", PATIENCE, async || {
        guest_console(source_vm).0 > before
    })
    .await;
    eventually(
        "the hub sees slow RUNNING on the source again",
        PATIENCE,
        async || vm_phase(hub, "east-1", "slow").await.as_deref() == Some("RUNNING"),
    )
    .await;

    // kill -9 the target agent mid-transfer: the migration fails, the source keeps running, and
    // the restarted target agent removes what was left.
    let id = start_migration(hub, "slow", "east-1", "west-1").await;
    eventually("the second transfer running", PATIENCE, async || {
        phase(&id).await == "RUNNING" && receiving().await
    })
    .await;
    f.west.kill9().await;
    let ended = wait_for_end(hub, &id).await;
    assert_eq!(ended["phase"], "FAILED", "{ended}");
    assert_eq!(QemuReaper::running(east_dir.path()).len(), 1);
    let before = guest_console(source_vm).0;
    eventually(
        "the source keeps counting after the failure",
        PATIENCE,
        async || guest_console(source_vm).0 > before,
    )
    .await;
    let _west = AgentProcess::start(west_dir.path(), &hub.agents, None).await;
    eventually("the restarted target cleaned up", PATIENCE, async || {
        QemuReaper::running(west_dir.path()).is_empty()
            && !west_dir.path().join("vms/web/slow").exists()
    })
    .await;
    eventually("the hub sees the VM on east-1 only", PATIENCE, async || {
        vm_phase(hub, "east-1", "slow").await.as_deref() == Some("RUNNING")
            && vm_phase(hub, "west-1", "slow").await.is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_cut_between_the_agents_fails_cleanly() {
    let guest = test_guest();
    let hub_dir = tempfile::tempdir().unwrap();
    let (east_dir, west_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _reaper = QemuReaper(vec![east_dir.path().into(), west_dir.path().into()]);
    let source_vm = declare(
        east_dir.path(),
        &guest,
        "cut",
        "drover.dirty_mib_per_s=1 drover.dirty_buffer_mib=32",
    );
    // west's sync endpoint is reached through a proxy the test can cut.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let proxy = CuttableProxy::start(listen.parse().unwrap()).await.unwrap();
    let advertise = proxy.addr.to_string();
    let hub = HubProcess::start_with_args(hub_dir.path(), None, 0, HUB_TIMING).await;
    let http = reqwest::Client::new();
    let east_token = hub.create_join_token(&http, "east-1").await.unwrap();
    let west_token = hub.create_join_token(&http, "west-1").await.unwrap();
    let _east = AgentProcess::start_with_args(
        east_dir.path(),
        &hub.agents,
        Some(("east-1", &east_token)),
        &["--bandwidth-per-migration", "1048576"],
    )
    .await;
    let _west = AgentProcess::start_with_args(
        west_dir.path(),
        &hub.agents,
        Some(("west-1", &west_token)),
        &["--sync-listen", &listen, "--sync-advertise", &advertise],
    )
    .await;
    eventually("the guest RUNNING and west-1 READY", PATIENCE, async || {
        let w = gql(&hub, r#"{ cluster(name: "west-1") { health } }"#, json!({})).await;
        vm_phase(&hub, "east-1", "cut").await.as_deref() == Some("RUNNING")
            && w["data"]["cluster"]["health"] == "READY"
    })
    .await;
    let id = start_migration(&hub, "cut", "east-1", "west-1").await;
    eventually("the transfer running", PATIENCE, async || {
        let m = gql(&hub, MIGRATION, json!({"id": id})).await;
        m["data"]["migration"]["phase"] == "RUNNING"
            && !QemuReaper::running(west_dir.path()).is_empty()
    })
    .await;
    proxy.cut();
    let ended = wait_for_end(&hub, &id).await;
    assert_eq!(ended["phase"], "FAILED", "{ended}");
    assert!(
        !ended["failureReason"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{ended}"
    );
    eventually("nothing left on the target", PATIENCE, async || {
        QemuReaper::running(west_dir.path()).is_empty()
            && !west_dir.path().join("vms/web/cut").exists()
    })
    .await;
    assert_eq!(
        QemuReaper::running(east_dir.path()).len(),
        1,
        "one copy, on the source"
    );
    let before = guest_console(&source_vm).0;
    eventually("the source keeps counting", PATIENCE, async || {
        guest_console(&source_vm).0 > before
    })
    .await;
    eventually(
        "the hub sees cut RUNNING on the source again",
        PATIENCE,
        async || vm_phase(&hub, "east-1", "cut").await.as_deref() == Some("RUNNING"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_dirtying_faster_than_the_link_fails_with_the_reason() {
    let f = fleet(
        "busy",
        // 1 MiB/s against a guest asked to rewrite 16 MiB/s of an 8 MiB buffer: even a guest
        // slowed down several times by a busy machine re-dirties its whole buffer in every
        // pass (each takes 8 s), so its memory never converges and the send must give up.
        "drover.dirty_mib_per_s=16 drover.dirty_buffer_mib=8",
        &[
            "--bandwidth-per-migration",
            "1048576",
            "--progress-timeout-secs",
            "10",
        ],
        &[],
    )
    .await;
    let (hub, east_dir, west_dir, _) = (&f.hub, &f.east_dir, &f.west_dir, &f.source_vm);
    let m = migrate(hub, "busy", "east-1", "west-1").await;
    assert_eq!(m["phase"], "FAILED", "{m}");
    let reason = m["failureReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("faster than the link") && reason.contains("auto-converge"),
        "the reason says why: {reason}"
    );
    eventually("nothing left on the target", PATIENCE, async || {
        QemuReaper::running(west_dir.path()).is_empty()
            && !west_dir.path().join("vms/web/busy").exists()
    })
    .await;
    assert_eq!(
        QemuReaper::running(east_dir.path()).len(),
        1,
        "one copy, on the source"
    );
    eventually(
        "the hub sees busy RUNNING on the source again",
        PATIENCE,
        async || vm_phase(hub, "east-1", "busy").await.as_deref() == Some("RUNNING"),
    )
    .await;
}
