#!/usr/bin/env bash
# The crash test, long: two allocator processes and the nats-server killed
# with SIGKILL many times while requests flow (some duplicated, some past
# the de-duplication window), then every invariant checked on the full KV
# history. Prints the test's figures.
#
#   scripts/soak-crash.sh                 # 500 allocator kills, 50 nats-server kills
#   KILLS=100 NATS_KILLS=10 scripts/soak-crash.sh
#   HEADROOM_ALLOCATOR_BIN=/path/to/older/headroom-allocator scripts/soak-crash.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NATS_SERVER_BIN="${NATS_SERVER_BIN:-$(./scripts/fetch-nats-server.sh)}"
export NATS_SERVER_BIN
export HEADROOM_CRASH_KILLS="${KILLS:-500}"
export HEADROOM_CRASH_NATS_KILLS="${NATS_KILLS:-50}"
export HEADROOM_CRASH_REQUESTS="${REQUESTS:-1000}"
cargo build --quiet -p headroom-allocator
cargo test --quiet -p headroom-tests --test integration -- \
  --exact crash::sigkilled_allocators_and_nats_server_never_apply_a_request_twice --nocapture
