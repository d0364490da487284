#!/usr/bin/env bash
# Guards the API contract in proto/ (clients in any language compile against it):
#   1. buf lint, STANDARD rules (the deliberate exceptions and their reasons: buf.yaml);
#   2. buf breaking, FILE rules, against the previous commit (or PROTO_BASE=<rev>): a
#      change that breaks generated clients or the wire fails, unless the commit says it
#      is deliberate with a "Proto-Breaking: <why, and what clients must do>" trailer.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
buf="$(scripts/ensure-buf.sh)"
"$buf" lint
echo "buf lint: ok"
base="${PROTO_BASE:-HEAD~1}"
if ! git rev-parse -q --verify "$base^{commit}" >/dev/null; then
  echo "buf breaking: no commit $base to compare against; skipped"
  exit 0
fi
if declared="$(git log -1 --format=%B HEAD | grep '^Proto-Breaking:')"; then
  echo "buf breaking: HEAD declares a deliberate breaking change: ${declared#Proto-Breaking: }"
  "$buf" breaking proto --against ".git#ref=$base,subdir=proto" || true
  exit 0
fi
"$buf" breaking proto --against ".git#ref=$base,subdir=proto"
echo "buf breaking against $(git rev-parse --short "$base"): ok"
