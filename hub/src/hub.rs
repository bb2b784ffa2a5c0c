//! The assembled hub: store, ingest, GraphQL schema and HTTP router, and `serve`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use drover_graphql::{build_schema, DroverSchema, SchemaLimits};
use drover_shared::events::{InventoryChange, MigrationChange};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::agents::commands::{CommandState, CommandStore};
use crate::agents::endpoint::{self, TlsListener};
use crate::agents::identity::Identities;
use crate::agents::pki::{Pki, PkiError};
use crate::agents::sessions::{SessionTiming, Sessions};
use crate::api::admin::HubAdmin;
use crate::api::reader::StoreReader;
use crate::api::server::{self, App};
use crate::config::{HubConfig, ReplicaSettings};
use crate::inventory::ingest::Ingest;
use crate::orchestration::migrations::StatusRecorder;
use crate::replicas::{Notice, ReplicaBus};
use crate::store::leases::Leases;
use crate::store::{redact, Store, StoreError};

/// Why a configured hub could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot set up the hub's certificate authority: {0}")]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct Hub {
    pub store: Store,
    pub ingest: Ingest,
    pub identities: Identities,
    pub sessions: Sessions,
    pub commands: CommandStore,
    pub migrations: crate::orchestration::migrations::Migrations,
    pub scheduler: crate::orchestration::scheduler::Scheduler,
    pub schema: DroverSchema,
    pub events: broadcast::Sender<InventoryChange>,
    pub migration_events: broadcast::Sender<MigrationChange>,
    /// What this replica tells the others on one PostgreSQL, and hears from them.
    pub replicas: ReplicaBus,
    /// Who may call the API (API tokens).
    pub auth: Arc<crate::api::auth::Authenticator>,
    /// Web origins whose pages may call the API besides the hub's own.
    pub allowed_origins: Vec<String>,
}

impl Hub {
    /// Opens the store (migrating it) and assembles the hub around it.
    pub async fn open(database_url: &str, pki: Arc<Pki>) -> Result<Self, StoreError> {
        Self::open_as(database_url, pki, ReplicaSettings::default()).await
    }

    /// Opens the store (migrating it) and assembles the hub as the replica `replica`.
    pub async fn open_as(
        database_url: &str,
        pki: Arc<Pki>,
        replica: ReplicaSettings,
    ) -> Result<Self, StoreError> {
        let store = Store::open(database_url).await?;
        Ok(Self::with_store_as(store, pki, replica))
    }

