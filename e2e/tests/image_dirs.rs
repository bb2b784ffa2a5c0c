//! The agent reads disk images and boot files only from its `--image-dir` directories, through
//! the path a caller takes: `createVirtualMachine` on a real hub, a real agent process. A disk
//! image outside (the agent's own private key), a symlink inside the directory that leads to
//! that key, and a kernel outside are refused with an error naming the allowed directory and
//! the flag, leaving no VM directory behind; an image inside is copied into the VM's disk.

use std::path::Path;
use std::time::Duration;

use drover_e2e::agents::eventually;
use drover_e2e::process::{AgentProcess, HubProcess, QemuReaper};
use serde_json::{json, Value};

const PATIENCE: Duration = Duration::from_secs(180);

/// Creates `web/<name>` (Halted: nothing boots) on cluster east-1 and returns the command's
/// (state, message).
async fn create(
    hub: &HubProcess,
    name: &str,
    image: &Path,
    kernel: Option<&Path>,
) -> (String, String) {
    let mut input = json!({
        "cluster": "east-1", "namespace": "web", "name": name,
        "memoryBytes": 64u64 << 20, "vcpus": 1,
        "disks": [{"name": "root", "sizeBytes": 4u64 << 20, "image": image}],
        "runStrategy": "HALTED",
        "idempotencyKey": format!("create-{name}"),
        "waitSeconds": 120,
    });
    if let Some(kernel) = kernel {
        input["boot"] = json!({"kernel": kernel});
    }
    let answer: Value = hub
        .gql(
            r#"mutation($input: CreateVirtualMachineInput!) {
                 createVirtualMachine(input: $input) { state message } }"#,
            json!({"input": input}),
        )
        .await;
    let outcome = &answer["data"]["createVirtualMachine"];
    (
        outcome["state"].as_str().unwrap_or_default().to_owned(),
        outcome["message"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_outside_the_image_dirs_are_refused_and_leave_nothing_behind() {
    let hub_dir = tempfile::tempdir().unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let _reaper = QemuReaper(vec![agent_dir.path().into()]);
    let inside = images.path().join("base.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&inside)
        .arg("1M")
        .status()
        .expect("run qemu-img");
    assert!(status.success());
    let agent_key = agent_dir.path().join("agent-key.pem");
    let escape = images.path().join("escape.qcow2");
    std::os::unix::fs::symlink(&agent_key, &escape).unwrap();

    let hub = HubProcess::start(hub_dir.path(), None).await;
    let token = hub
        .create_join_token(&reqwest::Client::new(), "east-1")
        .await
        .unwrap();
    let images_arg = images.path().to_str().unwrap();
    let _agent = AgentProcess::start_with_args(
        agent_dir.path(),
        &hub.agents,
        Some(("east-1", &token)),
        &["--image-dir", images_arg],
    )
    .await;
    eventually("east-1 READY", PATIENCE, async || {
        let v = hub
            .gql(r#"{ cluster(name: "east-1") { health } }"#, json!({}))
            .await;
        v["data"]["cluster"]["health"] == "READY"
    })
    .await;
    assert!(
        agent_key.is_file(),
        "the agent keeps its key in its data dir"
    );

    let vm_dir = |name: &str| agent_dir.path().join("vms/web").join(name);
    let refused = [
        ("key-image", agent_key.clone(), None),
        ("symlinked-key", escape.clone(), None),
        (
            "outside-kernel",
            inside.clone(),
            Some(Path::new("/etc/hostname")),
        ),
    ];
    for (name, image, kernel) in refused {
        let (state, message) = create(&hub, name, &image, kernel).await;
        assert_eq!(state, "FAILED", "{name}: {message}");
        for needle in [
            "outside the agent's image directories",
            images_arg,
            "--image-dir",
        ] {
            assert!(
                message.contains(needle),
                "{name}: {needle:?} missing from {message}"
            );
        }
        assert!(
            !vm_dir(name).exists(),
            "{name}: a VM directory was left behind"
        );
    }
    let (_, message) = create(&hub, "symlinked-key-again", &escape, None).await;
    assert!(
        message.contains(&format!(
            "resolves to {}",
            agent_key.canonicalize().unwrap().display()
        )),
        "the refusal says where the symlink leads: {message}"
    );

    let (state, message) = create(&hub, "from-image", &inside, None).await;
    assert_eq!(state, "SUCCEEDED", "{message}");
    let disk = vm_dir("from-image").join("disk-root.qcow2");
    assert!(
        disk.is_file(),
        "the image was copied into {}",
        disk.display()
    );
    assert!(
        !vm_dir("key-image").exists() && !vm_dir("symlinked-key").exists(),
        "refused VMs stay absent"
    );

    // An image inside whose backing file is outside (the agent's key): qemu-img would read the
    // key through it, so it is refused, saying so.
    let backed = images.path().join("backed.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&agent_key)
        .arg(&backed)
        .arg("1M")
        .status()
        .expect("run qemu-img");
    assert!(status.success());
    let (state, message) = create(&hub, "backed-by-key", &backed, None).await;
    assert_eq!(state, "FAILED", "{message}");
    assert!(
        message.contains("backing file") && message.contains("flatten"),
        "{message}"
    );
    let copied = vm_dir("backed-by-key").join("disk-root.qcow2");
    assert!(!copied.exists(), "nothing of the key was copied");
}
