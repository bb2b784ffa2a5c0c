//! The agent's sync controller: its endpoint, where receiving sides of migrations wait for their
//! sender, and the client side that opens tunnelled channels to a peer agent. Both ends
//! authenticate with hub-issued certificates (mutual TLS); a receiver accepts a channel only for a
//! migration it expects and only from the source cluster named for that migration. QEMU never
//! talks to the network: each channel is spliced to a local unix socket on both sides.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_shared::identity::cluster_of_certificate;
use drover_shared::migration::{SyncChannel, SyncHello, SyncReply};
use drover_shared::{ClusterName, MigrationId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{mpsc, watch};

use crate::identity::{provider, AgentIdentity, IdentityError};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest hello or reply line.
const MAX_LINE: usize = 4096;
/// Reads from the TCP socket under TLS go through a buffer this large: rustls asks for 4 KiB
/// at a time, which unbuffered is a system call per 4 KiB of a migration.
const TLS_READ_BUFFER: usize = 256 << 10;
/// Each direction of a spliced channel moves up to this much per read and write (many TLS
/// records per system call instead of one per 8 KiB).
const SPLICE_BUFFER: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot reach the peer agent at {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("the peer agent at {url} refused the {channel:?} channel of migration {migration}: {reason}")]
    Refused {
        url: String,
        channel: SyncChannel,
        migration: MigrationId,
        reason: String,
    },
    #[error("the sync channel broke: {0}")]
    Broken(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// Any byte stream a channel runs over.
pub trait ChannelStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ChannelStream for T {}
pub type BoxedStream = Box<dyn ChannelStream>;

/// The receiving QEMU's local sockets, once it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverSockets {
    /// Its NBD server (all disks, one export per disk).
    pub disk: PathBuf,
    /// Its incoming migration stream.
    pub memory: PathBuf,
}

/// What a receiving side waits for.
pub struct Expected {
    pub source_cluster: ClusterName,
    /// None until the receiving VM runs (it is created when the sender describes it).
    pub sockets: watch::Receiver<Option<ReceiverSockets>>,
    /// Control channels from the sender are handed over here.
    pub control: mpsc::Sender<BoxedStream>,
}

/// The sync endpoint of this agent.
pub struct SyncEndpoint {
    config: Arc<rustls::ServerConfig>,
    expected: Mutex<HashMap<MigrationId, Expected>>,
}

/// The agents' channels speak TLS 1.3 only (both ends are Drover agents) and prefer
/// AES-128-GCM: a migration's gigabytes are encrypted and decrypted once each, and AES-128 does
/// that in about 70 % of AES-256's time (10 rounds instead of 14) at a strength TLS 1.3 makes
/// mandatory. The other TLS 1.3 suites stay acceptable.
fn channel_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

impl SyncEndpoint {
    pub fn new(identity: &AgentIdentity) -> Result<Arc<Self>, SyncError> {
        let (roots, chain, key) = identity.tls_material()?;
        let corrupt = |e: &dyn std::fmt::Display| IdentityError::Corrupt(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| corrupt(&e))?;
        let config = rustls::ServerConfig::builder_with_provider(channel_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| corrupt(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| corrupt(&e))?;
        Ok(Arc::new(Self {
            config: Arc::new(config),
            expected: Mutex::default(),
        }))
    }

    /// From now on, channels of `migration` from its source cluster are accepted.
    pub fn expect(&self, migration: MigrationId, expected: Expected) {
        self.lock().insert(migration, expected);
    }

    /// No more channels for `migration` (done, cancelled or failed).
    pub fn forget(&self, migration: &MigrationId) {
        self.lock().remove(migration);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MigrationId, Expected>> {
        self.expected.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts channels on `listener` until `shutdown` turns true; each connection is handled
    /// by its own task, which ends with its connection.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config.clone());
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "sync endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
            };
            let endpoint = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Err(reason) = endpoint.handle(acceptor, tcp).await {
                    tracing::warn!(%peer, %reason, "sync endpoint: channel refused");
                }
            });
        }
    }

    async fn handle(
        &self,
        acceptor: tokio_rustls::TlsAcceptor,
        tcp: TcpStream,
    ) -> Result<(), String> {
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            acceptor.accept(BufReader::with_capacity(TLS_READ_BUFFER, tcp)),
        )
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|e| format!("TLS handshake refused: {e}"))?;
        let peer_cluster = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no client certificate")
            .and_then(|c| cluster_of_certificate(c).map_err(|_| "no cluster identity"))?;
        let mut stream = BufReader::new(tls);
        let hello: SyncHello = read_line(&mut stream).await?;
        let target = {
            let expected = self.lock();
            match expected.get(&hello.migration_id) {
                None => Err(format!(
                    "no migration {} is expected here (finished, cancelled, or never prepared)",
                    hello.migration_id
                )),
                Some(e) if e.source_cluster != peer_cluster => Err(format!(
                    "migration {} accepts only its source cluster {}, not {peer_cluster}",
                    hello.migration_id, e.source_cluster
                )),
                Some(e) => {
                    let sockets = e.sockets.borrow().clone();
                    match (hello.channel, sockets) {
                        (SyncChannel::Control, _) => Ok(Target::Control(e.control.clone())),
                        (SyncChannel::Disk, Some(s)) => Ok(Target::Socket(s.disk)),
                        (SyncChannel::Memory, Some(s)) => Ok(Target::Socket(s.memory)),
                        (channel, None) => Err(format!(
                            "the receiving VM of migration {} is not prepared yet; open {channel:?} after Prepared",
                            hello.migration_id
                        )),
                    }
                }
            }
        };
        let target = match target {
            Ok(t) => t,
            Err(reason) => {
                let _ = write_line(
                    &mut stream,
                    &SyncReply {
                        accepted: false,
                        reason: Some(reason.clone()),
                    },
                )
                .await;
                return Err(format!("{reason} (peer cluster {peer_cluster})"));
            }
        };
        let local = match &target {
            Target::Socket(path) => Some(
                tokio::time::timeout(CONNECT_TIMEOUT, crate::local_socket::connect(path))
                    .await
                    .map_err(|_| format!("connecting {} timed out", path.display()))
                    .and_then(|r| {
                        r.map_err(|e| format!("cannot connect {}: {e}", path.display()))
                    })?,
            ),
            Target::Control(_) => None,
        };
        write_line(
            &mut stream,
            &SyncReply {
                accepted: true,
                reason: None,
            },
        )
        .await?;
        match (target, local) {
            (Target::Control(tx), _) => tx
                .send(Box::new(stream))
                .await
                .map_err(|_| "the migration no longer listens".to_owned()),
            (Target::Socket(_), Some(mut local)) => {
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut stream,
                    &mut local,
                    SPLICE_BUFFER,
                    SPLICE_BUFFER,
                )
                .await;
                Ok(())
            }
            (Target::Socket(_), None) => Ok(()),
        }
    }
}

