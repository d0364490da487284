#!/usr/bin/env bash
# Runs the whole test suite: unit and property tests, the end-to-end tests (each starts
# its own nats-server and server processes), and the Python gRPC client test.
#
# Usage: scripts/test.sh [extra nextest/cargo-test filter args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

NATS_SERVER_BIN="$(scripts/ensure-nats.sh)"
export NATS_SERVER_BIN
echo "using $("$NATS_SERVER_BIN" --version) at $NATS_SERVER_BIN" >&2
# promtool checks the alert rules and both servers' /metrics output.
PROMTOOL_BIN="$(scripts/ensure-promtool.sh)"
export PROMTOOL_BIN

# One build of everything (the e2e tests run the server binaries from target/debug).
cargo build --workspace --bins --tests --locked

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi

if [ "$#" -eq 0 ]; then
  scripts/test-python-client.sh
  # Again against the secure stack (mTLS, tokens, NATS users), with grpcurl checks.
  scripts/test-python-client.sh --secure
fi
