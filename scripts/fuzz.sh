#!/usr/bin/env bash
# Runs each fuzz target (cargo fuzz, libFuzzer, on the nightly toolchain)
# for FUZZ_SECONDS seconds from its seeds (fuzz/seeds/<target>, cut from the
# tests), and prints for each: executions, coverage (libFuzzer's edges
# `cov` and features `ft`), the corpus it grew, and what it found. The
# grown corpus is kept in fuzz/corpus/ (not committed), so a later run goes
# on from it. A finding is left in fuzz/artifacts/<target>/ with the
# command that replays it; each one found becomes a regression test in the
# normal suite.
#
#   scripts/fuzz.sh                 # FUZZ_SECONDS=60 TARGETS="http1_request chunked member_answer codec_decode config load_profile"
#   FUZZ_SECONDS=600 TARGETS=chunked scripts/fuzz.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUN_SECONDS="${FUZZ_SECONDS:-60}"
TARGETS="${TARGETS:-http1_request chunked member_answer codec_decode config load_profile}"
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "cargo fuzz needs the nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz from crates.io" >&2
  cargo install cargo-fuzz --locked -q
fi
cargo +nightly fuzz build -O >/dev/null
printf '%-15s %12s %8s %8s %12s  %s\n' target executions cov ft corpus findings
status=0
for target in $TARGETS; do
  corpus="fuzz/corpus/$target"
  mkdir -p "$corpus" "fuzz/artifacts/$target"
  log="$(mktemp)"
  before="$(ls "fuzz/artifacts/$target" | wc -l)"
  # -rss_limit_mb: an input that makes the target allocate past it is a
  # finding (hostile input must not take the machine's memory).
  cargo +nightly fuzz run -O "$target" "$corpus" "fuzz/seeds/$target" -- \
    -max_total_time="$RUN_SECONDS" -rss_limit_mb=2048 -timeout=10 \
    -print_final_stats=1 >"$log" 2>&1 || true
  after="$(ls "fuzz/artifacts/$target" | wc -l)"
  last="$(grep -E '^#[0-9]+' "$log" | tail -1)"
  execs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{ print $2 }')"
  cov="$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")"
  ft="$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")"
  corp="$(sed -nE 's/.* corp: ([0-9]+\/[0-9A-Za-z]+).*/\1/p' <<<"$last")"
  found=$((after - before))
  printf '%-15s %12s %8s %8s %12s  %s\n' "$target" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" \
    "$([[ $found -gt 0 ]] && echo "$found new in fuzz/artifacts/$target" || echo none)"
  if [[ $found -gt 0 ]]; then
    status=1
    grep -E 'panicked|ERROR: libFuzzer|SUMMARY' "$log" | head -5 | sed 's/^/    /'
  fi
  rm -f "$log"
done
echo "($RUN_SECONDS s per target; cargo $(cargo +nightly --version | cut -d' ' -f2))"
exit $status
