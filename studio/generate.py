"""`studio generate` and `studio compose`: images from a base model plus any adapters, with weights.

    studio generate --prompt "a star in neon style" --adapter runs/style-neon
    studio compose --content runs/content-moon --style runs/style-neon --prompt "a moon in neon style"
    studio compose --b4m runs/b4m-moon-neon --prompt "a moon in neon style" --style-weight 1.2
    studio compose --content runs/content-moon --style runs/style-neon --combine ziplora \
        --save-merged runs/zip-moon-neon --prompt "a moon in neon style"

An adapter argument is an adapter folder (adapter_config.json), a run folder (its final
adapter), optionally followed by ":WEIGHT".
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.base import base_dtype_option, torch_dtype
from pipelines.errors import UserError
from pipelines.families import base_option, family_of, family_option, family_override
from pipelines.options import option
from pipelines.ziplora import ZipLoraConfig
from studio.options import Section
from studio.preflight import device_problem, output_file

COMBINE_METHODS = ("sum", "ziplora")


@dataclass
class GenerateOptions:
    """What every generation takes: base model, prompts, sampler settings, output."""

    base: str | None = base_option(from_runs=True)
    family: str = family_option()
    base_dtype: str = base_dtype_option()
    prompt: list[str] = option([], help="a prompt (repeat for several images)", repeat=True)
    seed: int = option(0, help="seed of the first image; image i uses seed + i", min=0, max=2**32 - 1)
    steps: int = option(20, help="denoising steps", min=1, max=1000)
    guidance: float = option(5.0, help="classifier-free guidance scale", min=0)
    size: int | None = option(
        None,
        help="image side in pixels, a multiple of 8 (16 for SD3 and Flux; default: the model's)",
        min=8,
        max=4096,
        multiple_of=8,
        unit="px",
    )
    out: str | None = option(None, help="output PNG (a grid when there are several prompts)", ui=False)
    device: str | None = option(None, help="cpu or cuda (default: cuda if available)", ui=False, check=device_problem)
    merge: bool = option(False, help="merge the adapters into the weights before sampling (faster)")


@dataclass
class AdapterList:
    """`studio generate`: any adapters, each with a weight."""

    adapter: list[str] = option(
        [],
        help="adapter or run folder, or a LoRA .safetensors made elsewhere (kohya or diffusers layout), with an "
        "optional weight (repeat to compose several)",
        repeat=True,
        metavar="PATH[:WEIGHT]",
    )


@dataclass
class Composition:
    """`studio compose`: a content and a style adapter, or a Break-for-Make folder with its two weights."""

    content: str | None = option(None, help="content adapter or run folder", metavar="PATH[:WEIGHT]")
    style: str | None = option(None, help="style adapter or run folder", metavar="PATH[:WEIGHT]")
    b4m: str | None = option(None, help="a Break-for-Make folder (its joint adapter)", metavar="DIR")
    content_weight: float = option(1.0, help="B4M: weight of the content factor")
    style_weight: float = option(1.0, help="B4M: weight of the style factor")
    combine: str = option(
        "sum",
        help="--content with --style: 'sum' (both adapters at their weights) or 'ziplora' (one LoRA merged "
        "column by column, its coefficients learned on the two runs' training images; LoRA-shaped methods)",
        choices=COMBINE_METHODS,
    )
    content_data: str | None = option(
        None, help="ziplora: the content adapter's training images (default: its run's data)", ui=False
    )
    style_data: str | None = option(
        None, help="ziplora: the style adapter's training images (default: its run's data)", ui=False
    )
    save_merged: str | None = option(
        None, help="ziplora: also save the merged LoRA as an adapter folder here (for generate --adapter)", ui=False
    )


@dataclass
class GenerateCommand(AdapterList, GenerateOptions):
    """The options of `studio generate`."""


@dataclass
class ComposeCommand(Composition, ZipLoraConfig, GenerateOptions):
    """The options of `studio compose`."""


def sections(mode: str = "generate") -> list[Section]:
    return [Section(None, GenerateCommand if mode == "generate" else ComposeCommand)]


def parse_adapter(argument: str) -> tuple[Path, float]:
    """'path[:weight]' -> (adapter folder, weight); a run folder resolves to its final adapter."""
    path, weight = argument, 1.0
    head, separator, tail = argument.rpartition(":")
    if separator and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            path = argument
            if Path(head).exists() and not Path(argument).exists():  # "run:abc": a folder, then not a number
                raise UserError(
                    f"adapter {argument!r}: the weight after ':' must be a number, got {tail!r}; write PATH or PATH:0.8"
                ) from None
        if not math.isfinite(weight):
            raise UserError(f"adapter {head!r} has weight {tail!r}; an adapter weight must be a finite number")
    folder = Path(path)
    if (folder / "adapter_config.json").is_file() or (folder.is_file() and folder.suffix == ".safetensors"):
        return folder, weight  # a studio adapter folder, or a LoRA file made elsewhere (kohya or diffusers layout)
    finals = sorted((folder / "adapter").glob("*/adapter_config.json")) if (folder / "adapter").is_dir() else []
    if len(finals) == 1:
        return finals[0].parent, weight
    if not folder.exists():
        raise UserError(f"adapter {path!r} does not exist; pass an adapter folder or a run folder")
    raise UserError(f"{path!r} holds no single adapter (adapter_config.json, or a run folder with adapter/<name>/)")


def check_arguments(args: argparse.Namespace) -> tuple[Path, Path | None, list[str]]:
    """(the output PNG, the B4M folder or None, the adapter arguments), every one checked before any
    model loads: a folder or an unwritable place as --out, adapters that do not exist, a bad weight."""
    if not args.prompt:
        raise UserError("give at least one --prompt (repeat it for several images)")
    out = output_file(args.out or f"{args.mode}.png", "--out", ".png")
    if args.mode == "compose" and args.b4m:
        if args.content or args.style:
            raise UserError("compose takes --b4m, or --content and/or --style, not both; drop one of them")
        folder = Path(args.b4m) / "b4m" if (Path(args.b4m) / "b4m").is_dir() else Path(args.b4m)
        if not (folder / "b4m.json").is_file():
            raise UserError(
                f"--b4m {args.b4m} is not a Break-for-Make folder (no b4m.json in it or in its b4m/); "
                "pass a run folder made by `studio break-for-make`"
            )
        return out, folder, []
    arguments = args.adapter if args.mode == "generate" else [a for a in (args.content, args.style) if a]
    if args.mode == "compose" and not arguments:
        raise UserError("compose needs --content and/or --style adapters, or --b4m")
    if args.mode == "compose" and args.combine == "ziplora":
        if len(arguments) != 2:
            raise UserError("--combine ziplora merges two adapters: pass both --content and --style")
        if any(parse_adapter(a)[0].is_file() for a in arguments):
            raise UserError("--combine ziplora merges studio adapters (run or adapter folders), not LoRA files")
    elif args.mode == "compose" and (args.save_merged or args.content_data or args.style_data):
        raise UserError("--save-merged, --content-data and --style-data go with --combine ziplora")
    for argument in arguments:
        parse_adapter(argument)
    return out, None, arguments


def run_record(folder: Path) -> tuple[Path, dict] | None:
    """(run folder, its config.yaml) of the run an adapter folder comes from: the folder itself, or one or
    two levels above (runs/<name>/adapter/<kind>, a B4M folder); None for a bare adapter or a LoRA file."""
    if folder.is_file():
        return None  # a LoRA file made elsewhere records no run we can trust
    for candidate in (folder, folder.parent, folder.parent.parent):
        config = candidate / "config.yaml"
        if config.is_file():
            try:
                record = yaml.safe_load(config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                record = None
            return (candidate, record) if isinstance(record, dict) else None
    return None


def trained_base(folders: list[Path]) -> tuple[str, str]:
    """(base, family) recorded in the config.yaml of the runs the adapters come from (beside a B4M
    folder, two levels above runs/<name>/adapter/<kind>); ("embedded", "auto") where none is a run's.
    Runs of different bases are a UserError: one image has one base model."""
    found: dict[tuple[str, str], Path] = {}
    for folder in folders:
        run = run_record(folder)
        if run is not None:
            candidate, record = run
            key = (str(record.get("base") or "embedded"), str(record.get("family") or "auto"))
            found.setdefault(key, candidate)
    if len(found) > 1:
        listed = "; ".join(f"{run} trained on {base}" for (base, _), run in found.items())
        raise UserError(f"the adapters come from runs on different base models ({listed}); pass --base")
    return next(iter(found), ("embedded", "auto"))


def training_images(argument: str, data: str | None, option_name: str, resolution: int, seed: int):
    """ZipLoRA's images for one adapter: `data` if given, else the data folder its run trained on (with
    the run's resolution, caption template and trigger)."""
    from pipelines.data import ImageCaptionDataset

    run = run_record(parse_adapter(argument)[0])
    # The run's own captioning and size go with its own images only, not with a folder given instead.
    record = run[1] if run is not None and not data else {}
    source = data or record.get("data")
    if not source:
        raise UserError(
            f"--combine ziplora learns on each adapter's training images, and {argument} is not from a studio run "
            f"that records them; pass {option_name} FOLDER"
        )
    if not Path(source).is_dir():
        raise UserError(f"{option_name}: the training images {source} are not a folder (moved?); pass {option_name}")
    return ImageCaptionDataset(
        source,
        resolution=int(record.get("resolution") or resolution),
        template=record.get("template"),
        trigger=record.get("trigger"),
        seed=seed,
    )


