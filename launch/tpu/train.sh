#!/usr/bin/env bash
# Start lemur-train on every worker of a TPU VM slice (one process per host; SPMD over all chips of the slice)
# and return: each worker runs it detached (launch/tpu/worker_train.sh), so no ssh session holds training.
#
#   launch/tpu/train.sh TPU_NAME ZONE [hydra overrides...]
#   e.g. launch/tpu/train.sh lemur-v4-512 us-central2-b experiment=lemur_70b_pretrain_tpu_v4 \
#            run_dir=/mnt/lemur/runs/lemur70b checkpoint.commit=marker model.pretrained=gs://my-bucket/Llama-2-70b-hf
#
# parallel=xla_spmd is always set. run_dir (and so checkpoint.dir) must be storage every host sees (Filestore,
# or the gcsfuse mount setup.sh makes with GCS_BUCKET; on gcsfuse pass checkpoint.commit=marker, a folder
# rename is not atomic there): each host writes its shards there, and checkpoint.resume=auto finds the newest
# complete checkpoint when a restarted slice runs this again.
# Follow the run: launch/tpu/logs.sh TPU_NAME ZONE [WORKER]; stop it with a checkpoint: launch/tpu/stop.sh.
# LEMUR_TPU_DRY_RUN=1 WORKERS=<n> prints each worker's command instead of running it.
set -euo pipefail
TPU=${1:?usage: train.sh TPU_NAME ZONE [overrides...]}
ZONE=${2:?usage: train.sh TPU_NAME ZONE [overrides...]}
shift 2
source "$(dirname "$0")/common.sh"
ARGS=$(printf ' %q' parallel=xla_spmd "$@")

train_command() {
    echo "cd $LEMUR_DIR && LEMUR_WORKER=$1 launch/tpu/worker_train.sh$ARGS"
}

on_workers train_command
