#!/usr/bin/env bash
# Drover's quick start: builds the hub, loads a demo fleet into the embedded SQLite store in
# ./drover-data (through the same ingest path agents use) and serves GraphiQL on
# http://127.0.0.1:8080/graphql. Ctrl-C stops it; run it again to pick up where it was.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is missing: install the Rust toolchain (rustup) first" >&2; exit 1; }
cargo build --release --locked -p drover-hub
hub=target/release/drover-hub
"$hub" seed --clusters "${DROVER_DEMO_CLUSTERS:-20}" --vms-per-cluster "${DROVER_DEMO_VMS:-50}"
exec "$hub" serve "$@"
