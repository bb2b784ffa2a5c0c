#!/usr/bin/env bash
# Runs every check and test of Drover on a fresh Debian machine: installs the system packages the
# tests need when they are missing, then format check, clippy, one build, one test run.
# The tests start their own throwaway PostgreSQL (or use DATABASE_URL when it is set).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v runuser >/dev/null || missing+=(util-linux)
command -v pg_isready >/dev/null || missing+=(postgresql-client)
# A real Prometheus scrapes the hub in the evacuation test.
command -v prometheus >/dev/null || missing+=(prometheus)

if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# QEMU for the test guest and the agent's qemu runtime.
bash scripts/install-qemu.sh
command -v cargo >/dev/null || { echo "cargo is missing: install the Rust toolchain (rustup) first" >&2; exit 1; }

echo "==> test guest (scripts/build-guest.sh)"
bash scripts/build-guest.sh target/guest
echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> build"
cargo build --workspace --all-targets --locked
echo "==> tests"
cargo test --workspace --locked
