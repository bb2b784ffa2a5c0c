//! Joining the hub and the agent endpoint's security, over real TLS handshakes: a join token
//! buys one certificate once; the certificate speaks for exactly its cluster; plain TCP, unknown
//! CAs, expired, revoked and forged certificates are refused.

use std::sync::Arc;
use std::time::Duration;

use drover_e2e::logs::{self, expect_line};
use drover_e2e::testbed::AgentEndpoint;
use drover_hub::agents::endpoint::{IdentityResponse, JoinRequest, JoinResponse};
use drover_hub::agents::pki::Pki;
use drover_shared::identity::{cluster_of_certificate, PinnedCaVerifier};
use drover_shared::ClusterName;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

async fn endpoint(name: &str) -> AgentEndpoint {
    logs::capture();
    AgentEndpoint::start(name, None).await.unwrap()
}

/// An HTTPS client that trusts the hub only through the join token's CA pin.
fn joining_client(token: &str) -> reqwest::Client {
    let pin = token.rsplit('.').next().unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(pin, provider())))
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// An HTTPS client presenting `cert`/`key` and trusting the hub's CA.
fn agent_client(ca_pem: &str, cert_pem: &str, key_pem: &str) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn new_csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (csr, key.serialize_pem())
}

/// A certificate for `cluster` straight from `pki` (not through a join), with its key.
fn issue(
    pki: &Pki,
    cluster: &str,
    validity: Duration,
) -> (drover_hub::agents::pki::IssuedCertificate, String) {
    let (csr, key) = new_csr();
    let cert = pki
        .issue_agent_certificate(&csr, &ClusterName::new(cluster).unwrap(), validity)
        .unwrap();
    (cert, key)
}

async fn create_token(e: &AgentEndpoint, cluster: &str) -> String {
    let d = e
        .hub
        .data(
            "mutation($c: String!) { createJoinToken(cluster: $c) { token cluster expiresAt caCertificateSha256 } }",
            json!({"c": cluster}),
        )
        .await;
    let t = &d["createJoinToken"];
    assert_eq!(t["cluster"], cluster);
    let token = t["token"].as_str().unwrap().to_owned();
    assert!(token.ends_with(t["caCertificateSha256"].as_str().unwrap()));
    token
}

