#!/usr/bin/env bash
# Starts the whole stack on this machine: nats-server with JetStream (store in
# ./data/nats), the command server (127.0.0.1:50051) and the query server
# (127.0.0.1:50052), built in release mode, with Prometheus metrics on 127.0.0.1:9464
# and :9465. Prints grpcurl calls to try and where to scrape, then runs until Ctrl-C,
# which stops everything gracefully. Logs go to ./data/logs/.
#
# With --secure: TLS with client certificates (mTLS) on both servers, bearer tokens with
# roles, and NATS users with permissions over TLS; the certificates, tokens and passwords
# are made by scripts/secure-files.sh in ./data/secure/ on first use (tokens in
# data/secure/tokens.env), and the printed grpcurl calls carry them.
#
# With --cluster: a 3-node NATS cluster instead (client ports NATS_PORT, +1, +2; route
# ports 6222-6224; stores in ./data/cluster/nats-n1..3), the stream at three replicas,
# two command servers with --ack replicated (answers only what a quorum of NATS nodes
# holds): the writer, and a hot standby on SHOP_COMMAND2_LISTEN (127.0.0.1:50054) that
# follows the stream and takes over when the writer dies; and two query servers (the
# second on SHOP_QUERY2_LISTEN, 127.0.0.1:50053), all with their data under
# ./data/cluster/. Kill a NATS node or the writer (their pids are printed) to watch the
# stack carry on.
#
# Usage: scripts/stack.sh [--secure | --cluster]
# Environment: NATS_PORT (4222), SHOP_COMMAND_LISTEN, SHOP_QUERY_LISTEN,
# SHOP_COMMAND_METRICS (127.0.0.1:9464), SHOP_QUERY_METRICS (127.0.0.1:9465), and every
# SHOP_* variable the servers read (see `command-server --help`; e.g. SHOP_OTLP_ENDPOINT
# to export traces).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

secure=""
cluster=""
case "${1:-}" in
  --secure) secure=1 ;;
  --cluster) cluster=1 ;;
  "") ;;
  *) echo "usage: scripts/stack.sh [--secure | --cluster]" >&2; exit 2 ;;
esac
nats_port="${NATS_PORT:-4222}"
command_addr="${SHOP_COMMAND_LISTEN:-127.0.0.1:50051}"
query_addr="${SHOP_QUERY_LISTEN:-127.0.0.1:50052}"
command_metrics="${SHOP_COMMAND_METRICS:-127.0.0.1:9464}"
query_metrics="${SHOP_QUERY_METRICS:-127.0.0.1:9465}"
query2_addr="${SHOP_QUERY2_LISTEN:-127.0.0.1:50053}"
command2_addr="${SHOP_COMMAND2_LISTEN:-127.0.0.1:50054}"
data="data"
[ -n "$cluster" ] && data="data/cluster"
nats_bin="$(scripts/ensure-nats.sh)"
grpcurl_bin="$(scripts/ensure-grpcurl.sh || echo grpcurl)"
mkdir -p "$data/logs"

# What clients pass to reach the servers (grpcurl flags) and the NATS flags per server.
grpc_tls=(-plaintext)
nats_conf=()
command_env=()
query_env=()
if [ -n "$secure" ]; then
  sec="$(scripts/secure-files.sh data/secure)"
  # shellcheck disable=SC1091
  . "$sec/nats.env"
  # shellcheck disable=SC1091
  . "$sec/tokens.env"
  grpc_tls=(-cacert "$sec/ca.pem" -cert "$sec/client.pem" -key "$sec/client-key.pem")
  nats_conf=(-c "$sec/nats.conf")
  server_env=(SHOP_TLS_CERT="$sec/server.pem" SHOP_TLS_KEY="$sec/server-key.pem"
    SHOP_TLS_CLIENT_CA="$sec/ca.pem" SHOP_AUTH_TOKENS="$sec/tokens" SHOP_NATS_TLS_CA="$sec/ca.pem")
  command_env=("${server_env[@]}" SHOP_NATS_USER=command SHOP_NATS_PASSWORD="$SHOP_NATS_COMMAND_PASSWORD")
  query_env=("${server_env[@]}" SHOP_NATS_USER=query SHOP_NATS_PASSWORD="$SHOP_NATS_QUERY_PASSWORD")
