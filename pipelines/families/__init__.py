"""Model families: one module each (sd, sdxl, sd3, flux), one registry line each.

    family = family_of(pipe)          # from the loaded pipeline's class
    family = family_from_folder(path) # from a diffusers folder's model_index.json, before loading
    family = get_family("flux")       # what --family names

Adding a family is a module with a `FAMILY` (pipelines/families/base.py says what it holds) and its
line in FAMILIES below; the training loop, sampling, Break-for-Make and the exports need no change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.errors import UserError
from pipelines.families import flux, sd, sd3, sdxl
from pipelines.families.base import Family, NoisePrediction, RectifiedFlow

FAMILIES: dict[str, Family] = {family.name: family for family in (sd.FAMILY, sdxl.FAMILY, sd3.FAMILY, flux.FAMILY)}

__all__ = [
    "FAMILIES",
    "Family",
    "NoisePrediction",
    "RectifiedFlow",
    "family_from_class",
    "family_from_folder",
    "family_of",
    "base_option",
    "family_option",
    "family_override",
    "resolution_option",
    "get_family",
]


BASE_EXAMPLES = (
    "stable-diffusion-v1-5/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0, "
    "stabilityai/stable-diffusion-3.5-medium, black-forest-labs/FLUX.1-dev"
)


def base_option(from_runs: bool = False, ui: bool = True):
    """The --base option of every command that loads a diffusion base (one definition): 'embedded' by
    default, or with `from_runs` (generate, compose, export) the base the given runs trained on."""
    from pipelines.options import option

    what = (
        f"base model: 'embedded' (the shipped tiny SD), a hub id ({BASE_EXAMPLES}), a diffusers folder or a "
        ".safetensors file"
    )
    if from_runs:
        return option(None, help=what + "; default: the base the adapters' runs trained on, else 'embedded'", ui=ui)
    return option("embedded", help=what, ui=ui)


def family_option(ui: bool = False):
    """The --family option, one definition for every command that loads a diffusion base (a UI control
    where the form also picks the base: training)."""
    from pipelines.options import option

    return option(
        "auto",
        help="model family: auto (read from the model), sd (1.x/2.x), sdxl, sd3 (3 and 3.5) or flux (Flux.1)",
        choices=("auto", *FAMILIES),
        ui=ui,
    )


def resolution_option(what: str = "training", ui: bool = True):
    """--resolution: the image side a run trains (and draws its grids) at, checked per family when loaded."""
    from pipelines.options import option

    return option(
        None,
        help=f"{what} resolution in pixels, a multiple of 8 (16 for SD3 and Flux; default: the base model's)",
        min=8,
        max=4096,
        multiple_of=8,
        ui=ui,
    )


def family_override(value: str | None) -> str | None:
    """What load_base's family= takes for a --family value (None: read it from the model)."""
    return None if value in (None, "", "auto") else value


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_from_class(class_name: str) -> Family:
    """The family of a diffusers pipeline class name (model_index.json's `_class_name`)."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    supported = ", ".join(f"{f.title} ({f.pipeline_class})" for f in FAMILIES.values())
    raise UserError(
        f"{class_name} is not a model family the studio trains; supported: {supported}. "
        "If it is one of them under another pipeline class, say which with --family"
    )


def family_of(pipe) -> Family:
    """The family of a loaded pipeline (what `load_base` returned)."""
    return family_from_class(type(pipe).__name__)


def family_from_folder(folder: str | os.PathLike) -> Family:
    """The family of a diffusers folder, from its model_index.json."""
    index = Path(folder) / "model_index.json"
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{index} does not name its pipeline class ({error}); pass --family") from None
    return family_from_class(class_name)


def family_from_keys(keys: list[str]) -> Family | None:
    """The family a single-file checkpoint's tensor names point to (None: none of them)."""
    # Most specific first: an SDXL or SD3 file also holds names an SD file has.
    for name in ("flux", "sd3", "sdxl", "sd"):
        family = FAMILIES[name]
        if any(key.startswith(family.single_file_keys) for key in keys):
            return family
    return None
