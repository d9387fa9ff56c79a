# Body shared by the sbatch scripts in this folder; they set EXPERIMENT and source it. Not run on its own.
#
# One srun task per node runs launch/torchrun.sh; the torchrun agents meet at the job's first node (c10d
# rendezvous, id = job id). Every argument given to sbatch after the script name is a Hydra override.
# Run folder: $RUNS_DIR/<job name>-<job id> (RUNS_DIR defaults to runs/ in the submit directory), holding
# checkpoints/, hf/, metrics.jsonl and logs/ (one log per srun task, plus this script's own job.log). A requeued
# job keeps its id, so it finds its run folder and the trainer resumes from the newest checkpoint. Set RUN_DIR
# to continue a run under a new job id.
#
# Preemption and time limits:
# - SIGUSR1 is the early warning: the sbatch scripts ask for `--signal=B:USR1@<seconds>` before the time limit,
#   and `scancel --batch --signal=USR1 <job>` sends the same by hand. This script passes it to the training
#   step; the trainer finishes its step, writes a checkpoint and exits with train.preempt_exit_code; then this
#   script requeues the job (`scontrol requeue`), which starts again from that checkpoint.
# - SIGTERM (Slurm preemption with PreemptMode=REQUEUE, scancel, the time limit) reaches every process; the
#   trainer checkpoints within the cluster's KillWait/GraceTime. Slurm's own preemption requeues `--requeue`
#   jobs itself; a plain scancel stays cancelled.
# Crashes: when the training step ends with a non-zero status without a preemption (a node or GPU failure, an
# NCCL error, the trainer's step watchdog ending a hung run, a killed process), the job is requeued as well and
# resumes from the newest complete checkpoint, up to MAX_CRASH_REQUEUES times per job (default 3; 0 turns it
# off). Each crash requeue is one line in logs/job.log, which is also where the count is kept.
set -euo pipefail

: "${EXPERIMENT:?the sbatch script sets EXPERIMENT before sourcing job.sh}"
LEMUR_HOME="${LEMUR_HOME:-$SLURM_SUBMIT_DIR}"
if [[ ! -x "$LEMUR_HOME/launch/torchrun.sh" ]]; then
  echo "job.sh: $LEMUR_HOME/launch/torchrun.sh not found: submit from the lemur-torch checkout or set LEMUR_HOME" >&2
  exit 2
fi
RUNS_DIR="${RUNS_DIR:-$SLURM_SUBMIT_DIR/runs}"
RUN_DIR="${RUN_DIR:-$RUNS_DIR/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
mkdir -p "$RUN_DIR/logs"

log() { echo "[job.sh $(date -u +%FT%TZ) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}] $*" | tee -a "$RUN_DIR/logs/job.log"; }

# torchrun.sh reads these on every node.
export NNODES="$SLURM_NTASKS"                     # one torchrun agent per srun task (one task per node)
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export RDZV_ID="$SLURM_JOB_ID"
if [[ -z "${NPROC_PER_NODE:-}" && -n "${SLURM_GPUS_ON_NODE:-}" ]]; then export NPROC_PER_NODE="$SLURM_GPUS_ON_NODE"; fi

MAX_CRASH_REQUEUES="${MAX_CRASH_REQUEUES:-3}"
preempted=0
terminated=0
on_usr1() {
  preempted=1
  log "SIGUSR1: passing it to the training step (finish the step, checkpoint, exit), then requeue"
  scancel --signal=USR1 "$SLURM_JOB_ID" || true   # every step of the job, not this batch shell
}
# Slurm sends SIGTERM to every process of the job itself (time limit, preemption, scancel). The trap only keeps
# this shell alive meanwhile: if it died, the job would end and the step be killed in the middle of its save.
on_term() { terminated=1; log "SIGTERM: the training step checkpoints and exits within the cluster's KillWait"; }
trap on_usr1 USR1
trap on_term TERM

log "start: $EXPERIMENT on $SLURM_JOB_NUM_NODES node(s), $NNODES agent(s) x ${NPROC_PER_NODE:-auto} process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"
# No --kill-on-bad-exit: when one node's trainer exits after a checkpoint, the others must finish their part of it.
srun --kill-on-bad-exit=0 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --open-mode=append \
  --output="$RUN_DIR/logs/task%t.log" \
  "$LEMUR_HOME/launch/torchrun.sh" experiment="$EXPERIMENT" run_dir="$RUN_DIR" "$@" &
step_pid=$!
# A trapped signal interrupts `wait`; keep waiting until the step has really ended.
rc=0
while true; do
  wait "$step_pid" && rc=0 || rc=$?
  kill -0 "$step_pid" 2>/dev/null || break
done
log "training step ended with status $rc"

requeue() {
  trap - TERM USR1  # the requeue ends this shell with SIGTERM: let it, so the job is requeued at once
  if scontrol requeue "$SLURM_JOB_ID"; then
    sleep 600  # never reached in practice; the failed step's status must not become the job's
    exit 0
  fi
  log "scontrol requeue failed (was the job submitted with --no-requeue?); resubmit to resume"
}

if [[ "$rc" != 0 && "$preempted" == 1 ]]; then
  log "preempted: requeueing; the trainer resumes from the newest checkpoint in $RUN_DIR/checkpoints"
  requeue
elif [[ "$rc" != 0 && "$terminated" == 0 ]]; then
  crashes=$(grep -c "job ${SLURM_JOB_ID} restart [0-9]*\] crashed" "$RUN_DIR/logs/job.log" || true)
  if (( crashes < MAX_CRASH_REQUEUES )); then
    log "crashed (status $rc): requeueing, crash requeue $((crashes + 1)) of MAX_CRASH_REQUEUES=$MAX_CRASH_REQUEUES; the trainer resumes from the newest checkpoint in $RUN_DIR/checkpoints"
    requeue
  else
    log "failed (status $rc) after $crashes crash requeue(s): MAX_CRASH_REQUEUES=$MAX_CRASH_REQUEUES reached, not requeueing"
  fi
fi
exit "$rc"
