//! The one place logging and tracing are set up for every Drover binary: structured logs, OTLP
//! export of migration spans when an endpoint is configured, and the W3C trace context that
//! carries one migration's trace across hub, commands and agents.
//!
//! Spans meant for export use the target [`MIGRATION_TRACE_TARGET`]; only those reach the OTLP
//! exporter, whatever `RUST_LOG` says, so a quiet log level never loses a trace and the exporter
//! never carries the chatter of ordinary logs.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::{fmt, prelude::*, EnvFilter, Layer};

/// The `tracing` target of the spans that make up a migration's trace.
pub const MIGRATION_TRACE_TARGET: &str = "drover::migration";

/// How long one export request may take before the exporter gives up on it.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Installs structured logging: `RUST_LOG` filters (default `info`), `DROVER_LOG_FORMAT=json`
/// switches to JSON lines. Safe to call more than once (later calls are no-ops).
pub fn init() {
    init_with_default("info,sqlx=warn");
}

/// Like [`init`], with another filter when `RUST_LOG` is not set (benchmarks use `warn`).
pub fn init_with_default(default_filter: &str) {
    let _ = install(default_filter, None);
}

/// Where and as whom a process exports its spans.
#[derive(Debug, Clone, Default)]
pub struct TraceExport {
    /// The OTLP/HTTP base URL (as `OTEL_EXPORTER_OTLP_ENDPOINT`): spans go to `<base>/v1/traces`.
    pub endpoint: String,
    /// `service.name` of this process (`drover-hub`, `drover-agent`).
    pub service: String,
    /// More resource attributes, e.g. the agent's cluster.
    pub attributes: Vec<(String, String)>,
}

/// Owns the span exporter of a process; dropping it (or [`Telemetry::shutdown`]) flushes what
/// is still buffered.
#[must_use = "dropping the guard stops exporting spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans leave this process.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends what is buffered and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "flushing the last spans to the OTLP endpoint failed");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Logging as [`init`], plus OTLP export of migration spans when `export` names an endpoint.
/// A bad endpoint is an error that says what to fix; nothing is set up then.
pub fn init_with_export(export: Option<TraceExport>) -> Result<Telemetry, String> {
    install("info,sqlx=warn", export)
}

fn install(default_filter: &str, export: Option<TraceExport>) -> Result<Telemetry, String> {
    let provider = match export {
        Some(export) => Some(tracer_provider(&export)?),
        None => None,
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("DROVER_LOG_FORMAT").is_ok_and(|v| v == "json");
    // Logs go to stderr: stdout is the program's output (an address, a token's secret).
    let logs = if json {
        fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("drover"))
            .with_filter(Targets::new().with_target(MIGRATION_TRACE_TARGET, tracing::Level::INFO))
    });
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()
        .is_ok();
    if let Some(provider) = &provider {
        if installed {
            opentelemetry::global::set_tracer_provider(provider.clone());
        }
    }
    Ok(Telemetry {
        provider: provider.filter(|_| installed),
    })
}

fn tracer_provider(export: &TraceExport) -> Result<SdkTracerProvider, String> {
    let base = export.endpoint.trim().trim_end_matches('/');
    let uri: reqwest::Url = base.parse().map_err(|e| {
        format!(
            "the OTLP endpoint {:?} is not a URL ({e}); give the collector's OTLP/HTTP base URL, e.g. http://collector:4318",
            export.endpoint
        )
    })?;
    if !matches!(uri.scheme(), "http" | "https") {
        return Err(format!(
            "the OTLP endpoint {:?} must be http:// or https:// (OTLP over HTTP with protobuf)",
            export.endpoint
        ));
    }
    let client = OtlpHttpClient::new()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(format!("{base}/v1/traces"))
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot set up the OTLP exporter: {e}"))?;
    let mut resource = Resource::builder().with_service_name(export.service.clone());
    for (key, value) in &export.attributes {
        resource = resource.with_attribute(KeyValue::new(key.clone(), value.clone()));
    }
    // A migration has a few dozen spans: send them within a second rather than the spec's
    // five, so a trace is complete soon after the migration ends (OTEL_BSP_* still apply).
    let mut batching = BatchConfigBuilder::default();
    if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
        batching = batching.with_scheduled_delay(Duration::from_secs(1));
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batching.build())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_id_generator(RecordedOrRandomIds::default())
        .with_resource(resource.build())
        .build())
}

