//! A real `drover-hub` process for tests and benchmarks: started on ephemeral loopback ports,
//! its addresses read from what it prints, killed when dropped.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::testbed::binary;

/// A running hub process, killed when dropped.
pub struct HubProcess {
    pub child: Child,
    /// An admin API token, made with `drover-hub token create` before the hub started.
    pub token: String,
    /// Its name (the hub records `token:<name>` as the actor of its requests).
    pub token_name: String,
    pub base: String,
    /// The agent endpoint, https://ADDR.
    pub agents: String,
}

impl HubProcess {
    pub async fn start(data_dir: &Path, database_url: Option<&str>) -> HubProcess {
        Self::start_with_agent_port(data_dir, database_url, 0).await
    }

    pub async fn start_with_agent_port(
        data_dir: &Path,
        database_url: Option<&str>,
        agent_port: u16,
    ) -> HubProcess {
        Self::start_with_args(data_dir, database_url, agent_port, &[]).await
    }

    /// Starts a hub with extra command-line arguments (e.g. shorter heartbeat timing).
    pub async fn start_with_args(
        data_dir: &Path,
        database_url: Option<&str>,
        agent_port: u16,
        extra: &[&str],
    ) -> HubProcess {
        let (token_name, token) = create_token(data_dir, database_url, "admin").await;
        let mut cmd = Command::new(binary("drover-hub").unwrap());
        cmd.args(extra);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--agent-listen")
            .arg(format!("127.0.0.1:{agent_port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(url) = database_url {
            cmd.env("DATABASE_URL", url);
        }
        let mut child = cmd.spawn().expect("start drover-hub");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Generous: a loaded CI machine may take long to start a process and migrate a store.
        let first = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .expect("drover-hub announces its address within 120 s")
            .unwrap()
            .expect("drover-hub printed a line");
        let base = first
            .strip_prefix("drover-hub listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .to_owned();
        let mut agents = String::new();
        for _ in 0..5 {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .expect("drover-hub prints its endpoints")
                .unwrap()
                .unwrap_or_default();
            if let Some(rest) = line.trim().strip_prefix("agents:") {
                agents = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                break;
            }
        }
        assert!(
            agents.starts_with("https://"),
            "the hub announces its agent endpoint"
        );
        // Keep draining stdout so the hub never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        HubProcess {
            child,
            token,
            token_name,
            base,
            agents,
        }
    }

    /// A GraphQL request over HTTP with this hub's admin token.
    pub async fn post_gql(
        &self,
        http: &reqwest::Client,
        query: &str,
    ) -> anyhow::Result<serde_json::Value> {
        crate::testbed::post_gql_as(http, &self.url("/graphql"), Some(&self.token), query).await
    }

    /// A join token for `cluster`, through the GraphQL mutation an operator would use.
    pub async fn create_join_token(
        &self,
        http: &reqwest::Client,
        cluster: &str,
    ) -> anyhow::Result<String> {
        let query = format!(r#"mutation {{ createJoinToken(cluster: "{cluster}") {{ token }} }}"#);
        let resp = self.post_gql(http, &query).await?;
        resp["data"]["createJoinToken"]["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("createJoinToken failed: {resp}"))
    }

    /// The hub's Prometheus exposition (`/metrics`).
    pub async fn metrics(&self, http: &reqwest::Client) -> String {
        http.get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics text")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A GraphQL request over HTTP; Null when the hub does not answer (it may be restarting).
    pub async fn gql(&self, query: &str, variables: serde_json::Value) -> serde_json::Value {
        let resp = reqwest::Client::new()
            .post(self.url("/graphql"))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({"query": query, "variables": variables}))
            .send()
            .await;
        match resp {
            Ok(r) => r.json().await.unwrap_or(serde_json::Value::Null),
            Err(_) => serde_json::Value::Null,
        }
    }
}

/// A real `drover-agent` process (the default `run` command), killed when dropped. The QEMU
/// processes it starts are not its children's children in its process group: they outlive it,
/// as they must (see `QemuReaper` for cleaning them up in tests).
pub struct AgentProcess {
    pub child: Child,
}

impl AgentProcess {
    /// Starts an agent on `data_dir` reporting to the hub's agent endpoint `hub`, with the
    /// QEMU runtime under TCG, taking images, kernels and initrds from the test guest's
    /// directory (`target/guest`); `join` is (cluster, token) for a first start.
    pub async fn start(data_dir: &Path, hub: &str, join: Option<(&str, &str)>) -> AgentProcess {
        Self::start_with_args(data_dir, hub, join, &[]).await
    }

    /// Starts an agent with extra command-line arguments (e.g. migration limits). Unless they
    /// name an `--image-dir`, the test guest's directory is the agent's image directory.
    pub async fn start_with_args(
        data_dir: &Path,
        hub: &str,
        join: Option<(&str, &str)>,
        extra: &[&str],
    ) -> AgentProcess {
        let mut cmd = Command::new(binary("drover-agent").unwrap());
        cmd.args(extra);
        if !extra.contains(&"--sync-listen") {
            cmd.args(["--sync-listen", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--image-dir") {
            cmd.arg("--image-dir").arg(crate::testbed::test_guest_dir());
        }
        cmd.arg("--hub")
            .arg(hub)
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--runtime", "qemu", "--accel", "tcg"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for var in [
            "DROVER_HUB",
            "DROVER_CLUSTER",
            "DROVER_JOIN_TOKEN",
            "DROVER_IMAGE_DIRS",
        ] {
            cmd.env_remove(var);
        }
        if let Some((cluster, token)) = join {
            cmd.arg("--cluster")
                .arg(cluster)
                .arg("--join-token")
                .arg(token);
        }
        AgentProcess {
            child: cmd.spawn().expect("start drover-agent"),
        }
    }

    /// kill -9, and reap it.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
    }
}

/// Kills, when dropped, every QEMU process the VMs under the given agent data dirs left running
/// (tests must not leak guests, whatever happens to them).
#[derive(Default)]
pub struct QemuReaper(pub Vec<std::path::PathBuf>);

impl QemuReaper {
    /// The pids of QEMU processes running for VMs under `data_dir` (checked against
    /// /proc/<pid>/cmdline, so a reused pid is never mistaken for one).
    pub fn running(data_dir: &Path) -> Vec<(std::path::PathBuf, u32)> {
        let mut found = Vec::new();
        let Ok(namespaces) = std::fs::read_dir(data_dir.join("vms")) else {
            return found;
        };
        for ns in namespaces.flatten() {
            let Ok(vms) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            for vm in vms.flatten() {
                let dir = vm.path();
                let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse::<u32>().ok())
                else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
                    found.push((dir, pid));
                }
            }
        }
        found
    }
}

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for data_dir in &self.0 {
            for (_, pid) in Self::running(data_dir) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// What a test guest printed on its serial console (`serial.log` in its VM dir): the last
/// counter value and how many times it booted.
pub fn guest_console(vm_dir: &Path) -> (Option<u64>, usize) {
    let log = std::fs::read_to_string(vm_dir.join("serial.log")).unwrap_or_default();
    // Only whole lines: the guest may be halfway through writing the last one.
    let complete = &log[..log.rfind('\n').unwrap_or(0)];
    let last = complete.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix("drover-counter ")?
            .trim()
            .parse()
            .ok()
    });
    (last, log.matches("drover-guest: up").count())
}

