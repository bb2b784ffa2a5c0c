//! Throwaway PostgreSQL clusters for tests and benchmarks: owns finding the server binaries,
//! running `initdb`/`pg_ctl` in a temporary directory (as the `postgres` user when running as
//! root), handing out fresh databases, and making sure no server outlives the test process.
//!
//! * [`PgCluster::shared`] is the one cluster every test in a process uses. It is started lazily
//!   on first use, or — when `DATABASE_URL` is set — it is a handle on that existing server.
//! * [`PgCluster::start_dedicated`] starts a private cluster that the caller may stop and start
//!   again (database-restart tests). Dropping it kills the server and removes its directory.
//!
//! Every local cluster is also guarded by a small detached watchdog shell process that stops the
//! server and deletes its directory once the test process is gone, even after `kill -9`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sea_orm::{ConnectOptions, ConnectionTrait, Database};
use tempfile::TempDir;
use tokio::sync::{Mutex, OnceCell};

/// Where Debian/Ubuntu's `postgresql` package puts the server binaries (`<version>/bin`).
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";
/// Binaries a cluster needs; a candidate directory must contain all of them.
const REQUIRED_BINARIES: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
/// How long `initdb` may take (it is usually done in a second or two with `--no-sync`).
const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
/// `pg_ctl -t` for start and stop, in seconds (a loaded CI machine can be slow to start one).
const PG_CTL_WAIT_SECS: u64 = 60;
/// Extra time granted on top of `pg_ctl -t` before the `pg_ctl` process itself is abandoned.
const PG_CTL_GRACE: Duration = Duration::from_secs(10);
/// How long a started server may take to accept SQL connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often readiness is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Timeout for one readiness probe connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout for the admin connection used by `create_database`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for one `CREATE DATABASE`.
const CREATE_DATABASE_TIMEOUT: Duration = Duration::from_secs(60);
/// How many fresh ports are tried when the chosen one was taken before the server bound it.
const PORT_ATTEMPTS: usize = 5;
/// How many lines of the server log go into error messages.
const LOG_TAIL_LINES: usize = 40;
/// PostgreSQL's identifier length limit (NAMEDATALEN - 1).
const MAX_IDENTIFIER_LEN: usize = 63;

static SHARED: OnceCell<PgCluster> = OnceCell::const_new();
static DATABASE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A PostgreSQL server for tests: either a throwaway local cluster or the server named by
/// `DATABASE_URL` (shared cluster only).
pub struct PgCluster {
    backend: Backend,
    /// Serializes `stop`/`start` on one cluster.
    lifecycle: Mutex<()>,
}

enum Backend {
    /// The server named by `DATABASE_URL`; never started or stopped by us.
    External { url: String, port: u16 },
    /// A cluster in a temporary directory, run from the machine's binaries.
    Local(LocalServer),
}

