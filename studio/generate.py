"""`studio generate` and `studio compose`: images from a base model plus any adapters, with weights.

    studio generate --prompt "a star in neon style" --adapter runs/style-neon
    studio compose --content runs/content-moon --style runs/style-neon --prompt "a moon in neon style"
    studio compose --b4m runs/b4m-moon-neon --prompt "a moon in neon style" --style-weight 1.2

An adapter argument is an adapter folder (adapter_config.json), a run folder (its final
adapter), optionally followed by ":WEIGHT".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.errors import UserError


def add_arguments(parser: argparse.ArgumentParser, mode: str = "generate") -> None:
    parser.add_argument(
        "--base", default="embedded", help="base model: 'embedded', a hub id, a diffusers folder or a single file"
    )
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several images)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--out", default=None, help="output PNG (a grid when there are several prompts)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--merge", action="store_true", help="merge the adapters into the weights before sampling (faster)"
    )
    if mode == "generate":
        parser.add_argument(
            "--adapter",
            action="append",
            default=[],
            metavar="PATH[:WEIGHT]",
            help="adapter or run folder, with an optional weight (repeat to compose several)",
        )
    else:
        parser.add_argument("--content", default=None, metavar="PATH[:WEIGHT]", help="content adapter or run folder")
        parser.add_argument("--style", default=None, metavar="PATH[:WEIGHT]", help="style adapter or run folder")
        parser.add_argument("--b4m", default=None, metavar="DIR", help="a Break-for-Make folder (its joint adapter)")
        parser.add_argument("--content-weight", type=float, default=1.0, help="B4M: weight of the content factor")
        parser.add_argument("--style-weight", type=float, default=1.0, help="B4M: weight of the style factor")
    parser.set_defaults(mode=mode)


def parse_adapter(argument: str) -> tuple[Path, float]:
    """'path[:weight]' -> (adapter folder, weight); a run folder resolves to its final adapter."""
    path, weight = argument, 1.0
    head, separator, tail = argument.rpartition(":")
    if separator and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            path = argument
    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        return folder, weight
    finals = sorted((folder / "adapter").glob("*/adapter_config.json")) if (folder / "adapter").is_dir() else []
    if len(finals) == 1:
        return finals[0].parent, weight
    if not folder.exists():
        raise UserError(f"adapter {path!r} does not exist; pass an adapter folder or a run folder")
    raise UserError(f"{path!r} holds no single adapter (adapter_config.json, or a run folder with adapter/<name>/)")


def run(args: argparse.Namespace) -> int:
    from peft_core import get_handle, load
    from pipelines import load_base
    from pipelines.b4m import BreakForMakePipeline
    from pipelines.train import generate, image_grid, save_image_atomic

    pipe = load_base(args.base, device=args.device)
    if args.mode == "compose" and args.b4m:
        b4m = BreakForMakePipeline.from_pretrained(
            pipe, Path(args.b4m) / "b4m" if (Path(args.b4m) / "b4m").is_dir() else args.b4m
        )
        b4m.set_mix(args.content_weight, args.style_weight)
        label = f"b4m(content={args.content_weight}, style={args.style_weight})"
    else:
        arguments = args.adapter if args.mode == "generate" else [a for a in (args.content, args.style) if a]
        if args.mode == "compose" and not arguments:
            raise UserError("compose needs --content and/or --style adapters, or --b4m")
        for index, argument in enumerate(arguments):
            folder, weight = parse_adapter(argument)
            load(pipe.unet, folder, name=f"adapter_{index}", weight=weight)
        if args.merge and arguments:
            get_handle(pipe.unet).merge()
        label = ", ".join(arguments) or "base model"
    images = generate(pipe, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, size=args.size)
    out = Path(args.out or f"{args.mode}.png")
    save_image_atomic(image_grid(images) if len(images) > 1 else images[0], out)
    print(f"{len(images)} image(s) with {label}: {out}")
    return 0
