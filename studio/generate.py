"""`studio generate` and `studio compose`: images from a base model plus any adapters, with weights.

    studio generate --prompt "a star in neon style" --adapter runs/style-neon
    studio compose --content runs/content-moon --style runs/style-neon --prompt "a moon in neon style"
    studio compose --b4m runs/b4m-moon-neon --prompt "a moon in neon style" --style-weight 1.2

An adapter argument is an adapter folder (adapter_config.json), a run folder (its final
adapter), optionally followed by ":WEIGHT".
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines.base import base_dtype_option, torch_dtype
from pipelines.errors import UserError
from pipelines.families import base_option, family_of, family_option, family_override
from pipelines.options import option
from studio.options import Section
from studio.preflight import device_problem, output_file


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


@dataclass
class GenerateCommand(AdapterList, GenerateOptions):
    """The options of `studio generate`."""


@dataclass
class ComposeCommand(Composition, GenerateOptions):
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
    for argument in arguments:
        parse_adapter(argument)
    return out, None, arguments


def trained_base(folders: list[Path]) -> tuple[str, str]:
    """(base, family) recorded in the config.yaml of the runs the adapters come from (beside a B4M
    folder, two levels above runs/<name>/adapter/<kind>); ("embedded", "auto") where none is a run's.
    Runs of different bases are a UserError: one image has one base model."""
    found: dict[tuple[str, str], Path] = {}
    for folder in folders:
        if folder.is_file():
            continue  # a LoRA file made elsewhere records no base we can trust
        for candidate in (folder, folder.parent, folder.parent.parent):
            config = candidate / "config.yaml"
            if config.is_file():
                try:
                    record = yaml.safe_load(config.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, yaml.YAMLError):
                    record = None
                if isinstance(record, dict):
                    key = (str(record.get("base") or "embedded"), str(record.get("family") or "auto"))
                    found.setdefault(key, candidate)
                break
    if len(found) > 1:
        listed = "; ".join(f"{run} trained on {base}" for (base, _), run in found.items())
        raise UserError(f"the adapters come from runs on different base models ({listed}); pass --base")
    return next(iter(found), ("embedded", "auto"))


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
        if args.merge and arguments:
            for model in [family.denoiser(pipe), *family.text_encoders(pipe)]:
                if get_handle(model) is not None:
                    get_handle(model).merge()
        label = ", ".join(arguments) or "base model"
    images = generate(pipe, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, size=args.size)
    save_image_atomic(image_grid(images) if len(images) > 1 else images[0], out)
    print(f"{len(images)} image(s) with {label}: {out}")
    return 0
