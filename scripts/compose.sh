#!/usr/bin/env bash
# Builds the static binaries and the images, then runs docker compose with
# the given arguments, e.g. `scripts/compose.sh up -d` or
# `scripts/compose.sh down -v`. `--cluster` first selects the 3-node NATS
# variant (docker-compose.cluster.yml, KV replicated R3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
files=(-f docker-compose.yml)
if [[ "${1:-}" == "--cluster" ]]; then
  shift
  files+=(-f docker-compose.cluster.yml)
  export HEADROOM_NATS_URLS="nats://nats:4222,nats://nats-2:4222,nats://nats-3:4222"
  export HEADROOM_NATS_REPLICAS=3
fi
# Images are built from the static binaries, so those come first; the
# load profile is included so the loadgen image is built too.
for arg in "$@"; do
  case "$arg" in
    build)
      ./scripts/build-static.sh
      exec "${compose[@]}" "${files[@]}" --profile load "$@"
      ;;
    up|create|run)
      ./scripts/build-static.sh
      "${compose[@]}" "${files[@]}" --profile load build
      break
      ;;
  esac
done
exec "${compose[@]}" "${files[@]}" "$@"
