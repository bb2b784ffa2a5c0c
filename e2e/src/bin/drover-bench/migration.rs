//! `drover-bench migration`: one run that migrates the same kind of guest (1 GiB of RAM, almost
//! all of it non-zero, and a 2 GiB disk of random data) three ways on this machine: QEMU straight
//! to QEMU over plain loopback TCP (the limit), QEMU's own TLS (what libvirt and KubeVirt rely
//! on), and Drover (hub, two agent processes, the agents' mutual-TLS tunnel). It prints
//! throughput as ratios against those baselines, switchover downtime (the guest's whole pause,
//! and what QEMU reports for the source's stop), and CPU seconds per GiB.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use drover_e2e::direct_migration::{qmp_execute, DirectMigrations, DirectRound, Transport};
use drover_e2e::process::{guest_console, process_cpu_seconds};
use qapi::qmp;
use rand::RngCore as _;
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct MigrationArgs {
    /// Migrations through Drover (downtime percentiles want at least 20).
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Direct QEMU migrations per baseline (plain TCP and QEMU TLS take turns); an even number
    /// splits each baseline evenly over the two blocks.
    #[arg(long, default_value_t = 6)]
    baseline_rounds: u32,
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    #[arg(long, default_value_t = 2048)]
    disk_mib: u64,
    /// Guest RAM filled with non-zero bytes at boot. 768 of 1024 MiB leaves the guest's own
    /// processes about 100 MiB; with the most it allows (all but 40 MiB) guests now and then
    /// rebooted during a migration.
    #[arg(long, default_value_t = 768)]
    dirty_buffer_mib: u64,
    /// How fast the guest keeps rewriting that memory during the migrations.
    #[arg(long, default_value_t = 4)]
    dirty_mib_per_s: u64,
    /// Where the disks and the agents' data live (the system's temporary directory if not
    /// given); it needs room for three copies of the disk.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// How long a guest may take to boot and fill its memory under TCG.
const FILL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a migrated guest may take to print its next counter on the target.
const CONTINUE_TIMEOUT: Duration = Duration::from_secs(20);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// One migration's figures, the same for every transport.
struct Moved {
    /// The guest's kernel crashed or hung on the target after the migration (it booted again
    /// there, or was reset).
    crashed: bool,
    /// The guest's whole pause, as the sender counts it: QEMU's downtime plus the time from
    /// seeing the transfer complete until the target said (Drover) or `cont` returned (direct)
    /// that the guest runs there.
    pause_ms: u64,
    /// What QEMU reports: the source stopped until its side of the transfer completed.
    downtime_ms: u64,
    bytes: u64,
    transfer: Duration,
    disk_bytes: u64,
    disk_transfer: Duration,
    /// CPU seconds of both QEMU processes during the transfer.
    qemu_cpu: f64,
}

impl From<&DirectRound> for Moved {
    fn from(r: &DirectRound) -> Self {
        Self {
            crashed: false,
            pause_ms: r.pause_ms,
            downtime_ms: r.downtime_ms,
            bytes: r.bytes,
            transfer: r.transfer,
            disk_bytes: r.disk_bytes,
            disk_transfer: r.disk_transfer,
            qemu_cpu: r.qemu_cpu_seconds,
        }
    }
}

/// Totals over a transport's rounds.
struct Summary {
    label: &'static str,
    rounds: usize,
    /// Rounds after which the guest's kernel crashed or hung on the target.
    crashed: usize,
    mib_per_s: f64,
    disk_mib_per_s: f64,
    memory_mib_per_s: f64,
    gib: f64,
    /// p50, p99, max in ms: the guest's pause, and QEMU's reported downtime.
    pause: (u64, u64, u64),
    downtime: (u64, u64, u64),
    qemu_cpu_per_gib: f64,
    /// Agents' CPU per GiB (Drover only).
    agent_cpu_per_gib: Option<f64>,
}

fn summarize(label: &'static str, moved: &[Moved], agent_cpu: Option<f64>) -> Summary {
    let bytes: u64 = moved.iter().map(|m| m.bytes).sum();
    let seconds: f64 = moved.iter().map(|m| m.transfer.as_secs_f64()).sum();
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let disk_bytes: u64 = moved.iter().map(|m| m.disk_bytes).sum();
    let disk_time: Duration = moved.iter().map(|m| m.disk_transfer).sum();
    let total_time: Duration = moved.iter().map(|m| m.transfer).sum();
    let pause = percentiles(moved.iter().map(|m| m.pause_ms).collect());

    let downtime = percentiles(moved.iter().map(|m| m.downtime_ms).collect());
    Summary {
        label,
        rounds: moved.len(),
        crashed: moved.iter().filter(|m| m.crashed).count(),
        mib_per_s: bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9),
        disk_mib_per_s: rate(disk_bytes, disk_time),
        memory_mib_per_s: rate(bytes - disk_bytes, total_time.saturating_sub(disk_time)),
        gib,
        pause,
        downtime,
        qemu_cpu_per_gib: moved.iter().map(|m| m.qemu_cpu).sum::<f64>() / gib.max(1e-9),
        agent_cpu_per_gib: agent_cpu.map(|cpu| cpu / gib.max(1e-9)),
    }
}

