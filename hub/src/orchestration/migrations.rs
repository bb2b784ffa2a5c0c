//! Single-VM cross-cluster migrations on the hub: preflight, the Migration row (its id is the
//! migrationID both agents share), and the driver that walks it through its phases by durable
//! commands — prepare-receiver to the target, then send to the source — recording phase
//! timestamps, progress reported by the agents, and the outcome. The driver keeps no state of its
//! own: after a hub restart `resume` picks every in-flight migration up from its row.

use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_shared::commands::AgentCommand;
use drover_shared::inventory::{MigrationConfig, MigrationPhase};
use drover_shared::migration::{MigrationOptions, MigrationStatus};
use drover_shared::{ClusterName, MigrationId, Namespace, VmName, VmRef};
use uuid::Uuid;

use drover_shared::events::MigrationChange;
use tokio::sync::broadcast;

use crate::agents::commands::{CommandState, CommandStore, StoredCommand};
use crate::agents::sessions::Sessions;
use crate::core::lifecycle::{
    self, CancelDecision, Limits, Observation, Step, Stored, BEFORE_SEND, PREPARE_TIMEOUT,
    SEND_MARGIN,
};
use crate::orchestration::migration_trace;
use crate::store::entities::migration;
use crate::store::migrations::{MigrationRows, NewMigration};
use crate::store::{Store, StoreError};

pub use crate::store::migrations::QueuedMigration;

pub use drover_shared::migration::MigrateRequest;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Preflight said no; each reason names what is wrong.
    #[error("the migration cannot start: {}", .0.join("; "))]
    Preflight(Vec<String>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone)]
pub struct Migrations {
    store: Store,
    /// The migrations table.
    rows: MigrationRows,
    commands: CommandStore,
    sessions: Sessions,
    /// The migrations this process drives (one driver each), each with the token that stops
    /// its driver when another replica took it over.
    driving: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<Uuid, tokio_util::sync::CancellationToken>>,
    >,
    /// Which migrations this replica may drive.
    leases: crate::store::leases::Leases,
    /// Owns every driver task; `stop_drivers` ends them and waits for them.
    tasks: tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
    /// Wakes the scheduler: something was queued or ended.
    pub wake: std::sync::Arc<tokio::sync::Notify>,
    /// Phase changes for `migrationEvents`.
    events: broadcast::Sender<MigrationChange>,
}

/// Records what agents report of their migrations (progress, the switchover beginning) and
/// passes it on to `migrationEvents` on every replica.
pub struct StatusRecorder {
    pub store: Store,
    pub events: broadcast::Sender<MigrationChange>,
    pub replicas: crate::replicas::ReplicaBus,
}

#[async_trait::async_trait]
impl crate::agents::sessions::MigrationReports for StatusRecorder {
    async fn migration_status(&self, from: &ClusterName, status: &MigrationStatus) {
        if let Err(e) = record_status(&self.store, &self.events, &self.replicas, from, status).await
        {
            tracing::warn!(cluster = %from, migration = %status.migration_id, error = %e, "recording migration progress failed");
        }
    }
}

/// The change to tell subscribers and the other replicas: `row` is now in `phase`.
pub fn event_of(
    row: &migration::Model,
    phase: MigrationPhase,
    progress: Option<&drover_shared::migration::MigrationProgress>,
    failure: Option<&str>,
    at: DateTime<Utc>,
) -> MigrationChange {
    MigrationChange {
        migration_id: row.id,
        evacuation_id: row.evacuation_id,
        vm_namespace: row.vm_namespace.clone(),
        vm_name: row.vm_name.clone(),
        source_cluster: row.source_cluster_name.clone(),
        target_cluster: row.target_cluster_name.clone(),
        phase,
        progress: progress.copied(),
        failure_reason: failure.map(str::to_owned),
        at,
    }
}

/// A driver counted in `drover_migration_drivers_waiting` while it waits for the database
/// (uncounted again when it resumes, ends or is stopped).
struct WaitingForDatabase(bool);

