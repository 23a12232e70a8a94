"""Can the trusted judges be trusted on generated pictures? (issue 24, part 2)

    python bench/judges.py                                   # assets/trusted-judges -> bench/results/judges.json
    python bench/judges.py --judge /tmp/tj/trusted-judges --renders 64 --seeds 1 --out /tmp/judges.json

Four checks of one judge (`studio pretrain-base --stages trusted-judges`):
1. renders: per-head accuracy on a held-out stream of the trusted world and on its VAE round trips;
2. calibration: expected calibration error of each head on those round trips, at temperature 1 and
   at the fitted temperatures (fitted on another stream, `calibrate_temperatures`);
3. shapeless: fresh noise pictures and decoded random latents; how many the judge calls "none";
4. generated: the embedded SD draws held-out flat prompts ("a red star on a dotted blue background",
   never in its training captions) over several seeds. A picture's label is *certain* when a check
   that learns nothing agrees with the prompt: the pixels nearer the prompt's object colour than its
   background colours are the drawn shape, and of every content's outline (over a grid of places,
   sizes and tilts) the prompt's overlaps it best (IoU >= --iou, ahead of every other content's best
   by --margin). The judge's top answer is scored on the certain pictures only; how many were
   certain is reported. Main number: joint accuracy (content and style both right).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipelines.metrics import (  # noqa: E402
    TRUSTED_JUDGE_DIR,
    expected_calibration_error,
    head_logits,
    label_accuracy,
    load_judge,
    predict,
    scene_targets,
    shapeless_pictures,
    vae_round_trip,
)
from pipelines.world.image import (  # noqa: E402
    ALL_CONTENTS,
    COLOURS,
    FLAT_STYLE,
    NONE_CONTENT,
    background_tones,
    heldout_prompt_scenes,
    render_stream,
    shape_mask,
)

# The template grid of the certainty check: the renderer's ranges of place, size and tilt.
PLACES = np.linspace(0.38, 0.62, 7)
RADII = np.linspace(0.24, 0.32, 3)
TILTS = np.linspace(-0.35, 0.35, 5)


def templates(size: int) -> dict[str, np.ndarray]:
    """{content: (K, size, size) bool masks} over the grid."""
    grid = list(itertools.product(PLACES, PLACES, RADII, TILTS))
    return {c: np.stack([shape_mask(c, size, x, y, r, a) > 0.5 for x, y, r, a in grid]) for c in ALL_CONTENTS}


def certain_label(picture: np.ndarray, scene, shapes: dict[str, np.ndarray], iou: float, margin: float):
    """(the prompt's content if the outline check confirms it else None, the best IoU per content)."""
    pixels = picture.astype(np.float32)
    object_distance = np.linalg.norm(pixels - np.asarray(COLOURS[scene.colour], np.float32), axis=-1)
    ground_distance = np.min(
        [np.linalg.norm(pixels - tone, axis=-1) for tone in background_tones(scene.background)], axis=0
    )
    drawn = object_distance < ground_distance
    best = {}
    for content, masks in shapes.items():
        overlap = (masks & drawn).sum((1, 2))
        union = (masks | drawn).sum((1, 2))
        best[content] = float((overlap / np.maximum(union, 1)).max())
    others = max(v for c, v in best.items() if c != scene.content)
    confirmed = best[scene.content] >= iou and best[scene.content] - others >= margin
    return (scene.content if confirmed else None), best


def calibration(judge, pictures, scenes) -> dict:
    logits = head_logits(judge, pictures)
    targets = scene_targets(scenes, judge.heads)
    report = {}
    for head in ("content", "style"):
        known = targets[head] >= 0
        before = expected_calibration_error(logits[head][known].softmax(-1), targets[head][known])
        scaled = (logits[head][known] / judge.temperatures[head]).softmax(-1)
        report[head] = {
            "temperature": judge.temperatures[head],
            "ece_at_t1": round(before, 4),
            "ece_calibrated": round(expected_calibration_error(scaled, targets[head][known]), 4),
        }
    return report


def generated_check(judge, args) -> dict:
    from pipelines import load_base
    from pipelines.train import generate

    pipe = load_base("embedded", device=args.device)
    scenes = heldout_prompt_scenes(args.prompts)
    shapes = templates(64)
    rows = []
    for seed in range(args.seeds):
        images = generate(pipe, [s.caption() for s in scenes], seed=1000 * seed, steps=args.steps)
        pictures = np.stack([np.asarray(image.convert("RGB").resize((64, 64))) for image in images])
        answers = predict(judge, pictures)
        for scene, picture, answer in zip(scenes, pictures, answers, strict=True):
            label, best = certain_label(picture, scene, shapes, args.iou, args.margin)
            rows.append(
                {
                    "prompt": scene.caption(),
                    "seed": 1000 * seed,
                    "label": scene.content,
                    "certain": label is not None,
                    "content": answer["content"],
                    "style": answer["style"],
                    "prompt_iou": round(best[scene.content], 3),
                }
            )
    certain = [r for r in rows if r["certain"]]
    content_right = [r["content"] == r["label"] for r in certain]
    style_right = [r["style"] == FLAT_STYLE for r in certain]
    joint = [c and s for c, s in zip(content_right, style_right)]
    by_label = {}
    for label in sorted({r["label"] for r in rows}):
        mine = [r for r in rows if r["label"] == label]
        sure = [r for r in mine if r["certain"]]
        by_label[label] = {
            "pictures": len(mine),
            "certain": len(sure),
            "content_accuracy": round(float(np.mean([r["content"] == label for r in sure])), 4) if sure else None,
        }
    return {
        "pictures": len(rows),
        "certain": len(certain),
        "content_accuracy": round(float(np.mean(content_right)), 4) if certain else None,
        "style_accuracy": round(float(np.mean(style_right)), 4) if certain else None,
        "joint_accuracy": round(float(np.mean(joint)), 4) if certain else None,
        "uncertain_answered_none": round(
            float(np.mean([r["content"] == NONE_CONTENT for r in rows if not r["certain"]] or [0.0])), 4
        ),
        "by_label": by_label,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge", default=str(TRUSTED_JUDGE_DIR))
    parser.add_argument("--renders", type=int, default=1000, help="held-out renders (and their round trips)")
    parser.add_argument("--shapeless", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=64, help="held-out flat prompts")
    parser.add_argument("--seeds", type=int, default=4, help="pictures per prompt")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per picture")
    parser.add_argument("--iou", type=float, default=0.6)
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "judges.json"))
    args = parser.parse_args()
    started = time.time()
    judge = load_judge(args.judge)
    from pipelines import load_base

    vae = load_base("embedded", device="cpu").vae
    pictures, scenes = render_stream("trusted-judge", 30_000, args.renders, 64)
    trips = vae_round_trip(vae, pictures)
    shapeless = shapeless_pictures(args.shapeless, 64, seed=40_000, vae=vae)
    none_rate = float(np.mean([a["content"] == NONE_CONTENT for a in predict(judge, shapeless)]))
    result = {
        "judge": str(args.judge),
        "renders": {"count": args.renders, "accuracy": label_accuracy(judge, pictures, scenes)},
        "vae_round_trips": {"count": args.renders, "accuracy": label_accuracy(judge, trips, scenes)},
        "calibration_on_round_trips": calibration(judge, trips, scenes),
        "shapeless": {"count": args.shapeless, "answered_none": round(none_rate, 4)},
        "generated": generated_check(judge, args),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds": round(time.time() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result["generated"].items() if k != "rows"}
    print(json.dumps({**{k: v for k, v in result.items() if k != "generated"}, "generated": summary}, indent=1))


if __name__ == "__main__":
    main()
