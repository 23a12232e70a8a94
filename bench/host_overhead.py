"""Host (Python + dispatch) cost of one training step, per method, on a model too small to compute much.

    python bench/host_overhead.py          # CPU, one thread: -> bench/results/host_overhead.json

On a GPU, a layer's Python and launch work runs ahead of its kernels; where the kernels are short
(small projections, the SD 1.5 UNet at batch 8, see sd_step.py), the host sets the pace, and the
eager ratios of llm_step.py / sd_step.py move with it. This bench measures that host work alone:
a 32-layer Llama of width 64 at 8 tokens on one CPU thread, where the arithmetic is negligible, so
the step time is (almost) all framework and adapter overhead. Variants as in llm_step.py: the
frozen floor (gradient to the input embeddings only), our LoRA r=4, PaCA r=4 (resident columns,
optimizer tracked) and PLP r=4 on all seven projections, AdamW (foreach). Variants run in
interleaved rounds so a busy moment of the machine hits them alike; per variant the median step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from _common import REPO_ROOT, format_table, log, random_llama, repo_on_path, write_json

repo_on_path()

from peft_core import LoraConfig, PacaConfig, PlpConfig, attach  # noqa: E402

CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "lora": LoraConfig(targets=TARGETS, r=4, alpha=8),
    "paca": PacaConfig(targets=TARGETS, r=4, alpha=8),
    "plp": PlpConfig(targets=TARGETS, r=4),
}


def make_step(variant: str):
    model = random_llama(CONFIG, torch.device("cpu"), torch.float32, 0)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, CONFIG["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(2))
    if variant == "frozen":
        model.requires_grad_(False)
        embed = model.get_input_embeddings()

        def step() -> None:
            inputs = embed(ids).detach().requires_grad_(True)
            model(inputs_embeds=inputs, labels=labels, use_cache=False).loss.backward()

        return step
    handle = attach(model, METHODS[variant])
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-4, foreach=True)
    handle.track_optimizer(optimizer)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "host_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = ["frozen", "lora", "paca", "plp"]
    steps = {v: make_step(v) for v in variants}
    for step in steps.values():  # warm-up: lazy inits, first column writes
        for _ in range(5):
            step()
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant, step in steps.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[variant].append((time.perf_counter() - start) * 1e3)
    frozen = statistics.median(times["frozen"])
    results = {
        v: {
            "ms_per_step": round(statistics.median(t), 3),
            "ms_min": round(min(t), 3),
            "overhead_over_frozen_ms": round(statistics.median(t) - frozen, 3),
        }
        for v, t in times.items()
    }
    report = {
        "device": f"cpu ({platform.processor() or platform.machine()}), 1 thread",
        "torch": torch.__version__,
        "model": "llama 32 layers x width 64, 8 tokens",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "results": results,
    }
    write_json(args.out, report)
    log(
        format_table(
            ["variant", "ms/step", "min", "over frozen"],
            [[v, r["ms_per_step"], r["ms_min"], r["overhead_over_frozen_ms"]] for v, r in results.items()],
        )
    )
    log(f"-> {args.out}")


if __name__ == "__main__":
    main()
