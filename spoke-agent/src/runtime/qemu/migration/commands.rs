//! The QMP commands of a live migration, one short connection each (as in `qmp`). Typed
//! `qapi-qmp` commands where their types fit QEMU 7.2; two queries use lenient answer types of
//! our own: qapi-qmp 0.15 follows a newer schema whose `query-block-jobs` answer requires
//! `actively-synced` (absent before QEMU 8.2) and whose `MigrationStats` requires counters older
//! QEMUs lack, so the typed answers would not parse. Ours read only what the migration needs and
//! ignore the rest.
//!
//! The exchange itself is ours too (`execute`), not the `qapi` crate's stream: a migration makes
//! QEMU emit bursts of events (job and migration state changes), and QEMU 7.2 can hand events it
//! queued for the previous client to the next one *before* its greeting, which the crate's
//! greeting parser rejects. We skip anything before the greeting, skip events, and match the
//! answer to our request by id.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use qapi::qmp;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;

use super::super::qmp::{QmpError, QMP_TIMEOUT};

/// Ids of our requests, unique within the agent so that no stale answer is taken for ours.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Connect, greeting, capability negotiation and `command`, within `QMP_TIMEOUT`.
pub(crate) async fn execute<C: qapi::Command>(
    socket: &Path,
    command: C,
) -> Result<C::Ok, QmpError> {
    exchange(socket, None, command).await
}

/// Like `execute`, but first hands QEMU `fd` under the name `fd_name` (`getfd`, the descriptor
/// going along as SCM_RIGHTS) in the same connection, for `command` to use. Our copy of the
/// descriptor is ours to close; if `command` fails, QEMU's is closed (`closefd`).
pub(crate) async fn execute_with_fd<C: qapi::Command>(
    socket: &Path,
    fd_name: &str,
    fd: BorrowedFd<'_>,
    command: C,
) -> Result<C::Ok, QmpError> {
    exchange(socket, Some((fd_name, fd)), command).await
}

