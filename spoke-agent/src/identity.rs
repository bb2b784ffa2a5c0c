//! The agent's identity: its own key (never leaves the machine), the certificate the hub signed
//! for its cluster, and the hub's CA, all kept in the data directory (key and certificate 0600).
//! Joining happens once, with a one-time token that also pins the hub's CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover_shared::identity::{cluster_of_certificate, validity_of_certificate, PinnedCaVerifier};
use drover_shared::ClusterName;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

const KEY_FILE: &str = "agent-key.pem";
const CERT_FILE: &str = "agent-cert.pem";
const CA_FILE: &str = "hub-ca.pem";
/// The prefix of every join token the hub issues.
const TOKEN_PREFIX: &str = "drover-join.";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the join token is malformed: expected drover-join.<secret>.<CA SHA-256> as createJoinToken returned it")]
    MalformedToken,
    #[error("{0} already holds an identity; use it (drover-agent check) or remove the directory to join again")]
    AlreadyJoined(PathBuf),
    #[error("{dir} holds no identity yet; join first: drover-agent join --hub URL --cluster NAME --join-token TOKEN")]
    NotJoined { dir: PathBuf },
    #[error("cannot reach the hub at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the hub refused: {0}")]
    Refused(String),
    #[error("the stored identity is unusable: {0}; remove the data directory and join again")]
    Corrupt(String),
}

/// What the agent holds once joined.
pub struct AgentIdentity {
    pub cluster: ClusterName,
    pub ca_pem: String,
    pub cert_pem: String,
    key_pem: String,
}

#[derive(Serialize)]
struct JoinRequest<'a> {
    cluster: &'a str,
    token: &'a str,
    csr: &'a str,
}

#[derive(Deserialize)]
struct JoinResponse {
    certificate: String,
    ca: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn write_private(path: &Path, contents: &str) -> Result<(), IdentityError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(contents.as_bytes()).map_err(io(path))
}

async fn refusal(resp: reqwest::Response) -> IdentityError {
    let status = resp.status();
    let message = resp
        .json::<ErrorBody>()
        .await
        .map(|b| b.message)
        .unwrap_or_else(|_| format!("HTTP {status}"));
    IdentityError::Refused(message)
}

