#!/usr/bin/env bash
# The torch_xla test lane (`make test-xla`): torch 2.9 + torch_xla 2.9 in their own venv, SPMD on 4 CPU PJRT
# devices, each test file in its own process (SPMD mode is process-global), then the main-lane checks
# (.venv, torch 2.13) on what the XLA runs wrote: HF export and cross-backend checkpoints.
#
# The venv is rebuilt only when tests/xla/requirements.txt or pyproject.toml change (stamp); uv's cache keeps
# the ~3.5 GB of wheels between builds, so a fresh clone on a used machine builds it in ~20 s.
# LEMUR_XLA_VENV moves the venv; LEMUR_XLA_ARTIFACTS keeps the runs' outputs (default: a temporary folder
# removed at exit).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=${LEMUR_XLA_VENV:-$ROOT/.venv-xla}
PY=${LEMUR_XLA_PYTHON:-python3.11}
MAIN_PY=$ROOT/.venv/bin/python
t_start=$(date +%s)

want=$(cat tests/xla/requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.lemur-stamp" 2>/dev/null)" != "$want" ]; then
    echo "xla lane: building $VENV (torch 2.9 + torch_xla 2.9)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    # uv installs the ~3.5 GB of wheels in ~1 min cold and ~20 s from its cache (pip: 2-4 min);
    # pip stays the fallback. The pip config's local wheel folders do not hold torch 2.9: PyPI does.
    if "$VENV/bin/pip" install -q --disable-pip-version-check uv 2>&1 | grep -v "is ignored: it is neither"; then :; fi
    if [ -x "$VENV/bin/uv" ]; then
        # --compile-bytecode: uv writes no .pyc by default (pip does), and where PYTHONDONTWRITEBYTECODE is set
        # (this CI machine) no import writes one either: every torch_xla process then compiled torch, torch_xla
        # and transformers from source, ~16 CPU-s of imports instead of ~7, in each of the lane's ~35 processes
        "$VENV/bin/uv" pip install -q --compile-bytecode --python "$VENV/bin/python" -r tests/xla/requirements.txt
        "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --no-deps -e .
    else
        "$VENV/bin/pip" install -q --disable-pip-version-check -r tests/xla/requirements.txt 2>&1 | grep -v "is ignored: it is neither" || true
        "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
    fi
    PJRT_DEVICE=CPU "$VENV/bin/python" -c "import torch, torch_xla; assert torch.__version__.startswith('2.9.0'), torch.__version__"
    echo "$want" > "$VENV/.lemur-stamp"
    echo "xla lane: venv built in $(( $(date +%s) - t_start ))s"
fi
if [ ! -x "$MAIN_PY" ]; then
    make -s setup
fi

if [ -z "${LEMUR_XLA_ARTIFACTS:-}" ]; then
    LEMUR_XLA_ARTIFACTS=$(mktemp -d -t lemur-xla-XXXXXX)
    trap 'rm -rf "$LEMUR_XLA_ARTIFACTS"' EXIT
fi
export LEMUR_XLA_ARTIFACTS
export PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LEMUR_MAIN_PYTHON=$MAIN_PY

status=0
for f in tests/xla/test_*.py; do
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$f" || status=1
done
# The same artifacts read by plain transformers / the FSDP backend in the main lane's torch.
"$MAIN_PY" -m pytest -q -p no:cacheprovider tests/xla/main_lane || status=1
echo "xla lane: done in $(( $(date +%s) - t_start ))s (status $status)"
exit $status
