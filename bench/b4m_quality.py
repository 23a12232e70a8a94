"""Break-for-Make vs a naive LoRA sum vs one joint LoRA, judged on the embedded world.

    python bench/b4m_quality.py                       # GPU if present; a few minutes on an H100
    python bench/b4m_quality.py --steps 20 --pairs 1  # quick CPU smoke run

For each (content, style) pair never seen in pretraining, at equal training steps per method:
- b4m:        content PLP + style PLP (break, with the other shipped sets as partners), then make; at
              rank --b4m-rank, by default 2 x --rank: parameter-matched, since a PLP trains half of
              each factor (the joint adapter trains r (in + out) / 2 parameters, a LoRA r (in + out));
- naive_sum:  a content LoRA and a style LoRA trained separately, both applied at weight 1;
- joint_lora: one LoRA trained on the content and the style images together.
Each method draws "a <content> in <style> style" (content and style fidelity: the shipped judges'
probabilities of that content and that style) and "a <other shape> in <style> style" (prompt
fidelity: the probability of the other shape, i.e. the style did not drag the content along).
With --tune-weights, B4M and the naive sum are each scored at their own best composition weights
(content, style), chosen on validation seeds the scoring never uses (`tune_mix`); the scores at
weights (1, 1) are kept beside them.
Writes bench/results/b4m_quality.json and one PNG grid per pair (rows: methods). Per-picture scores
are kept, and "b4m_minus_naive_sum_ci95" bootstraps them into a 95% interval of the mean difference
(generation and judging noise only: each method is trained once per pair).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peft_core import LoraConfig, get_handle, load, make_joint  # noqa: E402
from pipelines import load_base  # noqa: E402
from pipelines.b4m import BreakForMakeConfig, BreakForMakePipeline  # noqa: E402
from pipelines.data import ImageCaptionDataset  # noqa: E402
from pipelines.metrics import content_score, load_judge, style_score  # noqa: E402
from pipelines.train import UNET_ATTENTION_TARGETS, TrainConfig, generate, image_grid, train_adapter  # noqa: E402

# Every linear layer of the UNet's transformer blocks (PLP adapts nn.Linear only, so all three
# methods get the same layers): attention and feed-forward (proj_in/out are 1x1 convs in SD 1.x).
TARGETS = [*UNET_ATTENTION_TARGETS, "ff.net.0.proj", "ff.net.2"]

SETS = REPO / "assets" / "sets"
PAIRS = [("moon", "neon"), ("arrow", "pixel"), ("ring", "blueprint"), ("bolt", "watercolor")]
OTHER_SHAPE = "star"  # a pretraining shape, for prompt fidelity


def datasets(content: str, style: str, resolution: int, seed: int):
    def make(name: str) -> ImageCaptionDataset:
        return ImageCaptionDataset(SETS / name, resolution=resolution, seed=seed)

    aux_styles = [make(p.name) for p in sorted(SETS.glob("style-*")) if p.name != f"style-{style}"]
    aux_contents = [make(p.name) for p in sorted(SETS.glob("content-*")) if p.name != f"content-{content}"]
    return make(f"content-{content}"), make(f"style-{style}"), aux_styles, aux_contents


def judge_images(judge, images, content: str, style: str) -> dict[str, list[float]]:
    """Per picture: the judge's probability of `content` and of `style`."""
    return {
        "content": content_score(judge, images, content).tolist(),
        "style": style_score(judge, images, style).tolist(),
    }


def evaluate(pipe, judge, content: str, style: str, samples: int, seed: int, steps: int) -> tuple[dict, list]:
    """Mean scores, and the per-picture ones (`per_image`) the confidence intervals resample."""
    pair_images = generate(pipe, [f"a {content} in {style} style"] * samples, seed=seed, steps=steps)
    other_images = generate(pipe, [f"a {OTHER_SHAPE} in {style} style"] * samples, seed=seed, steps=steps)
    scores, other = (
        judge_images(judge, pair_images, content, style),
        judge_images(judge, other_images, OTHER_SHAPE, style),
    )
    per_image = {
        "content": scores["content"],
        "style": scores["style"],
        "prompt": other["content"],
        "prompt_style": other["style"],
    }
    return {
        **{key: sum(values) / len(values) for key, values in per_image.items()},
        "per_image": per_image,
    }, pair_images


