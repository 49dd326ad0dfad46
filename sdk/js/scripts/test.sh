#!/usr/bin/env bash
# Everything the TypeScript SDK checks, in one command (CI calls it from the
# repository's scripts/test):
#   installs what is missing (npm ci; Debian's chromium for the browser tests),
#   builds dist/, type-checks the sources and two consumer files (ESM and
#   CommonJS), checks the JSON core's size (minified + gzip <= 12 KiB), and
#   runs the tests: unit (fake WebSocket, fake timers), end to end in Node
#   against a real broker (and `npm install` of the package into a fresh
#   app), the OpenAPI check of docs/openapi.yaml against a real broker (with
#   docs/openapi.json the same document, and every route of the router
#   described), and end to end in headless chromium (with the example page,
#   examples/live-feed.html).
#
# The broker binary: $TETHER_BROKER_BIN if set, else <repo>/target/debug/broker
# (build it first: cargo build --workspace --bins).
#
# Usage: sdk/js/scripts/test.sh [extra node --test args, e.g. --test-name-pattern=resume]
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(cd ../.. && pwd)"

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

if ! command -v node >/dev/null 2>&1; then
    echo "error: node (>= 20) is needed" >&2
    exit 1
fi
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "==> npm ci"
    npm ci --no-audit --no-fund
fi
if [ ! -x "${CHROMIUM_PATH:-/usr/bin/chromium}" ]; then
    echo "==> installing chromium (Debian package) for the browser tests"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
export TETHER_BROKER_BIN="${TETHER_BROKER_BIN:-$repo/target/debug/broker}"
if [ ! -x "$TETHER_BROKER_BIN" ]; then
    echo "error: no broker binary at $TETHER_BROKER_BIN (cargo build --workspace --bins, or set TETHER_BROKER_BIN)" >&2
    exit 1
fi

failed=()
stage() {
    local name="$1"
    shift
    echo "==> $name"
    if ! "$@"; then
        failed+=("$name")
    fi
}

echo "==> build (esbuild + tsc declarations)"
node scripts/build.mjs
stage "type-check (tsc --noEmit, strict)" node_modules/.bin/tsc --noEmit -p tsconfig.json
stage "type-check consumers (ESM + CommonJS, by package name)" node_modules/.bin/tsc -p test/types/tsconfig.json
stage "size check (JSON core, minified + gzip <= 12 KiB)" node scripts/size.mjs
echo "    broker: $TETHER_BROKER_BIN"
stage "tests: unit, Node end to end, OpenAPI check, browser end to end" \
    node --test --test-concurrency=1 --test-timeout=60000 --test-reporter=spec "$@" \
    test/unit/*.test.mjs test/e2e/*.test.mjs test/openapi.test.mjs test/browser/*.test.mjs

if ((${#failed[@]})); then
    printf 'sdk/js: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "sdk/js: all checks passed"
