#!/bin/bash
# `make slurm-check`: the cluster path proven on a running SLURM, on this one machine.
#
# Installs Debian's slurm-wlm and munge if they are missing (needs root: it starts daemons), starts a
# one-node cluster whose files all live in $BONY_SLURM_CHECK (default /tmp/bony-slurm-check), and submits
# what users submit:
#   1. a 2-task tiling array (slurm/tile_array.sbatch) and its assembling job: the manifest must equal
#      that of a local `bony tile` of the same slides;
#   2. a 2-process CPU pretraining (gloo, data workers > 0) under each launcher (srun + torchrun, and
#      srun alone), whose time limit sends the pre-emption warning before it finishes: the job must
#      requeue itself and resume, and log.jsonl must hold every step once, with the losses of an
#      uninterrupted local run of the same recipe;
#   3. a notebook array (slurm/notebook.sbatch, the smoke parameters of configs/report/smoke.yaml) and
#      the report job chained afterok (slurm/report.sbatch): every executed notebook free of errors,
#      and the book's pages.
# It prints each job's state and the stops and resumptions, stops the cluster, and exits non-zero on
# the first check that fails; and
#   5. a 2-arm pretraining sweep as an array (slurm/sweep.sbatch): each task trains its arm into its own folder.
# About 10 minutes on 2 cores; not part of `make test`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${BONY_SLURM_CHECK:-/tmp/bony-slurm-check}
cd "$repo"

