#!/usr/bin/env bash
# Counted cost per request of Headroom's front-end, nginx and HAProxy as
# reverse proxies in front of the same sample backend: the proxy process's
# user-space instructions (valgrind --tool=callgrind) and its system calls
# (strace -c -f), over REQUESTS requests on CONNECTIONS kept-alive
# connections. Counts, unlike times, repeat on a shared machine: callgrind
# counts the same instructions whatever else runs beside it.
#
# Each proxy runs one worker (one thread or process), so that the figures
# are per request and not per scheduling of several. The counters are
# zeroed after WARMUP requests, so start-up and the first connections are
# left out. Kernel time is not in the instruction counts; the system calls
# are what stands for it.
#
#   scripts/bench-proxy-counts.sh   # REQUESTS=20000 CONNECTIONS=16 WARMUP=2000 FRONTEND=target/release/headroom-frontend PROFILES= PROXIES="headroom nginx haproxy"
#
# FRONTEND names another front-end binary (an older build, to compare);
# PROFILES names a directory to keep the callgrind profiles in, for
# callgrind_annotate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REQUESTS="${REQUESTS:-20000}"
CONNECTIONS="${CONNECTIONS:-16}"
WARMUP="${WARMUP:-2000}"
FRONTEND="${FRONTEND:-target/release/headroom-frontend}"
PROFILES="${PROFILES:-}"
PROXIES="${PROXIES:-headroom nginx haproxy}"
source scripts/peers.sh
install_missing nginx haproxy valgrind strace
cargo build --release -q -p headroom-frontend -p headroom-backend

work="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" $(cat "$work/started" 2>/dev/null) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

BACKEND=18280 PROXY=18281
# The front-end listens with SO_REUSEPORT: a stale listener on the port
# would take part of the requests and make the counts a fraction.
for port in $BACKEND $PROXY; do
  if ss -Htln "sport = :$port" | grep -q .; then
    echo "port $port is in use already: $(ss -Htlnp "sport = :$port")" >&2
    exit 1
  fi
done
export HEADROOM_TELEMETRY__FILTER=warn
HEADROOM_BACKEND__NAME=bench HEADROOM_BACKEND__LISTEN="127.0.0.1:$BACKEND" \
  HEADROOM_BACKEND__SIZE=1024 target/release/headroom-backend &
pids+=($!)

# A fixed count of requests (wrk runs for a duration, whatever its script
# says), on CONNECTIONS kept-alive HTTP/1.1 connections; prints how many
# were answered 200.
cat >"$work/count.py" <<'PY'
import asyncio, sys

port, count, connections = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
request = b"GET /api/item HTTP/1.1\r\nHost: bench\r\nAccept: */*\r\n\r\n"
left, ok = count, 0


async def one_connection():
    global left, ok
    reader = writer = None
    while left > 0:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        left -= 1
        writer.write(request)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            # Closed by the proxy (a limit of requests per connection):
            # the request goes again on a new one.
            left += 1
            writer.close()
            writer = None
            continue
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        ok += head.startswith(b"HTTP/1.1 200")
    if writer is not None:
        writer.close()


async def main():
    await asyncio.gather(*(one_connection() for _ in range(connections)))


asyncio.run(main())
print(ok)
PY
load() { python3 "$work/count.py" "$PROXY" "$1" "$CONNECTIONS"; }
ready() {
  for _ in $(seq 300); do
    curl -fs -o /dev/null "http://127.0.0.1:$1/warm" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing answers on port $1" >&2
  return 1
}
ready "$BACKEND"

headroom_routing "$work/routing.json" "$BACKEND"
nginx_conf "$work" 1 "$BACKEND" "$PROXY"
haproxy_conf "$work" 1 "$BACKEND" "$PROXY"

