#!/usr/bin/env bash
# Issue 24's composition protocol (bench/composition.py) on a device machine, as a queue of units (one
# training seed x one pair each), run PROCS at a time until the call's budget is spent:
#
#   SEEDS="0 1 2" bash bench/gpu_composition.sh     # -> $OUT/composition_units.tar.gz (a JSON + log per unit)
#   DONE="0:0 0:1 ..." skips units an earlier call finished (seed:pair)
#   then, here: python bench/composition.py --merge <every unit JSON> --out bench/results/composition.json
#
# Units run in order (seed 0's pairs, then seed 1's, ...), so the first seed finishes first; a unit is not
# started with less time left than the quickest finished unit took (MIN_UNIT_S before one has). A unit trains its pair's own two LoRAs (cheap next to B4M; the
# same recipe and seed as every unit that shares one), so units are independent and any call's finished
# units add up.
# The device image has no diffusers: carry only the slim diffusers wheel (the tree is ~60 MB, both wheels
# pass the 64 MiB limit): run(..., carry=[".whl/diffusers-0.42.1-py3-none-any.whl"]).
# Without assets/trusted-judges the full judge recipe runs here first (a few minutes).
# Knobs: SEEDS (default "0 1 2"), DONE, PROCS (default 12), BUDGET_S (default 560), MIN_UNIT_S (default
# 240), EXTRA (more composition.py flags), PYTHON, SITE. At most 8 files come back from $OUT: the units
# travel as one archive, with the GPU-use log.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
SEEDS=${SEEDS:-0 1 2}
DONE=${DONE:-}
BUDGET_S=${BUDGET_S:-560}
MIN_UNIT_S=${MIN_UNIT_S:-240}
PROCS=${PROCS:-12}
OUT=${OUT:-/tmp}
WORK=/tmp/composition
START=$(date +%s)
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
export DEADLINE=$((START + BUDGET_S - 15)) MIN_UNIT_S PYTHON WORK EXTRA="${EXTRA:-}"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1  # a process per unit: no thread pools fighting over 16 cores
run_unit() {  # seed pair
    local began left need status
    began=$(date +%s)
    left=$((DEADLINE - began))
    # Start only what can finish: as long as the quickest unit so far took (MIN_UNIT_S before any has).
    need=$(sort -n "$WORK/durations" 2>/dev/null | head -1)
    need=${need:-$MIN_UNIT_S}
    if ((left < need)); then
        echo "unit $1:$2 not started (${left}s left, a unit takes ${need}s)"
        return 0
    fi
    # shellcheck disable=SC2086
    timeout -k 10 "$left" "$PYTHON" bench/composition.py --first-seed "$1" --seeds 1 --first-pair "$2" --pairs 1 \
        --out "$WORK/unit_s$1_p$2.json" $EXTRA >"$WORK/unit_s$1_p$2.log" 2>&1
    status=$?
    ((status == 0)) && echo $(($(date +%s) - began)) >>"$WORK/durations"
    echo "unit $1:$2 exit $status in $(($(date +%s) - began))s (at $(($(date +%s) - START))s)"
}
export -f run_unit
export START
UNITS=()
for SEED in $SEEDS; do
    for PAIR in $(seq 0 11); do
        [[ " $DONE " == *" $SEED:$PAIR "* ]] || UNITS+=("$SEED $PAIR")
    done
done
echo "== ${#UNITS[@]} units, $PROCS at a time, until $((DEADLINE - START))s"
printf '%s\n' "${UNITS[@]}" | xargs -P "$PROCS" -L 1 bash -c 'run_unit "$0" "$1"'
kill "$SMI" 2>/dev/null
tail -40 "$WORK/gpu_use.csv"
grep -h "seconds" "$WORK"/unit_*.log | tail -12
echo -n "finished units (DONE for the next call): "; ls "$WORK"/unit_*.json 2>/dev/null | sed 's/.*unit_s\([0-9]*\)_p\([0-9]*\).json/\1:\2/' | sort -t: -k1,1n -k2,2n | tr '\n' ' '
echo
tar -czf "$OUT/composition_units.tar.gz" -C "$WORK" --exclude sets .
echo "== done in $(($(date +%s) - START))s"
