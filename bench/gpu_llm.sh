#!/usr/bin/env bash
# The LLM-side GPU benchmarks in one device call (about 7-8 minutes on one H100); each writes its
# JSON under bench/results/. A script that fails or runs past its limit is reported and the others
# still run. Needs bitsandbytes (loram_memory's NF4 base) on the machine.
set -u
cd "$(dirname "$0")/.."
run() {
    local limit=$1
    shift
    echo "=== $* (limit ${limit}s)"
    local started=$SECONDS
    timeout "$limit" python "$@"
    echo "=== exit $? after $((SECONDS - started))s: $*"
}
run 240 bench/llm_step.py --steps 20 --warmup 5 \
    --variants frozen,peft_lora,lora,paca,frozen_graphed,peft_lora_graphed,lora_graphed,paca_graphed
run 150 bench/loram_memory.py --steps 6 --warmup 2
run 150 bench/llm_gpu.py
run 90 bench/attn_backward.py
