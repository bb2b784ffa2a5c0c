//! Test bed helpers: a hub on a fresh PostgreSQL database or SQLite file, in-process HTTP
//! serving, GraphQL calls, fixture builders for inventory, and locating the built binaries.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use drover_hub::Hub;
use drover_shared::inventory::*;
use drover_shared::ClusterName;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::postgres::PgCluster;

/// The two stores every inventory test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A hub on its own empty database, removed when dropped.
/// The caller in-process requests act as: an admin.
pub fn test_admin() -> drover_graphql::access::Caller {
    drover_graphql::access::Caller {
        actor: "test-admin".into(),
        role: drover_graphql::access::Role::Admin,
    }
}

pub struct TestHub {
    pub hub: Hub,
    pub url: String,
    pub pki: std::sync::Arc<drover_hub::agents::pki::Pki>,
    /// The hub's clock: runs with the system's until a test pauses or advances it.
    pub clock: drover_hub::clock::Clock,
    /// An admin API token for requests over HTTP (in-process requests act as `test-admin`).
    pub token: String,
    _dir: Option<tempfile::TempDir>,
    _pki_dir: tempfile::TempDir,
}

impl TestHub {
    pub async fn new(backend: Backend, name: &str) -> anyhow::Result<Self> {
        let (url, dir) = match backend {
            Backend::Postgres => {
                let pg = PgCluster::shared().await?;
                (pg.create_database(name).await?, None)
            }
            Backend::Sqlite => {
                let dir = tempfile::tempdir()?;
                (drover_hub::store::sqlite_url(dir.path()), Some(dir))
            }
        };
        let pki_dir = tempfile::tempdir()?;
        let pki = std::sync::Arc::new(drover_hub::agents::pki::Pki::load_or_create(
            pki_dir.path(),
        )?);
        let clock = drover_hub::clock::Clock::adjustable();
        let store = drover_hub::store::Store::open(&url)
            .await
            .with_context(|| format!("open hub on {url}"))?
            .with_clock(clock.clone());
        let (_, token) = drover_hub::store::tokens::TokenRows::new(store.clone())
            .create(
                &format!("test-admin-{}", uuid::Uuid::new_v4()),
                "admin",
                None,
                "test",
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let hub = Hub::with_store(store, pki.clone());
        Ok(Self {
            hub,
            url,
            pki,
            clock,
            token,
            _dir: dir,
            _pki_dir: pki_dir,
        })
    }

    /// Executes a query in-process (no HTTP) and returns the JSON response.
    pub async fn gql(&self, query: &str, variables: Value) -> Value {
        let req = async_graphql::Request::new(query)
            .variables(async_graphql::Variables::from_json(variables))
            .data(test_admin());
        let mut resp = self.hub.schema.execute(req).await;
        drover_graphql::classify_response_errors(&mut resp);
        serde_json::to_value(&resp).expect("response serializes")
    }

    /// Executes a query that must succeed and returns its `data`.
    pub async fn data(&self, query: &str, variables: Value) -> Value {
        let resp = self.gql(query, variables).await;
        assert!(
            resp.get("errors")
                .is_none_or(|e| e.as_array().is_none_or(|a| a.is_empty())),
            "query failed: {resp:#}"
        );
        resp["data"].clone()
    }

    /// Serves HTTP on an ephemeral loopback port until the returned guard is dropped.
    pub async fn serve(&self) -> anyhow::Result<Served> {
        self.serve_router(self.hub.router()).await
    }

    /// Serves HTTP with authentication off (benchmarks measure what it costs).
    pub async fn serve_without_authentication(&self) -> anyhow::Result<Served> {
        self.serve_router(self.hub.router_without_authentication())
            .await
    }

    async fn serve_router(&self, router: axum::Router) -> anyhow::Result<Served> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Served {
            addr,
            _stop: tx,
            task,
        })
    }
}

