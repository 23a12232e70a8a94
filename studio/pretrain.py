"""`studio pretrain-base`: the recipe that makes the embedded base models shipped in assets/
(the recipe itself is pipelines/world/pretrain.py; this is its command line).

Stages (each can run alone with --stages; all are seeded and deterministic given the device;
they run in this order):
  sets    render the novel and auxiliary image sets (PNG + metadata.jsonl) -> assets/sets/<name>/
  lm      fit the tiny Llama on the text world, write its task and probe data -> assets/tiny-lm/
  sd      render the pretraining world, fit the VAE (L1 + MSE + tiny KL), measure the latent scale,
          then fit UNet + CLIP text encoder jointly (epsilon loss, 10% caption dropout for
          classifier-free guidance, EMA weights), save a StableDiffusionPipeline -> assets/tiny-sd/
          and check prompt following with the judge on held-out prompts (if a judge fitted to
          this VAE exists; else the judges stage runs the check)
  judges  render judge pictures, fit the four-head judge CNN on them and on their round trips
          through the tiny SD's VAE (<out>/tiny-sd/vae, or --set judge_vae=FOLDER), so it reads
          what the generator can draw -> assets/judges/; then check prompt following of
          <out>/tiny-sd with it. The judge goes last because it needs the sd stage's VAE: a
          new VAE means the judge must be refit (`--stages judges`).

The shipped weights were made on one H100 with two commands (about 11 minutes together):
    studio pretrain-base --scale full --seed 0 --out assets --device cuda
    studio pretrain-base --scale full-phase2 --stages sd --seed 0 --out assets --device cuda
The shipped judge was then refit to that VAE on a 2-core CPU with a reduced judge recipe (its
training.json says which and why):
    studio pretrain-base --stages judges --out assets --device cpu \
        --set judge_images=20000 --set judge_steps=1000 --set judge_batch=128
Every stage writes a training.json next to its weights with the recipe, the steps actually run,
losses, timings and the device; a stage that hit its time budget (--set sd_max_minutes=...)
says so there, and rerunning with that step count (--set sd_steps=N) reproduces it.
The phase-1 step counts are where its first run's time budget cut the plan (during warm-up, so the
learning-rate schedule is the same as asking for them up front).
`--scale toy` runs the whole recipe in a minute on a CPU (tests use it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

from pipelines.options import option
from pipelines.world.pretrain import SCALES, STAGES, Recipe, pretrain
from studio.errors import UserError
from studio.options import Section
from studio.preflight import device_or_auto_problem, writable_folder


def _stages_problem(value: str) -> str | None:
    """An option check: a non-empty comma-separated list of known stages."""
    stages = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        return f"{'unknown stage(s) ' + ', '.join(unknown) if unknown else 'no stage'}; stages are: {', '.join(STAGES)}"
    return None


@dataclass
class PretrainOptions:
    out: str = option("assets", help="folder receiving tiny-sd/, tiny-lm/, judges/, sets/")
    scale: str = option("full", help="recipe size", choices=lambda: sorted(SCALES))
    seed: int = option(0, help="seed of every stage", min=0, max=2**32 - 1)
    stages: str = option(",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}", check=_stages_problem)
    device: str = option("auto", help="torch device: auto (cuda if available), cuda, cpu", check=device_or_auto_problem)
    workers: int = option(0, help="processes rendering pictures (0: all cores)", min=0)
    set: list[str] = option(
        [], help="override one recipe number, e.g. --set sd_steps=4000 (repeatable)", repeat=True, metavar="KEY=VALUE"
    )


def sections() -> list[Section]:
    return [Section(None, PretrainOptions)]


def run(args: argparse.Namespace) -> int:
    recipe = _resolve_recipe(args)
    writable_folder(args.out, "--out")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    device = _resolve_device(args.device)
    pretrain(recipe, Path(args.out), stages, device, args.workers or multiprocessing.cpu_count())
    return 0


def _resolve_recipe(args: argparse.Namespace) -> Recipe:
    recipe = dataclasses.replace(SCALES[args.scale], seed=args.seed)
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    for assignment in args.set:
        key, _, value = assignment.partition("=")
        if key not in fields or not value:
            raise UserError(f"--set {assignment!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = type(getattr(recipe, key))
        try:
            number = kind(value)
        except ValueError as error:
            raise UserError(f"--set {key}: {value!r} is not a valid {kind.__name__}") from error
        if kind in (int, float) and not (math.isfinite(number) and number >= 0):
            raise UserError(f"--set {key}: {value!r} must be a finite number >= 0")
        recipe = dataclasses.replace(recipe, **{key: number})
    return recipe


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu (with --scale toy)")
    return name


if __name__ == "__main__":  # `python -m studio.pretrain ...` is `studio pretrain-base ...`
    import sys

    from studio.cli import main

    sys.exit(main(["pretrain-base", *sys.argv[1:]]))
