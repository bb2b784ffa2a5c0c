//! The quick start as a new user runs it: `scripts/quickstart.sh` with a non-default `--listen`
//! and `--agent-listen` (free ports), its state in a temporary directory and free sync ports
//! for its two demo agents. Both agents come up and everything the run listens on is loopback;
//! the script prints a GraphQL mutation, and that exact mutation, sent to the GraphQL URL the
//! script printed, live-migrates a demo guest to the other demo cluster. Stopping the script
//! (SIGTERM to its process group) leaves no hub, agent or QEMU process of the run behind.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use drover_e2e::testbed::binary;
use serde_json::{json, Value};

/// Building nothing (the binaries are given), seeding a tiny fleet, joining two agents and
/// booting two TCG guests: seconds on an idle machine, minutes on a busy one.
const STARTUP_PATIENCE: Duration = Duration::from_secs(300);
/// Longer than the hub's own limits for a migration of a small VM, so that it ends by the
/// hub's decision.
const MIGRATION_PATIENCE: Duration = Duration::from_secs(600);
/// The script stops its agents (10 s each at most) and guests, then exits.
const STOP_PATIENCE: Duration = Duration::from_secs(60);

/// A free loopback port (free when asked; the script binds it moments later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Two consecutive free ports, for the agents' sync endpoints (the script numbers them from a
/// base).
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let first = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free ports in 100 tries");
}

/// Pids of the processes whose command line or environment names `marker` (this run's
/// temporary directory): the script, the hub, the agents, their QEMU guests.
fn processes_naming(marker: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let read = |file: &str| {
            std::fs::read(entry.path().join(file))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default()
        };
        // A zombie has no command line and is no longer running.
        let stat = read("stat");
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmdline = read("cmdline");
        if cmdline.contains(marker) || read("environ").contains(marker) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// The TCP sockets these processes listen on, as (address, port) pairs.
fn listening_sockets(pids: &[u32]) -> Vec<(String, u16)> {
    let mut inodes = std::collections::BTreeSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy().into_owned();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address st ... inode: state 0A is LISTEN.
            if cols.len() < 10 || cols[3] != "0A" || !inodes.contains(cols[9]) {
                continue;
            }
            let (addr, port) = cols[1].split_once(':').expect("address:port");
            let port = u16::from_str_radix(port, 16).expect("a hex port");
            let addr = match addr {
                "0100007F" => "127.0.0.1".to_owned(),
                "00000000000000000000000001000000" => "::1".to_owned(),
                other => other.to_owned(),
            };
            sockets.push((addr, port));
        }
    }
    sockets
}

/// Kills the script's process group and whatever of the run is left, if the test ends early.
struct Run {
    child: Child,
    marker: String,
    stopped: bool,
}

impl Run {
    fn signal_group(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, "--", &format!("-{}", self.child.id())])
            .status();
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        self.signal_group("-KILL");
        let _ = self.child.wait();
        for (pid, _) in processes_naming(&self.marker) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

