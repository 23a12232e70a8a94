"""`studio train-style` and `studio train-content`: train an adapter on a folder of images.

With no arguments, `studio train-style` is the embedded demo: it trains a style adapter on the
shipped novel "neon" style set (never seen in pretraining), then draws the world's shapes in that
style and writes a sample grid, on a CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pipelines.errors import UserError
from pipelines.train import UNET_ATTENTION_TARGETS, TrainConfig
from studio.options import (
    add_dataclass_arguments,
    add_method_arguments,
    build_dataclass,
    dataclass_from_flags,
    load_yaml,
    method_config,
)

ASSETS = Path(__file__).resolve().parent.parent / "assets"

# Attention alone is too little capacity to change a rendering style on the tiny UNet (measured: after
# 300 steps only the background changed); adding the transformer blocks' projections and feed-forward
# and the ResNet convolutions learns dark backgrounds with glowing strokes in 600 CPU steps (~2.5 min).
DEFAULT_TARGETS = [*UNET_ATTENTION_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
DEFAULT_LEARNING_RATE = 3e-3

TRAIN_HELP = {
    "steps": "optimizer steps",
    "batch_size": "images per step (per process)",
    "learning_rate": "AdamW learning rate (PaCA often wants a different one than LoRA: sweep it)",
    "lr_schedule": "constant, cosine or linear decay after warm-up",
    "warmup_steps": "linear warm-up steps",
    "gradient_accumulation": "micro-batches per optimizer step",
    "mixed_precision": "no, fp16 or bf16 (GPU)",
    "gradient_checkpointing": "trade compute for activation memory",
    "optimizer": "adamw, or adamw8bit (bitsandbytes, CUDA)",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "seed": "seed of every random draw (same seed, same run)",
    "checkpoint_every": "write a resumable checkpoint every N steps",
    "sample_every": "write a sample grid every N steps (0: only at the end)",
    "sample_prompts": "prompts of the sample grids",
    "sample_steps": "denoising steps of the sample grids",
    "sample_guidance": "classifier-free guidance of the sample grids",
    "train_text_encoder": "also adapt the text encoder's attention projections",
    "cuda_graph": "auto | on | off: replay each training step from a CUDA graph (one CUDA GPU, adamw, no fp16, "
    "no accumulation or checkpointing; auto falls back to eager where it cannot)",
}

# What each kind trains on by default (the embedded demo) and how its prompts look.
KINDS = {
    "style": {
        "data": ASSETS / "sets" / "style-neon",
        "samples": ["a star in neon style", "a heart in neon style", "a circle in neon style", "a cross in neon style"],
        "steps": 600,
    },
    "content": {
        "data": ASSETS / "sets" / "content-moon",
        "samples": ["a moon", "a red moon", "a blue moon on a striped green background", "a yellow moon"],
        "steps": 600,
    },
}


def add_arguments(parser: argparse.ArgumentParser, kind: str = "style") -> None:
    defaults = KINDS[kind]
    parser.add_argument(
        "data",
        nargs="?",
        default=None,
        help=f"folder of images with captions (sidecar .txt or metadata.jsonl); default: {defaults['data']}",
    )
    parser.add_argument(
        "--base",
        default="embedded",
        help="base model: 'embedded' (the shipped tiny SD), a hub id, a diffusers folder or a .safetensors file",
    )
    parser.add_argument("--config", default=None, help="YAML file with any of these options (flags win over it)")
    parser.add_argument("--name", default=None, help=f"run name (default: {kind}-<data folder name>)")
    parser.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs)")
    parser.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint"
    )
    parser.add_argument("--template", default=None, help="prompt template, e.g. 'a photo of {trigger} {caption}'")
    parser.add_argument("--trigger", default=None, help="trigger word the template uses")
    parser.add_argument("--resolution", type=int, default=None, help="training resolution (default: the base model's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_method_arguments(parser, default_method="lora")
    add_dataclass_arguments(
        parser.add_argument_group("training"),
        TrainConfig,
        TRAIN_HELP,
        defaults={
            "steps": defaults["steps"],
            "learning_rate": DEFAULT_LEARNING_RATE,
            "sample_prompts": defaults["samples"],
        },
    )
    parser.set_defaults(kind=kind)


def resolve(args: argparse.Namespace) -> dict:
    """Everything the run needs, from YAML < flags, validated before anything is written."""
    values = load_yaml(args.config)
    kind = KINDS[args.kind]
    train_values = {
        "steps": kind["steps"],
        "learning_rate": DEFAULT_LEARNING_RATE,
        "sample_prompts": kind["samples"],
        **values.pop("train", {}),
    }
    train = dataclass_from_flags(TrainConfig, train_values, args, "the training options")
    train.check()
    adapter = method_config(args, values.pop("adapter", {}), "lora", DEFAULT_TARGETS, defaults={"r": 16, "alpha": 16.0})
    data = Path(args.data or values.pop("data", None) or kind["data"])
    options = {
        key: getattr(args, key) if getattr(args, key) is not None else values.pop(key, None)
        for key in ("base", "template", "trigger", "resolution", "device")
    }
    for key in ("name", "runs_dir"):
        values.pop(key, None)
    if values:
        raise UserError(f"unknown option(s) in {args.config}: {', '.join(sorted(values))}")
    return {"data": data, "train": train, "adapter": adapter, **options}


def from_record(record: dict) -> dict:
    """The settings of a run folder's config.yaml (for --resume)."""
    from peft_core import config_from_dict

    return {
        "data": Path(record["data"]),
        "train": build_dataclass(TrainConfig, dict(record["train"]), "the run's config"),
        "adapter": config_from_dict(record["adapter"]),
        "device": None,
        **{key: record.get(key) for key in ("base", "template", "trigger", "resolution")},
    }


