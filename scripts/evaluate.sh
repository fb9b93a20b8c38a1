#!/usr/bin/env bash
# Headroom's outcome on real traffic, beside the baselines: plays every
# shipped excerpt of traces/ (NASA-HTTP 1995 and a synthetic step and
# spike, two minutes each) through the whole system four times, with
# Headroom, the Kubernetes HPA emulation, a static cluster sized for the
# peak and one sized for the mean, and prints a table of SLO minutes,
# server-seconds against the oracle, elasticity and reaction per excerpt
# (about 40 minutes in all). Arguments go to headroom-evaluate (--excerpt
# NAME, --trace FILE --scale X --speedup S, --strategy headroom,hpa,
# --out DIR, --help); the default is --all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NATS_SERVER_BIN="$(./scripts/fetch-nats-server.sh)"
export NATS_SERVER_BIN
cargo build --release -q -p headroom-evaluate
if [ "$#" -eq 0 ]; then
    set -- --all
fi
exec target/release/headroom-evaluate "$@"
