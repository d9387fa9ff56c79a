#!/usr/bin/env bash
# Start lemur-train under torchrun on this node; every argument is passed to the trainer as a Hydra override.
#
#   One node:   launch/torchrun.sh experiment=smoke                      (one process per GPU, or 1 on CPU)
#   Multi node: run the same line on every node with the head node's address:
#               NNODES=8 MASTER_ADDR=node001 launch/torchrun.sh experiment=lemur_70b_pretrain
#   Elastic:    NNODES=4:8 MAX_RESTARTS=3 MASTER_ADDR=node001 launch/torchrun.sh ...
#
# Environment (all optional):
#   NNODES          number of nodes, or MIN:MAX for an elastic job (default 1)
#   NPROC_PER_NODE  processes per node (default: the GPU count, or 1 without GPUs)
#   MASTER_ADDR     rendezvous host, the head node (default 127.0.0.1); MASTER_PORT its port (default 29500)
#   RDZV_ID         rendezvous id shared by the nodes of one job (default lemur; Slurm scripts use the job id)
#   RDZV_BACKEND    c10d (default: agents meet at MASTER_ADDR:MASTER_PORT, ranks in join order)
#                   or static (NODE_RANK required on every node, node ranks fixed)
#   NODE_RANK       this node's rank, for RDZV_BACKEND=static
#   MAX_RESTARTS    torchrun restarts of the worker group after a failure (default 0)
#   SHUTDOWN_TIMEOUT seconds torchrun waits for workers after passing on a stop signal before it kills them
#                   (default 600: a preempted 70B run needs the time to finish its step and write a checkpoint)
#   PYTHON          interpreter with lemur_torch installed (default: .venv/bin/python of this checkout, else python)
#   LEMUR_MODULE    module to run (default lemur_torch.train)
# A single node with NNODES=1 uses --standalone: a private rendezvous on a free local port, so several
# single-node runs on one machine never collide.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python; fi
fi

NNODES="${NNODES:-1}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    if [[ "$gpus" -gt 0 ]]; then NPROC_PER_NODE="$gpus"; fi
  fi
fi

# SIGUSR1 is the early preemption warning (Slurm's --signal, see launch/slurm/job.sh). torchrun passes the
# signals it handles on to every worker and then waits SHUTDOWN_TIMEOUT for them to checkpoint and exit;
# a signal it did not handle would kill the agent (SIGUSR1's default action) and orphan the workers mid-save.
# Set through the environment (torchrun's PET_* defaults), which a torchrun without these options ignores.
signals="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
export PET_SIGNALS_TO_HANDLE="$signals" TORCHELASTIC_SIGNALS_TO_HANDLE="$signals"
export PET_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-600}" TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-600}"
args=(
  --nnodes "$NNODES"
  --nproc-per-node "$NPROC_PER_NODE"
  --max-restarts "${MAX_RESTARTS:-0}"
)
if [[ "$NNODES" == 1 && -z "${MASTER_ADDR:-}" ]]; then
  args+=(--standalone)
elif [[ "${RDZV_BACKEND:-c10d}" == static ]]; then
  : "${NODE_RANK:?RDZV_BACKEND=static needs NODE_RANK (0 on the head node)}"
  args+=(--node-rank "$NODE_RANK" --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}")
else
  args+=(--rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
         --rdzv-id "${RDZV_ID:-lemur}")
fi

exec "$PYTHON" -m torch.distributed.run "${args[@]}" -m "${LEMUR_MODULE:-lemur_torch.train}" "$@"