WEIGHT_GRID = (0.75, 1.0, 1.25, 1.5)
VALIDATION_SEED = 10_000  # added to --seed: the pictures that choose the weights are never the scored ones


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def tune_mix(pipe, judge, content: str, style: str, set_mix, args) -> dict:
    """A method at its own best composition weights: every (content, style) weight pair of WEIGHT_GRID
    draws "a <content> in <style> style" on validation seeds, and the pair with the highest harmonic
    mean of content and style fidelity is set (what a user does with the two sliders, done the same
    way for every method). Returns the choice and the validation table."""
    table = []
    for content_weight in WEIGHT_GRID:
        for style_weight in WEIGHT_GRID:
            set_mix(content_weight, style_weight)
            images = generate(
                pipe,
                [f"a {content} in {style} style"] * args.tune_samples,
                seed=args.seed + VALIDATION_SEED,
                steps=args.sample_steps,
            )
            scores = judge_images(judge, images, content, style)
            c, s = (sum(scores[k]) / len(scores[k]) for k in ("content", "style"))
            table.append(
                {
                    "content_weight": content_weight,
                    "style_weight": style_weight,
                    "content": round(c, 4),
                    "style": round(s, 4),
                    "harmonic_mean": round(harmonic_mean(c, s), 4),
                }
            )
    best = max(table, key=lambda row: row["harmonic_mean"])
    set_mix(best["content_weight"], best["style_weight"])
    return {"content_weight": best["content_weight"], "style_weight": best["style_weight"], "validation": table}


