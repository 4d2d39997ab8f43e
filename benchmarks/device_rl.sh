#!/usr/bin/env bash
# One-shot RL benchmark of a whole tinkerq stack on this machine, through the tinker SDK.
#
#   bash benchmarks/device_rl.sh [SIZE] [TP] [benchmarks.rl_reference args...]
#
# SIZE: 4b (default), 0.6b: a random-weight bf16 Qwen3 of that size, written once under /tmp
#       (python -m workers.default_model --qwen3 SIZE); tiny: the built-in tinkerq/tiny-qwen3.
# TP:   tensor-parallel size of the worker (default: the number of GPUs, at least 1).
# The rest goes to `python -m benchmarks.rl_reference` (e.g. --steps 20 --time-budget 400).
#
# Runs what the Procfile runs (embedded Redis, gunicorn API, Celery GPU worker) with SQLite and
# a fresh data folder under /tmp, waits for the API and the worker, runs the RL loop, and
# stops the stack. Logs go to $OUT (else /tmp/tinkerq-rl-logs); on failure the worker log's
# tail is printed. Everything is bounded: the RL loop is sent SIGTERM (it then prints the
# summary of its finished steps) at DEADLINE seconds after the script started (default 550).
# Run from the repository root with the packages importable (PYTHONPATH may point at them;
# on a GPU machine without the web stack: benchmarks/device_wheels.sh lists and fetches them).
# Environment overrides: PYTHON, PORT (8000), REDIS_PORT (6390), DEADLINE, READY_TIMEOUT
# (240 s after the script started), MICRO_BATCH (--train-micro-batch-size, in tokens;
# default 8704: the reference configuration's "8" counts sequences, here 8 of 64 + 1024
# tokens), WORKER_ARGS (more `python -m workers` flags, e.g. "--sample-max-num-sequences 512
# --sample-kv-tokens 520000" as in the README's figures).
set -u

PY=${PYTHON:-$(command -v python3 || command -v python)}
DEADLINE=${DEADLINE:-550}
READY_TIMEOUT=${READY_TIMEOUT:-240}
PORT=${PORT:-8000}
REDIS_PORT=${REDIS_PORT:-6390}
MICRO_BATCH=${MICRO_BATCH:-8704}
LOGS=${OUT:-/tmp/tinkerq-rl-logs}
DATA=/tmp/tinkerq-rl-data

SIZE=4b
TP=
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then SIZE=$1; shift; fi
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then TP=$1; shift; fi
if [ -z "$TP" ]; then
    TP=$(timeout 60 "$PY" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi

mkdir -p "$LOGS"
rm -rf "$DATA" && mkdir -p "$DATA"
note() { echo "[device_rl $(printf '%4d' "$SECONDS") s] $*"; }

# --- the model ------------------------------------------------------------------------------
if [ "$SIZE" = tiny ]; then
    MODEL=tinkerq/tiny-qwen3  # the worker writes it into its data folder
else
    MODEL=/tmp/qwen3-$SIZE-random
    note "writing $MODEL (once)"
    if ! timeout 300 "$PY" -m workers.default_model --qwen3 "$SIZE" "$MODEL" \
            > "$LOGS/model.log" 2>&1; then
        note "writing the model failed:"; tail -n 30 "$LOGS/model.log"; exit 1
    fi
fi

# --- the stack (as the Procfile) ------------------------------------------------------------
unset DATABASE_URL REDIS_URL
export TINKERQ_DATA_DIR=$DATA TINKERQ_BASE_MODEL=$MODEL TINKERQ_PORT=$PORT \
    TINKERQ_EMBEDDED_REDIS_PORT=$REDIS_PORT TINKER_TELEMETRY=0 PYTHONUNBUFFERED=1

PGIDS=()
start() {  # start NAME CMD...: its own session (process group), output to $LOGS/NAME.log
    local name=$1; shift
    setsid "$@" > "$LOGS/$name.log" 2>&1 < /dev/null &
    PGIDS+=($!)
}
stop_stack() {
    local pg
    for pg in "${PGIDS[@]}"; do kill -TERM -- "-$pg" 2>/dev/null; done
    for _ in $(seq 20); do
        local alive=0
        for pg in "${PGIDS[@]}"; do kill -0 -- "-$pg" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && return
        sleep 0.5
    done
    for pg in "${PGIDS[@]}"; do kill -KILL -- "-$pg" 2>/dev/null; done
}
show_logs() {
    note "worker log (tail):"; tail -n 60 "$LOGS/worker.log" 2>/dev/null
    note "web log (tail):"; tail -n 15 "$LOGS/web.log" 2>/dev/null
    note "redis log (tail):"; tail -n 5 "$LOGS/redis.log" 2>/dev/null
}
trap stop_stack EXIT
trap 'exit 130' INT TERM

note "model $MODEL, tensor-parallel $TP, logs in $LOGS"
start redis "$PY" -m tasks.embedded_redis
start web "$PY" -m gunicorn --config app/gunicorn_conf.py 'app.factory:create_app()'
# shellcheck disable=SC2086  # WORKER_ARGS is a list of flags
start worker "$PY" -m workers --tensor-parallel-size "$TP" --max-lora-adapters 3 \
    --max-lora-rank 1 --train-micro-batch-size "$MICRO_BATCH" ${WORKER_ARGS:-}

ready() {
    grep -q " ready\." "$LOGS/worker.log" 2>/dev/null || return 1
    "$PY" - "$PORT" <<'EOF' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/v1/healthz", timeout=2)
EOF
}
until ready; do
    for pg in "${PGIDS[@]}"; do
        if ! kill -0 "$pg" 2>/dev/null; then note "a stack process exited early"; show_logs; exit 1; fi
    done
    if [ "$SECONDS" -gt "$READY_TIMEOUT" ]; then
        note "stack not ready after $READY_TIMEOUT s"; show_logs; exit 1
    fi
    sleep 1
done
note "stack ready"

# --- the RL loop ------------------------------------------------------------------------------
LEFT=$((DEADLINE - SECONDS)); [ "$LEFT" -lt 10 ] && LEFT=10
note "running benchmarks.rl_reference (killed after $LEFT s)"
timeout -k 5 "$LEFT" "$PY" -m benchmarks.rl_reference --base-url "http://127.0.0.1:$PORT" "$@" \
    2>&1 | tee "$LOGS/rl.log"
RC=${PIPESTATUS[0]}
if [ "$RC" = 124 ]; then
    note "DEADLINE reached: the RL loop was stopped (its summary covers the finished steps)"
elif [ "$RC" != 0 ]; then
    note "rl_reference failed (exit $RC)"; show_logs
fi
note "stopping the stack"
exit "$RC"
