"""`studio break-for-make`: train a content PLP and a style PLP (break), pair them (make), compose.

With no arguments it runs on the embedded world: content = the novel "moon", style = the novel
"neon", and the shipped auxiliary sets as multi-correspondence partners; it writes the B4M
folder and a grid of the moon in neon style.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pipelines.b4m import BreakForMakeConfig
from pipelines.errors import UserError
from studio.options import add_dataclass_arguments, build_dataclass, dataclass_from_flags, load_yaml
from studio.train_diffusion import ASSETS

SETS = ASSETS / "sets"
B4M_HELP = {
    "rank": "PLP rank r (the paper: 64 on SDXL)",
    "seed": "seed of the frozen bases and every random draw",
    "targets": "UNet modules to adapt",
    "break_steps": "steps of each break run",
    "make_steps": "steps of the make fine-tuning",
    "batch_size": "images per step",
    "main_lr": "learning rate of the main PLP in each break run",
    "partner_lr_ratio": "partner PLP learning rate / main learning rate",
    "make_lr": "learning rate of the make stage",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "content_factor": (
        "PLP factor that learns the content: 'down' (D, the official code) or 'up' (B; the style then trains D)"
    ),
    "riemannian": "make with Riemannian-preconditioned gradients (the TOG version of B4M)",
    "riemannian_delta": "damping delta of the Riemannian preconditioner",
    "centered": "leave out the PLPs' frozen A C block and start D at zero, so training starts from the base model",
    "mcp_loss": "break runs: 'separate' (each factor learns only its own loss) or 'shared' (both learn the main + "
    "partner loss, as the official code's updates do)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--content", default=str(SETS / "content-moon"), help="content image folder (default: embedded moon)"
    )
    parser.add_argument("--style", default=str(SETS / "style-neon"), help="style image folder (default: embedded neon)")
    parser.add_argument(
        "--aux-styles",
        nargs="*",
        default=None,
        help="other style folders the content run pairs with (default: the shipped auxiliary styles)",
    )
    parser.add_argument(
        "--aux-contents",
        nargs="*",
        default=None,
        help="other content folders the style run pairs with (default: the shipped auxiliary contents)",
    )
    parser.add_argument("--prompt", action="append", default=None, help="prompt(s) of the final grid")
    parser.add_argument(
        "--base", default="embedded", help="base model: 'embedded', a hub id, a diffusers folder or a single file"
    )
    parser.add_argument("--config", default=None, help="YAML file with any of these options")
    parser.add_argument("--name", default=None, help="run name (default: b4m-<content>-<style>)")
    parser.add_argument("--runs-dir", default="runs", help="where run folders go")
    parser.add_argument("--device", default=None, help="cpu or cuda")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue an interrupted run: its finished break runs are loaded, the rest trained",
    )
    add_dataclass_arguments(parser.add_argument_group("break-for-make"), BreakForMakeConfig, B4M_HELP)


def auxiliary_folders(kind: str, exclude: Path) -> list[Path]:
    return sorted(
        p
        for p in SETS.glob(f"{kind}-*")
        if p.is_dir() and p.resolve() != exclude.resolve() and p.name not in ("content-moon", "style-neon")
    )


def resolve(args: argparse.Namespace) -> tuple:
    """(config, content folder, style folder, auxiliary styles, auxiliary contents, prompts) of a new run."""
    values = load_yaml(args.config)
    config = dataclass_from_flags(BreakForMakeConfig, values.pop("b4m", {}), args, "the break-for-make options")
    if values:
        raise UserError(f"unknown option(s) in {args.config}: {', '.join(sorted(values))}")
    content_dir, style_dir = Path(args.content), Path(args.style)
    aux_styles = (
        [Path(p) for p in args.aux_styles] if args.aux_styles is not None else auxiliary_folders("style", style_dir)
    )
    aux_contents = (
        [Path(p) for p in args.aux_contents]
        if args.aux_contents is not None
        else auxiliary_folders("content", content_dir)
    )
    prompts = args.prompt or [f"a {content_dir.name.split('-', 1)[-1]} in {style_dir.name.split('-', 1)[-1]} style"] * 4
    return config, content_dir, style_dir, aux_styles, aux_contents, prompts


def run(args: argparse.Namespace) -> int:
    from pipelines import load_base
    from pipelines.b4m import BreakForMakePipeline
    from pipelines.data import ImageCaptionDataset
    from pipelines.train import image_grid, save_image_atomic
    from studio.progress import ProgressPrinter
    from studio.runs import Run

    # 1. Resolve options and validate every folder before writing anything (a resumed run uses its own).
    if args.resume:
        run_folder = Run.open(args.resume)
        if run_folder.info.get("kind") != "break-for-make":
            raise UserError(f"{run_folder.directory} is a {run_folder.info.get('kind')} run, not a break-for-make one")
        record = run_folder.config
        config = build_dataclass(BreakForMakeConfig, dict(record["b4m"]), "the run's config")
        content_dir, style_dir = Path(record["content"]), Path(record["style"])
        aux_styles, aux_contents = [Path(p) for p in record["aux_styles"]], [Path(p) for p in record["aux_contents"]]
        args.base, prompts = record["base"], record["prompts"]
    else:
        config, content_dir, style_dir, aux_styles, aux_contents, prompts = resolve(args)
    pipe = load_base(args.base, device=args.device)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def dataset(folder: Path) -> ImageCaptionDataset:
        return ImageCaptionDataset(folder, resolution=resolution, seed=config.seed)

    content, style = dataset(content_dir), dataset(style_dir)
    partners_style, partners_content = [dataset(p) for p in aux_styles], [dataset(p) for p in aux_contents]

    # 2. Run folder, then break -> make.
    if not args.resume:
        run_folder = Run.create(
            args.runs_dir,
            args.name or f"b4m-{content_dir.name}-{style_dir.name}",
            kind="break-for-make",
            config={
                "content": str(content_dir),
                "style": str(style_dir),
                "aux_styles": [str(p) for p in aux_styles],
                "aux_contents": [str(p) for p in aux_contents],
                "base": args.base,
                "b4m": dataclasses.asdict(config),
                "prompts": prompts,
            },
        )
    else:
        run_folder.update(status="running", error=None)
    print(f"run folder: {run_folder.directory}", flush=True)
    total = 2 * config.break_steps + config.make_steps
    progress = ProgressPrinter(total)
    offsets = {"break-content": 0, "break-style": config.break_steps, "make": 2 * config.break_steps}

    def on_event(event) -> None:
        overall = dataclasses.replace(event, step=offsets[event.kind] + event.step, total_steps=total, kind="step")
        run_folder.log_event({**dataclasses.asdict(overall), "stage": event.kind, "stage_step": event.step})
        progress(overall)

    try:
        b4m = BreakForMakePipeline(pipe, config)
        b4m(content, style, partners_style, partners_content, run_dir=run_folder.directory, on_event=on_event)
    except KeyboardInterrupt:  # Ctrl-C, or a STOP file (StopRequested): the finished break runs are kept
        run_folder.update(status="interrupted")
        print(f"\ninterrupted; resume with: studio break-for-make --resume {run_folder.directory}", file=sys.stderr)
        return 130
    except BaseException as error:
        run_folder.update(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        progress.close()

    # 3. Compose: the grid of content in style.
    images = b4m.generate(prompts, seed=config.seed)
    grid = save_image_atomic(image_grid(images), run_folder.directory / "samples" / "final.png")
    run_folder.update(status="finished", latest_sample=str(grid))
    print(f"break-for-make adapters: {run_folder.directory / 'b4m'}")
    print(f"samples: {grid}")
    return 0
