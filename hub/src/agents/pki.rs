//! The hub's certificate authority. Created on first start in the data directory (or loaded from
//! files the operator gives), it issues each agent a client certificate whose only identity is
//! its cluster, and the hub's own server certificate for the agent endpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_shared::identity::{cluster_uri, sha256_hex};
use drover_shared::ClusterName;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA certificate or key is unusable: {0}; give a PEM certificate and its PKCS#8 PEM key (--ca-cert, --ca-key)")]
    InvalidCa(String),
    #[error(
        "certificate signing request refused: {0}; send a PEM CSR signed by the agent's own key"
    )]
    InvalidCsr(String),
    #[error("issuing a certificate failed: {0}")]
    Issue(String),
}

/// A certificate the hub issued.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub pem: String,
    pub der: CertificateDer<'static>,
    /// Lowercase hex of the serial number.
    pub serial: String,
    pub fingerprint_sha256: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
}

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and without a leading zero byte: DER drops leading zeros, and the serial the
    // hub records must be byte for byte the one in the certificate.
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn to_offset(t: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.timestamp())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl Pki {
    /// Loads the CA from `dir`, creating it (key file mode 0600) on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if cert_path.exists() {
            return Self::load(&cert_path, &key_path);
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let key = KeyPair::generate().map_err(|e| PkiError::Issue(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Drover hub CA");
        dn.push(DnType::OrganizationName, "Drover");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let now = Utc::now();
        params.not_before = to_offset(now - chrono::Duration::minutes(5));
        params.not_after = to_offset(now + chrono::Duration::days(3650));
        let cert = params
            .self_signed(&key)
            .map_err(|e| PkiError::Issue(e.to_string()))?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
        tracing::info!(path = %cert_path.display(), "created the hub's CA");
        Self::load(&cert_path, &key_path)
    }

    /// Loads an operator-provided CA.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = std::fs::read_to_string(cert_path).map_err(io(cert_path))?;
        let key_pem = std::fs::read_to_string(key_path).map_err(io(key_path))?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::InvalidCa(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| PkiError::InvalidCa(e.to_string()))?;
        use rustls::pki_types::pem::PemObject;
        let ca_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::InvalidCa(e.to_string()))?;
        Ok(Self {
            issuer,
            ca_pem: cert_pem.to_owned(),
            ca_der,
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// What agents pin when they join: the SHA-256 of the CA certificate.
    pub fn ca_sha256(&self) -> String {
        sha256_hex(&self.ca_der)
    }

    /// Signs an agent's CSR. Only the CSR's public key is used (its signature proves the agent
    /// holds the key); the identity is the cluster the join token was for, whatever the CSR asks.
    pub fn issue_agent_certificate(
        &self,
        csr_pem: &str,
        cluster: &ClusterName,
        validity: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(PkiError::InvalidCsr("larger than 16 KiB".into()));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::InvalidCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cluster.as_str());
        dn.push(DnType::OrganizationName, "Drover agents");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            cluster_uri(cluster)
                .try_into()
                .map_err(|e: rcgen::Error| PkiError::Issue(e.to_string()))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        self.sign(params, &csr.public_key, validity)
    }

    /// A fresh server certificate and key for the agent endpoint, valid for `names` (DNS names
    /// or IP addresses).
    pub fn issue_server_certificate(
        &self,
        names: &[String],
        validity: Duration,
    ) -> Result<(IssuedCertificate, PrivateKeyDer<'static>), PkiError> {
        let key = KeyPair::generate().map_err(|e| PkiError::Issue(e.to_string()))?;
        let mut params = CertificateParams::default();
        for name in names {
            // Agents may reach the hub by address as well as by name.
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    name.clone()
                        .try_into()
                        .map_err(|e| PkiError::Issue(format!("server name {name:?}: {e}")))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        params
            .distinguished_name
            .push(DnType::CommonName, "Drover hub");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issued = self.sign(params, &key, validity)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((issued, key_der))
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        validity: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        let now = Utc::now();
        // A little slack for clocks that disagree.
        let not_before = now - chrono::Duration::minutes(5);
        let not_after =
            now + chrono::Duration::from_std(validity).unwrap_or(chrono::Duration::days(30));
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| PkiError::Issue(e.to_string()))?;
        let der = cert.der().clone();
        Ok(IssuedCertificate {
            pem: cert.pem(),
            fingerprint_sha256: sha256_hex(&der),
            der,
            serial: serial_hex,
            not_before,
            not_after,
        })
    }

    /// The TLS configuration of the agent endpoint: the hub's server certificate (sent with the
    /// CA so joining agents can check their pin) and client certificates verified against the CA
    /// when presented (joining agents have none yet; session routes insist on one).
    pub fn agent_server_config(
        &self,
        names: &[String],
    ) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (server, key) =
            self.issue_server_certificate(names, Duration::from_secs(365 * 86_400))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .map_err(|e| PkiError::InvalidCa(e.to_string()))?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Issue(e.to_string()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PkiError::Issue(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![server.der, self.ca_der.clone()], key)
            .map_err(|e| PkiError::Issue(e.to_string()))?;
        Ok(Arc::new(config))
    }
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path).map_err(io(path))?;
    file.write_all(contents).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_shared::identity::{cluster_of_certificate, serial_of_certificate};

    fn csr() -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        // A CSR may ask for anything; the hub ignores what it asks.
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://drover/cluster/other".try_into().unwrap(),
        )];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    #[test]
    fn the_ca_persists_and_issues_cluster_identities() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path()).unwrap();
        let again = Pki::load_or_create(dir.path()).unwrap();
        assert_eq!(
            pki.ca_sha256(),
            again.ca_sha256(),
            "second start loads the same CA"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "the CA key is private");
        }
        let (_, csr) = csr();
        let east = ClusterName::new("east-1").unwrap();
        let cert = again
            .issue_agent_certificate(&csr, &east, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(
            cluster_of_certificate(&cert.der).unwrap(),
            east,
            "identity comes from the token, not the CSR"
        );
        assert_eq!(serial_of_certificate(&cert.der).unwrap(), cert.serial);
        assert!(cert.not_after > Utc::now() + chrono::Duration::minutes(59));
    }

    #[test]
    fn recorded_serials_match_the_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path()).unwrap();
        let (_, csr) = csr();
        let east = ClusterName::new("east-1").unwrap();
        // With a 1-in-128 chance per certificate of a leading zero byte, 400 would catch it.
        for _ in 0..400 {
            let cert = pki
                .issue_agent_certificate(&csr, &east, Duration::from_secs(60))
                .unwrap();
            assert_eq!(serial_of_certificate(&cert.der).unwrap(), cert.serial);
        }
    }

    #[test]
    fn forged_and_garbage_csrs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path()).unwrap();
        let (_, csr) = csr();
        // Flip a byte of the signature: the CSR no longer proves possession of its key.
        use rustls::pki_types::pem::PemObject;
        let mut der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        let last = der.len() - 1;
        der[last] ^= 0xff;
        let forged = pem_encode("CERTIFICATE REQUEST", &der);
        let east = ClusterName::new("east-1").unwrap();
        let err = pki
            .issue_agent_certificate(&forged, &east, Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidCsr(_)), "{err}");
        let err = pki
            .issue_agent_certificate("not a csr", &east, Duration::from_secs(60))
            .unwrap_err();
        assert!(err.to_string().contains("send a PEM CSR"), "{err}");
    }

    fn pem_encode(label: &str, der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }
}
