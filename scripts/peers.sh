# What the proxy benchmarks share (sourced by bench-proxy.sh and
# bench-proxy-counts.sh): the peers from Debian's packages and their
# configurations, so both scripts compare the same set-ups.

# Installs what of "$@" is missing, from Debian's packages of those names.
install_missing() {
  local missing=() tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if ((${#missing[@]})); then
    echo "installing ${missing[*]} from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# headroom_routing FILE BACKEND_PORT: a last-known-good routing file with
# one member, so the front-end routes with no NATS (and none of its traffic
# in the figures).
headroom_routing() {
  cat >"$1" <<JSON
{"cluster":"bench","generation":1,"saved_ms":0,"servers":{"":["127.0.0.1:$2"]},
 "record":{"v":1,"id":"bench","generation":1,"updated_ms":0,"recent":[],
  "policy":{"min_size":1,"max_size":1},
  "members":[{"server":"bench","address":"127.0.0.1","port":$2,"request_types":[],
   "state":"active","weight":1.0,"request":"bench","since_ms":0}]}}
JSON
}

# nginx_conf WORK WORKERS BACKEND_PORT LISTEN_PORT [CACHE_PORT]: writes
# WORK/nginx.conf. One worker runs in the master process (no fork, for a
# counter to see it whole); more are pinned a CPU each, as the front-end's
# are by default. Every connection is kept for the whole run, as the
# others keep theirs.
nginx_conf() {
  local work="$1" workers="$2" backend="$3" listen="$4" cache="${5:-}" processes
  mkdir -p "$work/nginx/cache"
  # nginx's workers run as an unprivileged user.
  chmod 755 "$work"
  chmod -R 777 "$work/nginx"
  if ((workers == 1)); then
    processes="worker_processes 1;
master_process off;"
  else
    processes="worker_processes $workers;
worker_cpu_affinity auto;"
  fi
  cat >"$work/nginx.conf" <<CONF
$processes
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $work/nginx;
  proxy_temp_path $work/nginx;
  fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx;
  scgi_temp_path $work/nginx;
  proxy_cache_path $work/nginx/cache keys_zone=bench:10m;
  upstream backend { server 127.0.0.1:$backend; keepalive 128; keepalive_requests 1000000; }
  # Keep-alive to the backend, and the forwarding headers the front-end
  # also sends, so both do the same work.
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Host \$host;
  proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
  proxy_set_header X-Forwarded-Proto \$scheme;
  proxy_set_header X-Forwarded-Host \$host;
  proxy_set_header Via "1.1 nginx";
  server {
    listen 127.0.0.1:$listen;
    location / { proxy_pass http://backend; }
  }
CONF
  if [[ -n "$cache" ]]; then
    cat >>"$work/nginx.conf" <<CONF
  server {
    listen 127.0.0.1:$cache;
    location / { proxy_pass http://backend; proxy_cache bench; }
  }
CONF
  fi
  echo "}" >>"$work/nginx.conf"
}

# haproxy_conf WORK THREADS BACKEND_PORT LISTEN_PORT: writes
# WORK/haproxy.cfg, with the same forwarding headers; more than one thread
# are pinned a CPU each.
haproxy_conf() {
  local work="$1" threads="$2" backend="$3" listen="$4" pinning=""
  ((threads > 1)) && pinning="  cpu-map auto:1/1-$threads 0-$((threads - 1))"
  cat >"$work/haproxy.cfg" <<CONF
global
  nbthread $threads
$pinning
  maxconn 8192
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend bench
  bind 127.0.0.1:$listen
  default_backend app
backend app
  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request add-header Via "1.1 haproxy"
  server b1 127.0.0.1:$backend
CONF
}
