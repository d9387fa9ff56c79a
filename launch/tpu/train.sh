#!/usr/bin/env bash
# Start lemur-train on every worker of a TPU VM pod (one process per host; SPMD over all chips of the pod).
#
#   launch/tpu/train.sh TPU_NAME ZONE [hydra overrides...]
#   e.g. launch/tpu/train.sh lemur-v4-512 us-central2-b experiment=lemur_70b_pretrain \
#            checkpoint.dir=/mnt/ckpt/lemur70b run_dir=/mnt/runs/lemur70b
#
# parallel=xla_spmd is always set. checkpoint.dir must be storage every host sees (a shared filesystem such
# as Filestore or a gcsfuse mount): DCP writes each host's shards there and resume=auto finds the newest.
# Logs: ~/lemur-train.log on each worker (pid in ~/lemur-train.pid, for stop.sh); this script returns when all workers have exited, with the
# first non-zero status (train.preempt_exit_code after a preemption was honoured with a checkpoint).
set -euo pipefail
TPU=${1:?usage: train.sh TPU_NAME ZONE [overrides...]}
ZONE=${2:?usage: train.sh TPU_NAME ZONE [overrides...]}
shift 2
args=$(printf ' %q' parallel=xla_spmd "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} --worker=all --command "
cd ~/lemur-torch && source launch/tpu/env.sh
{ lemur-train$args 2>&1 & echo \$! > ~/lemur-train.pid; wait \$!; } | tee ~/lemur-train.log
exit \${PIPESTATUS[0]}
"
