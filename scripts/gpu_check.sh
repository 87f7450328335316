#!/usr/bin/env bash
# GPU acceptance check (issue: "Runs on GPUs as written"): smat-train with DeepSpeed over NCCL in bf16, a save,
# a resume that must continue like the uninterrupted run, a sharded smat-eval, smat-bench step and plan.
# Exits non-zero on any failure; figures in $OUT/gpu_check.json.
#
# Through the device tool (one GPU, its own Python with torch + timm, no network):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# What the image lacks (deepspeed, hydra-core, omegaconf, webdataset, submitit, ...) is installed from the
# ignored .whl/ folder beside this checkout, filled here with:
#   .venv/bin/pip download -d .whl --no-deps -c constraints.txt deepspeed hydra-core omegaconf antlr4-python3-runtime \
#       webdataset braceexpand submitit cloudpickle wandb ninja hjson py-cpuinfo msgpack einops
# SMOKE=1 runs it on the CPU at toy sizes (CI: tests/unit/test_gpu_check_script.py).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
export OUT
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MPLCONFIGDIR="$OUT/.mpl" TORCH_EXTENSIONS_DIR="$OUT/.ext"
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python
  elif command -v python3 >/dev/null; then PY=python3
  else echo "gpu_check: no python3 and no .venv" >&2; exit 2; fi
fi
if ! "$PY" -c "import deepspeed, hydra, webdataset, submitit" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "gpu_check: deepspeed/hydra/webdataset/submitit are missing and there is no .whl/ folder (see the header)" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --find-links .whl --target "$OUT/site" deepspeed hydra-core webdataset submitit \
    wandb >"$OUT/pip.log" 2>&1 || { echo "gpu_check: installing from .whl/ failed (see $OUT/pip.log)" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$(cd "$OUT/site" && pwd)"
fi
exec "$PY" scripts/gpu_check.py
