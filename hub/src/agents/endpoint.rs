//! The agent endpoint: HTTPS on its own port, client certificates verified against the hub's
//! CA. `POST /agent/v1/join` redeems a join token for a certificate (no client certificate yet);
//! every other route authenticates the certificate's cluster and checks it is still valid.
//! Plain TCP, unknown CAs, expired and forged certificates never get past the TLS handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_shared::identity::{cluster_of_certificate, serial_of_certificate};
use drover_shared::ClusterName;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::agents::identity::{Identities, JoinError, Joined};
use crate::agents::sessions::Sessions;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more wait in the kernel's accept queue.
const MAX_PENDING_HANDSHAKES: usize = 512;

/// Who is on the other end of an agent connection.
#[derive(Debug, Clone)]
pub struct AgentPeer {
    pub addr: SocketAddr,
    /// The verified client certificate, if the client presented one.
    pub certificate: Option<CertificateDer<'static>>,
}

/// A listener whose connections are TLS streams; handshakes run concurrently, each bounded in
/// time, in a task this listener owns.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, AgentPeer)>,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
        let acceptor_task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(10);
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(conn) => {
                        backoff = Duration::from_millis(10);
                        conn
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "agent endpoint: accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let certificate = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| c.clone().into_owned());
                            let _ = tx.send((tls, AgentPeer { addr, certificate })).await;
                        }
                        Ok(Err(e)) => {
                            let reason = handshake_refusal_reason(&e);
                            tracing::warn!(peer = %addr, error = %e, "agent endpoint: TLS handshake refused: {reason}");
                        }
                        Err(_) => {
                            tracing::warn!(peer = %addr, "agent endpoint: TLS handshake timed out");
                        }
                    }
                });
            }
        });
        Ok(Self {
            local,
            ready,
            acceptor_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = AgentPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The acceptor task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(AgentPeer {
            addr: self.local,
            certificate: None,
        })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for AgentPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

#[derive(Clone)]
struct AgentState {
    identities: Identities,
    sessions: Sessions,
}

pub fn router(identities: Identities, sessions: Sessions) -> Router {
    Router::new()
        .route("/agent/v1/join", post(join))
        .route("/agent/v1/identity", get(identity))
        .route("/agent/v1/renew", post(renew))
        .route(drover_shared::protocol::SESSION_PATH, get(session))
        .with_state(AgentState {
            identities,
            sessions,
        })
}

/// Serves the agent endpoint on `listener`, and sweeps for silent clusters, until `shutdown`
/// resolves.
pub async fn serve(
    listener: TlsListener,
    identities: Identities,
    sessions: Sessions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_sweep, swept) = tokio::sync::oneshot::channel::<()>();
    let sweeper = {
        let sessions = sessions.clone();
        tokio::spawn(async move {
            sessions
                .sweep(async {
                    let _ = swept.await;
                })
                .await
        })
    };
    let served = axum::serve(
        listener,
        router(identities, sessions).into_make_service_with_connect_info::<AgentPeer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    let _ = stop_sweep.send(());
    let _ = sweeper.await;
    served
}

/// Opens an agent session: the certificate is checked before the WebSocket is accepted.
async fn session(
    State(state): State<AgentState>,
    ConnectInfo(peer): ConnectInfo<AgentPeer>,
    upgrade: WebSocketUpgrade,
) -> Response {
    match authenticate(&state.identities, &peer).await {
        Ok(cluster) => state.sessions.accept(upgrade, cluster),
        Err(e) => auth_refusal(&peer, e),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub cluster: String,
    pub token: String,
    /// PEM certificate signing request made with the agent's own key.
    pub csr: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    /// PEM client certificate whose identity is the cluster.
    pub certificate: String,
    /// PEM CA certificate to trust the hub by from now on.
    pub ca: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AgentError {
    pub code: String,
    pub message: String,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(AgentError {
            code: code.into(),
            message: message.into(),
        }),
    )
        .into_response()
}

async fn join(
    State(state): State<AgentState>,
    ConnectInfo(peer): ConnectInfo<AgentPeer>,
    body: axum::body::Bytes,
) -> Response {
    let req: JoinRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("join request is not JSON {{cluster, token, csr}}: {e}"),
            )
        }
    };
    let cluster = match ClusterName::new(req.cluster) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, "INVALID_NAME", e.to_string()),
    };
    match state.identities.join(&cluster, &req.token, &req.csr).await {
        Ok(Joined { issued, revoked }) => {
            if revoked > 0 {
                // The replaced agent's session ends; its certificates no longer connect.
                state
                    .sessions
                    .end(&cluster, "its identity was replaced by a new agent's join");
                if let Err(e) = crate::store::clusters::audit(
                    state.identities.store(),
                    &format!("agent:{cluster}"),
                    "replaceAgentIdentity",
                    cluster.as_str(),
                    "ok",
                    serde_json::json!({"revokedCertificates": revoked, "serial": issued.serial, "peer": peer.addr.to_string()}),
                )
                .await
                {
                    tracing::error!(error = %e, %cluster, "writing the audit log failed");
                }
            }
            Json(JoinResponse {
                certificate: issued.pem,
                ca: state.identities.pki().ca_pem().to_owned(),
            })
            .into_response()
        }
        Err(e @ JoinError::TokenRefused) => {
            tracing::warn!(peer = %peer.addr, %cluster, "join refused");
            error(StatusCode::UNAUTHORIZED, "TOKEN_REFUSED", e.to_string())
        }
        Err(e @ JoinError::Csr(_)) => error(StatusCode::BAD_REQUEST, "BAD_CSR", e.to_string()),
        Err(JoinError::Store(e)) => {
            tracing::error!(error = %e, "join failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the hub cannot record the join now; retry",
            )
        }
    }
}

