#!/usr/bin/env bash
# The benchmark's quick mode (a second or so per stage, debug build): proves the harness
# works end to end. It asserts nothing about speed; see BENCHMARKS.md for real runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo run --locked -p bench -- --quick --out "${1:-target/bench-quick}"
