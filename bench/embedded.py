"""Benchmark of the embedded default models, on CPU: writes bench/results/embedded.json.

    python bench/embedded.py            # about 3 minutes on a 2-core CPU

Measures
  sd_prompt_accuracy   share of held-out prompts (compositions never in pretraining) whose picture
                       the judge reads as the prompt's content AND colour (64 prompts, seed 0 each)
  judge_accuracy       the judge's content accuracy on fresh real renders of the world (all heads
                       are also listed under judge_accuracy_per_head, and for the same renders after
                       a round trip through the tiny SD's VAE under judge_accuracy_per_head_after_vae)
  lm_heldout_ppl       tiny LM perplexity on held-out world text (assets/tiny-lm/data/heldout.txt)
  lm_random_init_ppl   the same for a random-init model of the same config (seed 0)
  cpu_s_per_image      median seconds for one 64x64 picture (batch 1, 20 steps, CFG) on this CPU
and a few extras (knowledge-probe accuracy, set-level judge scores), with the device and date.
Set-level judge scores are given for the shipped pictures and for their VAE round trips (encode ->
latent mean -> decode): every generated picture leaves through that decoder, so a judge that only
reads renders would score generations of a style it cannot see through the VAE as "not that style".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: prove it

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines import load_base, load_embedded_lm  # noqa: E402
from pipelines.base import ASSETS, embedded_lm_data  # noqa: E402
from pipelines.metrics import label_accuracy, load_judge, predict, score, vae_round_trip  # noqa: E402
from pipelines.world import text as text_world  # noqa: E402
from pipelines.world.image import concept_sets, heldout_prompt_scenes, render_stream  # noqa: E402

GUIDANCE = 5.0
STEPS = 20


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sd_prompt_accuracy(pipeline, judge, prompts: int, seed: int) -> dict:
    scenes = heldout_prompt_scenes(prompts)
    pictures = []
    for scene in scenes:  # one picture per prompt, each from the same seed: reruns give the same pictures
        generator = torch.Generator().manual_seed(seed)
        pictures.append(
            pipeline(scene.caption(), num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generator).images[0]
        )
    answers = predict(judge, pictures)
    per_head = {
        head: sum(a[head] == getattr(s, head) for a, s in zip(answers, scenes)) / len(scenes)
        for head in ("content", "colour", "pattern")
    }
    both = sum(a["content"] == s.content and a["colour"] == s.colour for a, s in zip(answers, scenes)) / len(scenes)
    return {
        "sd_prompt_accuracy": round(both, 4),
        "sd_prompt_accuracy_per_head": {k: round(v, 4) for k, v in per_head.items()},
        "sd_prompts": len(scenes),
    }


def cpu_seconds_per_image(pipeline, repeats: int) -> float:
    timings = []
    for index in range(repeats + 1):
        started = time.perf_counter()
        pipeline(
            "a green circle",
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(index),
        )
        timings.append(time.perf_counter() - started)
    return round(statistics.median(timings[1:]), 3)  # the first call pays for one-off set-up


def judge_report(judge, vae) -> dict:
    from PIL import Image

    # A stream seed used neither for training (0) nor for the recipe's own check (10000).
    images, scenes = render_stream("judge", 777, 2000, 64)
    accuracy = label_accuracy(judge, images, scenes)
    accuracy_after_vae = label_accuracy(judge, vae_round_trip(vae, images), scenes)
    # How the judge scores the shipped novel/auxiliary sets with their own labels, as rendered and
    # after the VAE round trip that every generated picture goes through.
    sets, sets_after_vae = {}, {}
    for name, spec in concept_sets().items():
        folder = ASSETS / "sets" / name
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        pictures = np.stack([np.asarray(Image.open(folder / row["file_name"]).convert("RGB")) for row in rows])
        round_trips = vae_round_trip(vae, pictures)
        head = "content" if spec["kind"] == "content" else "style"
        sets[name] = round(float(score(judge, pictures, head, spec["concept"]).mean()), 4)
        sets_after_vae[name] = round(float(score(judge, round_trips, head, spec["concept"]).mean()), 4)
    return {
        "judge_accuracy": round(accuracy["content"], 4),
        "judge_accuracy_per_head": {k: round(v, 4) for k, v in accuracy.items()},
        "judge_accuracy_per_head_after_vae": {k: round(v, 4) for k, v in accuracy_after_vae.items()},
        "judge_mean_score_on_shipped_sets": sets,
        "judge_mean_score_on_shipped_sets_after_vae": sets_after_vae,
    }


def lm_report() -> dict:
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_embedded_lm()
    heldout = embedded_lm_data("heldout.txt").read_text().splitlines()
    probe = [json.loads(line) for line in embedded_lm_data("knowledge_probe.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config)
    return {
        "lm_heldout_ppl": round(text_world.perplexity(model, tokenizer, heldout), 4),
        "lm_random_init_ppl": round(text_world.perplexity(random_model, tokenizer, heldout), 4),
        "lm_knowledge_probe_accuracy": round(text_world.multiple_choice_accuracy(model, tokenizer, probe), 4),
        "lm_parameters": sum(p.numel() for p in model.parameters()),
    }


def assets_megabytes() -> dict:
    sizes = {}
    for folder in sorted(p for p in ASSETS.iterdir() if p.is_dir()):
        sizes[folder.name] = round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6, 2)
    sizes["total"] = round(sum(sizes.values()), 2)
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts to generate (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "embedded.json"))
    args = parser.parse_args()

    started = time.time()
    pipeline = load_base("embedded")
    pipeline.set_progress_bar_config(disable=True)
    judge = load_judge()
    result = {
        "device": f"CPU: {cpu_name()}",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "sampler": f"{type(pipeline.scheduler).__name__}, {STEPS} steps, guidance {GUIDANCE}",
    }
    result.update(sd_prompt_accuracy(pipeline, judge, args.prompts, args.seed))
    result["cpu_s_per_image"] = cpu_seconds_per_image(pipeline, args.timing_repeats)
    result.update(judge_report(judge, pipeline.vae))
    result.update(lm_report())
    result["assets_mb"] = assets_megabytes()
    result["bench_seconds"] = round(time.time() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
