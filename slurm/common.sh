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

# bony_shard: sets $shard to this array task's "i/n" (i = its position in the array, n = the array's task count) for
# `--shard`. Array ids may start anywhere and step evenly (--array=0-31, --array=4-10:2, --array=1,5,9); ids that are
# not evenly spaced (--array=1,2,9) have no such position that every task can work out alone: refused, as is a job
# that is not an array and a task id outside the array's range. Ids are read in base 10 (bash would read 08 as octal).
bony_shard() {
  local id=${SLURM_ARRAY_TASK_ID:-} min=${SLURM_ARRAY_TASK_MIN:-} max=${SLURM_ARRAY_TASK_MAX:-}
  local count=${SLURM_ARRAY_TASK_COUNT:-} step=${SLURM_ARRAY_TASK_STEP:-}
  local value
  for value in "$id" "$min" "$max" "$count"; do
    [[ $value =~ ^[0-9]{1,9}$ ]] || { echo "not an array job: submit with sbatch --array=0-N (SLURM_ARRAY_TASK_ID, _MIN, _MAX and _COUNT must be set to task ids)" >&2; exit 2; }
  done
  id=$((10#$id)) min=$((10#$min)) max=$((10#$max)) count=$((10#$count))
  if [[ $step =~ ^[0-9]{1,9}$ ]]; then step=$((10#$step)); else step=0; fi
  if [ "$count" -lt 1 ] || [ "$min" -gt "$max" ] || [ "$id" -lt "$min" ] || [ "$id" -gt "$max" ]; then
    echo "array task $id is not one of its array's ids $min..$max ($count tasks): not an array SLURM set up; submit with" \
         "sbatch --array=0-N" >&2
    exit 2
  fi
  if [ "$count" -eq 1 ]; then
    step=1
  elif [ "$step" -lt 1 ] || [ "$max" -ne $(( min + step * (count - 1) )) ]; then
    # SLURM leaves STEP at 1 for a list: evenly spaced ids still have a step
    step=$(( (max - min) / (count - 1) ))
  fi
  if [ "$step" -lt 1 ] || [ "$max" -ne $(( min + step * (count - 1) )) ] || [ $(( (id - min) % step )) -ne 0 ]; then
    echo "array ids $min..$max ($count tasks) are not evenly spaced, so task $id cannot tell its shard: submit" \
         "--array=0-$(( count - 1 )) (or A-B:S), one task per shard" >&2
    exit 2
  fi
  shard="$(( (id - min) / step ))/$count"
}
