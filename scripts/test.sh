#!/usr/bin/env bash
# Headroom's test command: fetches the pinned nats-server when missing, then
# runs every unit and integration test (integration tests start their own
# nats-server with JetStream per test), then checks formatting and lints.
# With a Docker engine and compose present it then builds the static
# binaries and the images and runs the containerized tests against the
# compose stack, one at a time, tearing each stack down after
# (HEADROOM_CONTAINER_TESTS=0 skips them; =1 requires them).
# The smuggling test sends its corpus through Debian's HAProxy as well,
# installed here when missing (HEADROOM_HAPROXY=0 runs it without).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NATS_SERVER_BIN="${NATS_SERVER_BIN:-$(./scripts/fetch-nats-server.sh)}"
export NATS_SERVER_BIN
echo "using $("$NATS_SERVER_BIN" --version)"
if [[ "${HEADROOM_HAPROXY:-}" == 0 ]]; then
  unset HEADROOM_HAPROXY
  echo "the smuggling test runs without HAProxy (HEADROOM_HAPROXY=0)"
else
  # shellcheck source=scripts/peers.sh
  source scripts/peers.sh
  install_missing haproxy
  HEADROOM_HAPROXY="${HEADROOM_HAPROXY:-$(command -v haproxy)}"
  export HEADROOM_HAPROXY
  echo "using $("$HEADROOM_HAPROXY" -v | head -1)"
fi

# The crash test runs the allocator as a real process (killed with
# SIGKILL): build every binary first, with the tests' profile.
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast -E 'not binary(containers)'
else
  cargo test --workspace --no-fail-fast
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

have_docker() {
  docker info >/dev/null 2>&1 &&
    { docker compose version >/dev/null 2>&1 || docker-compose version >/dev/null 2>&1; }
}
case "${HEADROOM_CONTAINER_TESTS:-auto}" in
  0) echo "containerized tests skipped (HEADROOM_CONTAINER_TESTS=0)" ;;
  *)
    if have_docker; then
      ./scripts/compose.sh build
      if cargo nextest --version >/dev/null 2>&1; then
        HEADROOM_CONTAINER_TESTS=1 cargo nextest run -p headroom-tests --test containers -j 1 --no-fail-fast
      else
        HEADROOM_CONTAINER_TESTS=1 cargo test -p headroom-tests --test containers -- --test-threads 1
      fi
    elif [[ "${HEADROOM_CONTAINER_TESTS:-auto}" == 1 ]]; then
      echo "containerized tests asked for, but there is no Docker engine with compose" >&2
      exit 1
    else
      echo "no Docker engine with compose here: containerized tests not run"
    fi
    ;;
esac