def ziplora_merge(pipe, args: argparse.Namespace, arguments: list[str]):
    """Replace the loaded content and style adapters (adapter_0, adapter_1) by their ZipLoRA merge; save it
    where --save-merged says. Returns the denoiser's handle."""
    from tqdm import tqdm

    from peft_core import get_handle
    from peft_core.factors import attach_lora_factors
    from pipelines.ziplora import zip_merge

    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    size = args.size or family.default_size(pipe)
    content_data = training_images(arguments[0], args.content_data, "--content-data", size, args.zip_seed)
    style_data = training_images(arguments[1], args.style_data, "--style-data", size, args.zip_seed)
    weights = [parse_adapter(argument)[1] for argument in arguments]
    config = ZipLoraConfig(**{name: getattr(args, name) for name in ZipLoraConfig.__dataclass_fields__})
    with tqdm(total=config.zip_steps, desc="ziplora merge", unit="step", leave=False) as bar:

        def progress(step: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4g}")
            bar.update(1)

        mergers, log = zip_merge(
            pipe, "adapter_0", "adapter_1", content_data, style_data, config, weights[0], weights[1], progress
        )
    handle = get_handle(denoiser)
    for name in ("adapter_0", "adapter_1"):
        handle.remove(name)
    handle = attach_lora_factors(denoiser, mergers.merged_factors(), name="ziplora")
    if args.save_merged:
        folder = handle.save(args.save_merged, name="ziplora")
        record = {"content": arguments[0], "style": arguments[1], "config": vars(config), "loss_log": log}
        (Path(folder) / "ziplora.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
        print(f"merged LoRA saved: {folder} (studio generate --adapter {folder})")
    return handle


def run(args: argparse.Namespace) -> int:
    from peft_core import get_handle, load
    from pipelines import load_base
    from pipelines.b4m import BreakForMakePipeline
    from pipelines.kohya import load_lora_file
    from pipelines.train import check_adapters_usable, generate, image_grid, save_image_atomic

    out, b4m_folder, arguments = check_arguments(args)  # before the model loads
    base, family_name = args.base, args.family
    if base is None:  # the adapters' own base (and family, unless --family says otherwise)
        folders = [b4m_folder] if b4m_folder is not None else [parse_adapter(a)[0] for a in arguments]
        base, trained_family = trained_base(folders)
        family_name = trained_family if family_name == "auto" else family_name
    pipe = load_base(
        base, device=args.device, family=family_override(family_name), torch_dtype=torch_dtype(args.base_dtype)
    )
    family = family_of(pipe)
    if args.size:
        family.check_size(pipe, args.size, "--size")
    if b4m_folder is not None:
        b4m = BreakForMakePipeline.from_pretrained(pipe, b4m_folder)
        b4m.set_mix(args.content_weight, args.style_weight)
        label = f"b4m(content={args.content_weight}, style={args.style_weight})"
    else:
        for index, argument in enumerate(arguments):
            folder, weight = parse_adapter(argument)
            name = f"adapter_{index}"
            if folder.is_file():  # a LoRA file made elsewhere: on the UNet/transformer and the text encoders
                handles = load_lora_file(pipe, folder, name=name, weight=weight)
            else:
                handles = {"denoiser": load(family.denoiser(pipe), folder, name=name, weight=weight)}
            for handle in handles.values():
                check_adapters_usable(handle, {name: str(folder)})  # NaN/inf weights: refused, named
        if args.mode == "compose" and args.combine == "ziplora":
            ziplora_merge(pipe, args, arguments)
        if args.merge and arguments:
            for model in [family.denoiser(pipe), *family.text_encoders(pipe)]:
                if get_handle(model) is not None:
                    get_handle(model).merge()
        label = ", ".join(arguments) or "base model"
        if args.mode == "compose" and args.combine == "ziplora":
            label = f"ziplora({label})"
    images = generate(pipe, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, size=args.size)
    save_image_atomic(image_grid(images) if len(images) > 1 else images[0], out)
    print(f"{len(images)} image(s) with {label}: {out}")
    return 0
