#!/usr/bin/env bash
# Issue 11's diffusion benches on one GPU, in about 5 minutes on an H100 (one device call):
#
#   bash bench/gpu_diffusion.sh            # -> bench/results/sd_step.json, bench/results/generate.json
#
# Three stages, most important first, each under its own `timeout` so a slow stage cannot starve the
# next; both scripts rewrite their JSON after every variant, so a stage cut short keeps what it measured:
#   1. sd_step.py, the eager variants (frozen, peft_lora, lora, paca, plp): 3 warm-up + 10 timed steps each;
#   1b. sd_step.py --graphed-only --append: the same five steps captured as CUDA graphs (CUDA only);
#   0. the CUDA tests of the graphed training step and graphed generation (tests/pipelines/test_cuda_graphs.py),
#      when pytest is importable;
#   2. generate.py: base / unmerged / merged, eager and graphed, at batch 1 and 4, 50 steps, median of 3 runs;
#   3. sd_step.py --compile-only --append: compiled variants in the time left, in priority order.
#      Regional compilation (--compile-scope blocks: the 16 BasicTransformerBlocks, which hold every
#      adapted layer) because a whole SD UNet compile takes ~1 minute per variant.
# Knobs (environment): BUDGET_S (total seconds, default 300), COMPILE_SCOPE (blocks|unet),
# COMPILED (variant list), PYTHON, TINY=1 (a CPU smoke test of this driver: --tiny models, results in /tmp).
# Results and logs are also copied to $OUT when the device tool sets it.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-300}
COMPILE_SCOPE=${COMPILE_SCOPE:-blocks}
COMPILED=${COMPILED:-paca_compiled,lora_compiled,peft_lora_compiled,frozen_compiled,plp_compiled}
TINY_ARG=${TINY:+--tiny}
START=$(date +%s)
LOGS=${OUT:-/tmp}/diffusion_logs
mkdir -p "$LOGS" bench/results

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
# min(cap, time left), never below 1 second
cap() { local l; l=$(left); ((l < $1)) && echo $((l > 1 ? l : 1)) || echo "$1"; }
copy_out() {
    [[ -n "${OUT:-}" ]] && cp -f bench/results/sd_step.json bench/results/generate.json "$OUT/" 2>/dev/null
    return 0
}
trap copy_out EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [[ -z "${TINY:-}" ]] && "$PYTHON" -c "import pytest" 2>/dev/null; then
    echo "== stage 0: CUDA-graph tests (cap $(cap 90)s)"
    timeout -k 5 "$(cap 90)" "$PYTHON" -m pytest -q -p no:cacheprovider tests/pipelines/test_cuda_graphs.py 2>&1 \
        | tee "$LOGS/cuda_graph_tests.log"
fi
echo "== stage 1: sd_step eager (cap $(cap 95)s)"
timeout -k 5 "$(cap 95)" "$PYTHON" bench/sd_step.py $TINY_ARG --steps 10 --warmup 3 2>&1 | tee "$LOGS/sd_step.log"
copy_out
if [[ -z "${TINY:-}" ]]; then
    echo "== stage 1b: sd_step graphed (cap $(cap 75)s)"
    timeout -k 5 "$(cap 75)" "$PYTHON" bench/sd_step.py --graphed-only --append --steps 10 --warmup 3 2>&1 \
        | tee "$LOGS/sd_step_graphed.log"
    copy_out
fi
echo "== stage 2: generate (cap $(cap 200)s, $(left)s left)"
timeout -k 5 "$(cap 200)" "$PYTHON" bench/generate.py $TINY_ARG --steps 50 --runs 3 --warmup-steps 3 2>&1 | tee "$LOGS/generate.log"
copy_out
if (($(left) > 40)); then
    echo "== stage 3: compiled ($COMPILE_SCOPE) in the $(left)s left: $COMPILED"
    timeout -k 5 "$(cap $(($(left) - 3)))" "$PYTHON" bench/sd_step.py $TINY_ARG --compile-only --append \
        --compile-scope "$COMPILE_SCOPE" --variants "$COMPILED" --steps 10 --warmup 3 2>&1 | tee "$LOGS/sd_step_compiled.log"
else
    echo "== stage 3 skipped: only $(left)s left"
fi
copy_out
echo "== done in $(($(date +%s) - START))s"