async fn exchange<C: qapi::Command>(
    socket: &Path,
    fd: Option<(&str, BorrowedFd<'_>)>,
    command: C,
) -> Result<C::Ok, QmpError> {
    let name = C::NAME;
    let socket_name = || socket.display().to_string();
    let exchange = async {
        let stream = UnixStream::connect(socket).await?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        loop {
            let line = next_line(&mut lines).await?;
            let message: serde_json::Value = serde_json::from_str(&line).map_err(invalid)?;
            if message.get("QMP").is_some() {
                break;
            }
        }
        let negotiated = request(
            &mut write,
            &mut lines,
            "qmp_capabilities",
            serde_json::json!({}),
            None,
        )
        .await?;
        if let Err(message) = negotiated {
            return Ok(Err(message));
        }
        if let Some((fd_name, fd)) = fd {
            let passed = request(
                &mut write,
                &mut lines,
                "getfd",
                serde_json::json!({ "fdname": fd_name }),
                Some(fd),
            )
            .await?;
            if let Err(message) = passed {
                return Ok(Err(format!("handing it a socket (getfd): {message}")));
            }
        }
        let arguments = serde_json::to_value(&command).map_err(invalid)?;
        let answer = request(&mut write, &mut lines, name, arguments, None).await?;
        if let (Err(_), Some((fd_name, _))) = (&answer, fd) {
            let _ = request(
                &mut write,
                &mut lines,
                "closefd",
                serde_json::json!({ "fdname": fd_name }),
                None,
            )
            .await;
        }
        Ok(answer)
    };
    match tokio::time::timeout(QMP_TIMEOUT, exchange).await {
        Err(_) => Err(QmpError::Timeout {
            socket: socket_name(),
            command: name,
        }),
        Ok(Err(source)) => Err(QmpError::Io {
            socket: socket_name(),
            command: name,
            source,
        }),
        Ok(Ok(Err(message))) => Err(QmpError::Refused {
            socket: socket_name(),
            command: name,
            message,
        }),
        Ok(Ok(Ok(answer))) => serde_json::from_value(answer).map_err(|e| QmpError::Io {
            socket: socket_name(),
            command: name,
            source: invalid(e),
        }),
    }
}

/// Writes `line` in one `sendmsg` that carries `fd` along (QEMU takes a descriptor with the
/// bytes it arrives with, so the line must not be split).
async fn send_with_fd(stream: &UnixStream, line: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd.as_raw_fd()];
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg::<()>(
                stream.as_raw_fd(),
                &[io::IoSlice::new(line)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match sent {
            Ok(n) if n == line.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("QMP took {n} of {} bytes of getfd", line.len()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

type Lines = tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>;

fn invalid(e: serde_json::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

async fn next_line(lines: &mut Lines) -> io::Result<String> {
    lines.next_line().await?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "QEMU closed the QMP connection",
        )
    })
}

/// Sends one request (with `fd` as SCM_RIGHTS when given) and waits for its answer:
/// `Ok(Err(desc))` when QEMU refused it.
async fn request(
    write: &mut OwnedWriteHalf,
    lines: &mut Lines,
    name: &str,
    arguments: serde_json::Value,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<Result<serde_json::Value, String>> {
    let id = format!("drover-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let mut line = serde_json::to_vec(&serde_json::json!({
        "execute": name,
        "arguments": arguments,
        "id": id,
    }))
    .map_err(invalid)?;
    line.push(b'\n');
    match fd {
        None => write.write_all(&line).await?,
        Some(fd) => send_with_fd(write.as_ref(), &line, fd).await?,
    }
    loop {
        let line = next_line(lines).await?;
        let mut message: serde_json::Value = serde_json::from_str(&line).map_err(invalid)?;
        if message.get("id").and_then(|i| i.as_str()) != Some(id.as_str()) {
            continue; // an event, or something stale
        }
        if let Some(answer) = message.get_mut("return") {
            return Ok(Ok(answer.take()));
        }
        let desc = message
            .pointer("/error/desc")
            .and_then(|d| d.as_str())
            .unwrap_or("QEMU gave no reason");
        return Ok(Err(desc.to_owned()));
    }
}

pub(crate) async fn query_status(socket: &Path) -> Result<qmp::StatusInfo, QmpError> {
    execute(socket, qmp::query_status {}).await
}

/// `query-migrate`, read leniently.
#[derive(Debug, Clone, Serialize)]
pub struct QueryMigrate {}

impl qmp::QmpCommand for QueryMigrate {}
impl qapi::Command for QueryMigrate {
    type Ok = MigrationInfo;
    const NAME: &'static str = "query-migrate";
    const ALLOW_OOB: bool = false;
}

/// What `query-migrate` says, as far as a migration needs it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    #[serde(default)]
    pub status: Option<qmp::MigrationStatus>,
    #[serde(default)]
    pub ram: Option<RamStats>,
    /// Milliseconds the guest was stopped (known once completed).
    #[serde(default)]
    pub downtime: Option<u64>,
    #[serde(default)]
    pub error_desc: Option<String>,
    #[serde(default)]
    pub cpu_throttle_percentage: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct RamStats {
    pub total: u64,
    pub transferred: u64,
    pub remaining: u64,
    /// Pages dirtied per second, measured over the last dirty-bitmap sync period.
    pub dirty_pages_rate: u64,
    pub page_size: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    /// How many times the dirty bitmap was synced: 1 during the first pass over RAM.
    pub dirty_sync_count: u64,
}

/// `query-block-jobs`, read leniently.
#[derive(Debug, Clone, Serialize)]
pub struct QueryBlockJobs {}

impl qmp::QmpCommand for QueryBlockJobs {}
impl qapi::Command for QueryBlockJobs {
    type Ok = Vec<BlockJob>;
    const NAME: &'static str = "query-block-jobs";
    const ALLOW_OOB: bool = false;
}

#[derive(Debug, Clone, Deserialize)]
pub struct BlockJob {
    /// The job id.
    pub device: String,
    #[serde(default)]
    pub len: u64,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub ready: bool,
    pub status: qmp::JobStatus,
    #[serde(default)]
    pub error: Option<String>,
}

pub(crate) async fn query_migrate(socket: &Path) -> Result<MigrationInfo, QmpError> {
    execute(socket, QueryMigrate {}).await
}

pub(crate) async fn query_block_jobs(socket: &Path) -> Result<Vec<BlockJob>, QmpError> {
    execute(socket, QueryBlockJobs {}).await
}

fn unix(path: &Path) -> qmp::UnixSocketAddress {
    qmp::UnixSocketAddress {
        path: path.to_string_lossy().into_owned(),
        abstract_: None,
        tight: None,
    }
}

/// An NBD client node `node` for `export` on `server`, without reconnect (a broken link fails
/// the mirror at once instead of hanging guest writes); with `tls` (credentials id, host name)
/// QEMU's own TLS is used on the link.
pub fn nbd_client_options(
    node: &str,
    server: qmp::SocketAddress,
    export: &str,
    tls: Option<(&str, &str)>,
) -> qmp::BlockdevOptions {
    qmp::BlockdevOptions::nbd {
        base: qmp::BlockdevOptionsBase {
            node_name: Some(node.to_owned()),
            auto_read_only: None,
            cache: None,
            detect_zeroes: None,
            discard: None,
            force_share: None,
            read_only: None,
        },
        nbd: qmp::BlockdevOptionsNbd {
            server,
            export: Some(export.to_owned()),
            open_timeout: None,
            reconnect_delay: None,
            tls_creds: tls.map(|(creds, _)| creds.to_owned()),
            tls_hostname: tls.map(|(_, host)| host.to_owned()),
            x_dirty_bitmap: None,
        },
    }
}

/// `node` exported writable over NBD under its node name; `id` names the export in QMP.
pub fn nbd_export_options(id: &str, node: &str) -> qmp::BlockExportOptions {
    qmp::BlockExportOptions::nbd {
        base: qmp::BlockExportOptionsBase {
            id: id.to_owned(),
            node_name: node.to_owned(),
            writable: Some(true),
            fixed_iothread: None,
            iothread: None,
            writethrough: None,
        },
        nbd: qmp::BlockExportOptionsNbd {
            base: qmp::BlockExportOptionsNbdBase {
                name: Some(node.to_owned()),
                description: None,
            },
            allocation_depth: None,
            bitmaps: None,
        },
    }
}

/// Adds an NBD client node that reaches `export` over `link`, a connected socket QEMU is
/// handed (see `execute_with_fd`). No reconnect: a broken link fails the mirror at once instead
/// of hanging guest writes.
pub(crate) async fn blockdev_add_nbd(
    socket: &Path,
    node: &str,
    link: BorrowedFd<'_>,
    export: &str,
) -> Result<(), QmpError> {
    let fd_name = format!("{node}-link");
    let server = qmp::SocketAddress::fd(qmp::FdSocketAddress {
        str: fd_name.clone(),
    });
    let options = nbd_client_options(node, server, export, None);
    execute_with_fd(socket, &fd_name, link, qmp::blockdev_add(options))
        .await
        .map(drop)
}

pub(crate) async fn blockdev_del(socket: &Path, node: &str) -> Result<(), QmpError> {
    execute(
        socket,
        qmp::blockdev_del {
            node_name: node.to_owned(),
        },
    )
    .await
    .map(drop)
}

/// QEMU's own buffer for a mirror (`buf-size` left out): 16 MiB.
const DEFAULT_MIRROR_BUFFER: u64 = 16 << 20;
/// The smallest buffer a rate-limited mirror gets (QEMU rounds it up to the granularity).
const MIN_MIRROR_BUFFER: u64 = 256 << 10;

/// A mirror's `buf-size` at `speed` bytes/s: about one second of data in flight. QEMU copies a
/// whole buffer, then sleeps until the rate limit allows the next: with its default 16 MiB at
/// 1 MiB/s the job's offset would stand still for 16 s, which looks like a stalled link to the
/// progress check. Unlimited or fast mirrors keep QEMU's default.
fn mirror_buffer(speed: u64) -> Option<i64> {
    (speed > 0 && speed < DEFAULT_MIRROR_BUFFER)
        .then(|| speed.max(MIN_MIRROR_BUFFER).next_power_of_two() as i64)
}

/// A full mirror of `device` onto `target` in write-blocking mode (see the module `migration`),
/// at most `speed` bytes/s (0: unlimited), with about a second of data in flight when it is
/// limited. The job stays after it ends (`auto-dismiss` off) so that its error can be read.
pub fn mirror_options(
    job_id: &str,
    device: &str,
    target: &str,
    speed: u64,
) -> qmp::blockdev_mirror {
    qmp::blockdev_mirror {
        job_id: Some(job_id.to_owned()),
        device: device.to_owned(),
        target: target.to_owned(),
        sync: qmp::MirrorSyncMode::full,
        copy_mode: Some(qmp::MirrorCopyMode::write_blocking),
        speed: (speed > 0).then(|| i64::try_from(speed).unwrap_or(i64::MAX)),
        auto_dismiss: Some(false),
        auto_finalize: None,
        buf_size: mirror_buffer(speed),
        filter_node_name: None,
        granularity: None,
        on_source_error: None,
        on_target_error: None,
        replaces: None,
    }
}

pub(crate) async fn blockdev_mirror(
    socket: &Path,
    job_id: &str,
    device: &str,
    target: &str,
    speed: u64,
) -> Result<(), QmpError> {
    execute(socket, mirror_options(job_id, device, target, speed))
        .await
        .map(drop)
}

/// `force` false on a ready mirror completes it: the target gets a consistent copy as of now.
pub(crate) async fn block_job_cancel(
    socket: &Path,
    job: &str,
    force: bool,
) -> Result<(), QmpError> {
    execute(
        socket,
        qmp::block_job_cancel {
            device: job.to_owned(),
            force: Some(force),
        },
    )
    .await
    .map(drop)
}

pub(crate) async fn job_dismiss(socket: &Path, job: &str) -> Result<(), QmpError> {
    execute(socket, qmp::job_dismiss { id: job.to_owned() })
        .await
        .map(drop)
}

/// Sets every capability a migration uses, so that none is left over from an earlier attempt.
pub(crate) async fn migrate_set_capabilities(
    socket: &Path,
    capabilities: &[(qmp::MigrationCapability, bool)],
) -> Result<(), QmpError> {
    let capabilities = capabilities
        .iter()
        .map(|&(capability, state)| qmp::MigrationCapabilityStatus { capability, state })
        .collect();
    execute(socket, qmp::migrate_set_capabilities { capabilities })
        .await
        .map(drop)
}

pub(crate) async fn migrate_set_parameters(
    socket: &Path,
    max_bandwidth: u64,
    downtime_limit_ms: u64,
) -> Result<(), QmpError> {
    let parameters = qmp::MigrateSetParameters {
        max_bandwidth: Some(max_bandwidth),
        max_postcopy_bandwidth: Some(max_bandwidth),
        downtime_limit: Some(downtime_limit_ms),
        ..Default::default()
    };
    execute(socket, qmp::migrate_set_parameters(parameters))
        .await
        .map(drop)
}

/// Starts the outgoing migration over `link`, a connected socket QEMU is handed.
pub(crate) async fn migrate(socket: &Path, link: BorrowedFd<'_>) -> Result<(), QmpError> {
    const FD_NAME: &str = "drover-migration-link";
    execute_with_fd(
        socket,
        FD_NAME,
        link,
        qmp::migrate {
            uri: Some(format!("fd:{FD_NAME}")),
            channels: None,
            detach: None,
            resume: None,
        },
    )
    .await
    .map(drop)
}

pub(crate) async fn migrate_continue_after_pre_switchover(socket: &Path) -> Result<(), QmpError> {
    execute(
        socket,
        qmp::migrate_continue {
            state: qmp::MigrationStatus::pre_switchover,
        },
    )
    .await
    .map(drop)
}

pub(crate) async fn migrate_start_postcopy(socket: &Path) -> Result<(), QmpError> {
    execute(socket, qmp::migrate_start_postcopy {})
        .await
        .map(drop)
}

pub(crate) async fn migrate_cancel(socket: &Path) -> Result<(), QmpError> {
    execute(socket, qmp::migrate_cancel {}).await.map(drop)
}

/// Listens for the incoming migration on a unix socket (QEMU started with `-incoming defer`).
pub(crate) async fn migrate_incoming(socket: &Path, on: &Path) -> Result<(), QmpError> {
    execute(
        socket,
        qmp::migrate_incoming {
            uri: Some(format!("unix:{}", on.to_string_lossy())),
            channels: None,
            exit_on_error: None,
        },
    )
    .await
    .map(drop)
}

pub(crate) async fn nbd_server_start(socket: &Path, on: &Path) -> Result<(), QmpError> {
    execute(
        socket,
        qmp::nbd_server_start {
            addr: qmp::SocketAddressLegacy::unix(qmp::UnixSocketAddressWrapper { data: unix(on) }),
            max_connections: None,
            tls_authz: None,
            tls_creds: None,
        },
    )
    .await
    .map(drop)
}

pub(crate) async fn nbd_server_stop(socket: &Path) -> Result<(), QmpError> {
    execute(socket, qmp::nbd_server_stop {}).await.map(drop)
}

/// Exports `node` writable over the NBD server under its own name. Exporting also activates
/// the node, which an incoming QEMU otherwise keeps inactive until the migration ends.
pub(crate) async fn block_export_add_nbd(
    socket: &Path,
    id: &str,
    node: &str,
) -> Result<(), QmpError> {
    let options = nbd_export_options(id, node);
    execute(socket, qmp::block_export_add(options))
        .await
        .map(drop)
}

pub(crate) async fn cont(socket: &Path) -> Result<(), QmpError> {
    execute(socket, qmp::cont {}).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_mirror_keeps_about_a_second_in_flight_and_a_fast_one_qemus_default() {
        assert_eq!(mirror_buffer(0), None, "unlimited");
        assert_eq!(mirror_buffer(1 << 20), Some(1 << 20));
        assert_eq!(mirror_buffer(3 << 20), Some(4 << 20));
        assert_eq!(mirror_buffer(10 << 10), Some(256 << 10), "never tiny");
        assert_eq!(
            mirror_buffer(64 << 20),
            None,
            "fast enough for QEMU's 16 MiB"
        );
        let options = mirror_options("job", "disk", "nbd", 1 << 20);
        assert_eq!(options.buf_size, Some(1 << 20));
    }
}
