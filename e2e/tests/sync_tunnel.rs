//! The agents' sync controller over real mutual TLS with hub-issued certificates: a receiver
//! accepts a migration's channels only from the source cluster named for it, only for a
//! migration it expects, and splices accepted channels to the receiving side's local sockets;
//! a sender refuses a peer whose certificate names another cluster.

use std::time::Duration;

use drover_agent::identity::AgentIdentity;
use drover_agent::sync::{Expected, LocalTunnel, PeerDialer, ReceiverSockets, SyncEndpoint};
use drover_e2e::agents::join;
use drover_e2e::testbed::AgentEndpoint;
use drover_shared::migration::SyncChannel;
use drover_shared::{ClusterName, MigrationId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

async fn identity(e: &AgentEndpoint, cluster: &str, dir: &std::path::Path) -> AgentIdentity {
    join(&e.hub, &e.base, cluster, dir).await;
    AgentIdentity::load(dir).unwrap()
}

/// A unix socket that echoes what it gets, like a receiving QEMU's socket would consume it.
fn echo_socket(path: &std::path::Path) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_reach_only_the_expected_migration_from_its_source() {
    let e = AgentEndpoint::start("sync_tunnel", None).await.unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let source = identity(&e, "east-1", dirs[0].path()).await;
    let target = identity(&e, "west-1", dirs[1].path()).await;
    let stranger = identity(&e, "north-1", dirs[2].path()).await;
    let west = ClusterName::new("west-1").unwrap();

    let endpoint = SyncEndpoint::new(&target).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = listener.local_addr().unwrap().to_string();
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(endpoint.clone().serve(listener, stopped));

    let migration = MigrationId::new();
    let (control_tx, mut control_rx) = mpsc::channel(1);
    let (sockets_tx, sockets_rx) = watch::channel(None);
    endpoint.expect(
        migration,
        Expected {
            source_cluster: ClusterName::new("east-1").unwrap(),
            sockets: sockets_rx,
            control: control_tx,
        },
    );

    // The source's control channel is handed to the receiving side.
    let dialer = PeerDialer::new(&source, &url, &west, migration).unwrap();
    let mut control = dialer.open(SyncChannel::Control).await.unwrap();
    let mut received = tokio::time::timeout(Duration::from_secs(60), control_rx.recv())
        .await
        .unwrap()
        .unwrap();
    control.write_all(b"hello\n").await.unwrap();
    control.flush().await.unwrap();
    let mut buf = [0u8; 6];
    received.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello\n");

    // Data channels wait until the receiving VM exists.
    let err = dialer
        .open(SyncChannel::Disk)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not prepared yet"), "{err}");

    // Then they are spliced to its local sockets, through a local tunnel on the source side.
    let sockets_dir = tempfile::tempdir().unwrap();
    let disk = sockets_dir.path().join("nbd.sock");
    let _echo = echo_socket(&disk);
    sockets_tx
        .send(Some(ReceiverSockets {
            disk: disk.clone(),
            memory: sockets_dir.path().join("memory.sock"),
        }))
        .unwrap();
    let tunnel = LocalTunnel::start(
        &sockets_dir.path().join("tunnel.sock"),
        dialer.clone(),
        SyncChannel::Disk,
    )
    .unwrap();
    let mut local = tokio::net::UnixStream::connect(tunnel.path())
        .await
        .unwrap();
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = local.split();
    let write = async {
        w.write_all(&payload).await.unwrap();
    };
    let mut echoed = vec![0u8; payload.len()];
    let read = async {
        r.read_exact(&mut echoed).await.unwrap();
    };
    // Generous: only a tunnel that loses bytes (or hangs) takes this long.
    tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(write, read) })
        .await
        .expect("256 KiB through the tunnel and back");
    assert_eq!(
        echoed, payload,
        "bytes arrive intact through the TLS tunnel"
    );
    let path = tunnel.path().to_owned();
    drop(tunnel);
    assert!(!path.exists(), "a dropped tunnel removes its socket");

    // Another cluster's certificate is refused for this migration.
    let intruder = PeerDialer::new(&stranger, &url, &west, migration).unwrap();
    let err = intruder
        .open(SyncChannel::Control)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("accepts only its source cluster east-1"),
        "{err}"
    );

    // An unknown migration is refused.
    let unknown = PeerDialer::new(&source, &url, &west, MigrationId::new()).unwrap();
    let err = unknown
        .open(SyncChannel::Control)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is expected here"), "{err}");

    // The sender refuses a peer that is not the expected target cluster.
    let wrong_target = PeerDialer::new(
        &source,
        &url,
        &ClusterName::new("south-1").unwrap(),
        migration,
    )
    .unwrap();
    let err = wrong_target
        .open(SyncChannel::Control)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not the expected south-1"), "{err}");

    // A forgotten migration accepts nothing more.
    endpoint.forget(&migration);
    let err = dialer
        .open(SyncChannel::Control)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is expected here"), "{err}");
}