fi

echo "building the servers (release)..." >&2
cargo build --release --locked -p command-server -p query-server

pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping..." >&2
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped" >&2
}
trap stop INT TERM EXIT

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

command_flags=()
nats_pids=""
if [ -n "$cluster" ]; then
  urls=""
  routes=""
  for n in 1 2 3; do routes="${routes:+$routes,}nats://127.0.0.1:$((6221 + n))"; done
  for n in 1 2 3; do
    port=$((nats_port + n - 1))
    "$nats_bin" -js -a 127.0.0.1 -p "$port" --server_name "n$n" --cluster_name shop \
      --cluster "nats://127.0.0.1:$((6221 + n))" --routes "$routes" \
      -sd "$root/$data/nats-n$n" >"$data/logs/nats-n$n.log" 2>&1 &
    pids+=($!)
    nats_pids="$nats_pids n$n=$! (port $port)"
    urls="${urls:+$urls,}nats://127.0.0.1:$port"
  done
  for n in 1 2 3; do
    for _ in $(seq 100); do port_open $((nats_port + n - 1)) && break; sleep 0.1; done
  done
  export SHOP_NATS_URL="$urls"
  command_flags=(--stream-replicas 3 --ack replicated)
elif port_open "$nats_port"; then
  echo "something already listens on port $nats_port; using it as NATS" >&2
  export SHOP_NATS_URL="nats://127.0.0.1:$nats_port"
else
  mkdir -p data/nats
  "$nats_bin" -js -a 127.0.0.1 -p "$nats_port" -sd "$root/data/nats" "${nats_conf[@]}" >data/logs/nats.log 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do port_open "$nats_port" && break; sleep 0.1; done
  export SHOP_NATS_URL="nats://127.0.0.1:$nats_port"
fi

env "${command_env[@]}" target/release/command-server --listen "$command_addr" --data-dir "$data/command" \
  --metrics-listen "$command_metrics" "${command_flags[@]}" >"$data/logs/command-server.log" 2>&1 &
pids+=($!)
command_pid=$!
env "${query_env[@]}" target/release/query-server --listen "$query_addr" --data-dir "$data/query" \
  --metrics-listen "$query_metrics" >"$data/logs/query-server.log" 2>&1 &
pids+=($!)
addrs=("$command_addr" "$query_addr")
if [ -n "$cluster" ]; then
  target/release/query-server --listen "$query2_addr" --data-dir "$data/query2" \
    >"$data/logs/query-server-2.log" 2>&1 &
  pids+=($!)
  addrs+=("$query2_addr")
fi