/// A running in-process server; dropping it stops the server.
pub struct Served {
    pub addr: SocketAddr,
    _stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A hub with its agent endpoint served in-process on an ephemeral loopback port (SQLite
/// store); dropping it stops the endpoint.
pub struct AgentEndpoint {
    pub hub: TestHub,
    /// `https://127.0.0.1:PORT`
    pub base: String,
    _stop: oneshot::Sender<()>,
}

impl AgentEndpoint {
    /// A hub on SQLite with its agent endpoint.
    pub async fn start(
        name: &str,
        timing: Option<drover_hub::agents::sessions::SessionTiming>,
    ) -> anyhow::Result<Self> {
        Self::start_on(Backend::Sqlite, name, timing).await
    }

    pub async fn start_on(
        backend: Backend,
        name: &str,
        timing: Option<drover_hub::agents::sessions::SessionTiming>,
    ) -> anyhow::Result<Self> {
        let mut hub = TestHub::new(backend, name).await?;
        if let Some(timing) = timing {
            hub.hub = hub.hub.clone().with_session_timing(timing);
        }
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = tcp.local_addr()?.port();
        let listener = hub
            .hub
            .agent_listener(tcp, &["localhost".into(), "127.0.0.1".into()])?;
        let (stop, stopped) = oneshot::channel::<()>();
        let h = hub.hub.clone();
        tokio::spawn(async move {
            let _ = h
                .serve_agents(listener, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            hub,
            base: format!("https://127.0.0.1:{port}"),
            _stop: stop,
        })
    }
}

/// The first error's `extensions.code`, if any.
pub fn error_code(resp: &Value) -> Option<String> {
    resp["errors"][0]["extensions"]["code"]
        .as_str()
        .map(str::to_owned)
}

/// The first error's message, if any.
pub fn error_message(resp: &Value) -> String {
    resp["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// POSTs a GraphQL query over HTTP.
pub async fn post_gql(client: &reqwest::Client, url: &str, query: &str) -> anyhow::Result<Value> {
    post_gql_as(client, url, None, query).await
}

/// A GraphQL request over HTTP, with `Authorization: Bearer <token>` when a token is given.
pub async fn post_gql_as(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    query: &str,
) -> anyhow::Result<Value> {
    let mut request = client.post(url).json(&json!({ "query": query }));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    Ok(request.send().await?.json().await?)
}

/// A virtual machine fixture: running, 1 GiB, 1 vCPU, one disk, one NIC with a MAC derived from
/// `mac_seed`.
pub fn vm(namespace: &str, name: &str, mac_seed: u32) -> VmInfo {
    VmInfo {
        namespace: namespace.into(),
        name: name.into(),
        uid: format!("uid-{namespace}-{name}"),
        run_strategy: RunStrategy::Always,
        phase: VmPhase::Running,
        node: Some("node-a".into()),
        memory_bytes: 1 << 30,
        vcpus: 1,
        disks: vec![Disk {
            name: "rootdisk".into(),
            size_bytes: 10 << 30,
            storage_class: "standard".into(),
            access_mode: "ReadWriteOnce".into(),
        }],
        interfaces: vec![Interface {
            name: "default".into(),
            network: "pod".into(),
            mac: format!(
                "02:AA:{:02X}:{:02X}:{:02X}:{:02X}",
                (mac_seed >> 24) & 0xff,
                (mac_seed >> 16) & 0xff,
                (mac_seed >> 8) & 0xff,
                mac_seed & 0xff
            ),
        }],
        labels: BTreeMap::from([("app".to_string(), name.to_string())]),
        migratable: true,
        non_migratable_reasons: vec![],
        generation: 1,
    }
}

pub fn node(name: &str, memory_gib: u64, cores: u64) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        cpu_model: "Icelake-Server".into(),
        allocatable_memory_bytes: memory_gib << 30,
        allocatable_cpu_millis: cores * 1000,
        requested_memory_bytes: 0,
        requested_cpu_millis: 0,
        schedulable: true,
        labels: BTreeMap::new(),
    }
}

pub fn cluster_info() -> ClusterInfo {
    ClusterInfo {
        runtime: RuntimeKind::Kubevirt,
        platform_version: "4.20.3".into(),
        virtualization_version: "1.6.0".into(),
        labels: BTreeMap::from([("region".to_string(), "eu-west".to_string())]),
        cpu_models: vec!["Icelake-Server".into(), "Skylake-Server".into()],
        feature_gates: vec!["DecentralizedLiveMigration".into()],
        migration_config: MigrationConfig::default(),
        storage_classes: vec![StorageClass {
            name: "standard".into(),
            provisioner: "csi.example".into(),
            is_default: true,
        }],
        networks: vec!["pod".into()],
        sync_endpoint: None,
    }
}

pub fn snapshot(
    cluster: &str,
    generation: u64,
    nodes: Vec<NodeInfo>,
    vms: Vec<VmInfo>,
) -> InventorySnapshot {
    InventorySnapshot {
        cluster: ClusterName::new(cluster).expect("fixture cluster names are valid"),
        generation,
        info: cluster_info(),
        nodes,
        vms,
    }
}

/// Builds the demo/test guest once (scripts/build-guest.sh skips work already done) and returns
/// its directory, holding `vmlinuz` and `initramfs.gz`.
pub fn test_guest() -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = test_guest_dir();
    let status = std::process::Command::new("bash")
        .arg(workspace.join("scripts/build-guest.sh"))
        .arg(&out)
        .status()
        .expect("run scripts/build-guest.sh");
    assert!(status.success(), "building the guest failed");
    out
}

/// Where `test_guest` builds the test guest (`target/guest` of the workspace), built or not:
/// the image directory test agents are given.
pub fn test_guest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest")
}

/// Where cargo put this workspace's binaries: beside the running executable (a binary such as
/// drover-bench) or one level up (a test executable in `deps/`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no parent directory")?;
    let candidates = [Some(dir.join(name)), dir.parent().map(|d| d.join(name))];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "{name} is not built next to {}; run `cargo build --workspace --bins` (with --release for benchmarks) first",
                exe.display()
            )
        })
}

