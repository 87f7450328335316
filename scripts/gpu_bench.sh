#!/usr/bin/env bash
# GPU benchmark in one command that ends within its 520 s budget on one H200: `smat-bench step` (SMAT vs P>M>F vs frozen,
# ViT-Ti / EfficientNet-Lite0 at 84 px, ViT-S / ViT-B at 128 and 224 px, bf16 autocast) and `smat-bench scale`
# (ViT-Ti, 1 GPU, M = 4..256, sharded and gather; then fused pool kernels and the lean pool), plus the planner.
#
# Through the device tool, from this checkout, nothing carried:
#   run(command="bash scripts/gpu_bench.sh", timeout_s=540)
# The device machine is bare apart from its own image (python3 with torch, torchvision, timm, numpy, PIL,
# PyYAML); the benchmarks import nothing else (no DeepSpeed, Hydra, wandb or WebDataset), so the package runs
# from the source tree on PYTHONPATH. A .venv is too large to carry (64 MiB limit) and built for another Python.
# Writes only under $OUT (./bench_out when unset): env.json, step.jsonl, scale.jsonl, plan.jsonl, *.log.
# Each part is time-boxed, so a slow part cannot take the others' figures with it.
# SMOKE=1 runs every command at toy sizes (on CPU too): checks the script itself in a minute.
set -u
OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
if [ -z "${PY:-}" ]; then
  if python3 -c "import torch, timm" 2>/dev/null; then PY=python3
  elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
  else echo "gpu_bench: no python3 with torch and timm, and no .venv: nothing can run" >&2; exit 2; fi
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1          # create nothing outside $OUT
export TORCH_HOME="$OUT/.torch" HF_HOME="$OUT/.hf" XDG_CACHE_HOME="$OUT/.cache" MPLCONFIGDIR="$OUT/.mpl"
export TRITON_CACHE_DIR="$OUT/.triton"
BENCH="$PY -m smat_dist.bench.cli"
SMOKE="${SMOKE:-0}"

$PY - > "$OUT/env.json" <<'PYEOF'
import json, torch, timm, torchvision
d = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
     "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    d.update(gpu=torch.cuda.get_device_name(0), mem_bytes=torch.cuda.get_device_properties(0).total_memory)
print(json.dumps(d))
PYEOF
cat "$OUT/env.json"

# The parts' own limits add up to more than one device call allows; a shared deadline (BUDGET_S, default 520 s,
# under the 540 s the device call is given) trims the last parts instead, so the script always ends by itself
# and prints what it measured.
DEADLINE=$((SECONDS + ${BUDGET_S:-520}))
run() {  # run LIMIT_S NAME OUTFILE CMD...: time-boxed, stdout appended to OUTFILE, stderr to NAME.log
  local limit=$1 name=$2 outfile=$3; shift 3
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -le 5 ]; then
    echo "$name skipped: the script's budget is spent" | tee -a "$OUT/$name.log"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  if ! timeout "$limit" "$@" >> "$outfile" 2>> "$OUT/$name.log"; then
    echo "$name exited $? ($*)" | tee -a "$OUT/$name.log"
    FAILED="$FAILED $name"
  fi
}
FAILED=""

if [ "$SMOKE" = 1 ]; then
  run 120 step "$OUT/step.jsonl" $BENCH step --model vit_tiny_patch16_224 --image-size 32 --patch-size 8 \
    --ways 2 --shots 1 --queries 1 --repeats 1 --teacher-top-fraction 0.5
  run 120 scale "$OUT/scale.jsonl" $BENCH scale --experts 4,16 --ranks 1 --paths sharded,gather \
    --model vit_tiny_patch16_224 --image-size 32 --depth 1 --ways 2 --shots 1 --queries 1 --steps 1
  run 120 scale_fused "$OUT/scale.jsonl" $BENCH scale --experts 4 --ranks 1 --paths sharded --compile \
    --model vit_tiny_patch16_224 --image-size 32 --depth 1 --ways 2 --shots 1 --queries 1 --steps 1
  run 60 plan "$OUT/plan.jsonl" $BENCH plan model=vit_tiny_patch16_224 experts=4 ranks=1 image_size=32
else
  # 1. step: interleaved medians; bf16 autocast.
  run 75 step "$OUT/step.jsonl" $BENCH step --model vit_tiny_patch16_224 efficientnet_lite0 --image-size 84 \
    --repeats 5 --precision bf16 --teacher-top-fraction 0.25
  for px in 128 224; do
    run 110 step "$OUT/step.jsonl" $BENCH step --model vit_small_patch16_224 vit_base_patch16_224 \
      --image-size $px --repeats 5 --precision bf16 --teacher-top-fraction 0.25
  done
  # 2. scale: ViT-Ti on 1 GPU, M = 4..256, both merge paths, 4 tasks per step (steady-state time per task).
  run 200 scale "$OUT/scale.jsonl" $BENCH scale --experts 4,16,64,256 --ranks 1 --paths sharded,gather \
    --model vit_tiny_patch16_224 --image-size 84 --depth full --tasks-per-rank 4 --steps 3 --precision bf16
  # 3. the same sharded points with the pool passes as fused kernels (Triton) and with the lean pool.
  run 100 scale_fused "$OUT/scale.jsonl" $BENCH scale --experts 4,64,256 --ranks 1 --paths sharded \
    --model vit_tiny_patch16_224 --image-size 84 --depth full --tasks-per-rank 4 --steps 3 --precision bf16 --compile
  run 60 scale_lean "$OUT/scale.jsonl" $BENCH scale --experts 64,256 --ranks 1 --paths sharded \
    --model vit_tiny_patch16_224 --image-size 84 --depth full --tasks-per-rank 4 --steps 3 --precision bf16 --lean
  # 4. the planner at the measured points, to compare with max_memory_allocated.
  for m in 4 64 256; do
    run 30 plan "$OUT/plan.jsonl" $BENCH plan model=vit_tiny_patch16_224 experts=$m ranks=1 image_size=84 \
      act_bytes=2 tasks_per_rank=4
  done
fi
cat "$OUT"/step.jsonl "$OUT"/scale.jsonl 2>/dev/null || true
# A part that failed (not one skipped for the budget) fails the script: a GPU session must not read 0 as success.
if [ -n "$FAILED" ]; then echo "gpu_bench: failed parts:$FAILED" >&2; exit 1; fi
