//! Who a certificate speaks for. An agent's client certificate carries its cluster as a URI
//! subject alternative name (`spiffe://drover/cluster/<name>`), set by the hub when it signs; and
//! an agent joining for the first time trusts the hub by the SHA-256 of the hub's CA certificate,
//! which the join token carries.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::ids::ClusterName;

/// The URI prefix of a cluster's identity in its certificate.
pub const CLUSTER_URI_PREFIX: &str = "spiffe://drover/cluster/";

pub fn cluster_uri(cluster: &ClusterName) -> String {
    format!("{CLUSTER_URI_PREFIX}{cluster}")
}

/// Hex SHA-256 of a DER certificate: how a CA is pinned.
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The cluster a (verified) certificate speaks for, from its URI SAN.
pub fn cluster_of_certificate(der: &[u8]) -> Result<ClusterName, String> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("malformed subject alternative names: {e}"))?
        .ok_or("certificate has no subject alternative names, so no Drover cluster identity")?;
    let mut clusters = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => uri.strip_prefix(CLUSTER_URI_PREFIX),
        _ => None,
    });
    let name = clusters
        .next()
        .ok_or("certificate names no Drover cluster (no spiffe://drover/cluster/ URI)")?;
    if clusters.next().is_some() {
        return Err("certificate names more than one cluster".into());
    }
    ClusterName::new(name).map_err(|e| e.to_string())
}

/// The serial number of a certificate as lowercase hex (how the hub records and revokes them).
pub fn serial_of_certificate(der: &[u8]) -> Result<String, String> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    Ok(hex::encode(cert.raw_serial()))
}

/// Verifies a server whose chain includes a CA certificate with a known SHA-256, then checks the
/// chain against that CA like any other root. Used once, to join; afterwards the agent trusts the
/// CA certificate it received.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin_sha256_hex: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCaVerifier {
    pub fn new(pin_sha256_hex: &str, provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        Self {
            pin_sha256_hex: pin_sha256_hex.to_ascii_lowercase(),
            provider,
        }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256_hex(c) == self.pin_sha256_hex)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the hub's CA does not match the join token's CA pin; check the hub URL and token".into(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA is unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A certificate's validity as Unix seconds: (not before, not after).
pub fn validity_of_certificate(der: &[u8]) -> Result<(i64, i64), String> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}
