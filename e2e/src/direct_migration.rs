//! QEMU migrating a VM straight to another QEMU on this machine, without Drover: the baselines of
//! the live-migration benchmark. Both QEMUs run the agent's own command line for the VM (the same
//! virtual hardware), and the transfer is the agent's: a full write-blocking block mirror onto
//! the target's NBD export, then the memory stream with pause-before-switchover, the mirrors
//! completed while the guest is stopped. Only the transport differs: plain loopback TCP, or
//! QEMU's own TLS (`tls-creds-x509`, certificates from a Drover hub CA).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use drover_agent::runtime::qemu::{
    mirror_options, nbd_client_options, nbd_export_options, next_poll, vm_command_line, Accel,
    QueryBlockJobs, QueryMigrate, DOWNTIME_LIMIT_MS, SWITCHOVER_POLL,
};
use drover_shared::commands::VmSpec;
use qapi::futures::QmpStreamTokio;
use qapi::qmp;

use crate::process::{process_cpu_seconds, QemuReaper};

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
const DISK_TIMEOUT: Duration = Duration::from_secs(600);
/// A whole transfer (disks and memory); a stalled one is a failed benchmark, not a hang.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the disk mirrors are polled: the agent's own poll interval, so times compare (the
/// memory transfer is polled as the agent polls it, `next_poll`).
const POLL: Duration = Duration::from_millis(50);
/// "Unlimited" bandwidth, as the agent says it.
const UNLIMITED_BANDWIDTH: u64 = 1 << 40;
/// What QEMU's TLS certificates are issued for; QEMU checks it on both links.
const TLS_HOSTNAME: &str = "localhost";

/// How the two QEMUs talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP on 127.0.0.1: no encryption, the limit of what the machine can move.
    PlainTcp,
    /// QEMU's own TLS on the migration stream and the NBD link (what libvirt and KubeVirt use).
    QemuTls,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Self::PlainTcp => "QEMU direct, plain loopback TCP",
            Self::QemuTls => "QEMU direct, QEMU's own TLS",
        }
    }
}

/// One direct migration's figures, counted the way the agent counts its own.
#[derive(Debug, Clone)]
pub struct DirectRound {
    pub transport: Transport,
    /// QEMU's reported downtime (source stopped until the migration completed).
    pub downtime_ms: u64,
    /// The guest's whole pause, counted as the agent counts it: QEMU's downtime plus the time
    /// from seeing the migration complete until the target's `cont` returned.
    pub pause_ms: u64,
    /// Memory bytes QEMU sent (`ram.transferred`) plus the disk mirrors' progress.
    pub bytes: u64,
    /// From the first mirror command to the migration's completion.
    pub transfer: Duration,
    /// The disks' share: bytes the mirrors copied, and the time until they were in sync.
    pub disk_bytes: u64,
    pub disk_transfer: Duration,
    /// CPU seconds both QEMU processes spent during the transfer.
    pub qemu_cpu_seconds: f64,
}

/// A running VM under `root` that migrates back and forth between fresh QEMUs; every QEMU is
/// killed when this is dropped.
pub struct DirectMigrations {
    /// Declared first so that it is dropped first: it finds the QEMUs by the pidfiles in `root`.
    _reaper: QemuReaper,
    root: tempfile::TempDir,
    spec: VmSpec,
    qemu: PathBuf,
    qemu_img: PathBuf,
    certs: PathBuf,
    running: PathBuf,
    generation: u32,
}

impl DirectMigrations {
    /// Boots the VM of `spec` (its disks built like the agent builds them: from `image`, else
    /// blank) in a fresh directory under `work`, with QEMU's TLS credentials loaded,
    /// certificates issued by a fresh hub CA.
    pub async fn start(spec: VmSpec, work: &Path) -> anyhow::Result<Self> {
        let root = tempfile::tempdir_in(work)?;
        let certs = root.path().join("certs");
        write_qemu_certificates(&certs)?;
        let reaper = QemuReaper(vec![root.path().to_path_buf()]);
        let mut this = Self {
            running: PathBuf::new(),
            spec,
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            certs,
            generation: 0,
            root,
            _reaper: reaper,
        };
        let dir = this.next_dir()?;
        for disk in &this.spec.disks {
            let path = dir.join(format!("disk-{}.qcow2", disk.name));
            match &disk.image {
                Some(image) => {
                    qemu_img(
                        &this.qemu_img,
                        &["convert", "-O", "qcow2", image, &path.to_string_lossy()],
                    )
                    .await?;
                    qemu_img(
                        &this.qemu_img,
                        &[
                            "resize",
                            "-q",
                            &path.to_string_lossy(),
                            &disk.size_bytes.to_string(),
                        ],
                    )
                    .await?;
                }
                None => this.blank_disk(&path, disk.size_bytes).await?,
            }
        }
        this.launch(&dir, &[]).await?;
        this.running = dir;
        Ok(this)
    }

