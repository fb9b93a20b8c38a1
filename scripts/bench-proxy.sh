#!/usr/bin/env bash
# Headroom's front-end against nginx and HAProxy as reverse proxies in front
# of the same sample backend, driven by the same load generator (wrk), in
# one run on this machine; then a cache hit against nginx's proxy_cache.
# First flat out (wrk: a closed loop of CONNECTIONS), then at one offered
# load (headroom-load: an open loop of RATE requests a second; by default a
# quarter of what the slowest of the three proxies served flat out), where
# the latencies are the proxies' own and not the queue of a saturated
# machine.
# Installs nginx, haproxy and wrk from Debian's packages when missing.
#
#   scripts/bench-proxy.sh   # ROUNDS=3 DURATION=8s CONNECTIONS=64 THREADS=2 RATE= RATE_SECONDS=10
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DURATION="${DURATION:-8s}"
ROUNDS="${ROUNDS:-3}"
CONNECTIONS="${CONNECTIONS:-64}"
THREADS="${THREADS:-2}"
RATE="${RATE:-}"
RATE_SECONDS="${RATE_SECONDS:-10}"
source scripts/peers.sh
install_missing nginx haproxy wrk
cargo build --release -q -p headroom-frontend -p headroom-backend -p headroom-loadgen

work="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

BACKEND=18180 HEADROOM=18181 NGINX=18182 HAPROXY=18183 NGINX_CACHE=18184
export HEADROOM_TELEMETRY__FILTER=warn

HEADROOM_BACKEND__NAME=bench HEADROOM_BACKEND__LISTEN="127.0.0.1:$BACKEND" \
  HEADROOM_BACKEND__SIZE=1024 target/release/headroom-backend &
pids+=($!)
backend_pid=$!

# The front-end routes from a last-known-good file: no NATS needed, and
# none of its traffic in the figures.
headroom_routing "$work/routing.json" "$BACKEND"
HEADROOM_NATS__URL=nats://127.0.0.1:1 HEADROOM_FRONTEND__CLUSTER=bench \
  HEADROOM_FRONTEND__LISTEN="127.0.0.1:$HEADROOM" \
  HEADROOM_FRONTEND__LAST_KNOWN_GOOD="$work/routing.json" \
  target/release/headroom-frontend 2>"$work/frontend.log" &
pids+=($!)
headroom_pid=$!

nginx_conf "$work" 2 "$BACKEND" "$NGINX" "$NGINX_CACHE"
nginx -c "$work/nginx.conf" &
pids+=($!)
nginx_pid=$!

haproxy_conf "$work" 2 "$BACKEND" "$HAPROXY"
haproxy -f "$work/haproxy.cfg" &
pids+=($!)
haproxy_pid=$!

for port in $BACKEND $HEADROOM $NGINX $HAPROXY $NGINX_CACHE; do
  for _ in $(seq 100); do
    curl -fs -o /dev/null "http://127.0.0.1:$port/warm" 2>/dev/null && break
    sleep 0.1
  done
done

# CPU time of a process and its children (nginx's workers), all threads
# included, in clock ticks: "user system".
ticks() {
  local user=0 system=0 pid u s
  for pid in "$1" $(pgrep -P "$1" || true); do
    read -r u s < <(awk '{ print $14, $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0 0)
    user=$((user + u)) system=$((system + s))
  done
  echo "$user $system"
}
hz="$(getconf CLK_TCK)"

# Runs wrk against a URL while counting the CPU the proxy (pid) and the
# backend spend; prints "requests_per_s p50_ms p99_ms non2xx proxy_us
# proxy_user_us backend_us", the last three being CPU microseconds per
# request (all of the proxy's, its user-space part, the backend's).
measure() {
  local url="$1" pid="$2" out p0 b0 p1 b1
  read -r -a p0 <<<"$(ticks "$pid")"
  read -r -a b0 <<<"$(ticks "$backend_pid")"
  out="$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$url")"
  read -r -a p1 <<<"$(ticks "$pid")"
  read -r -a b1 <<<"$(ticks "$backend_pid")"
  awk -v pu=$((p1[0] - p0[0])) -v ps=$((p1[1] - p0[1])) \
    -v bt=$((b1[0] + b1[1] - b0[0] - b0[1])) -v hz="$hz" -v own="$pid" -v backend="$backend_pid" '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /requests in/ { n = $1 }
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    /Non-2xx/ { bad = $NF }
    END {
      per = (n > 0 ? 1e6 / hz / n : 0)
      printf "%.0f %.3f %.3f %s %s %s %.1f\n", rps, p50, p99, (bad == "" ? 0 : bad),
        (own == backend ? "-" : sprintf("%.1f", (pu + ps) * per)),
        (own == backend ? "-" : sprintf("%.1f", pu * per)), bt * per
    }' <<<"$out"
}

