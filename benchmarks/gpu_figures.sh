#!/bin/bash
# shellcheck disable=SC2317  # The parts' functions are called by name.
# The performance figures that need a GPU, in one command (one lease):
#   1. ResNet-50, bf16, 224 px, B=256: ours (the GPUs' batch norm, its
#      gradient written out with the ReLU inside; the stem's 7x7/2 conv as
#      it is and over 2x2 pixel blocks, model.stem_space_to_depth) against
#      the Flax-ImageNet-style reference (CROSS=1 adds each step with
#      the other's model): examples/s, MFU, each step's device time per
#      kind of operation (profiler trace) and its optimised HLO. (The
#      ReLU after the norm and autodiff's gradient: --bn_relu=separate,
#      --bn_gradient=autodiff; timed in the fourth session.)
#   2. The trainer's ResNet-50 step with each uint8 batch copied from the
#      host, its metrics read before the next step (steps_in_flight=1) or
#      one step later (2), alternately; and part 1's comparison with both
#      steps waited for one step later (reference_in_flight).
#   3. The largest per-device batch of that step that fits: the largest
#      size that max_device_batch.py --gpu, compiling for an H100 on a CPU
#      at this memory fraction, says fits (2,816: 67.47 GiB by XLA's
#      estimate with the ReLU inside the norm's gradient, the GPUs'
#      default; 70.55 without) and the first it says does not (2,944: 71.61
#      and 80.44 GiB), each tried (1,024 and 2,048 ran on an H200 within
#      0.5% of XLA's estimates compiled here with room for every
#      activation, without the ReLU inside: 39.25 and 79.06).
#      MEM_FRACTION (default 0.9) sets XLA_PYTHON_CLIENT_MEM_FRACTION:
#      0.51 leaves an H200 an H100's 71.3 GiB for arrays. MAX_SIZES (default
#      2816,2944) picks the sizes. Compiling 2,816 on an H100 took over
#      290 s (fifth session; cuDNN's autotuning, probably, most of it): the
#      part has a call to itself.
#   4. Stage switches and second-launch compile time of the smoke config.
#   5. An ImageNet batch put as float32 normalised on the host against uint8
#      normalised on the device.
#   6. The input pipeline on that machine's cores (8 and 16 threads, then 8
#      and 16 worker processes): the ImageNet-style decode and crop per core
#      and whether one process's threads reach the step's rate (GIL).
#   7. The GPU's own description as XLA reads it (target_config.txtpb), and
#      benchmarks/gpu_program.py's kernel counts compiled for it, against
#      part 1's profile (and to set beside gpu_specs/h100_sxm.txtpb); part
#      3's sizes compiled for it (max_device_batch.py --gpu), to set beside
#      part 3's estimates on the device.
# Each part has its own time limit and writes its output to $OUT (default
# ./gpu_figures), so a slow or failing part leaves the others' figures.
# Parts run in the order PARTS names them. BUDGET_S (seconds) is the time the
# whole command may take: a part whose limit no longer fits in what is left
# is skipped with a line saying so, and the next one is tried, so a lease
# shorter than all the parts still gets the first ones whole.
#
#   bash benchmarks/gpu_figures.sh      # from the repository root
#   PARTS="reference_step max_device_batch" bash benchmarks/gpu_figures.sh
#   PARTS=max_device_batch bash benchmarks/gpu_figures.sh   # one 600-s call
#   BUDGET_S=560 PARTS="reference_in_flight input_pipeline \
#       reference_step" bash benchmarks/gpu_figures.sh  # another
#
# Python packages the GPU image lacks (ml-collections, tensorboardX; and for
# input_pipeline's JPEG cases TFDS and what it needs beyond the image: 10 MB
# in all; the image has OpenCV) are installed from wheels in .whl/ when that
# folder exists; made beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl ml-collections tensorboardX tensorflow-datasets==4.9.10 \
#       array-record==0.8.6 dm-tree immutabledict simple-parsing \
#       tensorflow-metadata termcolor toml docstring-parser \
#       googleapis-common-protos importlib-resources
#   pip wheel --no-deps -w .whl promise     # no wheel on PyPI
# Without TFDS, input_pipeline skips its JPEG cases with a line saying so.
set -u
cd "$(dirname "$0")/.." || exit 1

# Each part's time limit in seconds, in the default order.
declare -A LIMIT=(
  [reference_step]=300 [in_flight]=240 [reference_in_flight]=200
  [max_device_batch]=560 [stage_switch]=100 [batch_transfer]=60
  [input_pipeline]=180 [gpu_program]=530)
PARTS=${PARTS:-reference_step in_flight reference_in_flight max_device_batch stage_switch batch_transfer input_pipeline gpu_program}
BUDGET_S=${BUDGET_S:-}
for name in $PARTS; do
  if [[ -z ${LIMIT[$name]+set} ]]; then
    echo "gpu_figures.sh: unknown part '$name'; known:" \
         "${!LIMIT[*]}" >&2
    exit 2
  fi
done
if [[ -n $BUDGET_S && ! $BUDGET_S =~ ^[0-9]+$ ]]; then
  echo "gpu_figures.sh: BUDGET_S='$BUDGET_S' is not a whole number of" \
       "seconds" >&2
  exit 2
fi

OUT=${OUT:-gpu_figures}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi

