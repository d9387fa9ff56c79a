#!/usr/bin/env bash
# Ask every worker's lemur-train to checkpoint and exit (SIGTERM: the trainer finishes the step, saves, and
# exits with train.preempt_exit_code), e.g. before deleting or resizing the pod.
#
#   launch/tpu/stop.sh TPU_NAME ZONE
set -euo pipefail
TPU=${1:?usage: stop.sh TPU_NAME ZONE}
ZONE=${2:?usage: stop.sh TPU_NAME ZONE}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all \
    --command 'test -f ~/lemur-train.pid && kill -TERM "$(cat ~/lemur-train.pid)" || true'
