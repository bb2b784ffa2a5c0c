//! `drover-bench tunnel`: the agents' mutual-TLS tunnel alone, without QEMU. A writer pushes
//! random bytes into a source-side local socket, the bytes cross the sender agent's tunnel, the
//! TLS link and the receiving agent's sync endpoint, and a reader drains them from the
//! receiver-side local socket, as the two QEMUs of a migration would. The same writer and reader
//! over one plain loopback TCP connection are the baseline in the same run; the figures are
//! throughput and CPU seconds per GiB, and the tunnel's own CPU (the difference).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use drover_agent::identity::AgentIdentity;
use drover_agent::sync::{Expected, LocalTunnel, PeerDialer, ReceiverSockets, SyncEndpoint};
use drover_e2e::agents::join;
use drover_e2e::process::process_cpu_seconds;
use drover_e2e::testbed::AgentEndpoint;
use drover_shared::migration::SyncChannel;
use drover_shared::{ClusterName, MigrationId};
use rand::RngCore as _;
use tokio::sync::{mpsc, watch};

#[derive(clap::Args)]
pub struct TunnelArgs {
    /// GiB pushed per round.
    #[arg(long, default_value_t = 2)]
    gib: u64,
    /// Rounds per transport (they take turns).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Bytes the writer hands to the socket per write (QEMU's migration stream writes 32 KiB
    /// to 256 KiB at a time).
    #[arg(long, default_value_t = 256 << 10)]
    write_size: usize,
}

/// A whole round may take this long before the benchmark gives up.
const ROUND_TIMEOUT: Duration = Duration::from_secs(300);

struct Round {
    seconds: f64,
    cpu_seconds: f64,
}

pub async fn run(args: TunnelArgs) -> anyhow::Result<()> {
    ensure!(
        args.gib >= 1 && args.rounds >= 1 && args.write_size >= 1,
        "--gib, --rounds and --write-size must be at least 1"
    );
    let bytes = args.gib << 30;
    let e = AgentEndpoint::start("bench_tunnel", None).await?;
    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
    let source = join(&e.hub, &e.base, "east-1", dirs.0.path()).await;
    let target = join(&e.hub, &e.base, "west-1", dirs.1.path()).await;
    let sockets = tempfile::tempdir()?;
    let mut chunk = vec![0u8; args.write_size];
    rand::rng().fill_bytes(&mut chunk);
    println!(
        "{} GiB per round, {} rounds each, writes of {} KiB, one process on {} cores",
        args.gib,
        args.rounds,
        args.write_size >> 10,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (mut plain, mut tunnel) = (Vec::new(), Vec::new());
    for round in 0..args.rounds * 2 {
        let r = if round % 2 == 0 {
            let r = plain_round(bytes, &chunk).await?;
            plain.push(r);
            ("plain loopback TCP", plain.last().unwrap())
        } else {
            let r = tunnel_round(&source, &target, sockets.path(), bytes, &chunk).await?;
            tunnel.push(r);
            ("agents' TLS tunnel", tunnel.last().unwrap())
        };
        println!(
            "  {round:>2}: {}: {:.0} MiB/s, {:.2} CPU-s per GiB",
            r.0,
            (bytes >> 20) as f64 / r.1.seconds,
            r.1.cpu_seconds / args.gib as f64
        );
    }
    let total = |rounds: &[Round]| {
        let seconds: f64 = rounds.iter().map(|r| r.seconds).sum();
        let cpu: f64 = rounds.iter().map(|r| r.cpu_seconds).sum();
        let gib = (args.gib * rounds.len() as u64) as f64;
        (gib * 1024.0 / seconds, cpu / gib)
    };
    let (plain_rate, plain_cpu) = total(&plain);
    let (tunnel_rate, tunnel_cpu) = total(&tunnel);
    println!("\n| path | throughput | vs plain TCP | CPU-s per GiB |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| plain loopback TCP (writer -> reader) | {plain_rate:.0} MiB/s | 1.00 | {plain_cpu:.2} |"
    );
    println!(
        "| agents' TLS tunnel (writer -> unix -> agent -> TLS -> agent -> unix -> reader) | {tunnel_rate:.0} MiB/s | {:.2} | {tunnel_cpu:.2} |",
        tunnel_rate / plain_rate
    );
    println!(
        "\nthe tunnel's own cost: {:.2} CPU-s per GiB (both agents' halves)",
        tunnel_cpu - plain_cpu
    );
    Ok(())
}

/// Writes `bytes` of `chunk` repeated into `out`, then closes it.
fn write_all(mut out: impl std::io::Write, bytes: u64, chunk: &[u8]) -> std::io::Result<()> {
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    out.flush()
}

/// Reads `input` to its end; returns how many bytes came.
fn drain(mut input: impl std::io::Read) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match input.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

/// Runs the writer and the reader on their own threads (they stand for the two QEMUs) and
/// measures the whole process's CPU from the first byte to the last.
async fn timed(
    bytes: u64,
    writer: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    reader: impl FnOnce() -> std::io::Result<u64> + Send + 'static,
) -> anyhow::Result<Round> {
    let pid = std::process::id();
    let cpu0 = process_cpu_seconds(pid)?;
    let started = Instant::now();
    let reading = std::thread::spawn(reader);
    let writing = std::thread::spawn(writer);
    let joined = tokio::task::spawn_blocking(move || (writing.join(), reading.join()));
    let (written, read) = tokio::time::timeout(ROUND_TIMEOUT, joined)
        .await
        .context("a round did not finish in time")??;
    let seconds = started.elapsed().as_secs_f64();
    written
        .map_err(|_| anyhow::anyhow!("the writer panicked"))?
        .context("writing")?;
    let got = read
        .map_err(|_| anyhow::anyhow!("the reader panicked"))?
        .context("reading")?;
    ensure!(got == bytes, "{got} of {bytes} bytes arrived");
    Ok(Round {
        seconds,
        cpu_seconds: process_cpu_seconds(pid)? - cpu0,
    })
}

async fn plain_round(bytes: u64, chunk: &[u8]) -> anyhow::Result<Round> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let chunk = chunk.to_vec();
    timed(
        bytes,
        move || {
            let tcp = std::net::TcpStream::connect(addr)?;
            write_all(&tcp, bytes, &chunk)?;
            tcp.shutdown(std::net::Shutdown::Write)
        },
        move || drain(listener.accept()?.0),
    )
    .await
}

