//! Fleets of real QEMU test guests for the evacuation tests: declaring the guests on a
//! cluster's agent, where the hub sees them, and whether a moved guest kept running (or what
//! it showed when it did not).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::agents::eventually;
use crate::process::{guest_console, HubProcess};

/// Declares the running VM `web/app-<index>` (128 MiB, one vCPU, a 16 MiB disk) on the agent
/// of `data_dir`, booting the test guest, which counts on its console and dirties 1 MiB/s.
pub fn declare_guest(data_dir: &Path, guest: &Path, index: usize) {
    let name = format!("app-{index}");
    let dir = data_dir.join("vms/web").join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let spec = json!({
        "namespace": "web", "name": name, "memoryBytes": 128u64 << 20, "vcpus": 1,
        "disks": [{"name": "root", "sizeBytes": 16u64 << 20}],
        "interfaces": [{"name": "nic0", "network": "default", "mac": format!("02:00:00:00:e0:{index:02x}")}],
        "runStrategy": "Always",
        "boot": {
            "kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"),
            "cmdline": "console=ttyS0 quiet panic=-1 drover.dirty_mib_per_s=1 drover.dirty_buffer_mib=8",
        },
    });
    std::fs::write(dir.join("vm.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
}

/// (name, phase) of every VM the hub reports on `cluster`.
pub async fn vms_on(hub: &HubProcess, cluster: &str) -> Vec<(String, String)> {
    let v = hub
        .gql(
            r#"query($c: String!) { virtualMachines(first: 100, filter: {cluster: $c}) { edges { node { name phase } } } }"#,
            json!({"c": cluster}),
        )
        .await;
    v["data"]["virtualMachines"]["edges"]
        .as_array()
        .map(|edges| {
            edges
                .iter()
                .map(|e| {
                    (
                        e["node"]["name"].as_str().unwrap_or_default().to_owned(),
                        e["node"]["phase"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the hub sees `clusters` clusters READY with a sync endpoint and `vms` guests
/// (`web/app-0`, ...) RUNNING on `source`, then until each counts on its console in
/// `source_dir`. Several TCG guests booting at once on two busy cores take time: five minutes
/// each.
pub async fn wait_until_counting(
    hub: &HubProcess,
    clusters: usize,
    source: &str,
    source_dir: &Path,
    vms: usize,
) {
    eventually(
        "the guests RUNNING on their cluster and every cluster ready",
        Duration::from_secs(300),
        async || {
            let ready = hub
                .gql(
                    r#"{ clusters { edges { node { health syncEndpoint } } } }"#,
                    json!({}),
                )
                .await;
            let all_ready = ready["data"]["clusters"]["edges"]
                .as_array()
                .is_some_and(|e| {
                    e.len() == clusters
                        && e.iter().all(|c| {
                            c["node"]["health"] == "READY" && c["node"]["syncEndpoint"].is_string()
                        })
                });
            all_ready
                && vms_on(hub, source)
                    .await
                    .iter()
                    .filter(|v| v.1 == "RUNNING")
                    .count()
                    == vms
        },
    )
    .await;
    eventually(
        "the guests counting",
        Duration::from_secs(300),
        async || {
            (0..vms).all(|i| {
                guest_console(&source_dir.join(format!("vms/web/app-{i}")))
                    .0
                    .is_some_and(|n| n >= 10)
            })
        },
    )
    .await;
}

/// Panics unless the guest in `vm_dir` (moved there) counts on and never booted there: it
/// resumed where it was. Waits up to two minutes for it to count; a failure shows what the
/// guest printed.
pub async fn assert_resumed(name: &str, vm_dir: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while guest_console(vm_dir).0.is_none_or(|n| n < 10) {
        if std::time::Instant::now() > deadline {
            panic!(
                "{name} stopped counting on its target:\n{}",
                guest_report(vm_dir)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, banners) = guest_console(vm_dir);
    if banners != 0 {
        // What the guest printed before it booted again (its kernel's last words).
        let console = std::fs::read_to_string(vm_dir.join("serial.log")).unwrap_or_default();
        let lines: Vec<&str> = console.lines().collect();
        let boot = lines
            .iter()
            .position(|l| l.contains("drover-guest: up"))
            .unwrap_or(lines.len());
        panic!(
            "{name} booted on its target instead of resuming; its console before that boot:\n{}",
            lines[boot.saturating_sub(40)..(boot + 3).min(lines.len())].join("\n")
        );
    }
}

/// What a guest that went wrong shows: the end of its console, what QEMU printed, and whether
/// its QEMU still burns CPU (a vCPU spinning) or sits idle.
pub fn guest_report(vm_dir: &Path) -> String {
    let console = std::fs::read_to_string(vm_dir.join("serial.log")).unwrap_or_default();
    let lines: Vec<&str> = console.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    let qemu_log = std::fs::read_to_string(vm_dir.join("qemu.log")).unwrap_or_default();
    let pid = std::fs::read_to_string(vm_dir.join("qemu.pid")).unwrap_or_default();
    let cpu = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .ok()
            .map(|stat| {
                // After the command name: state, ..., utime (14th field), stime (15th).
                let fields: Vec<&str> = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                let field = |i: usize| fields.get(i).copied().unwrap_or("?");
                format!(
                    "state {} utime {} stime {} (clock ticks)",
                    field(0),
                    field(11),
                    field(12)
                )
            })
            .unwrap_or_else(|| "no such process".into())
    };
    let first = cpu(&pid);
    std::thread::sleep(Duration::from_secs(2));
    let second = cpu(&pid);
    format!(
        "console (last 30 lines):\n{tail}\nqemu.log:\n{qemu_log}\nQEMU pid {}: {first}; 2 s later: {second}",
        pid.trim()
    )
}

/// Every `data` of a `migrationEvents` subscription as (vmName, phase).
pub fn moves_seen(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let ev = &e["migrationEvents"];
            (
                ev["vmName"].as_str().unwrap_or_default().to_owned(),
                ev["phase"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}
