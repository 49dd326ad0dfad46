# Shared by scripts/bench, scripts/bench-quic and scripts/bench-resume
# (sourced, not run): build, start one broker on loopback ports with a
# temporary data directory, wait for /readyz, read its QUIC certificate
# fingerprint, wait for a quiet machine, stop the broker on any exit.
#
# Environment (defaults in brackets):
#   BENCH_CLIENT_PORT [18080]  BENCH_API_PORT [18081]  BENCH_QUIC_PORT [18443]
#   BROKER_ARGS: extra broker flags, e.g. "--ws-read-buffer 1024"
#   BENCH_JSON=1 to add the loadtest's one-line JSON summaries
#   BENCH_SKIP_BUILD=1 to use the binaries already in target/release
#   BENCH_BIN_DIR [target/release]: where broker and loadtest are taken from
#     (e.g. a copy, so that a concurrent `cargo build` cannot swap them)
#   BENCH_MAX_LOAD: if set (e.g. 0.7), each scenario starts only once the
#     1-minute load average is below it (polled every 5 s, at most
#     BENCH_LOAD_WAIT [900] s; then it starts anyway, saying so)

CLIENT_PORT=${BENCH_CLIENT_PORT:-18080}
API_PORT=${BENCH_API_PORT:-18081}
QUIC_PORT=${BENCH_QUIC_PORT:-18443}
read -r -a broker_args <<<"${BROKER_ARGS:-}"
JSON_FLAG=()
[ "${BENCH_JSON:-0}" = 1 ] && JSON_FLAG=(--json)
bin_dir=${BENCH_BIN_DIR:-target/release}
broker_bin=$bin_dir/broker
loadtest_bin=$bin_dir/loadtest

bench_build() {
    if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
        echo "==> cargo build --release -p tether-broker -p tether-loadtest"
        cargo build --release -p tether-broker -p tether-loadtest
    fi
}

work=$(mktemp -d)
broker_pid=""

bench_stop_broker() {
    if [ -n "$broker_pid" ] && kill -0 "$broker_pid" 2>/dev/null; then
        kill -TERM "$broker_pid" 2>/dev/null || true
        # Bounded wait for the graceful shutdown, then give up on it.
        for _ in $(seq 1 150); do
            kill -0 "$broker_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
    fi
    broker_pid=""
}

bench_cleanup() {
    bench_stop_broker
    rm -rf "$work"
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

bench_machine() {
    echo "==> machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "==> code: commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$( [ -n "$(git status --porcelain 2>/dev/null)" ] && echo ' + uncommitted changes (dirty tree)')"
}

# bench_start_broker QUIC: QUIC is "off" or "on" (on 127.0.0.1:$QUIC_PORT).
# The QUIC listener's fingerprint line is logged at INFO, so with QUIC on
# the broker's server module logs at info (nothing per connection).
bench_start_broker() {
    local quic=$1 quic_addr=off log=${TETHER_LOG:-warn}
    if [ "$quic" = on ]; then
        quic_addr="127.0.0.1:$QUIC_PORT"
        log=${TETHER_LOG:-warn,tether_broker::server=info}
    fi
    rm -rf "$work/data"
    echo "==> starting the broker (QUIC $quic_addr${BROKER_ARGS:+, $BROKER_ARGS}; log: $work/broker.log)"
    TETHER_LOG=$log "$broker_bin" \
        --client-addr "127.0.0.1:$CLIENT_PORT" \
        --api-addr "127.0.0.1:$API_PORT" \
        --quic-addr "$quic_addr" \
        --data-dir "$work/data" \
        "${broker_args[@]}" \
        >"$work/broker.log" 2>&1 &
    broker_pid=$!

    local ready=0
    for _ in $(seq 1 200); do
        if ! kill -0 "$broker_pid" 2>/dev/null; then
            echo "error: the broker exited; its log:" >&2
            cat "$work/broker.log" >&2
            exit 1
        fi
        if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$API_PORT/readyz" || true)" = 200 ]; then
            ready=1
            break
        fi
        sleep 0.1
    done
    if [ "$ready" != 1 ]; then
        echo "error: the broker did not answer /readyz with 200 within 20 s; its log:" >&2
        cat "$work/broker.log" >&2
        exit 1
    fi
    echo "==> broker ready (pid $broker_pid)"
}

# The SHA-256 fingerprint of the broker's self-signed QUIC certificate, from
# its log line `… fingerprint=<64 hex>` (text) or `"fingerprint":"<hex>"` (JSON).
bench_quic_fingerprint() {
    local fp=""
    for _ in $(seq 1 50); do
        fp=$(grep -oE 'fingerprint(=|":")[0-9a-f]{64}' "$work/broker.log" | head -1 | grep -oE '[0-9a-f]{64}' || true)
        [ -n "$fp" ] && break
        sleep 0.1
    done
    if [ -z "$fp" ]; then
        echo "error: no fingerprint=<hex> in the broker's log (was it given --tls-cert?):" >&2
        cat "$work/broker.log" >&2
        exit 1
    fi
    echo "$fp"
}

# bench_wait_connections_gone: until the broker counts no open connection
# (all transports) in GET /metrics, at most 90 s (QUIC sessions whose close
# was lost end at the 60 s idle timeout).
bench_wait_connections_gone() {
    local open
    for _ in $(seq 1 450); do
        open=$(curl -s "http://127.0.0.1:$API_PORT/metrics" |
            awk '/^tether_connections\{/ { n += $NF } END { print n + 0 }')
        [ "$open" = 0 ] && return 0
        sleep 0.2
    done
    echo "warning: the broker still counts $open open connections" >&2
}

# bench_wait_quiet: with BENCH_MAX_LOAD set, waits for the 1-minute load
# average to drop below it (bounded), and prints the load either way.
bench_wait_quiet() {
    local max=${BENCH_MAX_LOAD:-} limit=${BENCH_LOAD_WAIT:-900} waited=0 load
    load=$(cut -d' ' -f1 /proc/loadavg)
    if [ -n "$max" ]; then
        while awk -v l="$load" -v m="$max" 'BEGIN { exit !(l >= m) }'; do
            if [ "$waited" -ge "$limit" ]; then
                echo "==> load average $load still ≥ $max after ${limit} s: starting anyway"
                break
            fi
            sleep 5
            waited=$((waited + 5))
            load=$(cut -d' ' -f1 /proc/loadavg)
        done
    fi
    echo "==> load average (1 min) at start: $load$( [ "$waited" -gt 0 ] && echo " (waited ${waited} s)") at $(date -u +%H:%M:%SZ)"
}

# Warnings other than the two expected of an unauthenticated development
# setup, counted by text (timestamps stripped), most frequent first.
bench_broker_problems() {
    local problems
    problems=$(grep -E ' (WARN|ERROR) ' "$work/broker.log" | grep -vE 'no api-key configured|no jwt-secret or jwt-public-key configured' || true)
    if [ -n "$problems" ]; then
        echo "==> the broker logged warnings or errors (count × text, first 20 texts):"
        sed -E 's/^[^ ]+ +//' <<<"$problems" | sort | uniq -c | sort -rn | head -20
    fi
}
