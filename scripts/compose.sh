#!/usr/bin/env bash
# Builds the static binaries the images need, then runs docker compose with
# the given arguments, e.g. `scripts/compose.sh up` or `scripts/compose.sh down -v`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
case "${1:-}" in
  up|build|create|run)
    ./scripts/fetch-nats-server.sh >/dev/null
    # The explicit --target keeps +crt-static away from proc-macro crates.
    RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --target x86_64-unknown-linux-gnu \
        -p headroom-allocator -p headroom-monitor -p headroom-agent \
        -p headroom-frontend -p headroom-backend
    ;;
esac
exec "${compose[@]}" "$@"