impl PgCluster {
    /// The cluster shared by every test in this process: started once on first use, or — when
    /// the `DATABASE_URL` environment variable is set — a handle on that existing server (then no
    /// process is started and [`stop`](Self::stop)/[`start`](Self::start) are refused).
    pub async fn shared() -> Result<&'static PgCluster> {
        SHARED
            .get_or_try_init(|| async {
                match std::env::var("DATABASE_URL") {
                    Ok(url) if !url.trim().is_empty() => {
                        Self::external(url.trim().to_owned()).await
                    }
                    _ => Self::launch("shared").await,
                }
            })
            .await
    }

    /// A cluster of its own that the caller may stop and start (for database-restart tests).
    /// Always starts local binaries, even when `DATABASE_URL` is set. Dropping it kills the
    /// server and removes its directory.
    pub async fn start_dedicated() -> Result<PgCluster> {
        Self::launch("dedicated").await
    }

    /// `postgres://` URL of the `postgres` maintenance database (superuser, trust auth on
    /// 127.0.0.1). For a `DATABASE_URL` server this is `DATABASE_URL` itself.
    pub fn admin_url(&self) -> String {
        match &self.backend {
            Backend::External { url, .. } => url.clone(),
            Backend::Local(server) => server.url("postgres"),
        }
    }

    /// Creates a new, empty database whose name starts with `prefix` (reduced to `[a-z0-9_]`)
    /// and is unique, and returns its URL (`postgres://postgres@127.0.0.1:PORT/NAME` for a local
    /// cluster).
    pub async fn create_database(&self, prefix: &str) -> Result<String> {
        let name = unique_database_name(prefix);
        let admin_url = self.admin_url();
        let shown = redact_url(&admin_url);

        if let Backend::Local(server) = &self.backend {
            server.check_listening().await.with_context(|| {
                format!(
                    "create_database({prefix:?}): the server is not running; call \
                     PgCluster::start() after stop()"
                )
            })?;
        }

        let mut options = ConnectOptions::new(admin_url.clone());
        options
            .max_connections(1)
            .min_connections(0)
            .connect_timeout(CONNECT_TIMEOUT)
            .acquire_timeout(CONNECT_TIMEOUT)
            .sqlx_logging(false);
        let db = tokio::time::timeout(CONNECT_TIMEOUT + PG_CTL_GRACE, Database::connect(options))
            .await
            .map_err(|_| anyhow!("timed out after {CONNECT_TIMEOUT:?}"))
            .and_then(|connected| connected.map_err(anyhow::Error::from))
            .with_context(|| {
                format!(
                    "create_database({prefix:?}): could not connect to {shown}; is the server \
                     running (a dedicated cluster may have been stopped)?"
                )
            })?;

        let sql = format!("CREATE DATABASE \"{name}\"");
        let created =
            tokio::time::timeout(CREATE_DATABASE_TIMEOUT, db.execute_unprepared(&sql)).await;
        if let Err(error) = db.close().await {
            tracing::debug!(%error, "closing the admin connection failed");
        }
        created
            .map_err(|_| anyhow!("timed out after {CREATE_DATABASE_TIMEOUT:?}"))
            .and_then(|done| done.map_err(anyhow::Error::from))
            .with_context(|| format!("`{sql}` failed on {shown}"))?;

        tracing::debug!(database = %name, "created test database");
        Ok(match &self.backend {
            Backend::External { url, .. } => url_with_database(url, &name),
            Backend::Local(server) => server.url(&name),
        })
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        match &self.backend {
            Backend::External { port, .. } => *port,
            Backend::Local(server) => server.port,
        }
    }

    /// Stops the server (`pg_ctl stop -m fast`, with a timeout), keeping the data directory.
    /// Stopping a server that is not running is not an error.
    pub async fn stop(&self) -> Result<()> {
        let server = self.local("stop")?;
        let _guard = self.lifecycle.lock().await;
        server.stop_fast().await
    }

    /// Starts the server again on the same port and data directory, waiting until it accepts
    /// connections. Starting a server that is already running is not an error.
    pub async fn start(&self) -> Result<()> {
        let server = self.local("start")?;
        let _guard = self.lifecycle.lock().await;
        if server.is_running().await? {
            return server.wait_ready().await;
        }
        server.start().await.map_err(StartError::into_error)
    }

    fn local(&self, operation: &str) -> Result<&LocalServer> {
        match &self.backend {
            Backend::Local(server) => Ok(server),
            Backend::External { url, .. } => bail!(
                "PgCluster::{operation}: this cluster is the external server from DATABASE_URL \
                 ({}), which tests must not {operation}; use PgCluster::start_dedicated() for \
                 tests that restart the database",
                redact_url(url)
            ),
        }
    }

    async fn external(url: String) -> Result<PgCluster> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!(
                "DATABASE_URL ({}) is not a postgres:// URL; unset it to let the tests start \
                 their own PostgreSQL cluster",
                redact_url(&url)
            );
        }
        probe(&url, CONNECT_TIMEOUT).await.with_context(|| {
            format!(
                "DATABASE_URL is set ({}) but that server does not accept connections; start it \
                 or unset DATABASE_URL to let the tests start their own PostgreSQL cluster",
                redact_url(&url)
            )
        })?;
        let port = port_from_url(&url);
        tracing::info!(url = %redact_url(&url), "using the PostgreSQL server from DATABASE_URL");
        Ok(PgCluster {
            backend: Backend::External { url, port },
            lifecycle: Mutex::new(()),
        })
    }

    async fn launch(kind: &str) -> Result<PgCluster> {
        let server = LocalServer::launch()
            .await
            .with_context(|| format!("could not start a {kind} throwaway PostgreSQL cluster"))?;
        tracing::info!(
            kind,
            port = server.port,
            dir = %server.root.display(),
            "started throwaway PostgreSQL cluster"
        );
        Ok(PgCluster {
            backend: Backend::Local(server),
            lifecycle: Mutex::new(()),
        })
    }
}

