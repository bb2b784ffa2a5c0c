#!/usr/bin/env bash
# Drover's quick start, on embedded defaults (SQLite in ./drover-data, no database to set up):
#  - builds the hub and the agent, loads a synthetic demo fleet through the ingest path agents use;
#  - serves GraphiQL on http://127.0.0.1:8080/graphql and the agent endpoint on 127.0.0.1:8443
#    (arguments go to `drover-hub serve`: --listen ADDR / --agent-listen ADDR / --data-dir DIR, or
#    DROVER_LISTEN / DROVER_AGENT_LISTEN / DROVER_DATA_DIR, move them);
#  - joins two real agents (clusters demo-east and demo-west, data in ./drover-agents/) whose
#    QEMU runtime runs one demo guest each (installs QEMU and builds the guest when missing); the
#    agents listen on loopback only (sync endpoints 127.0.0.1:9185 and 127.0.0.1:9186);
#  - once both clusters are Ready and a guest runs, prints a mutation that live-migrates it.
# Ctrl-C stops everything, guests included; run it again to pick up where it was.
# Environment: DROVER_DEMO_AGENTS=0 skips the agents; DROVER_DEMO_CLUSTERS / DROVER_DEMO_VMS size
# the fleet; DROVER_DEMO_DIR (default ./drover-agents) holds the agents' data;
# DROVER_DEMO_SYNC_PORT_BASE (default 9185) is the first agent's sync port, the next ones follow;
# DROVER_QUICKSTART_BIN_DIR uses drover-hub and drover-agent from that directory instead of
# building them; DROVER_QUICKSTART_READY_SECS (default 60) and DROVER_QUICKSTART_DEMO_SECS
# (default 300) bound the waits for the hub and for the demo guests.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "quickstart: error: $*" >&2; exit 1; }

# The hub's addresses and data dir, as `drover-hub serve` will see them.
listen=${DROVER_LISTEN:-127.0.0.1:8080}
agent_listen=${DROVER_AGENT_LISTEN:-127.0.0.1:8443}
data_dir=${DROVER_DATA_DIR:-./drover-data}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  a=${args[$i]}
  case "$a" in
    --listen | --agent-listen | --data-dir)
      [ $((i + 1)) -lt ${#args[@]} ] || die "$a needs a value"
      v=${args[$((i + 1))]}
      case "$a" in --listen) listen=$v ;; --agent-listen) agent_listen=$v ;; --data-dir) data_dir=$v ;; esac ;;
    --listen=*) listen=${a#--listen=} ;;
    --agent-listen=*) agent_listen=${a#--agent-listen=} ;;
    --data-dir=*) data_dir=${a#--data-dir=} ;;
  esac
done
# Where a client reaches an address the hub listens on (all addresses: this host's loopback).
reach() {
  case "$1" in
    0.0.0.0:*) echo "127.0.0.1:${1#0.0.0.0:}" ;;
    "[::]:"*) echo "[::1]:${1#\[::\]:}" ;;
    *) echo "$1" ;;
  esac
}
api=http://$(reach "$listen")
graphql=$api/graphql
hub_url=https://$(reach "$agent_listen")
# The seed and the hub both read it (a --data-dir argument still wins for the hub).
export DROVER_DATA_DIR=$data_dir
demo_dir=${DROVER_DEMO_DIR:-./drover-agents}
sync_base=${DROVER_DEMO_SYNC_PORT_BASE:-9185}
agents=${DROVER_DEMO_AGENTS:-2}
[[ $agents =~ ^[0-9]+$ ]] || die "DROVER_DEMO_AGENTS=$agents is not a number"
[[ $sync_base =~ ^[0-9]+$ ]] || die "DROVER_DEMO_SYNC_PORT_BASE=$sync_base is not a port number"

if [ -n "${DROVER_QUICKSTART_BIN_DIR:-}" ]; then
  hub=$DROVER_QUICKSTART_BIN_DIR/drover-hub
  agent=$DROVER_QUICKSTART_BIN_DIR/drover-agent
  for b in "$hub" "$agent"; do
    [ -x "$b" ] || die "$b is missing: build it (cargo build -p drover-hub -p drover-agent) or unset DROVER_QUICKSTART_BIN_DIR"
  done
else
  command -v cargo >/dev/null || die "cargo is missing: install the Rust toolchain (rustup) first"
  cargo build --release --locked -p drover-hub -p drover-agent
  hub=target/release/drover-hub
  agent=target/release/drover-agent
