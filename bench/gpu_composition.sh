#!/usr/bin/env bash
# Issue 24's composition protocol (bench/composition.py) on a device machine, one or more training seeds per call:
#
#   SEEDS="0" bash bench/gpu_composition.sh   # -> $OUT/composition_seed0.json, $OUT/composition_logs.tar.gz
#   then, here: python bench/composition.py --merge composition_seed{0,1,2}.json   # -> bench/results/composition.json
#
# The device image has no diffusers: carry only the slim diffusers wheel (the tree is ~60 MB, both wheels
# pass the 64 MiB limit): run(..., carry=[".whl/diffusers-0.42.1-py3-none-any.whl"]).
# Without assets/trusted-judges the full judge recipe runs here first (a few minutes).
# Several seeds per call: the first runs at normal priority, the rest niced (they use what it leaves).
# Knobs: SEEDS (default "0"), PROCS per seed (default 12: one pair each), BUDGET_S (default 560),
# EXTRA (more composition.py flags), PYTHON, SITE. At most 8 files come back from $OUT: the parts and
# logs travel as one archive.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
SEEDS=${SEEDS:-${SEED:-0}}
BUDGET_S=${BUDGET_S:-560}
OUT=${OUT:-/tmp}
WORK=/tmp/composition
START=$(date +%s)
# shellcheck disable=SC2206
EXTRA_ARGS=(${EXTRA:-})
mkdir -p "$WORK"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && export PYTHONPATH=$SITE:$PWD
fi
if [[ ! -f assets/trusted-judges/judge.json ]]; then
    echo "== trusted judges (full recipe, cuda)"
    timeout -k 10 240 "$PYTHON" -m studio.cli pretrain-base --scale full --stages trusted-judges --device cuda \
        --out /tmp/pretrain --set judge_vae=assets/tiny-sd 2>&1 | tail -5
    mkdir -p assets/trusted-judges "$WORK/trusted-judges"
    cp /tmp/pretrain/trusted-judges/* assets/trusted-judges/ && cp /tmp/pretrain/trusted-judges/* "$WORK/trusted-judges/"
fi
# GPU use over the run, to size the next call (the tiny SD is launch-bound: many processes share the card).
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 >"$WORK/gpu_use.csv" 2>&1 &
SMI=$!
LEFT=$((BUDGET_S - ($(date +%s) - START) - 20))
PROCS=${PROCS:-12}
PER=$(((12 + PROCS - 1) / PROCS))
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1  # a process per pair: no thread pools fighting over 16 cores
PIDS=()
NICENESS=0  # the first seed has the CPUs first; later seeds run on what it leaves (a seed counts only whole)
for SEED in $SEEDS; do
    echo "== composition seed $SEED: $PROCS processes x $PER pairs (cap ${LEFT}s, nice $NICENESS)"
    for ((i = 0; i < PROCS; i++)); do
        nice -n "$NICENESS" timeout -k 10 "$LEFT" "$PYTHON" bench/composition.py --first-seed "$SEED" --seeds 1 --first-pair $((i * PER)) \
            --pairs "$PER" --out "$WORK/seed${SEED}_part$i.json" "${EXTRA_ARGS[@]}" >"$WORK/seed${SEED}_part$i.log" 2>&1 &
        PIDS+=($!)
    done
    NICENESS=19
done
wait "${PIDS[@]}"
kill "$SMI" 2>/dev/null
for SEED in $SEEDS; do
    tail -3 "$WORK"/seed"${SEED}"_part*.log
    parts=("$WORK"/seed"${SEED}"_part*.json)  # a process cut short before its first pair wrote none
    [[ -e ${parts[0]} ]] || { echo "seed $SEED: no pair finished"; continue; }
    "$PYTHON" bench/composition.py --merge "${parts[@]}" --out "$OUT/composition_seed$SEED.json" | tail -40
done
tail -30 "$WORK/gpu_use.csv"
tar -czf "$OUT/composition_logs.tar.gz" -C "$WORK" --exclude sets .
echo "== done in $(($(date +%s) - START))s"