async fn post(
    http: &reqwest::Client,
    auth: Option<&str>,
    url: &str,
    query: &str,
    variables: Value,
) -> Value {
    let mut request = http.post(url);
    if let Some(header) = auth {
        request = request.header("authorization", header);
    }
    match request
        .json(&json!({"query": query, "variables": variables}))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_quick_start_comes_up_and_its_printed_mutation_migrates_a_demo_guest() {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let hub_bin = binary("drover-hub").expect("drover-hub is built");
    let bin_dir = hub_bin.parent().unwrap().to_path_buf();
    assert!(
        bin_dir.join("drover-agent").exists(),
        "drover-agent is not built next to {}: run `cargo build -p drover-hub -p drover-agent` first",
        hub_bin.display()
    );
    let tmp = tempfile::Builder::new()
        // Short: the agents' Unix sockets live under it (at most 107 bytes a path).
        .prefix("dq")
        .tempdir()
        .unwrap();
    let marker = tmp.path().to_string_lossy().into_owned();
    let (listen, agent_listen, sync_base) = (free_port(), free_port(), free_port_pair());

    let mut cmd = Command::new("bash");
    cmd.arg(workspace.join("scripts/quickstart.sh"))
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .args(["--agent-listen", &format!("127.0.0.1:{agent_listen}")])
        .current_dir(&workspace)
        .env("DROVER_DATA_DIR", tmp.path().join("data"))
        .env("DROVER_DEMO_DIR", tmp.path().join("a"))
        .env("DROVER_DEMO_SYNC_PORT_BASE", sync_base.to_string())
        .env("DROVER_QUICKSTART_BIN_DIR", &bin_dir)
        .env("DROVER_DEMO_CLUSTERS", "2")
        .env("DROVER_DEMO_VMS", "2")
        .env_remove("DROVER_LISTEN")
        .env_remove("DROVER_AGENT_LISTEN")
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().expect("run scripts/quickstart.sh");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut run = Run {
        child,
        marker: marker.clone(),
        stopped: false,
    };
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("[quickstart] {line}");
            let _ = lines_tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[quickstart:err] {line}");
        }
    });

    // The script says where GraphQL is and which mutation moves a guest.
    let deadline = Instant::now() + STARTUP_PATIENCE;
    let (mut graphql, mut mutation, mut auth) = (None::<String>, None::<String>, None::<String>);
    while mutation.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("GraphQL endpoint: ") {
                    graphql = rest.split_whitespace().next().map(str::to_owned);
                }
                if let Some(value) = line.trim().strip_prefix("Authorization: ") {
                    auth = Some(value.to_owned());
                }
                if line
                    .trim_start()
                    .starts_with("mutation { migrateVirtualMachine")
                {
                    mutation = Some(line.trim().to_owned());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the quick start printed no migration mutation within {STARTUP_PATIENCE:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                "the quick start ended before printing a migration mutation: {:?}",
                run.child.try_wait()
            ),
        }
    }
    let graphql = graphql.expect("the script printed its GraphQL endpoint before the mutation");
    let mutation = mutation.unwrap();
    assert_eq!(
        graphql,
        format!("http://127.0.0.1:{listen}/graphql"),
        "the printed endpoint follows --listen"
    );

    // Hub, two agents and two guests run, and every socket they listen on is loopback: the
    // API and agent endpoints on the ports given, the agents' sync endpoints on their own.
    let ours = processes_naming(&marker);
    let pids: Vec<u32> = ours.iter().map(|(pid, _)| *pid).collect();
    let count = |name: &str| ours.iter().filter(|(_, c)| c.contains(name)).count();
    assert_eq!(count("drover-hub serve"), 1, "one hub: {ours:#?}");
    assert_eq!(count("drover-agent"), 2, "both demo agents run: {ours:#?}");
    assert_eq!(count("qemu-system"), 2, "two demo guests run: {ours:#?}");
    let sockets = listening_sockets(&pids);
    for (addr, port) in &sockets {
        assert!(
            addr == "127.0.0.1" || addr == "::1",
            "{addr}:{port} is not loopback: {sockets:?}"
        );
    }
    let ports: Vec<u16> = sockets.iter().map(|(_, p)| *p).collect();
    for port in [listen, agent_listen, sync_base, sync_base + 1] {
        assert!(
            ports.contains(&port),
            "nothing listens on {port}: {sockets:?}"
        );
    }

    // The printed mutation, exactly, moves the guest.
    let http = reqwest::Client::new();
    let mut started = Value::Null;
    for _ in 0..10 {
        started = post(&http, auth.as_deref(), &graphql, &mutation, json!({})).await;
        if started["data"]["migrateVirtualMachine"]["id"].is_string() {
            break;
        }
        eprintln!("the mutation was not accepted yet: {started}");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let id = started["data"]["migrateVirtualMachine"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("the printed mutation did not start a migration: {started}"))
        .to_owned();
    let deadline = Instant::now() + MIGRATION_PATIENCE;
    let migration = loop {
        let m = post(
            &http,
            auth.as_deref(),
            &graphql,
            "query($id: ID!) { migration(id: $id) { phase failureReason sourceClusterName targetClusterName virtualMachine { namespace name } } }",
            json!({"id": id}),
        )
        .await["data"]["migration"]
            .clone();
        match m["phase"].as_str() {
            Some("SUCCEEDED") => break m,
            Some("FAILED") => panic!("the migration failed: {m}"),
            _ if Instant::now() > deadline => {
                panic!("the migration has not ended after {MIGRATION_PATIENCE:?}: {m}")
            }
            _ => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    };
    let (source, target) = (
        migration["sourceClusterName"].as_str().unwrap().to_owned(),
        migration["targetClusterName"].as_str().unwrap().to_owned(),
    );
    let name = migration["virtualMachine"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(source, target);
    assert!(source.starts_with("demo-") && target.starts_with("demo-"));
    let deadline = Instant::now() + STARTUP_PATIENCE;
    loop {
        let vms = post(
            &http,
            auth.as_deref(),
            &graphql,
            r#"{ virtualMachines(filter: {namespace: "demo"}) { edges { node { cluster { name } name phase } } } }"#,
            json!({}),
        )
        .await;
        let edges = vms["data"]["virtualMachines"]["edges"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let placed: Vec<(String, String)> = edges
            .iter()
            .filter(|e| e["node"]["name"] == name.as_str())
            .map(|e| {
                (
                    e["node"]["cluster"]["name"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                    e["node"]["phase"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        if placed == [(target.clone(), "RUNNING".to_owned())] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name} does not run on {target} only: {placed:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(
        Path::new(&marker)
            .join("a")
            .join(&target)
            .join("vms/demo")
            .join(&name)
            .join("qemu.pid")
            .exists(),
        "the guest's QEMU runs in {target}'s data dir"
    );

    // Stopping the script stops everything it started, guests included.
    let before = processes_naming(&marker);
    eprintln!("processes of this run before stopping: {before:#?}");
    run.signal_group("-TERM");
    let deadline = Instant::now() + STOP_PATIENCE;
    let status = loop {
        if let Some(status) = run.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the quick start did not exit within {STOP_PATIENCE:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("the quick start exited: {status}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_naming(&marker);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes of this run outlived the quick start: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (pid, cmdline) in &before {
        assert!(
            cmdline.trim().is_empty()
                || !std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                    .unwrap_or_default()
                    .contains(cmdline.trim()),
            "{pid} ({cmdline}) still runs"
        );
    }
    run.stopped = true;
}
