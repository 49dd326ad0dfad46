#!/usr/bin/env bash
# Schemathesis against a live broker: generated requests for every operation
# in docs/openapi.json (the JSON twin of docs/openapi.yaml, see
# sdk/js/scripts/openapi-json.mjs), a bounded budget, and these checks on
# every answer:
#   not_a_server_error           no 5xx
#   status_code_conformance      the status is one the document lists
#   content_type_conformance     the content type is the documented one
#   response_schema_conformance  the body validates against its schema
# Any failure exits non-zero.
#
# Not by default (SCHEMATHESIS_CHECKS=all turns them on): whether the broker
# refuses every request the document's schemas forbid and accepts every one
# they allow. The document knowingly cannot say everything there (a batch
# answers 200 with per-item errors; `limit` is bounded by --history-size;
# APNs token formats), so those checks report known differences, not bugs.
#
#   - Schemathesis (pinned below) is installed from PyPI into
#     target/schemathesis-venv when missing.
#   - The broker is the workspace's binary ($TETHER_BROKER_BIN, else
#     target/debug/broker: cargo build --workspace --bins), started on free
#     loopback ports with an API key, exactly as sdk/js/test/support/broker.mjs
#     does, and killed on exit.
#   - The document is read from the file, not from GET /v1/openapi.json, so
#     the run does not depend on the broker serving it.
#
# Usage: scripts/schemathesis.sh [extra schemathesis run options]
# Environment: SCHEMATHESIS_MAX_EXAMPLES (default 50 per operation and
# phase), SCHEMATHESIS_SEED (default fixed, so CI runs are reproducible),
# SCHEMATHESIS_CHECKS (default the four above),
# SCHEMATHESIS_REPORT_DIR (default target/schemathesis-report: JUnit XML and
# a cassette of every request, for reading failures).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

SCHEMATHESIS_VERSION=4.32.5
venv="$repo/target/schemathesis-venv"
doc="$repo/docs/openapi.json"
bin="${TETHER_BROKER_BIN:-$repo/target/debug/broker}"
max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-50}"
seed="${SCHEMATHESIS_SEED:-20261201}"
checks="${SCHEMATHESIS_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance}"
report_dir="${SCHEMATHESIS_REPORT_DIR:-$repo/target/schemathesis-report}"
api_key="schemathesis-$RANDOM$RANDOM"

if [ ! -x "$bin" ]; then
    echo "error: no broker binary at $bin (cargo build --workspace --bins, or set TETHER_BROKER_BIN)" >&2
    exit 1
fi
if [ ! -f "$doc" ]; then
    echo "error: $doc is missing (node sdk/js/scripts/openapi-json.mjs)" >&2
    exit 1
fi

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qF "version $SCHEMATHESIS_VERSION"; then
    echo "==> installing schemathesis==$SCHEMATHESIS_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

# ---- the broker ---------------------------------------------------------
data_dir="$(mktemp -d "${TMPDIR:-/tmp}/tether-schemathesis-XXXXXX")"
log="$data_dir.log"
broker_pid=""
cleanup() {
    if [ -n "$broker_pid" ] && kill -0 "$broker_pid" 2>/dev/null; then
        kill -KILL "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
    fi
    rm -rf "$data_dir" "$log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

TETHER_LOG=info RUST_LOG='' "$bin" \
    --client-addr 127.0.0.1:0 --api-addr 127.0.0.1:0 --quic-addr off \
    --node-id schemathesis --data-dir "$data_dir" --api-key "$api_key" \
    </dev/null >/dev/null 2>"$log" &
broker_pid=$!

# Ready when ` ready` is logged (the listening lines come first); bounded.
deadline=$((SECONDS + 30))
until grep -q ' ready' "$log"; do
    if ! kill -0 "$broker_pid" 2>/dev/null; then
        echo "error: the broker exited early; its log:" >&2
        cat "$log" >&2
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "error: the broker was not ready in 30 s; its log:" >&2
        cat "$log" >&2
        exit 1
    fi
    sleep 0.05
done
api_addr="$(grep 'listener="api"' "$log" | grep -o 'addr="\?[0-9.:]*' | head -n1 | sed 's/^addr="\{0,1\}//')"
if [ -z "$api_addr" ]; then
    echo "error: no api listening address in the broker's log:" >&2
    cat "$log" >&2
    exit 1
fi
echo "==> broker $bin: api on http://$api_addr"

# ---- the run ------------------------------------------------------------
mkdir -p "$report_dir" "$repo/target/schemathesis-work"
# Hypothesis and Schemathesis keep caches in the working directory
# (.hypothesis, .schemathesis): keep them under target/, out of the tree.
cd "$repo/target/schemathesis-work"
echo "==> schemathesis $SCHEMATHESIS_VERSION: $doc, at most $max_examples examples per operation, seed $seed"
echo "    checks: $checks"
# One worker: two cores, shared with the broker; and with two, Hypothesis
# (4.32.5's dependency) once failed on its own with "AST constructor
# recursion depth mismatch", a thread-safety bug of its lambda-source cache.
status=0
"$venv/bin/schemathesis" run "$doc" \
    --url "http://$api_addr" \
    --header "Authorization: Bearer $api_key" \
    --checks "$checks" \
    --max-examples "$max_examples" \
    --seed "$seed" \
    --workers 1 \
    --request-timeout 10 \
    --generation-database none \
    --report junit,vcr --report-dir "$report_dir" \
    --no-color \
    "$@" || status=$?

if ! kill -0 "$broker_pid" 2>/dev/null; then
    echo "error: the broker died during the run; its log:" >&2
    tail -n 50 "$log" >&2
    exit 1
fi
if ((status != 0)); then
    echo "schemathesis: FAILED (exit $status); the requests are in $report_dir" >&2
    exit "$status"
fi
echo "schemathesis: passed"
