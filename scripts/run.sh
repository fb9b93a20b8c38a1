#!/usr/bin/env bash
# Runs Headroom locally: a nats-server with JetStream (the pinned binary,
# fetched when missing; store under target/run/), the allocator, the
# monitor, and an agent for this machine (server "local", registered in the
# pool). Ctrl-C stops them all. NATS_PORT picks the client port (4222).
# Extra arguments go to the services' environment, e.g.
#   scripts/run.sh HEADROOM_TELEMETRY__FORMAT=json HEADROOM_MONITOR__DRY_RUN=true
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
nats_server="$(./scripts/fetch-nats-server.sh)"
port="${NATS_PORT:-4222}"
mkdir -p target/run
cargo build --release -p headroom-allocator -p headroom-monitor -p headroom-agent
"$nats_server" -c nats/nats.conf -a 127.0.0.1 -p "$port" -m 8222 -sd target/run/jetstream \
  -l target/run/nats.log &
pids=($!)
trap 'kill "${pids[@]}" 2>/dev/null || true; wait' EXIT INT TERM
export HEADROOM_NATS__URL="nats://127.0.0.1:$port"
echo "nats-server on $HEADROOM_NATS__URL (log: target/run/nats.log)"
env "$@" target/release/headroom-allocator &
pids+=($!)
env "$@" target/release/headroom-monitor &
pids+=($!)
env HEADROOM_AGENT__SERVER=local HEADROOM_AGENT__ADDRESS=127.0.0.1 HEADROOM_AGENT__PORT=8080 \
  "$@" target/release/headroom-agent &
pids+=($!)
wait -n
