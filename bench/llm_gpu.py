"""`studio train-llm` on one GPU at Llama scale: tokens/s and peak memory of LoRA and PaCA.

    python bench/llm_gpu.py          # GPU: random bf16 Llama ~1.1B, seq 2048 -> bench/results/llm_gpu.json
    python bench/llm_gpu.py --tiny   # CPU smoke test of the same path (tiny Llama), -> /tmp

What runs is the real trainer through the real launcher, exactly what a multi-GPU run would use:

    accelerate launch --num_processes 1 -m studio.cli train-llm DATA --base MODEL --config CONFIG.yaml --method M

with one YAML config (bf16 base weights, bf16 autocast, packing to seq_len, batch 1, AdamW) shared by every
method and by any process count (`--num_processes 8` changes nothing else). The model is a
`LlamaForCausalLM` built from a TinyLlama-1.1B-shaped config (hidden 2048, intermediate 5632, 22 layers,
32 heads, 4 KV heads, vocab 32000) with random N(0, 0.02) bf16 weights, saved to a temporary folder with
the embedded word-level tokenizer (its ids are a subset of the vocabulary); the data is random text of
the tokenizer's words, packed into seq_len blocks. LoRA r=8 alpha=16 and PaCA r=16 alpha=32 (parameter-
matched) on every linear layer.

Measured from the run folder: tokens/s = tokens per optimizer step (batch x seq_len x processes) over the
median wall time between consecutive step events after --warmup steps; peak_gib = the trainer's
torch.cuda.max_memory_allocated over training. Output: {"device", "model", "seq_len", "results": {"lora":
{"tokens_per_s", "peak_gib"}, "paca": {...}}} plus the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _common import REPO_ROOT, format_table, log, repo_on_path, write_json

repo_on_path()

MODELS = {
    "llama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    ),
}
METHOD_FLAGS = {
    "lora": ["--method", "lora", "--rank", "8", "--alpha", "16"],
    "paca": ["--method", "paca", "--rank", "16", "--alpha", "32"],
}


def build_model(name: str, folder: Path, dtype: str) -> int:
    """A random-weight Llama saved with the embedded tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipelines.base import EMBEDDED_LM

    tokenizer = AutoTokenizer.from_pretrained(str(EMBEDDED_LM))
    config = LlamaConfig(
        **MODELS[name],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def write_data(path: Path, seq_len: int, steps: int, batch: int, processes: int) -> None:
    """Random sentences of the tokenizer's words, enough to pack (steps x batch x processes + 8) blocks."""
    from pipelines.world.text import vocabulary

    words = [w for w in vocabulary() if not w.startswith("<")]
    rng = random.Random(0)
    needed = (steps * batch * processes + 8) * seq_len
    with open(path, "w") as file:
        while needed > 0:
            row = " ".join(rng.choice(words) for _ in range(200))
            file.write(json.dumps({"text": row}) + "\n")
            needed -= 202


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny Llama, seq 64, 4 steps, fp32")
    parser.add_argument("--methods", default="lora,paca")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    tiny = args.tiny
    model_name = "tiny" if tiny else "llama-1.1b"
    seq_len = args.seq_len or (64 if tiny else 2048)
    steps = args.steps or (4 if tiny else 30)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 5)
    out = Path(args.out or ("/tmp/llm_gpu_tiny.json" if tiny else REPO_ROOT / "bench" / "results" / "llm_gpu.json"))
    dtype = "float32" if tiny else "bfloat16"

    import torch

    work = Path(tempfile.mkdtemp(prefix="llm_gpu_"))
    params = build_model(model_name, work / "model", dtype)
    write_data(work / "data.jsonl", seq_len, steps, args.batch, args.num_processes)
    config = {
        "train": {
            "steps": steps,
            "batch_size": args.batch,
            "max_length": seq_len,
            "packing": True,
            "base_dtype": dtype,
            "mixed_precision": "no" if tiny else "bf16",
            "learning_rate": 1e-4,
            "warmup_steps": 0,
            "lr_schedule": "constant",
            "checkpoint_every": 10**9,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "cpu": tiny,
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    device = "cpu" if tiny else torch.cuda.get_device_name(0)
    output = {
        "device": device,
        "model": f"{model_name} (LlamaForCausalLM, random {dtype}, {params / 1e9:.3f} B parameters)",
        "seq_len": seq_len,
        "results": {},
        "batch": args.batch,
        "num_processes": args.num_processes,
        "steps": steps,
        "warmup_steps": warmup,
        "config": config,
        "torch": torch.__version__,
    }
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(args.num_processes),
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--mixed_precision",
        config["train"]["mixed_precision"],
    ]
    if args.num_processes > 1:
        launcher.append("--multi_gpu")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    for method in args.methods.split(","):
        runs = work / f"runs-{method}"
        command = [
            *launcher,
            "-m",
            "studio.cli",
            "train-llm",
            str(work / "data.jsonl"),
            "--base",
            str(work / "model"),
            "--config",
            str(work / "config.yaml"),
            "--runs-dir",
            str(runs),
            *METHOD_FLAGS[method],
        ]
        log(f"[{method}] {' '.join(command[1:])}")
        child = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"[{method}] failed:\n{child.stderr[-4000:]}")
        run_dir = next(runs.iterdir())
        events = [json.loads(line) for line in (run_dir / "logs" / "events.jsonl").read_text().splitlines()]
        times = [e["time"] for e in events if e["kind"] == "step"]
        step_s = statistics.median(b - a for a, b in zip(times[warmup:], times[warmup + 1 :]))
        info = json.loads((run_dir / "run.json").read_text())
        tokens_per_step = args.batch * seq_len * args.num_processes
        output["results"][method] = {
            "tokens_per_s": round(tokens_per_step / step_s, 1),
            "peak_gib": info.get("peak_gib"),
            "s_per_step": round(step_s, 4),
            "trainable_params": info.get("trainable_params"),
            "final_loss": info.get("loss"),
        }
        log(f"[{method}] {output['results'][method]}")
        write_json(out, output)
    log(
        format_table(
            ["method", "tokens/s", "peak GiB", "s/step"],
            [[m, r["tokens_per_s"], r["peak_gib"], r["s_per_step"]] for m, r in output["results"].items()],
        )
    )
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