say() { echo "== $(date '+%T') $*"; }
fail() { echo "slurm-check FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "it installs and starts SLURM daemons: run it as root, on a machine you can spare"
command -v python >/dev/null && python -c "import bonylib" 2>/dev/null || fail "run it through make (make slurm-check), which provides the environment"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
pgrep -x slurmctld >/dev/null && fail "a slurmctld already runs on this machine; stop it first (this check starts its own)"

# --- a one-node cluster, every file under $work ----------------------------------------------------
rm -rf "$work" && mkdir -p "$work"/{state,spool,logs,jobs}
host=$(hostname -s)
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
cat > "$work/slurm.conf" <<EOF
ClusterName=bonycheck
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/logs/slurmctld.log
SlurmdLogFile=$work/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=check Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$work/slurm.conf

started_munge=0
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- munged --force
  started_munge=1
fi
stop_cluster() {
  for daemon in slurmd slurmctld; do
    [ -f "$work/$daemon.pid" ] && kill "$(cat "$work/$daemon.pid")" 2>/dev/null || true
  done
  [ "$started_munge" = 1 ] && pkill -x munged || true
}
trap stop_cluster EXIT
slurmctld
slurmd
for _ in $(seq 60); do
  sinfo -h -o %t 2>/dev/null | grep -qx idle && break
  sleep 1
done
sinfo -h -o %t | grep -qx idle || fail "the node did not come up (see $work/logs)"
say "SLURM $(sinfo -V | cut -d' ' -f2) up: node $host, $cpus CPUs"

# every job's output goes to $work/logs; `state ID` is its state as the controller keeps it
submit() { sbatch --parsable --chdir="$repo" "$@"; }
state() { scontrol show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 | sort -u | paste -sd, -; }
wait_for() {  # wait_for ID... : until none of them is pending, running or requeued
  local deadline=$(( SECONDS + 1200 ))
  while squeue -h -j "$(IFS=,; echo "$*")" -o %i 2>/dev/null | grep -q .; do
    [ $SECONDS -lt $deadline ] || fail "jobs $* still in the queue after 20 minutes"
    sleep 3
  done
}

# --- data, and the references computed here without SLURM ---------------------------------------------
say "synthetic smoke data; local references (tiling, an uninterrupted 2-process pretraining)"
python -m bonylib synth all "$work/data" --config configs/synth/smoke.yaml >/dev/null 2>&1
python -m bonylib tile "$work/data/panda" --format panda --out "$work/tiles-local" >"$work/logs/tile-local.log" 2>&1
recipe=(configs/pretrain/smoke.yaml "data.manifest=$work/tiles-local/manifest.parquet" data.workers=1 optim.epochs=80 checkpoint_every=20)
torchrun --standalone --nproc-per-node=2 -m bonylib pretrain --out "$work/pretrain-local" --config "${recipe[@]}" \
  >"$work/logs/pretrain-local.log" 2>&1 || fail "the local reference pretraining failed (see $work/logs/pretrain-local.log)"

# --- 1. tiling array and its assembling job ---------------------------------------------------------
say "1. tiling: 2-task array, then the assembling job"
tile_array=$(submit --array=0-1 --cpus-per-task=1 --mem=2G --output="$work/logs/tile-%A_%a.out" \
  slurm/tile_array.sbatch "$work/data/panda" "$work/tiles-slurm" panda)
assemble=$(submit --dependency=afterany:"$tile_array" --cpus-per-task=1 --mem=2G --output="$work/logs/assemble-%j.out" \
  --wrap "python -m bonylib tile $work/data/panda --format panda --out $work/tiles-slurm")

# --- 2. pre-empted pretraining under both launchers ----------------------------------------------------
# --time=3 with the warning 60 s before it: SLURM warns in the last 60-120 s of each attempt (up to a
# minute early, looking every 30 s), before the run's 2-3 minutes of steps are done, so each job is
# stopped, requeued and resumed at least once. A third job crashes (its manifest does not exist): it
# must fail, not requeue.
say "2. pretraining: 2 processes, time limit 3 min, USR1 60 s before it; torchrun and srun launchers"
common=(--nodes=1 --gpus-per-node=0 --mem=6G --time=3 --signal=B:USR1@60)
pretrain_torchrun=$(BONY_LAUNCHER=torchrun BONY_PROCS_PER_NODE=2 submit "${common[@]}" --ntasks-per-node=1 --cpus-per-task=2 \
  --output="$work/logs/pretrain-torchrun-%j.out" slurm/pretrain.sbatch "${recipe[0]}" "$work/pretrain-torchrun" "${recipe[@]:1}")
pretrain_srun=$(BONY_LAUNCHER=srun submit "${common[@]}" --ntasks-per-node=2 --cpus-per-task=1 \
  --output="$work/logs/pretrain-srun-%j.out" slurm/pretrain.sbatch "${recipe[0]}" "$work/pretrain-srun" "${recipe[@]:1}")
pretrain_crash=$(BONY_LAUNCHER=srun submit --nodes=1 --ntasks=1 --gpus-per-node=0 --cpus-per-task=1 --mem=2G --time=3 \
  --output="$work/logs/pretrain-crash-%j.out" slurm/pretrain.sbatch configs/pretrain/smoke.yaml "$work/pretrain-crash" \
  "data.manifest=$work/no-such-manifest.parquet")

# --- 4. embedding array and its assembling job --------------------------------------------------------
say "4. embeddings: 2-task array (no GPU here: --gres=none), then the assembling run"
embed=("$work/tiles-local/manifest.parquet" --encoder random:xcit_nano_12_p16_224:0 device=cpu precision=fp32 chunk_rows=16)
python -m bonylib embed "${embed[@]}" --out "$work/embed-local" >"$work/logs/embed-local.log" 2>&1
embed_array=$(submit --array=0-1 --gres=none --cpus-per-task=1 --mem=3G --output="$work/logs/embed-%A_%a.out" \
  slurm/embed_array.sbatch "${embed[0]}" "$work/embed-slurm" "${embed[2]}" "${embed[@]:3}")
embed_assemble=$(submit --dependency=afterany:"$embed_array" --cpus-per-task=1 --mem=3G --output="$work/logs/embed-assemble-%j.out" \
  --wrap "python -m bonylib embed ${embed[*]} --out $work/embed-slurm")

# --- 5. a pretraining sweep as an array: one task per arm ---------------------------------------------
say "5. sweep: a 2-arm sweep (out_dim) as an array, each task a pretraining job"
cat > "$work/sweep.yaml" <<EOF
base: $repo/configs/pretrain/smoke.yaml
arms:
  out_dim_32: [model.out_dim=32]
  out_dim_64: [model.out_dim=64]
EOF
sweep_array=$(BONY_LAUNCHER=srun submit --array=0-1 --nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --gpus-per-node=0 \
  --mem=3G --time=10 --output="$work/logs/sweep-%A_%a.out" slurm/sweep.sbatch "$work/sweep.yaml" "$work/sweep" \
  "data.manifest=$work/tiles-local/manifest.parquet" data.workers=0 optim.epochs=2)

# --- 3. notebook array and the chained report job ------------------------------------------------------
# in a copy of the book's files, so that the check leaves this checkout's executed notebooks and book alone
say "3. notebooks: an array over the smoke parameters, one task at a time, then the book (afterok)"
book="$work/book-root" && mkdir -p "$book"
cp -r _config.yml _toc.yml book notebooks slurm configs "$book"/ && rm -rf "$book/book/executed" "$book/notebooks/.ipynb_checkpoints"
[ -f "$book/book/_static/mathjax/tex-chtml.js" ] || fail "MathJax is not vendored in book/_static (make slurm-check does it)"
run="$work/report-run" && mkdir -p "$run" "$work/params"
ln -s "$work/data" "$run/data"
python - "$work/params" <<'EOF' >"$work/notebooks.txt"
import sys
from pathlib import Path

import yaml

from bonylib.config import load_config
from bonylib.report import ReportConfig

cfg = load_config(ReportConfig, Path("configs/report/smoke.yaml"))
for stem in cfg.notebooks:
    params = Path(sys.argv[1]) / f"{stem}.yaml"
    params.write_text(yaml.safe_dump(cfg.parameters.get(stem, {})))
    print(stem, params)
EOF
notebooks=$(wc -l < "$work/notebooks.txt")
notebook_array=$(submit --chdir="$book" --array=0-$((notebooks - 1))%1 --cpus-per-task=2 --mem=6G --output="$work/logs/notebook-%A_%a.out" \
  slurm/notebook.sbatch "$run" "$work/notebooks.txt")
report=$(submit --chdir="$book" --dependency=afterok:"$notebook_array" --output="$work/logs/report-%j.out" slurm/report.sbatch "$run")

jobs=("$tile_array" "$assemble" "$pretrain_torchrun" "$pretrain_srun" "$pretrain_crash" "$embed_array" "$embed_assemble"
      "$sweep_array" "$notebook_array" "$report")
wait_for "${jobs[@]}"
say "jobs:"
for job in "${jobs[@]}"; do
  printf '   %-8s %-24s %s\n' "$job" "$(scontrol show job "$job" | grep -o 'JobName=[^ ]*' | head -1 | cut -d= -f2)" "$(state "$job")"
done

# --- the checks ---------------------------------------------------------------------------------------
[ "$(state "$tile_array")" = COMPLETED ] && [ "$(state "$assemble")" = COMPLETED ] || fail "tiling jobs (see $work/logs/tile-*)"
python - "$work/tiles-local/manifest.parquet" "$work/tiles-slurm/manifest.parquet" "$work" <<'EOF'
import sys

import pandas as pd

local, slurm = (pd.read_parquet(p) for p in sys.argv[1:3])
key = ["slide_id", "x", "y"]
local, slurm = (m.drop(columns="path").sort_values(key).reset_index(drop=True) for m in (local, slurm))
pd.testing.assert_frame_equal(local, slurm)
print(f"   tiling: the array's manifest equals the local one ({len(slurm)} tiles, {slurm.slide_id.nunique()} slides)")
EOF

for launcher in torchrun srun; do
  job=$([ $launcher = torchrun ] && echo "$pretrain_torchrun" || echo "$pretrain_srun")
  [ "$(state "$job")" = COMPLETED ] || fail "pretraining ($launcher) ended $(state "$job") (see $work/logs/pretrain-$launcher-$job.out)"
  restarts=$(scontrol show job "$job" | grep -o 'Restarts=[0-9]*' | cut -d= -f2)
  [ "$restarts" -ge 1 ] || fail "pretraining ($launcher) was never requeued: it finished before the warning"
  grep -E 'USR1: passing it|stopped: |requeueing|restart [0-9]' "$work/logs/pretrain-$launcher-$job.out" | sed 's/^/   /'
  python - "$work/pretrain-local/log.jsonl" "$work/pretrain-$launcher/log.jsonl" "$launcher" "$restarts" <<'EOF'
import json
import sys

def steps(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if '"step"' in line and '"loss"' in line]

local, slurm = steps(sys.argv[1]), steps(sys.argv[2])
numbers = [row["step"] for row in slurm]
assert numbers == sorted(set(numbers)) == [row["step"] for row in local], "every step exactly once, in order"
worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(local, slurm))
assert worst <= 1e-5, f"losses differ from the uninterrupted run by up to {worst:.2e}"
print(f"   pretraining ({sys.argv[3]}): {len(numbers)} steps, each once, requeued {sys.argv[4]}x; "
      f"losses equal the uninterrupted run's (largest difference {worst:.1e})")
