//! Access control over the real hub (SQLite, in-process schema and over HTTP): a role x
//! operation matrix generated from the schema itself — every query, mutation and subscription
//! field, called with well-typed arguments by no caller and by each role — so a new field
//! cannot escape the check; API tokens created, used, expired and revoked; refusals audited.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_e2e::testbed::{error_code, test_admin, Backend, TestHub};
use drover_graphql::access::{Caller, Role};
use futures::StreamExt as _;
use serde_json::{json, Value};

/// The least role each root field needs. A field missing here fails the test: whoever adds
/// one decides who may call it.
fn required_roles() -> BTreeMap<&'static str, Option<Role>> {
    use Role::*;
    let mut m = BTreeMap::new();
    for f in [
        "fleet",
        "clusters",
        "cluster",
        "evacuations",
        "evacuation",
        "migrationPolicies",
        "virtualMachines",
        "virtualMachine",
        "migrations",
        "migration",
        "agentCommand",
        "migrationEvents",
        "inventoryEvents",
    ] {
        m.insert(f, Some(Viewer));
    }
    for f in [
        "migrateVirtualMachine",
        "cancelMigration",
        "planEvacuation",
        "startEvacuation",
        "cancelEvacuation",
        "planRebalance",
        "startRebalance",
    ] {
        m.insert(f, Some(Migrator));
    }
    for f in [
        "removeCluster",
        "setClusterMaintenance",
        "createJoinToken",
        "createVirtualMachine",
        "startVirtualMachine",
        "stopVirtualMachine",
        "deleteVirtualMachine",
        "setMigrationPolicy",
        "deleteMigrationPolicy",
        "apiTokens",
        "createApiToken",
        "revokeApiToken",
    ] {
        m.insert(f, Some(Admin));
    }
    m
}

const INTROSPECTION: &str = r#"
fragment Ref on __Type { kind name ofType { kind name ofType { kind name ofType { kind name } } } }
{ __schema {
    queryType { fields { name type { ...Ref } args { name defaultValue type { ...Ref } } } }
    mutationType { fields { name type { ...Ref } args { name defaultValue type { ...Ref } } } }
    subscriptionType { fields { name type { ...Ref } args { name defaultValue type { ...Ref } } } }
    types { name kind enumValues { name } inputFields { name defaultValue type { ...Ref } } }
} }"#;

