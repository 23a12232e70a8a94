#!/usr/bin/env bash
# bench/b4m_quality.py on one GPU, its three pairs in parallel processes (the tiny UNet is launch-bound,
# so one process leaves the GPU mostly idle), then merged into one report:
#
#   bash bench/gpu_b4m.sh                    # defaults -> bench/results/b4m_quality.json + one grid per pair
#   STEPS=800 MAKE_STEPS=200 NAME=b4m_quality_long bash bench/gpu_b4m.sh
#
# Environment: STEPS, MAKE_STEPS (b4m_quality.py's --steps / --make-steps; default: the script's own),
# NAME (result name), RESULTS (folder, default bench/results), LIMIT_S (per pair, default 420),
# EXTRA (more b4m_quality.py flags, e.g. "--samples 2 --sample-steps 2" for a smoke test), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NAME=${NAME:-b4m_quality}
LIMIT_S=${LIMIT_S:-420}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$RESULTS"
WORK=$(mktemp -d)
args=()
[[ -n "${STEPS:-}" ]] && args+=(--steps "$STEPS")
[[ -n "${MAKE_STEPS:-}" ]] && args+=(--make-steps "$MAKE_STEPS")
# shellcheck disable=SC2206
[[ -n "${EXTRA:-}" ]] && args+=($EXTRA)
pids=()
for pair in 0 1 2; do
    mkdir -p "$WORK/$pair"
    timeout "$LIMIT_S" "$PYTHON" bench/b4m_quality.py "${args[@]}" --pairs 1 --first-pair "$pair" \
        --out "$WORK/$pair/report.json" > "$WORK/$pair/log.txt" 2>&1 &
    pids+=($!)
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    echo "== pair $i: exit $?"
    tail -n 25 "$WORK/$i/log.txt"
done
reports=()
for pair in 0 1 2; do
    [[ -f "$WORK/$pair/report.json" ]] && reports+=("$WORK/$pair/report.json")
    for grid in "$WORK/$pair"/b4m_quality_*.png; do
        [[ -f "$grid" ]] && cp "$grid" "$RESULTS/${NAME}_$(basename "$grid" | sed 's/^b4m_quality_//')"
    done
done
if ((${#reports[@]})); then
    "$PYTHON" bench/b4m_quality.py --merge "${reports[@]}" --out "$RESULTS/$NAME.json"
    # the grids now live beside the report, under the run's name
    "$PYTHON" - "$RESULTS" "$NAME" <<'PY'
import json, sys
from pathlib import Path
path = Path(sys.argv[1]) / f"{sys.argv[2]}.json"
report = json.loads(path.read_text())
for pair in report["pairs"]:
    pair["grid"] = f"{sys.argv[1]}/{sys.argv[2]}_{pair['content']}_{pair['style']}.png"
path.write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: report.get(k) for k in ("mean", "b4m_beats_naive_sum", "b4m_minus_naive_sum_ci95")}, indent=2))
PY
fi
