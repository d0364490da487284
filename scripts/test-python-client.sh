#!/usr/bin/env bash
# The Python client test: installs grpcio into ./.tools/py, generates stubs from proto/,
# starts nats-server and both servers (debug builds) on free ports, runs
# tests/python/client_test.py against them, and stops everything.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

py="$root/.tools/py"
if ! PYTHONPATH="$py" python3 -c "import grpc, grpc_tools, grpc_status" 2>/dev/null; then
  echo "installing Python gRPC packages into $py" >&2
  python3 -m pip install --quiet --disable-pip-version-check --target "$py" -r tests/python/requirements.txt >&2
fi
export PYTHONPATH="$py"

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

"$(scripts/ensure-nats.sh)" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do port_open "$nats_port" && break; sleep 0.1; done
export SHOP_NATS_URL="nats://127.0.0.1:$nats_port"
target/debug/command-server --listen "127.0.0.1:$command_port" --data-dir "$work/command" >"$work/command.log" 2>&1 &
pids+=($!)
target/debug/query-server --listen "127.0.0.1:$query_port" --data-dir "$work/query" >"$work/query.log" 2>&1 &
pids+=($!)
for port in "$command_port" "$query_port"; do
  for _ in $(seq 300); do port_open "$port" && break; sleep 0.1; done
done

SHOP_PY_GEN="$gen" SHOP_COMMAND_ADDR="127.0.0.1:$command_port" SHOP_QUERY_ADDR="127.0.0.1:$query_port" \
  python3 tests/python/client_test.py || { tail -n 30 "$work"/*.log >&2; exit 1; }
