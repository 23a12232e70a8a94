"""`studio export`: write a trained adapter in the format another library loads.

studio export runs/style-neon --format diffusers --out exports/neon   # pipe.load_lora_weights(...)
studio export runs/style-neon --format peft --out exports/neon-peft  # PeftModel.from_pretrained(unet, ...)
studio export runs/style-neon --format kohya --out exports/neon.safetensors  # ComfyUI, A1111/Forge, kohya
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pipelines.base import base_dtype_option, torch_dtype
from pipelines.errors import UserError
from pipelines.families import base_option, family_of, family_option, family_override
from pipelines.options import option
from studio.options import Section
from studio.preflight import writable_folder


@dataclass
class ExportOptions:
    adapter: str | None = option(None, help="adapter folder (adapter_config.json) or run folder", positional=True)
    format: str = option(
        "diffusers",
        help="target format: diffusers (pipe.load_lora_weights), peft (PeftModel), kohya (ComfyUI, A1111/Forge, "
        "kohya; for SD3 ComfyUI's layout, for Flux.1 kohya's BFL names)",
        choices=("peft", "diffusers", "kohya"),
    )
    out: str | None = option(None, help="output folder (required)")
    base: str | None = base_option(from_runs=True)  # the base the adapter trained on: its module shapes
    family: str = family_option()
    base_dtype: str = base_dtype_option()
    component: str | None = option(
        None,
        help="diffusers: the pipeline component (default: the denoiser, unet or transformer)",
        choices=("unet", "transformer", "text_encoder"),
    )


def sections() -> list[Section]:
    return [Section(None, ExportOptions)]


def run(args: argparse.Namespace) -> int:
    if not args.adapter or not args.out:
        raise UserError(
            "name the adapter (or run folder) to export and the output folder: studio export ADAPTER --out DIR"
        )
    from peft_core import load
    from studio.generate import parse_adapter, trained_base

    folder, _ = parse_adapter(args.adapter)
    writable_folder(args.out, "--out")  # before the model loads
    from pipelines import load_base

    base, family_name = args.base, args.family
    if base is None:  # the run's own base (and family, unless --family says otherwise)
        base, trained_family = trained_base([folder])
        family_name = trained_family if family_name == "auto" else family_name
    pipe = load_base(base, device="cpu", family=family_override(family_name), torch_dtype=torch_dtype(args.base_dtype))
    family = family_of(pipe)
    component = args.component or family.denoiser_name
    model = getattr(pipe, component, None)
    if model is None:
        raise UserError(
            f"--component {component}: a {family.title} pipeline has no {component}; "
            f"use {family.denoiser_name} or text_encoder"
        )
    handle = load(model, folder)
    name = handle.adapter_names[-1]
    if args.format == "kohya":
        out = _export_kohya(pipe, args, folder, component, handle, name, base)
    else:
        options = {"component": component} if args.format == "diffusers" else {}
        out = handle.export(Path(args.out), format=args.format, name=name, **options)
    print(f"exported {folder} as {args.format}: {out}")
    return 0


def _export_kohya(pipe, args: argparse.Namespace, folder: Path, component: str, handle, name: str, base: str) -> Path:
    """The run's adapter(s) in one kohya-layout file: the denoiser's and, when the run trained it, the
    text encoder's; the header carries the run's settings (its config.yaml, when the folder is a run's)."""
    import yaml

    from peft_core import load
    from pipelines.kohya import export_kohya

    adapters = {component: (handle, name)}
    run_dir = folder.parent.parent if folder.parent.name == "adapter" else None
    text = run_dir / "text_encoder_adapter" / name if run_dir is not None else None
    if text is not None and (text / "adapter_config.json").is_file():
        adapters["text_encoder"] = (load(pipe.text_encoder, text, name=name), name)
    config = run_dir / "config.yaml" if run_dir is not None else None
    run = yaml.safe_load(config.read_text()) if config is not None and config.is_file() else {}
    base_file = Path(base) if Path(base).is_file() else None
    return export_kohya(Path(args.out), pipe, adapters, run=run, base_file=base_file)
