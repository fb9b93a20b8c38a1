#!/usr/bin/env bash
# The statically linked binaries the images are built from, and the pinned
# nats-server. The explicit --target keeps +crt-static away from
# proc-macro crates.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
./scripts/fetch-nats-server.sh >/dev/null
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --target x86_64-unknown-linux-gnu \
    -p headroom-allocator -p headroom-monitor -p headroom-agent \
    -p headroom-frontend -p headroom-backend -p headroom-cli -p headroom-loadgen
