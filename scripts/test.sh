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

if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# QEMU for the test guest. Debian 12's qemu-system-x86 replaces a newer backported qemu-utils
# when it comes in, so it goes first and the matching qemu-utils (qemu-img, qemu-nbd) after it.
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
    || { as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; }
}
if ! command -v qemu-system-x86_64 >/dev/null; then
  echo "==> installing qemu-system-x86"
  apt_install qemu-system-x86
fi
if ! command -v qemu-img >/dev/null || ! command -v qemu-nbd >/dev/null; then
  echo "==> installing qemu-utils"
  apt_install qemu-utils
fi
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
