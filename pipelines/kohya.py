"""LoRAs in the layouts other tools write and read: kohya/ComfyUI/A1111 (`lora_unet_...`) and diffusers.

Export (`export_kohya`): every adapted module of the denoiser and text encoders as
    lora_unet_<module path, dots as underscores>.lora_down.weight   (r, in[, kh, kw])  = A
    lora_unet_<...>.lora_up.weight                                  (out, r[, 1, 1])   = B (scaling folded in)
    lora_unet_<...>.alpha                                           scalar = r, so alpha / r = 1
(`lora_te_` for SD's text encoder, `lora_te1_` / `lora_te2_` for SDXL's two), with the safetensors
header fields kohya's sd-scripts write (`ss_*`) and the modelspec ones, plus the run's sampler,
guidance and seed so its sample grids can be reproduced elsewhere. Per family:
- SD 1.x/2.x, SDXL: the module paths are diffusers' (kohya's own for SD 1.x/2.x; for SDXL, ComfyUI,
  A1111/Forge and diffusers read them as kohya's SGM names).
- Flux.1: kohya's names for Black Forest Labs' layers (`lora_unet_double_blocks_0_img_attn_qkv`,
  `lora_unet_single_blocks_0_linear1`, ...). BFL fuses q, k, v (and, in single blocks, the MLP's input
  projection) into one Linear, so LoRAs on diffusers' separate to_q / to_k / to_v of ranks r go as one
  LoRA of rank n r on the fused layer: the downs stacked, the ups block-diagonal,
      down = [A_q; A_k; A_v]   up = diag(B_q, B_k, B_v)   so   up @ down = [B_q A_q; B_k A_k; B_v A_v],
  exactly what kohya's sd-scripts write for a split-qkv LoRA; ComfyUI applies it to the fused weight, and
  diffusers' kohya converter sees the zero off-diagonal blocks and splits it back into the r-rank parts.
- SD3: ComfyUI's diffusers layout (`transformer.<module>.lora_A.weight` / `.lora_B.weight`, text
  encoders under `text_encoder.` / `text_encoder_2.`, no alpha keys: B carries the scale). kohya's own
  SD3 names (`lora_unet_joint_blocks_...`) are not read by diffusers' SD3 loader, which would skip them
  without a word; this layout loads in ComfyUI and diffusers alike.

Import (`load_lora_file`): a LoRA file made anywhere, in the kohya layout (diffusers-style, SGM or, for
Flux, BFL block names, per-module alpha) or diffusers' (`unet.` / `transformer.` / `text_encoder.`
prefixes, lora_A / lora_B), becomes a peft_core LoRA on the pipeline's modules: per module, A and B with
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

from peft_core import AdapterHandle
from peft_core.export import lora_factors
from peft_core.factors import attach_lora_factors
from peft_core.io import write_safetensors
from pipelines.errors import UserError
from pipelines.families import family_of

KOHYA_WEIGHTS_NAME = "lora.safetensors"
# Key prefixes per family and pipeline component: kohya's (SD: one text encoder; SDXL: two; Flux: CLIP-L
# as te1), and for SD3 diffusers' component names, the layout ComfyUI and diffusers both load.
_PREFIXES = {
    "sd": {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"},
    "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    "sd3": {"transformer": "transformer.", "text_encoder": "text_encoder.", "text_encoder_2": "text_encoder_2."},
    "flux": {"transformer": "lora_unet_", "text_encoder": "lora_te1_"},
}
# modelspec's architecture names (https://github.com/Stability-AI/ModelSpec, and kohya's sai_model_spec.py:
# "stable-diffusion-3" is its name for an SD3 of either size) and kohya's base model versions.
_ARCHITECTURES = {
    "sd": "stable-diffusion-v1/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "sd3": "stable-diffusion-3/lora",
    "flux": "flux-1-dev/lora",
}
_BASE_VERSIONS = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
# kohya's (BFL's) names of a Flux block's Linear layers -> the diffusers modules each holds, in its row order.
_FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}


def kohya_prefixes(pipe) -> dict[str, str]:
    """Pipeline component -> key prefix of the export's layout for this pipeline's family."""
    return _PREFIXES[family_of(pipe).name]


def flux_kohya_names(transformer: nn.Module) -> dict[str, tuple[str, ...]]:
    """`lora_unet_double_blocks_<i>_<layer>` / `lora_unet_single_blocks_<i>_<layer>` -> the diffusers modules
    of this Flux transformer that BFL's layer fuses, in the fused weight's row order."""
    names = {}
    for blocks, kind, layers in (
        ("transformer_blocks", "double_blocks", _FLUX_DOUBLE),
        ("single_transformer_blocks", "single_blocks", _FLUX_SINGLE),
    ):
        for i in range(len(getattr(transformer, blocks))):
            for layer, modules in layers.items():
                names[f"lora_unet_{kind}_{i}_{layer}"] = tuple(f"{blocks}.{i}.{m}" for m in modules)
    return names


def kohya_tensors(pipe, adapters: Mapping[str, tuple[AdapterHandle, str]]) -> dict[str, torch.Tensor]:
    """{component: (handle, adapter name)} -> the state dict in the family's layout (fp32: exact)."""
    family, prefixes = family_of(pipe).name, kohya_prefixes(pipe)
    tensors: dict[str, torch.Tensor] = {}
    for component, (handle, name) in adapters.items():
        if component not in prefixes:
            raise UserError(f"the kohya layout of a {family_of(pipe).title} LoRA has no place for a {component}")
        factors = lora_factors(handle, name)
        if family == "sd3":
            for module_name, (A, B) in factors.items():
                key = prefixes[component] + module_name
                tensors[f"{key}.lora_A.weight"] = A.contiguous()
                tensors[f"{key}.lora_B.weight"] = B.contiguous()
            continue
        if family == "flux" and component == "transformer":
            factors = _fuse_flux(getattr(pipe, component), factors)
        for module_name, (A, B) in factors.items():
            key = module_name if module_name.startswith("lora_unet_") else prefixes[component] + module_name
            key = key.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = A.contiguous()
            tensors[f"{key}.lora_up.weight"] = B.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(A.shape[0]))
    return tensors


