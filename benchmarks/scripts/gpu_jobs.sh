#!/usr/bin/env bash
# Run `busi-monai` training jobs on one GPU machine, then evaluate each on the pack's
# full-size test split, and gather the results into $OUT (results.json, logs.tgz).
#
#   [JOBS=1] benchmarks/scripts/gpu_jobs.sh JOBS_FILE TRAIN_LIMIT_S
#
# JOBS: trainings at once. Keep 1 on a GPU: 15 at once on an H100 time-shared the GPU and ran
# each ~15x slower (benchmarks/h100_partial_ablation.json).
#
# JOBS_FILE: one job a line, "NAME busi-monai-subcommand args..." (train or cv; the job's
# --out is added as runs/NAME). The machine has PyTorch but not MONAI: the wheels in .whl/
# are installed first. Nothing here is specific to a GPU except the side-by-side scheduling.
set -u
jobs_file=$1
limit=${2:-420}
OUT=${OUT:-/tmp/gpu-out}
R=${RUNS:-/tmp/runs}
mkdir -p "$OUT" "$R"
PY=${PY:-python3}
$PY -c "import monai" 2>/dev/null || $PY -m pip install -q --no-deps .whl/monai-*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4}
cli="$PY -m busi_monai.cli"
nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv -l 5 > "$R/smi.csv" 2>/dev/null &
smi=$!
t0=$(date +%s)
while read -r name cmd args; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  while [ "$(jobs -rp | grep -cv "^$smi$")" -ge "${JOBS:-1}" ]; do sleep 1; done
  ( start=$(date +%s)
    timeout "$limit" $cli $cmd $args --out "$R/$name" > "$R/$name.log" 2>&1
    echo "$name rc=$? s=$(( $(date +%s) - start ))" >> "$R/done.txt" ) &
done < "$jobs_file"
wait $(jobs -p | grep -v "^$smi$") 2>/dev/null
echo "training done after $(( $(date +%s) - t0 )) s"; cat "$R/done.txt"
# Evaluate every finished model (a run's model.pt, or a cv folder as its ensemble) side by side.
for d in "$R"/*/; do
  name=$(basename "$d")
  if [ -f "$d/model.pt" ] || ls "$d"/fold*/model.pt > /dev/null 2>&1; then
    $cli evaluate --model "$d" --data .gpu/busi256.npz --out "$R/$name.metrics.json" > "$R/$name.eval.log" 2>&1 &
  fi
done
wait $(jobs -p | grep -v "^$smi$") 2>/dev/null
kill $smi 2>/dev/null
echo "all done after $(( $(date +%s) - t0 )) s"
$PY benchmarks/scripts/gather.py "$R" "$OUT/results.json"
tar czf "$OUT/logs.tgz" -C "$R" --exclude='*.pt' --exclude='tensorboard' .
