"""LoRAs in the layouts other tools write and read: kohya/ComfyUI/A1111 (`lora_unet_...`) and diffusers.

Export (`export_kohya`): every adapted module of the UNet and text encoders as
    lora_unet_<module path, dots as underscores>.lora_down.weight   (r, in[, kh, kw])  = A
    lora_unet_<...>.lora_up.weight                                  (out, r[, 1, 1])   = B (scaling folded in)
    lora_unet_<...>.alpha                                           scalar = r, so alpha / r = 1
(`lora_te_` for SD's text encoder, `lora_te1_` / `lora_te2_` for SDXL's two), with the safetensors
header fields kohya's sd-scripts write (`ss_*`) and the modelspec ones, plus the run's sampler,
guidance and seed so its sample grids can be reproduced elsewhere. The module paths are diffusers'
(kohya's own for SD 1.x/2.x; for SDXL, ComfyUI, A1111/Forge and diffusers read them as kohya's SGM
names). SD3 and Flux LoRAs go as `--format diffusers`, the layout ComfyUI loads for those models.

Import (`load_lora_file`): a LoRA file made anywhere, in the kohya layout (diffusers-style or SGM
block names, per-module alpha) or diffusers' (`unet.` / `transformer.` / `text_encoder.` prefixes,
lora_A / lora_B), becomes a peft_core LoRA on the pipeline's modules: per module, A and B with
alpha / rank folded into B, ranks padded with zeros to the largest (B @ A is unchanged), so it
stacks with studio adapters at a weight, merges, and initialises training. A key that names no
module of this model is an error that names it: a LoRA that loads but changes nothing is the most
common complaint about LoRA tools.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_core import AdapterHandle, LoraConfig, attach, get_handle
from peft_core.export import lora_factors
from peft_core.io import write_safetensors
from pipelines.errors import UserError
from pipelines.families import family_of

KOHYA_WEIGHTS_NAME = "lora.safetensors"
# kohya's prefixes per pipeline component (SD: one text encoder; SDXL: two).
_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_SDXL_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# modelspec's architecture names (https://github.com/Stability-AI/ModelSpec).
_ARCHITECTURES = {"sd": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
_BASE_VERSIONS = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def kohya_prefixes(pipe) -> dict[str, str]:
    """Pipeline component -> kohya key prefix, for the families kohya's layout covers (SD, SDXL)."""
    family = family_of(pipe)
    if family.name not in _ARCHITECTURES:
        raise UserError(
            f"the kohya layout covers SD 1.x/2.x and SDXL; a {family.title} LoRA exports as --format diffusers, "
            "which ComfyUI and diffusers load for that model"
        )
    return _SDXL_PREFIXES if family.name == "sdxl" else _PREFIXES


def kohya_tensors(pipe, adapters: Mapping[str, tuple[AdapterHandle, str]]) -> dict[str, torch.Tensor]:
    """{component: (handle, adapter name)} -> the kohya state dict (fp32: exact)."""
    prefixes = kohya_prefixes(pipe)
    tensors: dict[str, torch.Tensor] = {}
    for component, (handle, name) in adapters.items():
        for module_name, (A, B) in lora_factors(handle, name).items():
            key = prefixes[component] + module_name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = A.contiguous()
            tensors[f"{key}.lora_up.weight"] = B.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(A.shape[0]))
    return tensors


def export_kohya(
    path: str | os.PathLike,
    pipe,
    adapters: Mapping[str, tuple[AdapterHandle, str]],
    run: Mapping[str, Any] | None = None,
    base_file: str | os.PathLike | None = None,
) -> Path:
    """Write the kohya-layout LoRA file `path` (a folder gets lora.safetensors) with kohya's and modelspec's
    header fields; `run` is the run's config.yaml (steps, rank, resolution, trigger, samples' settings)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / KOHYA_WEIGHTS_NAME
    tensors = kohya_tensors(pipe, adapters)
    metadata = kohya_metadata(pipe, tensors, run or {}, path.stem, base_file)
    write_safetensors(path, tensors, metadata=metadata)
    return path


def kohya_metadata(
    pipe, tensors: Mapping[str, torch.Tensor], run: Mapping[str, Any], title: str, base_file=None
) -> dict[str, str]:
    """The header fields kohya's sd-scripts and modelspec write (all strings, as safetensors wants)."""
    family = family_of(pipe)
    train = run.get("train", {}) or {}
    adapter = run.get("adapter", {}) or {}
    ranks = sorted({int(t.shape[0]) for key, t in tensors.items() if key.endswith("lora_down.weight")})
    resolution = run.get("resolution") or family.default_size(pipe)
    fields = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1] if ranks else 0),
        "ss_network_alpha": str(ranks[-1] if ranks else 0),  # per-module alpha tensors equal the rank: scale 1
        "ss_base_model_version": _BASE_VERSIONS[family.name],
        "ss_sd_model_name": str(run.get("base", "")),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_max_train_steps": str(train.get("steps", "")),
        "ss_learning_rate": str(train.get("learning_rate", "")),
        "ss_seed": str(train.get("seed", "")),
        "ss_training_comment": f"peft-studio, method {adapter.get('method', 'lora')} exported as an exact LoRA",
        "ss_v2": str(pipe.unet.config.cross_attention_dim == 1024).lower(),
        "ss_sample_sampler": type(pipe.scheduler).__name__,
        "ss_sample_steps": str(train.get("sample_steps", "")),
        "ss_sample_guidance": str(train.get("sample_guidance", "")),
        "ss_sample_seed": str(train.get("seed", "")),
        "ss_sample_prompts": json.dumps(train.get("sample_prompts", [])),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _ARCHITECTURES[family.name],
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.date.today().isoformat(),
    }
    if run.get("trigger"):
        fields["modelspec.trigger_phrase"] = str(run["trigger"])
    if base_file is not None and Path(base_file).is_file():
        fields["ss_new_sd_model_hash"] = _sha256(Path(base_file))
    return {"format": "pt", **fields}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Import.