def _fuse_flux(transformer: nn.Module, factors: Mapping[str, tuple]) -> dict[str, tuple]:
    """Per-module (A, B) of a Flux transformer -> {kohya name: (down, up)} on BFL's fused layers: the parts'
    downs stacked and ups block-diagonal (each part zero-padded to the largest rank; a part the adapter leaves
    alone gets zeros), so up @ down is the parts' B @ A stacked along the output rows."""
    fused, left = {}, dict(factors)
    for stem, modules in flux_kohya_names(transformer).items():
        if not any(module in left for module in modules):
            continue
        parts = [left.pop(module, None) for module in modules]
        rank = max(A.shape[0] for A, _ in filter(None, parts))
        downs, ups = [], []
        for module, part in zip(modules, parts, strict=True):
            layer = _base(transformer.get_submodule(module))
            A, B = part if part is not None else (torch.zeros(0, layer.in_features), torch.zeros(layer.out_features, 0))
            downs.append(torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])]))
            ups.append(torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1))
        fused[stem] = (torch.cat(downs), torch.block_diag(*ups))  # (n r, in), (sum of outs, n r)
    if left:
        shown = ", ".join(list(left)[:5])
        raise UserError(
            f"kohya's Flux layout names the layers of the double and single blocks only; this adapter also adapts "
            f"{shown}: export it with --format diffusers"
        )
    return fused


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
    ranks = {int(A.shape[0]) for handle, name in adapters.values() for A, _ in lora_factors(handle, name).values()}
    metadata = kohya_metadata(pipe, sorted(ranks), run or {}, path.stem, base_file)
    write_safetensors(path, tensors, metadata=metadata)
    return path


