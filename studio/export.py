"""`studio export`: write a trained adapter in the format another library loads.

studio export runs/style-neon --format diffusers --out exports/neon   # pipe.load_lora_weights(...)
studio export runs/style-neon --format peft --out exports/neon-peft  # PeftModel.from_pretrained(unet, ...)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter folder (adapter_config.json) or run folder")
    parser.add_argument(
        "--format", choices=("peft", "diffusers"), default="diffusers", help="target format (default diffusers)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--base",
        default="embedded",
        help="the base model the adapter was trained on (its module shapes are needed), default embedded",
    )
    parser.add_argument("--component", default="unet", help="diffusers: the pipeline component (unet or text_encoder)")


def run(args: argparse.Namespace) -> int:
    from peft_core import load
    from studio.generate import parse_adapter

    folder, _ = parse_adapter(args.adapter)
    from pipelines import load_base

    pipe = load_base(args.base, device="cpu")
    model = getattr(pipe, args.component)
    handle = load(model, folder)
    name = handle.adapter_names[-1]
    options = {"component": args.component} if args.format == "diffusers" else {}
    out = handle.export(Path(args.out), format=args.format, name=name, **options)
    print(f"exported {folder} as {args.format}: {out}")
    return 0