# ---------------------------------------------------------------------------------------------
def is_lora_file(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".safetensors"


def load_lora_file(pipe, path: str | os.PathLike, name: str, weight: float = 1.0, trainable: bool = False) -> dict:
    """Attach the LoRA file `path` (kohya or diffusers layout) to the pipeline's modules as peft_core LoRA
    adapter `name` at `weight`; returns {component: handle}. UserError naming any key that matches no module."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types for damaged headers
        raise UserError(f"could not read LoRA file {path}: {str(error).splitlines()[0]}") from None
    modules = _factors_by_component(pipe, state, Path(path))
    handles = {}
    for component, factors in modules.items():
        model = getattr(pipe, component)
        handles[component] = _attach_factors(model, factors, name, weight, trainable)
    return handles


def _factors_by_component(pipe, state: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, tuple]]:
    """{component: {module: (A, B with alpha / r folded in)}} from either layout; every key used."""
    if any(key.startswith("lora_unet_") or key.startswith("lora_te") for key in state):
        groups = _kohya_groups(pipe, state)
    else:
        groups = _diffusers_groups(pipe, state)
    factors: dict[str, dict[str, tuple]] = {}
    unknown = []
    for (component, module_name), parts in groups.items():
        model = getattr(pipe, component, None)
        module = _module(model, module_name) if model is not None else None
        if module is None or "down" not in parts or "up" not in parts:
            unknown.append(parts.get("key", module_name))
            continue
        A, B = parts["down"].float(), parts["up"].float()
        rank = A.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        factors.setdefault(component, {})[module_name] = (A, B * (alpha / rank))
    if unknown:
        shown = ", ".join(sorted(unknown)[:5])
        raise UserError(
            f"LoRA file {path}: {len(unknown)} key group(s) match no module of this {family_of(pipe).title} model "
            f"(e.g. {shown}); is it for another base model?"
        )
    if not factors:
        raise UserError(f"LoRA file {path} holds no LoRA weights (lora_down/lora_up or lora_A/lora_B)")
    return factors


def _kohya_groups(pipe, state: dict[str, torch.Tensor]) -> dict[tuple[str, str], dict]:
    """kohya keys -> {(component, module): {"down", "up", "alpha", "key"}}, by exact module-name lookup."""
    family = family_of(pipe)
    prefixes = kohya_prefixes(pipe)
    if family.name == "sdxl":  # kohya's own SDXL names are SGM blocks (input_blocks_4_1_...): diffusers' map
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        state = _maybe_map_sgm_blocks_to_diffusers(state, pipe.unet.config)
    lookup = {}
    for component, prefix in prefixes.items():
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module_name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) or getattr(module, "is_adapted_module", False):
                lookup[prefix + module_name.replace(".", "_")] = (component, module_name)
    groups: dict[tuple[str, str], dict] = {}
    for key, tensor in state.items():
        stem, _, part = key.partition(".")
        role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
        target = lookup.get(stem, ("?", stem))
        entry = groups.setdefault(target, {"key": stem})
        if role is None:
            entry["unknown"] = key
        else:
            entry[role] = tensor
    return groups


def _diffusers_groups(pipe, state: dict[str, torch.Tensor]) -> dict[tuple[str, str], dict]:
    """`<component>.<module>.lora_A.weight` / `.lora_B.weight` (PEFT names) or `.lora.down/up.weight`."""
    groups: dict[tuple[str, str], dict] = {}
    roles = {
        ".lora_A.weight": "down",
        ".lora_B.weight": "up",
        ".lora.down.weight": "down",
        ".lora.up.weight": "up",
        ".alpha": "alpha",
    }
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        for suffix, role in roles.items():
            if rest.endswith(suffix):
                module_name = rest[: -len(suffix)]
                groups.setdefault((component, module_name), {"key": f"{component}.{module_name}"})[role] = tensor
                break
        else:
            groups.setdefault(("?", key), {"key": key})
    return groups


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(getattr(module, "base_layer", module), (nn.Linear, nn.Conv2d)) else None


def _attach_factors(model: nn.Module, factors: dict[str, tuple], name: str, weight: float, trainable: bool):
    """A peft_core LoRA of rank max(ranks), scaling 1, holding these exact factors (zero-padded)."""
    rank = max(A.shape[0] for A, _ in factors.values())
    config = LoraConfig(targets=list(factors), r=rank, alpha=float(rank))
    handle = get_handle(model)
    if handle is None:
        handle = attach(model, config, name=name, weight=weight, trainable=trainable)
    else:
        handle.add(config, name=name, weight=weight, trainable=trainable)
    with torch.no_grad():
        for module_name, wrapper in handle.wrappers(name):
            A, B = factors[module_name]
            adapter = wrapper.adapters[name]
            if adapter.lora_A.shape[1:] != A.shape[1:] or adapter.lora_B.shape[0] != B.shape[0]:
                raise UserError(
                    f"LoRA for {module_name!r} has shapes {tuple(A.shape)} / {tuple(B.shape)}, but the module "
                    f"takes {tuple(adapter.lora_A.shape)} / {tuple(adapter.lora_B.shape)}; is it for another base?"
                )
            adapter.lora_A.zero_()[: A.shape[0]].copy_(A)
            adapter.lora_B.zero_()[:, : B.shape[1]].copy_(B.reshape(B.shape[0], B.shape[1], *adapter.lora_B.shape[2:]))
    handle.after_optimizer_step()  # cached views of the factors are stale
    return handle