/// p50, p99 (nearest rank) and max.
fn percentiles(mut values: Vec<u64>) -> (u64, u64, u64) {
    values.sort_unstable();
    if values.is_empty() {
        return (0, 0, 0);
    }
    let at =
        |q: f64| values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1];
    (at(0.5), at(0.99), values[values.len() - 1])
}

pub async fn run(args: MigrationArgs) -> anyhow::Result<()> {
    ensure!(
        args.rounds >= 1 && args.baseline_rounds >= 1,
        "--rounds and --baseline-rounds must be at least 1"
    );
    println!("{}", machine());
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    ensure!(
        work_dir.is_dir(),
        "--work-dir {} is not a directory; give one with room for three copies of the disk",
        work_dir.display()
    );
    let work = tempfile::tempdir_in(&work_dir)?;
    println!("disks and agent data under {}", work_dir.display());
    let image = work.path().join("disk.raw");
    write_random_image(&image, args.disk_mib << 20)?;
    let spec = guest_spec(&args, &image);
    println!(
        "guest: {} MiB RAM (filled with non-zero bytes, {} MiB/s rewritten), {} MiB disk of random data, counter every 100 ms, a disk record every 100 ms; QEMU under TCG",
        args.memory_mib, args.dirty_mib_per_s, args.disk_mib
    );

    let total_direct = args.baseline_rounds * 2;
    let first_direct = total_direct / 2;
    println!(
        "\nthree blocks, one guest at a time (an idle second guest under TCG would take a core from the one moving): {first_direct} QEMU-to-QEMU migrations, then {} through Drover (hub, agents and their TLS tunnel, back and forth), then {} QEMU-to-QEMU migrations with a fresh guest; plain TCP and QEMU's TLS alternate (plain, TLS, TLS, plain), so that both baselines are measured as often before as after Drover, and as often in odd as in even rounds",
        args.rounds,
        total_direct - first_direct
    );
    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    direct_block(&spec, work.path(), first_direct, &mut plain, &mut tls).await?;
    let mut moved = Vec::new();
    let mut agent_cpu = 0.0;
    {
        let mut drover = DroverPair::start(spec.clone(), work.path()).await?;
        println!("  Drover guest: {}", wait_for_fill(drover.vm_dir()).await?);
        for round in 0..args.rounds {
            flush_host_writeback(work.path()).await?;
            let (m, cpu, label) = drover.migrate(round).await?;
            print_round(round, &label, &m);
            moved.push(m);
            agent_cpu += cpu;
        }
    }
    direct_block(
        &spec,
        work.path(),
        total_direct - first_direct,
        &mut plain,
        &mut tls,
    )
    .await?;

    let plain = summarize("QEMU direct, plain loopback TCP", &plain, None);
    let tls = summarize("QEMU direct, QEMU's own TLS", &tls, None);
    let drover = summarize("Drover, agents' TLS tunnel", &moved, Some(agent_cpu));
    println!("\n| transport | rounds (guest crashed after) | throughput | vs plain TCP | vs QEMU TLS | disks / memory | guest pause p50 / p99 / max | QEMU downtime p50 / p99 / max | CPU-s per GiB (QEMU + agents) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for s in [&plain, &tls, &drover] {
        let cpu = match s.agent_cpu_per_gib {
            Some(agents) => format!(
                "{:.2} ({:.2} + {:.2})",
                s.qemu_cpu_per_gib + agents,
                s.qemu_cpu_per_gib,
                agents
            ),
            None => format!("{:.2}", s.qemu_cpu_per_gib),
        };
        println!(
            "| {} | {} ({}) | {:.1} MiB/s ({:.1} GiB) | {:.2} | {:.2} | {:.1} / {:.1} MiB/s | {} / {} / {} ms | {} / {} / {} ms | {cpu} |",
            s.label,
            s.rounds,
            s.crashed,
            s.mib_per_s,
            s.gib,
            s.mib_per_s / plain.mib_per_s,
            s.mib_per_s / tls.mib_per_s,
            s.disk_mib_per_s,
            s.memory_mib_per_s,
            s.pause.0,
            s.pause.1,
            s.pause.2,
            s.downtime.0,
            s.downtime.1,
            s.downtime.2
        );
    }
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "\ngoals: throughput >= 0.90 of plain TCP: {:.2} ({}); not slower than QEMU's TLS: {:.2} ({}); downtime p99 <= 300 ms: guest pause p99 {} ms ({}); QEMU's downtime p99 {} ms",
        drover.mib_per_s / plain.mib_per_s,
        verdict(drover.mib_per_s >= 0.90 * plain.mib_per_s),
        drover.mib_per_s / tls.mib_per_s,
        verdict(drover.mib_per_s >= tls.mib_per_s),
        drover.pause.1,
        verdict(drover.pause.1 <= 300),
        drover.downtime.1
    );
    Ok(())
}

