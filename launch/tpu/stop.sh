#!/usr/bin/env bash
# Ask every worker's lemur-train to checkpoint and exit: SIGTERM to lemur-train itself (its pid from
# worker_train.sh); the trainer finishes the step, all hosts agree to stop at the same step, save, and exit
# with train.preempt_exit_code. Use it before deleting or resizing a slice.
#
#   launch/tpu/stop.sh TPU_NAME ZONE
set -euo pipefail
TPU=${1:?usage: stop.sh TPU_NAME ZONE}
ZONE=${2:?usage: stop.sh TPU_NAME ZONE}
source "$(dirname "$0")/common.sh"

stop_command() {
    echo "pid=\$(cat $LEMUR_LOGS/train.pid 2>/dev/null) && kill -TERM \"\$pid\" 2>/dev/null && echo \"worker $1: SIGTERM sent to \$pid\" || echo \"worker $1: lemur-train is not running\""
}

on_workers stop_command
