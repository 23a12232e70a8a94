"""Steps per second of the diffusion training loop with and without caching captions and latents.

    python bench/cache_speed.py            # the embedded tiny SD on this machine -> bench/results/cache_speed.json
    python bench/cache_speed.py --base PATH --resolution 1024 --batch-size 2 --out /tmp/x.json   # any model

What is timed: `pipelines.train.train_adapter` (LoRA r=8 on the UNet's attention, AdamW, batch 4 on the
embedded model's style set at its own resolution, no sample grids, no checkpoints inside the timed steps)
for --steps steps, once plain and once with cache_text_embeddings + cache_latents (every caption and image
encoded once before the first step, the encoders moved to the CPU). Each variant runs --repeats times,
interleaved (plain, cached, plain, ...) so that a machine busy with other work slows both alike; the JSON
keeps every run and the median. Time per step is measured between the first and the last step's events
(the first step pays lazy initialisations in both variants; the cache's one encoding pass comes before it
and is part of wall_s, the whole call). The speed-up is plain time per step / cached time per step, as
measured; the final losses of both are recorded (they agree to float tolerance:
tests/studio/test_families_cli.py checks it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def one_run(args, cached: bool) -> dict:
    from peft_core import LoraConfig
    from pipelines import load_base
    from pipelines.data import ImageCaptionDataset
    from pipelines.train import UNET_ATTENTION_TARGETS, TrainConfig, train_adapter

    pipe = load_base(args.base, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    from pipelines.families import family_of

    resolution = args.resolution or family_of(pipe).default_size(pipe)
    dataset = ImageCaptionDataset(args.data, resolution=resolution, seed=0)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        checkpoint_every=10**6,
        sample_prompts=[],
        cache_text_embeddings=cached,
        cache_latents=cached,
        cuda_graph="off",
    )
    times, losses = [], []
    started = time.perf_counter()

    def on_event(event) -> None:
        if event.kind == "step":
            times.append(time.perf_counter())
            losses.append(event.loss)

    with tempfile.TemporaryDirectory() as run_dir:
        train_adapter(
            pipe, dataset, LoraConfig(targets=UNET_ATTENTION_TARGETS, r=8), config, run_dir, on_event=on_event
        )
    wall = time.perf_counter() - started
    # Steps after the first: the first includes lazy initialisations in both variants.
    per_step = (times[-1] - times[0]) / (len(times) - 1)
    return {
        "cached": cached,
        "wall_s": wall,
        "s_per_step": per_step,
        "steps_per_s": 1 / per_step,
        "final_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="embedded")
    parser.add_argument("--data", default=str(HERE.parent / "assets" / "sets" / "style-neon"))
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=str(HERE / "results" / "cache_speed.json"))
    args = parser.parse_args()
    runs = [one_run(args, cached) for _ in range(args.repeats) for cached in (False, True)]
    plain = statistics.median(r["s_per_step"] for r in runs if not r["cached"])
    cached = statistics.median(r["s_per_step"] for r in runs if r["cached"])
    result = {
        "what": "diffusion training steps/s, plain vs cache_text_embeddings + cache_latents",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "median_s_per_step": {"plain": plain, "cached": cached},
        "speedup": plain / cached,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("median_s_per_step", "speedup")}, indent=2))


if __name__ == "__main__":
    main()