# Starts one proxy, with "$@" in front of its command (a counter, or
# nothing), and prints its pid.
start() {
  local name="$1"
  shift
  case "$name" in
  headroom)
    HEADROOM_NATS__URL=nats://127.0.0.1:1 HEADROOM_FRONTEND__CLUSTER=bench \
      HEADROOM_FRONTEND__LISTEN="127.0.0.1:$PROXY" HEADROOM_FRONTEND__WORKERS=1 \
      HEADROOM_FRONTEND__LAST_KNOWN_GOOD="$work/routing.json" \
      "$@" "$FRONTEND" >"$work/$name.log" 2>&1 &
    ;;
  nginx) "$@" nginx -c "$work/nginx.conf" >"$work/$name.log" 2>&1 & ;;
  haproxy) "$@" haproxy -f "$work/haproxy.cfg" >"$work/$name.log" 2>&1 & ;;
  esac
  echo $!
  echo $! >>"$work/started"
}
# The proxies are started in a command substitution, so they are not this
# shell's children to wait for: gone is when kill -0 fails.
stop() {
  kill "$1" 2>/dev/null || true
  for _ in $(seq 300); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$1" 2>/dev/null || true
}

# Prints "instructions_per_request" and leaves the annotated profile in
# $work/$name.annotate.
instructions() {
  local name="$1" pid n total dump
  pid="$(start "$name" valgrind --tool=callgrind --callgrind-out-file="$work/$name.cg.%p" -q)"
  ready "$PROXY"
  load "$WARMUP" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  n="$(load "$REQUESTS")"
  callgrind_control -d "$pid" >/dev/null 2>&1
  stop "$pid"
  # The dump asked for is the second file (the first is the one at exit).
  dump="$(ls -1 "$work/$name.cg.$pid".* 2>/dev/null | sort -V | head -1)"
  total="$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")"
  # Exclusive costs; the functions still on the stack at the dump (the
  # threads' entry points) show as 100 % and are left out.
  callgrind_annotate --inclusive=no --threshold=100 "$dump" 2>/dev/null |
    grep -E '^ *[0-9,]+ +\( *[0-9.]+%\) ' | grep -v '(100.0%)' | head -25 >"$work/$name.annotate" || true
  if [[ -n "$PROFILES" ]]; then
    mkdir -p "$PROFILES"
    cp "$dump" "$PROFILES/$name.callgrind"
  fi
  awk -v t="$total" -v n="$n" 'BEGIN { printf "%.0f\n", t / n }'
}

# Prints "calls_per_request top_calls" (the five most frequent, per request).
syscalls() {
  local name="$1" pid n tracer
  pid="$(start "$name")"
  ready "$PROXY"
  load "$WARMUP" >/dev/null
  strace -c -f -q -o "$work/$name.strace" -p "$pid" &
  tracer=$!
  sleep 1
  n="$(load "$REQUESTS")"
  kill -INT "$tracer"
  wait "$tracer" 2>/dev/null || true
  stop "$pid"
  local total top
  total="$(awk '$NF == "total" { print $4 }' "$work/$name.strace")"
  top="$(awk -v n="$n" '$1 ~ /^[0-9.]+$/ && $NF != "total" { printf "%.2f %s\n", $4 / n, $NF }' "$work/$name.strace" |
    sort -rn | head -5 | awk '{ printf "%s%s=%s", (NR > 1 ? "," : ""), $2, $1 }')"
  awk -v t="$total" -v n="$n" -v top="$top" 'BEGIN { printf "%.2f %s\n", t / n, top }'
}

printf '%-20s %16s %16s  %s\n' "proxy" "instructions/req" "syscalls/req" "most frequent system calls, per request"
declare -A ir sc
for name in $PROXIES; do
  ir[$name]="$(instructions "$name")"
  read -r sc[$name] top <<<"$(syscalls "$name")"
  printf '%-20s %16s %16s  %s\n' "$name" "${ir[$name]}" "${sc[$name]}" "$top"
done
if [[ "$PROXIES" != "headroom nginx haproxy" ]]; then
  exit 0
fi
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
echo
echo "headroom / nginx: instructions $(ratio "${ir[headroom]}" "${ir[nginx]}"), system calls $(ratio "${sc[headroom]}" "${sc[nginx]}")"
echo "headroom / haproxy: instructions $(ratio "${ir[headroom]}" "${ir[haproxy]}"), system calls $(ratio "${sc[headroom]}" "${sc[haproxy]}")"
echo "($REQUESTS requests on $CONNECTIONS connections after $WARMUP to warm up; one worker each)"
echo
echo "headroom's largest costs, instructions per request (callgrind, exclusive):"
awk -v n="$REQUESTS" '{ c = $1; gsub(",", "", c); $1 = ""; $2 = ""; printf "%8.0f %s\n", c / n, $0 }' "$work/headroom.annotate"
