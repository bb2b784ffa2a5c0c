//! Cluster identities: one-time join tokens (stored hashed, expiring), the certificates issued
//! against them, and revocation. Redeeming a token and recording the certificate it buys are one
//! transaction, so a token works exactly once and no certificate goes unrecorded.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use drover_shared::ClusterName;
use sha2::{Digest, Sha256};

use crate::agents::pki::{IssuedCertificate, Pki, PkiError};
use crate::store::identities::{self as rows, CertificateRecord};
use crate::store::{Store, StoreError};

/// Every token starts so, which makes leaked tokens easy to recognise in logs and scanners.
pub const TOKEN_PREFIX: &str = "drover-join.";
/// Longest lifetime an operator may give a join token.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);
/// How long an agent certificate lasts before it must be renewed.
pub const AGENT_CERT_VALIDITY: Duration = Duration::from_secs(30 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Deliberately vague to the caller: which part was wrong is only logged.
    #[error("join refused: the token is unknown, expired, already used or for another cluster; ask an operator for a new token (createJoinToken)")]
    TokenRefused,
    #[error(transparent)]
    Csr(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why no join token was made.
#[derive(Debug, thiserror::Error)]
pub enum JoinTokenError {
    #[error("cluster {0} already has an agent identity; to move it to another agent, create a replacement token (createJoinToken with replace: true): the current agent's certificates are revoked when the new one joins")]
    IdentityExists(ClusterName),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A join that went through: the certificate, and how many certificates of the identity it
/// replaced were revoked.
#[derive(Debug)]
pub struct Joined {
    pub issued: IssuedCertificate,
    pub revoked: u64,
}

/// A join token as handed to the operator, once: only its hash is stored.
#[derive(Debug, Clone)]
pub struct NewJoinToken {
    /// `drover-join.<secret>.<CA SHA-256>`: the agent learns both what to present and which CA
    /// to trust from it.
    pub token: String,
    pub cluster: ClusterName,
    pub expires_at: DateTime<Utc>,
    pub ca_sha256: String,
}

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenParts {
    pub secret: String,
    pub ca_sha256: String,
}

impl JoinTokenParts {
    pub fn parse(token: &str) -> Option<Self> {
        let rest = token.trim().strip_prefix(TOKEN_PREFIX)?;
        let (secret, ca) = rest.split_once('.')?;
        let ok_secret = secret.len() == 43
            && secret
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let ok_ca = ca.len() == 64 && ca.bytes().all(|b| b.is_ascii_hexdigit());
        (ok_secret && ok_ca).then(|| Self {
            secret: secret.to_owned(),
            ca_sha256: ca.to_ascii_lowercase(),
        })
    }
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[derive(Clone)]
pub struct Identities {
    store: Store,
    pki: Arc<Pki>,
}

impl Identities {
    pub fn new(store: Store, pki: Arc<Pki>) -> Self {
        Self { store, pki }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// Creates a one-time token for `cluster`, valid for `ttl`.
    pub async fn create_join_token(
        &self,
        cluster: &ClusterName,
        ttl: Duration,
        created_by: &str,
        replace: bool,
    ) -> Result<NewJoinToken, JoinTokenError> {
        let secret_bytes: [u8; 32] = rand::random();
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret_bytes);
        let now = self.store.clock.now();
        if !replace && rows::has_identity(&self.store.db, cluster, now).await? {
            return Err(JoinTokenError::IdentityExists(cluster.clone()));
        }
        let expires_at =
            now + chrono::Duration::from_std(ttl.min(MAX_TOKEN_TTL)).unwrap_or_default();
        rows::insert_join_token(
            &self.store,
            cluster,
            hash_secret(&secret),
            expires_at,
            created_by,
            now,
            replace,
        )
        .await?;
        let ca_sha256 = self.pki.ca_sha256();
        Ok(NewJoinToken {
            token: format!("{TOKEN_PREFIX}{secret}.{ca_sha256}"),
            cluster: cluster.clone(),
            expires_at,
            ca_sha256,
        })
    }

    /// Redeems `token` for `cluster` and signs the agent's CSR, in one transaction.
    pub async fn join(
        &self,
        cluster: &ClusterName,
        token: &str,
        csr_pem: &str,
    ) -> Result<Joined, JoinError> {
        let parts = JoinTokenParts::parse(token).ok_or_else(|| {
            tracing::warn!(%cluster, "join refused: malformed token");
            JoinError::TokenRefused
        })?;
        // A bad CSR rolls the redemption back: the operator's token is not wasted.
        let redemption =
            rows::redeem_join_token(&self.store, cluster, &hash_secret(&parts.secret), || {
                let issued =
                    self.pki
                        .issue_agent_certificate(csr_pem, cluster, AGENT_CERT_VALIDITY)?;
                let record = certificate_record(&issued);
                Ok::<_, JoinError>((issued, record))
            })
            .await?;
        match redemption {
            rows::Redemption::Joined { issued, revoked } => {
                tracing::info!(%cluster, serial = %issued.serial, replaced_certificates = revoked, "agent joined");
                Ok(Joined { issued, revoked })
            }
            rows::Redemption::Refused => {
                tracing::warn!(%cluster, "join refused: token unknown, expired, used or for another cluster");
                Err(JoinError::TokenRefused)
            }
            rows::Redemption::IdentityExists => {
                tracing::warn!(%cluster, "join refused: the cluster already has an agent identity and the token does not replace it (createJoinToken with replace: true)");
                Err(JoinError::TokenRefused)
            }
        }
    }

    /// Issues a fresh certificate for an agent that already holds a valid one (renewal before
    /// expiry). The old certificate stays valid until it expires.
    pub async fn renew(
        &self,
        cluster: &ClusterName,
        csr_pem: &str,
    ) -> Result<IssuedCertificate, JoinError> {
        let issued = self
            .pki
            .issue_agent_certificate(csr_pem, cluster, AGENT_CERT_VALIDITY)?;
        rows::record_certificate(&self.store, cluster, certificate_record(&issued)).await?;
        tracing::info!(%cluster, serial = %issued.serial, "agent certificate renewed");
        Ok(issued)
    }

    /// Whether a certificate the hub issued may still be used: known, for that cluster, not
    /// revoked.
    pub async fn certificate_is_valid(
        &self,
        serial: &str,
        cluster: &ClusterName,
    ) -> Result<bool, StoreError> {
        let cert = rows::certificate(&self.store, serial).await?;
        Ok(cert.is_some_and(|c| c.revoked_at.is_none() && c.cluster_name == cluster.as_str()))
    }

    /// Revokes every certificate of a cluster (when it leaves the fleet); returns how many.
    pub async fn revoke_cluster(&self, cluster: &ClusterName) -> Result<u64, StoreError> {
        rows::revoke_cluster_certificates(&self.store, cluster).await
    }
}

/// What is recorded of an issued certificate, so that it can be checked and revoked.
fn certificate_record(issued: &IssuedCertificate) -> CertificateRecord {
    CertificateRecord {
        serial: issued.serial.clone(),
        fingerprint_sha256: issued.fingerprint_sha256.clone(),
        not_before: issued.not_before,
        not_after: issued.not_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_only_in_their_own_shape() {
        let secret = "a".repeat(43);
        let ca = "0f".repeat(32);
        let good = format!("{TOKEN_PREFIX}{secret}.{ca}");
        assert_eq!(
            JoinTokenParts::parse(&good),
            Some(JoinTokenParts {
                secret: secret.clone(),
                ca_sha256: ca.clone()
            })
        );
        for bad in [
            format!("{secret}.{ca}"),
            format!("{TOKEN_PREFIX}{secret}"),
            format!("{TOKEN_PREFIX}{}.{ca}", "a".repeat(42)),
            format!("{TOKEN_PREFIX}{secret}.{}", "zz".repeat(32)),
        ] {
            assert_eq!(JoinTokenParts::parse(&bad), None, "{bad}");
        }
    }
}
