"""Loading base models: the embedded tiny ones shipped in assets/, or any diffusion model the user names.

`load_base(spec)` accepts, in the order it tries them:
  1. the embedded name ("embedded", "embedded-tiny-sd") or None: the tiny SD in assets/tiny-sd/;
  2. a local diffusers folder (it has a model_index.json);
  3. a single-file checkpoint (.safetensors / .ckpt), through `from_single_file`;
  4. a Hugging Face hub id ("owner/name"), through `from_pretrained` (cache or network).
The model family (SD 1.x/2.x, SDXL, SD3/3.5, Flux.1: pipelines.families) is read from the folder's
model_index.json, the file's tensor names or the hub model's pipeline class; `family=` overrides it.
The result is that family's diffusers pipeline, so the code after it is the same for the demo model
and for a real SDXL or Flux. Failures say which of the four was meant.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path

from pipelines.errors import UserError
from pipelines.families import Family, family_from_folder, family_from_keys, family_of, get_family

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_SD = ASSETS / "tiny-sd"
EMBEDDED_LM = ASSETS / "tiny-lm"
EMBEDDED_NAMES = ("embedded", "embedded-tiny-sd")
EMBEDDED_LM_NAMES = ("embedded", "embedded-tiny-lm")
DEFAULT_BASE = "embedded"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin")  # refused unless allow_pickle=True
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # in a model folder: never read


def load_base(
    spec: str | os.PathLike | None = DEFAULT_BASE,
    torch_dtype=None,
    device: str | None = None,
    allow_pickle: bool = False,
    family: str | None = None,
    **kwargs,
):
    """The family's diffusers pipeline from the embedded name, a folder, a single file or a hub id,
    moved to `device` (default: CUDA when available, else the CPU).

    `family` ("sd", "sdxl", "sd3", "flux") overrides what the model says it is.
    Single-file pickle checkpoints (.ckpt/.pt/.bin) are refused unless `allow_pickle=True` (with a warning).
    `torch_dtype` and other keyword arguments go to diffusers' loader unchanged.
    """
    import torch

    pipe = _load_pipeline(spec, torch_dtype, kwargs, allow_pickle, family)
    family_of(pipe)  # a pipeline of another kind (a hub id of an unsupported model) is refused here
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


BASE_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def base_dtype_option():
    """--base-dtype, one definition for every command that loads a diffusion base."""
    from pipelines.options import option

    return option(
        "float32",
        help="dtype of the frozen base weights: bfloat16 halves their memory (Flux.1-dev: 24 GB instead of 48); "
        "training with it needs --mixed-precision bf16",
        choices=tuple(BASE_DTYPES),
        advanced=True,
        ui=False,  # the UI trains and draws with the embedded base
    )


def torch_dtype(name: str | None):
    """The torch dtype of a --base-dtype value (None for float32: diffusers' default)."""
    import torch

    return None if name in (None, "float32") else getattr(torch, BASE_DTYPES[name])


def quantize_denoiser_nf4(pipe, compute_dtype=None) -> int:
    """A QLoRA-style base: every nn.Linear of the pipeline's denoiser becomes a bitsandbytes NF4 layer (double
    quantization, bf16 compute), as diffusers' 4-bit loading does. Returns how many layers it replaced."""
    import torch
    from torch import nn

    from peft_core.methods.loram import quantize_nf4

    model = family_of(pipe).denoiser(pipe)
    linear = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    quantize_nf4(model, tuple({name.rpartition(".")[2] for name in linear}), compute_dtype or torch.bfloat16)
    return len(linear)


def pipeline_class(family: Family):
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def _load_pipeline(
    spec: str | os.PathLike | None, torch_dtype, kwargs: dict, allow_pickle: bool = False, family: str | None = None
):
    chosen = get_family(family) if family else None
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if spec is None or str(spec) in EMBEDDED_NAMES:
        embedded = chosen or get_family("sd")
        return _load_folder(pipeline_class(embedded), _embedded_folder(EMBEDDED_SD, "tiny SD"), kwargs)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"{path} is a folder but not a diffusers pipeline (no model_index.json); "
                "pass a diffusers folder, a .safetensors file, a hub id or 'embedded'"
            )
        return _load_folder(pipeline_class(chosen or family_from_folder(path)), path, kwargs)
    if path.is_file():
        if path.suffix not in _SINGLE_FILE_SUFFIXES:
            raise UserError(f"{path} is not a checkpoint file (expected one of {', '.join(_SINGLE_FILE_SUFFIXES)})")
        if path.suffix in _PICKLE_SUFFIXES and not allow_pickle:
            raise UserError(
                f"{path} is a pickle checkpoint ({path.suffix}), which can run code when loaded, so it is "
                "refused; convert it to .safetensors (from Python, load_base(..., allow_pickle=True) reads a file you "
                "trust)"
            )
        if path.suffix in _PICKLE_SUFFIXES:
            warnings.warn(
                f"loading pickle checkpoint {path} (allow_pickle=True): only do this for files you trust", stacklevel=3
            )
        else:
            chosen = chosen or _safetensors_family(path)
        # Converting an original-format checkpoint needs its config; offline, diffusers can only
        # build it from the cache, so say so rather than surface a hub error.
        try:
            return pipeline_class(chosen or get_family("sd")).from_single_file(str(path), **kwargs)
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            network = any(word in first for word in ("Connect", "connection", "offline", "resolve", "Name or service"))
            hint = (
                "; diffusers reads the model's config from the hub to convert a single file: connect to the "
                "network once (it is cached), or pass a diffusers folder"
                if network
                else ""
            )
            raise UserError(f"could not load single-file checkpoint {path}: {first}{hint}") from error
    looks_like_path = str(spec).startswith((".", "/", "~")) or path.suffix in _SINGLE_FILE_SUFFIXES
    if looks_like_path or not _HUB_ID.match(str(spec)):
        raise UserError(
            f"base model {str(spec)!r} not found: no such folder or file, and not a hub id "
            f"(owner/name); use 'embedded' for the built-in tiny model"
        )
    if chosen is None:
        from diffusers import DiffusionPipeline

        return _load_hub(DiffusionPipeline, str(spec), kwargs)  # the model's own pipeline class
    return _load_hub(pipeline_class(chosen), str(spec), kwargs)


