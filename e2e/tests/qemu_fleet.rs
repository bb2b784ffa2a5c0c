//! A hub and two agents as real processes, with real QEMU guests (TCG): guests declared in the
//! agents' data dirs appear in GraphQL with the right sizes and MACs; a VM created by mutation
//! runs; kill -9 of the hub and a restart leave the inventory matching reality; kill -9 of an
//! agent makes its cluster Unreachable while its guests keep running, and the restarted agent
//! adopts them (same processes, never rebooted); stop and delete work through GraphQL.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_e2e::agents::eventually;
use drover_e2e::process::{guest_console, AgentProcess, HubProcess, QemuReaper};
use drover_e2e::testbed::test_guest;
use serde_json::{json, Value};

/// Heartbeats every second; 15 s of silence makes a cluster Unreachable. The limit is far above
/// any pause a busy machine causes (a late heartbeat must not make a live cluster Unreachable),
/// and short enough for the test that waits for it.
const HUB_TIMING: &[&str] = &[
    "--heartbeat-interval-secs",
    "1",
    "--silence-limit-secs",
    "15",
];

/// Waits for something that will happen: guests boot under TCG in seconds on an idle machine,
/// much later on a busy one.
const PATIENCE: Duration = Duration::from_secs(180);

async fn gql(hub: &HubProcess, query: &str, variables: Value) -> Value {
    hub.gql(query, variables).await
}

/// Declares a test-guest VM in an agent's data dir, as an operator would.
fn declare(data_dir: &Path, guest: &Path, name: &str, mac: &str, memory_mib: u64) -> PathBuf {
    let dir = data_dir.join("vms/web").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = json!({
        "namespace": "web",
        "name": name,
        "memoryBytes": memory_mib << 20,
        "vcpus": 1,
        "disks": [{"name": "root", "sizeBytes": 64u64 << 20}],
        "interfaces": [{"name": "nic0", "network": "default", "mac": mac}],
        "labels": {"app": "demo"},
        "runStrategy": "Always",
        "boot": {
            "kernel": guest.join("vmlinuz"),
            "initrd": guest.join("initramfs.gz"),
            "cmdline": "console=ttyS0 quiet panic=-1 drover.disk_writes=1",
        },
    });
    std::fs::write(
        dir.join("vm.json"),
        serde_json::to_vec_pretty(&spec).unwrap(),
    )
    .unwrap();
    dir
}

const CLUSTER: &str = r#"query($c: String!) { cluster(name: $c) {
  health runtime virtualizationVersion inventoryGeneration
  nodes { name cpuModel allocatableMemoryBytes allocatableCpuMillis requestedMemoryBytes }
  virtualMachines(first: 100) { totalCount edges { node {
    namespace name uid phase node memoryBytes vcpus
    disks { name sizeBytes } interfaces { name network macAddress } labels { key value } } } }
} }"#;

async fn cluster(hub: &HubProcess, name: &str) -> Value {
    gql(hub, CLUSTER, json!({"c": name})).await["data"]["cluster"].clone()
}

fn vms(cluster: &Value) -> Vec<Value> {
    cluster["virtualMachines"]["edges"]
        .as_array()
        .map(|edges| edges.iter().map(|e| e["node"].clone()).collect())
        .unwrap_or_default()
}

fn vm<'a>(cluster: &'a [Value], name: &str) -> Option<&'a Value> {
    cluster.iter().find(|v| v["name"] == name)
}

/// (name, uid, phase) of every VM, sorted: what must survive restarts unchanged.
fn identities(cluster: &Value) -> Vec<(String, String, String)> {
    let mut ids: Vec<_> = vms(cluster)
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap_or_default().to_owned(),
                v["uid"].as_str().unwrap_or_default().to_owned(),
                v["phase"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    ids.sort();
    ids
}

fn mem_total_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib * 1024
}