/// A cluster whose inventory a test controls, reported through the agent's real session code
/// (the QEMU runtime will be the real source).
/// An in-memory cluster for session and command tests: a fixed node, VMs the test adds, and
/// lifecycle commands that change its VMs (counted, to prove a key runs at most once).
pub struct TestCluster {
    state: std::sync::Mutex<(Vec<NodeInfo>, Vec<VmInfo>)>,
    changes: tokio::sync::broadcast::Sender<Vec<InventoryChange>>,
    /// Commands executed so far.
    pub executed: std::sync::atomic::AtomicUsize,
}

impl TestCluster {
    pub fn new(vms: Vec<VmInfo>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            state: std::sync::Mutex::new((vec![node("node-a", 64, 16)], vms)),
            changes: tokio::sync::broadcast::channel(64).0,
            executed: Default::default(),
        })
    }

    /// The agent's command executor over this cluster, journaled in `dir`.
    pub fn commands(
        self: &std::sync::Arc<Self>,
        dir: &std::path::Path,
    ) -> drover_agent::commands::Commands {
        drover_agent::commands::CommandExecutor::open(dir, self.clone())
            .expect("open the command journal")
    }

    pub fn vms(&self) -> Vec<VmInfo> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    fn apply(&self, command: drover_shared::commands::AgentCommand) -> Result<String, String> {
        use drover_shared::commands::AgentCommand::*;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let vms = &mut state.1;
        let find = |vms: &Vec<VmInfo>, ns: &str, name: &str| {
            vms.iter()
                .position(|v| v.namespace == ns && v.name == name)
                .ok_or_else(|| format!("no virtual machine {ns}/{name}"))
        };
        let change = match command {
            CreateVm { spec } => {
                if find(vms, &spec.namespace, &spec.name).is_ok() {
                    return Err(format!("{}/{} exists", spec.namespace, spec.name));
                }
                let phase = if spec.run_strategy == RunStrategy::Halted {
                    VmPhase::Stopped
                } else {
                    VmPhase::Running
                };
                let vm = spec.to_info(
                    &uuid::Uuid::new_v4().to_string(),
                    phase,
                    Some("node-a".into()),
                );
                vms.push(vm.clone());
                InventoryChange::VmUpserted { vm }
            }
            StartVm { namespace, name } => {
                let i = find(vms, &namespace, &name)?;
                vms[i].phase = VmPhase::Running;
                vms[i].run_strategy = RunStrategy::Always;
                InventoryChange::VmUpserted { vm: vms[i].clone() }
            }
            StopVm {
                namespace, name, ..
            } => {
                let i = find(vms, &namespace, &name)?;
                vms[i].phase = VmPhase::Stopped;
                vms[i].run_strategy = RunStrategy::Halted;
                InventoryChange::VmUpserted { vm: vms[i].clone() }
            }
            DeleteVm { namespace, name } => {
                let i = find(vms, &namespace, &name)?;
                vms.remove(i);
                InventoryChange::VmRemoved { namespace, name }
            }
            other => return Err(format!("the test cluster cannot run {}", other.kind())),
        };
        let _ = self.changes.send(vec![change]);
        Ok("done".into())
    }

    pub fn add_vm(&self, v: VmInfo) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .push(v.clone());
        let _ = self
            .changes
            .send(vec![InventoryChange::VmUpserted { vm: v }]);
    }
}

impl drover_agent::commands::CommandHandler for TestCluster {
    fn execute(
        &self,
        command: drover_shared::commands::AgentCommand,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = drover_shared::commands::CommandOutcome> + Send + '_>,
    > {
        Box::pin(async move {
            self.executed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match self.apply(command) {
                Ok(message) => drover_shared::commands::CommandOutcome::Succeeded { message },
                Err(reason) => drover_shared::commands::CommandOutcome::Failed { reason },
            }
        })
    }
}

impl drover_agent::session::InventorySource for TestCluster {
    fn snapshot(&self) -> (ClusterInfo, Vec<NodeInfo>, Vec<VmInfo>) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (cluster_info(), s.0.clone(), s.1.clone())
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Vec<InventoryChange>> {
        self.changes.subscribe()
    }

    fn health(&self) -> (drover_shared::protocol::ReportedHealth, Option<String>) {
        (drover_shared::protocol::ReportedHealth::Ready, None)
    }
}

/// Declares each named `async fn(Backend)` as two tests, `postgres::name` and `sqlite::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::testbed::Backend::Postgres).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::testbed::Backend::Sqlite).await
                }
            )*
        }
    };
}