def check_adapter_fits(model, config) -> None:
    """Attach `config` to `model` and take it off again: its errors (no module matches the targets, a
    rank larger than a layer) surface here, before anything is written, instead of in a half-made run."""
    from peft_core import attach

    attach(model, config, name="_fits_check").remove("_fits_check")


def run(args: argparse.Namespace) -> int:
    from pipelines import load_base
    from pipelines.data import ImageCaptionDataset, validate_image_folder
    from pipelines.train import train_adapter
    from studio.progress import ProgressPrinter
    from studio.runs import Run

    # 1. Resolve and validate everything before writing anything (a resumed run uses its own config).
    if args.resume:
        run_folder = Run.open(args.resume)
        settings = from_record(run_folder.config)
    else:
        settings = resolve(args)
    if settings["data"] == KINDS[args.kind]["data"] and not settings["data"].is_dir():
        raise UserError(
            f"the embedded demo set {settings['data']} is missing; run `studio pretrain-base` or pass a folder"
        )
    validate_image_folder(
        settings["data"], template=settings["template"], trigger=settings["trigger"]
    )  # fail before loading
    pipe = load_base(settings["base"] or "embedded", device=settings["device"])
    check_adapter_fits(pipe.unet, settings["adapter"])  # missing targets, rank > layer: before the run folder exists
    resolution = settings["resolution"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    dataset = ImageCaptionDataset(
        settings["data"],
        resolution=resolution,
        template=settings["template"],
        trigger=settings["trigger"],
        seed=settings["train"].seed,
    )

    # 2. The run folder.
    config_record = {
        "data": str(settings["data"]),
        "base": settings["base"],
        "resolution": resolution,
        "template": settings["template"],
        "trigger": settings["trigger"],
        "adapter": settings["adapter"].to_dict(),
        "train": dataclasses.asdict(settings["train"]),
    }
    if not args.resume:
        data_name = settings["data"].name
        name = args.name or (data_name if data_name.startswith(args.kind) else f"{args.kind}-{data_name}")
        run_folder = Run.create(args.runs_dir, name, kind=f"train-{args.kind}", config=config_record)
    print(f"run folder: {run_folder.directory}", flush=True)

    # 3. Train.
    progress = ProgressPrinter(settings["train"].steps)
    try:
        train_adapter(
            pipe,
            dataset,
            settings["adapter"],
            settings["train"],
            run_folder.directory,
            adapter_name=args.kind,
            on_event=lambda event: (run_folder.log_event(event), progress(event)),
        )
    except KeyboardInterrupt:
        run_folder.update(status="interrupted")
        print(f"\ninterrupted; resume with: studio train-{args.kind} --resume {run_folder.directory}", file=sys.stderr)
        return 130
    except BaseException as error:
        run_folder.update(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        progress.close()
    run_folder.update(status="finished")
    print(f"adapter: {run_folder.directory / 'adapter' / args.kind}")
    print(f"samples: {run_folder.directory / 'samples' / 'final.png'}")
    return 0
