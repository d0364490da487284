#!/usr/bin/env bash
# Prints the path of a promtool binary (Prometheus' checker for rule files and metric
# exposition), installing one if needed. The observability tests check the alert rules
# and both servers' /metrics output with it.
#
# Looks, in order, at: $PROMTOOL_BIN, ./.tools/bin/promtool, `promtool` on PATH.
# Otherwise takes it out of Debian's prometheus package (downloaded, unpacked into
# ./.tools; the package is not installed, so no Prometheus service is set up).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"

usable() { [ -n "${1:-}" ] && [ -x "$1" ] && "$1" --version >/dev/null 2>&1; }

if usable "${PROMTOOL_BIN:-}"; then echo "$PROMTOOL_BIN"; exit 0; fi
if usable "$tools/bin/promtool"; then echo "$tools/bin/promtool"; exit 0; fi
if command -v promtool >/dev/null 2>&1 && usable "$(command -v promtool)"; then
  command -v promtool; exit 0
fi

command -v apt-get >/dev/null 2>&1 || {
  echo "promtool not found: install Prometheus' promtool and put it on PATH, or set PROMTOOL_BIN" >&2
  exit 1
}
echo "promtool not found; taking it from Debian's prometheus package into $tools" >&2
mkdir -p "$tools/bin" "$tools/deb"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
( cd "$work" && { apt-get download prometheus >/dev/null 2>&1 \
    || { apt-get update -qq >&2 && apt-get download prometheus >&2; }; } )
dpkg-deb -x "$work"/prometheus_*.deb "$work/unpacked"
cp "$work/unpacked/usr/bin/promtool" "$tools/bin/promtool"
usable "$tools/bin/promtool" || { echo "unpacked promtool does not run" >&2; exit 1; }
echo "$tools/bin/promtool"