/// Why an agent connection is not allowed to speak for a cluster.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no client certificate: join first (drover-agent --join-token)")]
    NoCertificate,
    #[error("client certificate has no usable cluster identity: {0}")]
    NoIdentity(String),
    #[error("client certificate {serial} for cluster {cluster} is revoked or unknown to this hub; join again with a new token")]
    Revoked {
        cluster: ClusterName,
        serial: String,
    },
    #[error("the hub cannot check certificates now; retry")]
    Unavailable,
}

/// What a refused handshake means, in an operator's words.
fn handshake_refusal_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return "the connection broke during the handshake";
    };
    match tls {
        Error::InvalidMessage(_) => {
            "the client does not speak TLS (plain TCP?); agents must use https://"
        }
        Error::NoCertificatesPresented => {
            "no client certificate; agents join first (drover-agent join) and then present it"
        }
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the client certificate has expired; the agent must join again with a new token",
        Error::InvalidCertificate(
            CertificateError::BadSignature
            | CertificateError::UnknownIssuer
            | CertificateError::BadEncoding,
        ) => "the client certificate was not issued by this hub's CA (another CA, or forged)",
        Error::InvalidCertificate(_) => "the client certificate is not acceptable",
        _ => "TLS negotiation failed",
    }
}

/// The cluster this connection speaks for: from the verified certificate, if the hub issued it
/// and has not revoked it.
pub async fn authenticate(
    identities: &Identities,
    peer: &AgentPeer,
) -> Result<ClusterName, AuthError> {
    let cert = peer.certificate.as_ref().ok_or(AuthError::NoCertificate)?;
    let cluster = cluster_of_certificate(cert).map_err(AuthError::NoIdentity)?;
    let serial = serial_of_certificate(cert).map_err(AuthError::NoIdentity)?;
    match identities.certificate_is_valid(&serial, &cluster).await {
        Ok(true) => Ok(cluster),
        Ok(false) => Err(AuthError::Revoked { cluster, serial }),
        Err(e) => {
            tracing::error!(error = %e, "certificate check failed");
            Err(AuthError::Unavailable)
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RenewRequest {
    /// PEM certificate signing request made with the agent's new key.
    pub csr: String,
}

fn auth_refusal(peer: &AgentPeer, e: AuthError) -> Response {
    tracing::warn!(peer = %peer.addr, error = %e, "agent refused");
    let status = match e {
        AuthError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        AuthError::NoCertificate => StatusCode::UNAUTHORIZED,
        _ => StatusCode::FORBIDDEN,
    };
    error(status, "UNAUTHENTICATED", e.to_string())
}

/// Renews an authenticated agent's certificate for the same cluster.
async fn renew(
    State(state): State<AgentState>,
    ConnectInfo(peer): ConnectInfo<AgentPeer>,
    body: axum::body::Bytes,
) -> Response {
    let cluster = match authenticate(&state.identities, &peer).await {
        Ok(c) => c,
        Err(e) => return auth_refusal(&peer, e),
    };
    let req: RenewRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "BAD_REQUEST",
                format!("renew request is not JSON {{csr}}: {e}"),
            )
        }
    };
    match state.identities.renew(&cluster, &req.csr).await {
        Ok(issued) => Json(JoinResponse {
            certificate: issued.pem,
            ca: state.identities.pki().ca_pem().to_owned(),
        })
        .into_response(),
        Err(e @ JoinError::Csr(_)) => error(StatusCode::BAD_REQUEST, "BAD_CSR", e.to_string()),
        Err(e) => {
            tracing::error!(error = %e, "renewal failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the hub cannot renew now; retry",
            )
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct IdentityResponse {
    pub cluster: String,
}

/// Tells an agent which cluster its certificate speaks for (a connectivity and identity check).
async fn identity(
    State(state): State<AgentState>,
    ConnectInfo(peer): ConnectInfo<AgentPeer>,
) -> Response {
    match authenticate(&state.identities, &peer).await {
        Ok(cluster) => Json(IdentityResponse {
            cluster: cluster.to_string(),
        })
        .into_response(),
        Err(e) => auth_refusal(&peer, e),
    }
}
