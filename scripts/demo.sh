#!/usr/bin/env bash
# Meet Headroom in one command: a local nats-server (the pinned binary,
# fetched when missing), the allocator, the monitor, a front-end and four
# sample backends with their agents, under a load that rises, falls and
# rises again (about two minutes). It shows what happens live and writes a
# timeline plot to target/demo/timeline.svg. Arguments go to headroom-demo
# (--short, --profile ramp:10-300:30s,..., --backends N, --plot FILE, --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NATS_SERVER_BIN="$(./scripts/fetch-nats-server.sh)"
export NATS_SERVER_BIN
cargo build --release -q -p headroom-demo
exec target/release/headroom-demo "$@"
