#!/usr/bin/env bash
# On one TPU VM worker (run there by launch/tpu/train.sh): start lemur-train detached from the calling shell
# (setsid + nohup, stdin from /dev/null), so a dropped ssh connection does not stop training, and return.
#
#   LEMUR_WORKER=<i> launch/tpu/worker_train.sh parallel=xla_spmd [overrides...]
#
# ~/lemur-torch-logs/ on the worker's own disk holds train.worker<i>.log (appended, one header line per
# start), train.pid (lemur-train's pid, for stop.sh) and, once lemur-train has ended, train.exit (its exit
# status: 0 done, train.preempt_exit_code after a stop signal was honoured with a checkpoint).
# LEMUR_TRAIN overrides the program (default: the checkout's .venv/bin/lemur-train, never a PATH lookup).
set -euo pipefail
cd "$(dirname "$0")/../.."
export LEMUR_LOGS=${LEMUR_LOGS:-$HOME/lemur-torch-logs}
mkdir -p "$LEMUR_LOGS"
worker=${LEMUR_WORKER:-0}
program=${LEMUR_TRAIN:-$PWD/.venv/bin/lemur-train}
[ -x "$program" ] || { echo "worker $worker: $program not found; run launch/tpu/setup.sh first" >&2; exit 1; }
if [ -f "$LEMUR_LOGS/train.pid" ] && kill -0 "$(cat "$LEMUR_LOGS/train.pid")" 2>/dev/null; then
    echo "worker $worker: lemur-train is already running (pid $(cat "$LEMUR_LOGS/train.pid")); launch/tpu/stop.sh stops it" >&2
    exit 1
fi
rm -f "$LEMUR_LOGS/train.exit" "$LEMUR_LOGS/train.pid"
# shellcheck source=launch/tpu/env.sh
source launch/tpu/env.sh
log="$LEMUR_LOGS/train.worker$worker.log"
echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $worker: $program $*" >> "$log"
# the inner shell records lemur-train's pid, waits for it and records its exit status
setsid nohup bash -c '"$0" "$@" & echo $! > "$LEMUR_LOGS/train.pid"; wait $!; echo $? > "$LEMUR_LOGS/train.exit"' \
    "$program" "$@" >> "$log" 2>&1 < /dev/null &
for _ in $(seq 50); do [ -s "$LEMUR_LOGS/train.pid" ] && break; sleep 0.1; done
echo "worker $worker: lemur-train started (pid $(cat "$LEMUR_LOGS/train.pid" 2>/dev/null || echo '?')), log $log"