async fn join(e: &AgentEndpoint, cluster: &str, token: &str, csr: &str) -> reqwest::Response {
    joining_client(token)
        .post(format!("{}/agent/v1/join", e.base))
        .json(&JoinRequest {
            cluster: cluster.into(),
            token: token.into(),
            csr: csr.into(),
        })
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_buys_one_certificate_that_speaks_for_its_cluster() {
    let e = endpoint("join_once").await;
    let token = create_token(&e, "east-1").await;
    let (csr, key) = new_csr();
    let resp = join(&e, "east-1", &token, &csr).await;
    assert_eq!(resp.status(), 200);
    let joined: JoinResponse = resp.json().await.unwrap();
    let der = CertificateDer::from_pem_slice(joined.certificate.as_bytes()).unwrap();
    assert_eq!(
        cluster_of_certificate(&der).unwrap(),
        ClusterName::new("east-1").unwrap()
    );

    // The token works once.
    let (csr2, _) = new_csr();
    let again = join(&e, "east-1", &token, &csr2).await;
    assert_eq!(again.status(), 401);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["code"], "TOKEN_REFUSED");

    // With its certificate, the agent is east-1 and nothing else.
    let agent = agent_client(&joined.ca, &joined.certificate, &key);
    let who: IdentityResponse = agent
        .get(format!("{}/agent/v1/identity", e.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who.cluster, "east-1");

    // The mutation was audited.
    use sea_orm::ConnectionTrait;
    let row = e
        .hub
        .hub
        .store
        .db
        .query_one(sea_orm::Statement::from_string(
            e.hub.hub.store.backend(),
            "SELECT action, target, result FROM audit_log".to_owned(),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        row.try_get::<String>("", "action").unwrap(),
        "createJoinToken"
    );
    assert_eq!(row.try_get::<String>("", "target").unwrap(), "east-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_for_another_cluster_expired_or_malformed_are_refused() {
    let e = endpoint("join_refused").await;
    let token = create_token(&e, "east-1").await;
    let (csr, _) = new_csr();
    let resp = join(&e, "west-1", &token, &csr).await;
    assert_eq!(resp.status(), 401, "a token for east-1 cannot join west-1");
    expect_line(&["join refused", "cluster=west-1"]).await;

    let expired = e
        .hub
        .hub
        .identities
        .create_join_token(
            &ClusterName::new("east-2").unwrap(),
            Duration::ZERO,
            "test",
            false,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let resp = join(&e, "east-2", &expired.token, &csr).await;
    assert_eq!(resp.status(), 401, "an expired token is refused");

    let resp = join(
        &e,
        "east-1",
        &token,
        "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n",
    )
    .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "BAD_CSR");
    // A bad CSR does not use the token up.
    let resp = join(&e, "east-1", &token, &csr).await;
    assert_eq!(resp.status(), 200, "the token survives a refused CSR");

    for (query, code) in [
        (
            r#"mutation { createJoinToken(cluster: "Bad_Name") { token } }"#,
            "INVALID_NAME",
        ),
        (
            r#"mutation { createJoinToken(cluster: "east-1", ttlSeconds: 5) { token } }"#,
            "BAD_USER_INPUT",
        ),
    ] {
        let resp = e.hub.gql(query, json!({})).await;
        assert_eq!(
            drover_e2e::testbed::error_code(&resp).as_deref(),
            Some(code),
            "{resp}"
        );
    }
}

async fn joined_agent(e: &AgentEndpoint, cluster: &str) -> (JoinResponse, String) {
    let token = create_token(e, cluster).await;
    let (csr, key) = new_csr();
    let resp = join(e, cluster, &token, &csr).await;
    assert_eq!(resp.status(), 200);
    (resp.json().await.unwrap(), key)
}

async fn identity_status(client: &reqwest::Client, e: &AgentEndpoint) -> Result<u16, String> {
    client
        .get(format!("{}/agent/v1/identity", e.base))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|err| format!("{err:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_unknown_ca_expired_and_forged_certificates_are_refused() {
    let e = endpoint("refusals").await;
    let (joined, key) = joined_agent(&e, "east-1").await;

    // A certificate from another CA never completes the handshake.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Pki::load_or_create(other_dir.path()).unwrap();
    let (foreign, other_key) = issue(&other, "east-1", Duration::from_secs(3600));
    let client = agent_client(&joined.ca, &foreign.pem, &other_key);
    assert!(
        identity_status(&client, &e).await.is_err(),
        "unknown CA refused at the handshake"
    );
    expect_line(&["TLS handshake refused", "not issued by this hub's CA"]).await;

    // Forged: self-signed, claiming east-1's identity.
    let forged_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://drover/cluster/east-1".try_into().unwrap(),
    )];
    let forged = params.self_signed(&forged_key).unwrap();
    let client = agent_client(&joined.ca, &forged.pem(), &forged_key.serialize_pem());
    assert!(
        identity_status(&client, &e).await.is_err(),
        "forged certificate refused"
    );
    expect_line(&["TLS handshake refused", "another CA, or forged"]).await;

    // Expired: signed by the hub's own CA, but past its validity.
    let (expired, expired_key) = issue(&e.hub.pki, "east-1", Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let client = agent_client(&joined.ca, &expired.pem, &expired_key);
    assert!(
        identity_status(&client, &e).await.is_err(),
        "expired certificate refused"
    );
    expect_line(&["TLS handshake refused", "has expired"]).await;

    // Not issued through a join (unknown to the hub): refused after the handshake.
    let (stray, stray_key) = issue(&e.hub.pki, "east-1", Duration::from_secs(3600));
    let client = agent_client(&joined.ca, &stray.pem, &stray_key);
    assert_eq!(identity_status(&client, &e).await, Ok(403));
    expect_line(&["agent refused", &stray.serial, "revoked or unknown"]).await;

    // Without a certificate: told to join first.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(joined.ca.as_bytes()).unwrap())
        .unwrap();
    let anonymous = reqwest::Client::builder()
        .use_preconfigured_tls(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
        .build()
        .unwrap();
    assert_eq!(identity_status(&anonymous, &e).await, Ok(401));

    // The real certificate works until the cluster's certificates are revoked.
    let client = agent_client(&joined.ca, &joined.certificate, &key);
    assert_eq!(identity_status(&client, &e).await, Ok(200));
    let revoked = e
        .hub
        .hub
        .identities
        .revoke_cluster(&ClusterName::new("east-1").unwrap())
        .await
        .unwrap();
    assert_eq!(revoked, 1);
    let client = agent_client(&joined.ca, &joined.certificate, &key);
    assert_eq!(
        identity_status(&client, &e).await,
        Ok(403),
        "revoked certificate refused"
    );
    expect_line(&["agent refused", "cluster east-1 is revoked or unknown"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_gets_no_answer() {
    let e = endpoint("plain_tcp").await;
    let addr = e.base.trim_start_matches("https://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /agent/v1/identity HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // Generous: only a hub that never closes the connection takes this long.
    let read = tokio::time::timeout(Duration::from_secs(60), tcp.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(
        read.is_ok(),
        "the hub closes a plain TCP connection instead of hanging"
    );
    assert!(
        !text.contains("HTTP/1.1 200"),
        "plain TCP must not be served: {text}"
    );
    expect_line(&["TLS handshake refused", "does not speak TLS"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renews_its_certificate_and_recovers_an_interrupted_renewal() {
    use drover_agent::identity::AgentIdentity;
    let e = endpoint("renewal").await;
    let token = create_token(&e, "east-1").await;
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterName::new("east-1").unwrap();
    let mut identity = AgentIdentity::join(dir.path(), &e.base, &cluster, &token)
        .await
        .unwrap();
    assert!(!identity.renewal_due(), "a fresh certificate is not due");
    let before = identity.cert_pem.clone();
    identity.renew(dir.path(), &e.base).await.unwrap();
    assert_ne!(identity.cert_pem, before, "a new certificate");
    assert_eq!(identity.check(&e.base).await.unwrap(), cluster);
    // What is on disk is what renewal produced, and it works.
    let loaded = AgentIdentity::load(dir.path()).unwrap();
    assert_eq!(loaded.cert_pem, identity.cert_pem);
    assert_eq!(loaded.check(&e.base).await.unwrap(), cluster);

    // A renewal interrupted before its certificate was written is dropped on load: key and
    // certificate still match.
    std::fs::write(dir.path().join("agent-key.pem.new"), "half-written").unwrap();
    let loaded = AgentIdentity::load(dir.path()).unwrap();
    assert!(!dir.path().join("agent-key.pem.new").exists());
    assert_eq!(loaded.check(&e.base).await.unwrap(), cluster);

    // Without a valid certificate, renewal is refused.
    e.hub.hub.identities.revoke_cluster(&cluster).await.unwrap();
    let err = identity.renew(dir.path(), &e.base).await.unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
}

/// A cluster that has an identity gets a new agent only through a token made to replace it:
/// a plain token is refused (saying how to ask for a replacement), a replacement token's join
/// revokes the old agent's certificate, and the replacement is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_cluster_takes_a_new_agent_only_through_a_replacement_token() {
    let e = endpoint("join_replace").await;
    let (old, old_key) = joined_agent(&e, "east-1").await;
    let old_agent = agent_client(&old.ca, &old.certificate, &old_key);
    assert_eq!(identity_status(&old_agent, &e).await, Ok(200));

    let refused = e
        .hub
        .gql(
            r#"mutation { createJoinToken(cluster: "east-1") { token } }"#,
            json!({}),
        )
        .await;
    assert_eq!(
        drover_e2e::testbed::error_code(&refused).as_deref(),
        Some("CONFLICT"),
        "{refused}"
    );
    assert!(refused.to_string().contains("replace: true"), "{refused}");

    let d = e
        .hub
        .data(
            r#"mutation { createJoinToken(cluster: "east-1", replace: true) { token } }"#,
            json!({}),
        )
        .await;
    let token = d["createJoinToken"]["token"].as_str().unwrap().to_owned();
    let (csr, key) = new_csr();
    let resp = join(&e, "east-1", &token, &csr).await;
    assert_eq!(resp.status(), 200);
    let new: JoinResponse = resp.json().await.unwrap();
    let new_agent = agent_client(&new.ca, &new.certificate, &key);
    assert_eq!(identity_status(&new_agent, &e).await, Ok(200));
    assert_eq!(
        identity_status(&old_agent, &e).await,
        Ok(403),
        "the replaced agent's certificate is revoked"
    );

    let rows = drover_hub::store::clusters::audit_rows(&e.hub.hub.store)
        .await
        .unwrap();
    let actions: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.action.as_str(), r.result.as_str()))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("createJoinToken", "ok"),
            ("createJoinToken", "refused"),
            ("createJoinToken", "ok"),
            ("replaceAgentIdentity", "ok"),
        ],
        "{rows:?}"
    );
}