    /// The running VM's directory (its `serial.log` has the guest's console).
    pub fn vm_dir(&self) -> &Path {
        &self.running
    }

    /// Migrates the running VM to a fresh QEMU over `transport`; the old one is then killed.
    pub async fn migrate(&mut self, transport: Transport) -> anyhow::Result<DirectRound> {
        let source = self.running.clone();
        let target = self.next_dir()?;
        for disk in &self.spec.disks {
            let path = target.join(format!("disk-{}.qcow2", disk.name));
            self.blank_disk(&path, disk.size_bytes).await?;
        }
        self.launch(&target, &["-incoming", "defer", "-S"]).await?;
        let round = self.transfer(&source, &target, transport).await;
        // Whatever happened, one QEMU stays: the target on success, else the source.
        let (keep, drop) = match round {
            Ok(_) => (target, source),
            Err(_) => (source, target),
        };
        kill_vm(&drop);
        let _ = std::fs::remove_dir_all(&drop);
        self.running = keep;
        round
    }

    async fn transfer(
        &self,
        source: &Path,
        target: &Path,
        transport: Transport,
    ) -> anyhow::Result<DirectRound> {
        let (src_qmp, dst_qmp) = (source.join("qmp.sock"), target.join("qmp.sock"));
        let tls = transport == Transport::QemuTls;
        let creds = |id: &str| tls.then(|| id.to_owned());
        // The target: an NBD export per disk, then the incoming migration.
        let nbd_port = free_port()?;
        qmp_execute(
            &dst_qmp,
            qmp::nbd_server_start {
                addr: qmp::SocketAddressLegacy::inet(qmp::InetSocketAddressWrapper::from(inet(
                    nbd_port,
                ))),
                max_connections: None,
                tls_authz: None,
                tls_creds: creds("tls-server"),
            },
        )
        .await?;
        for disk in &self.spec.disks {
            let node = format!("disk-{}", disk.name);
            qmp_execute(
                &dst_qmp,
                qmp::block_export_add(nbd_export_options(&node, &node)),
            )
            .await?;
        }
        let migration_port = free_port()?;
        qmp_execute(
            &dst_qmp,
            qmp::migrate_set_parameters(qmp::MigrateSetParameters {
                tls_creds: Some(qmp::StrOrNull::s(creds("tls-server").unwrap_or_default())),
                ..Default::default()
            }),
        )
        .await?;
        qmp_execute(
            &dst_qmp,
            qmp::migrate_incoming {
                uri: Some(format!("tcp:127.0.0.1:{migration_port}")),
                channels: None,
                exit_on_error: None,
            },
        )
        .await?;
        let pids = (vm_pid(source)?, vm_pid(target)?);
        let cpu0 = process_cpu_seconds(pids.0)? + process_cpu_seconds(pids.1)?;
        let started = Instant::now();
        let deadline = started + TRANSFER_TIMEOUT;
        // The source: mirror every disk onto its export, as the agent does.
        for disk in &self.spec.disks {
            let node = format!("disk-{}", disk.name);
            qmp_execute(
                &src_qmp,
                qmp::blockdev_add(nbd_client_options(
                    &format!("nbd-{}", disk.name),
                    qmp::SocketAddress::inet(inet(nbd_port)),
                    &node,
                    tls.then_some(("tls-client", TLS_HOSTNAME)),
                )),
            )
            .await?;
            qmp_execute(
                &src_qmp,
                mirror_options(
                    &format!("mirror-{}", disk.name),
                    &node,
                    &format!("nbd-{}", disk.name),
                    0,
                ),
            )
            .await?;
        }
        let mut disk_bytes;
        loop {
            let jobs = qmp_execute(&src_qmp, QueryBlockJobs {}).await?;
            disk_bytes = jobs.iter().map(|j| j.offset).sum::<u64>();
            if let Some(failed) = jobs.iter().find(|j| j.error.is_some()) {
                bail!("mirror {} failed: {:?}", failed.device, failed.error);
            }
            if jobs.len() == self.spec.disks.len() && jobs.iter().all(|j| j.ready) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the disk mirrors did not become ready"
            );
            tokio::time::sleep(POLL).await;
        }
        let disk_transfer = started.elapsed();
        // Memory: the agent's capabilities and parameters, over this transport.
        let capabilities = [
            (qmp::MigrationCapability::pause_before_switchover, true),
            (qmp::MigrationCapability::return_path, true),
            (qmp::MigrationCapability::auto_converge, false),
            (qmp::MigrationCapability::postcopy_ram, false),
        ]
        .into_iter()
        .map(|(capability, state)| qmp::MigrationCapabilityStatus { capability, state })
        .collect();
        qmp_execute(&src_qmp, qmp::migrate_set_capabilities { capabilities }).await?;
        qmp_execute(
            &src_qmp,
            qmp::migrate_set_parameters(qmp::MigrateSetParameters {
                max_bandwidth: Some(UNLIMITED_BANDWIDTH),
                downtime_limit: Some(DOWNTIME_LIMIT_MS),
                tls_creds: Some(qmp::StrOrNull::s(creds("tls-client").unwrap_or_default())),
                tls_hostname: Some(qmp::StrOrNull::s(
                    if tls { TLS_HOSTNAME } else { "" }.to_owned(),
                )),
                ..Default::default()
            }),
        )
        .await?;
        qmp_execute(
            &src_qmp,
            qmp::migrate {
                uri: Some(format!("tcp:127.0.0.1:{migration_port}")),
                channels: None,
                detach: None,
                resume: None,
            },
        )
        .await?;
        let mut disks_handed_over = false;
        let info = loop {
            let info = qmp_execute(&src_qmp, QueryMigrate {}).await?;
            match info.status {
                Some(qmp::MigrationStatus::completed) => break info,
                Some(
                    qmp::MigrationStatus::failed
                    | qmp::MigrationStatus::cancelled
                    | qmp::MigrationStatus::cancelling,
                ) => bail!(
                    "{}: the migration failed: {}",
                    transport.label(),
                    info.error_desc.as_deref().unwrap_or("no reason given")
                ),
                Some(qmp::MigrationStatus::pre_switchover) if !disks_handed_over => {
                    disk_bytes = self.complete_mirrors(&src_qmp, deadline).await?;
                    disks_handed_over = true;
                    qmp_execute(
                        &src_qmp,
                        qmp::migrate_continue {
                            state: qmp::MigrationStatus::pre_switchover,
                        },
                    )
                    .await?;
                    continue;
                }
                _ => {}
            }
            ensure!(
                Instant::now() < deadline,
                "{}: the migration did not complete within {TRANSFER_TIMEOUT:?}",
                transport.label()
            );
            tokio::time::sleep(next_poll(&info)).await;
        };
        let completed_at = Instant::now();
        let transfer = started.elapsed();
        let qemu_cpu_seconds = process_cpu_seconds(pids.0)? + process_cpu_seconds(pids.1)? - cpu0;
        // The target takes over, as the receiving agent does.
        loop {
            let incoming = qmp_execute(&dst_qmp, QueryMigrate {}).await?;
            match incoming.status {
                Some(qmp::MigrationStatus::completed) => break,
                Some(qmp::MigrationStatus::failed) => bail!("the incoming migration failed"),
                _ => {}
            }
            ensure!(Instant::now() < deadline, "the target never completed");
            tokio::time::sleep(SWITCHOVER_POLL).await;
        }
        qmp_execute(&dst_qmp, qmp::nbd_server_stop {}).await?;
        qmp_execute(&dst_qmp, qmp::cont {}).await?;
        let downtime_ms = info.downtime.unwrap_or(0);
        Ok(DirectRound {
            transport,
            downtime_ms,
            pause_ms: downtime_ms + completed_at.elapsed().as_millis() as u64,
            bytes: info.ram.as_ref().map_or(0, |r| r.transferred) + disk_bytes,
            transfer,
            disk_bytes,
            disk_transfer,
            qemu_cpu_seconds,
        })
    }

    /// At pre-switchover: completes every mirror (the target gets the last writes); returns the
    /// disk bytes copied.
    async fn complete_mirrors(&self, src_qmp: &Path, deadline: Instant) -> anyhow::Result<u64> {
        for disk in &self.spec.disks {
            qmp_execute(
                src_qmp,
                qmp::block_job_cancel {
                    device: format!("mirror-{}", disk.name),
                    force: Some(false),
                },
            )
            .await?;
        }
        let copied = loop {
            let jobs = qmp_execute(src_qmp, QueryBlockJobs {}).await?;
            if let Some(failed) = jobs.iter().find(|j| j.error.is_some()) {
                bail!(
                    "mirror {} failed at switchover: {:?}",
                    failed.device,
                    failed.error
                );
            }
            if jobs.iter().all(|j| j.status == qmp::JobStatus::concluded) {
                break jobs.iter().map(|j| j.offset).sum();
            }
            ensure!(Instant::now() < deadline, "the mirrors did not complete");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        Ok(copied)
    }

    /// A fresh VM directory `<root>/vms/gen-N/<name>`, where `QemuReaper` finds its QEMU.
    fn next_dir(&mut self) -> anyhow::Result<PathBuf> {
        self.generation += 1;
        let dir = self
            .root
            .path()
            .join("vms")
            .join(format!("gen-{}", self.generation))
            .join(&self.spec.name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    async fn blank_disk(&self, path: &Path, size: u64) -> anyhow::Result<()> {
        qemu_img(
            &self.qemu_img,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &path.to_string_lossy(),
                &size.to_string(),
            ],
        )
        .await
    }

    /// Starts QEMU with the agent's command line for the VM plus both TLS credentials (the
    /// server side for a target, the client side for a source) and `extra`.
    async fn launch(&self, dir: &Path, extra: &[&str]) -> anyhow::Result<()> {
        let certs = self.certs.to_string_lossy().replace(',', ",,");
        let log = std::fs::File::create(dir.join("qemu.log"))?;
        let mut parent = tokio::process::Command::new(&self.qemu)
            .args(vm_command_line(dir, &self.spec, Accel::Tcg))
            .args([
                "-object",
                &format!("tls-creds-x509,id=tls-server,dir={certs},endpoint=server,verify-peer=on"),
                "-object",
                &format!("tls-creds-x509,id=tls-client,dir={certs},endpoint=client"),
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("cannot run qemu-system-x86_64 (Debian: apt-get install qemu-system-x86)")?;
        let status = tokio::time::timeout(LAUNCH_TIMEOUT, parent.wait())
            .await
            .context("QEMU did not start in time")??;
        ensure!(
            status.success(),
            "QEMU exited with {status}: {}",
            std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default()
        );
        Ok(())
    }
}

fn inet(port: u16) -> qmp::InetSocketAddress {
    qmp::InetSocketAddress::from(qmp::InetSocketAddressBase {
        host: "127.0.0.1".into(),
        port: port.to_string(),
    })
}

/// One QMP command on a fresh connection to `socket`, with a timeout.
pub async fn qmp_execute<C: qmp::QmpCommand>(socket: &Path, command: C) -> anyhow::Result<C::Ok> {
    let name = C::NAME;
    let exchange = async {
        let mut stream = QmpStreamTokio::open_uds(socket).await?.negotiate().await?;
        stream.execute(command).await
    };
    match tokio::time::timeout(QMP_TIMEOUT, exchange).await {
        Err(_) => bail!(
            "QMP {name} at {}: no answer within {QMP_TIMEOUT:?}",
            socket.display()
        ),
        Ok(Err(e)) => bail!("QMP {name} at {}: {e}", socket.display()),
        Ok(Ok(answer)) => Ok(answer),
    }
}

async fn qemu_img(binary: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        DISK_TIMEOUT,
        tokio::process::Command::new(binary)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("qemu-img did not finish in time")?
    .context("cannot run qemu-img (Debian: apt-get install qemu-utils)")?;
    ensure!(
        out.status.success(),
        "qemu-img {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn vm_pid(dir: &Path) -> anyhow::Result<u32> {
    let pid = std::fs::read_to_string(dir.join("qemu.pid"))
        .with_context(|| format!("no pidfile in {}", dir.display()))?;
    Ok(pid.trim().parse()?)
}

fn kill_vm(dir: &Path) {
    if let Ok(pid) = vm_pid(dir) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
}

/// A port free on 127.0.0.1 now (QEMU binds it a moment later; nothing else runs here).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The files QEMU's `tls-creds-x509` reads from its directory, issued by a fresh hub CA: a
/// server certificate for `localhost` and a client certificate (the agent kind, by CSR).
fn write_qemu_certificates(dir: &Path) -> anyhow::Result<()> {
    use drover_hub::agents::pki::Pki;
    std::fs::create_dir_all(dir)?;
    let pki = Pki::load_or_create(&dir.join("ca"))?;
    let validity = Duration::from_secs(24 * 3600);
    let (server, server_key) =
        pki.issue_server_certificate(&[TLS_HOSTNAME.into(), "127.0.0.1".into()], validity)?;
    let client_key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&client_key)?
        .pem()?;
    let cluster =
        drover_shared::ClusterName::new("bench-client").map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = pki.issue_agent_certificate(&csr, &cluster, validity)?;
    let server_key = rcgen::KeyPair::try_from(&server_key)?;
    std::fs::write(dir.join("ca-cert.pem"), pki.ca_pem())?;
    std::fs::write(dir.join("server-cert.pem"), &server.pem)?;
    std::fs::write(dir.join("server-key.pem"), server_key.serialize_pem())?;
    std::fs::write(dir.join("client-cert.pem"), &client.pem)?;
    std::fs::write(dir.join("client-key.pem"), client_key.serialize_pem())?;
    Ok(())
}
