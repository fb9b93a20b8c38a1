#!/usr/bin/env bash
# Headroom's test command: fetches the pinned nats-server when missing, then
# runs every unit and integration test (integration tests start their own
# nats-server with JetStream per test), then checks formatting and lints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NATS_SERVER_BIN="${NATS_SERVER_BIN:-$(./scripts/fetch-nats-server.sh)}"
export NATS_SERVER_BIN
echo "using $("$NATS_SERVER_BIN" --version)"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
