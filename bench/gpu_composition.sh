#!/usr/bin/env bash
# Issue 24's composition protocol (bench/composition.py) on a device machine, one training seed per call:
#
#   SEED=0 bash bench/gpu_composition.sh     # -> $OUT/composition_seed0.json (+ the trusted judges if trained here)
#   then, here: python bench/composition.py --merge composition_seed{0,1,2}.json   # -> bench/results/composition.json
#
# The device image has no diffusers: carry the slim wheel in .whl/ (see bench/gpu_family.sh's header;
# run(..., carry=[".whl"])). Without assets/trusted-judges (trained on a CPU with `studio pretrain-base
# --stages trusted-judges`, about 40 minutes there), the full judge recipe runs here first (a few minutes).
# Knobs: SEED (default 0), BUDGET_S (default 540), EXTRA (more composition.py flags), PYTHON, SITE.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
SEED=${SEED:-0}
BUDGET_S=${BUDGET_S:-540}
OUT=${OUT:-/tmp}
START=$(date +%s)
# shellcheck disable=SC2206
EXTRA_ARGS=(${EXTRA:-})
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && export PYTHONPATH=$SITE:$PWD
fi
if [[ ! -f assets/trusted-judges/judge.json ]]; then
    echo "== trusted judges (full recipe, cuda)"
    timeout -k 10 240 "$PYTHON" -m studio.cli pretrain-base --scale full --stages trusted-judges --device cuda \
        --out /tmp/pretrain --set judge_vae=assets/tiny-sd 2>&1 | tail -5
    mkdir -p assets/trusted-judges "$OUT/trusted-judges"
    cp /tmp/pretrain/trusted-judges/* assets/trusted-judges/ && cp /tmp/pretrain/trusted-judges/* "$OUT/trusted-judges/"
fi
LEFT=$((BUDGET_S - ($(date +%s) - START) - 15))
# The tiny SD leaves an H100 mostly idle (launch-bound): PROCS processes, each a share of the 12 pairs
# (4: one content and its three styles each, so a process trains 4 LoRAs, not 7).
PROCS=${PROCS:-4}
PER=$(((12 + PROCS - 1) / PROCS))
echo "== composition seed $SEED: $PROCS processes x $PER pairs (cap ${LEFT}s)"
PARTS=()
for ((i = 0; i < PROCS; i++)); do
    part="$OUT/composition_seed${SEED}_part$i.json"
    PARTS+=("$part")
    timeout -k 10 "$LEFT" "$PYTHON" bench/composition.py --first-seed "$SEED" --seeds 1 --first-pair $((i * PER)) \
        --pairs "$PER" --out "$part" "${EXTRA_ARGS[@]}" >"$OUT/composition_seed${SEED}_part$i.log" 2>&1 &
done
wait
tail -5 "$OUT"/composition_seed"${SEED}"_part*.log
"$PYTHON" bench/composition.py --merge "${PARTS[@]}" --out "$OUT/composition_seed$SEED.json" | tail -40
echo "== done in $(($(date +%s) - START))s"