impl WaitingForDatabase {
    fn set(&mut self, waiting: bool) {
        if waiting != self.0 {
            let gauge = metrics::gauge!("drover_migration_drivers_waiting");
            if waiting {
                gauge.increment(1.0);
            } else {
                gauge.decrement(1.0);
            }
            self.0 = waiting;
        }
    }
}

impl Drop for WaitingForDatabase {
    fn drop(&mut self) {
        self.set(false);
    }
}

impl Migrations {
    pub fn new(
        store: Store,
        commands: CommandStore,
        sessions: Sessions,
        events: broadcast::Sender<MigrationChange>,
        leases: crate::store::leases::Leases,
    ) -> Self {
        Self {
            rows: MigrationRows::new(store.clone()),
            store,
            commands,
            sessions,
            driving: std::sync::Arc::default(),
            leases,
            tasks: tokio_util::task::TaskTracker::new(),
            stop: tokio_util::sync::CancellationToken::new(),
            wake: std::sync::Arc::default(),
            events,
        }
    }

    /// Ends every driver (each at its next await; the rows say where it was, so the next hub
    /// takes over) and waits up to `within` for them. True when all ended in time.
    /// Its leases are given up then, so another replica takes over at once.
    pub async fn stop_drivers(&self, within: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        let stopped = tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_ok();
        match tokio::time::timeout(within, self.leases.release_all()).await {
            Ok(Ok(released)) => tracing::info!(released, "driver leases given up"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not give up the driver leases; they run out instead")
            }
            Err(_) => tracing::warn!("giving up the driver leases timed out; they run out instead"),
        }
        stopped
    }

    /// This replica's leases.
    pub fn leases(&self) -> &crate::store::leases::Leases {
        &self.leases
    }

    /// Tells `migrationEvents` subscribers.
    pub fn publish(&self, event: MigrationChange) {
        self.commands
            .replicas()
            .tell(crate::replicas::Notice::Migration {
                event: event.clone(),
            });
        let _ = self.events.send(event);
    }

    /// Checks what applies to one VM and, if all is well, creates the migration and starts
    /// driving it. Returns its id.
    pub async fn start(&self, req: MigrateRequest, actor: &str) -> Result<Uuid, MigrateError> {
        let source = self
            .rows
            .cluster_named(req.cluster.as_str())
            .await?
            .ok_or_else(|| {
                MigrateError::NotFound(format!("cluster \"{}\" is not in the fleet", req.cluster))
            })?;
        let target = self
            .rows
            .cluster_named(req.target_cluster.as_str())
            .await?
            .ok_or_else(|| {
                MigrateError::NotFound(format!(
                    "target cluster \"{}\" is not in the fleet",
                    req.target_cluster
                ))
            })?;
        let vm = self
            .rows
            .vm_named(source.id, &req.namespace, &req.name)
            .await?
            .ok_or_else(|| {
                MigrateError::NotFound(format!(
                    "virtual machine {}/{} is not on cluster {}",
                    req.namespace, req.name, req.cluster
                ))
            })?;
        let in_flight = self.rows.not_ended_of_vm(&vm.uid).await?;
        if in_flight > 0 {
            return Err(MigrateError::Conflict(format!(
                "virtual machine {}/{} is already migrating; wait for it or cancel it",
                req.namespace, req.name
            )));
        }

        if source.id == target.id {
            return Err(MigrateError::Preflight(vec![format!(
                "{} is both the source and the target: name another cluster as the target",
                source.name
            )]));
        }
        // The planner's rules, exactly as an evacuation applies them: one rulebook.
        let fleet = crate::inventory::fleet_view::load_fleet(&self.store).await?;
        let vm_ref = VmRef {
            cluster: req.cluster.clone(),
            namespace: Namespace::new(vm.namespace.clone())
                .map_err(|e| MigrateError::NotFound(e.to_string()))?,
            name: VmName::new(vm.name.clone())
                .map_err(|e| MigrateError::NotFound(e.to_string()))?,
        };
        let mut options =
            crate::core::planner::PlanOptions::new(MigrationId::new().0, self.store.clock.now());
        options.target_namespace = Some(req.target_namespace.clone());
        let plan =
            crate::core::planner::plan_move(&fleet, &vm_ref, Some(&req.target_cluster), &options);
        if let Some(refused) = plan.cannot_move.first() {
            return Err(MigrateError::Preflight(
                refused.reasons.iter().map(ToString::to_string).collect(),
            ));
        }
        let Some(planned) = plan.moves.first() else {
            return Err(MigrateError::Preflight(plan.notes.clone()));
        };
        let id = self
            .enqueue(
                QueuedMigration {
                    vm_uid: vm.uid.clone(),
                    namespace: vm.namespace.clone(),
                    name: vm.name.clone(),
                    source_cluster: (source.id, source.name.clone()),
                    target_cluster: (target.id, target.name.clone()),
                    target_namespace: req.target_namespace.clone(),
                    source_node: planned.source_node.clone(),
                    planned_bytes: planned.bytes.min(i64::MAX as u64) as i64,
                    options: planned.options,
                    evacuation_id: None,
                    queue_position: 0,
                    attempt: 1,
                },
                actor,
            )
            .await?;
        Ok(id)
    }

