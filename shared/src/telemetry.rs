//! The one place logging is set up for every Drover binary.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

/// Installs structured logging: `RUST_LOG` filters (default `info`), `DROVER_LOG_FORMAT=json`
/// switches to JSON lines. Safe to call more than once (later calls are no-ops).
pub fn init() {
    init_with_default("info,sqlx=warn");
}

/// Like [`init`], with another filter when `RUST_LOG` is not set (benchmarks use `warn`).
pub fn init_with_default(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("DROVER_LOG_FORMAT").is_ok_and(|v| v == "json");
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry.with(fmt::layer().json()).try_init()
    } else {
        registry.with(fmt::layer()).try_init()
    };
    let _ = result;
}
