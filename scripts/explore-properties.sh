#!/usr/bin/env bash
# Explores many new random cases of the planner's property tests (not part of CI, which replays
# a fixed seed and the committed regressions file). Run it before you stop after touching the
# planner, admission or the simulator.
#
#   scripts/explore-properties.sh [CASES] [ROUNDS]   (defaults: 5000 cases, 4 rounds)
#
# Every round uses a fresh random seed, printed first, so that a failure replays with
#   PROPTEST_RNG_SEED=<seed> PROPTEST_CASES=<cases> cargo test -p drover-hub --test planner_properties
# A failing case is also appended (shrunk) to hub/tests/planner_properties.proptest-regressions:
# commit that line with the fix, and CI replays it first from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-5000}
rounds=${2:-4}
cargo test --locked -p drover-hub --test planner_properties --no-run
for round in $(seq 1 "$rounds"); do
  seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
  echo "==> round $round/$rounds: PROPTEST_RNG_SEED=$seed PROPTEST_CASES=$cases"
  PROPTEST_RNG_SEED=$seed PROPTEST_CASES=$cases \
    cargo test --locked -p drover-hub --test planner_properties
done
