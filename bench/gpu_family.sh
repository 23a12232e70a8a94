#!/usr/bin/env bash
# Issue 21's family benchmark (bench/family_step.py) in one device call, about 4-5 minutes on an H100
# (at most BUDGET_S, default 400 s with the CUDA tests of stage 0, plus the wheel install):
#
#   bash bench/gpu_family.sh          # -> bench/results/family_step.json (+ logs), copied to $OUT
#   TINY=1 PYTHON=.venv/bin/python bash bench/gpu_family.sh     # CPU smoke test of this driver -> /tmp
#
# Carried wheels: when .whl/*.whl exist (diffusers, bitsandbytes: the GPU image has neither), they are
# installed into $SITE (default /tmp/site) first and PYTHONPATH=$SITE:$PWD. .whl/ is git-excluded (the
# device call carries it: run(..., carry=[".whl"])); to fit the 64 MiB a call carries, the wheels are
# slimmed: `pip download --no-deps diffusers==0.42.1 bitsandbytes==0.50.2`, then drop from the diffusers
# wheel every diffusers/pipelines/<x>/ but stable_diffusion*, flux and the shared modules, and from the
# bitsandbytes wheel every libbitsandbytes_cuda*.so but the device's CUDA (cuda130 for torch 2.11 there),
# fixing each wheel's RECORD (drop the removed files' lines) before zipping it again. Since assets/ grew
# to ~53 MB the tree plus both wheels is at the 64 MiB limit (a call carrying both was refused once):
# carry only what a script needs (gpu_composition.sh: the diffusers wheel alone).
# Four stages, the most important numbers first, each its own process under its own `timeout`, so a
# slow or crashing stage cannot starve the next; family_step.py rewrites the JSON after every variant and
# the later stages merge into it (--append), so a stage cut short keeps what it measured:
#   1. flux  (FLUX.1-dev, 1024 px, batch 1, gradient checkpointing): peft_lora, paca, lora, frozen; the
#            default path is eager there (lora_default / paca_default reuse those numbers, labelled eager)
#   2. sdxl  (SDXL base UNet, 1024 px, batch 2): peft_lora, paca_default, lora_default (CUDA graphs), paca, lora, frozen
#   3. sd3   (SD3.5-medium, 1024 px, batch 2): the same six
#   4. nf4   (FLUX.1-dev with an NF4 base + our LoRA, gradient checkpointing): peak memory and ms/step
# Knobs (environment): BUDGET_S (total seconds, default 400), PYTHON (default python3), TINY=1 (--tiny models
# on the CPU, results in /tmp), EXTRA (more family_step.py flags for every stage, e.g. "--steps 3"), SITE.
# Logs go to $OUT/family_logs (else /tmp/family_logs); the JSON is copied to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-400}
SITE=${SITE:-/tmp/site}
TINY_ARG=${TINY:+--tiny}
# shellcheck disable=SC2206
EXTRA_ARGS=(${EXTRA:-})
if [[ -n "${TINY:-}" ]]; then
    RESULT=/tmp/family_step_tiny.json
    LOGS=${OUT:-/tmp}/family_logs_tiny
else
    RESULT=bench/results/family_step.json
    LOGS=${OUT:-/tmp}/family_logs
fi
export PYTHONUNBUFFERED=1
START=$(date +%s)
mkdir -p "$LOGS" "$(dirname "$RESULT")"

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
# min(cap, time left), never below 1 second
cap() { local l; l=$(left); ((l < $1)) && echo $((l > 1 ? l : 1)) || echo "$1"; }
copy_out() {
    [[ -n "${OUT:-}" && -f "$RESULT" ]] && cp -f "$RESULT" "$OUT/"
    return 0
}
trap copy_out EXIT

if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing carried wheels: $(cd .whl && echo *.whl)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        && export PYTHONPATH=$SITE:$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" - <<'PY'
import importlib
for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # noqa: BLE001
        print(name, "MISSING:", type(error).__name__, error)
PY
} 2>&1 | tee "$LOGS/env.log"

stage() { # stage <name> <cap seconds> <family_step.py args...>
    local name=$1 limit started
    limit=$(cap "$2")
    shift 2
    if (($(left) < 15)); then
        echo "== stage $name skipped: only $(left)s left" | tee -a "$LOGS/env.log"
        return 0
    fi
    echo "== stage $name (cap ${limit}s, $(left)s left): family_step.py $*"
    started=$(date +%s)
    timeout -k 10 "$limit" "$PYTHON" bench/family_step.py $TINY_ARG --out "$RESULT" "$@" "${EXTRA_ARGS[@]}" 2>&1 \
        | tee "$LOGS/$name.log"
    echo "== stage $name: exit ${PIPESTATUS[0]} after $(($(date +%s) - started))s" | tee -a "$LOGS/$name.log"
    copy_out
}

# Stage 0: the CUDA tests this machine can run (the graphed training step and generation with the
# family-generic StepInputs; a --cpu LLM run in a process that touched CUDA first), when pytest is there.
if [[ -z "${TINY:-}" ]] && "$PYTHON" -c "import pytest" 2>/dev/null; then
    echo "== stage 0: CUDA tests (cap $(cap 70)s)"
    timeout -k 5 "$(cap 70)" "$PYTHON" -m pytest -q -p no:cacheprovider tests/pipelines/test_cuda_graphs.py \
        "tests/reliability/test_divergence.py::test_train_llm_with_a_huge_learning_rate_fails_and_writes_nothing_non_finite" \
        2>&1 | tail -25 | tee "$LOGS/cuda_tests.log"
fi
stage flux 150 --families flux --variants frozen,peft_lora,lora,paca,lora_default,paca_default
stage sdxl 85 --append --families sdxl --variants frozen,peft_lora,lora,paca,lora_default,paca_default
stage sd3 70 --append --families sd3 --variants frozen,peft_lora,lora,paca,lora_default,paca_default
stage nf4 $(($(left) - 5)) --append --families flux --variants nf4_lora
copy_out
echo "== done in $(($(date +%s) - START))s; $RESULT"
