#!/usr/bin/env bash
# Installs QEMU from Debian's packages when missing (used by scripts/test.sh and the quick start).
# Debian 12's qemu-system-x86 replaces a newer backported qemu-utils when it comes in, so it goes
# first and the matching qemu-utils (qemu-img, qemu-nbd) after it.
set -euo pipefail
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
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
