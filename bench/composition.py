"""Content x style composition on the leaky world: oracle, naive sum, ZipLoRA, Break-for-Make (issue 24).

    python bench/composition.py                                   # the protocol below -> bench/results/composition.json
    python bench/composition.py --pairs 1 --seeds 1 --steps 2 --make-steps 1 --zip-steps 1 \
        --pictures 2 --tune-pictures 1 --grid 1.0 --sample-steps 2 --out /tmp/composition.json   # CPU smoke run

The protocol, fixed before any run:
- Pairs: every leaky content (moon, arrow, ring, bolt; each set 16 pictures in the one clay look,
  captioned "a moon") x every leaky style (sketch, tweed, etched; each set 16 pictures of one subject,
  "a heart in sketch style"): 12 pairs never seen in pretraining. Prompt: "a <content> in <style> style".
- Training seeds 0, 1, 2: every adapter is trained once per seed (a content LoRA per content, a style
  LoRA per style, a B4M run per pair), with the same learning rate, batch and targets (the attention
  projections, as the released B4M adapts). Run as one process per (pair, seed) (bench/gpu_composition.sh),
  a pair trains its own two LoRAs with that recipe and seed.
- Equal training compute: B4M's break (S content + S style steps) and make (M steps) is S + S + M
  steps; each LoRA of the naive sum trains S + M/2 steps, so the pair's two LoRAs take the same total.
  ZipLoRA adds its merger steps on top of the naive sum's LoRAs (reported as `extra_steps`).
- Weights: each method's content and style weights are chosen on validation pictures (--tune-pictures
  per setting, >= 16 by default, seeds never scored) from the grid --grid^2, by joint success; the
  oracle has none. Scores then come from --pictures pictures per (pair, seed) on scoring seeds.
- Judges: the trusted judges (assets/trusted-judges: a "none" content, calibrated). Per picture:
  content (its probability of the pair's content), style (of the pair's style), joint success (top
  content and top style both right), leakage = P(the style set's subject or the content set's clay
  look) = p_subject + p_clay - p_subject p_clay.
- The oracle: the renderer's exact picture of the pair, through the VAE (as every generated picture).
- Intervals: a bootstrap that resamples pairs, then seeds within a pair, then pictures within a
  (pair, seed), jointly for the method and the naive sum (paired differences), 2000 draws, 95 %.
- Recommended: the method with the highest joint success whose intervals against the tuned naive
  sum exclude zero upwards on both content and style; else "naive_sum".
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peft_core import LoraConfig, get_handle, load  # noqa: E402
from peft_core.factors import attach_lora_factors  # noqa: E402
from pipelines import load_base  # noqa: E402
from pipelines.b4m import BreakForMakeConfig, BreakForMakePipeline  # noqa: E402
from pipelines.data import ImageCaptionDataset  # noqa: E402
from pipelines.metrics import TRUSTED_JUDGE_DIR, judge_probabilities, load_judge, vae_round_trip  # noqa: E402
from pipelines.train import UNET_ATTENTION_TARGETS, TrainConfig, generate, train_adapter  # noqa: E402
from pipelines.world.image import (  # noqa: E402
    LEAKY_APPEARANCE,
    LEAKY_CONTENTS,
    LEAKY_STYLES,
    LEAKY_SUBJECTS,
    Scene,
    render,
    scene_rng,
    write_concept_set,
)
from pipelines.ziplora import ZipLoraConfig, zip_merge  # noqa: E402

METHODS = ("oracle", "naive_sum", "ziplora", "b4m")
VALIDATION_SEED = 500_000  # validation pictures' seeds start here; scored pictures' seeds below 100_000
SET_SIZE = 16


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def picture_scores(judge, pictures, content: str, style: str) -> dict[str, list[float]]:
    """Per picture: content, style, joint success, leakage (see the module docstring)."""
    probabilities = judge_probabilities(judge, pictures)
    contents, styles = judge.heads["content"], judge.heads["style"]
    p_content = probabilities["content"][:, contents.index(content)]
    p_style = probabilities["style"][:, styles.index(style)]
    top_content = probabilities["content"].argmax(-1) == contents.index(content)
    top_style = probabilities["style"].argmax(-1) == styles.index(style)
    p_subject = probabilities["content"][:, contents.index(LEAKY_SUBJECTS[style])]
    p_clay = probabilities["style"][:, styles.index(LEAKY_APPEARANCE)]
    return {
        "content": p_content.tolist(),
        "style": p_style.tolist(),
        "joint": (top_content & top_style).float().tolist(),
        "leakage": (p_subject + p_clay - p_subject * p_clay).tolist(),
    }


def progress(label: str):
    """An on_event that prints every 100th step of each stage and its last, with the seconds since it was made."""
    began = time.time()

    def show(event) -> None:
        if event.step % 100 == 0 or event.step == event.total_steps:
            print(f"{label} {event.kind} {event.step}/{event.total_steps} at {time.time() - began:.0f} s", flush=True)

    return show


def draw(pipe, content: str, style: str, count: int, first_seed: int, steps: int) -> list:
    return generate(pipe, [f"a {content} in {style} style"] * count, seed=first_seed, steps=steps)


def tune(pipe, judge, set_weights, content: str, style: str, args, seed: int) -> dict:
    """The (content, style) weights of the grid with the best joint success on validation pictures
    (ties: the higher content + style probability); sets them and returns the table."""
    table = []
    for content_weight, style_weight in itertools.product(args.grid, args.grid):
        set_weights(content_weight, style_weight)
        first = VALIDATION_SEED + 1000 * seed
        scores = picture_scores(
            judge, draw(pipe, content, style, args.tune_pictures, first, args.sample_steps), content, style
        )
        table.append(
            {
                "content_weight": content_weight,
                "style_weight": style_weight,
                **{key: round(float(np.mean(values)), 4) for key, values in scores.items()},
            }
        )
    best = max(table, key=lambda row: (row["joint"], row["content"] + row["style"]))
    set_weights(best["content_weight"], best["style_weight"])
    return {"content_weight": best["content_weight"], "style_weight": best["style_weight"], "validation": table}


# ---------------------------------------------------------------------------------------------
# One training seed: every adapter, then every pair's methods
# ---------------------------------------------------------------------------------------------


def leaky_data(folder: Path, resolution: int, seed: int) -> dict[str, ImageCaptionDataset]:
    sets = {}
    for kind, concepts in (("content", LEAKY_CONTENTS), ("style", LEAKY_STYLES)):
        for concept in concepts:
            name = f"leaky-{kind}-{concept}"
            write_concept_set(folder / name, name, SET_SIZE, seed=0, size=resolution)
            sets[concept] = ImageCaptionDataset(folder / name, resolution=resolution, seed=seed)
    return sets


def train_loras(args, sets, seed: int, scratch: Path, concepts: set[str]) -> dict[str, Path]:
    """A LoRA per content and style of `concepts` (S + M/2 steps each): the naive sum's and ZipLoRA's."""
    lora = LoraConfig(targets=list(UNET_ATTENTION_TARGETS), r=args.rank, alpha=float(args.rank))
    config = TrainConfig(
        steps=args.steps + args.make_steps // 2,
        batch_size=args.batch_size,
        seed=seed,
        checkpoint_every=10**9,
        learning_rate=args.lr,
    )
    folders = {}
    for concept in sorted(concepts):
        dataset = sets[concept]
        pipe = load_base("embedded", device=args.device)
        run = scratch / f"lora-{concept}"
        train_adapter(pipe, dataset, lora, config, run, adapter_name="lora")
        folders[concept] = run / "adapter" / "lora"
    return folders


def run_seed(args, judge, seed: int, pairs: list[tuple[str, str]], scratch: Path, done=lambda rows: None) -> list[dict]:
    """Every method on every pair for one training seed; `done(rows so far)` after each pair."""
    pipe = load_base("embedded", device=args.device)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    sets = leaky_data(scratch / "sets", resolution, seed)
    clock = time.time()
    loras = train_loras(args, sets, seed, scratch, {concept for pair in pairs for concept in pair})
    print(f"[seed {seed}] LoRAs of {len(loras)} concepts trained in {time.time() - clock:.0f} s", flush=True)
    results = []
    for content, style in pairs:
        print(f"[seed {seed}] {content} x {style}", flush=True)
        scores, weights, seconds = {}, {}, {}
        clock = time.time()
        first = 1000 * seed
        # oracle: the renderer's exact picture of the pair, through the VAE like every generated one
        oracle = np.stack(
            [
                np.asarray(render(Scene(content, "", "", "", style), resolution, scene_rng(77_000 + seed, i)))
                for i in range(args.pictures)
            ]
        )
        scores["oracle"] = picture_scores(judge, vae_round_trip(pipe.vae, oracle), content, style)

        # naive sum: the two LoRAs at tuned weights
        pipe = load_base("embedded", device=args.device)
        load(pipe.unet, loras[content], name="content")
        load(pipe.unet, loras[style], name="style")
        handle = get_handle(pipe.unet)

        def set_sum(content_weight: float, style_weight: float, handle=handle) -> None:
            handle.set_weight("content", content_weight)
            handle.set_weight("style", style_weight)

        weights["naive_sum"] = tune(pipe, judge, set_sum, content, style, args, seed)
        images = draw(pipe, content, style, args.pictures, first, args.sample_steps)
        scores["naive_sum"] = picture_scores(judge, images, content, style)
        seconds["naive_sum"], clock = round(time.time() - clock, 1), time.time()
        print(f"[seed {seed}] {content} x {style}: naive_sum done in {seconds['naive_sum']} s", flush=True)

        # ZipLoRA: the same two LoRAs merged (at weights 1), then its two parts weighted like the sum's
        set_sum(1.0, 1.0)
        mergers, log = zip_merge(
            pipe,
            "content",
            "style",
            sets[content],
            sets[style],
            ZipLoraConfig(zip_steps=args.zip_steps, zip_seed=seed),
        )
        handle.remove("content")
        handle.remove("style")
        content_part, style_part = mergers.side_factors("content"), mergers.side_factors("style")
        attach_lora_factors(pipe.unet, content_part, name="content")
        attach_lora_factors(pipe.unet, style_part, name="style")
        weights["ziplora"] = tune(pipe, judge, set_sum, content, style, args, seed)
        weights["ziplora"]["merge_log"] = [log[0], log[-1]]
        images = draw(pipe, content, style, args.pictures, first, args.sample_steps)
        scores["ziplora"] = picture_scores(judge, images, content, style)
        seconds["ziplora"], clock = round(time.time() - clock, 1), time.time()
        print(f"[seed {seed}] {content} x {style}: ziplora done in {seconds['ziplora']} s", flush=True)

        # Break-for-Make as released (its defaults), partners: the other leaky sets
        pipe = load_base("embedded", device=args.device)
        b4m = BreakForMakePipeline(
            pipe,
            BreakForMakeConfig(
                rank=2 * args.rank,
                break_steps=args.steps,
                make_steps=args.make_steps,
                batch_size=args.batch_size,
                seed=seed,
                main_lr=args.lr,
                make_lr=args.lr,
            ),
        )
        b4m(
            sets[content],
            sets[style],
            aux_styles=[sets[s] for s in LEAKY_STYLES if s != style],
            aux_contents=[sets[c] for c in LEAKY_CONTENTS if c != content],
            on_event=progress(f"[seed {seed}] {content} x {style}: b4m"),
        )
        weights["b4m"] = tune(pipe, judge, b4m.set_mix, content, style, args, seed)
        images = draw(pipe, content, style, args.pictures, first, args.sample_steps)
        scores["b4m"] = picture_scores(judge, images, content, style)
        seconds["b4m"] = round(time.time() - clock, 1)
        results.append(
            {"content": content, "style": style, "seed": seed, "scores": scores, "weights": weights, "seconds": seconds}
        )
        done(results)
        print(json.dumps({m: {k: round(float(np.mean(v)), 3) for k, v in s.items()} for m, s in scores.items()}))
        print(f"[seed {seed}] {content} x {style} seconds (tuning + pictures included): {seconds}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# Summary: means and the hierarchical bootstrap
# ---------------------------------------------------------------------------------------------


def means(rows: list[dict]) -> dict:
    return {
        method: {
            key: round(float(np.mean([np.mean(r["scores"][method][key]) for r in rows])), 4)
            for key in ("content", "style", "joint", "leakage")
        }
        for method in METHODS
    }


def bootstrap_vs_naive(rows: list[dict], method: str, key: str, draws: int = 2000, seed: int = 0) -> list[float]:
    """95 % interval of mean(method) - mean(naive_sum): pairs, then seeds within each drawn pair, then
    pictures within each drawn (pair, seed) resampled (every pair has the same seeds and picture count)."""
    rng = np.random.default_rng(seed)
    pairs = sorted({(r["content"], r["style"]) for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    cell = {(r["content"], r["style"], r["seed"]): r["scores"] for r in rows}

    def cube(name: str) -> np.ndarray:  # (pairs, seeds, pictures)
        return np.asarray([[cell[(*pair, s)][name][key] for s in seeds] for pair in pairs], dtype=np.float64)

    ours, theirs = cube(method), cube("naive_sum")
    n_pairs, n_seeds, n_pictures = ours.shape
    pair = rng.integers(n_pairs, size=(draws, n_pairs))[:, :, None, None]
    seed_index = rng.integers(n_seeds, size=(draws, n_pairs, n_seeds))[:, :, :, None]
    ours_pick = rng.integers(n_pictures, size=(draws, n_pairs, n_seeds, n_pictures))
    theirs_pick = rng.integers(n_pictures, size=(draws, n_pairs, n_seeds, n_pictures))
    differences = ours[pair, seed_index, ours_pick].mean((1, 2, 3)) - theirs[pair, seed_index, theirs_pick].mean(
        (1, 2, 3)
    )
    low, high = np.quantile(differences, [0.025, 0.975])
    return [round(float(low), 4), round(float(high), 4)]


def summarize(rows: list[dict]) -> dict:
    mean = means(rows)
    intervals = {
        method: {key: bootstrap_vs_naive(rows, method, key) for key in ("content", "style", "joint", "leakage")}
        for method in ("ziplora", "b4m", "oracle")
    }
    naive, oracle = mean["naive_sum"], mean["oracle"]
    headroom = {
        "naive_sum_leakage": naive["leakage"],
        "oracle_minus_naive_content": round(oracle["content"] - naive["content"], 4),
        "oracle_minus_naive_style": round(oracle["style"] - naive["style"], 4),
    }
    headroom["shown"] = bool(
        naive["leakage"] >= 0.3
        or headroom["oracle_minus_naive_content"] >= 0.3
        or headroom["oracle_minus_naive_style"] >= 0.3
    )
    winners = [m for m in ("ziplora", "b4m") if intervals[m]["content"][0] > 0 and intervals[m]["style"][0] > 0]
    recommended = max(winners, key=lambda m: mean[m]["joint"]) if winners else "naive_sum"
    return {"mean": mean, "ci_vs_naive": intervals, "headroom": headroom, "recommended": recommended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=len(LEAKY_CONTENTS) * len(LEAKY_STYLES))
    parser.add_argument("--first-pair", type=int, default=0, help="to split the pairs over processes")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="to split the seeds over several calls")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="only combine earlier runs' rows into --out")
    parser.add_argument("--steps", type=int, default=300, help="S: steps of each B4M break run")
    parser.add_argument("--make-steps", type=int, default=300, help="M: B4M make steps (the released default)")
    parser.add_argument("--zip-steps", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (B4M's PLPs: twice it, parameter-matched)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--pictures", type=int, default=32, help="scored pictures per (pair, seed)")
    parser.add_argument("--tune-pictures", type=int, default=16, help="validation pictures per weight setting")
    parser.add_argument("--grid", type=float, nargs="+", default=[0.5, 1.0, 1.5], help="weights tried per side")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--judge", default=str(TRUSTED_JUDGE_DIR))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "composition.json"))
    args = parser.parse_args()
    if args.merge:
        reports = [json.loads(Path(path).read_text()) for path in args.merge]
        split = {"first_seed": 0, "seeds": 0, "first_pair": 0, "pairs": 0}  # how a run was split, not what it ran
        if any(r["settings"] | split != reports[0]["settings"] | split for r in reports):
            raise SystemExit("--merge: the runs used different settings")
        rows = [row for r in reports for row in r["rows"]]
        cells = {(row["content"], row["style"], row["seed"]) for row in rows}
        pairs, seeds = {cell[:2] for cell in cells}, {cell[2] for cell in cells}
        missing = sorted(
            f"{c} x {s} seed {seed}" for (c, s), seed in itertools.product(pairs, seeds) if (c, s, seed) not in cells
        )
        if missing:  # the bootstrap pairs every pair with every seed
            raise SystemExit(
                f"--merge: {len(missing)} (pair, seed) cells missing ({', '.join(missing[:4])}, ...); "
                "merge only the seeds that finished every pair"
            )
        reports[0]["pairs"] = sorted({f"{row['content']} x {row['style']}" for row in rows})
        merged = {**reports[0], **summarize(rows), "rows": rows, "wall_s": sum(r["wall_s"] for r in reports)}
        merged["seeds_done"] = len({row["seed"] for row in rows})
        Path(args.out).write_text(json.dumps(merged, indent=1) + "\n")
        print(json.dumps({k: merged[k] for k in ("mean", "ci_vs_naive", "headroom", "recommended")}, indent=1))
        return
    judge = load_judge(args.judge, device=args.device)
    pairs = list(itertools.product(LEAKY_CONTENTS, LEAKY_STYLES))[args.first_pair : args.first_pair + args.pairs]
    started, rows = time.time(), []

    def write(new_rows: list[dict]) -> None:  # after every pair: a run cut short keeps what it measured
        report = {
            "protocol": __doc__.split("The protocol, fixed before any run:")[1].strip(),
            "pairs": [f"{c} x {s}" for c, s in pairs],
            "seeds_done": len({row["seed"] for row in rows + new_rows}),
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "compute_steps": {
                "naive_sum": 2 * (args.steps + args.make_steps // 2),
                "ziplora": 2 * (args.steps + args.make_steps // 2),
                "ziplora_extra_steps": args.zip_steps,
                "b4m": 2 * args.steps + args.make_steps,
            },
            **summarize(rows + new_rows),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "wall_s": round(time.time() - started, 1),
            "rows": rows + new_rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    for seed in range(args.first_seed, args.first_seed + args.seeds):
        with tempfile.TemporaryDirectory() as scratch:
            rows += run_seed(args, judge, seed, pairs, Path(scratch), write)
    print(json.dumps({k: v for k, v in summarize(rows).items()}, indent=1))


if __name__ == "__main__":
    main()
