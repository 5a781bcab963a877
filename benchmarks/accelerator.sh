#!/usr/bin/env bash
# The first hour on a GPU or TPU machine, in one command, all under one output folder:
#   1. install the jax that matches the accelerator and this package (with its test extra);
#   2. run the quick tests (the ops);
#   3. time the training step of every paper config (ms/iteration, pairs/s), in
#      float32 and with bfloat16 compute (model.dtype), and analyse its device
#      memory (benchmarks/memory.py);
#   4. train configs/tetrominoes.py for --minutes (a checkpoint is written when
#      the time is up) and write its learning curve.
#
#   benchmarks/accelerator.sh --output=acc_run [--minutes=60]   # on the accelerator machine
#   benchmarks/accelerator.sh --dry_run --output=/tmp/acc       # the same steps on :test configs, CPU
#
# --dry_run installs nothing (it uses the current environment), runs every step
# on the :test configs (Tetrominoes for the timings, two for memory) with a few
# iterations and trains for --dry_run_seconds:
# a check that the script works, in a few minutes on a CPU. Each step's output
# goes to <output>/<step>.log and its figures to <output>/*.json / *.txt;
# <output>/SUMMARY.md collects them. Run it from the repository root.
set -euo pipefail

output=""
minutes=60
dry_run=false
dry_run_seconds=20
for arg in "$@"; do
  case "$arg" in
    --output=*) output="${arg#--output=}" ;;
    --minutes=*) minutes="${arg#--minutes=}" ;;
    --dry_run) dry_run=true ;;
    --dry_run_seconds=*) dry_run_seconds="${arg#--dry_run_seconds=}" ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "accelerator.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -z "$output" ]]; then
  echo "accelerator.sh: --output=DIR is required" >&2
  exit 2
fi
if ! [[ "$minutes" =~ ^[0-9]+$ && "$dry_run_seconds" =~ ^[0-9]+$ ]]; then
  echo "accelerator.sh: --minutes and --dry_run_seconds take whole numbers" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$output"
output="$(cd "$output" && pwd)"
summary="$output/SUMMARY.md"
echo "# tusk_jax on $(hostname), $(date -u '+%Y-%m-%d %H:%M UTC')" > "$summary"

step() {  # step NAME COMMAND...: runs it, its output to NAME.log, a line in the summary.
  local name=$1
  shift
  local start=$SECONDS
  echo "== $name: $*" >&2
  if "$@" > "$output/$name.log" 2>&1; then
    echo "- $name: ok in $((SECONDS - start)) s (\`$*\`)" >> "$summary"
  else
    local status=$?
    echo "- $name: FAILED (exit $status) in $((SECONDS - start)) s (\`$*\`); see $name.log" >> "$summary"
    tail -20 "$output/$name.log" >&2
    return "$status"
  fi
}

# 1. Install.
if $dry_run; then
  variant=":test"
  echo "- install: skipped (--dry_run uses the current environment)" >> "$summary"
else
  variant=""
  if command -v nvidia-smi > /dev/null; then
    jax_extra="cuda12"
  elif [[ -e /dev/accel0 || -e /dev/vfio/0 || -n "${TPU_NAME:-}" ]]; then
    jax_extra="tpu"
  else
    echo "accelerator.sh: no GPU (nvidia-smi) or TPU (/dev/accel0) found; use --dry_run on a CPU" >&2
    exit 2
  fi
  step install python3 -m pip install -q -U "jax[$jax_extra]" -e ".[test]"
fi
python3 -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())" \
  > "$output/devices.txt"
echo "- devices: $(cat "$output/devices.txt")" >> "$summary"

# 2. Quick tests.
step quick_tests python3 -m pytest -q -x tests/test_ops_keypoints.py tests/test_ops_sampling.py

# 3. Step time and memory of every paper config.
iterations=10
configs=(mnist_hard tetrominoes clevr6 celeba h36m)
if $dry_run; then
  iterations=2
  configs=(tetrominoes)  # One checks the path; the rest differ in data and sizes only.
fi
for config in "${configs[@]}"; do
  extra=()
  if [[ $config == celeba && -z "$variant" ]]; then
    # Timing does not depend on the weights' values: random VGG16 weights of the right shapes.
    python3 -c "
import jax, sys; sys.path.insert(0, '.')
from tusk_jax import perceptual
perceptual.save_vgg16_params('$output/vgg16_random.npz', perceptual.init_vgg16_params(jax.random.PRNGKey(0)))"
    extra=(--config.loss.vgg16_weights="$output/vgg16_random.npz")
  fi
  step "step_time_$config" python3 benchmarks/train_step.py \
    --config="configs/$config.py$variant" --iterations="$iterations" "${extra[@]}"
  grep -h "ms/iteration" "$output/step_time_$config.log" | sed 's/^/float32: /' \
    >> "$output/step_times.txt"
  step "step_time_${config}_bfloat16" python3 benchmarks/train_step.py \
    --config="configs/$config.py$variant" --iterations="$iterations" "${extra[@]}" \
    --config.model.dtype=bfloat16
  grep -h "ms/iteration" "$output/step_time_${config}_bfloat16.log" | sed 's/^/bfloat16: /' \
    >> "$output/step_times.txt"
done
memory_args=(--json_out="$output/memory.json")
$dry_run && memory_args+=(--variant=test --configs=tetrominoes,mnist_hard)
step memory python3 benchmarks/memory.py "${memory_args[@]}"
{
  echo
  echo "## Training step"
  echo
  cat "$output/step_times.txt"
  echo
  echo "## Device memory"
  echo
  grep "^|" "$output/memory.log"
} >> "$summary"

# 4. Train Tetrominoes for the given time (SIGTERM: a checkpoint, exit 0), then its learning curve.
seconds=$((minutes * 60))
$dry_run && seconds=$dry_run_seconds
workdir="$output/tetrominoes"
train_status=0
timeout -s TERM "$seconds" python3 -m tusk_jax.main --config="configs/tetrominoes.py$variant" \
  --workdir="$workdir" > "$output/train.log" 2>&1 || train_status=$?
# 124: the time was up (the run checkpointed on SIGTERM); 0: it finished first.
if [[ $train_status -ne 0 && $train_status -ne 124 ]]; then
  echo "- train: FAILED (exit $train_status); see train.log" >> "$summary"
  tail -20 "$output/train.log" >&2
  exit "$train_status"
fi
echo "- train: ${seconds} s of configs/tetrominoes.py$variant in $workdir" >> "$summary"
curve_examples=500
$dry_run && curve_examples=16
step learning_curve python3 -m tusk_jax.learning_curve --workdir="$workdir" \
  --num_examples="$curve_examples" --batch_size=16
echo "- learning curve: $workdir/learning_curve.json, $workdir/learning_curve.png" >> "$summary"
echo "done: $summary" >&2