def bootstrap_difference(
    pairs: list[dict], method: str, baseline: str, key: str, draws: int = 2000, seed: int = 0
) -> list[float] | None:
    """95% interval of mean(method) - mean(baseline) over the pairs, resampling each pair's pictures
    (the sampling noise of generation and judging; each method is one training run per pair, so
    training-seed noise is not in it). None where per-picture scores are missing (older reports)."""
    if any("per_image" not in p["scores"].get(m, {}) for p in pairs for m in (method, baseline)):
        return None
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(draws, dtype=torch.float64)
    for pair in pairs:
        for sign, name in ((1.0, method), (-1.0, baseline)):
            values = torch.tensor(pair["scores"][name]["per_image"][key], dtype=torch.float64)
            picks = torch.randint(0, len(values), (draws, len(values)), generator=generator)
            total += sign * values[picks].mean(dim=1)
    total /= len(pairs)
    low, high = torch.quantile(total, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [round(low, 4), round(high, 4)]


def run_pair(args, content: str, style: str, device: str, judge, reused: dict | None = None) -> dict:
    """Scores (and grid rows) of every method on one pair; `reused` = an earlier run's entry for
    this pair whose baseline scores are taken as they are (their grid rows are then not redrawn)."""
    scores, rows, mixes = {}, [], {}
    total = 2 * args.steps + args.make_steps
    lora = LoraConfig(targets=TARGETS, r=args.rank, alpha=float(args.rank))
    with tempfile.TemporaryDirectory() as scratch:
        # (a) Break-for-Make
        pipe = load_base("embedded", device=device)
        resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        content_set, style_set, aux_styles, aux_contents = datasets(content, style, resolution, args.seed)
        b4m = BreakForMakePipeline(
            pipe,
            BreakForMakeConfig(
                rank=args.b4m_rank,
                break_steps=args.steps,
                make_steps=args.make_steps,
                batch_size=args.batch_size,
                seed=args.seed,
                targets=TARGETS,
                main_lr=args.lr,
                make_lr=args.lr,
                content_factor=args.content_factor,
                riemannian=args.riemannian,
                centered=args.centered,
                mcp_loss=args.mcp_loss,
            ),
        )
        b4m(content_set, style_set, aux_styles, aux_contents)
        b4m.set_mix(1.0, 1.0)
        if args.tune_weights:
            scores["b4m_unit_weights"], _ = evaluate(
                pipe, judge, content, style, args.samples, args.seed, args.sample_steps
            )
            mixes["b4m"] = tune_mix(pipe, judge, content, style, b4m.set_mix, args)
        scores["b4m"], images = evaluate(pipe, judge, content, style, args.samples, args.seed, args.sample_steps)
        rows.append(images)
        # Diagnostic: the break adapters paired without the make fine-tuning (spec section 7's zero-shot
        # pairing), to see what make adds or takes away.
        make_joint(b4m.handle, name="zero_shot", content_factor=args.content_factor)
        b4m.set_mix(1.0, 1.0, adapter="zero_shot")
        scores["b4m_zero_shot"], images = evaluate(
            pipe, judge, content, style, args.samples, args.seed, args.sample_steps
        )
        rows.append(images)

        if reused is not None:  # same settings, same seeds: the baselines of an earlier run
            scores.update({m: v for m, v in reused["scores"].items() if not m.startswith("b4m")})
        else:
            # (b) naive sum: two LoRAs trained separately at the same total steps, both at weight 1
            per_adapter = TrainConfig(
                steps=total // 2,
                batch_size=args.batch_size,
                seed=args.seed,
                checkpoint_every=10**9,
                learning_rate=args.lr,
            )
            folders = {}
            for kind, dataset in (("content", content_set), ("style", style_set)):
                pipe = load_base("embedded", device=device)
                train_adapter(pipe, dataset, lora, per_adapter, Path(scratch) / kind, adapter_name=kind)
                folders[kind] = Path(scratch) / kind / "adapter" / kind
            pipe = load_base("embedded", device=device)
            for kind, folder in folders.items():
                load(pipe.unet, folder, name=kind)
            if args.tune_weights:
                scores["naive_sum_unit_weights"], _ = evaluate(
                    pipe, judge, content, style, args.samples, args.seed, args.sample_steps
                )
                handle = get_handle(pipe.unet)

                def set_sum_mix(content_weight: float, style_weight: float) -> None:
                    handle.set_weight("content", content_weight)
                    handle.set_weight("style", style_weight)

                mixes["naive_sum"] = tune_mix(pipe, judge, content, style, set_sum_mix, args)
            scores["naive_sum"], images = evaluate(
                pipe, judge, content, style, args.samples, args.seed, args.sample_steps
            )
            rows.append(images)

            # (c) one LoRA on both sets together
            if args.no_joint_lora:
                scores["joint_lora"] = None
            else:
                pipe = load_base("embedded", device=device)
                both = torch.utils.data.ConcatDataset([content_set, style_set])
                train_adapter(
                    pipe,
                    both,
                    lora,
                    TrainConfig(
                        steps=total,
                        batch_size=args.batch_size,
                        seed=args.seed,
                        checkpoint_every=10**9,
                        learning_rate=args.lr,
                    ),
                    Path(scratch) / "joint",
                    adapter_name="joint",
                )
                scores["joint_lora"], images = evaluate(
                    pipe, judge, content, style, args.samples, args.seed, args.sample_steps
                )
                rows.append(images)

    grid = image_grid([image for row in rows for image in row], columns=args.samples)
    path = Path(args.out).parent / f"b4m_quality_{content}_{style}.png"
    grid.save(path)
    result = {"content": content, "style": style, "scores": scores}
    if mixes:
        result["mix"] = mixes
    return {**result, "grid": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="break steps of each PLP run")
    parser.add_argument("--make-steps", type=int, default=100)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the naive sum and the joint LoRA")
    parser.add_argument(
        "--b4m-rank", type=int, default=None, help="PLP rank of B4M (default: 2 x --rank, parameter-matched)"
    )
    parser.add_argument(
        "--reuse-baselines",
        default=None,
        metavar="JSON",
        help="take naive_sum and joint_lora from an earlier report with the same settings; train only B4M",
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of every method (B4M partners: 1/10)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3, help="how many (content, style) pairs, from the list above")
    parser.add_argument(
        "--first-pair", type=int, default=0, help="index of the first pair (to split a run over processes)"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="only combine the pairs of earlier runs (same settings) into --out",
    )
    parser.add_argument("--samples", type=int, default=8, help="images per prompt")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--content-factor",
        choices=("down", "up"),
        default="down",
        help="B4M: the PLP factor that learns the content (down: the official code's choice)",
    )
    parser.add_argument(
        "--riemannian", action="store_true", help="B4M: Riemannian-preconditioned make (the TOG version)"
    )
    parser.add_argument("--centered", action="store_true", help="B4M: centered PLPs (no frozen A C block, D from zero)")
    parser.add_argument(
        "--mcp-loss",
        choices=("shared", "separate"),
        default="separate",
        help="B4M break runs: each factor learns only its own loss (separate) or both learn main + "
        "partner loss (shared, the official code's effective update)",
    )
    parser.add_argument(
        "--tune-weights",
        action="store_true",
        help="score B4M and the naive sum each at its own best composition weights, chosen from "
        f"{WEIGHT_GRID}^2 on validation seeds by the harmonic mean of content and style fidelity "
        "(the scores at weights 1, 1 are kept as <method>_unit_weights)",
    )
    parser.add_argument("--tune-samples", type=int, default=4, help="--tune-weights: validation images per weight pair")
    parser.add_argument("--no-joint-lora", action="store_true", help="skip the single joint LoRA baseline (c)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "b4m_quality.json"))
    args = parser.parse_args()
    args.b4m_rank = args.b4m_rank or 2 * args.rank
    if args.tune_weights and args.reuse_baselines:
        parser.error(
            "--tune-weights retrains the naive sum (an earlier report keeps its scores, not its adapters); "
            "drop --reuse-baselines"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    if args.merge:
        reports = [json.loads(Path(path).read_text()) for path in args.merge]
        settings = {key: reports[0].get(key) for key in SETTINGS}
        if any({key: r.get(key) for key in settings} != settings for r in reports):
            raise SystemExit("--merge: the runs used different settings")
        combined = {
            **reports[0],
            "pairs": [p for r in reports for p in r["pairs"]],
            "wall_s": sum(r["wall_s"] for r in reports),
        }
        Path(args.out).write_text(json.dumps({**combined, **summarize(combined["pairs"])}, indent=2) + "\n")
        return
    earlier = {}
    if args.reuse_baselines:
        report = json.loads(Path(args.reuse_baselines).read_text())
        # The baselines depend on the total steps only, not on how B4M splits them between break and make.
        mine = {
            "total_per_method": 2 * args.steps + args.make_steps,
            "rank": args.rank,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "samples_per_prompt": args.samples,
            "seed": args.seed,
        }
        theirs = {**report, "total_per_method": report.get("steps", {}).get("total_per_method")}
        if any(theirs.get(key) != value for key, value in mine.items()):
            raise SystemExit(f"--reuse-baselines: {args.reuse_baselines} used other settings than this run")
        earlier = {(p["content"], p["style"]): p for p in report["pairs"]}
    judge = load_judge(device=args.device)
    started = time.time()
    pairs = []
    for content, style in PAIRS[args.first_pair : args.first_pair + args.pairs]:
        print(f"[pair] {content} x {style}", flush=True)
        reused = earlier.get((content, style)) if args.reuse_baselines else None
        if args.reuse_baselines and reused is None:
            raise SystemExit(f"--reuse-baselines: no {content} x {style} pair in {args.reuse_baselines}")
        pairs.append(run_pair(args, content, style, args.device, judge, reused))
        if reused is not None:
            pairs[-1]["baselines_from"] = args.reuse_baselines
        print(
            json.dumps(
                {
                    m: scores and {k: v for k, v in scores.items() if k != "per_image"}
                    for m, scores in pairs[-1]["scores"].items()
                }
            ),
            flush=True,
        )
        write_report(args, pairs, started)  # after every pair, so a cut-off run keeps what it measured


SETTINGS = (
    "steps",
    "rank",
    "b4m_rank",
    "lr",
    "batch_size",
    "samples_per_prompt",
    "seed",
    "content_factor",
    "riemannian",
    "centered",
    "mcp_loss",
    "tune_weights",
)


def summarize(pairs: list[dict]) -> dict:
    methods = list(pairs[0]["scores"])
    mean = {
        m: None
        if any(p["scores"][m] is None for p in pairs)
        else {k: sum(p["scores"][m][k] for p in pairs) / len(pairs) for k in ("content", "style", "prompt")}
        for m in methods
    }
    return {
        "mean": mean,
        "b4m_beats_naive_sum": {k: mean["b4m"][k] > mean["naive_sum"][k] for k in ("content", "style")},
        "b4m_minus_naive_sum_ci95": {
            k: bootstrap_difference(pairs, "b4m", "naive_sum", k) for k in ("content", "style", "prompt")
        },
    }


def write_report(args, pairs: list[dict], started: float) -> None:
    summary = summarize(pairs)
    report = {
        "steps": {"break": args.steps, "make": args.make_steps, "total_per_method": 2 * args.steps + args.make_steps},
        "rank": args.rank,
        "b4m_rank": args.b4m_rank,
        "content_factor": args.content_factor,
        "riemannian": args.riemannian,
        "centered": args.centered,
        "mcp_loss": args.mcp_loss,
        "tune_weights": args.tune_weights,
        "lr": args.lr,
        "targets": TARGETS,
        "batch_size": args.batch_size,
        "samples_per_prompt": args.samples,
        "seed": args.seed,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "wall_s": round(time.time() - started, 1),
        "pairs": pairs,
        **summary,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary["mean"], indent=2), flush=True)


if __name__ == "__main__":
    main()