def kohya_metadata(pipe, ranks: list[int], run: Mapping[str, Any], title: str, base_file=None) -> dict[str, str]:
    """The header fields kohya's sd-scripts and modelspec write (all strings, as safetensors wants); `ranks`
    are the adapter's module ranks, sorted."""
    family = family_of(pipe)
    train = run.get("train", {}) or {}
    adapter = run.get("adapter", {}) or {}
    architecture = _ARCHITECTURES[family.name]
    if family.name == "flux" and not pipe.transformer.config.guidance_embeds:
        architecture = "flux-1-schnell/lora"
    unet = getattr(pipe, "unet", None)
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
        "ss_v2": str(unet is not None and unet.config.cross_attention_dim == 1024).lower(),
        "ss_sample_sampler": type(pipe.scheduler).__name__,
        "ss_sample_steps": str(train.get("sample_steps", "")),
        "ss_sample_guidance": str(train.get("sample_guidance", "")),
        "ss_sample_seed": str(train["sample_seed"] if train.get("sample_seed") is not None else train.get("seed", "")),
        "ss_sample_prompts": json.dumps(train.get("sample_prompts", [])),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
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
        handles[component] = attach_lora_factors(model, factors, name, weight, trainable)
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
    prefixes = _IMPORT_PREFIXES.get(family.name, kohya_prefixes(pipe))
    if family.name == "sdxl":  # kohya's own SDXL names are SGM blocks (input_blocks_4_1_...): diffusers' map
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        state = _maybe_map_sgm_blocks_to_diffusers(state, pipe.unet.config)
    if family.name == "flux":  # BFL's fused layers (double_blocks_0_img_attn_qkv, ...) -> diffusers' modules
        state = _split_flux(pipe.transformer, state)
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


# kohya-style keys on an SD3 transformer: diffusers' module names under kohya's prefixes.
_IMPORT_PREFIXES = {"sd3": {"transformer": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}


def _split_flux(transformer: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each BFL-named LoRA of the file as LoRAs on the diffusers modules it fuses, under their own kohya-style
    names: a block-diagonal up (what `_fuse_flux` and kohya write) gives each part its rows of the down and
    its diagonal block, rank R / n with alpha / n (the same alpha / rank); any other fused LoRA gives each part
    the whole down and its rows of the up. A part whose up is all zeros adapts nothing and is left out.
    Keys of unknown names, or of the wrong size, are kept as they are and reported by the caller."""
    state = dict(state)
    for stem, modules in flux_kohya_names(transformer).items():
        if f"{stem}.lora_down.weight" not in state or f"{stem}.lora_up.weight" not in state:
            continue
        down, up = state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"]
        rank, n = down.shape[0], len(modules)
        outs = [_base(transformer.get_submodule(module)).out_features for module in modules]
        if sum(outs) != up.shape[0]:
            continue
        alpha = state.get(f"{stem}.alpha", torch.tensor(float(rank)))
        rows = list(torch.split(up, outs))  # (out_j, R) per part
        sparse = n > 1 and rank % n == 0
        if sparse:
            r = rank // n
            for j, block in enumerate(rows):
                sparse = sparse and not torch.any(torch.cat([block[:, : j * r], block[:, (j + 1) * r :]], dim=1))
        for key in [k for k in state if k.startswith(stem + ".")]:
            del state[key]
        for j, (module, block) in enumerate(zip(modules, rows, strict=True)):
            if sparse:
                part_down, part_up, part_alpha = down[j * r : (j + 1) * r], block[:, j * r : (j + 1) * r], alpha / n
            else:
                part_down, part_up, part_alpha = down, block, alpha
            if not torch.any(part_up):
                continue
            key = "lora_unet_" + module.replace(".", "_")
            state[f"{key}.lora_down.weight"] = part_down
            state[f"{key}.lora_up.weight"] = part_up.contiguous()
            state[f"{key}.alpha"] = torch.as_tensor(part_alpha, dtype=torch.float32)
    return state


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


def _base(module: nn.Module) -> nn.Module:
    """The layer itself, under any adapter wrapper."""
    return getattr(module, "base_layer", module)


def _module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(getattr(module, "base_layer", module), (nn.Linear, nn.Conv2d)) else None
