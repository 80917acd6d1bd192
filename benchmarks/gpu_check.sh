#!/usr/bin/env bash
# The GPU check: one script for one lent single-GPU machine (torch + CUDA, no network), under 9 minutes.
#
#   make gpu-wheels && bash benchmarks/gpu_check.sh gpu-wheels <output folder>                 # on the GPU
#     (the device tool copies only tracked and unignored files: give it carry=["gpu-wheels"])
#   bash benchmarks/gpu_check.sh gpu-wheels /tmp/gpu-rehearsal --cpu-rehearsal                # here
#
# It installs what the GPU image lacks from the wheel folder (--no-index, into a --target folder on
# PYTHONPATH: titan runs from this checkout, not installed), then runs each part in its own process
# with its own timeout, leaving its log (and JSON) in the output folder as it finishes:
#   1-pytest-cuda     pytest -m cuda
#   2-*               throughput rows, 10 warm-up + 30 timed steps: 3.6 B bf16 compile, 3.6 B Float8
#                     tensorwise, 1 B bf16 compile (benchmarks/train_throughput.py)
#   3-float8-vs-bf16  50 steps of Float8 tensorwise and bf16 on the 1 B shape, the loss gap (eager, AC)
#   then, each when the time left allows it (else a line in the report), most valuable first:
#   5-flex-vs-sdpa    FlexAttention's BlockMask against SDPA's boolean mask, forward and backward, bf16
#                     and fp32: differences, errors against float64, times (benchmarks/flex_vs_sdpa_mask.py)
#   6-estimate        the dry run's memory estimate against 3 real eager steps of the 1 B and 3.6 B
#                     shapes: MemTracker and torch.cuda.max_memory_allocated (benchmarks/estimate_accuracy.py)
#   7-profile-window  a profiled 1 B run: CUDA kernels in the trace, a memory snapshot (benchmarks/profile_check.py)
#   8-profile-oom     a 1 B run with a batch no GPU holds: torch.OutOfMemoryError and its snapshot
#   2-3b-float8-rowwise
#   9-report          report.md from all of the above (benchmarks/gpu_report.py)
# PARTS="5-* 6-*" runs only the parts whose names match one of those patterns (the others are skipped
# with a line; the report always runs): a second, short call for what the first one had no time for.
# --cpu-rehearsal runs every part on CPU with tiny shapes and aot_eager, in a fresh venv
# holding torch and only what the GPU image has (../shared/PLATFORM.md), the rest from the same wheel
# folder: a missing package or a typo fails here, not on the GPU.
set -uo pipefail

usage="usage: bash benchmarks/gpu_check.sh <wheel folder> <output folder> [--cpu-rehearsal]"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
WHEELS=$(realpath "$1")
OUT=$(realpath -m "$2")
REHEARSAL=0
case "${3:-}" in
  --cpu-rehearsal) REHEARSAL=1 ;;
  "") ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run 'make gpu-wheels'" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT"