async fn tunnel_round(
    source: &AgentIdentity,
    target: &AgentIdentity,
    dir: &Path,
    bytes: u64,
    chunk: &[u8],
) -> anyhow::Result<Round> {
    let endpoint = SyncEndpoint::new(target)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = listener.local_addr()?.to_string();
    let (_stop, stopped) = watch::channel(false);
    let serving = tokio::spawn(endpoint.clone().serve(listener, stopped));
    let migration = MigrationId::new();
    let sink = dir.join(format!("{migration}-sink.sock"));
    let sink_listener = std::os::unix::net::UnixListener::bind(&sink)?;
    let (control, _control_rx) = mpsc::channel(1);
    let (_sockets_tx, sockets) = watch::channel(Some(ReceiverSockets {
        disk: sink.clone(),
        memory: sink.clone(),
    }));
    endpoint.expect(
        migration,
        Expected {
            source_cluster: ClusterName::new("east-1")?,
            sockets,
            control,
        },
    );
    let dialer = PeerDialer::new(source, &url, &ClusterName::new("west-1")?, migration)?;
    let tunnel = LocalTunnel::start(
        &dir.join(format!("{migration}-tunnel.sock")),
        dialer,
        SyncChannel::Memory,
    )?;
    let entry = tunnel.path().to_owned();
    let chunk = chunk.to_vec();
    let round = timed(
        bytes,
        move || {
            // The socket the sending agent connects and hands its QEMU.
            let unix = std::os::unix::net::UnixStream::connect(entry)?;
            drover_agent::local_socket::widen(&unix);
            write_all(&unix, bytes, &chunk)?;
            unix.shutdown(std::net::Shutdown::Write)
        },
        move || drain(sink_listener.accept()?.0),
    )
    .await;
    drop(tunnel);
    endpoint.forget(&migration);
    serving.abort();
    let _ = std::fs::remove_file(&sink);
    round
}