impl AgentIdentity {
    /// Joins the hub at `hub` as `cluster` with a one-time `token`, and stores the identity.
    pub async fn join(
        data_dir: &Path,
        hub: &str,
        cluster: &ClusterName,
        token: &str,
    ) -> Result<Self, IdentityError> {
        if data_dir.join(CERT_FILE).exists() {
            return Err(IdentityError::AlreadyJoined(data_dir.to_owned()));
        }
        let pin = token
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|rest| rest.rsplit_once('.'))
            .map(|(_, pin)| pin)
            .filter(|pin| pin.len() == 64)
            .ok_or(IdentityError::MalformedToken)?;
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Corrupt(e.to_string()))?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| IdentityError::Corrupt(e.to_string()))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| IdentityError::Corrupt(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(pin, provider())))
            .with_no_client_auth();
        let client = http_client(tls)?;
        let url = format!("{}/agent/v1/join", hub.trim_end_matches('/'));
        let request = client.post(&url).json(&JoinRequest {
            cluster: cluster.as_str(),
            token: token.trim(),
            csr: &csr,
        });
        let joined: JoinResponse = call(request, &url).await?;
        let identity = Self {
            cluster: cluster.clone(),
            ca_pem: joined.ca,
            cert_pem: joined.certificate,
            key_pem: key.serialize_pem(),
        };
        identity.check_names(cluster)?;
        std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        write_private(&data_dir.join(KEY_FILE), &identity.key_pem)?;
        std::fs::write(data_dir.join(CA_FILE), &identity.ca_pem).map_err(io(data_dir))?;
        // The certificate last: its presence means the identity is complete.
        write_private(&data_dir.join(CERT_FILE), &identity.cert_pem)?;
        Ok(identity)
    }

    /// Loads the identity a previous join stored, finishing a renewal a crash interrupted.
    pub fn load(data_dir: &Path) -> Result<Self, IdentityError> {
        finish_pending_renewal(data_dir)?;
        let read = |name: &str| {
            let path = data_dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    IdentityError::NotJoined {
                        dir: data_dir.to_owned(),
                    }
                } else {
                    IdentityError::Io { path, source: e }
                }
            })
        };
        let cert_pem = read(CERT_FILE)?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| IdentityError::Corrupt(e.to_string()))?;
        let cluster = cluster_of_certificate(&der).map_err(IdentityError::Corrupt)?;
        Ok(Self {
            cluster,
            cert_pem,
            ca_pem: read(CA_FILE)?,
            key_pem: read(KEY_FILE)?,
        })
    }

    /// Whether two thirds of the certificate's lifetime have passed: time to renew.
    pub fn renewal_due(&self) -> bool {
        let Ok(der) = CertificateDer::from_pem_slice(self.cert_pem.as_bytes()) else {
            return true;
        };
        match validity_of_certificate(&der) {
            Ok((not_before, not_after)) => {
                let renew_at = not_before + (not_after - not_before) * 2 / 3;
                chrono::Utc::now().timestamp() >= renew_at
            }
            Err(_) => true,
        }
    }

    /// Gets a fresh certificate (with a new key) for the same cluster and stores it; the new
    /// files replace the old ones only once both are complete.
    pub async fn renew(&mut self, data_dir: &Path, hub: &str) -> Result<(), IdentityError> {
        #[derive(Serialize)]
        struct RenewRequest<'a> {
            csr: &'a str,
        }
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Corrupt(e.to_string()))?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| IdentityError::Corrupt(e.to_string()))?;
        let client = http_client(self.client_config()?)?;
        let url = format!("{}/agent/v1/renew", hub.trim_end_matches('/'));
        let renewed: JoinResponse =
            call(client.post(&url).json(&RenewRequest { csr: &csr }), &url).await?;
        let next = Self {
            cluster: self.cluster.clone(),
            ca_pem: renewed.ca,
            cert_pem: renewed.certificate,
            key_pem: key.serialize_pem(),
        };
        next.check_names(&self.cluster)?;
        let pending = |name: &str| data_dir.join(format!("{name}.new"));
        write_private(&pending(KEY_FILE), &next.key_pem)?;
        let staged = data_dir.join(format!("{CERT_FILE}.staged"));
        write_private(&staged, &next.cert_pem)?;
        // The certificate's .new file appearing is the moment the renewal counts as written.
        std::fs::rename(&staged, pending(CERT_FILE)).map_err(io(&staged))?;
        finish_pending_renewal(data_dir)?;
        *self = next;
        Ok(())
    }

    fn check_names(&self, cluster: &ClusterName) -> Result<(), IdentityError> {
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| IdentityError::Corrupt(e.to_string()))?;
        let named = cluster_of_certificate(&der).map_err(IdentityError::Corrupt)?;
        if &named != cluster {
            return Err(IdentityError::Refused(format!(
                "the hub issued a certificate for {named}, not {cluster}"
            )));
        }
        Ok(())
    }

    /// TLS that trusts only the hub's CA and presents this agent's certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, IdentityError> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .map_err(|e| IdentityError::Corrupt(e.to_string()))?;
        roots
            .add(ca)
            .map_err(|e| IdentityError::Corrupt(e.to_string()))?;
        let chain = vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| IdentityError::Corrupt(e.to_string()))?];
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| IdentityError::Corrupt(e.to_string()))?;
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| IdentityError::Corrupt(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| IdentityError::Corrupt(e.to_string()))
    }

    /// The hub's CA as a root store, this agent's certificate chain and its key: what the
    /// agent-to-agent sync channel authenticates with.
    pub fn tls_material(
        &self,
    ) -> Result<
        (
            rustls::RootCertStore,
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
        ),
        IdentityError,
    > {
        let corrupt = |e: &dyn std::fmt::Display| IdentityError::Corrupt(e.to_string());
        let mut roots = rustls::RootCertStore::empty();
        let ca = CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).map_err(|e| corrupt(&e))?;
        roots.add(ca).map_err(|e| corrupt(&e))?;
        let chain =
            vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
                .map_err(|e| corrupt(&e))?];
        let key =
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| corrupt(&e))?;
        Ok((roots, chain, key))
    }

    /// Asks the hub which cluster this identity speaks for (mutual TLS).
    pub async fn check(&self, hub: &str) -> Result<ClusterName, IdentityError> {
        #[derive(Deserialize)]
        struct Identity {
            cluster: String,
        }
        let client = http_client(self.client_config()?)?;
        let url = format!("{}/agent/v1/identity", hub.trim_end_matches('/'));
        let who: Identity = call(client.get(&url), &url).await?;
        ClusterName::new(who.cluster).map_err(|e| IdentityError::Refused(e.to_string()))
    }
}

/// Moves a completely written renewal into place: key first, then certificate. A renewal whose
/// certificate never got written is dropped, so key and certificate always match.
fn finish_pending_renewal(data_dir: &Path) -> Result<(), IdentityError> {
    let key_new = data_dir.join(format!("{KEY_FILE}.new"));
    let cert_new = data_dir.join(format!("{CERT_FILE}.new"));
    if cert_new.exists() {
        if key_new.exists() {
            std::fs::rename(&key_new, data_dir.join(KEY_FILE)).map_err(io(&key_new))?;
        }
        std::fs::rename(&cert_new, data_dir.join(CERT_FILE)).map_err(io(&cert_new))?;
    } else if key_new.exists() {
        std::fs::remove_file(&key_new).map_err(io(&key_new))?;
    }
    Ok(())
}

/// Sends a request to the hub and decodes its JSON answer, or says why not.
async fn call<T: serde::de::DeserializeOwned>(
    request: reqwest::RequestBuilder,
    url: &str,
) -> Result<T, IdentityError> {
    let resp = request
        .send()
        .await
        .map_err(|e| IdentityError::Unreachable {
            url: url.to_owned(),
            detail: chain(&e),
        })?;
    if !resp.status().is_success() {
        return Err(refusal(resp).await);
    }
    resp.json()
        .await
        .map_err(|e| IdentityError::Refused(format!("unreadable answer from {url}: {e}")))
}

/// An error and all its causes on one line (reqwest's own message leaves the cause out).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn http_client(tls: rustls::ClientConfig) -> Result<reqwest::Client, IdentityError> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| IdentityError::Corrupt(e.to_string()))
}
