//! The agent's side of cross-cluster migrations: the receiver (expects its sender on the sync
//! endpoint, creates the receiving VM when the sender describes it, takes over at switchover)
//! and the sender (opens the control channel, tunnels disk and memory through the agents' TLS,
//! reports progress to the hub, switches over). Exactly one side is authoritative at any moment:
//! the source until the target confirms it runs, the target after. The runtime does the
//! QEMU-level work behind `MigrationRuntime`.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_shared::commands::{CommandOutcome, VmSpec};
use drover_shared::inventory::MigrationPhase;
use drover_shared::migration::{
    MigrationOptions, MigrationProgress, MigrationStatus, SyncChannel, SyncMessage,
};
use drover_shared::protocol::AgentMessage;
use drover_shared::telemetry::{continue_trace, traceparent_of, MIGRATION_TRACE_TARGET};
use drover_shared::{ClusterName, MigrationId};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tracing::field::Empty;
use tracing::{Instrument as _, Span};

use crate::identity::AgentIdentity;
use crate::sync::{BoxedStream, Expected, LocalTunnel, PeerDialer, ReceiverSockets, SyncEndpoint};

/// How long a prepared receiver waits for its sender before it gives up and cleans up.
const RECEIVER_WAIT: Duration = Duration::from_secs(600);
/// How long the sender waits for the receiving VM to be created.
const PREPARE_WAIT: Duration = Duration::from_secs(120);
/// How long the sender waits for the target to confirm the switchover.
const SWITCHOVER_WAIT: Duration = Duration::from_secs(60);
/// Longest control message.
const MAX_MESSAGE: usize = 1 << 20;

/// How often a sender reports its progress to the hub.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Which progress reports go to the hub: about one a second, the one that says nothing is
/// left, and, once the transfer ended, the last one held back (`flush`). A transfer shorter
/// than a second still leaves its final figures on the hub.
#[derive(Debug)]
struct ProgressThrottle {
    every: Duration,
    last_sent: Option<Instant>,
    held: Option<MigrationProgress>,
}

impl ProgressThrottle {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last_sent: None,
            held: None,
        }
    }

    /// The report to send now, if it is due; otherwise it is held until the next one or
    /// `flush`.
    fn offer(&mut self, progress: MigrationProgress, now: Instant) -> Option<MigrationProgress> {
        let due = progress.bytes_remaining == 0
            || self
                .last_sent
                .is_none_or(|at| now.saturating_duration_since(at) >= self.every);
        if due {
            self.last_sent = Some(now);
            self.held = None;
            Some(progress)
        } else {
            self.held = Some(progress);
            None
        }
    }

    /// The latest report not sent yet.
    fn flush(&mut self) -> Option<MigrationProgress> {
        self.held.take()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn running_status(
    migration: MigrationId,
    cluster: &ClusterName,
    progress: MigrationProgress,
) -> AgentMessage {
    AgentMessage::MigrationStatus(MigrationStatus {
        migration_id: migration,
        phase: MigrationPhase::Running,
        progress: Some(progress),
        message: None,
        switchover: false,
        cluster: cluster.clone(),
    })
}

/// What a send reports when the memory stream completed (the source is paused).
#[derive(Debug, Clone, Copy)]
pub struct SendReport {
    /// What QEMU reports: the source's guest stopped until the transfer completed.
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub bytes: u64,
    /// The disks' share of `bytes` and `total_ms`.
    pub disk_bytes: u64,
    pub disk_ms: u64,
    /// When the sender saw the transfer complete; the guest stays stopped until the target
    /// resumes it (the switchover).
    pub completed_at: std::time::Instant,
}

/// The QEMU-level steps of a migration; the qemu runtime implements them.
pub trait MigrationRuntime: Send + Sync + 'static {
    /// The declared spec of a VM this agent runs.
    fn vm_spec(&self, namespace: &str, name: &str) -> Result<VmSpec, String>;
    /// Whether a VM of that name exists here.
    fn has_vm(&self, namespace: &str, name: &str) -> bool;
    /// The receiving VM of `migration` left here (e.g. by an agent restart), if any.
    fn receiver_of(&self, migration: MigrationId) -> Option<(String, String)>;
    fn prepare_receiver(
        &self,
        spec: VmSpec,
        migration: MigrationId,
    ) -> impl Future<Output = Result<ReceiverSockets, String>> + Send;
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        namespace: &str,
        name: &str,
        migration: MigrationId,
        disk_socket: PathBuf,
        memory_socket: PathBuf,
        options: MigrationOptions,
        progress: Box<dyn Fn(MigrationProgress) + Send + Sync>,
    ) -> impl Future<Output = Result<SendReport, String>> + Send;
    fn cancel_send(&self, namespace: &str, name: &str) -> impl Future<Output = ()> + Send;
    fn finish_receiver(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), String>> + Send;
    fn finish_sender(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), String>> + Send;
    fn resume_sender(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), String>> + Send;
    fn abort_receiver(&self, namespace: &str, name: &str) -> impl Future<Output = ()> + Send;
}