    /// Opens the store, waiting for the database to come up (with backoff) for at most `wait`.
    pub async fn open_waiting(
        database_url: &str,
        pki: Arc<Pki>,
        wait: Duration,
        replica: ReplicaSettings,
    ) -> Result<Self, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        let cap = Duration::from_secs(5);
        let mut delays = crate::retry::delays(Duration::from_millis(200), cap);
        loop {
            let backoff = crate::retry::next(&mut delays, cap);
            match Self::open_as(database_url, pki.clone(), replica.clone()).await {
                Ok(hub) => return Ok(hub),
                Err(e @ (StoreError::Connect { .. } | StoreError::Unavailable(_)))
                    if tokio::time::Instant::now() + backoff < deadline =>
                {
                    tracing::warn!(error = %e, url = %redact(database_url), retry_in = ?backoff, "database not reachable yet");
                    tokio::time::sleep(backoff).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The hub `config` describes: its CA, its database (waited for), its replica name, its
    /// session timing and scheduler limits.
    pub async fn open_configured(config: &HubConfig) -> Result<Self, OpenError> {
        let pki = match &config.ca {
            Some((cert, key)) => Pki::load(cert, key),
            None => Pki::load_or_create(&config.data_dir.join("pki")),
        }?;
        let hub = Self::open_waiting(
            &config.database_url,
            Arc::new(pki),
            config.database_wait,
            config.replica.clone(),
        )
        .await?
        .with_session_timing(config.sessions);
        hub.scheduler.set_settings(config.scheduler.clone());
        Ok(Self {
            allowed_origins: config.allowed_origins.clone(),
            ..hub
        })
    }

    pub fn with_store(store: Store, pki: Arc<Pki>) -> Self {
        Self::with_store_as(store, pki, ReplicaSettings::default())
    }

    pub fn with_store_as(store: Store, pki: Arc<Pki>, replica: ReplicaSettings) -> Self {
        let (events, _) = broadcast::channel(1024);
        let replicas = ReplicaBus::new(&replica.name, store.backend());
        let reader = Arc::new(StoreReader::new(store.clone()));
        let identities = Identities::new(store.clone(), pki);
        let ingest = Ingest::new(store.clone(), events.clone(), replicas.clone());
        let commands = CommandStore::new(store.clone(), replicas.clone());
        let (migration_events, _) = broadcast::channel(4096);
        let sessions = Sessions::new(
            ingest.clone(),
            commands.clone(),
            SessionTiming::default(),
            Arc::new(StatusRecorder {
                store: store.clone(),
                events: migration_events.clone(),
                replicas: replicas.clone(),
            }),
        );
        let migrations = crate::orchestration::migrations::Migrations::new(
            store.clone(),
            commands.clone(),
            sessions.clone(),
            migration_events.clone(),
            Leases::new(store.clone(), replica.name, replica.lease),
        );
        let scheduler = crate::orchestration::scheduler::Scheduler::new(
            store.clone(),
            migrations.clone(),
            crate::config::SchedulerSettings::default(),
        );
        let auth = Arc::new(crate::api::auth::Authenticator::new(store.clone()));
        let admin = Arc::new(HubAdmin {
            auth: auth.clone(),
            store: store.clone(),
            identities: identities.clone(),
            sessions: sessions.clone(),
            commands: commands.clone(),
            migrations: migrations.clone(),
            scheduler: scheduler.clone(),
        });
        let schema = build_schema(
            reader,
            admin,
            Arc::new(crate::api::events::HubEvents {
                inventory: events.clone(),
                migrations: migration_events.clone(),
            }),
            SchemaLimits::default(),
        );
        Self {
            store,
            ingest,
            identities,
            sessions,
            commands,
            migrations,
            scheduler,
            schema,
            events,
            migration_events,
            replicas,
            auth,
            allowed_origins: Vec::new(),
        }
    }

    /// Tells the other replicas what this one does and passes on what they do, until
    /// `shutdown` resolves (at once on SQLite).
    pub async fn run_replicas(&self, shutdown: impl std::future::Future<Output = ()>) {
        let deliver = |notice: Notice| async move {
            match notice {
                Notice::Command { cluster, key } => match self.commands.get(&cluster, &key).await {
                    Ok(Some(command)) if command.state == CommandState::Pending => {
                        self.sessions.deliver(command);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, %cluster, %key, "cannot read a command another replica stored; the re-send sweep sends it")
                    }
                },
                Notice::Acked { cluster, key } => self.commands.announce_acked(cluster, key),
                Notice::Migration { event } => {
                    let _ = self.migration_events.send(event);
                }
                Notice::Inventory { event } => {
                    let _ = self.events.send(event);
                }
            }
        };
        self.replicas
            .run(self.store.clone(), deliver, shutdown)
            .await;
    }

    /// The agent endpoint's TLS listener on `tcp`, with a server certificate for `names`.
    pub fn agent_listener(
        &self,
        tcp: TcpListener,
        names: &[String],
    ) -> Result<TlsListener, PkiError> {
        let config = self.identities.pki().agent_server_config(names)?;
        TlsListener::new(tcp, config).map_err(|e| PkiError::Io {
            path: "agent listener".into(),
            source: e,
        })
    }

    /// Serves the agent endpoint until `shutdown` resolves.
    pub async fn serve_agents(
        &self,
        listener: TlsListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        endpoint::serve(
            listener,
            self.identities.clone(),
            self.sessions.clone(),
            shutdown,
        )
        .await
    }

    /// Resumes in-flight migrations, then admits queued ones until `shutdown` resolves (the
    /// hub's background work; `serve` answers requests).
    pub async fn run_scheduler(&self, shutdown: impl std::future::Future<Output = ()>) {
        // Every round resumes in-flight migrations without a driver first: a start whose
        // database is away picks them up as soon as it is back.
        self.scheduler.clone().run(shutdown).await;
    }

    /// The same hub with other session timing (tests use short heartbeats).
    pub fn with_session_timing(mut self, timing: SessionTiming) -> Self {
        self.sessions = self.sessions.retimed(timing);
        self
    }

    pub fn router(&self) -> axum::Router {
        self.router_with(Some(self.auth.clone()))
    }

    /// The router with authentication off: every request acts as an admin. Only for
    /// measuring what authentication costs (the benchmark); a served hub always checks.
    pub fn router_without_authentication(&self) -> axum::Router {
        self.router_with(None)
    }

    fn router_with(&self, auth: Option<Arc<crate::api::auth::Authenticator>>) -> axum::Router {
        server::router(Arc::new(App {
            schema: self.schema.clone(),
            store: self.store.clone(),
            metrics: server::metrics_handle(),
            auth,
            allowed_origins: self.allowed_origins.clone(),
        }))
    }

    /// Serves HTTP on `listener` until `shutdown` resolves.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr: Option<SocketAddr> = listener.local_addr().ok();
        tracing::info!(?addr, "drover-hub serving");
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}