/// A value of the GraphQL type `t` (required input fields filled in), as GraphQL text.
fn value_of(t: &Value, types: &BTreeMap<String, Value>, n: u32) -> String {
    match t["kind"].as_str().unwrap() {
        "NON_NULL" => value_of(&t["ofType"], types, n),
        "LIST" => format!("[{}]", value_of(&t["ofType"], types, n)),
        "ENUM" => types[t["name"].as_str().unwrap()]["enumValues"][0]["name"]
            .as_str()
            .unwrap()
            .to_owned(),
        "INPUT_OBJECT" => {
            let ty = &types[t["name"].as_str().unwrap()];
            let fields: Vec<String> = ty["inputFields"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| f["type"]["kind"] == "NON_NULL" && f["defaultValue"].is_null())
                .map(|f| {
                    format!(
                        "{}: {}",
                        f["name"].as_str().unwrap(),
                        value_of(&f["type"], types, n + 1)
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
        _ => match t["name"].as_str().unwrap() {
            "Int" | "Long" => "1".into(),
            "Float" => "0.5".into(),
            "Boolean" => "false".into(),
            "ID" | "UUID" => "\"00000000-0000-0000-0000-000000000000\"".into(),
            "DateTime" => "\"2030-01-01T00:00:00Z\"".into(),
            _ => format!("\"matrix-{n}\""),
        },
    }
}

fn innermost(t: &Value) -> &Value {
    if t["ofType"].is_null() {
        t
    } else {
        innermost(&t["ofType"])
    }
}

/// One operation calling `field` with every required argument.
fn operation(kind: &str, field: &Value, types: &BTreeMap<String, Value>) -> String {
    let args: Vec<String> = field["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["type"]["kind"] == "NON_NULL" && a["defaultValue"].is_null())
        .map(|a| {
            format!(
                "{}: {}",
                a["name"].as_str().unwrap(),
                value_of(&a["type"], types, 0)
            )
        })
        .collect();
    let args = if args.is_empty() {
        String::new()
    } else {
        format!("({})", args.join(", "))
    };
    let selection = match innermost(&field["type"])["kind"].as_str().unwrap() {
        "OBJECT" | "INTERFACE" | "UNION" => " { __typename }",
        _ => "",
    };
    format!(
        "{kind} {{ {}{args}{selection} }}",
        field["name"].as_str().unwrap()
    )
}

/// The error codes a request got (empty: none).
async fn codes(h: &TestHub, op: &str, caller: Option<Caller>) -> Vec<String> {
    let mut request = async_graphql::Request::new(op);
    if let Some(c) = caller {
        request = request.data(c);
    }
    let response = if op.starts_with("subscription") {
        let mut stream = h.hub.schema.execute_stream(request);
        match tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
            Ok(Some(r)) => serde_json::to_value(r).unwrap(),
            _ => json!({}),
        }
    } else {
        let mut r = h.hub.schema.execute(request).await;
        drover_graphql::classify_response_errors(&mut r);
        serde_json::to_value(r).unwrap()
    };
    response["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .map(|e| e["extensions"]["code"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_root_field_checks_the_callers_role() {
    let h = TestHub::new(Backend::Sqlite, "access_matrix")
        .await
        .unwrap();
    let schema = h.data(INTROSPECTION, json!({})).await;
    let types: BTreeMap<String, Value> = schema["__schema"]["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_owned(), t.clone()))
        .collect();
    let expected = required_roles();
    let mut checked = 0;
    let mut problems = Vec::new();
    for (kind, root) in [
        ("query", "queryType"),
        ("mutation", "mutationType"),
        ("subscription", "subscriptionType"),
    ] {
        for field in schema["__schema"][root]["fields"].as_array().unwrap() {
            let name = field["name"].as_str().unwrap();
            let Some(Some(needed)) = expected.get(name) else {
                problems.push(format!(
                    "{name}: not in the matrix; decide which role it needs"
                ));
                continue;
            };
            let op = operation(kind, field, &types);
            let anonymous = codes(&h, &op, None).await;
            if anonymous != ["UNAUTHENTICATED"] {
                problems.push(format!("{name} without a credential: {anonymous:?} ({op})"));
            }
            for role in [Role::Viewer, Role::Migrator, Role::Admin] {
                let caller = Caller {
                    actor: format!("matrix-{role}"),
                    role,
                };
                let got = codes(&h, &op, Some(caller)).await;
                let refused = got
                    .iter()
                    .any(|c| c == "FORBIDDEN" || c == "UNAUTHENTICATED");
                if role < *needed && got != ["FORBIDDEN"] {
                    problems.push(format!(
                        "{name} as {role}: expected FORBIDDEN, got {got:?} ({op})"
                    ));
                }
                if role >= *needed && refused {
                    problems.push(format!("{name} as {role}: refused {got:?} ({op})"));
                }
            }
            checked += 1;
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked >= 30, "every root field was called ({checked})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_authenticate_over_http_until_revoked_or_expired() {
    let h = TestHub::new(Backend::Sqlite, "access_tokens")
        .await
        .unwrap();
    let served = h.serve().await.unwrap();
    let http = reqwest::Client::new();
    let url = served.url("/graphql");
    let post = async |token: Option<&str>, query: &str| -> Value {
        drover_e2e::testbed::post_gql_as(&http, &url, token, query)
            .await
            .unwrap()
    };
    let fleet = "{ fleet { clusters { total } } }";

    // No credential, a wrong one, a malformed header: refused, saying why.
    let none = post(None, fleet).await;
    assert_eq!(
        error_code(&none).as_deref(),
        Some("UNAUTHENTICATED"),
        "{none}"
    );
    assert!(none.to_string().contains("no credential"), "{none}");
    let wrong = post(Some("drover_0000"), fleet).await;
    assert_eq!(
        error_code(&wrong).as_deref(),
        Some("UNAUTHENTICATED"),
        "{wrong}"
    );
    assert!(wrong.to_string().contains("not known"), "{wrong}");

    // An admin makes a viewer token: it reads, and may not move anything.
    let made = post(
        Some(&h.token),
        r#"mutation { createApiToken(name: "dashboards", role: VIEWER, expiresInDays: 30) { token apiToken { name role expiresAt createdBy } } }"#,
    )
    .await;
    let viewer = made["data"]["createApiToken"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(viewer.starts_with("drover_"), "{made}");
    assert_eq!(made["data"]["createApiToken"]["apiToken"]["role"], "VIEWER");
    let read = post(Some(&viewer), fleet).await;
    assert!(read["errors"].is_null(), "a viewer reads: {read}");
    let refused = post(
        Some(&viewer),
        r#"mutation { createJoinToken(cluster: "east-1") { token } }"#,
    )
    .await;
    assert_eq!(
        error_code(&refused).as_deref(),
        Some("FORBIDDEN"),
        "{refused}"
    );
    assert!(refused.to_string().contains("needs admin"), "{refused}");

    // Listed without secrets; used, so lastUsedAt is set.
    let listed = post(
        Some(&h.token),
        "{ apiTokens { name role lastUsedAt revokedAt } }",
    )
    .await;
    let tokens = listed["data"]["apiTokens"].as_array().unwrap();
    let dashboards = tokens.iter().find(|t| t["name"] == "dashboards").unwrap();
    assert!(!dashboards["lastUsedAt"].is_null(), "{listed}");
    assert!(!listed.to_string().contains(&viewer), "no secret is listed");

    // A name in use is refused; nothing is stored twice.
    let again = post(
        Some(&h.token),
        r#"mutation { createApiToken(name: "dashboards", role: ADMIN) { token } }"#,
    )
    .await;
    assert_eq!(error_code(&again).as_deref(), Some("CONFLICT"), "{again}");

    // Revoked: refused at once on this hub.
    let revoked = post(
        Some(&h.token),
        r#"mutation { revokeApiToken(name: "dashboards") }"#,
    )
    .await;
    assert_eq!(revoked["data"]["revokeApiToken"], true, "{revoked}");
    let after = post(Some(&viewer), fleet).await;
    assert_eq!(
        error_code(&after).as_deref(),
        Some("UNAUTHENTICATED"),
        "{after}"
    );
    assert!(after.to_string().contains("revoked"), "{after}");

    // Expired, in virtual time: a token for one day is refused a day later (once the cached
    // lookup is stale).
    let made = post(
        Some(&h.token),
        r#"mutation { createApiToken(name: "ci", role: MIGRATOR, expiresInDays: 1) { token } }"#,
    )
    .await;
    let ci = made["data"]["createApiToken"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(post(Some(&ci), fleet).await["errors"].is_null());
    h.clock.advance(Duration::from_secs(86_400 + 60));
    tokio::time::sleep(drover_hub::api::auth::CACHE_FOR + Duration::from_millis(200)).await;
    let expired = post(Some(&ci), fleet).await;
    assert_eq!(
        error_code(&expired).as_deref(),
        Some("UNAUTHENTICATED"),
        "{expired}"
    );
    assert!(expired.to_string().contains("expired"), "{expired}");

    // Each change, and each refused one, is in the audit log with the real actor.
    let rows = drover_hub::store::clusters::audit_rows(&h.hub.store)
        .await
        .unwrap();
    let created: Vec<_> = rows
        .iter()
        .filter(|r| r.action == "createApiToken")
        .map(|r| {
            (
                r.target.as_str(),
                r.result.as_str(),
                r.actor.starts_with("token:test-admin-"),
            )
        })
        .collect();
    assert_eq!(
        created,
        vec![
            ("dashboards", "ok", true),
            ("dashboards", "refused", true),
            ("ci", "ok", true)
        ],
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .all(|r| !r.details.to_string().contains("drover_")),
        "no secret reaches the audit log"
    );
    let _ = test_admin();
}

/// Cross-site requests are refused: a form or text/plain POST (what any web page may send to
/// any site without asking), a POST or a WebSocket from another web origin; the hub's own
/// GraphiQL origin and an --allowed-origin pass. An oversized WebSocket message is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_requests_are_refused() {
    use futures::SinkExt as _;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    let mut h = TestHub::new(Backend::Sqlite, "access_origin")
        .await
        .unwrap();
    h.hub.allowed_origins = vec!["https://console.example.com".into()];
    let served = h.serve().await.unwrap();
    let http = reqwest::Client::new();
    let url = served.url("/graphql");
    let body = r#"{"query": "{ fleet { clusters { total } } }"}"#;
    let post = async |content_type: &str, origin: Option<&str>| {
        let mut request = http
            .post(&url)
            .bearer_auth(&h.token)
            .header("content-type", content_type)
            .body(body);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    let (status, text) = post("text/plain", None).await;
    assert_eq!(status, 415, "{text}");
    assert!(text.contains("application/json"), "{text}");
    let (status, _) = post("application/x-www-form-urlencoded", None).await;
    assert_eq!(status, 415);
    let (status, text) = post("application/json", Some("https://evil.example")).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("--allowed-origin"), "{text}");
    let own = format!("http://{}", served.addr);
    for origin in [
        None,
        Some(own.as_str()),
        Some("https://console.example.com"),
    ] {
        let (status, text) = post("application/json; charset=utf-8", origin).await;
        assert_eq!(status, 200, "{origin:?}: {text}");
        assert!(!text.contains("errors"), "{origin:?}: {text}");
    }

    let ws = |origin: &'static str| {
        let mut req = format!("ws://{}/graphql/ws", served.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    let refused = ws("https://evil.example").await;
    assert!(
        refused.is_err(),
        "a WebSocket from another origin is refused"
    );
    let (mut socket, _) = ws("https://console.example.com").await.unwrap();
    // A message larger than a POST body may be is refused: the connection ends.
    let huge = json!({"type": "connection_init", "payload": {"pad": "x".repeat(300 * 1024)}});
    let _ = socket.send(Message::Text(huge.to_string().into())).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                Some(Ok(Message::Text(t))) if t.contains("connection_ack") => return false,
                _ => {}
            }
        }
    })
    .await
    .expect("the hub answers within 10 s");
    assert!(ended, "an oversized message closes the connection");
}