enum Target {
    Control(mpsc::Sender<BoxedStream>),
    Socket(PathBuf),
}

async fn read_line<T: serde::de::DeserializeOwned>(
    stream: &mut (impl tokio::io::AsyncBufRead + Unpin),
) -> Result<T, String> {
    let mut line = String::new();
    let mut limited = AsyncReadExt::take(stream, MAX_LINE as u64);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, limited.read_line(&mut line))
        .await
        .map_err(|_| "no hello in time".to_owned())?
        .map_err(|e| format!("reading the hello failed: {e}"))?;
    serde_json::from_str(line.trim()).map_err(|e| format!("unreadable hello: {e}"))
}

async fn write_line<T: serde::Serialize>(
    stream: &mut (impl AsyncWrite + Unpin),
    value: &T,
) -> Result<(), String> {
    let mut line = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| format!("writing failed: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("writing failed: {e}"))
}

/// Verifies a peer agent's server certificate: issued by the hub's CA (like any agent
/// certificate) and naming exactly the cluster expected on the other side of this migration.
/// Host names are not checked: a peer is who its certificate says, wherever it is reached.
#[derive(Debug)]
struct PeerAgentVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    expected: ClusterName,
}

impl ServerCertVerifier for PeerAgentVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let cluster = cluster_of_certificate(end_entity).map_err(rustls::Error::General)?;
        if cluster != self.expected {
            return Err(rustls::Error::General(format!(
                "the peer agent is cluster {cluster}, not the expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// How this agent dials peer agents for one migration.
#[derive(Clone)]
pub struct PeerDialer {
    config: Arc<rustls::ClientConfig>,
    url: String,
    migration: MigrationId,
}

impl PeerDialer {
    /// Dials `connect_url` (host:port, optionally with a scheme) expecting `target_cluster`.
    pub fn new(
        identity: &AgentIdentity,
        connect_url: &str,
        target_cluster: &ClusterName,
        migration: MigrationId,
    ) -> Result<Self, SyncError> {
        let (roots, chain, key) = identity.tls_material()?;
        let corrupt = |e: &dyn std::fmt::Display| IdentityError::Corrupt(e.to_string());
        let chain_verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| corrupt(&e))?;
        let config = rustls::ClientConfig::builder_with_provider(channel_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| corrupt(&e))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerAgentVerifier {
                chain: chain_verifier,
                expected: target_cluster.clone(),
            }))
            .with_client_auth_cert(chain, key)
            .map_err(|e| corrupt(&e))?;
        let url = connect_url
            .trim_start_matches("https://")
            .trim_start_matches("tls://")
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            config: Arc::new(config),
            url,
            migration,
        })
    }

    /// Opens one channel: TLS to the peer, hello, and its answer.
    pub async fn open(&self, channel: SyncChannel) -> Result<BoxedStream, SyncError> {
        let connect = |detail: String| SyncError::Connect {
            url: self.url.clone(),
            detail,
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.url))
            .await
            .map_err(|_| connect("timed out".into()))?
            .map_err(|e| connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        // The name is not checked (see PeerAgentVerifier); any valid one will do.
        let name = ServerName::try_from("drover-agent").expect("a valid DNS name");
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            connector.connect(name, BufReader::with_capacity(TLS_READ_BUFFER, tcp)),
        )
        .await
        .map_err(|_| connect("TLS handshake timed out".into()))?
        .map_err(|e| connect(format!("TLS handshake failed: {e}")))?;
        let mut stream = BufReader::new(tls);
        write_line(
            &mut stream,
            &SyncHello {
                migration_id: self.migration,
                channel,
            },
        )
        .await
        .map_err(SyncError::Broken)?;
        let reply: SyncReply = read_line(&mut stream).await.map_err(SyncError::Broken)?;
        if !reply.accepted {
            return Err(SyncError::Refused {
                url: self.url.clone(),
                channel,
                migration: self.migration,
                reason: reply.reason.unwrap_or_default(),
            });
        }
        Ok(Box::new(stream))
    }
}

/// A local unix socket whose every connection is tunnelled to one channel of the peer agent.
/// The accept task belongs to the tunnel: dropping it stops accepting, ends open connections
/// and removes the socket file.
pub struct LocalTunnel {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl LocalTunnel {
    pub fn start(path: &Path, dialer: PeerDialer, channel: SyncChannel) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut local, _)) = accepted else { return };
                        crate::local_socket::widen(&local);
                        let dialer = dialer.clone();
                        connections.spawn(async move {
                            match dialer.open(channel).await {
                                Ok(mut remote) => {
                                    let _ = tokio::io::copy_bidirectional_with_sizes(&mut local, &mut remote, SPLICE_BUFFER, SPLICE_BUFFER).await;
                                }
                                Err(e) => tracing::warn!(error = %e, ?channel, "tunnel: cannot open the channel"),
                            }
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(Self {
            path: path.to_owned(),
            task,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LocalTunnel {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}