/// The exporter's HTTP client: the workspace's reqwest (rustls), driven on a runtime of its
/// own so that the batch processor's thread can wait for it without a runtime of its own.
#[derive(Debug)]
struct OtlpHttpClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    /// Keeps the runtime alive while the exporter lives.
    _owner: std::sync::Arc<tokio::runtime::Runtime>,
}

impl OtlpHttpClient {
    fn new() -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the OTLP exporter's thread: {e}"))?;
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot set up the OTLP exporter's HTTP client: {e}"))?;
        Ok(Self {
            client,
            runtime: runtime.handle().clone(),
            _owner: std::sync::Arc::new(runtime),
        })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttpClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let request = reqwest::Request::try_from(request.map(reqwest::Body::from))?;
        let client = self.client.clone();
        let answer = self
            .runtime
            .spawn(async move {
                let response = client.execute(request).await?;
                let status = response.status();
                let body = response.bytes().await?;
                Ok::<_, reqwest::Error>((status, body))
            })
            .await??;
        let (status, body) = answer;
        Ok(opentelemetry_http::Response::builder()
            .status(status.as_u16())
            .body(body)?)
    }
}

/// The W3C `traceparent` of `span`, if it is part of an exported trace.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| traceparent(span_context.trace_id(), span_context.span_id()))
}

/// Makes `span` a child of the remote span `traceparent` names (a command's or a peer's).
/// Without a valid one the span starts a trace of its own.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(parent) = traceparent.and_then(parse_traceparent) {
        let _ = span.set_parent(Context::new().with_remote_span_context(parent));
    }
}

/// A W3C `traceparent` header value for a sampled span.
pub fn traceparent(trace_id: TraceId, span_id: SpanId) -> String {
    let context = Context::new().with_remote_span_context(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// The span a W3C `traceparent` value names, if it is well formed.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([("traceparent".to_owned(), value.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// A span whose times and ids were decided elsewhere (the hub records a migration's phases in
/// its database and exports each span when it ends, also after a restart).
#[derive(Debug, Clone)]
pub struct RecordedSpan {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// None for a trace's root span.
    pub parent: Option<SpanId>,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// Marks the span failed, with this description.
    pub error: Option<String>,
}

thread_local! {
    /// The ids [`export_recorded`] wants for the span it is starting on this thread.
    static RECORDED_IDS: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// Gives a recorded span the ids it was recorded with, and every other span random ones.
#[derive(Debug, Default)]
struct RecordedOrRandomIds {
    random: RandomIdGenerator,
}

impl IdGenerator for RecordedOrRandomIds {
    fn new_trace_id(&self) -> TraceId {
        match RECORDED_IDS.with(Cell::get) {
            Some((trace_id, _)) => trace_id,
            None => self.random.new_trace_id(),
        }
    }

    fn new_span_id(&self) -> SpanId {
        match RECORDED_IDS.with(Cell::get) {
            Some((_, span_id)) => span_id,
            None => self.random.new_span_id(),
        }
    }
}

/// Hands a recorded span to the exporter (a no-op when nothing is configured).
pub fn export_recorded(service: &'static str, recorded: RecordedSpan) {
    let tracer = opentelemetry::global::tracer(service);
    let parent = match recorded.parent {
        Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
            recorded.trace_id,
            parent,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        )),
        None => Context::new(),
    };
    let builder = tracer
        .span_builder(recorded.name)
        .with_kind(SpanKind::Internal)
        .with_start_time(recorded.start)
        .with_attributes(recorded.attributes);
    RECORDED_IDS.with(|ids| ids.set(Some((recorded.trace_id, recorded.span_id))));
    let mut span = builder.start_with_context(&tracer, &parent);
    RECORDED_IDS.with(|ids| ids.set(None));
    if let Some(error) = recorded.error {
        span.set_status(Status::error(error));
    } else {
        span.set_status(Status::Ok);
    }
    span.end_with_timestamp(recorded.end.max(recorded.start));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips() {
        let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let span = SpanId::from_hex("00f067aa0ba902b7").unwrap();
        let value = traceparent(trace, span);
        assert_eq!(
            value,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let parsed = parse_traceparent(&value).unwrap();
        assert_eq!(parsed.trace_id(), trace);
        assert_eq!(parsed.span_id(), span);
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_endpoint_says_what_to_give() {
        let err = tracer_provider(&TraceExport {
            endpoint: "collector:4318".into(),
            service: "test".into(),
            attributes: vec![],
        })
        .unwrap_err();
        assert!(err.contains("http://"), "{err}");
    }
}
