#!/usr/bin/env bash
# Drover's quick start, on embedded defaults (SQLite in ./drover-data, no database to set up):
#  - builds the hub and the agent, loads a synthetic demo fleet through the ingest path agents use;
#  - serves GraphiQL on http://127.0.0.1:8080/graphql and the agent endpoint on 127.0.0.1:8443;
#  - joins two real agents (clusters demo-east and demo-west, data in ./drover-agents/) whose
#    QEMU runtime runs one demo guest each (installs QEMU and builds the guest when missing).
# Ctrl-C stops everything, guests included; run it again to pick up where it was.
# DROVER_DEMO_AGENTS=0 skips the agents; DROVER_DEMO_CLUSTERS / DROVER_DEMO_VMS size the fleet.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is missing: install the Rust toolchain (rustup) first" >&2; exit 1; }
agents=${DROVER_DEMO_AGENTS:-2}
cargo build --release --locked -p drover-hub -p drover-agent
hub=target/release/drover-hub
agent=target/release/drover-agent
if [ ! -e drover-data/drover.sqlite ]; then
  "$hub" seed --clusters "${DROVER_DEMO_CLUSTERS:-20}" --vms-per-cluster "${DROVER_DEMO_VMS:-50}"
fi
if [ "$agents" = 0 ]; then
  exec "$hub" serve "$@"
fi

bash scripts/install-qemu.sh
if ! command -v curl >/dev/null; then
  if [ "$(id -u)" -eq 0 ]; then apt-get install -y -qq curl || { apt-get update -qq && apt-get install -y -qq curl; }
  else sudo apt-get install -y -qq curl || { sudo apt-get update -qq && sudo apt-get install -y -qq curl; }; fi
fi
# The demo guests are tiny; TCG runs them everywhere (set DROVER_QEMU_ACCEL=auto for KVM).
export DROVER_QEMU_ACCEL=${DROVER_QEMU_ACCEL:-tcg}
bash scripts/build-guest.sh target/guest
guest=$(cd target/guest && pwd)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # The agents never stop guests (a restarted agent adopts them); the demo does, on exit.
  for f in drover-agents/*/vms/*/*/qemu.pid; do
    [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap "exit 130" INT TERM
"$hub" serve "$@" &
pids+=($!)
graphql=http://127.0.0.1:8080/graphql
for _ in $(seq 1 60); do curl -fsS -o /dev/null http://127.0.0.1:8080/readyz 2>/dev/null && break; sleep 1; done

names=(demo-east demo-west)
for i in $(seq 0 $((agents - 1))); do
  name=${names[$i]:-demo-$i}
  dir=drover-agents/$name
  vm=$dir/vms/demo/$name-guest
  if [ ! -e "$vm/vm.json" ]; then
    mkdir -p "$vm"
    cat >"$vm/vm.json" <<JSON
{"namespace": "demo", "name": "$name-guest", "memoryBytes": 201326592, "vcpus": 1,
 "disks": [{"name": "root", "sizeBytes": 67108864}],
 "interfaces": [{"name": "nic0", "network": "default", "mac": "02:d0:00:00:00:0$i"}],
 "labels": {"app": "demo"}, "runStrategy": "Always",
 "boot": {"kernel": "$guest/vmlinuz", "initrd": "$guest/initramfs.gz",
          "cmdline": "console=ttyS0 quiet panic=-1 drover.disk_writes=1"}}
JSON
  fi
  join=()
  if [ ! -e "$dir/agent-cert.pem" ]; then
    token=$(curl -fsS "$graphql" -H 'content-type: application/json' \
      -d "{\"query\":\"mutation { createJoinToken(cluster: \\\"$name\\\") { token } }\"}" \
      | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
    join=(--cluster "$name" --join-token "$token")
  fi
  "$agent" --hub https://127.0.0.1:8443 --data-dir "$dir" --runtime qemu "${join[@]}" &
  pids+=($!)
done
echo "demo agents started; their guests: { virtualMachines(filter: {namespace: \"demo\"}) { edges { node { cluster { name } name phase } } } }"
wait "${pids[0]}"
