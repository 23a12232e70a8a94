"""`studio break-for-make`: train a content PLP and a style PLP (break), pair them (make), compose.

With no arguments it runs on the embedded world: content = the novel "moon", style = the novel
"neon", and the shipped auxiliary sets as multi-correspondence partners; it writes the B4M
folder and a grid of the moon in neon style.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipelines.b4m import BreakForMakeConfig, upgrade_config
from pipelines.base import ASSETS
from pipelines.errors import UserError
from pipelines.families import base_option, family_of, family_option, family_override, resolution_option
from pipelines.options import build, option
from studio.options import Section, resume_flags
from studio.preflight import device_problem, run_record, writable_folder

SETS = ASSETS / "sets"


@dataclass
class B4mRunOptions:
    """The image sets, the base model and where the run goes (top-level keys of the YAML)."""

    content: str = option(str(SETS / "content-moon"), help="content image folder (default: embedded moon)", ui=False)
    style: str = option(str(SETS / "style-neon"), help="style image folder (default: the embedded neon)", ui=False)
    aux_styles: list[str] | None = option(
        None, help="other style folders the content run pairs with (default: the shipped auxiliary styles)", ui=False
    )
    aux_contents: list[str] | None = option(
        None, help="other content folders the style run pairs with (default: the shipped auxiliary contents)", ui=False
    )
    prompt: list[str] | None = option(None, help="prompt(s) of the final grid", repeat=True)
    base: str = base_option(ui=False)
    family: str = family_option()
    resolution: int | None = resolution_option("training and grid", ui=False)
    name: str | None = option(None, help="run name (default: b4m-<content>-<style>)", ui=False)
    runs_dir: str = option("runs", help="where run folders go", ui=False)
    device: str | None = option(None, help="cpu or cuda (default: cuda if available)", ui=False, check=device_problem)
    resume: str | None = option(
        None,
        help="continue an interrupted run: its finished break runs are loaded, the rest trained",
        metavar="RUN_DIR",
        ui=False,
    )


# What --resume may change (this start only); any other flag is refused by name: the stages' settings stay.
RESUME_FLAGS = {None: ("device",)}


def sections() -> list[Section]:
    return [Section(None, B4mRunOptions), Section("b4m", BreakForMakeConfig, title="break-for-make")]


def auxiliary_folders(kind: str, exclude: Path) -> list[Path]:
    return sorted(
        p
        for p in SETS.glob(f"{kind}-*")
        if p.is_dir() and p.resolve() != exclude.resolve() and p.name not in ("content-moon", "style-neon")
    )


def resolve(args: argparse.Namespace) -> tuple:
    """(config, content folder, style folder, auxiliary styles, auxiliary contents, prompts) of a new run."""
    config = args.options["b4m"]
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


def from_record(record: dict) -> tuple:
    """((base, family, resolution), (config, content, style, auxiliary styles, auxiliary contents, prompts))
    of a run's config.yaml."""
    # A run recorded before the released behaviour became the default resumes with what it started with.
    config = build(BreakForMakeConfig, upgrade_config(record["b4m"]), "the run's config")
    aux_styles, aux_contents = [Path(p) for p in record["aux_styles"]], [Path(p) for p in record["aux_contents"]]
    folders = (Path(record["content"]), Path(record["style"]), aux_styles, aux_contents)
    base = (str(record["base"]), record.get("family"), record.get("resolution"))
    return base, (config, *folders, list(record["prompts"]))


def run(args: argparse.Namespace) -> int:
    from peft_core import PlpConfig, check_fits
    from pipelines import load_base
    from pipelines.b4m import BreakForMakePipeline
    from pipelines.data import ImageCaptionDataset
    from pipelines.train import image_grid, save_image_atomic
    from studio.progress import ProgressPrinter
    from studio.runs import Run, safe_run_name

    # 1. Resolve options and validate every folder before writing anything (a resumed run uses its own).
    if args.resume:
        run_folder = Run.open(args.resume)
        if run_folder.info.get("kind") != "break-for-make":
            raise UserError(f"{run_folder.directory} is a {run_folder.info.get('kind')} run, not a break-for-make one")
        resume_flags(args, sections(), RESUME_FLAGS)  # any flag but --device is refused (--device: args.device)
        run_folder.acquire()  # one writer at a time: a second one is refused here, before anything loads
        (
            (args.base, args.family, args.resolution),
            (config, content_dir, style_dir, aux_styles, aux_contents, prompts),
        ) = run_record(run_folder, "break-for-make", from_record)
    else:
        config, content_dir, style_dir, aux_styles, aux_contents, prompts = resolve(args)
        writable_folder(args.runs_dir, "--runs-dir")
        safe_run_name(args.name or f"b4m-{content_dir.name}-{style_dir.name}")
    pipe = load_base(args.base, device=args.device, family=family_override(args.family))
    family = family_of(pipe)
    # targets, rank: before the run folder
    check_fits(family.denoiser(pipe), PlpConfig(targets=config.targets, r=config.rank))
    resolution = args.resolution or family.default_size(pipe)
    family.check_size(pipe, resolution, "--resolution")

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
                "family": family.name,
                "resolution": resolution,
                "b4m": dataclasses.asdict(config),
                "prompts": prompts,
            },
        )
    print(f"run folder: {run_folder.directory}", flush=True)
    total = 2 * config.break_steps + config.make_steps
    progress = ProgressPrinter(total)
    offsets = {"break-content": 0, "break-style": config.break_steps, "make": 2 * config.break_steps}

    def on_event(event) -> None:
        if event.kind not in offsets:  # a "message" (a divergence warning): logged and printed as it is
            run_folder.log_event(event)
            progress(event)
            return
        overall = dataclasses.replace(event, step=offsets[event.kind] + event.step, total_steps=total, kind="step")
        run_folder.log_event({**dataclasses.asdict(overall), "stage": event.kind, "stage_step": event.step})
        progress(overall)

    # Ctrl-C, or a STOP file (StopRequested), keeps the finished break runs; a resume starts the stage in progress.
    resume_command = f"studio break-for-make --resume {run_folder.directory}"
    with run_folder.lifecycle(resume_command) as outcome, contextlib.closing(progress):
        b4m = BreakForMakePipeline(pipe, config)
        b4m(content, style, partners_style, partners_content, run_dir=run_folder.directory, on_event=on_event)
    if outcome.interrupted:
        return outcome.exit_code

    # 3. Compose: the grid of content in style.
    images = b4m.generate(prompts, seed=config.seed, size=resolution)
    grid = save_image_atomic(image_grid(images), run_folder.directory / "samples" / "final.png")
    run_folder.update(status="finished", latest_sample=str(grid))
    print(f"break-for-make adapters: {run_folder.directory / 'b4m'}")
    print(f"samples: {grid}")
    return 0