fi
if [ ! -e "$data_dir/drover.sqlite" ]; then
  "$hub" seed --clusters "${DROVER_DEMO_CLUSTERS:-20}" --vms-per-cluster "${DROVER_DEMO_VMS:-50}"
fi
# A hub that authenticates API calls gets an admin token for the demo, made once and kept in the
# data dir (readable by this user only); curl reads the header from that file, never from argv.
auth_file=$data_dir/quickstart-auth-header
if "$hub" token --help >/dev/null 2>&1 && [ ! -s "$auth_file" ]; then
  secret=$("$hub" token create --name "quickstart-$(date +%Y%m%d%H%M%S)-$$" --role admin 2>/dev/null \
    | grep -E '^drover_[0-9A-Za-z_]+$' | tail -n 1 || true)
  [ -n "$secret" ] || die "cannot create an API token for the demo (drover-hub token create failed; run it by hand to see why)"
  (umask 077 && printf 'Authorization: Bearer %s\n' "$secret" >"$auth_file")
  unset secret
fi
auth=()
[ -s "$auth_file" ] && auth=(-H "@$auth_file")
if [ "$agents" = 0 ]; then
  [ -s "$auth_file" ] && echo "API calls need the header in $auth_file"
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
# The agents boot the demo guests' kernel and initrd from there (agents read boot files and
# images only from their image directories).
export DROVER_IMAGE_DIRS=$guest${DROVER_IMAGE_DIRS:+,$DROVER_IMAGE_DIRS}

