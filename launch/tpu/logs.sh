#!/usr/bin/env bash
# The end of one worker's training log (default worker 0, which also prints the step lines), and whether
# lemur-train is still running there or how it ended.
#
#   launch/tpu/logs.sh TPU_NAME ZONE [WORKER] [LINES]
set -euo pipefail
TPU=${1:?usage: logs.sh TPU_NAME ZONE [WORKER] [LINES]}
ZONE=${2:?usage: logs.sh TPU_NAME ZONE [WORKER] [LINES]}
WORKER=${3:-0}
LINES=${4:-50}
source "$(dirname "$0")/common.sh"
on_worker "$WORKER" "tail -n $LINES $LEMUR_LOGS/train.worker$WORKER.log; $(status_command)"