    /// Queues a migration (phase Pending): the scheduler admits it when every limit allows.
    pub async fn enqueue(&self, q: QueuedMigration, actor: &str) -> Result<Uuid, StoreError> {
        self.enqueue_with_id(MigrationId::new().0, q, actor).await
    }

    /// Like [`Self::enqueue`] with a chosen id; queuing the same id twice queues it once.
    pub async fn enqueue_with_id(
        &self,
        id: Uuid,
        q: QueuedMigration,
        actor: &str,
    ) -> Result<Uuid, StoreError> {
        let new = NewMigration {
            id,
            queued: q,
            trace_id: migration_trace::trace_id_text(id),
        };
        if self
            .rows
            .insert_queued(&new, actor, self.store.clock.now())
            .await?
        {
            self.announce_queued(id).await?;
        }
        Ok(id)
    }

    /// Tells subscribers and the scheduler of a migration just queued (after its commit).
    pub async fn announce_queued(&self, id: Uuid) -> Result<(), StoreError> {
        if let Some(row) = self.rows.find(id).await? {
            self.publish(event_of(
                &row,
                MigrationPhase::Pending,
                None,
                None,
                self.store.clock.now(),
            ));
            tracing::info!(migration = %id, vm = %format!("{}/{}", row.vm_namespace, row.vm_name), source = %row.source_cluster_name, target = %row.target_cluster_name, "migration queued");
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Claims the in-flight migrations this replica may drive (its own, those never driven,
    /// and those whose replica's lease ran out) and drives each one it does not drive yet;
    /// stops driving those another replica took over. Returns how many drivers it started.
    pub async fn resume(&self) -> Result<usize, StoreError> {
        let claim = self.leases.claim(self.store.clock.now()).await?;
        for (id, from) in &claim.taken_over {
            metrics::counter!("drover_lease_takeovers_total").increment(1);
            tracing::warn!(migration = %id, from = %from, replica = %self.leases.replica(), "took over a migration whose replica stopped renewing its lease");
        }
        for id in &claim.elsewhere {
            let token = self
                .driving
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(id)
                .cloned();
            if let Some(token) = token {
                tracing::warn!(migration = %id, "another replica holds this migration's lease now; stopping its driver here");
                token.cancel();
            }
        }
        let mut resumed = 0;
        for id in &claim.held {
            if self.spawn(*id) {
                tracing::info!(migration = %id, "driving an in-flight migration");
                resumed += 1;
            }
        }
        let driving = self.driving.lock().unwrap_or_else(|e| e.into_inner()).len();
        metrics::gauge!("drover_migrations_driven").set(driving as f64);
        Ok(resumed)
    }

    /// Whether the agent carried out command `key` successfully.
    pub async fn command_succeeded(&self, cluster: &str, key: &str) -> Result<bool, StoreError> {
        Ok(self
            .commands
            .get(cluster, key)
            .await?
            .is_some_and(|c| c.state == CommandState::Succeeded))
    }

    /// Starts the migration's driver unless this process drives it already. The task is owned
    /// by `tasks` and ends when the migration does, or when the hub stops.
    fn spawn(&self, id: Uuid) -> bool {
        let token = self.stop.child_token();
        {
            let mut driving = self.driving.lock().unwrap_or_else(|e| e.into_inner());
            if self.stop.is_cancelled() || driving.contains_key(&id) {
                return false;
            }
            driving.insert(id, token.clone());
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = this.drive_until_settled(id) => {}
                () = token.cancelled() => {
                    tracing::info!(migration = %id, "driver stopped (the hub stops, or another replica drives it); its row says where it was");
                }
            }
            // Unless a newer driver of this migration took the place of a stopped one.
            let mut driving = this.driving.lock().unwrap_or_else(|e| e.into_inner());
            if driving
                .get(&id)
                .is_some_and(|t| t.is_cancelled() == token.is_cancelled())
            {
                driving.remove(&id);
            }
        });
        true
    }

    /// Drives the migration to its end, through database outages: a failed step is retried
    /// from the stored row (every step is idempotent) with growing delays, so the migration
    /// never keeps its scheduler slots without a driver. Only a row that disappeared or a
    /// stored value the hub cannot read ends the driver early.
    async fn drive_until_settled(&self, id: Uuid) {
        let cap = Duration::from_secs(10);
        let mut delays = crate::retry::driver_delays();
        // While a driver waits for the database, `drover_migration_drivers_waiting` counts it;
        // it resumes when the database answers it again (operators and the recovery benchmark
        // watch the gauge fall back to 0).
        let mut failing = WaitingForDatabase(false);
        loop {
            if failing.0 {
                if let Err(e) = self.row(id).await {
                    let wait = crate::retry::next(&mut delays, cap);
                    tracing::debug!(migration = %id, error = %e, retry_in = ?wait, "migration driver: the database is still away");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                failing.set(false);
                tracing::info!(migration = %id, "migration driver resumed: the database answers again");
            }
            match self.drive(id).await {
                Ok(()) => return,
                Err(e) if crate::store::migrations::gone_or_unreadable(&e) => {
                    tracing::error!(migration = %id, error = %e, "migration driver gave up: its row is gone or unreadable");
                    return;
                }
                Err(e) => {
                    let wait = crate::retry::next(&mut delays, cap);
                    metrics::counter!("drover_migration_driver_retries_total").increment(1);
                    tracing::warn!(migration = %id, error = %e, retry_in = ?wait, "migration driver: a step failed; retrying from the stored row");
                    failing.set(true);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn row(&self, id: Uuid) -> Result<migration::Model, StoreError> {
        self.rows.get(id).await
    }

    /// Moves `id` to `phase` if it is still in flight; false when something else ended it.
    /// Moves `id` to `phase` if it is in one of `from` (a conditional update: of two racing
    /// writers, exactly one wins); false when it was not.
    async fn advance(
        &self,
        id: Uuid,
        from: &[MigrationPhase],
        phase: MigrationPhase,
        failure: Option<String>,
    ) -> Result<bool, StoreError> {
        let row = self.row(id).await?;
        let mut stamps = row.phase_stamps();
        let now = self.store.clock.now();
        stamps.entry(phase.as_str().to_owned()).or_insert(now);
        let done = matches!(phase, MigrationPhase::Succeeded | MigrationPhase::Failed);
        // Succeeded clears the reason: a cancel that came too late (the switchover was under
        // way) explains nothing. The first reason stands (an operator's cancel explains the
        // failure that follows).
        let record_reason = failure.clone().filter(|_| row.failure_reason.is_none());
        let moved = self
            .rows
            .set_phase(id, from, phase, &stamps, record_reason, now)
            .await?;
        if moved {
            tracing::info!(migration = %id, phase = phase.as_str(), failure = failure.as_deref().unwrap_or(""), "migration phase");
            let reason = row.failure_reason.as_deref().or(failure.as_deref());
            self.publish(event_of(&row, phase, None, reason.filter(|_| done), now));
            if let Some(ended) = row.stored_phase() {
                let started = stamps
                    .get(ended.as_str())
                    .copied()
                    .unwrap_or(row.created_at);
                migration_trace::phase_ended(&row, ended, started, now);
            }
            if done {
                metrics::counter!("drover_migrations_ended_total", "result" => phase.as_str())
                    .increment(1);
                // A slot is free: the scheduler admits the next migration at once.
                self.wake.notify_one();
                let reason = match phase {
                    MigrationPhase::Failed => row.failure_reason.as_deref().or(failure.as_deref()),
                    _ => None,
                };
                migration_trace::migration_ended(&row, phase, reason, now);
            }
        }
        Ok(moved)
    }

    async fn submit(
        &self,
        cluster: &str,
        key: &str,
        command: AgentCommand,
    ) -> Result<StoredCommand, StoreError> {
        let cluster = ClusterName::new(cluster.to_owned())
            .map_err(|e| crate::store::migrations::unreadable(e.to_string()))?;
        let (stored, new) = self
            .commands
            .submit(&cluster, key, &command, "drover-hub")
            .await
            .map_err(|e| match e {
                crate::agents::commands::CommandError::Store(s) => s,
                other => crate::store::migrations::unreadable(other.to_string()),
            })?;
        if new {
            self.sessions.deliver(stored.clone());
        }
        Ok(stored)
    }

    /// What became of command `key` to `cluster`: waits up to `wait` (at most 30 s at a
    /// time; the state machine asks again with what is left) for an answer.
    async fn command_seen(
        &self,
        cluster: &str,
        key: &str,
        wait: Duration,
    ) -> Result<lifecycle::Command, StoreError> {
        let Some(current) = self.commands.get(cluster, key).await? else {
            return Ok(lifecycle::Command::NotStored);
        };
        let current = if current.state == CommandState::Pending && !wait.is_zero() {
            self.commands
                .wait(cluster, key, wait.min(Duration::from_secs(30)))
                .await?
                .unwrap_or(current)
        } else {
            current
        };
        Ok(match current.state {
            CommandState::Pending => lifecycle::Command::Unanswered,
            CommandState::Succeeded => lifecycle::Command::Succeeded,
            CommandState::Failed => {
                lifecycle::Command::Failed(current.result_message.unwrap_or_default())
            }
        })
    }

    /// Walks the migration through its phases: reads the row, asks the state machine
    /// (`lifecycle`) for the next step, carries it out and reports what it saw, until the
    /// migration is queued again or ended.
    async fn drive(&self, id: Uuid) -> Result<(), StoreError> {
        let mid = MigrationId(id);
        let mut seen = Observation::Row;
        loop {
            let row = self.row(id).await?;
            let Some(stored) = stored_of(&row) else {
                tracing::error!(migration = %id, phase = %row.phase, "the migration's phase is unknown to this hub (written by a newer one?); it is not driven here");
                return Ok(());
            };
            let send_limit = if stored.phase == MigrationPhase::Running {
                self.completion_limit(&row).await? + SEND_MARGIN
            } else {
                Duration::ZERO
            };
            let limits = Limits {
                prepare: PREPARE_TIMEOUT,
                send: send_limit,
            };
            let send_key = format!("{id}/send");
            seen = match lifecycle::next_step(&stored, &seen, limits, self.store.clock.now()) {
                Step::Stop => return Ok(()),
                Step::Cleanup => {
                    self.cleanup(&row).await?;
                    return Ok(());
                }
                Step::Advance { from, to } => {
                    self.advance(id, from, to, None).await?;
                    Observation::Row
                }
                Step::Fail { reason } => {
                    self.fail(&row, reason).await?;
                    Observation::Row
                }
                Step::Prepare { wait } => {
                    let key = format!("{id}/prepare-receiver");
                    // Idempotent: after a hub restart this finds the command already stored.
                    self.submit(
                        &row.target_cluster_name,
                        &key,
                        AgentCommand::PrepareReceiver {
                            migration_id: mid,
                            source_cluster: ClusterName::new(row.source_cluster_name.clone())
                                .map_err(|e| crate::store::migrations::unreadable(e.to_string()))?,
                            namespace: row.target_namespace.clone(),
                            name: row.vm_name.clone(),
                            trace_parent: Some(migration_trace::phase_traceparent(
                                id,
                                MigrationPhase::PreparingTarget,
                            )),
                        },
                    )
                    .await?;
                    Observation::Prepare(
                        self.command_seen(&row.target_cluster_name, &key, wait)
                            .await?,
                    )
                }
                Step::StartSend => match self.send_command(&row).await? {
                    Err(reason) => Observation::SendImpossible(reason),
                    Ok(send) => {
                        // Running first: a cancel that wins the race keeps the send from
                        // going out.
                        if self
                            .advance(
                                id,
                                &[MigrationPhase::TargetReady],
                                MigrationPhase::Running,
                                None,
                            )
                            .await?
                        {
                            self.submit(&row.source_cluster_name, &send_key, send)
                                .await?;
                        }
                        Observation::Row
                    }
                },
                Step::StoreSend => match self.send_command(&row).await? {
                    Err(reason) => Observation::SendImpossible(reason),
                    Ok(send) => {
                        self.submit(&row.source_cluster_name, &send_key, send)
                            .await?;
                        Observation::Row
                    }
                },
                Step::AwaitSend { wait } => Observation::Send(
                    self.command_seen(&row.source_cluster_name, &send_key, wait)
                        .await?,
                ),
            };
        }
    }

    /// The send for the source agent, as planned; or why it cannot go out (the migration
    /// fails with that reason).
    async fn send_command(
        &self,
        row: &migration::Model,
    ) -> Result<Result<AgentCommand, String>, StoreError> {
        let target = self.rows.cluster_named(&row.target_cluster_name).await?;
        let source = self.rows.cluster_named(&row.source_cluster_name).await?;
        let (Some(target), Some(source)) = (target, source) else {
            return Ok(Err("a cluster of this migration left the fleet".into()));
        };
        let Some(url) = target.sync_endpoint.clone().filter(|u| !u.is_empty()) else {
            return Ok(Err("the target reports no sync endpoint".into()));
        };
        let Ok(target_cluster) = ClusterName::new(row.target_cluster_name.clone()) else {
            return Ok(Err(format!(
                "the stored target cluster name {:?} is not valid",
                row.target_cluster_name
            )));
        };
        // As planned (policy or the source's defaults then).
        let options = match row.planned_options() {
            Some(options) => options,
            None => {
                let config: MigrationConfig = source.migration_config.unwrap_or_default();
                MigrationOptions {
                    bandwidth_bytes_per_sec: config.bandwidth_per_migration,
                    allow_auto_converge: config.allow_auto_converge,
                    allow_post_copy: config.allow_post_copy,
                    completion_timeout_per_gib: config.completion_timeout_per_gib,
                    progress_timeout_secs: config.progress_timeout,
                }
            }
        };
        Ok(Ok(AgentCommand::SendVm {
            migration_id: MigrationId(row.id),
            namespace: row.vm_namespace.clone(),
            name: row.vm_name.clone(),
            target_cluster,
            target_namespace: row.target_namespace.clone(),
            connect_url: url,
            options,
            trace_parent: Some(migration_trace::phase_traceparent(
                row.id,
                MigrationPhase::Running,
            )),
        }))
    }

    /// completionTimeoutPerGiB x (memory + disks) of the VM.
    async fn completion_limit(&self, row: &migration::Model) -> Result<Duration, StoreError> {
        // The limit the source's agent was given: the planned options (a policy's, or the
        // source's defaults when planned), else the source's configuration now.
        let per_gib = match row.planned_options() {
            Some(options) => options.completion_timeout_per_gib,
            None => self
                .rows
                .cluster_named(&row.source_cluster_name)
                .await?
                .and_then(|c| c.migration_config)
                .map_or(150, |c| c.completion_timeout_per_gib),
        };
        let bytes = self.rows.vm_bytes(&row.vm_uid).await?;
        Ok(drover_shared::migration::completion_timeout(per_gib, bytes))
    }

    /// Records the failure and makes sure the target side is removed (the source keeps
    /// running: before switchover it is authoritative).
    async fn fail(&self, row: &migration::Model, reason: String) -> Result<(), StoreError> {
        if self
            .advance(
                row.id,
                &MigrationPhase::NOT_ENDED,
                MigrationPhase::Failed,
                Some(reason),
            )
            .await?
        {
            self.cleanup(row).await?;
        }
        Ok(())
    }

    async fn cleanup(&self, row: &migration::Model) -> Result<(), StoreError> {
        let mid = MigrationId(row.id);
        for cluster in [&row.source_cluster_name, &row.target_cluster_name] {
            self.submit(
                cluster,
                &format!("{}/cancel/{cluster}", row.id),
                AgentCommand::CancelMigration {
                    migration_id: mid,
                    trace_parent: Some(migration_trace::root_traceparent(row.id)),
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Cancels a migration before switchover: both sides are told, the target side is removed,
    /// the source keeps running.
    pub async fn cancel(&self, id: Uuid, actor: &str) -> Result<(), MigrateError> {
        let row = self
            .rows
            .find(id)
            .await?
            .ok_or_else(|| MigrateError::NotFound(format!("migration {id} does not exist")))?;
        let stored = stored_of(&row).ok_or_else(|| {
            MigrateError::Conflict(format!(
                "migration {id} has phase {:?}, which this hub does not know",
                row.phase
            ))
        })?;
        let reason = format!("cancelled by {actor}");
        match lifecycle::decide_cancel(&stored) {
            CancelDecision::Refused(why) => {
                return Err(MigrateError::Conflict(format!("migration {id}: {why}")));
            }
            // Before the send: the hub ends it here, and the send never goes out (unless the
            // driver recorded Running meanwhile: then as below).
            CancelDecision::EndHere => {
                if self
                    .advance(
                        id,
                        &BEFORE_SEND,
                        MigrationPhase::Failed,
                        Some(reason.clone()),
                    )
                    .await?
                {
                    self.cleanup(&row).await?;
                    return Ok(());
                }
            }
            CancelDecision::StopTheSend => {}
        }
        // Sending: the source stops the transfer (unless the switchover already began, which
        // cannot be undone), and the send's outcome ends the migration; the reason is recorded
        // now so that the failure that follows says why.
        let recorded = self.rows.record_cancel(id, reason).await?;
        if !recorded {
            // It moved on meanwhile (switchover began, or it ended): decide again on the row as
            // it is now. Still running with a cancel recorded: an earlier cancel, told again.
            let now = self.row(id).await?;
            if let Some(CancelDecision::Refused(why)) =
                stored_of(&now).map(|s| lifecycle::decide_cancel(&s))
            {
                return Err(MigrateError::Conflict(format!("migration {id}: {why}")));
            }
        }
        self.cleanup(&row).await?;
        Ok(())
    }
}

/// The migration as the state machine sees it; None for a phase this hub does not know.
pub fn stored_of(row: &migration::Model) -> Option<Stored> {
    let phase = row.stored_phase()?;
    let phase_began = row
        .phase_stamps()
        .get(phase.as_str())
        .copied()
        .unwrap_or(row.updated_at);
    Some(Stored {
        phase,
        phase_began,
        cancel_reason: row
            .failure_reason
            .clone()
            .filter(|_| phase != MigrationPhase::Failed),
        switching_over: row.switchover_at.is_some(),
    })
}

/// Records a status report from an agent: progress (from the source) while the migration runs.
pub async fn record_status(
    store: &Store,
    events: &broadcast::Sender<MigrationChange>,
    replicas: &crate::replicas::ReplicaBus,
    from: &ClusterName,
    status: &MigrationStatus,
) -> Result<(), StoreError> {
    let rows = MigrationRows::new(store.clone());
    if status.switchover {
        // From now on no cancel is taken (the source's agent would refuse it too).
        rows.record_switchover(status.migration_id.0, from.as_str(), store.clock.now())
            .await?;
    }
    {
        let Some(p) = status.progress else {
            return Ok(());
        };
        rows.record_progress(status.migration_id.0, from.as_str(), &p, store.clock.now())
            .await?;
        // Subscribers here, or on other replicas, see it.
        if events.receiver_count() > 0 || replicas.is_shared() {
            if let Some(row) = rows
                .find(status.migration_id.0)
                .await?
                .filter(|r| r.phase == MigrationPhase::Running.as_str())
            {
                let event = event_of(
                    &row,
                    MigrationPhase::Running,
                    Some(&p),
                    None,
                    store.clock.now(),
                );
                replicas.tell(crate::replicas::Notice::Migration {
                    event: event.clone(),
                });
                let _ = events.send(event);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row_in(phase: MigrationPhase, began: chrono::DateTime<Utc>) -> migration::Model {
        migration::Model {
            id: Uuid::nil(),
            vm_namespace: "web".into(),
            vm_name: "api".into(),
            vm_uid: "uid".into(),
            source_cluster_id: None,
            target_cluster_id: None,
            source_cluster_name: "east-1".into(),
            target_cluster_name: "west-1".into(),
            target_namespace: "web".into(),
            storage_class_map: json!({}),
            network_map: json!({}),
            phase: phase.as_str().into(),
            phase_timestamps: json!({ phase.as_str(): began }),
            bytes_total: 0,
            bytes_transferred: 0,
            bytes_remaining: 0,
            dirty_rate_bytes_per_sec: 0,
            throughput_bytes_per_sec: 0,
            failure_reason: None,
            attempt: 1,
            evacuation_id: None,
            trace_id: None,
            requested_by: "test".into(),
            created_at: began,
            updated_at: began,
            finished_at: None,
            queue_position: 0,
            source_node: "n1".into(),
            planned_bytes: 0,
            bandwidth_bytes_per_sec: 0,
            options: None,
            switchover_at: None,
        }
    }

    #[test]
    fn a_restarted_driver_keeps_the_phase_deadline() {
        let limit = Duration::from_secs(300);
        let now = Utc::now();
        let left =
            |row: &migration::Model| lifecycle::left_in_phase(&stored_of(row).unwrap(), limit, now);
        assert_eq!(left(&row_in(MigrationPhase::PreparingTarget, now)), limit);
        // Began four minutes ago (the driver was away for a database outage): one is left.
        let old = row_in(
            MigrationPhase::PreparingTarget,
            now - chrono::Duration::seconds(240),
        );
        assert_eq!(left(&old), Duration::from_secs(60));
        // Long past: nothing left, the driver ends the phase at once.
        let expired = row_in(
            MigrationPhase::Running,
            now - chrono::Duration::seconds(3600),
        );
        assert_eq!(left(&expired), Duration::ZERO);
    }

    #[test]
    fn a_stored_row_reads_as_the_state_machine_needs_it() {
        let now = Utc::now();
        let mut row = row_in(MigrationPhase::Running, now);
        row.failure_reason = Some("cancelled by alice".into());
        row.switchover_at = Some(now);
        let stored = stored_of(&row).unwrap();
        assert_eq!(stored.cancel_reason.as_deref(), Some("cancelled by alice"));
        assert!(stored.switching_over);
        // A failed migration's reason is its failure, not a pending cancel.
        let failed = stored_of(&row_in(MigrationPhase::Failed, now)).unwrap();
        assert_eq!(failed.cancel_reason, None);
        row.phase = "Teleporting".into();
        assert!(stored_of(&row).is_none(), "an unknown phase is not guessed");
    }
}