/// A TCP proxy on loopback that a test can cut: every connection through it is closed and new
/// ones are refused from then on (a network cut between two agents).
pub struct CuttableProxy {
    pub addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    _task: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let mut rx = cut_rx.clone();
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { return };
                        if *cut_rx.borrow() {
                            continue; // dropped: refused
                        }
                        let mut rx = cut_rx.clone();
                        connections.spawn(async move {
                            let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else { return };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                _ = async { let _ = rx.wait_for(|c| *c).await; } => {}
                            }
                        });
                    }
                    _ = async { let _ = rx.wait_for(|c| *c).await; } => {
                        connections.abort_all();
                        // Keep refusing: accept and drop whatever comes.
                        while let Ok((s, _)) = listener.accept().await {
                            drop(s);
                        }
                        return;
                    }
                }
            }
        });
        Ok(Self {
            addr,
            cut,
            _task: task,
        })
    }

    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based overall).
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / 100.0)
}

/// A new API token with `role`, made with `drover-hub token create` on the hub's database (as an
/// operator would before the hub runs); its name and secret.
pub async fn create_token(
    data_dir: &Path,
    database_url: Option<&str>,
    role: &str,
) -> (String, String) {
    let name = format!("test-{role}-{}", uuid::Uuid::new_v4());
    let mut cmd = Command::new(binary("drover-hub").unwrap());
    cmd.args(["token", "create", "--role", role, "--name"])
        .arg(&name)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("drover-hub token create ends within 120 s")
        .expect("run drover-hub token create");
    assert!(
        out.status.success(),
        "drover-hub token create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        name,
        String::from_utf8(out.stdout).unwrap().trim().to_owned(),
    )
}