/// `rounds` QEMU-to-QEMU migrations of a freshly booted guest, plain TCP and QEMU's TLS taking
/// turns in the order plain, TLS, TLS, plain.
async fn direct_block(
    spec: &Value,
    work: &Path,
    rounds: u32,
    plain: &mut Vec<Moved>,
    tls: &mut Vec<Moved>,
) -> anyhow::Result<()> {
    if rounds == 0 {
        return Ok(());
    }
    let mut pair = DirectMigrations::start(serde_json::from_value(spec.clone())?, work).await?;
    println!("  direct guest: {}", wait_for_fill(pair.vm_dir()).await?);
    for _ in 0..rounds {
        // Plain, TLS, TLS, plain, ... over both blocks: each baseline gets as many early as late
        // rounds, and as many odd as even ones in a block (on the machine in docs/benchmarks.md
        // every other round was slower, whatever the transport).
        let transport = match (plain.len() + tls.len()) % 4 {
            0 | 3 => Transport::PlainTcp,
            _ => Transport::QemuTls,
        };
        flush_host_writeback(work).await?;
        let before = guest_console(pair.vm_dir()).0;
        let r = pair.migrate(transport).await?;
        let counting = guest_continues(pair.vm_dir(), before).await?;
        let m = Moved {
            crashed: !counting,
            ..Moved::from(&r)
        };
        let round = (plain.len() + tls.len()) as u32;
        print_round(round, transport.label(), &m);
        match transport {
            Transport::PlainTcp => plain.push(m),
            Transport::QemuTls => tls.push(m),
        }
    }
    Ok(())
}