impl fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Backend::External { url, port } => f
                .debug_struct("PgCluster")
                .field("external_url", &redact_url(url))
                .field("port", port)
                .finish(),
            Backend::Local(server) => f
                .debug_struct("PgCluster")
                .field("port", &server.port)
                .field("data_dir", &server.data_dir)
                .field("bin_dir", &server.bin_dir)
                .field("as_postgres_user", &server.as_postgres)
                .finish(),
        }
    }
}

/// A cluster in a temporary directory. Dropping it kills the server (immediate shutdown) and
/// removes the directory.
struct LocalServer {
    bin_dir: PathBuf,
    /// Run the binaries as the `postgres` user (we are root, which PostgreSQL refuses).
    as_postgres: bool,
    port: u16,
    /// The temporary directory: holds `data/`, the server log and the Unix socket.
    root: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    /// Removes `root` when dropped, which happens after `Drop::drop` stopped the server.
    _dir: TempDir,
}

/// Why a start failed; a port conflict is worth retrying on another port.
enum StartError {
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

impl StartError {
    fn into_error(self) -> anyhow::Error {
        match self {
            StartError::PortTaken(error) | StartError::Other(error) => error,
        }
    }
}

impl From<anyhow::Error> for StartError {
    fn from(error: anyhow::Error) -> Self {
        StartError::Other(error)
    }
}

impl LocalServer {
    async fn launch() -> Result<LocalServer> {
        let bin_dir = find_bin_dir()?;
        let as_postgres = running_as_root();
        if as_postgres {
            ensure_postgres_user().await?;
        }

        // Root runs the server as `postgres`, which must be able to reach the directory: /tmp
        // is world-traversable, whereas $TMPDIR might point into /root.
        let parent = if as_postgres {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("drover-pg-")
            .tempdir_in(&parent)
            .with_context(|| {
                format!(
                    "could not create a temporary directory under {}",
                    parent.display()
                )
            })?;
        let root = dir.path().to_path_buf();
        if as_postgres {
            chown_to_postgres(&root).await?;
        }

        let mut server = LocalServer {
            bin_dir,
            as_postgres,
            port: 0,
            data_dir: root.join("data"),
            log_file: root.join("postgres.log"),
            root,
            _dir: dir,
        };
        server.initdb().await?;
        server.write_config()?;
        // From here on a server may run: make sure it dies with this process.
        server.spawn_watchdog()?;

        let mut attempt = 1;
        loop {
            server.port = free_port()?;
            match server.start().await {
                Ok(()) => return Ok(server),
                Err(StartError::PortTaken(error)) if attempt < PORT_ATTEMPTS => {
                    tracing::debug!(port = server.port, %error, "port was taken, trying another");
                    attempt += 1;
                }
                Err(error) => return Err(error.into_error()),
            }
        }
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// A command running `program` from the server binaries, as `postgres` when we are root.
    fn std_command(&self, program: &str) -> std::process::Command {
        let exe = self.bin_dir.join(program);
        let mut command = if self.as_postgres {
            let mut command = std::process::Command::new(runuser_program());
            command.args(["-u", "postgres", "--"]).arg(exe);
            command
        } else {
            std::process::Command::new(exe)
        };
        command
            .current_dir(&self.root)
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .stdin(Stdio::null());
        command
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::from(self.std_command(program));
        command.kill_on_drop(true);
        command
    }

    async fn initdb(&self) -> Result<()> {
        let mut command = self.command("initdb");
        command
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C");
        let output = run(command, INITDB_TIMEOUT)
            .await
            .context("could not run initdb")?;
        if !output.status.success() {
            bail!(
                "initdb -D {} failed ({}):\n{}{}",
                self.data_dir.display(),
                output.status,
                output_text(&output),
                self.root_hint()
            );
        }
        Ok(())
    }

    fn write_config(&self) -> Result<()> {
        use std::io::Write as _;

        let socket_dir = self.root.display().to_string().replace('\'', "''");
        let settings = format!(
            "\n# drover-e2e throwaway cluster\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{socket_dir}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 200\n\
             shared_buffers = 128MB\n"
        );
        let path = self.data_dir.join("postgresql.conf");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(settings.as_bytes()))
            .with_context(|| format!("could not append settings to {}", path.display()))
    }

    /// `pg_ctl start` on `self.port`, then waits until SQL connections work.
    async fn start(&self) -> std::result::Result<(), StartError> {
        let log_offset = std::fs::metadata(&self.log_file).map_or(0, |meta| meta.len());
        let mut command = self.command("pg_ctl");
        command
            .arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t", &PG_CTL_WAIT_SECS.to_string()])
            .arg("-o")
            .arg(format!("-p {}", self.port));
        let output = run(
            command,
            Duration::from_secs(PG_CTL_WAIT_SECS) + PG_CTL_GRACE,
        )
        .await
        .context("could not run pg_ctl start")?;
        if !output.status.success() {
            // A server that started too slowly may still be coming up: don't leave it behind.
            self.stop_immediate_blocking();
            let new_log = self.log_since(log_offset);
            let error = anyhow!(
                "pg_ctl start (port {}, data directory {}) failed ({}):\n{}\n{}",
                self.port,
                self.data_dir.display(),
                output.status,
                output_text(&output),
                self.log_tail()
            );
            let port_taken = ["could not bind", "Address already in use"]
                .iter()
                .any(|needle| new_log.contains(needle));
            return Err(if port_taken {
                StartError::PortTaken(error)
            } else {
                StartError::Other(error)
            });
        }
        self.wait_ready().await.map_err(StartError::Other)
    }

    /// Polls a `SELECT 1` on the maintenance database until it works, the server dies, or
    /// [`READY_TIMEOUT`] passes.
    async fn wait_ready(&self) -> Result<()> {
        let url = self.url("postgres");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            // A cheap TCP check first, so a server that is still starting is polled every
            // POLL_INTERVAL rather than every PROBE_TIMEOUT.
            let attempt = match self.check_listening().await {
                Ok(()) => probe(&url, PROBE_TIMEOUT).await,
                Err(error) => Err(error),
            };
            let error = match attempt {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if !self.data_dir.join("postmaster.pid").exists() {
                bail!(
                    "the PostgreSQL server on port {} exited while starting (last connection \
                     error: {error:#})\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the PostgreSQL server on port {} did not accept connections within \
                     {READY_TIMEOUT:?} (last error: {error:#})\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Whether something accepts TCP connections on our port.
    async fn check_listening(&self) -> Result<()> {
        let address = ("127.0.0.1", self.port);
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(address))
            .await
            .map_err(|_| anyhow!("timed out after {PROBE_TIMEOUT:?}"))
            .and_then(|connected| connected.map_err(anyhow::Error::from))
            .map(drop)
            .with_context(|| format!("nothing accepts connections on 127.0.0.1:{}", self.port))
    }

    /// `pg_ctl status`: exit code 0 means running, 3 means not running.
    async fn is_running(&self) -> Result<bool> {
        let mut command = self.command("pg_ctl");
        command.arg("status").arg("-D").arg(&self.data_dir);
        let output = run(command, PG_CTL_GRACE)
            .await
            .context("could not run pg_ctl status")?;
        match output.status.code() {
            Some(0) => Ok(true),
            Some(3) => Ok(false),
            _ => bail!(
                "pg_ctl status -D {} failed ({}):\n{}",
                self.data_dir.display(),
                output.status,
                output_text(&output)
            ),
        }
    }

    async fn stop_fast(&self) -> Result<()> {
        if !self.is_running().await? {
            return Ok(());
        }
        let mut command = self.command("pg_ctl");
        command.arg("stop").arg("-D").arg(&self.data_dir).args([
            "-m",
            "fast",
            "-w",
            "-t",
            &PG_CTL_WAIT_SECS.to_string(),
        ]);
        let output = run(
            command,
            Duration::from_secs(PG_CTL_WAIT_SECS) + PG_CTL_GRACE,
        )
        .await
        .context("could not run pg_ctl stop")?;
        if !output.status.success() {
            bail!(
                "pg_ctl stop -m fast (port {}, data directory {}) failed ({}):\n{}\n{}",
                self.port,
                self.data_dir.display(),
                output.status,
                output_text(&output),
                self.log_tail()
            );
        }
        Ok(())
    }

    /// `pg_ctl stop -m immediate`, synchronously; for `Drop` and failed starts. Errors (such as
    /// "no server running") are ignored.
    fn stop_immediate_blocking(&self) {
        if !self.data_dir.join("postmaster.pid").exists() {
            return;
        }
        let result = self
            .std_command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", &PG_CTL_WAIT_SECS.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Err(error) = result {
            tracing::warn!(%error, dir = %self.root.display(), "could not run pg_ctl stop");
        }
    }

    /// Starts a detached shell that waits for this process to exit, then kills the server and
    /// removes the directory. It exits on its own once the directory is gone (normal `Drop`).
    fn spawn_watchdog(&self) -> Result<()> {
        let pg_ctl = shell_quote(&self.bin_dir.join("pg_ctl").display().to_string());
        let pg_ctl = if self.as_postgres {
            format!("{} -u postgres -- {pg_ctl}", runuser_program())
        } else {
            pg_ctl
        };
        let data = shell_quote(&self.data_dir.display().to_string());
        let root = shell_quote(&self.root.display().to_string());
        let pid = std::process::id();
        // The subshell is backgrounded so that `sh` itself exits at once and is reaped here; the
        // subshell is adopted by init. Its own process group keeps terminal signals (Ctrl-C)
        // aimed at the test run from killing it before it has cleaned up.
        let script = format!(
            "( trap '' HUP INT; \
               while kill -0 {pid} 2>/dev/null && [ -d {data} ]; do sleep 1; done; \
               if [ -d {data} ]; then \
                 {pg_ctl} -D {data} stop -m immediate -w -t {PG_CTL_WAIT_SECS}; \
                 rm -rf {root}; \
               fi \
             ) </dev/null >/dev/null 2>&1 &"
        );
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(&script)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let status = command
            .status()
            .context("could not spawn the cleanup watchdog (`sh -c ...`)")?;
        if !status.success() {
            bail!("the cleanup watchdog shell failed to start ({status})");
        }
        Ok(())
    }

    fn log_since(&self, offset: u64) -> String {
        let bytes = std::fs::read(&self.log_file).unwrap_or_default();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    fn log_tail(&self) -> String {
        let log = match std::fs::read(&self.log_file) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(error) => {
                return format!(
                    "(server log {} unreadable: {error})",
                    self.log_file.display()
                )
            }
        };
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        format!(
            "--- last lines of the server log {} ---\n{tail}",
            self.log_file.display()
        )
    }

    fn root_hint(&self) -> &'static str {
        if self.as_postgres {
            "\n(the binaries ran as the `postgres` user via runuser because PostgreSQL refuses to \
             run as root)"
        } else {
            ""
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.stop_immediate_blocking();
        // `_dir` is dropped next and removes the directory.
    }
}

/// Runs `command` to completion, capturing its output, with a time limit.
async fn run(mut command: tokio::process::Command, limit: Duration) -> Result<Output> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let program = format!("{:?}", command.as_std().get_program());
    let child = command
        .spawn()
        .with_context(|| format!("could not spawn {program}"))?;
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{program} did not finish within {limit:?}; it was killed"))?
        .with_context(|| format!("could not wait for {program}"))
}

fn output_text(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stdout)
        .trim_end()
        .to_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !stderr.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stderr.trim_end());
    }
    text
}