# Rounds: every target once per round, in an order that turns from one
# round to the next, so that a change in what else the shared machine is
# doing touches all of them alike; the table is
# each target's median over the rounds, and the ratios are also given per
# round (the targets of one round ran back to back).
targets=(
  "backend, direct|http://127.0.0.1:$BACKEND/api/item|$backend_pid"
  "headroom front-end|http://127.0.0.1:$HEADROOM/api/item|$headroom_pid"
  "nginx|http://127.0.0.1:$NGINX/api/item|$nginx_pid"
  "haproxy|http://127.0.0.1:$HAPROXY/api/item|$haproxy_pid"
  "headroom, cache hit|http://127.0.0.1:$HEADROOM/static/logo|$headroom_pid"
  "nginx proxy_cache, hit|http://127.0.0.1:$NGINX_CACHE/static/logo|$nginx_pid"
)
header() {
  printf '%-28s %12s %9s %9s %8s %10s %10s %10s\n' "$1" "requests/s" "p50 ms" "p99 ms" "non-2xx" "proxy CPU" "of it user" "backend CPU"
  printf '%-28s %12s %9s %9s %8s %10s %10s %10s\n' "" "" "" "" "" "us/req" "us/req" "us/req"
}
declare -A results
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
# Field k (1-based) of a result line.
field() { echo "$1" | awk -v k="$2" '{ print $k }'; }
proxy_rounds="" cache_rounds=""
for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS"
  header "proxy ($CONNECTIONS conns, $DURATION)"
  declare -A this=()
  # The three proxies, and the two caches, take turns at going first: a
  # target that always ran right after another (or in the same second of
  # the machine's day) would carry that into every round.
  k=$(((round - 1) % 3))
  proxies=("${targets[@]:1:3}")
  order=("${targets[0]}" "${proxies[@]:k}" "${proxies[@]:0:k}")
  if ((round % 2)); then
    order+=("${targets[4]}" "${targets[5]}")
  else
    order+=("${targets[5]}" "${targets[4]}")
  fi
  for target in "${order[@]}"; do
    IFS='|' read -r name url pid <<<"$target"
    line="$(measure "$url" "$pid")"
    this[$name]="$line"
    results[$name]+="$line"$'\n'
    read -r -a r <<<"$line"
    printf '%-28s %12s %9s %9s %8s %10s %10s %10s\n' "$name" "${r[0]}" "${r[1]}" "${r[2]}" "${r[3]}" "${r[4]}" "${r[5]}" "${r[6]}"
  done
  best=nginx
  (($(field "${this[haproxy]}" 1) > $(field "${this[nginx]}" 1))) && best=haproxy
  proxy_rounds+=" $(ratio "$(field "${this[headroom front-end]}" 1)" "$(field "${this[$best]}" 1)")/$(ratio "$(field "${this[headroom front-end]}" 3)" "$(field "${this[$best]}" 3)")"
  cache_rounds+=" $(ratio "$(field "${this[headroom, cache hit]}" 1)" "$(field "${this[nginx proxy_cache, hit]}" 1)")/$(ratio "$(field "${this[headroom, cache hit]}" 3)" "$(field "${this[nginx proxy_cache, hit]}" 3)")"
  echo
done

