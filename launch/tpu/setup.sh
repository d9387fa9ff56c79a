#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM slice and install it there, in its own venv
# (~/lemur-torch/.venv): torch 2.9.0 from PyTorch's CPU wheel index (PyPI's torch is the CUDA build, ~3 GB of
# nvidia wheels a TPU never uses; torch_xla's wheel does not pin torch, so it is pinned here), then the
# package with its `tpu` extra (torch_xla[tpu,pallas] 2.9.0 with jax 0.7.1, torchax and flax for scan_layers, gcsfs).
#
#   launch/tpu/setup.sh TPU_NAME ZONE
#   GCS_BUCKET=my-bucket launch/tpu/setup.sh TPU_NAME ZONE    # also mount gs://my-bucket at /mnt/lemur
#
# The code lands in ~/lemur-torch on each worker (the same path on all: SPMD runs one identical program);
# a venv already there is kept and updated. With GCS_BUCKET every worker mounts the bucket with gcsfuse at
# $GCS_MOUNT (default /mnt/lemur), for run_dir and checkpoints that all hosts see (see docs/cluster.md).
# LEMUR_TPU_DRY_RUN=1 WORKERS=<n> prints each worker's commands instead of running them.
set -euo pipefail
TPU=${1:?usage: setup.sh TPU_NAME ZONE}
ZONE=${2:?usage: setup.sh TPU_NAME ZONE}
source "$(dirname "$0")/common.sh"
cd "$(dirname "$0")/../.."
GCS_MOUNT=${GCS_MOUNT:-/mnt/lemur}
TORCH_INDEX=https://download.pytorch.org/whl/cpu

archive=$(mktemp -t lemur-torch-XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
git archive --format=tar.gz -o "$archive" HEAD
gcloud_run "compute tpus tpu-vm scp $(printf '%q' "$archive") $TPU:lemur-torch.tar.gz --zone $ZONE ${PROJECT:+--project $PROJECT} --worker=all"

setup_command() {
    local py="$LEMUR_DIR/.venv/bin/python"
    local cmd="set -e; mkdir -p $LEMUR_DIR"
    cmd+="; find $LEMUR_DIR -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +"
    cmd+="; tar -xzf ~/lemur-torch.tar.gz -C $LEMUR_DIR"
    cmd+="; test -x $py || python3 -m venv $LEMUR_DIR/.venv"
    cmd+="; $py -m pip install -q --upgrade pip"
    cmd+="; $py -m pip install -q torch==2.9.0 --index-url $TORCH_INDEX"
    cmd+="; $py -m pip install -q -e \"\$HOME/lemur-torch[tpu]\""
    cmd+="; $py -c \"import torch, torch_xla; assert torch.__version__ == '2.9.0+cpu' and torch.version.cuda is None, torch.__version__; print('worker $1: torch', torch.__version__, 'torch_xla', torch_xla.__version__)\""
    # parallel.scan_layers reaches JAX through torchax; torch_xla finds no torchax when one of torchax's imports
    # (flax) is missing, and a run would fail at its first step: fail here instead
    cmd+="; $py -c \"import torchax.interop\""
    cmd+="; test -x $LEMUR_DIR/.venv/bin/lemur-train"
    if [ -n "${GCS_BUCKET:-}" ]; then
        cmd+="; command -v gcsfuse >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q gcsfuse)"
        cmd+="; sudo mkdir -p $GCS_MOUNT && sudo chown \$USER $GCS_MOUNT"
        cmd+="; mountpoint -q $GCS_MOUNT || gcsfuse --implicit-dirs $GCS_BUCKET $GCS_MOUNT"
    fi
    echo "$cmd"
}

on_workers setup_command