for addr in "${addrs[@]}"; do
  for _ in $(seq 300); do
    if "$grpcurl_bin" "${grpc_tls[@]}" "$addr" grpc.health.v1.Health/Check 2>/dev/null | grep -q SERVING; then break; fi
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { echo "a process exited; see $data/logs/" >&2; tail -n 20 "$data"/logs/*.log >&2; exit 1; }
    done
    sleep 0.1
  done
done

if [ -n "$cluster" ]; then
  # --ack replicated answers only once the stream takes events: wait for the relay.
  for _ in $(seq 600); do
    if "$grpcurl_bin" -plaintext -d '{"service":"shop.v1.Relay"}' "$command_addr" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; then break; fi
    sleep 0.1
  done
  # The standby, once the first command server writes (so that the writer is the one
  # on $command_addr).
  target/release/command-server --listen "$command2_addr" --data-dir "$data/command2" \
    "${command_flags[@]}" >"$data/logs/command-server-2.log" 2>&1 &
  pids+=($!)
  command_pids="writer=$command_pid standby=$!"
  for _ in $(seq 300); do
    if "$grpcurl_bin" -plaintext -d '{"service":"shop.v1.LogService"}' "$command2_addr" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'; then break; fi
    sleep 0.1
  done
fi

if [ -n "$secure" ]; then
  G="\$G ${grpc_tls[*]}"
  W=" -H \"authorization: Bearer \$SHOP_WRITER_TOKEN\""
  R=" -H \"authorization: Bearer \$SHOP_READER_TOKEN\""
  A=" -H \"authorization: Bearer \$SHOP_ADMIN_TOKEN\""
  mode="secure: mTLS, tokens, NATS users over TLS; files in $sec"
  first="  . $sec/tokens.env    # SHOP_WRITER_TOKEN, SHOP_READER_TOKEN, SHOP_ADMIN_TOKEN
"
else
  G="\$G -plaintext"; W=""; R=""; A=""; mode="plaintext, no authentication"; first=""
fi
if [ -n "$cluster" ]; then
  mode="$mode; 3-node NATS cluster, stream R3, --ack replicated"
fi
cat <<EOT

The stack is up ($mode):
  NATS (JetStream)  $SHOP_NATS_URL${nats_pids:+   pids:$nats_pids}
  command server    $command_addr    log: $data/logs/command-server.log${cluster:+
  standby           $command2_addr    log: $data/logs/command-server-2.log   pids: $command_pids}
  query server      $query_addr    log: $data/logs/query-server.log${cluster:+
  query server 2    $query2_addr    log: $data/logs/query-server-2.log}

Try (grpcurl is at $grpcurl_bin):
  G=$grpcurl_bin
$first  $G $command_addr list
  $G $command_addr describe shop.v1.CommandService.PlaceOrder
  $G$W -d '{"customer_id":"ada","name":"Ada Lovelace","email":"ada@example.com"}' $command_addr shop.v1.CommandService/RegisterCustomer
  $G$W -d '{"sku":"pen","name":"Fountain pen","price_cents":2500,"initial_stock":10}' $command_addr shop.v1.CommandService/CreateProduct
  $G$W -d '{"order_id":"o1","customer_id":"ada","lines":[{"sku":"pen","quantity":2}]}' $command_addr shop.v1.CommandService/PlaceOrder
  $G$R -d '{"order_id":"o1","min_position":4}' $query_addr shop.v1.QueryService/GetOrder
  $G$R -d '{"customer_id":"ada"}' $query_addr shop.v1.QueryService/GetCustomer
  $G$R -d '{"stream_id":"order-o1"}' $query_addr shop.v1.QueryService/GetHistory
  $G$R $query_addr shop.v1.QueryService/GetStatus
  $G$A $command_addr shop.v1.LogService/GetLogStatus
  # every query answer says how fresh it is (shop-applied-position, shop-lag-events):
  $G$R -v -d '{"customer_id":"ada"}' $query_addr shop.v1.QueryService/GetCustomer
EOT
if [ -n "$cluster" ]; then
  cat <<EOT
  # the standby refuses commands, naming the writer (UNAVAILABLE, NOT_LEADER):
  $G -d '{"sku":"ink","name":"Ink","price_cents":300,"initial_stock":5}' $command2_addr shop.v1.CommandService/CreateProduct
  # kill -9 the writer (pid above): within a few seconds the standby takes over
  $G -d '{"service":"shop.v1.CommandService"}' $command2_addr grpc.health.v1.Health/Check
EOT
fi
if [ -n "$secure" ]; then
  cat <<EOT
  # the client certificate (CN=shop-client) alone may read, not write:
  $G -d '{"customer_id":"ada"}' $query_addr shop.v1.QueryService/GetCustomer
  $G -d '{"customer_id":"bob","name":"Bob","email":"bob@example.com"}' $command_addr shop.v1.CommandService/RegisterCustomer   # PermissionDenied
EOT
fi
cat <<EOT

Prometheus metrics (text format):
  curl -s http://$command_metrics/metrics     # command server
  curl -s http://$query_metrics/metrics     # query server
  A Prometheus config for these targets, alert rules and a Grafana dashboard are in monitoring/.

Ctrl-C stops everything.
EOT
wait
