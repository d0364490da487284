#!/usr/bin/env bash
# Prints the path of a buf binary (the protobuf linter and breaking-change checker),
# installing the pinned npm package @bufbuild/buf (which ships the binary) into ./.tools
# if there is none.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
version=1.75.0
if [ -x "$tools/bin/buf" ] && "$tools/bin/buf" --version 2>/dev/null | grep -qx "$version"; then
  echo "$tools/bin/buf"; exit 0
fi
command -v npm >/dev/null || { echo "buf needs npm (Node.js) to install" >&2; exit 1; }
mkdir -p "$tools/bin" "$tools/npm"
echo "installing @bufbuild/buf@$version from npm into $tools" >&2
npm install --silent --no-audit --no-fund --prefix "$tools/npm" "@bufbuild/buf@$version" >&2
bin="$tools/npm/node_modules/.bin/buf"
[ -x "$bin" ] || { echo "buf install failed" >&2; exit 1; }
ln -sf "$bin" "$tools/bin/buf"
echo "$tools/bin/buf"
