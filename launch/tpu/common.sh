# Sourced by the TPU VM scripts (setup.sh, train.sh, stop.sh, logs.sh, queued.sh); not run on the workers.
#
#   TPU, ZONE          the TPU VM (slice) name and zone (set by each script from its arguments)
#   PROJECT            optional GCP project
#   LEMUR_TPU_DRY_RUN  1: print what would run, one line per worker ("[worker i] <command>"), run nothing
#   WORKERS            the slice's host count; asked from gcloud when unset (needed in a dry run)
#
# Every command runs on each worker through its own `gcloud compute tpus tpu-vm ssh --worker=i` (in parallel),
# so each worker's command is explicit (it carries the worker index, e.g. for its log file) and a dry run
# prints exactly what each worker would run.

LEMUR_DIR='~/lemur-torch'     # the code and its venv on each worker (the same path on all: SPMD)
LEMUR_LOGS='~/lemur-torch-logs'  # per-worker logs, pid and exit status, on the worker's own disk

_gcloud_target() {
    printf '%q ' "$TPU" --zone "$ZONE"
    [ -n "${PROJECT:-}" ] && printf -- '--project %q ' "$PROJECT"
    return 0
}

dry_run() { [ "${LEMUR_TPU_DRY_RUN:-0}" = 1 ]; }

# Run (or print) a gcloud command line given as one string.
gcloud_run() {
    if dry_run; then
        echo "gcloud $1"
    else
        eval "gcloud $1"
    fi
}

tpu_workers() {
    if [ -n "${WORKERS:-}" ]; then
        echo "$WORKERS"
        return
    fi
    dry_run && { echo "WORKERS must be set for a dry run" >&2; exit 2; }
    local ips
    ips=$(eval "gcloud compute tpus tpu-vm describe $(_gcloud_target) --format='value(networkEndpoints[].ipAddress)'")
    [ -n "$ips" ] || { echo "no workers found for TPU $TPU in $ZONE (is it READY?)" >&2; exit 1; }
    echo "$ips" | tr ';,' '\n\n' | grep -c .
}

# on_worker W COMMAND: run COMMAND (a shell string) on worker W.
on_worker() {
    if dry_run; then
        printf '[worker %s] %s\n' "$1" "$2"
        return 0
    fi
    eval "gcloud compute tpus tpu-vm ssh $(_gcloud_target) --worker=$1 --command $(printf '%q' "$2")"
}

# on_workers FUNCTION: on every worker i, run the command that `FUNCTION i` prints; all in parallel.
# Fails (after all have finished) if any worker failed, naming them.
on_workers() {
    local n w failed=() pids=()
    n=$(tpu_workers)
    for ((w = 0; w < n; w++)); do
        if dry_run; then
            on_worker "$w" "$("$1" "$w")"
        else
            on_worker "$w" "$("$1" "$w")" 2>&1 | sed "s/^/[worker $w] /" &
            pids+=($!)
        fi
    done
    for w in "${!pids[@]}"; do
        wait "${pids[$w]}" || failed+=("$w")
    done
    if [ ${#failed[@]} -gt 0 ]; then
        echo "failed on worker(s): ${failed[*]}" >&2
        return 1
    fi
}

# A worker's lemur-train: "running", "exit <status>" (it ended; 0 = done), or "none" (never started, or
# killed with its wrapper before it could record a status, e.g. when the VM went down).
status_command() {
    echo "if [ -f $LEMUR_LOGS/train.exit ]; then echo \"exit \$(cat $LEMUR_LOGS/train.exit)\"; elif kill -0 \"\$(cat $LEMUR_LOGS/train.pid 2>/dev/null)\" 2>/dev/null; then echo running; else echo none; fi"
}
