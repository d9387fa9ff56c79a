#!/usr/bin/env bash
# Keep a training run going on a TPU slice obtained through a queued resource (spot or reserved), across
# preemptions: run this on a machine that stays up (a small VM, Cloud Shell with tmux), not on the slice.
#
#   launch/tpu/queued.sh NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION [hydra overrides...]
#   e.g. GCS_BUCKET=my-bucket launch/tpu/queued.sh lemur70b us-central2-b v4-512 tpu-ubuntu2204-base \
#            experiment=lemur_70b_pretrain_tpu_v4 run_dir=/mnt/lemur/runs/lemur70b \
#            checkpoint.commit=marker
#
# The loop: create the queued resource NAME (node NAME) unless it exists; wait until it is ACTIVE; install
# (setup.sh) and start training (train.sh: detached on every worker); then every POLL_S seconds look at the
# queued resource and at worker 0's lemur-train:
#   - the resource left ACTIVE (spot preemption, maintenance: SUSPENDED, FAILED, ...): delete it and start
#     over; the new slice resumes from the newest complete checkpoint in run_dir (checkpoint.resume=auto);
#   - lemur-train exited 0: training is done; the resource is deleted (KEEP=1 keeps it) and this exits 0;
#   - it exited otherwise, or is gone (crash, stop signal honoured, VM restarted): stop it on every host
#     (stop.sh, then SIGKILL after STOP_WAIT_S, default 900) and start train.sh again.
# Every restart counts against MAX_RESTARTS (default 50); past it this exits 1.
# Settings: SPOT=1 (default; 0 = on-demand/reserved capacity), RESERVED=1 (--reserved), POLL_S (default 120),
# WAIT_ACTIVE_S (how long to wait for capacity, default 86400), PROJECT, GCS_BUCKET (for setup.sh).
# run_dir must be on storage every host sees and that outlives the slice (gcsfuse mount, Filestore), or
# nothing can resume.
# LEMUR_TPU_DRY_RUN=1 WORKERS=<n> prints the commands of one cycle (create, setup, train) and stops.
set -euo pipefail
NAME=${1:?usage: queued.sh NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION [overrides...]}
ZONE=${2:?usage: queued.sh NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION [overrides...]}
ACCELERATOR=${3:?usage: queued.sh NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION [overrides...]}
RUNTIME=${4:?usage: queued.sh NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION [overrides...]}
shift 4
HERE=$(cd "$(dirname "$0")" && pwd)
TPU=$NAME
source "$HERE/common.sh"
POLL_S=${POLL_S:-120}
WAIT_ACTIVE_S=${WAIT_ACTIVE_S:-86400}
MAX_RESTARTS=${MAX_RESTARTS:-50}
QR="compute tpus queued-resources"
TARGET="$NAME --zone $ZONE${PROJECT:+ --project $PROJECT}"

log() { echo "[queued.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"; }

qr_state() {
    gcloud $QR describe $TARGET --format='value(state.state)' 2>/dev/null || echo MISSING
}

create() {
    local capacity=""
    [ "${SPOT:-1}" = 1 ] && capacity="--spot"
    [ "${RESERVED:-0}" = 1 ] && capacity="--reserved"
    gcloud_run "$QR create $TARGET --node-id $NAME --accelerator-type $ACCELERATOR --runtime-version $RUNTIME $capacity"
}

delete() {
    gcloud_run "$QR delete $TARGET --force --quiet --async" || true
    # a name can be reused only once the old resource is gone
    while [ "$(qr_state)" != MISSING ]; do sleep "$POLL_S"; done
}

# True when lemur-train runs on no worker (checked on each).
stopped_everywhere() {
    local n w
    n=$(tpu_workers)
    for ((w = 0; w < n; w++)); do
        [ "$(on_worker "$w" "$(status_command)" 2>/dev/null | tail -n 1)" = running ] && return 1
    done
    return 0
}

kill_command() {
    echo "kill -KILL \$(cat $LEMUR_LOGS/train.pid 2>/dev/null) 2>/dev/null || true"
}

# After a crash on one host the others wait in a collective: ask all to stop (a checkpoint where they can),
# give them STOP_WAIT_S, kill what is left, then start every host again.
restart_training() {
    "$HERE/stop.sh" "$NAME" "$ZONE" >/dev/null 2>&1 || true
    local waited=0
    until stopped_everywhere; do
        if [ "$waited" -ge "${STOP_WAIT_S:-900}" ]; then
            on_workers kill_command || true
            break
        fi
        sleep "$POLL_S"
        waited=$((waited + POLL_S))
    done
    "$HERE/train.sh" "$NAME" "$ZONE" "$@" || true
}

start_training() {
    "$HERE/setup.sh" "$NAME" "$ZONE"
    "$HERE/train.sh" "$NAME" "$ZONE" "$@"
}

if dry_run; then
    create
    start_training "$@"
    exit 0
fi

restarts=0
restart() {
    restarts=$((restarts + 1))
    if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
        log "more than MAX_RESTARTS=$MAX_RESTARTS restarts: giving up"
        exit 1
    fi
    log "restart $restarts: $*"
}

while true; do
    state=$(qr_state)
    if [ "$state" = MISSING ]; then
        log "creating queued resource $NAME ($ACCELERATOR, $RUNTIME)"
        create
    elif [ "$state" != ACTIVE ] && [ "$state" != WAITING_FOR_RESOURCES ] && [ "$state" != ACCEPTED ] \
        && [ "$state" != PROVISIONING ] && [ "$state" != CREATING ]; then
        restart "queued resource is $state"
        delete
        continue
    fi
    waited=0
    until [ "$(qr_state)" = ACTIVE ]; do
        [ "$waited" -ge "$WAIT_ACTIVE_S" ] && { log "not ACTIVE after ${WAIT_ACTIVE_S}s: giving up"; exit 1; }
        sleep "$POLL_S"
        waited=$((waited + POLL_S))
    done
    log "$NAME is ACTIVE: installing and starting training"
    if ! start_training "$@"; then
        restart "setup or start failed"
        continue
    fi
    while true; do
        sleep "$POLL_S"
        state=$(qr_state)
        if [ "$state" != ACTIVE ]; then
            restart "queued resource went $state (preempted?)"
            delete
            break
        fi
        status=$(on_worker 0 "$(status_command)" 2>/dev/null | tail -n 1 || echo unknown)
        case "$status" in
            running|unknown) ;;
            "exit 0")
                log "training finished"
                [ "${KEEP:-0}" = 1 ] || delete
                exit 0
                ;;
            *)
                restart "lemur-train on worker 0: $status"
                restart_training "$@"
                ;;
        esac
    done
done
