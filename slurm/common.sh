# Sourced by the sbatch scripts (from the submit directory: submit them from the repository root).
#
# BONY_IMAGE=path/to/bony.sif runs every command inside that Apptainer image (built from
# slurm/bony.def, the pins of requirements.lock), with the node's GPUs (--nv) and this checkout's
# bonylib on PYTHONPATH; unset, the commands run in the environment sbatch exported.

if [ -n "${BONY_IMAGE:-}" ]; then
  [ -f "$BONY_IMAGE" ] || { echo "BONY_IMAGE=$BONY_IMAGE: no such image (build it: apptainer build bony.sif slurm/bony.def)" >&2; exit 2; }
  BONY_EXEC=(apptainer exec --nv --env "PYTHONPATH=$SLURM_SUBMIT_DIR" "$BONY_IMAGE")
else
  BONY_EXEC=()
fi

# bony_step [--ready FILE] COMMAND...: run COMMAND (a job step: srun ...) in the background and wait
# for it, passing USR1 and TERM that reach this batch shell on to it. With --signal=B:USR1@T SLURM
# signals only the batch shell, which bash would die of (its default for USR1) while the tasks never
# hear of it. With --ready, a signal is held until FILE is written after the step started: SLURM may
# warn up to a minute early, even in a job's first seconds, and a launcher still starting up (torchrun
# before it has set its handlers) would die of it. Sets $status to the step's exit status.
bony_step() {
  local ready=""
  if [ "$1" = --ready ]; then ready=$2; shift 2; fi
  local started
  started=$(mktemp)  # its time stamp marks the step's start
  "$@" &
  local pid=$! pending=""
  trap 'pending=USR1' USR1
  trap 'pending=TERM' TERM
  while kill -0 "$pid" 2>/dev/null; do
    if [ -n "$pending" ] && { [ -z "$ready" ] || [ "$ready" -nt "$started" ]; }; then
      echo "$(date '+%F %T') $pending: passing it to the job step"
      kill -"$pending" "$pid" 2>/dev/null || true
      pending=""
    fi
    sleep 1 &
    wait $! 2>/dev/null || true  # returns at once when a signal comes
  done
  status=0
  wait "$pid" || status=$?
  trap - USR1 TERM
  rm -f "$started"
}