/// One connection attempt plus `SELECT 1`.
async fn probe(url: &str, limit: Duration) -> Result<()> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(1)
        .min_connections(0)
        .connect_timeout(limit)
        .acquire_timeout(limit)
        .sqlx_logging(false);
    let db = tokio::time::timeout(limit + Duration::from_secs(1), Database::connect(options))
        .await
        .map_err(|_| anyhow!("connecting timed out after {limit:?}"))??;
    let result = db.execute_unprepared("SELECT 1").await;
    if let Err(error) = db.close().await {
        tracing::debug!(%error, "closing a probe connection failed");
    }
    result?;
    Ok(())
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: the highest version under
/// `/usr/lib/postgresql/*/bin`, else wherever `pg_ctl` on `PATH` really lives.
fn find_bin_dir() -> Result<PathBuf> {
    let has_binaries = |dir: &Path| REQUIRED_BINARIES.iter().all(|b| dir.join(b).is_file());

    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir(DEBIAN_PG_ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(version) = parse_version(&name) else {
                continue;
            };
            let bin = entry.path().join("bin");
            if !has_binaries(&bin) {
                continue;
            }
            let better = match &best {
                Some((best_version, _)) => version > *best_version,
                None => true,
            };
            if better {
                best = Some((version, bin));
            }
        }
    }
    if let Some((_, bin)) = best {
        return Ok(bin);
    }

    // Other distributions put the server binaries on PATH (or symlink them there).
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let pg_ctl = dir.join("pg_ctl");
            if !pg_ctl.is_file() {
                continue;
            }
            let real = std::fs::canonicalize(&pg_ctl).unwrap_or(pg_ctl);
            if let Some(bin) = real.parent() {
                if has_binaries(bin) {
                    return Ok(bin.to_path_buf());
                }
            }
        }
    }

    bail!(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) under \
         {DEBIAN_PG_ROOT}/*/bin or on PATH; install the `postgresql` package (apt-get install \
         postgresql), or set DATABASE_URL to use an existing server for the shared cluster"
    )
}

fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// Whether this process runs as root (effective uid 0): `/proc/self` belongs to the effective
/// user; `id -u` is the fallback where there is no procfs.
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;

    match std::fs::metadata("/proc/self") {
        Ok(meta) => meta.uid() == 0,
        Err(_) => std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
            .unwrap_or(false),
    }
}

async fn ensure_postgres_user() -> Result<()> {
    let output = tokio::process::Command::new("id")
        .args(["-u", "postgres"])
        .stdin(Stdio::null())
        .output()
        .await
        .context("could not run `id -u postgres`")?;
    if !output.status.success() {
        bail!(
            "running as root, so PostgreSQL must run as the `postgres` system user, which does \
             not exist; install the `postgresql` package (apt-get install postgresql), which \
             creates it, or run the tests as a non-root user"
        );
    }
    Ok(())
}

async fn chown_to_postgres(dir: &Path) -> Result<()> {
    let output = tokio::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .await
        .context("could not run chown")?;
    if !output.status.success() {
        bail!(
            "chown -R postgres:postgres {} failed ({}): {}",
            dir.display(),
            output.status,
            output_text(&output)
        );
    }
    Ok(())
}

/// `runuser` lives in /usr/sbin, which is not on every PATH.
fn runuser_program() -> &'static str {
    ["/usr/sbin/runuser", "/sbin/runuser"]
        .into_iter()
        .find(|path| Path::new(path).is_file())
        .unwrap_or("runuser")
}

/// A port that was free a moment ago: bind 127.0.0.1:0, read the port, release it.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("could not bind 127.0.0.1:0 to find a free TCP port")?;
    let port = listener
        .local_addr()
        .context("could not read the address of a bound socket")?
        .port();
    Ok(port)
}

/// `prefix` reduced to `[a-z0-9_]`, then `_<pid>_<counter>_<random>`, at most 63 bytes.
fn unique_database_name(prefix: &str) -> String {
    let counter = DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = uuid::Uuid::new_v4().simple().to_string();
    let suffix = format!("_{}_{counter}_{}", std::process::id(), &random[..8]);

    let mut name: String = prefix
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert_str(0, "db");
    }
    name.truncate(MAX_IDENTIFIER_LEN.saturating_sub(suffix.len()));
    name.push_str(&suffix);
    name
}

/// Splits `scheme://authority/path?query` into (`scheme://authority`, `?query` or "").
fn split_url(url: &str) -> (&str, &str) {
    let (base, query) = match url.find('?') {
        Some(at) => url.split_at(at),
        None => (url, ""),
    };
    let authority_start = base.find("://").map_or(0, |at| at + 3);
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |at| authority_start + at);
    (&base[..authority_end], query)
}

/// `url` pointing at `database` instead, keeping credentials, host and query parameters.
fn url_with_database(url: &str, database: &str) -> String {
    let (server, query) = split_url(url);
    format!("{server}/{database}{query}")
}

/// The port of a `postgres://` URL (first host), 5432 when none is given.
fn port_from_url(url: &str) -> u16 {
    let (server, _) = split_url(url);
    let authority = server.split_once("://").map_or(server, |(_, rest)| rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let first = host_port.split(',').next().unwrap_or_default();
    let port = match first.rsplit_once(']') {
        Some((_, after)) => after.strip_prefix(':'),
        None => first.rsplit_once(':').map(|(_, port)| port),
    };
    port.and_then(|port| port.parse().ok()).unwrap_or(5432)
}

/// `url` with its password replaced by `***`, for messages.
fn redact_url(url: &str) -> String {
    let (server, _) = split_url(url);
    let Some((scheme, authority)) = server.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    let Some((user, _)) = userinfo.split_once(':') else {
        return url.to_owned();
    };
    let rest = &url[scheme.len() + 3 + userinfo.len()..];
    format!("{scheme}://{user}:***{rest}")
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_sanitized_unique_and_short() {
        let a = unique_database_name("Hub-Tests!");
        let b = unique_database_name("Hub-Tests!");
        assert_ne!(a, b);
        assert!(a.starts_with("hub_tests__"), "{a}");
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        let long = unique_database_name(&"x".repeat(200));
        assert!(long.len() <= MAX_IDENTIFIER_LEN, "{long}");
        assert!(unique_database_name("").starts_with("db_"));
        assert!(unique_database_name("1st").starts_with("db1st_"));
    }

    #[test]
    fn urls_are_rewritten_and_parsed() {
        assert_eq!(
            url_with_database("postgres://u:p@h:5433/app?sslmode=disable", "t1"),
            "postgres://u:p@h:5433/t1?sslmode=disable"
        );
        assert_eq!(url_with_database("postgres://h", "t1"), "postgres://h/t1");
        assert_eq!(port_from_url("postgres://u:p@h:5433/app"), 5433);
        assert_eq!(port_from_url("postgres://h/app"), 5432);
        assert_eq!(port_from_url("postgresql://u@[::1]:6000/app"), 6000);
        assert_eq!(
            redact_url("postgres://u:secret@h:5433/app?x=1"),
            "postgres://u:***@h:5433/app?x=1"
        );
        assert_eq!(redact_url("postgres://u@h/app"), "postgres://u@h/app");
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(parse_version("15").unwrap() > parse_version("9.6").unwrap());
        assert!(parse_version("main").is_none());
    }
}