EOF
done

[ "$(state "$pretrain_crash")" = FAILED ] || fail "the crashing pretraining ended $(state "$pretrain_crash"), not FAILED"
[ "$(scontrol show job "$pretrain_crash" | grep -o 'Restarts=[0-9]*')" = Restarts=0 ] || fail "the crashing pretraining was requeued"
echo "   pretraining (crash): FAILED, not requeued: $(grep -m1 'error' "$work/logs/pretrain-crash-$pretrain_crash.out")"

[ "$(state "$embed_array")" = COMPLETED ] && [ "$(state "$embed_assemble")" = COMPLETED ] || fail "embedding jobs (see $work/logs/embed-*)"
python - "$work/embed-local" "$work/embed-slurm" "${embed[0]}" <<'EOF'
import sys
from pathlib import Path

import numpy as np

from bonylib.evaluation.embeddings import load_embeddings

(local,), (slurm,) = (list(Path(folder).iterdir()) for folder in sys.argv[1:3])
assert local.name == slurm.name, "the same encoder fingerprint"
(ids_local, local_rows), (ids_slurm, slurm_rows) = (load_embeddings(store, Path(sys.argv[3])) for store in (local, slurm))
assert (ids_local == ids_slurm).all(), "the same tiles in the same order"
# equal up to float32 rounding: a task of one CPU runs torch on one thread, the local run on all of them, and a
# matmul's sums are ordered by its threads
worst = float(np.abs(local_rows - slurm_rows).max())
assert worst <= 1e-5, f"embeddings differ by up to {worst:.1e}"
print(f"   embeddings: the array's store equals the local one ({local_rows.shape[0]} tiles x {local_rows.shape[1]}, "
      f"largest difference {worst:.1e}: float32 rounding of other thread counts)")