pids=()
alive() { kill -0 "$1" 2>/dev/null; }
# Waits up to $1 half-seconds for the pids that follow to exit, then kills what is left.
reap() {
  local tries=$1 p left
  shift
  for ((t = 0; t < tries; t++)); do
    left=0
    for p in "$@"; do alive "$p" && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.5
  done
  for p in "$@"; do alive "$p" && kill -9 "$p" 2>/dev/null; done
  return 0
}
cleanup() {
  trap - EXIT INT TERM
  local p f q qemus=()
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ ${#pids[@]} -eq 0 ] || reap 30 "${pids[@]}"
  # The agents never stop guests (a restarted agent adopts them); the demo does, on exit. A pid
  # counts only when that QEMU's command line names its pidfile (pids are reused).
  for f in "$demo_dir"/*/vms/*/*/qemu.pid; do
    [ -s "$f" ] || continue
    q=$(cat "$f" 2>/dev/null) || continue
    [[ $q =~ ^[0-9]+$ ]] || continue
    if tr '\0' ' ' <"/proc/$q/cmdline" 2>/dev/null | grep -qF -- "${f#"$demo_dir"/}"; then
      kill "$q" 2>/dev/null || true
      qemus+=("$q")
    fi
  done
  [ ${#qemus[@]} -eq 0 ] || reap 20 "${qemus[@]}"
}
trap cleanup EXIT
trap "exit 130" INT TERM

"$hub" serve "$@" &
hub_pid=$!
pids+=("$hub_pid")
ready_secs=${DROVER_QUICKSTART_READY_SECS:-60}
deadline=$((SECONDS + ready_secs))
until curl -fsS -o /dev/null --max-time 2 "$api/readyz" 2>/dev/null; do
  alive "$hub_pid" || die "the hub exited before it became ready (its messages are above; a port in use? pass --listen ADDR / --agent-listen ADDR)"
  [ "$SECONDS" -lt "$deadline" ] || die "the hub is not ready at $api/readyz after ${ready_secs}s (its messages are above; is --listen right? DROVER_QUICKSTART_READY_SECS waits longer); stopping"
  sleep 1
done

gql() { curl -fsS --max-time 20 "$graphql" "${auth[@]}" -H 'content-type: application/json' -d "$1"; }
names=(demo-east demo-west)
clusters=()
for ((i = 0; i < agents; i++)); do
  name=${names[$i]:-demo-$i}
  clusters+=("$name")
  dir=$demo_dir/$name
  port=$((sync_base + i))
  if [ ! -e "$dir/agent-cert.pem" ]; then
    # First start: declare the demo guest (later starts keep wherever it went, e.g. after a
    # migration) and join with a one-time token, passed in the environment, never in argv.
    vm=$dir/vms/demo/$name-guest
    mkdir -p "$vm"
    [ -e "$vm/vm.json" ] || cat >"$vm/vm.json" <<JSON
{"namespace": "demo", "name": "$name-guest", "memoryBytes": 201326592, "vcpus": 1,
 "disks": [{"name": "root", "sizeBytes": 67108864}],
 "interfaces": [{"name": "nic0", "network": "default", "mac": "02:d0:00:00:00:0$i"}],
 "labels": {"app": "demo"}, "runStrategy": "Always",
 "boot": {"kernel": "$guest/vmlinuz", "initrd": "$guest/initramfs.gz",
          "cmdline": "console=ttyS0 quiet panic=-1 drover.disk_writes=1"}}
JSON
    answer=$(gql "{\"query\":\"mutation { createJoinToken(cluster: \\\"$name\\\") { token } }\"}") \
      || die "cannot ask the hub at $graphql for a join token for $name"
    token=$(sed -n 's/.*"token":"\([^"]*\)".*/\1/p' <<<"$answer")
    [ -n "$token" ] || die "the hub gave no join token for $name: $answer"
    DROVER_CLUSTER=$name DROVER_JOIN_TOKEN=$token \
      "$agent" --hub "$hub_url" --data-dir "$dir" --runtime qemu --image-dir "$guest" --sync-listen "127.0.0.1:$port" &
    unset token
  else
    "$agent" --hub "$hub_url" --data-dir "$dir" --runtime qemu --image-dir "$guest" --sync-listen "127.0.0.1:$port" &
  fi
  pids+=($!)
done

# Wait until every demo cluster is Ready and a demo guest runs, then say how to move it.
demo_secs=${DROVER_QUICKSTART_DEMO_SECS:-300}
deadline=$((SECONDS + demo_secs))
query='{ '
for ((i = 0; i < agents; i++)); do query+="c$i: cluster(name: \\\"${clusters[$i]}\\\") { health } "; done
query+='virtualMachines(filter: {namespace: \"demo\"}) { edges { node { cluster { name } name phase } } } }'
running=
while :; do
  for ((i = 0; i < ${#pids[@]}; i++)); do
    alive "${pids[$i]}" || die "$([ "$i" = 0 ] && echo "the hub" || echo "the agent of ${clusters[$((i - 1))]}") exited (its messages are above); stopping"
  done
  answer=$(gql "{\"query\":\"$query\"}" 2>/dev/null || true)
  ready=$(grep -o '"health":"READY"' <<<"$answer" | wc -l || true)
  running=$(grep -o '"cluster":{"name":"[^"]*"},"name":"[^"]*","phase":"RUNNING"' <<<"$answer" | head -n 1 || true)
  [ "$ready" -ge "$agents" ] && [ -n "$running" ] && break
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "quickstart: warning: after ${demo_secs}s the demo clusters are not all Ready or no demo guest runs yet (the agents' messages are above); they keep trying. Watch: { virtualMachines(filter: {namespace: \"demo\"}) { edges { node { cluster { name } name phase } } } }" >&2
    running=
    break
  fi
  sleep 2
done

echo
echo "==> Drover's quick start is up"
echo "GraphQL endpoint: $graphql (GraphiQL in a browser; subscriptions over WebSocket at ${api/http:/ws:}/graphql/ws)"
echo "Agent endpoint: $hub_url; demo clusters: ${clusters[*]} (data in $demo_dir/)"
if [ -s "$auth_file" ]; then
  echo "API token (admin, for this demo; kept in $auth_file): send the header"
  echo "  $(cat "$auth_file")"
  echo "  (in GraphiQL: the Headers tab, {\"Authorization\": \"Bearer …\"})"
fi
if [ -n "$running" ] && [ "$agents" -ge 2 ]; then
  source=$(sed 's/^"cluster":{"name":"\([^"]*\)"}.*/\1/' <<<"$running")
  vm=$(sed 's/.*},"name":"\([^"]*\)".*/\1/' <<<"$running")
  target=
  for c in "${clusters[@]}"; do [ "$c" != "$source" ] && { target=$c; break; }; done
  echo "Live-migrate the demo guest $vm from $source to $target (paste into GraphiQL):"
  echo "  mutation { migrateVirtualMachine(input: {cluster: \"$source\", namespace: \"demo\", name: \"$vm\", targetCluster: \"$target\"}) { id phase } }"
  echo "Watch it (subscription, e.g. in GraphiQL):"
  echo "  subscription { migrationEvents { migrationId vmName sourceCluster targetCluster phase bytesRemaining } }"
  echo "or poll it with the id the mutation returned:"
  echo "  { migration(id: \"ID\") { phase phaseTimestamps { phase at } progress { bytesTotal bytesRemaining } failureReason } }"
fi
echo "Where the demo guests run:"
echo "  { virtualMachines(filter: {namespace: \"demo\"}) { edges { node { cluster { name } name phase } } } }"
echo "Ctrl-C stops the hub, the agents and the guests."
wait "$hub_pid"