{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm \
      --format=csv 2>&1
  "$PY" -c 'import jax, flax, optax, orbax.checkpoint as o, numpy
print("jax", jax.__version__, "flax", flax.__version__, "optax",
      optax.__version__, "numpy", numpy.__version__, jax.devices())' 2>&1
} | tee "$OUT/versions.txt"

reference_step() {
  local cross=()
  [[ -n ${CROSS:-} ]] && cross=(--cross)
  # The two steps' optimised HLO come back with the figures (hlo.tgz).
  local dump="--xla_dump_to=/tmp/hlo --xla_dump_hlo_as_text"
  XLA_FLAGS="$dump --xla_dump_hlo_module_re=jit_(single|step)" \
  timeout "${LIMIT[reference_step]}" "$PY" benchmarks/reference_step.py \
      --models=resnet50 \
      --image_size=224 --batch_size=256 --ghost_batch_size=32 \
      --dtype=bfloat16 --peak_size=8192 --bn_gradient=explicit \
      --bn_relu=fused --stem=conv,space_to_depth "${cross[@]}" \
      --steps=10 --rounds=2 --profile_steps=3 \
      --ops_json="$OUT/reference_step_ops.json" 2>&1 \
      | tee "$OUT/reference_step.txt"
  (cd /tmp/hlo && tar czf - ./*after_optimizations.txt) > "$OUT/hlo.tgz"
}

in_flight() {
  timeout "${LIMIT[in_flight]}" "$PY" benchmarks/train_step.py \
      --config=configs/imagenet_resnet50.py \
      --devices=1 --batch_sizes=256 --accumulation=host --in_flight=1,2,1,2 \
      --steps=20 2>&1 | tee "$OUT/in_flight.txt"
}

reference_in_flight() {
  timeout "${LIMIT[reference_in_flight]}" "$PY" benchmarks/reference_step.py \
      --models=resnet50 \
      --image_size=224 --batch_size=256 --ghost_batch_size=32 \
      --dtype=bfloat16 --peak_size=8192 --bn_relu=fused \
      --stem=conv,space_to_depth --in_flight=2 --steps=20 --rounds=2 \
      2>&1 | tee "$OUT/reference_in_flight.txt"
}

max_device_batch() {
  XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.9} \
  timeout "${LIMIT[max_device_batch]}" \
      "$PY" benchmarks/max_device_batch.py --sizes="${MAX_SIZES:-2816,2944}" \
      --predict=false --time_limit=500 2>&1 | grep -v cuda_timer \
      | tee "$OUT/max_device_batch.txt"
}

stage_switch() {
  timeout "${LIMIT[stage_switch]}" "$PY" benchmarks/stage_switch.py \
      --accumulation=host \
      --program_cache=true --set dataset.source=synthetic 2>&1 \
      | tee "$OUT/stage_switch.txt"
}

batch_transfer() {
  timeout "${LIMIT[batch_transfer]}" "$PY" benchmarks/batch_transfer.py \
      --repeats=20 2>&1 | tee "$OUT/batch_transfer.txt"
}

input_pipeline() {
  timeout "${LIMIT[input_pipeline]}" "$PY" -m benchmarks.input_pipeline \
      --seconds=4 --workers=8,16 --processes=8,16 \
      --step_batch_sizes= 2>&1 | tee "$OUT/input_pipeline.txt"
}

gpu_program() {  # 30 + 300 + 200 s: LIMIT[gpu_program].
  timeout 30 "$PY" -c 'import sys, jax
from jax._src.lib import xla_client as xc
config = xc.get_topology_for_devices(jax.devices()).target_config
sys.stdout.buffer.write(config if isinstance(config, bytes) else config.encode())' \
      > "$OUT/target_config.txtpb" || return
  local profile=()  # Part 1's profile, when it ran: the same trainers.
  [[ -f $OUT/reference_step_ops.json ]] &&
    profile=(--profile="$OUT/reference_step_ops.json")
  # Compile-only, as on the CPU (no GPU runtime in these processes).
  JAX_PLATFORMS=cpu timeout 300 "$PY" benchmarks/gpu_program.py \
      --gpu="$OUT/target_config.txtpb" \
      --bn_gradient=explicit --bn_relu=fused --stem=conv,space_to_depth \
      "${profile[@]}" \
      --json="$OUT/gpu_program.json" 2>&1 \
      | grep -v "^[WI][0-9]" | tee "$OUT/gpu_program.txt"
  # Part 3's sizes compiled for this GPU's own description: XLA's estimates
  # without the device against part 3's on it (cuDNN's autotuned
  # workspaces are the suspected difference below the memory limit).
  JAX_PLATFORMS=cpu XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 timeout 200 "$PY" \
      benchmarks/max_device_batch.py --gpu="$OUT/target_config.txtpb" \
      --sizes=1024,2048,2816,2944 2>&1 | grep -v "^[WI][0-9]" \
      | tee "$OUT/max_device_batch_compiled.txt"
}

for name in $PARTS; do
  left=$(( ${BUDGET_S:-999999} - SECONDS ))
  if (( LIMIT[$name] > left )); then
    echo "== $name: skipped (its limit is ${LIMIT[$name]} s, ${left} s of" \
         "BUDGET_S left)"
    continue
  fi
  echo "== $name (${SECONDS} s in)"
  "$name"
done
echo "== done (${SECONDS} s)"
exit 0  # A skipped or failed part leaves the others' figures.
