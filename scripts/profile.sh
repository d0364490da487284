#!/usr/bin/env bash
# Where the CPU goes on the command path: builds both servers with frame pointers (so perf
# can walk their stacks), runs the benchmark's 64-client command load with `--perf`
# (perf records every CPU, call graphs, during that run; the benchmark then splits the
# samples per process and per part of each server with scripts/perf-split.py into
# profile.md). Needs `perf` (Debian:
# linux-perf) and permission to profile (root, or kernel.perf_event_paranoid <= 0).
#
#   scripts/profile.sh [out-dir]      # default bench-results/profile
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-bench-results/profile}"
command -v perf >/dev/null || { echo "perf not found (apt-get install linux-perf)" >&2; exit 1; }
scripts/ensure-nats.sh >/dev/null
CARGO_TARGET_DIR=target/frame-pointers RUSTFLAGS="-C force-frame-pointers=yes" \
    cargo build --locked --release -p command-server -p query-server
cargo build --locked --release -p bench
SHOP_BIN_DIR=target/frame-pointers/release ./target/release/bench \
    --stages commands --clients 64 --seconds 20 --perf --out "$out"
cat "$out/profile.md"
