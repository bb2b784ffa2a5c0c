#!/usr/bin/env bash
# Runs the test suite again and again to find flaky tests before CI does (not part of CI).
#
#   scripts/stress-suite.sh suite [RUNS]          the whole CI command (.ci/run) RUNS times
#                                                 (default 5), each in a fresh clone of HEAD
#   scripts/stress-suite.sh guests [RUNS] [LOAD]  every test file that starts QEMU guests RUNS
#                                                 times (default 10) beside LOAD busy loops
#                                                 (default 2) that compete for the CPU
#
# Each run's output goes to target/stress/<mode>-<n>.log; the summary (pass or fail and the
# time of each run) is printed at the end and to target/stress/<mode>-summary.txt. The busy
# loops end with the script. Set STRESS_SHARED_TARGET=0 for the suite mode to build each clone
# from nothing (about 10 minutes more per run on 2 cores); by default the clones share one
# target directory, so only the first run builds everything.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
mode=${1:-}
out="$repo/target/stress"
mkdir -p "$out"
summary="$out/$mode-summary.txt"

busy_pids=()
stop_busy() {
  for pid in "${busy_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop_busy EXIT

record() { # record RUN STATUS SECONDS
  printf '%s run %s: %s in %s s\n' "$mode" "$1" "$2" "$3" | tee -a "$summary"
}

case "$mode" in
  suite)
    runs=${2:-5}
    : >"$summary"
    shared="$out/shared-target"
    for n in $(seq 1 "$runs"); do
      clone=$(mktemp -d /tmp/drover-stress-XXXXXX)
      git clone --quiet --no-hardlinks "$repo" "$clone/drover"
      # .ci/run expects ../shared beside the clone, as in CI.
      [ -d "$repo/../shared" ] && ln -s "$repo/../shared" "$clone/shared"
      start=$(date +%s)
      if [ "${STRESS_SHARED_TARGET:-1}" = 1 ]; then export CARGO_TARGET_DIR="$shared"; fi
      # The guest is built into the clone's target/guest by the test script itself.
      if (cd "$clone/drover" && CI=true bash .ci/run) >"$out/suite-$n.log" 2>&1; then
        status=passed
      else
        status=FAILED
      fi
      record "$n" "$status" "$(($(date +%s) - start))"
      [ "$status" = passed ] && rm -rf "$clone"
    done
    ;;
  guests)
    runs=${2:-10}
    load=${3:-2}
    : >"$summary"
    [ -f target/guest/vmlinuz ] || bash scripts/build-guest.sh target/guest
    cargo build --workspace --all-targets --locked
    for _ in $(seq 1 "$load"); do
      (while :; do :; done) &
      busy_pids+=($!)
    done
    for n in $(seq 1 "$runs"); do
      for target in "drover-e2e live_migration" "drover-e2e evacuation" \
        "drover-e2e qemu_fleet" "drover-e2e guest" \
        "drover-agent qemu_migration" "drover-agent qemu_runtime"; do
        set -- $target
        start=$(date +%s)
        # The tests start the workspace's binaries: build them too (the checkout may have moved
        # on since the last round; `cargo test -p X` alone rebuilds only X's test).
        if cargo build --workspace --all-targets --locked >"$out/guests-$n-$2.log" 2>&1 &&
          cargo test --locked -p "$1" --test "$2" >>"$out/guests-$n-$2.log" 2>&1; then
          status=passed
        else
          status=FAILED
        fi
        record "$n $2" "$status" "$(($(date +%s) - start))"
      done
    done
    ;;
  *)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
echo "summary: $summary"
! grep -q FAILED "$summary"
