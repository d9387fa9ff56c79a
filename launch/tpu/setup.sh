#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU VM pod and install it there with torch 2.9 + torch_xla[tpu] 2.9
# (torch_xla's wheel does not pin torch: pin it, or pip pulls a torch it was not built for).
#
#   launch/tpu/setup.sh TPU_NAME ZONE [PROJECT]
#
# The code lands in ~/lemur-torch on each worker (the same path on all: SPMD runs one identical program).
set -euo pipefail
TPU=${1:?usage: setup.sh TPU_NAME ZONE [PROJECT]}
ZONE=${2:?usage: setup.sh TPU_NAME ZONE [PROJECT]}
PROJECT_ARGS=()
[ -n "${3:-}" ] && PROJECT_ARGS=(--project "$3")
cd "$(dirname "$0")/../.."

archive=$(mktemp -t lemur-torch-XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
git archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$TPU":lemur-torch.tar.gz --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "${PROJECT_ARGS[@]}" --worker=all --command '
set -e
rm -rf ~/lemur-torch && mkdir -p ~/lemur-torch && tar -xzf ~/lemur-torch.tar.gz -C ~/lemur-torch
python3 -m pip install --upgrade pip
python3 -m pip install "torch==2.9.0" "torch_xla[tpu,pallas]==2.9.0"
python3 -m pip install -e ~/lemur-torch
python3 -c "import torch_xla.runtime as xr; print(\"worker\", xr.process_index(), \"of\", xr.process_count(), xr.device_type())"
'