fn print_round(round: u32, label: &str, m: &Moved) {
    let memory_time = m.transfer.saturating_sub(m.disk_transfer);
    println!(
        "  {round:>2}: {label}: {:.0} MiB in {} ms ({:.1} MiB/s; disks {:.1} MiB/s, memory {:.1} MiB/s), guest paused {} ms (QEMU's downtime {} ms), QEMU CPU {:.2} s",
        mib(m.bytes),
        m.transfer.as_millis(),
        rate(m.bytes, m.transfer),
        rate(m.disk_bytes, m.disk_transfer),
        rate(m.bytes - m.disk_bytes, memory_time),
        m.pause_ms,
        m.downtime_ms,
        m.qemu_cpu
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn rate(bytes: u64, time: Duration) -> f64 {
    mib(bytes) / time.as_secs_f64().max(1e-9)
}

/// The machine line of the report: cores, CPU model, QEMU version.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "QEMU not found".into());
    format!("machine: {cores} cores, {model}; {qemu}")
}

/// How long the host may take to write its dirty page cache out before a round.
const WRITEBACK_TIMEOUT: Duration = Duration::from_secs(300);

/// Writes the host's dirty page cache for `dir`'s filesystem out before a migration. Every round
/// writes a 2 GiB target disk; without this, a round that starts while the last one's disk is
/// still being written back shares the host disk (140 MB/s on the machine in docs/benchmarks.md)
/// with it, and would be measured against a round that did not.
async fn flush_host_writeback(dir: &Path) -> anyhow::Result<()> {
    let mut sync = tokio::process::Command::new("sync");
    sync.arg("--file-system").arg(dir).kill_on_drop(true);
    let status = tokio::time::timeout(WRITEBACK_TIMEOUT, sync.status())
        .await
        .with_context(|| {
            format!(
                "the host did not write its page cache out within {WRITEBACK_TIMEOUT:?}; is the disk under {} that slow?",
                dir.display()
            )
        })?
        .context("cannot run sync (coreutils)")?;
    ensure!(
        status.success(),
        "sync --file-system {} failed: {status}",
        dir.display()
    );
    Ok(())
}

/// A raw disk image of random bytes (no block of it is zero, none compresses).
fn write_random_image(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = rand::rng();
    let mut chunk = vec![0u8; 4 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        rng.fill_bytes(&mut chunk[..n]);
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(())
}

/// The test guest with one disk built from `image`.
fn guest_spec(args: &MigrationArgs, image: &Path) -> Value {
    let guest = drover_e2e::testbed::test_guest();
    json!({
        "namespace": "bench", "name": "mover", "memoryBytes": args.memory_mib << 20, "vcpus": 1,
        "disks": [{"name": "root", "sizeBytes": args.disk_mib << 20, "image": image}],
        "interfaces": [{"name": "nic0", "network": "default", "mac": "02:00:00:00:be:01"}],
        "runStrategy": "Always",
        "boot": {
            "kernel": guest.join("vmlinuz"), "initrd": guest.join("initramfs.gz"),
            "cmdline": format!(
                "console=ttyS0 quiet panic=-1 oops=panic drover.disk_writes=1 drover.dirty_fill=random drover.dirty_mib_per_s={} drover.dirty_buffer_mib={}",
                args.dirty_mib_per_s.max(1), args.dirty_buffer_mib
            ),
        },
    })
}

/// Waits until the guest in `vm_dir` says its memory is filled; returns what it said.
async fn wait_for_fill(vm_dir: &Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + FILL_TIMEOUT;
    loop {
        let whole = std::fs::read_to_string(vm_dir.join("serial.log")).unwrap_or_default();
        // Only the latest boot: after a crash the log also holds the last one's lines.
        let log = whole
            .rfind("drover-guest: up")
            .map_or(whole.as_str(), |at| &whole[at..]);
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("drover-guest: buffer filled"))
        {
            let cut = log
                .lines()
                .find(|l| l.contains("dirty buffer cut"))
                .map(|l| format!(" ({})", l.trim()))
                .unwrap_or_default();
            return Ok(format!("{}{cut}", line.trim()));
        }
        ensure!(
            Instant::now() < deadline,
            "the guest in {} did not fill its memory within {FILL_TIMEOUT:?}; its console:\n{log}",
            vm_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until the guest in `vm_dir` has booted (again) after a reset.
async fn wait_for_boot(vm_dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + FILL_TIMEOUT;
    while guest_console(vm_dir).1 == 0 {
        ensure!(
            Instant::now() < deadline,
            "the guest in {} did not boot within {FILL_TIMEOUT:?} of its reset",
            vm_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// The guest now in `vm_dir` counts on from `before` (true), or its kernel crashed and it
/// booted again, or it hung and was reset (false: the crash is printed, and the call returns once the new boot filled its
/// memory again, so that the next rounds move a guest like the others).
async fn guest_continues(vm_dir: &Path, before: Option<u64>) -> anyhow::Result<bool> {
    let deadline = Instant::now() + CONTINUE_TIMEOUT;
    loop {
        let (last, boots) = guest_console(vm_dir);
        // A counter that went back also means a new boot, whatever the console kept of it.
        if boots > 0 || (last.is_some() && before.is_some() && last < before) {
            let console = std::fs::read_to_string(vm_dir.join("serial.log")).unwrap_or_default();
            let crash: Vec<&str> = console
                .lines()
                .filter(|l| {
                    ["BUG", "fault", "panic", "RIP:", "Oops"]
                        .iter()
                        .any(|w| l.contains(w))
                })
                .take(4)
                .collect();
            println!(
                "  THE GUEST CRASHED after this migration and booted again:\n    {}",
                crash.join("\n    ")
            );
            println!("  (refilled: {})", wait_for_fill(vm_dir).await?);
            return Ok(false);
        }
        if last.is_some() && last > before {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            // A kernel that hangs without an oops: reset it like one that panicked.
            let console = std::fs::read_to_string(vm_dir.join("serial.log")).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(3).collect();
            qmp_execute(&vm_dir.join("qmp.sock"), qmp::system_reset {})
                .await
                .with_context(|| {
                    format!(
                        "the guest in {} did not count on from {before:?} within {CONTINUE_TIMEOUT:?} and cannot be reset",
                        vm_dir.display()
                    )
                })?;
            println!(
                "  THE GUEST HUNG after this migration (nothing new on its console for {CONTINUE_TIMEOUT:?}; its last lines: {:?}); reset",
                tail
            );
            wait_for_boot(vm_dir).await?;
            println!("  (refilled: {})", wait_for_fill(vm_dir).await?);
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The CPU time of the QEMU processes of the VM in `dirs`, tracked from a starting point.
#[derive(Default)]
struct QemuCpu {
    /// pid -> (CPU seconds when first counted, latest CPU seconds)
    seen: HashMap<u32, (f64, f64)>,
}

impl QemuCpu {
    fn sample(&mut self, dirs: &[PathBuf]) {
        for dir in dirs {
            let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(cpu) = process_cpu_seconds(pid) {
                self.seen.entry(pid).or_insert((cpu, cpu)).1 = cpu;
            }
        }
    }

    fn total(&self) -> f64 {
        self.seen.values().map(|(first, last)| last - first).sum()
    }
}

/// Drover's side of the benchmark: a real hub (SQLite) and two real agent processes (qemu
/// runtime), the guest declared on east-1 and moved back and forth with
/// `migrateVirtualMachine`. Dropping it stops them and kills the guest.
struct DroverPair {
    vm_dirs: [PathBuf; 2],
    /// Where the guest runs now (index into `vm_dirs` and `CLUSTERS`).
    at: usize,
    agent_pids: [u32; 2],
    // Dropped in this order: agents, hub, QEMUs, directories.
    _agents: [drover_e2e::process::AgentProcess; 2],
    hub: drover_e2e::process::HubProcess,
    _reaper: drover_e2e::process::QemuReaper,
    _dirs: [tempfile::TempDir; 3],
}

const CLUSTERS: [&str; 2] = ["east-1", "west-1"];

impl DroverPair {
    async fn start(spec: Value, work: &Path) -> anyhow::Result<Self> {
        use drover_e2e::process::{AgentProcess, HubProcess, QemuReaper};
        let dirs = [
            tempfile::tempdir_in(work)?,
            tempfile::tempdir_in(work)?,
            tempfile::tempdir_in(work)?,
        ];
        let reaper = QemuReaper(vec![dirs[1].path().into(), dirs[2].path().into()]);
        let vm_dirs = [
            dirs[1].path().join("vms/bench/mover"),
            dirs[2].path().join("vms/bench/mover"),
        ];
        std::fs::create_dir_all(&vm_dirs[0])?;
        std::fs::write(vm_dirs[0].join("vm.json"), serde_json::to_vec(&spec)?)?;
        let hub = HubProcess::start(dirs[0].path(), None).await;
        let http = reqwest::Client::new();
        let east_token = hub.create_join_token(&http, CLUSTERS[0]).await?;
        let west_token = hub.create_join_token(&http, CLUSTERS[1]).await?;
        // The guest's disk image lies in `work`, its kernel and initrd in the test guest's dir.
        let guest_dir = drover_e2e::testbed::test_guest_dir();
        let image_dirs = [
            "--image-dir",
            guest_dir
                .to_str()
                .context("the guest directory is not UTF-8")?,
            "--image-dir",
            work.to_str().context("the work directory is not UTF-8")?,
        ];
        let east = AgentProcess::start_with_args(
            dirs[1].path(),
            &hub.agents,
            Some((CLUSTERS[0], &east_token)),
            &image_dirs,
        )
        .await;
        let west = AgentProcess::start_with_args(
            dirs[2].path(),
            &hub.agents,
            Some((CLUSTERS[1], &west_token)),
            &image_dirs,
        )
        .await;
        let agent_pids = [
            east.child.id().context("agent pid")?,
            west.child.id().context("agent pid")?,
        ];
        let pair = Self {
            vm_dirs,
            at: 0,
            agent_pids,
            _agents: [east, west],
            hub,
            _reaper: reaper,
            _dirs: dirs,
        };
        pair.wait_until_running(FILL_TIMEOUT).await?;
        Ok(pair)
    }

    fn vm_dir(&self) -> &Path {
        &self.vm_dirs[self.at]
    }

    /// Until the hub sees the guest running where it is and the other cluster Ready.
    async fn wait_until_running(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self
                .hub
                .gql(
                    r#"query($c: String!, $o: String!) { virtualMachine(cluster: $c, namespace: "bench", name: "mover") { phase } other: cluster(name: $o) { health } }"#,
                    json!({"c": CLUSTERS[self.at], "o": CLUSTERS[1 - self.at]}),
                )
                .await;
            if v["data"]["virtualMachine"]["phase"] == "RUNNING"
                && v["data"]["other"]["health"] == "READY"
            {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the hub does not see the guest running on {}: {v}",
                CLUSTERS[self.at]
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn agents_cpu(&self) -> f64 {
        self.agent_pids
            .iter()
            .map(|p| process_cpu_seconds(*p).unwrap_or(0.0))
            .sum()
    }

    /// One migration to the other cluster: its figures, the agents' CPU seconds during it, and
    /// a label.
    async fn migrate(&mut self, round: u32) -> anyhow::Result<(Moved, f64, String)> {
        let (source, target) = (self.at, 1 - self.at);
        let gql = |query: &'static str, variables: Value| self.hub.gql(query, variables);
        let cpu0 = self.agents_cpu();
        let before = guest_console(&self.vm_dirs[source]).0;
        let started = gql(
            r#"mutation($c: String!, $t: String!) { migrateVirtualMachine(input: {cluster: $c, namespace: "bench", name: "mover", targetCluster: $t}) { id } }"#,
            json!({"c": CLUSTERS[source], "t": CLUSTERS[target]}),
        )
        .await;
        let id = started["data"]["migrateVirtualMachine"]["id"]
            .as_str()
            .with_context(|| format!("migrateVirtualMachine: {started}"))?
            .to_owned();
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        // QEMU's CPU is counted from when the send starts (phase Running) until it ends.
        let mut qemu_cpu: Option<QemuCpu> = None;
        let ended = loop {
            let m = gql(
                r#"query($id: ID!) { migration(id: $id) { phase failureReason } }"#,
                json!({"id": id}),
            )
            .await;
            let phase = m["data"]["migration"]["phase"].as_str().unwrap_or_default();
            if phase == "RUNNING" && qemu_cpu.is_none() {
                qemu_cpu = Some(QemuCpu::default());
            }
            if let Some(cpu) = qemu_cpu.as_mut() {
                cpu.sample(&self.vm_dirs);
            }
            if phase == "SUCCEEDED" || phase == "FAILED" {
                break m;
            }
            ensure!(Instant::now() < deadline, "migration {id} did not end: {m}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let agents_cpu = self.agents_cpu() - cpu0;
        ensure!(
            ended["data"]["migration"]["phase"] == "SUCCEEDED",
            "round {round} failed: {ended}"
        );
        let command = gql(
            r#"query($c: String!, $k: String!) { agentCommand(cluster: $c, idempotencyKey: $k) { message } }"#,
            json!({"c": CLUSTERS[source], "k": format!("{id}/send")}),
        )
        .await;
        let message = command["data"]["agentCommand"]["message"]
            .as_str()
            .unwrap_or_default();
        let sent =
            parse_sent(message).with_context(|| format!("unreadable send report: {message}"))?;
        let counting = guest_continues(&self.vm_dirs[target], before).await?;
        self.at = target;
        // The hub learns the new location from the agents' inventory.
        self.wait_until_running(Duration::from_secs(30)).await?;
        let moved = Moved {
            crashed: !counting,
            qemu_cpu: qemu_cpu.map_or(0.0, |c| c.total()),
            ..sent
        };
        let label = format!("{} -> {}", CLUSTERS[source], CLUSTERS[target]);
        Ok((moved, agents_cpu, label))
    }
}

/// The source agent's report of a send: "moved to west-1 (downtime 163 ms, paused 190 ms,
/// 91234567 bytes in 2345 ms; disks 81234567 bytes in 1234 ms)".
fn parse_sent(message: &str) -> Option<Moved> {
    let inner = message.split_once('(')?.1.trim_end_matches(')');
    let mut numbers = inner
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u64>());
    Some(Moved {
        crashed: false,
        downtime_ms: numbers.next()?.ok()?,
        pause_ms: numbers.next()?.ok()?,
        bytes: numbers.next()?.ok()?,
        transfer: Duration::from_millis(numbers.next()?.ok()?),
        disk_bytes: numbers.next()?.ok()?,
        disk_transfer: Duration::from_millis(numbers.next()?.ok()?),
        qemu_cpu: 0.0,
    })
}
