//! The hub's HTTP surface, every route in one place: `/graphql` (GraphiQL on GET, queries on
//! POST, subscriptions over WebSocket at `/graphql/ws`), `/healthz`, `/readyz`, `/metrics`.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_graphql::http::GraphiQLSource;
use async_graphql_axum::{GraphQLProtocol, GraphQLWebSocket};
use axum::body::Body;
use axum::extract::State;
use axum::extract::WebSocketUpgrade;
use axum::http::HeaderMap;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use drover_graphql::access::{Caller, Role, Unauthenticated};
use drover_graphql::{classify_response_errors, DroverSchema, ErrorCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::store::Store;

/// The largest request body `/graphql` reads.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// The longest query text it executes.
pub const MAX_QUERY_CHARS: usize = 32 * 1024;

pub struct App {
    pub schema: DroverSchema,
    pub store: Store,
    pub metrics: PrometheusHandle,
    /// Who may call the API; `None` turns authentication off (only benchmarks do, to measure
    /// what it costs).
    pub auth: Option<Arc<crate::api::auth::Authenticator>>,
    /// Web origins (`https://console.example.com`) whose pages may call the API besides the
    /// hub's own (GraphiQL); requests without an Origin (not from a browser) are not affected.
    pub allowed_origins: Vec<String>,
}

/// Whether a browser request from `origin` may call the API: no Origin (not a browser), the
/// hub's own pages (the origin's host is the request's Host), or an allowed origin.
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let origin = origin.trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// The refusal of a cross-site request, or None.
fn cross_site(headers: &HeaderMap, allowed: &[String]) -> Option<Response> {
    let value = |name| {
        headers
            .get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    let origin = value(header::ORIGIN);
    if origin_allowed(origin, value(header::HOST), allowed) {
        return None;
    }
    metrics::counter!("drover_graphql_requests_total", "result" => "rejected").increment(1);
    tracing::warn!(
        origin = origin.unwrap_or_default(),
        "refused a cross-site API request"
    );
    Some(graphql_error(
        StatusCode::FORBIDDEN,
        ErrorCode::Forbidden,
        format!(
            "requests from the web origin {} are not allowed; start the hub with --allowed-origin {} to let its pages call the API",
            origin.unwrap_or_default(),
            origin.unwrap_or_default()
        ),
    ))
}

impl App {
    /// The request data a caller's credential gives: the caller, or why there is none (the
    /// schema's guards refuse every field without a caller, saying why).
    async fn identify(&self, authorization: Option<&str>) -> async_graphql::Data {
        let mut data = async_graphql::Data::default();
        match &self.auth {
            None => data.insert(Caller {
                actor: "anonymous (authentication off)".into(),
                role: Role::Admin,
            }),
            Some(auth) => match auth.authenticate(authorization).await {
                Ok(caller) => data.insert(caller),
                Err(refused) => data.insert(refused),
            },
        }
        data
    }
}

#[derive(Clone)]
pub struct AppState(pub Arc<App>);

/// The process-wide Prometheus recorder (installed once, however many hubs a test starts).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // If an embedding program installed its own recorder first, that one receives the
            // hub's metrics and /metrics shows only what this handle knows; say so.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "another metrics recorder is installed; /metrics will be incomplete"
                );
            }
            handle
        })
        .clone()
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/graphql") }))
        .route("/graphql", get(graphiql).post(graphql))
        .route("/graphql/ws", get(subscriptions))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState(app))
}

async fn graphiql() -> Html<String> {
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .title("Drover")
            .finish(),
    )
}

fn graphql_error(status: StatusCode, code: ErrorCode, message: String) -> Response {
    let body = serde_json::json!({
        "data": null,
        "errors": [{"message": message, "extensions": {"code": code.as_str()}}],
    });
    (status, Json(body)).into_response()
}

