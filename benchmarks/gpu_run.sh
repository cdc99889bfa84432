#!/usr/bin/env bash
# The GPU figures of docs/kernels.md and docs/training.md in one bounded run (under 8 minutes):
#
#   bash benchmarks/gpu_run.sh            # from the repository root, on a machine with one CUDA GPU
#
# 1. benchmarks/gpu_kernels.py --budget 200 (the loss kernels: naive, tiled torch, Triton);
# 2. benchmarks/gpu_step.py (a ViT-B/16 CLIP step at 224 px, bf16, 8 loader workers), and
#    only if that fails and time is left, once more with the loader in the training process
#    and the torch kernels, so that one figure comes back whatever broke (the output says so).
#
# Everything printed is also written to $OUT/gpu_run.log when OUT is set, and the step
# log of gpu_step.py to $OUT/train_log.jsonl. Python: $PYTHON, else .venv/bin/python when it
# runs, else python3. Packages that Python lacks can come as wheels in .whl/ (installed
# into /tmp/site first; see docs/training.md, "GPU figures").
set -uo pipefail
cd "$(dirname "$0")/.."

TOTAL_S=470                     # the whole script stays under 8 minutes
KERNELS_S=250                   # gpu_kernels.py: --budget 200, then the case in flight
STEP_S=200                      # gpu_step.py: --budget 150 of steps, then its checkpoint and exit

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_run.log") 2>&1
fi
export PYTHONUNBUFFERED=1

if [ -z "${PYTHON:-}" ]; then
    if .venv/bin/python -c '' 2>/dev/null; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "gpu_run.sh: installing .whl/ failed"; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

echo "== $(date -u +%FT%TZ) gpu_run.sh on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
"$PYTHON" -c 'import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "cuda", torch.version.cuda)'
"$PYTHON" -c 'import deepspeed, pydantic, tokenizers' \
    || { echo "gpu_run.sh: $PYTHON lacks the training packages: bring them as wheels in .whl/"; exit 2; }

left() { echo $((TOTAL_S - SECONDS)); }

echo "== kernels (timeout ${KERNELS_S}s)"
timeout "$KERNELS_S" "$PYTHON" benchmarks/gpu_kernels.py --budget 200
echo "gpu_kernels.py exit status $?"

step_s=$(( $(left) < STEP_S ? $(left) : STEP_S ))
log=${OUT:+--save-log $OUT/train_log.jsonl}
echo "== training step (timeout ${step_s}s)"
timeout "$step_s" "$PYTHON" benchmarks/gpu_step.py --budget $((step_s - 50)) $log
rc=$?
echo "gpu_step.py exit status $rc"

if [ "$rc" -ne 0 ] && [ "$(left)" -ge 100 ]; then
    step_s=$(( $(left) < STEP_S ? $(left) : STEP_S ))
    echo "== FALLBACK training step: loader in the training process, torch kernels (timeout ${step_s}s)"
    timeout "$step_s" "$PYTHON" benchmarks/gpu_step.py --budget $((step_s - 50)) --loader-workers 0 --kernels torch \
        ${OUT:+--save-log $OUT/train_log_fallback.jsonl}
    echo "gpu_step.py (fallback) exit status $?"
fi
echo "== done in ${SECONDS}s"
