#!/usr/bin/env bash
# The Python client test: installs grpcio into ./.tools/py, generates stubs from proto/,
# starts nats-server and both servers (debug builds) on free ports, runs
# tests/python/client_test.py against them, and stops everything.
#
# With --secure the stack is the one `scripts/stack.sh --secure` starts (mTLS, tokens,
# NATS users over TLS; files from scripts/secure-files.sh): the Python client connects
# with the CA, the client certificate and tokens, and grpcurl calls check the same stack
# from the command line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

py="$root/.tools/py"
if ! PYTHONPATH="$py" python3 -c "import grpc, grpc_tools, grpc_status" 2>/dev/null; then
  echo "installing Python gRPC packages into $py" >&2
  python3 -m pip install --quiet --disable-pip-version-check --target "$py" -r tests/python/requirements.txt >&2
fi
export PYTHONPATH="$py"
secure=""
[ "${1:-}" = "--secure" ] && secure=1

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

gen="$work/gen"
mkdir -p "$gen"
python3 -m grpc_tools.protoc -I proto --python_out="$gen" --grpc_python_out="$gen" \
  proto/shop/v1/events.proto proto/shop/v1/commands.proto proto/shop/v1/queries.proto

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
nats_port="$(free_port)"; command_port="$(free_port)"; query_port="$(free_port)"

nats_conf=()
command_env=()
query_env=()
if [ -n "$secure" ]; then
  sec="$(scripts/secure-files.sh "$work/secure")"
  # shellcheck disable=SC1091
  . "$sec/nats.env"
  # shellcheck disable=SC1091
  . "$sec/tokens.env"
  nats_conf=(-c "$sec/nats.conf")
  server_env=(SHOP_TLS_CERT="$sec/server.pem" SHOP_TLS_KEY="$sec/server-key.pem"
    SHOP_TLS_CLIENT_CA="$sec/ca.pem" SHOP_AUTH_TOKENS="$sec/tokens" SHOP_NATS_TLS_CA="$sec/ca.pem")
  command_env=("${server_env[@]}" SHOP_NATS_USER=command SHOP_NATS_PASSWORD="$SHOP_NATS_COMMAND_PASSWORD")
  query_env=("${server_env[@]}" SHOP_NATS_USER=query SHOP_NATS_PASSWORD="$SHOP_NATS_QUERY_PASSWORD")
  export SHOP_PY_TLS_CA="$sec/ca.pem" SHOP_PY_TLS_CERT="$sec/client.pem" SHOP_PY_TLS_KEY="$sec/client-key.pem"
  export SHOP_PY_WRITER_TOKEN="$SHOP_WRITER_TOKEN"
fi

"$(scripts/ensure-nats.sh)" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" "${nats_conf[@]}" >"$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do port_open "$nats_port" && break; sleep 0.1; done
export SHOP_NATS_URL="nats://127.0.0.1:$nats_port"
env "${command_env[@]}" target/debug/command-server --listen "127.0.0.1:$command_port" --data-dir "$work/command" >"$work/command.log" 2>&1 &
pids+=($!)
env "${query_env[@]}" target/debug/query-server --listen "127.0.0.1:$query_port" --data-dir "$work/query" >"$work/query.log" 2>&1 &
pids+=($!)
for port in "$command_port" "$query_port"; do
  for _ in $(seq 300); do port_open "$port" && break; sleep 0.1; done
done

SHOP_PY_GEN="$gen" SHOP_COMMAND_ADDR="127.0.0.1:$command_port" SHOP_QUERY_ADDR="127.0.0.1:$query_port" \
  python3 tests/python/client_test.py || { tail -n 30 "$work"/*.log >&2; exit 1; }

if [ -n "$secure" ]; then
  # The same stack from the command line: what README "Running securely" shows.
  G=("$(scripts/ensure-grpcurl.sh)" -cacert "$sec/ca.pem" -cert "$sec/client.pem" -key "$sec/client-key.pem")
  c="127.0.0.1:$command_port"; q="127.0.0.1:$query_port"
  expect() { # what-the-output-must-contain, grpcurl arguments...
    local want="$1"; shift
    local out
    out="$("${G[@]}" "$@" 2>&1 || true)"
    if ! grep -q -- "$want" <<<"$out"; then
      echo "grpcurl $*: expected '$want' in:" >&2; echo "$out" >&2; tail -n 30 "$work"/*.log >&2; exit 1
    fi
  }
  expect "shop.v1.CommandService" "$c" list
  expect '"position"' -H "authorization: Bearer $SHOP_WRITER_TOKEN" \
    -d '{"customer_id":"grpcurl-ada","name":"Ada","email":"grpcurl-ada@example.com"}' "$c" shop.v1.CommandService/RegisterCustomer
  expect "PermissionDenied" -d '{"customer_id":"grpcurl-bob","name":"Bob","email":"b@example.com"}' "$c" shop.v1.CommandService/RegisterCustomer
  expect "Unauthenticated" -H "authorization: Bearer wrong" "$q" shop.v1.QueryService/GetStatus
  expect '"actor": "orders-app"' -H "authorization: Bearer $SHOP_READER_TOKEN" \
    -d '{"stream_id":"customer-grpcurl-ada","min_position":1}' "$q" shop.v1.QueryService/GetHistory
  expect '"logPosition"' -H "authorization: Bearer $SHOP_ADMIN_TOKEN" "$c" shop.v1.LogService/GetLogStatus
  plain="$("$(scripts/ensure-grpcurl.sh)" -plaintext "$c" list 2>&1 || true)"
  if grep -q "shop.v1" <<<"$plain"; then echo "a plaintext client was served" >&2; exit 1; fi
  echo "grpcurl against the secure stack: ok" >&2
fi