rm -f "$OUT"/parts.tsv "$OUT"/*.json "$OUT"/*.md
SCRATCH=${TMPDIR:-/tmp}

# What the GPU image has already (PLATFORM.md); the rehearsal venv holds torch and these only.
GPU_IMAGE_PACKAGES="numpy sentencepiece tiktoken tensorboard safetensors pytest einops pyarrow pandas
  huggingface-hub tokenizers"
if [ $REHEARSAL = 1 ]; then
  VENV=$SCRATCH/titan-rehearsal-venv
  rm -rf "$VENV"
  echo "rehearsal: a fresh venv in $VENV"
  # shellcheck disable=SC2086  # the package list splits into its words
  {
    python3 -m venv "$VENV" &&
      # the CPU build that lies on this machine's disk; an unpinned torch would pull a CUDA build
      "$VENV/bin/python" -m pip install -q torch==2.13.0 &&
      "$VENV/bin/python" -m pip install -q $GPU_IMAGE_PACKAGES
  } > "$OUT/0-venv.txt" 2>&1 || { cat "$OUT/0-venv.txt"; exit 1; }
  PY=$VENV/bin/python
else
  PY=${PYTHON:-python3}
fi

# The 9 minutes start here on the GPU: the install is part of them. 520 s leave 20 s for the
# processes started outside the parts (machine.txt, the report) and the 10 s kill grace.
T0=$SECONDS
# The rehearsal's CPU, shared and slower, gets every time limit three times over: it checks what
# runs, not how fast.
SCALE=$([ $REHEARSAL = 1 ] && echo 3 || echo 1)
BUDGET_S=$((520 * SCALE))
SITE=$SCRATCH/titan-gpu-site
rm -rf "$SITE"
# every package of the folder by name: pip picks the wheel that fits this Python (py311 or py312)
packages=$(for wheel in "$WHEELS"/*.whl; do basename "$wheel" | cut -d- -f1; done | sort -u)
# shellcheck disable=SC2086
"$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" --target "$SITE" $packages \
  > "$OUT/0-install.txt" 2>&1 || { cat "$OUT/0-install.txt"; exit 1; }
export PYTHONPATH=$SITE:$REPO
# CPU threads per process: the GPU machine has 16 cores; the rehearsal shares two with its runs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$([ $REHEARSAL = 1 ] && echo 1 || echo 8)}
{
  date -u
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "wheels: $packages" | tr '\n' ' '
  echo
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

left() { echo $((BUDGET_S - (SECONDS - T0))); }

# skip NAME WHY: the line the report shows for a part that did not run
skip() {
  echo "== $1 skipped: $2" >&2  # stderr: also from inside $(fits ...)
  echo "$2" > "$OUT/$1.txt"
  printf '%s\tskipped\t0\n' "$1" >> "$OUT/parts.tsv"
}

PARTS=${PARTS:-*}
selected() {
  local pattern patterns
  [ "$1" = 9-report ] && return 0  # always
  read -ra patterns <<< "$PARTS"  # words, not globbed against this folder's files
  for pattern in "${patterns[@]}"; do
    # shellcheck disable=SC2053  # a glob on purpose
    [[ $1 == $pattern ]] && return 0
  done
  return 1
}

# part NAME TIMEOUT_S COMMAND...: its output in OUT/NAME.txt, "NAME rc seconds" in OUT/parts.tsv
part() {
  local name=$1 timeout_s=$2 start=$SECONDS rc
  shift 2
  selected "$name" || { skip "$name" "not in PARTS=$PARTS"; return 0; }
  echo "== $name (timeout ${timeout_s} s, $(left) s of the budget left)"
  timeout -k 10 "$timeout_s" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - start)) >> "$OUT/parts.tsv"
  tail -n 3 "$OUT/$name.txt"
  return $rc
}

if [ $REHEARSAL = 1 ]; then
  SHAPE_3B="model=llama3_debug training.seq_len=128 training.global_batch_size=2 training.micro_batch_size=2 training.ac=op"
  SHAPE_1B="model=llama3_debug training.seq_len=128 training.global_batch_size=4 training.micro_batch_size=4"
  COMMON="training.device=cpu training.compile_backend=aot_eager"
else
  # PLATFORM.md's reference shapes: 3.6 B at local batch 2 x 8192 with selective op AC; 1 B at 4 x 4096
  SHAPE_3B="model=llama3_3b model.tie_embeddings=false training.seq_len=8192 training.global_batch_size=2 training.micro_batch_size=2 training.ac=op"
  SHAPE_1B="model=llama3_1b model.tie_embeddings=false training.seq_len=4096 training.global_batch_size=4 training.micro_batch_size=4"
  COMMON="training.device=cuda"
fi
COMMON="$COMMON cluster.nproc_per_node=1 training.param_dtype=bfloat16 checkpoint=none"

failed=0
# within CAP_S RESERVE_S: a part's timeout, CAP_S or less, so that RESERVE_S are left for the parts after it
within() {
  local cap=$(($1 * SCALE)) budget=$(($(left) - $2 * SCALE))
  echo $((cap < budget ? cap : (budget > 10 ? budget : 10)))
}

# row NAME TIMEOUT_S OVERRIDES: one throughput row; the script stops its run (and writes the JSON)
# before `timeout` would stop the script
row() {
  local name=$1 timeout_s=$2 overrides=$3
  part "2-$name" "$timeout_s" "$PY" benchmarks/train_throughput.py --warmup 10 --steps 30 \
    --timeout-s $((timeout_s - 8)) --json "$OUT/2-$name.json" --row "$name: $overrides" || failed=1
}

# Each part gets at most its cap, and never more than leaves the later parts their reserve (the
# least they need): even when every part runs to its timeout, the script ends within the budget.
# 3.6 B cold compiles take 1-2 minutes of their row. The rowwise row gets what the others leave.
part 1-pytest-cuda "$(within 75 330)" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/cuda
rc=$(tail -n 1 "$OUT/parts.tsv" | cut -f2)
[ "$rc" = 0 ] || [ "$rc" = 5 ] || [ "$rc" = skipped ] || failed=1  # 5: no cuda tests collected
row 3b-bf16-compile "$(within 150 220)" "$SHAPE_3B $COMMON training.compile=true"
row 3b-float8-tensorwise "$(within 125 120)" "$SHAPE_3B $COMMON training.compile=true training.float8=tensorwise"
row 1b-bf16-compile "$(within 85 60)" "$SHAPE_1B $COMMON training.compile=true"
gap_s=$(within 100 10)
# Eager (no compile time), both runs at once on the one device: selective AC keeps the two under its
# memory (~60 GB each without it, at fp32 weights and AdamW), and changes no loss.
# shellcheck disable=SC2086
part 3-float8-vs-bf16 "$gap_s" "$PY" benchmarks/float8_vs_bf16.py --steps 50 --recipes tensorwise \
  --timeout-s $((gap_s - 8)) --json "$OUT/3-float8-vs-bf16.json" $SHAPE_1B $COMMON training.ac=op || failed=1

# fits NAME NEED_S CAP_S: the timeout for a short part, CAP_S or what is left after the report's 10 s;
# none (the part is skipped with a line) when that is under NEED_S, the least it needs
fits() {
  local cap=$(($3 * SCALE)) have=$(($(left) - 10 * SCALE))
  if [ "$have" -lt $(($2 * SCALE)) ]; then
    skip "$1" "${have} s left of the budget, it needs $(($2 * SCALE)) s"
    return 1
  fi
  echo $((cap < have ? cap : have))
}

if [ $REHEARSAL = 1 ]; then  # forward only: torch 2.13's FlexAttention has no backward on CPU
  FLEX_ARGS="--device cpu --batch 2 --seq-len 256 --heads 4 --kv-heads 2 --head-dim 16 --iters 3"
  ESTIMATE_SHAPES=(--shape "debug: $SHAPE_1B $COMMON")
  OOM_SHAPE=""
else
  # Llama 3.2 1B's attention (32/8 heads, head_dim 64) at 2 x 4096 tokens, six documents a row
  FLEX_ARGS="--device cuda"
  ESTIMATE_SHAPES=(--shape "1b: $SHAPE_1B $COMMON" --shape "3b: $SHAPE_3B $COMMON")
  # 16 x 8192 tokens without AC: the 1 B model's bf16 logits alone are 31 GiB, its activations far more
  OOM_SHAPE="model=llama3_1b model.tie_embeddings=false training.seq_len=8192 training.global_batch_size=16 training.micro_batch_size=16 training.ac=none $COMMON"
fi
# Cold compiles of FlexAttention's forward and backward kernels, per dtype, take most of its minute.
if t=$(fits 5-flex-vs-sdpa 30 60); then
  # shellcheck disable=SC2086
  part 5-flex-vs-sdpa "$t" "$PY" benchmarks/flex_vs_sdpa_mask.py $FLEX_ARGS \
    --json "$OUT/5-flex-vs-sdpa.json" --markdown "$OUT/5-flex-vs-sdpa.md" || failed=1
fi
if t=$(fits 6-estimate 40 75); then
  part 6-estimate "$t" "$PY" benchmarks/estimate_accuracy.py --device "$([ $REHEARSAL = 1 ] && echo cpu || echo cuda)" \
    "${ESTIMATE_SHAPES[@]}" --steps 3 --json "$OUT/6-estimate.json" --markdown "$OUT/6-estimate.md" || failed=1
fi
if t=$(fits 7-profile-window 30 45); then
  # shellcheck disable=SC2086
  part 7-profile-window "$t" "$PY" benchmarks/profile_check.py window $SHAPE_1B $COMMON --timeout-s $((t - 8)) \
    --json "$OUT/7-profile-window.json" --markdown "$OUT/7-profile-window.md" || failed=1
fi
if [ -z "$OOM_SHAPE" ]; then
  skip 8-profile-oom "no CUDA: no out-of-memory snapshot to check (the allocator history is CUDA's)"
elif t=$(fits 8-profile-oom 25 40); then
  # shellcheck disable=SC2086
  part 8-profile-oom "$t" "$PY" benchmarks/profile_check.py oom $OOM_SHAPE --timeout-s $((t - 8)) \
    --json "$OUT/8-profile-oom.json" --markdown "$OUT/8-profile-oom.md" || failed=1
fi

rowwise_s=$(($(left) - 10 * SCALE))
if [ "$rowwise_s" -ge $((60 * SCALE)) ]; then
  row 3b-float8-rowwise "$rowwise_s" "$SHAPE_3B $COMMON training.compile=true training.float8=rowwise"
else
  skip 2-3b-float8-rowwise "${rowwise_s} s left of the budget, it needs $((60 * SCALE)) s"
fi
part 9-report $((10 * SCALE)) "$PY" benchmarks/gpu_report.py "$OUT" || failed=1
cat "$OUT/report.md"
echo "gpu_check: $((SECONDS - T0)) s after the install began; results in $OUT"
exit $failed
