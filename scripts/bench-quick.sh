#!/usr/bin/env bash
# The benchmark's quick mode (a second or so per stage, debug build): proves the harness
# works end to end. It asserts nothing about speed; see BENCHMARKS.md for real runs.
#
# Builds the whole workspace (a no-op after scripts/test.sh: the same feature set, where
# `cargo run -p bench` would rebuild dependencies with bench's features alone) and runs
# the debug bench against the debug servers next to it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --workspace --bins --locked
SHOP_BIN_DIR="$PWD/target/debug" target/debug/bench --quick --out "${1:-target/bench-quick}"