EOF

[ "$(state "$sweep_array")" = COMPLETED ] || fail "sweep array (see $work/logs/sweep-*)"
python - "$work/sweep" <<'EOF'
import sys
from pathlib import Path

import yaml

for arm, out_dim in (("out_dim_32", 32), ("out_dim_64", 64)):
    run = Path(sys.argv[1], arm)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["out_dim"] == out_dim and config["data"]["workers"] == 0, f"{arm}: {config['model']}"
    steps = [line for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps and list(run.glob("checkpoint*")), f"{arm}: no steps or no checkpoint"
    print(f"   sweep arm {arm}: its own run folder, model.out_dim={out_dim}, {len(steps)} logged steps, a checkpoint")
EOF

[ "$(state "$notebook_array")" = COMPLETED ] && [ "$(state "$report")" = COMPLETED ] || fail "notebook or report job (see $work/logs/notebook-* and report-*)"
python - "$work/notebooks.txt" "$book" <<'EOF'
import sys
from pathlib import Path

import nbformat

for line in open(sys.argv[1]):
    stem = line.split()[0]
    executed = nbformat.read(Path(sys.argv[2], "book/executed", f"{stem}.ipynb"), as_version=4)
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors and not executed.metadata.papermill.get("exception"), f"{stem} raised"
    assert Path(sys.argv[2], f"_build/html/book/executed/{stem}.html").is_file(), f"{stem}: no page in the book"
    print(f"   notebook {stem}: executed by the array ({executed.metadata.papermill.parameters}), page in the book")
EOF
say "slurm-check passed; logs in $work/logs"