struct Sending {
    cancel: watch::Sender<Option<String>>,
}

struct Receiving {
    namespace: String,
    name: String,
    task: tokio::task::JoinHandle<()>,
}

/// This agent's migrations in flight.
pub struct MigrationController<R> {
    runtime: Arc<R>,
    sync: Arc<SyncEndpoint>,
    identity: Arc<AgentIdentity>,
    cluster: ClusterName,
    work_dir: PathBuf,
    outbox: mpsc::UnboundedSender<AgentMessage>,
    sending: Mutex<HashMap<MigrationId, Sending>>,
    receiving: Arc<Mutex<HashMap<MigrationId, Receiving>>>,
}

fn failed(reason: impl Into<String>) -> CommandOutcome {
    CommandOutcome::Failed {
        reason: reason.into(),
    }
}

fn succeeded(message: impl Into<String>) -> CommandOutcome {
    CommandOutcome::Succeeded {
        message: message.into(),
    }
}

/// Marks a span as ended well or with `error`.
fn record_result(span: &Span, error: Option<&str>) {
    match error {
        None => {
            span.record("otel.status_code", "OK");
        }
        Some(reason) => {
            span.record("otel.status_code", "ERROR");
            span.record("error.message", reason);
        }
    }
}

/// Records how a command ended on its span.
fn record_outcome(span: &Span, outcome: &CommandOutcome) {
    match outcome {
        CommandOutcome::Succeeded { .. } => record_result(span, None),
        CommandOutcome::Failed { reason } => record_result(span, Some(reason)),
    }
}

async fn send_message(stream: &mut BoxedStream, message: &SyncMessage) -> Result<(), String> {
    let mut line = serde_json::to_vec(message).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| format!("the sync channel broke: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("the sync channel broke: {e}"))
}

/// Reads control messages into a channel (so callers can wait on them with `select!`).
fn spawn_reader(
    stream: tokio::io::ReadHalf<BoxedStream>,
) -> (
    mpsc::Receiver<Result<SyncMessage, String>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        let mut lines = BufReader::new(stream);
        loop {
            let mut line = String::new();
            let read = (&mut lines)
                .take(MAX_MESSAGE as u64)
                .read_line(&mut line)
                .await;
            let message = match read {
                Ok(0) => Err("the peer closed the sync channel".to_owned()),
                Ok(_) => serde_json::from_str(line.trim())
                    .map_err(|e| format!("unreadable sync message: {e}")),
                Err(e) => Err(format!("the sync channel broke: {e}")),
            };
            let end = message.is_err();
            if tx.send(message).await.is_err() || end {
                return;
            }
        }
    });
    (rx, task)
}