def _safetensors_family(path: Path) -> Family:
    """The family of a .safetensors base from its tensor names. It must be readable and hold a model of
    a known family; anything else would send diffusers looking for a config on the hub, with an error
    about the network instead of the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types for damaged headers
        raise UserError(
            f"could not load single-file checkpoint {path}: not a readable safetensors file "
            f"({str(error).splitlines()[0] if str(error) else error}); it may be truncated, or not a model"
        ) from None
    family = family_from_keys(keys)
    if family is None:
        sample = ", ".join(keys[:3]) or "no tensors"
        raise UserError(
            f"could not load single-file checkpoint {path}: it holds no Stable Diffusion weights (SD 1.x/2.x, SDXL, "
            f"SD3) nor Flux.1 weights ({len(keys)} tensor(s): {sample}); pass such a checkpoint, a diffusers folder, "
            "a hub id or 'embedded' (or name the family with --family)"
        )
    return family


def refuse_pickle_weights(folder: Path) -> None:
    """A model folder (or a diffusers pipeline's component folders) whose weights are only pickle files
    (pytorch_model.bin, diffusion_pytorch_model.bin, ...) is refused: loading pickle can run code.
    Folders with .safetensors weights are loaded with use_safetensors=True, which never reads the others."""
    for part in [folder, *(p for p in sorted(folder.iterdir()) if p.is_dir())]:
        files = [p for p in part.iterdir() if p.is_file()]
        pickles = [p for p in files if p.suffix in _PICKLE_WEIGHTS and "model" in p.name]
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            raise UserError(
                f"{pickles[0]} is a pickle file and {part} has no .safetensors weights; pickle can run code when "
                "loaded, so it is never read: convert the model to safetensors "
                "(save_pretrained(..., safe_serialization=True)) in a place you trust"
            )


def load_embedded_lm(spec: str | os.PathLike | None = DEFAULT_BASE, torch_dtype=None):
    """(model, tokenizer) of a causal LM: the embedded tiny Llama by default, else a folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec is None or str(spec) in EMBEDDED_LM_NAMES:
        source = str(_embedded_folder(EMBEDDED_LM, "tiny LM"))
    else:
        path = Path(spec).expanduser()
        if not path.exists() and (str(spec).startswith((".", "/", "~")) or not _HUB_ID.match(str(spec))):
            raise UserError(f"language model {str(spec)!r} not found: no such folder, and not a hub id (owner/name)")
        source = str(path) if path.exists() else str(spec)
        if path.is_dir():
            refuse_pickle_weights(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True)
    except OSError as error:
        raise UserError(f"could not load language model {source!r}: {offline_hint(error)}") from error
    return model, tokenizer


def embedded_lm_data(name: str) -> Path:
    """Path of a file shipped with the tiny LM (task_add_train.jsonl, knowledge_probe.jsonl, heldout.txt, ...)."""
    path = EMBEDDED_LM / "data" / name
    if not path.is_file():
        available = sorted(p.name for p in (EMBEDDED_LM / "data").glob("*")) if (EMBEDDED_LM / "data").is_dir() else []
        raise UserError(f"no embedded LM data file {name!r}; available: {', '.join(available) or 'none'}")
    return path


def _embedded_folder(folder: Path, what: str) -> Path:
    if not (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
        raise UserError(f"the embedded {what} is missing from {folder}; rebuild it with `studio pretrain-base`")
    return folder


def _load_folder(pipeline_class, folder: Path, kwargs: dict):
    # A local folder never needs the network; local_files_only makes that explicit and fast.
    refuse_pickle_weights(folder)
    try:
        with _diffusers_errors_unlogged():
            return pipeline_class.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as error:  # missing/half-downloaded weights, broken configs
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"could not load the diffusers folder {folder}: {first}; an interrupted download or copy? "
            "download it again, or pass another base"
        ) from error


@contextlib.contextmanager
def _diffusers_errors_unlogged():
    """diffusers logs a failed component load at ERROR level before it raises; the raised error becomes
    our one-line message, so the log line (and its traceback, in some versions) is left out."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _load_hub(pipeline_class, hub_id: str, kwargs: dict):
    try:
        return pipeline_class.from_pretrained(hub_id, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load {hub_id!r} from the Hugging Face hub: {offline_hint(error)}") from error


def offline_hint(error: Exception) -> str:
    """The first line of a loading error, with what to check (offline mode, the id, the network)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hint = (
        "HF_HUB_OFFLINE is set, so only models already in the local cache can load"
        if offline
        else "check the id, your network, and that the model is public or you are logged in"
    )
    return f"{str(error).splitlines()[0]} ({hint}; 'embedded' works offline)"
