//! The agent's side of hub commands: a journal in the data dir that makes every idempotency key
//! run at most once, across restarts, and an executor that runs commands (one at a time per VM,
//! in the order they arrived) and hands their acknowledgements to whichever session is open.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_shared::commands::{AgentCommand, CommandOutcome};
use drover_shared::protocol::AgentMessage;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Runs commands for real: a runtime implements this.
pub trait CommandHandler: Send + Sync + 'static {
    fn execute(
        &self,
        command: AgentCommand,
    ) -> Pin<Box<dyn std::future::Future<Output = CommandOutcome> + Send + '_>>;
}

/// The journal file in the agent's data dir.
pub const JOURNAL_FILE: &str = "command-journal.jsonl";
/// Keys remembered; older ones are dropped when the journal is compacted at start.
const JOURNAL_KEEP: usize = 50_000;
/// A per-VM queue worker exits after this long without work.
const WORKER_IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
enum Entry {
    Started {
        key: String,
    },
    Finished {
        key: String,
        outcome: CommandOutcome,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot use the command journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Append-only record of which keys started and how they finished; every append is synced to
/// disk before the command runs (start) or is acknowledged (finish). The file is opened per
/// append: commands are rare, and an idle agent holds no descriptor for it.
struct Journal {
    path: PathBuf,
    finished: HashMap<String, CommandOutcome>,
    /// Finished keys in the order they finished, for compaction.
    order: Vec<String>,
}

/// What a key interrupted by a restart answers: it may have half run, so it is not run again.
fn interrupted() -> CommandOutcome {
    CommandOutcome::Failed {
        reason: "the agent stopped while running this command; it was not run again (each command runs at most once). Check the VM's state in the inventory and send a new command if needed".into(),
    }
}

impl Journal {
    fn open(data_dir: &Path) -> Result<Self, JournalError> {
        let path = data_dir.join(JOURNAL_FILE);
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        let mut finished = HashMap::new();
        let mut order = Vec::new();
        let mut started = HashSet::new();
        match File::open(&path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(io)?;
                    // A torn last line (crash mid-append) is the only garbage there can be.
                    let Ok(entry) = serde_json::from_str::<Entry>(&line) else {
                        tracing::warn!(path = %path.display(), "skipping an unreadable journal line (torn write)");
                        continue;
                    };
                    match entry {
                        Entry::Started { key } => {
                            started.insert(key);
                        }
                        Entry::Finished { key, outcome } => {
                            started.remove(&key);
                            if finished.insert(key.clone(), outcome).is_none() {
                                order.push(key);
                            }
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        for key in started {
            tracing::warn!(%key, "a command was interrupted by an agent restart; it will not run again");
            finished.insert(key.clone(), interrupted());
            order.push(key);
        }
        // Rewrite compactly (finished entries only, newest JOURNAL_KEEP) and atomically.
        if order.len() > JOURNAL_KEEP {
            for key in order.drain(..order.len() - JOURNAL_KEEP) {
                finished.remove(&key);
            }
        }
        let tmp = path.with_extension("jsonl.tmp");
        {
            let mut out = std::io::BufWriter::new(File::create(&tmp).map_err(io)?);
            for key in &order {
                let entry = Entry::Finished {
                    key: key.clone(),
                    outcome: finished[key].clone(),
                };
                serde_json::to_writer(&mut out, &entry).map_err(|e| io(e.into()))?;
                out.write_all(b"\n").map_err(io)?;
            }
            let file = out.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(Self {
            path,
            finished,
            order,
        })
    }

    fn append(&mut self, entry: &Entry) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(entry).map_err(|e| io(e.into()))?;
        line.push(b'\n');
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(io)?;
        file.write_all(&line).map_err(io)?;
        file.sync_data().map_err(io)
    }
}

/// An acknowledgement to send to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub key: String,
    pub outcome: CommandOutcome,
}

type Job = (String, AgentCommand);

/// The executor and the stream of messages for the hub it produces: acknowledgements, and
/// whatever running commands report (migration status).
pub struct Commands {
    pub executor: Arc<CommandExecutor>,
    pub acks: mpsc::UnboundedReceiver<AgentMessage>,
}

impl Ack {
    pub fn message(self) -> AgentMessage {
        AgentMessage::CommandAck {
            key: self.key,
            outcome: self.outcome,
        }
    }
}

/// Runs the hub's commands at most once per key.
pub struct CommandExecutor {
    journal: Mutex<Journal>,
    handler: Arc<dyn CommandHandler>,
    running: Mutex<HashSet<String>>,
    /// One FIFO queue per VM (or other target), each drained by its own worker.
    queues: Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>,
    acks: mpsc::UnboundedSender<AgentMessage>,
}

impl CommandExecutor {
    /// Opens the journal in `data_dir`. Acknowledgements of commands as they finish arrive on
    /// `Commands::acks` (the session loop sends them to the hub).
    pub fn open(
        data_dir: &Path,
        handler: Arc<dyn CommandHandler>,
    ) -> Result<Commands, JournalError> {
        Self::open_with_outbox(data_dir, handler, mpsc::unbounded_channel())
    }

    /// Like `open`, with the outbox made beforehand (the handler may need its sender).
    pub fn open_with_outbox(
        data_dir: &Path,
        handler: Arc<dyn CommandHandler>,
        (acks, rx): (
            mpsc::UnboundedSender<AgentMessage>,
            mpsc::UnboundedReceiver<AgentMessage>,
        ),
    ) -> Result<Commands, JournalError> {
        let journal = Journal::open(data_dir)?;
        Ok(Commands {
            executor: Arc::new(Self {
                journal: Mutex::new(journal),
                handler,
                running: Mutex::default(),
                queues: Mutex::default(),
                acks,
            }),
            acks: rx,
        })
    }

    /// Takes a command from the hub. A key that already finished is answered at once with the
    /// recorded outcome; a key that is running is ignored (its acknowledgement comes when it
    /// ends); a new key is journaled as started and queued behind earlier commands for the
    /// same VM.
    pub fn receive(self: &Arc<Self>, key: String, command: AgentCommand) -> Option<Ack> {
        {
            let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(outcome) = journal.finished.get(&key) {
                return Some(Ack {
                    key,
                    outcome: outcome.clone(),
                });
            }
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains(&key) {
                return None;
            }
            if let Err(e) = journal.append(&Entry::Started { key: key.clone() }) {
                // Without a durable "started" the at-most-once promise cannot be kept; refuse.
                tracing::error!(error = %e, %key, "cannot journal a command; refusing it");
                return Some(Ack {
                    key,
                    outcome: CommandOutcome::Failed {
                        reason: format!("the agent cannot record the command durably: {e}"),
                    },
                });
            }
            running.insert(key.clone());
        }
        tracing::info!(%key, kind = command.kind(), "command received");
        self.enqueue(target_of(&command), (key, command));
        None
    }

    fn enqueue(self: &Arc<Self>, target: String, job: Job) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let job = match queues.get(&target) {
            Some(queue) => match queue.send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(job);
        queues.insert(target.clone(), tx);
        // The worker owns its queue and ends itself when idle (see `work`).
        tokio::spawn(self.clone().work(target, rx));
    }

    async fn work(self: Arc<Self>, target: String, mut rx: mpsc::UnboundedReceiver<Job>) {
        loop {
            let job = match tokio::time::timeout(WORKER_IDLE, rx.recv()).await {
                Ok(Some(job)) => job,
                Ok(None) => return,
                Err(_) => {
                    // Idle: leave, unless a job slipped in (senders hold the queues lock).
                    let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                    match rx.try_recv() {
                        Ok(job) => job,
                        Err(_) => {
                            queues.remove(&target);
                            return;
                        }
                    }
                }
            };
            self.run(job).await;
        }
    }

    async fn run(&self, (key, command): Job) {
        let kind = command.kind();
        let outcome = self.handler.execute(command).await;
        tracing::info!(%key, kind, succeeded = outcome.succeeded(), message = %outcome.message(), "command finished");
        {
            let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
            let entry = Entry::Finished {
                key: key.clone(),
                outcome: outcome.clone(),
            };
            if let Err(e) = journal.append(&entry) {
                // The outcome is still answered; a restart would report it as interrupted.
                tracing::error!(error = %e, %key, "cannot journal a command's outcome");
            }
            if journal
                .finished
                .insert(key.clone(), outcome.clone())
                .is_none()
            {
                journal.order.push(key.clone());
            }
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
        let _ = self.acks.send(Ack { key, outcome }.message());
    }

    /// Where running commands put messages for the hub (sent on whichever session is open;
    /// dropped when there is none — progress is best effort, outcomes are journaled).
    pub fn outbox(&self) -> mpsc::UnboundedSender<AgentMessage> {
        self.acks.clone()
    }

    /// Keys currently running.
    pub fn running(&self) -> usize {
        self.running.lock().map(|r| r.len()).unwrap_or(0)
    }
}

/// Commands about the same VM run one after another, in order.
fn target_of(command: &AgentCommand) -> String {
    match command {
        AgentCommand::CreateVm { spec } => format!("vm/{}/{}", spec.namespace, spec.name),
        AgentCommand::StartVm { namespace, name }
        | AgentCommand::StopVm {
            namespace, name, ..
        }
        | AgentCommand::DeleteVm { namespace, name }
        | AgentCommand::PrepareReceiver {
            namespace, name, ..
        }
        | AgentCommand::SendVm {
            namespace, name, ..
        } => format!("vm/{namespace}/{name}"),
        // A cancel must not wait behind the send it cancels.
        AgentCommand::CancelMigration { migration_id, .. } => format!("cancel/{migration_id}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Counting {
        runs: AtomicUsize,
        delay: Duration,
    }

    impl CommandHandler for Counting {
        fn execute(
            &self,
            command: AgentCommand,
        ) -> Pin<Box<dyn std::future::Future<Output = CommandOutcome> + Send + '_>> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
                CommandOutcome::Succeeded {
                    message: format!("{} run #{n}", command.kind()),
                }
            })
        }
    }

    fn start(name: &str) -> AgentCommand {
        AgentCommand::StartVm {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<AgentMessage>) -> Ack {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an acknowledgement within 10 s")
            .expect("executor alive");
        match msg {
            AgentMessage::CommandAck { key, outcome } => Ack { key, outcome },
            other => panic!("not an acknowledgement: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_key_runs_once_and_repeats_get_the_recorded_outcome_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let handler = Arc::new(Counting {
            runs: AtomicUsize::new(0),
            delay: Duration::from_millis(50),
        });
        let Commands {
            executor: exec,
            mut acks,
        } = CommandExecutor::open(dir.path(), handler.clone()).unwrap();
        assert_eq!(exec.receive("k1".into(), start("a")), None);
        // A re-send while it runs is not run again and not answered twice.
        assert_eq!(exec.receive("k1".into(), start("a")), None);
        let first = next(&mut acks).await;
        assert_eq!(first.key, "k1");
        assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
        assert_eq!(exec.receive("k1".into(), start("a")), Some(first.clone()));
        drop(exec);

        // A restarted agent remembers.
        let Commands { executor: exec, .. } =
            CommandExecutor::open(dir.path(), handler.clone()).unwrap();
        assert_eq!(exec.receive("k1".into(), start("a")), Some(first));
        assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_command_interrupted_by_a_restart_is_not_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let handler = Arc::new(Counting {
            runs: AtomicUsize::new(0),
            delay: Duration::from_secs(3600),
        });
        let Commands { executor: exec, .. } =
            CommandExecutor::open(dir.path(), handler.clone()).unwrap();
        assert_eq!(exec.receive("k1".into(), start("a")), None);
        drop(exec); // the "crash": started is journaled, finished never will be

        let Commands { executor: exec, .. } =
            CommandExecutor::open(dir.path(), handler.clone()).unwrap();
        let ack = exec
            .receive("k1".into(), start("a"))
            .expect("answered at once");
        assert!(!ack.outcome.succeeded());
        assert!(ack.outcome.message().contains("at most once"), "{ack:?}");
        assert_eq!(handler.runs.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn commands_for_one_vm_run_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let handler = Arc::new(Counting {
            runs: AtomicUsize::new(0),
            delay: Duration::from_millis(20),
        });
        let Commands {
            executor: exec,
            mut acks,
        } = CommandExecutor::open(dir.path(), handler).unwrap();
        for i in 0..5 {
            assert_eq!(exec.receive(format!("k{i}"), start("a")), None);
        }
        for i in 0..5 {
            let ack = next(&mut acks).await;
            assert_eq!(ack.key, format!("k{i}"));
            assert_eq!(ack.outcome.message(), format!("startVm run #{}", i + 1));
        }
    }

    #[tokio::test]
    async fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let handler = Arc::new(Counting {
            runs: AtomicUsize::new(0),
            delay: Duration::ZERO,
        });
        let Commands {
            executor: exec,
            mut acks,
        } = CommandExecutor::open(dir.path(), handler.clone()).unwrap();
        exec.receive("k1".into(), start("a"));
        next(&mut acks).await;
        drop(exec);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        f.write_all(b"{\"state\":\"fini").unwrap();
        let Commands { executor: exec, .. } =
            CommandExecutor::open(dir.path(), handler.clone()).unwrap();
        assert!(exec.receive("k1".into(), start("a")).is_some());
        assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
    }
}
