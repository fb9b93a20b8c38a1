#!/usr/bin/env bash
# Runs Headroom locally: a nats-server with JetStream (the pinned binary,
# fetched when missing; store under target/run/) and the allocator.
# Ctrl-C stops both. NATS_PORT picks the client port (4222). Extra arguments
# go to the allocator's environment, e.g.
#   scripts/run.sh HEADROOM_TELEMETRY__FORMAT=json
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
nats_server="$(./scripts/fetch-nats-server.sh)"
port="${NATS_PORT:-4222}"
mkdir -p target/run
"$nats_server" -c nats/nats.conf -a 127.0.0.1 -p "$port" -m 8222 -sd target/run/jetstream \
  -l target/run/nats.log &
nats_pid=$!
trap 'kill "$nats_pid" 2>/dev/null || true' EXIT
cargo build --release -p headroom-allocator
echo "nats-server on nats://127.0.0.1:$port (log: target/run/nats.log); starting the allocator"
env HEADROOM_NATS__URL="nats://127.0.0.1:$port" "$@" target/release/headroom-allocator