/// Waits until the guest in `vm_dir` has counted past where it was, proving it runs.
async fn guest_keeps_counting(vm_dir: &Path) {
    let (before, _) = guest_console(vm_dir);
    eventually(
        &format!("{} counting", vm_dir.display()),
        PATIENCE,
        async || guest_console(vm_dir).0 > before,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_and_two_agents_run_real_guests_through_restarts_and_kills() {
    let guest = test_guest();
    let hub_dir = tempfile::tempdir().unwrap();
    let (east_dir, west_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _reaper = QemuReaper(vec![east_dir.path().into(), west_dir.path().into()]);
    let east_vm = declare(
        east_dir.path(),
        &guest,
        "east-web-1",
        "02:00:00:00:e1:01",
        192,
    );
    let west_vm = declare(
        west_dir.path(),
        &guest,
        "west-web-1",
        "02:00:00:00:a1:01",
        160,
    );

    let mut hub = HubProcess::start_with_args(hub_dir.path(), None, 0, HUB_TIMING).await;
    let agent_port: u16 = hub.agents.rsplit(':').next().unwrap().parse().unwrap();
    let http = reqwest::Client::new();
    let east_token = hub.create_join_token(&http, "east-1").await.unwrap();
    let west_token = hub.create_join_token(&http, "west-1").await.unwrap();
    let mut east =
        AgentProcess::start(east_dir.path(), &hub.agents, Some(("east-1", &east_token))).await;
    let _west =
        AgentProcess::start(west_dir.path(), &hub.agents, Some(("west-1", &west_token))).await;

    // The declared guests appear, running, with their sizes, disks, MACs and the host's node.
    eventually(
        "both declared guests RUNNING in GraphQL",
        PATIENCE,
        async || {
            let (e, w) = (cluster(&hub, "east-1").await, cluster(&hub, "west-1").await);
            vm(&vms(&e), "east-web-1").is_some_and(|v| v["phase"] == "RUNNING")
                && vm(&vms(&w), "west-web-1").is_some_and(|v| v["phase"] == "RUNNING")
        },
    )
    .await;
    let east_view = cluster(&hub, "east-1").await;
    assert_eq!(east_view["health"], "READY");
    assert_eq!(east_view["runtime"], "QEMU");
    assert!(
        east_view["virtualizationVersion"]
            .as_str()
            .unwrap()
            .starts_with(char::is_numeric),
        "QEMU's version: {east_view}"
    );
    let node = &east_view["nodes"][0];
    assert!(!node["cpuModel"].as_str().unwrap().is_empty(), "{node}");
    assert_eq!(
        node["allocatableMemoryBytes"].as_u64().unwrap(),
        mem_total_bytes()
    );
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(node["allocatableCpuMillis"].as_u64().unwrap(), cores * 1000);
    let e1 = vm(&vms(&east_view), "east-web-1").unwrap().clone();
    assert_eq!(e1["memoryBytes"].as_u64().unwrap(), 192 << 20);
    assert_eq!(e1["vcpus"], 1);
    assert_eq!(
        e1["disks"],
        json!([{"name": "root", "sizeBytes": 64u64 << 20}])
    );
    assert_eq!(
        e1["interfaces"],
        json!([{"name": "nic0", "network": "default", "macAddress": "02:00:00:00:e1:01"}])
    );
    assert_eq!(e1["labels"], json!([{"key": "app", "value": "demo"}]));
    assert_eq!(e1["node"], node["name"]);
    assert_eq!(node["requestedMemoryBytes"].as_u64().unwrap(), 192 << 20);
    let west_view = cluster(&hub, "west-1").await;
    let w1 = vm(&vms(&west_view), "west-web-1").unwrap().clone();
    assert_eq!(w1["memoryBytes"].as_u64().unwrap(), 160 << 20);
    assert_eq!(w1["interfaces"][0]["macAddress"], "02:00:00:00:a1:01");
    guest_keeps_counting(&east_vm).await;
    guest_keeps_counting(&west_vm).await;

    // A VM created by mutation runs and shows up.
    let created = gql(
        &hub,
        r#"mutation($input: CreateVirtualMachineInput!) {
             createVirtualMachine(input: $input) { state message } }"#,
        json!({"input": {
            "cluster": "west-1", "namespace": "web", "name": "west-web-2",
            "memoryBytes": 128u64 << 20, "vcpus": 1,
            "disks": [{"name": "root", "sizeBytes": 32u64 << 20}],
            "interfaces": [{"name": "nic0", "macAddress": "02:00:00:00:a1:02"}],
            "boot": {
                "kernel": guest.join("vmlinuz"),
                "initrd": guest.join("initramfs.gz"),
                "cmdline": "console=ttyS0 quiet panic=-1",
            },
            "idempotencyKey": "create-west-web-2",
            // Answers as soon as the agent has; the long wait only matters on a slow machine.
            "waitSeconds": 300,
        }}),
    )
    .await;
    assert_eq!(
        created["data"]["createVirtualMachine"]["state"], "SUCCEEDED",
        "{created}"
    );
    let west_vm2 = west_dir.path().join("vms/web/west-web-2");
    eventually("the created VM RUNNING in GraphQL", PATIENCE, async || {
        vm(&vms(&cluster(&hub, "west-1").await), "west-web-2").is_some_and(|v| {
            v["phase"] == "RUNNING" && v["interfaces"][0]["macAddress"] == "02:00:00:00:a1:02"
        })
    })
    .await;
    guest_keeps_counting(&west_vm2).await;

    // kill -9 the hub and restart it: the agents reconnect, the inventory matches reality.
    let before_east = identities(&cluster(&hub, "east-1").await);
    let before_west = identities(&cluster(&hub, "west-1").await);
    assert_eq!(before_west.len(), 2);
    let generation = cluster(&hub, "west-1").await["inventoryGeneration"]
        .as_i64()
        .unwrap();
    hub.child.start_kill().unwrap();
    hub.child.wait().await.unwrap();
    hub = HubProcess::start_with_args(hub_dir.path(), None, agent_port, HUB_TIMING).await;
    eventually(
        "agents resynchronised with the new hub",
        PATIENCE,
        async || {
            let (e, w) = (cluster(&hub, "east-1").await, cluster(&hub, "west-1").await);
            e["health"] == "READY"
                && w["health"] == "READY"
                && w["inventoryGeneration"].as_i64().unwrap_or(0) > generation
        },
    )
    .await;
    assert_eq!(identities(&cluster(&hub, "east-1").await), before_east);
    assert_eq!(identities(&cluster(&hub, "west-1").await), before_west);

    // kill -9 the east agent: its cluster goes Unreachable, its guest keeps running.
    let pids_before = QemuReaper::running(east_dir.path());
    assert_eq!(pids_before.len(), 1, "one QEMU for east's one VM");
    east.kill9().await;
    eventually("east-1 UNREACHABLE", PATIENCE, async || {
        cluster(&hub, "east-1").await["health"] == "UNREACHABLE"
    })
    .await;
    assert_eq!(
        QemuReaper::running(east_dir.path()),
        pids_before,
        "the guest outlived its agent"
    );
    guest_keeps_counting(&east_vm).await;
    assert_eq!(
        identities(&cluster(&hub, "east-1").await),
        before_east,
        "inventory kept"
    );

    // The restarted agent (no token: its identity is stored) adopts the same guest.
    let generation = cluster(&hub, "east-1").await["inventoryGeneration"]
        .as_i64()
        .unwrap();
    let _east = AgentProcess::start(east_dir.path(), &hub.agents, None).await;
    eventually("east-1 READY again", PATIENCE, async || {
        let e = cluster(&hub, "east-1").await;
        e["health"] == "READY" && e["inventoryGeneration"].as_i64().unwrap_or(0) > generation
    })
    .await;
    assert_eq!(
        identities(&cluster(&hub, "east-1").await),
        before_east,
        "the same VMs"
    );
    assert_eq!(
        QemuReaper::running(east_dir.path()),
        pids_before,
        "the same QEMU process"
    );
    guest_keeps_counting(&east_vm).await;
    assert_eq!(
        guest_console(&east_vm).1,
        1,
        "the guest booted once: adopted, never restarted"
    );

    // Stop and delete through GraphQL.
    let stopped = gql(
        &hub,
        r#"mutation { stopVirtualMachine(cluster: "west-1", namespace: "web", name: "west-web-2", gracePeriodSeconds: 0, waitSeconds: 300) { state message } }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        stopped["data"]["stopVirtualMachine"]["state"], "SUCCEEDED",
        "{stopped}"
    );
    eventually("west-web-2 STOPPED", PATIENCE, async || {
        vm(&vms(&cluster(&hub, "west-1").await), "west-web-2")
            .is_some_and(|v| v["phase"] == "STOPPED")
    })
    .await;
    assert!(
        QemuReaper::running(west_dir.path())
            .iter()
            .all(|(dir, _)| dir != &west_vm2),
        "its QEMU is gone"
    );
    let deleted = gql(
        &hub,
        r#"mutation { deleteVirtualMachine(cluster: "west-1", namespace: "web", name: "west-web-2", waitSeconds: 300) { state message } }"#,
        json!({}),
    )
    .await;
    assert_eq!(
        deleted["data"]["deleteVirtualMachine"]["state"], "SUCCEEDED",
        "{deleted}"
    );
    eventually("west-web-2 gone from GraphQL", PATIENCE, async || {
        let w = cluster(&hub, "west-1").await;
        !w.is_null() && vm(&vms(&w), "west-web-2").is_none()
    })
    .await;
    assert!(!west_vm2.exists(), "its disks and files are gone");
}
