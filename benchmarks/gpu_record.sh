#!/usr/bin/env bash
# The GPU figures on the lossless copy, in one command on a lent H200 (what a session with a GPU
# runs first; benchmarks/README.md, "Running the GPU figures on the lossless copy"):
#
#   bash benchmarks/gpu_record.sh ARCHIVE OUT [tiny]
#
# ARCHIVE is the rebuilt cifar-10-python.tar.gz, OUT a folder for the results files and logs.
# `tiny` runs every step on 2,048 training and 256 test images for one epoch, uncompiled (and
# `main` on the cpu recipe), so that the script is checked on a CPU before device time is spent
# on it. In order, cheapest first, so that a call cut short still brings back the main figure:
#   1. the `fast` recipe, 10 seeds (its compile warm-up timed apart);
#   2. the reference recipe on custom_resnet, 24 epochs, peak LR 0.4, 8 augmentation workers;
#   3. resnet18 at the reference recipe's settings for 60 epochs: a candidate for a named recipe;
#   4. separable_net with its own augmentation for 40 epochs: the same;
#   5. `main` end to end through `mlflow run` (only where mlflow imports: its wheels travel apart).
# Every step writes OUT/<name>.json (or .log) and goes on if one fails; the exit status is the
# number that failed.
set -uo pipefail

archive=${1:?usage: gpu_record.sh ARCHIVE OUT [tiny]}
out=${2:?usage: gpu_record.sh ARCHIVE OUT [tiny]}
tiny=${3:-}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
cd "$here" || exit 1
export PYTHONUNBUFFERED=1

limits=()
fast_seeds=10
if [ "$tiny" = tiny ]; then
  limits=(--train-limit 2048 --test-limit 256 --epochs 1 --compile false)  # compiling on a CPU takes minutes
  fast_seeds=2
elif [ -n "$tiny" ]; then
  echo "error: the third argument is 'tiny' or nothing, got '$tiny'" >&2
  exit 2
fi

failed=0
step() {  # step NAME COMMAND...: run it, its output into OUT/NAME.log, time it
  local name=$1; shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then
    echo "   done in $((SECONDS - start)) s"
  else
    echo "   FAILED (exit $?) after $((SECONDS - start)) s; last lines:"
    tail -5 "$out/$name.log"
    failed=$((failed + 1))
  fi
}

speed() {  # speed NAME ARGS...: benchmarks/train_speed.py on the archive; tiny's limits come last, so they win
  local name=$1; shift
  step "$name" python3 benchmarks/train_speed.py --data "$archive" "$@" "${limits[@]}" --out "$out/$name.json"
}

python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
git rev-parse HEAD 2>/dev/null | sed 's/^/commit /'

speed train-speed-fast-lossless-h200 --recipe fast --seeds "$fast_seeds"
speed train-speed-reference-custom-resnet-lossless-h200 --recipe reference --model custom_resnet --max-lr 0.4 \
  --seeds 1 --augment-workers 8
speed train-speed-resnet18-reference-60ep-lossless-h200 --recipe reference --model resnet18 --max-lr 0.4 \
  --compile true --seeds 1 --augment-workers 8 --epochs 60
speed train-speed-separable-40ep-lossless-h200 --recipe reference --model separable_net --aug separable \
  --max-lr 0.4 --seeds 1 --augment-workers 8 --epochs 40

if python3 -c 'import mlflow' 2>/dev/null; then
  store=$(mktemp -d)
  e2e=(-P source="$archive" -P models=fast_net -P recipe=fast)
  [ "$tiny" = tiny ] && e2e=(-P source="$archive" -P models=fast_net -P recipe=cpu -P train_limit=2048
                             -P test_limit=256 -P val_size=64 -P epochs=1)
  timer=()
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -v)  # its peak memory; the image may lack it
  MLFLOW_TRACKING_URI="sqlite:///$store/mlflow.db" step fast-main-lossless-h200 \
    "${timer[@]}" mlflow run . --env-manager local "${e2e[@]}"
else
  echo "== fast-main-lossless-h200: skipped, mlflow does not import here (carry its wheels)"
fi
echo "failed: $failed"
exit "$failed"