/// Subscriptions over WebSocket (graphql-transport-ws or graphql-ws): the caller authenticates
/// in `connection_init` with `{"authorization": "Bearer <token>"}`; a connection without a valid
/// one is closed with the reason.
async fn subscriptions(
    State(AppState(app)): State<AppState>,
    headers: HeaderMap,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Some(refused) = cross_site(&headers, &app.allowed_origins) {
        return refused;
    }
    upgrade
        .protocols(async_graphql::http::ALL_WEBSOCKET_PROTOCOLS)
        // The same size limit as a POST body; depth and complexity are the schema's own.
        .max_message_size(MAX_REQUEST_BYTES)
        .max_frame_size(MAX_REQUEST_BYTES)
        .on_upgrade(move |stream| {
            let schema = app.schema.clone();
            GraphQLWebSocket::new(stream, schema, protocol)
                .on_connection_init(move |payload| async move {
                    let authorization = ["authorization", "Authorization"]
                        .iter()
                        .find_map(|k| payload.get(*k).and_then(|v| v.as_str()));
                    let data = app.identify(authorization).await;
                    match data.get(&std::any::TypeId::of::<Unauthenticated>()) {
                        Some(refused) => {
                            let why = refused
                                .downcast_ref::<Unauthenticated>()
                                .map_or("", |u| u.0.as_str());
                            Err(async_graphql::Error::new(format!(
                                "authentication required: {why}; send {{\"authorization\": \"Bearer <token>\"}} in connection_init"
                            )))
                        }
                        None => Ok(data),
                    }
                })
                .serve()
        })
}

async fn graphql(
    State(AppState(app)): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    if let Some(refused) = cross_site(&headers, &app.allowed_origins) {
        return refused;
    }
    // Only JSON bodies: a web page can send a form or text/plain to any site without asking
    // first, never application/json.
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        metrics::counter!("drover_graphql_requests_total", "result" => "rejected").increment(1);
        return graphql_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::BadUserInput,
            "POST /graphql takes a JSON body: send Content-Type: application/json".into(),
        );
    }
    let bytes = match axum::body::to_bytes(body, MAX_REQUEST_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            metrics::counter!("drover_graphql_requests_total", "result" => "rejected").increment(1);
            return graphql_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::QueryTooLarge,
                format!("request body is larger than {MAX_REQUEST_BYTES} bytes; send a smaller query (use variables and pagination)"),
            );
        }
    };
    let request: async_graphql::Request = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            metrics::counter!("drover_graphql_requests_total", "result" => "rejected").increment(1);
            return graphql_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadUserInput,
                format!("request body is not a GraphQL request ({e}); POST JSON like {{\"query\": \"{{ fleet {{ clusters {{ total }} }} }}\"}}"),
            );
        }
    };
    if request.query.len() > MAX_QUERY_CHARS {
        metrics::counter!("drover_graphql_requests_total", "result" => "rejected").increment(1);
        return graphql_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::QueryTooLarge,
            format!(
                "query text is {} characters, more than {MAX_QUERY_CHARS}; send a smaller query",
                request.query.len()
            ),
        );
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let mut request = request;
    request.data = app.identify(authorization).await;
    let mut response = app.schema.execute(request).await;
    classify_response_errors(&mut response);
    let result = if response.errors.is_empty() {
        "ok"
    } else {
        "error"
    };
    metrics::counter!("drover_graphql_requests_total", "result" => result).increment(1);
    metrics::histogram!("drover_graphql_request_seconds").record(started.elapsed().as_secs_f64());
    let body = match serde_json::to_vec(&response) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "serializing a GraphQL response failed");
            return graphql_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "serializing the response failed; the hub's log has details".into(),
            );
        }
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn readyz(State(AppState(app)): State<AppState>) -> Response {
    match app.store.ping(Duration::from_secs(2)).await {
        Ok(()) => {
            metrics::gauge!("drover_database_up").set(1.0);
            (StatusCode::OK, "ready\n").into_response()
        }
        Err(e) => {
            metrics::gauge!("drover_database_up").set(0.0);
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response()
        }
    }
}

async fn render_metrics(State(AppState(app)): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hubs_own_pages_and_allowed_origins_are_let_through() {
        let allowed = vec!["https://console.example.com".to_owned()];
        assert!(
            origin_allowed(None, Some("hub:8080"), &allowed),
            "not a browser"
        );
        assert!(
            origin_allowed(Some("http://hub:8080"), Some("hub:8080"), &allowed),
            "GraphiQL"
        );
        assert!(origin_allowed(
            Some("https://console.example.com/"),
            Some("hub:8080"),
            &allowed
        ));
        assert!(!origin_allowed(
            Some("https://evil.example"),
            Some("hub:8080"),
            &allowed
        ));
        assert!(!origin_allowed(
            Some("http://hub:8080.evil.example"),
            Some("hub:8080"),
            &allowed
        ));
        assert!(!origin_allowed(Some("null"), Some("hub:8080"), &allowed));
    }
}