impl<R: MigrationRuntime> MigrationController<R> {
    pub fn new(
        runtime: Arc<R>,
        sync: Arc<SyncEndpoint>,
        identity: Arc<AgentIdentity>,
        work_dir: &Path,
        outbox: mpsc::UnboundedSender<AgentMessage>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cluster: identity.cluster.clone(),
            runtime,
            sync,
            identity,
            work_dir: work_dir.join("migrations"),
            outbox,
            sending: Mutex::default(),
            receiving: Arc::default(),
        })
    }

    fn status(
        &self,
        migration: MigrationId,
        phase: MigrationPhase,
        progress: Option<MigrationProgress>,
    ) {
        let _ = self
            .outbox
            .send(AgentMessage::MigrationStatus(MigrationStatus {
                migration_id: migration,
                phase,
                progress,
                message: None,
                switchover: false,
                cluster: self.cluster.clone(),
            }));
    }

    /// Target side: expect the source on the sync endpoint; the receiving VM is created when
    /// the sender describes it.
    pub async fn prepare_receiver(
        self: &Arc<Self>,
        migration: MigrationId,
        source: ClusterName,
        namespace: String,
        name: String,
        trace_parent: Option<String>,
    ) -> CommandOutcome {
        let span = tracing::info_span!(
            target: MIGRATION_TRACE_TARGET,
            "prepare receiver",
            drover.migration.id = %migration,
            drover.vm = %format!("{namespace}/{name}"),
            drover.source.cluster = %source,
            drover.target.cluster = %self.cluster,
            otel.status_code = Empty,
            error.message = Empty,
        );
        continue_trace(&span, trace_parent.as_deref());
        let outcome = self
            .expect_sender(migration, source, namespace, name)
            .instrument(span.clone())
            .await;
        record_outcome(&span, &outcome);
        outcome
    }

    async fn expect_sender(
        self: &Arc<Self>,
        migration: MigrationId,
        source: ClusterName,
        namespace: String,
        name: String,
    ) -> CommandOutcome {
        if self
            .receiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&migration)
        {
            return succeeded("the target is already waiting for its source");
        }
        if self.runtime.has_vm(&namespace, &name) {
            return failed(format!(
                "a virtual machine {namespace}/{name} already exists on this cluster"
            ));
        }
        let (control_tx, control_rx) = mpsc::channel(1);
        let (sockets_tx, sockets_rx) = watch::channel(None);
        self.sync.expect(
            migration,
            Expected {
                source_cluster: source.clone(),
                sockets: sockets_rx,
                control: control_tx,
            },
        );
        let this = self.clone();
        let (ns, n, from) = (namespace.clone(), name.clone(), source.clone());
        let task = tokio::spawn(async move {
            let mut span = Span::none();
            let outcome = this
                .receive(migration, &ns, &n, &from, control_rx, sockets_tx, &mut span)
                .await;
            record_result(&span, outcome.as_ref().err().map(String::as_str));
            match &outcome {
                Ok(()) => {
                    tracing::info!(%migration, vm = %format!("{ns}/{n}"), "migration received; the VM runs here now")
                }
                Err(reason) => {
                    tracing::warn!(%migration, %reason, "receiving side ends; removing everything of it");
                    this.runtime
                        .abort_receiver(&ns, &n)
                        .instrument(tracing::info_span!(target: MIGRATION_TRACE_TARGET, parent: &span, "remove receiver"))
                        .await;
                }
            }
            this.sync.forget(&migration);
            this.receiving
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&migration);
        });
        self.receiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                migration,
                Receiving {
                    namespace,
                    name,
                    task,
                },
            );
        self.status(migration, MigrationPhase::TargetReady, None);
        succeeded(format!("target ready; waiting for cluster {source}"))
    }

    /// The receiving side, from the sender's first message to the switchover. `span` becomes
    /// the receive span, a child of the sender's span, once the sender has described the VM.
    #[allow(clippy::too_many_arguments)]
    async fn receive(
        &self,
        migration: MigrationId,
        namespace: &str,
        name: &str,
        source: &ClusterName,
        mut control_rx: mpsc::Receiver<BoxedStream>,
        sockets: watch::Sender<Option<ReceiverSockets>>,
        span: &mut Span,
    ) -> Result<(), String> {
        let stream = tokio::time::timeout(RECEIVER_WAIT, control_rx.recv())
            .await
            .map_err(|_| {
                format!(
                    "the source did not connect within {} s",
                    RECEIVER_WAIT.as_secs()
                )
            })?
            .ok_or("the sync endpoint stopped")?;
        let (read, write) = tokio::io::split(stream);
        let mut write: BoxedStream = Box::new(WriteOnly(write));
        let (mut messages, reader) = spawn_reader(read);
        let _reader = AbortOnDrop(reader);
        let mut prepared = false;
        loop {
            let message = messages
                .recv()
                .await
                .unwrap_or_else(|| Err("the sync channel ended".into()))?;
            match message {
                SyncMessage::Prepare {
                    mut spec,
                    trace_parent,
                } => {
                    *span = tracing::info_span!(
                        target: MIGRATION_TRACE_TARGET,
                        "receive",
                        drover.migration.id = %migration,
                        drover.vm = %format!("{namespace}/{name}"),
                        drover.source.cluster = %source,
                        drover.target.cluster = %self.cluster,
                        otel.status_code = Empty,
                        error.message = Empty,
                    );
                    continue_trace(span, trace_parent.as_deref());
                    if spec.name != name || spec.namespace != namespace {
                        let reason = format!(
                            "the sender describes {}/{}, but this target was prepared for {namespace}/{name}",
                            spec.namespace, spec.name
                        );
                        let _ = send_message(
                            &mut write,
                            &SyncMessage::Prepared {
                                ready: false,
                                reason: Some(reason.clone()),
                            },
                        )
                        .await;
                        return Err(reason);
                    }
                    spec.run_strategy = drover_shared::inventory::RunStrategy::WaitAsReceiver;
                    let prepare = self.runtime.prepare_receiver(spec, migration).instrument(
                        tracing::info_span!(target: MIGRATION_TRACE_TARGET, parent: &*span, "prepare vm"),
                    );
                    match prepare.await {
                        Ok(s) => {
                            let _ = sockets.send(Some(s));
                            prepared = true;
                            send_message(
                                &mut write,
                                &SyncMessage::Prepared {
                                    ready: true,
                                    reason: None,
                                },
                            )
                            .await?;
                        }
                        Err(reason) => {
                            let _ = send_message(
                                &mut write,
                                &SyncMessage::Prepared {
                                    ready: false,
                                    reason: Some(reason.clone()),
                                },
                            )
                            .await;
                            return Err(format!("preparing the receiving VM failed: {reason}"));
                        }
                    }
                }
                SyncMessage::SourceStatus { .. } => {}
                SyncMessage::Switchover if prepared => {
                    let result = self
                        .runtime
                        .finish_receiver(namespace, name)
                        .instrument(tracing::info_span!(
                            target: MIGRATION_TRACE_TARGET,
                            parent: &*span,
                            "take over"
                        ))
                        .await;
                    let reply = SyncMessage::SwitchedOver {
                        succeeded: result.is_ok(),
                        reason: result.as_ref().err().cloned(),
                    };
                    // Once the target runs it is authoritative, whether or not the source hears.
                    let _ = send_message(&mut write, &reply).await;
                    return result.map_err(|e| format!("the target could not take over: {e}"));
                }
                SyncMessage::Cancel { reason } => {
                    return Err(format!("cancelled by the source: {reason}"))
                }
                other => {
                    return Err(format!("unexpected message from the source: {other:?}"));
                }
            }
        }
    }

    /// Source side: the whole send, through switchover.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        self: &Arc<Self>,
        migration: MigrationId,
        namespace: String,
        name: String,
        target: ClusterName,
        target_namespace: String,
        connect_url: String,
        options: MigrationOptions,
        trace_parent: Option<String>,
    ) -> CommandOutcome {
        let span = tracing::info_span!(
            target: MIGRATION_TRACE_TARGET,
            "send",
            drover.migration.id = %migration,
            drover.vm = %format!("{namespace}/{name}"),
            drover.source.cluster = %self.cluster,
            drover.target.cluster = %target,
            drover.bytes = Empty,
            drover.downtime_ms = Empty,
            otel.status_code = Empty,
            error.message = Empty,
        );
        continue_trace(&span, trace_parent.as_deref());
        let (cancel_tx, cancel_rx) = watch::channel(None);
        self.sending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(migration, Sending { cancel: cancel_tx });
        let result = self
            .send_inner(
                migration,
                &namespace,
                &name,
                &target,
                &target_namespace,
                &connect_url,
                options,
                cancel_rx,
            )
            .instrument(span.clone())
            .await;
        record_result(&span, result.as_ref().err().map(String::as_str));
        self.sending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&migration);
        let _ = std::fs::remove_dir_all(self.work_dir.join(migration.to_string()));
        match result {
            Ok(message) => {
                self.status(migration, MigrationPhase::Succeeded, None);
                succeeded(message)
            }
            Err(reason) => {
                self.status(migration, MigrationPhase::Failed, None);
                failed(reason)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_inner(
        &self,
        migration: MigrationId,
        namespace: &str,
        name: &str,
        target: &ClusterName,
        target_namespace: &str,
        connect_url: &str,
        options: MigrationOptions,
        mut cancel: watch::Receiver<Option<String>>,
    ) -> Result<String, String> {
        let mut spec = self.runtime.vm_spec(namespace, name)?;
        spec.namespace = target_namespace.to_owned();
        let dialer = PeerDialer::new(&self.identity, connect_url, target, migration)
            .map_err(|e| e.to_string())?;
        let control = dialer
            .open(SyncChannel::Control)
            .await
            .map_err(|e| e.to_string())?;
        let (read, write) = tokio::io::split(control);
        let mut write: BoxedStream = Box::new(WriteOnly(write));
        let (mut messages, reader) = spawn_reader(read);
        let _reader = AbortOnDrop(reader);

        let prepare_span = tracing::info_span!(target: MIGRATION_TRACE_TARGET, "prepare target");
        let trace_parent = traceparent_of(&Span::current());
        send_message(&mut write, &SyncMessage::Prepare { spec, trace_parent })
            .instrument(prepare_span.clone())
            .await?;
        let prepared = tokio::time::timeout(PREPARE_WAIT, messages.recv())
            .instrument(prepare_span)
            .await;
        match prepared {
            Ok(Some(Ok(SyncMessage::Prepared { ready: true, .. }))) => {}
            Ok(Some(Ok(SyncMessage::Prepared { reason, .. }))) => {
                return Err(format!(
                    "the target could not prepare the VM: {}",
                    reason.unwrap_or_default()
                ))
            }
            Ok(Some(Ok(other))) => {
                return Err(format!("unexpected answer from the target: {other:?}"))
            }
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err("the sync channel ended".into()),
            Err(_) => {
                return Err(format!(
                    "the target did not prepare the VM within {} s",
                    PREPARE_WAIT.as_secs()
                ))
            }
        }

        let dir = self.work_dir.join(migration.to_string());
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let disk = LocalTunnel::start(&dir.join("disk.sock"), dialer.clone(), SyncChannel::Disk)
            .map_err(|e| format!("cannot open the disk tunnel: {e}"))?;
        let memory = LocalTunnel::start(
            &dir.join("memory.sock"),
            dialer.clone(),
            SyncChannel::Memory,
        )
        .map_err(|e| format!("cannot open the memory tunnel: {e}"))?;
        self.status(migration, MigrationPhase::Running, None);

        let throttle = Arc::new(Mutex::new(ProgressThrottle::new(PROGRESS_EVERY)));
        let progress = {
            let (outbox, cluster) = (self.outbox.clone(), self.cluster.clone());
            let throttle = throttle.clone();
            Box::new(move |p: MigrationProgress| {
                let due = lock(&throttle).offer(p, Instant::now());
                if let Some(p) = due {
                    let _ = outbox.send(running_status(migration, &cluster, p));
                }
            })
        };
        let send = self
            .runtime
            .send(
                namespace,
                name,
                migration,
                disk.path().to_owned(),
                memory.path().to_owned(),
                options,
                progress,
            )
            .instrument(tracing::info_span!(
                target: MIGRATION_TRACE_TARGET,
                "transfer"
            ));
        tokio::pin!(send);
        let report = loop {
            tokio::select! {
                result = &mut send => break result,
                _ = cancel.changed() => {
                    let reason = cancel.borrow().clone().unwrap_or_else(|| "cancelled".into());
                    self.runtime.cancel_send(namespace, name).await;
                    let _ = send_message(&mut write, &SyncMessage::Cancel { reason: reason.clone() }).await;
                    return Err(format!("cancelled: {reason}; the source keeps running"));
                }
                message = messages.recv() => match message {
                    Some(Ok(SyncMessage::Cancel { reason })) => {
                        self.runtime.cancel_send(namespace, name).await;
                        return Err(format!("the target cancelled: {reason}; the source keeps running"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        self.runtime.cancel_send(namespace, name).await;
                        return Err(format!("lost the target during the transfer ({e}); the source keeps running"));
                    }
                    None => {
                        self.runtime.cancel_send(namespace, name).await;
                        return Err("lost the target during the transfer; the source keeps running".into());
                    }
                },
            }
        };
        // The last figures go out before the send's outcome (the same ordered channel), so
        // the hub records them before it ends the migration and exports its trace, however
        // short the transfer was.
        let last = lock(&throttle).flush();
        if let Some(p) = last {
            let _ = self
                .outbox
                .send(running_status(migration, &self.cluster, p));
        }
        let report = match report {
            Ok(r) => r,
            Err(reason) => {
                let _ = send_message(
                    &mut write,
                    &SyncMessage::Cancel {
                        reason: reason.clone(),
                    },
                )
                .await;
                return Err(format!("{reason}; the source keeps running"));
            }
        };
        drop((disk, memory));
        Span::current().record("drover.bytes", report.bytes);
        Span::current().record("drover.downtime_ms", report.downtime_ms);
        let switchover = tracing::info_span!(
            target: MIGRATION_TRACE_TARGET,
            "switchover",
            drover.downtime_ms = report.downtime_ms,
            drover.pause_ms = Empty,
            otel.status_code = Empty,
            error.message = Empty,
        );
        let result = self
            .switch_over(migration, namespace, name, target, &report, write, messages)
            .instrument(switchover.clone())
            .await;
        record_result(&switchover, result.as_ref().err().map(String::as_str));
        result
    }

    /// The source is paused with everything sent: the target takes over, or the source resumes.
    #[allow(clippy::too_many_arguments)]
    async fn switch_over(
        &self,
        migration: MigrationId,
        namespace: &str,
        name: &str,
        target: &ClusterName,
        report: &SendReport,
        mut write: BoxedStream,
        mut messages: mpsc::Receiver<Result<SyncMessage, String>>,
    ) -> Result<String, String> {
        // Switchover: the source is paused; the target takes over, or the source resumes.
        // The hub hears of it first: from now on it refuses cancels (this agent would too).
        let _ = self
            .outbox
            .send(AgentMessage::MigrationStatus(MigrationStatus {
                migration_id: migration,
                phase: MigrationPhase::Running,
                progress: None,
                message: None,
                switchover: true,
                cluster: self.cluster.clone(),
            }));
        send_message(&mut write, &SyncMessage::Switchover).await.map_err(|e| {
            format!("{e}: the switchover could not be requested; the source stays paused until an operator checks the target")
        })?;
        match tokio::time::timeout(SWITCHOVER_WAIT, messages.recv()).await {
            Ok(Some(Ok(SyncMessage::SwitchedOver { succeeded: true, .. }))) => {
                // From the source's stop to the target's answer that its guest runs: the
                // guest's whole pause, at most (the answer comes just after the resume).
                let pause_ms = report.downtime_ms + report.completed_at.elapsed().as_millis() as u64;
                Span::current().record("drover.pause_ms", pause_ms);
                if let Err(e) = self.runtime.finish_sender(namespace, name).await {
                    tracing::warn!(%migration, error = %e, "removing the source VM after switchover failed");
                }
                Ok(format!(
                    "moved to {target} (downtime {} ms, paused {pause_ms} ms, {} bytes in {} ms; disks {} bytes in {} ms)",
                    report.downtime_ms, report.bytes, report.total_ms, report.disk_bytes, report.disk_ms
                ))
            }
            Ok(Some(Ok(SyncMessage::SwitchedOver { reason, .. }))) => {
                let reason = reason.unwrap_or_default();
                self.runtime.resume_sender(namespace, name).await.map_err(|e| {
                    format!("the target could not take over ({reason}) and resuming the source failed: {e}")
                })?;
                Err(format!("the target could not take over ({reason}); the source resumed"))
            }
            _ => Err(format!(
                "no answer to the switchover from {target}: the source stays paused so that the VM never runs twice; check whether it runs on {target}"
            )),
        }
    }

    /// Cancels whatever this agent does for `migration`.
    pub async fn cancel(
        &self,
        migration: MigrationId,
        trace_parent: Option<String>,
    ) -> CommandOutcome {
        let span = tracing::info_span!(
            target: MIGRATION_TRACE_TARGET,
            "cancel",
            drover.migration.id = %migration,
            drover.cluster = %self.cluster,
            otel.status_code = Empty,
            error.message = Empty,
        );
        continue_trace(&span, trace_parent.as_deref());
        let outcome = self.cancel_here(migration).instrument(span.clone()).await;
        record_outcome(&span, &outcome);
        outcome
    }

    async fn cancel_here(&self, migration: MigrationId) -> CommandOutcome {
        if let Some(s) = self
            .sending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&migration)
        {
            let _ = s.cancel.send(Some("cancelled by the hub".into()));
            return succeeded("the send is being cancelled; the source keeps running");
        }
        let receiving = self
            .receiving
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&migration);
        if let Some(r) = receiving {
            r.task.abort();
            self.sync.forget(&migration);
            self.runtime.abort_receiver(&r.namespace, &r.name).await;
            return succeeded("the receiving side was removed");
        }
        // Left by an earlier run of this agent: its sender is gone, so it can only be removed.
        if let Some((namespace, name)) = self.runtime.receiver_of(migration) {
            self.sync.forget(&migration);
            self.runtime.abort_receiver(&namespace, &name).await;
            return succeeded("the receiving side left by an agent restart was removed");
        }
        succeeded("nothing of this migration is in flight here")
    }
}

/// The write half of a split stream as a stream of its own (reads end at once).
struct WriteOnly(tokio::io::WriteHalf<BoxedStream>);

impl tokio::io::AsyncRead for WriteOnly {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        _buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for WriteOnly {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Aborts a helper task when its owner is done with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(transferred: u64, remaining: u64) -> MigrationProgress {
        MigrationProgress {
            bytes_total: 160 << 20,
            bytes_transferred: transferred,
            bytes_remaining: remaining,
            dirty_rate_bytes_per_sec: 0,
            throughput_bytes_per_sec: 0,
        }
    }

    #[test]
    fn a_transfer_shorter_than_a_second_still_leaves_its_final_figures() {
        // The case that left a trace saying 0 bytes moved: the first report goes out, the
        // rest of a 0.8 s transfer falls inside the second, and the last one still counts a
        // few bytes of disk as remaining.
        let start = Instant::now();
        let mut throttle = ProgressThrottle::new(PROGRESS_EVERY);
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(
            throttle.offer(report(0, 160 << 20), at(0)),
            Some(report(0, 160 << 20))
        );
        assert_eq!(throttle.offer(report(80 << 20, 80 << 20), at(400)), None);
        assert_eq!(throttle.offer(report(159 << 20, 4096), at(800)), None);
        assert_eq!(throttle.flush(), Some(report(159 << 20, 4096)));
        assert_eq!(throttle.flush(), None, "sent once");
    }

    #[test]
    fn reports_go_out_once_a_second_and_when_nothing_is_left() {
        let start = Instant::now();
        let mut throttle = ProgressThrottle::new(PROGRESS_EVERY);
        let at = |ms| start + Duration::from_millis(ms);
        assert!(throttle.offer(report(0, 100), at(0)).is_some());
        assert!(throttle.offer(report(10, 90), at(500)).is_none());
        assert!(throttle.offer(report(20, 80), at(1000)).is_some());
        assert!(throttle.offer(report(100, 0), at(1100)).is_some());
        assert_eq!(
            throttle.flush(),
            None,
            "nothing held after the final report"
        );
    }
}