# The median of each column over the rounds.
median_line() {
  awk 'BEGIN { n = 0 }
    NF {
      for (k = 1; k <= NF; k++) v[k, n] = $k
      cols = NF; n++
    }
    END {
      for (k = 1; k <= cols; k++) {
        if (v[k, 0] == "-") { printf "%s ", "-"; continue }
        for (i = 0; i < n; i++) a[i] = v[k, i] + 0
        for (i = 1; i < n; i++) for (j = i; j > 0 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
        printf "%s ", (n % 2 ? a[int(n / 2)] : (a[n / 2 - 1] + a[n / 2]) / 2)
      }
      print ""
    }' <<<"$1"
}
echo "median of $ROUNDS rounds"
header "proxy ($CONNECTIONS conns, $DURATION)"
declare -A rps p99
for target in "${targets[@]}"; do
  IFS='|' read -r name _ _ <<<"$target"
  read -r -a r <<<"$(median_line "${results[$name]}")"
  rps[$name]=${r[0]}
  p99[$name]=${r[2]}
  printf '%-28s %12.0f %9.3f %9.3f %8s %10s %10s %10s\n' "$name" "${r[0]}" "${r[1]}" "${r[2]}" "${r[3]}" "${r[4]}" "${r[5]}" "${r[6]}"
done

best=nginx
awk -v h="${rps[haproxy]}" -v n="${rps[nginx]}" 'BEGIN { exit !(h > n) }' && best=haproxy
echo
echo "headroom / $best (the better of nginx and haproxy): throughput $(ratio "${rps[headroom front-end]}" "${rps[$best]}"), p99 $(ratio "${p99[headroom front-end]}" "${p99[$best]}")"
echo "  per round, throughput/p99 against that round's better:$proxy_rounds"
echo "headroom / nginx, cache hit: throughput $(ratio "${rps[headroom, cache hit]}" "${rps[nginx proxy_cache, hit]}"), p99 $(ratio "${p99[headroom, cache hit]}" "${p99[nginx proxy_cache, hit]}")"
echo "  per round:$cache_rounds"

# A fixed rate that suits one machine saturates a slower one (where the
# open loop's queue then grows without bound and measures nothing of the
# proxies): by default, a quarter of the slowest proxy's flat-out rate, as
# the open-loop generator spends more CPU per request than wrk.
if [[ -z "$RATE" ]]; then
  RATE="$(awk -v a="${rps[headroom front-end]}" -v b="${rps[nginx]}" -v c="${rps[haproxy]}" \
    'BEGIN { m = a; if (b < m) m = b; if (c < m) m = c; r = int(m / 4 / 100) * 100; print (r > 100 ? r : 100) }')"
fi

# The same targets at one offered load. Prints "p50_ms p90_ms p99_ms
# errors proxy_us".
at_rate() {
  local base="$1" path="$2" pid="$3" p0 p1
  read -r -a p0 <<<"$(ticks "$pid")"
  target/release/headroom-load --url "$base" --paths "$path" \
    --profile "hold:$RATE:${RATE_SECONDS}s" 2>/dev/null >"$work/load.json"
  read -r -a p1 <<<"$(ticks "$pid")"
  python3 - "$work/load.json" $((p1[0] + p1[1] - p0[0] - p0[1])) "$hz" "$pid" "$backend_pid" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
ticks, hz, own, backend = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
latency = summary["latency_ms"]
errors = summary["failed"] + summary["skipped"] + sum(summary["statuses"].values())
cpu = "-" if own == backend else "%.1f" % (ticks * 1e6 / hz / max(summary["ok"], 1))
print("%.3f %.3f %.3f %d %s" % (latency["p50"], latency["p90"], latency["p99"], errors, cpu))
PY
}

echo
printf '%-28s %9s %9s %9s %8s %10s\n' "at $RATE requests/s, open loop" "p50 ms" "p90 ms" "p99 ms" "errors" "proxy CPU"
printf '%-28s %9s %9s %9s %8s %10s\n' "(headroom-load, ${RATE_SECONDS}s)" "" "" "" "" "us/req"
declare -A fixed99
fixed() {
  local name="$1" port="$2" path="$3" pid="$4" r
  r=($(at_rate "http://127.0.0.1:$port" "$path" "$pid"))
  fixed99[$name]=${r[2]}
  printf '%-28s %9s %9s %9s %8s %10s\n' "$name" "${r[0]}" "${r[1]}" "${r[2]}" "${r[3]}" "${r[4]}"
}
fixed "backend, direct" "$BACKEND" /api/item "$backend_pid"
fixed "headroom front-end" "$HEADROOM" /api/item "$headroom_pid"
fixed "nginx" "$NGINX" /api/item "$nginx_pid"
fixed "haproxy" "$HAPROXY" /api/item "$haproxy_pid"
fixed "headroom, cache hit" "$HEADROOM" /static/logo "$headroom_pid"
fixed "nginx proxy_cache, hit" "$NGINX_CACHE" /static/logo "$nginx_pid"
lower=nginx
awk -v h="${fixed99[haproxy]}" -v n="${fixed99[nginx]}" 'BEGIN { exit !(h < n) }' && lower=haproxy
echo
echo "at $RATE requests/s, p99: headroom / $lower (the lower of nginx and haproxy) $(ratio "${fixed99[headroom front-end]}" "${fixed99[$lower]}"); cache hit, headroom / nginx $(ratio "${fixed99[headroom, cache hit]}" "${fixed99[nginx proxy_cache, hit]}")"
