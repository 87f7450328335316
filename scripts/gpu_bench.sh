#!/usr/bin/env bash
# GPU benchmark: `smat-bench step` (ViT-S / ViT-B at 128 and 224 px, bf16 autocast) and `smat-bench scale`
# (ViT-Ti, 1 GPU, M = 4..256, sharded and gather) in one command of under 8 minutes on one H200.
# Writes only under $OUT (or ./bench_out when $OUT is unset): step.jsonl, scale.jsonl, env.json, *.log.
#
# From a fresh checkout with the .venv carried, through the device tool:
#   run(command="bash scripts/gpu_bench.sh", carry=[".venv"], timeout_s=540)
# The .venv must contain the package installed in editable mode (`pip install -e .` done here); the script
# falls back to PYTHONPATH=. so a non-editable venv works too. Each part is time-boxed so a slow part cannot
# take the others' figures with it.
set -u
OUT="${OUT:-./bench_out}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
export PYTHONDONTWRITEBYTECODE=1          # create nothing outside $OUT
export TORCH_HOME="$OUT/.torch" HF_HOME="$OUT/.hf" XDG_CACHE_HOME="$OUT/.cache" MPLCONFIGDIR="$OUT/.mpl"
export TRITON_CACHE_DIR="$OUT/.triton"
BENCH="$PY -m smat_dist.bench.cli"

$PY - > "$OUT/env.json" <<'PYEOF'
import json, torch
d = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    d.update(gpu=torch.cuda.get_device_name(0), mem_bytes=torch.cuda.get_device_properties(0).total_memory)
print(json.dumps(d))
PYEOF
cat "$OUT/env.json"

# 1. step: SMAT vs P>M>F vs frozen, interleaved, bf16 autocast (precision auto on GPU).
for px in 128 224; do
  timeout 120 $BENCH step --model vit_small_patch16_224 vit_base_patch16_224 --image-size $px --repeats 5 \
    --precision bf16 >> "$OUT/step.jsonl" 2>> "$OUT/step.log" || echo "step $px px exited $?" | tee -a "$OUT/step.log"
done
timeout 60 $BENCH step --model vit_tiny_patch16_224 efficientnet_lite0 --image-size 84 --repeats 5 \
  --precision bf16 >> "$OUT/step.jsonl" 2>> "$OUT/step.log" || echo "step 84 px exited $?" | tee -a "$OUT/step.log"

# 2. scale: ViT-Ti on 1 GPU, M = 4..256, both merge paths, 4 tasks per step (steady-state time per task).
timeout 200 $BENCH scale --experts 4,16,64,256 --ranks 1 --paths sharded,gather --model vit_tiny_patch16_224 \
  --image-size 84 --depth full --tasks-per-rank 4 --steps 3 --precision bf16 \
  > "$OUT/scale.jsonl" 2> "$OUT/scale.log" || echo "scale exited $?" | tee -a "$OUT/scale.log"

# 3. plan at the measured points, for comparison with the GPU's max_memory_allocated.
for m in 4 64 256; do
  $BENCH plan model=vit_tiny_patch16_224 experts=$m ranks=1 image_size=84 act_bytes=2 >> "$OUT/plan.jsonl" 2>> "$OUT/plan.log"
done
cat "$OUT"/step.jsonl "$OUT"/scale.jsonl
