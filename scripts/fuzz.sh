#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets (fuzz/, libFuzzer through cargo-fuzz; needs a
# nightly toolchain) one after the other, each until RUNS inputs or SECONDS have passed,
# growing fuzz/corpus/TARGET. A crash stops with the input in fuzz/artifacts/TARGET/;
# copy it to fuzz/regressions/TARGET/ once fixed (the normal suite replays both folders).
#
# Usage: scripts/fuzz.sh [RUNS [SECONDS [TARGET...]]]   (defaults: 1000000, 1800, all)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"

runs="${1:-1000000}"
seconds="${2:-1800}"
shift $(( $# < 2 ? $# : 2 ))
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cargo +nightly fuzz build -O
for target in "${targets[@]}"; do
  log="$(mktemp -t "fuzz-$target.XXXXXX")"
  start=$(date +%s)
  cargo +nightly fuzz run -O "$target" -- -runs="$runs" -max_total_time="$seconds" \
    -print_final_stats=1 >"$log" 2>&1 || { tail -40 "$log"; echo "fuzz: $target FAILED (log: $log)" >&2; exit 1; }
  executed=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$')
  echo "fuzz: $target: $executed inputs in $(( $(date +%s) - start )) s, 0 crashes, corpus $(ls "corpus/$target" | wc -l) files"
done
