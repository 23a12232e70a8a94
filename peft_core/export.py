"""Export an adapter as a plain LoRA that HF PEFT and diffusers load.

Any method whose update is exactly low-rank exports: its `Adapter.lora_factors(base)` returns
(A, B) with B @ A == delta_weight and the method's scaling already folded into B (LoRA: A and
s * B; PaCA: a one-hot column selector A and B = s * delta). The written config therefore sets
lora_alpha == r for every module, so the loader's scaling alpha / r is exactly 1; modules whose
rank differs from the most common one (PaCA on a 3x3 conv has rank 9r) get the same value in both
rank_pattern and alpha_pattern.

    export_adapter(handle, "out/peft", format="peft", task_type="CAUSAL_LM")
    PeftModel.from_pretrained(base_model, "out/peft")

    export_adapter(unet_handle, "out/sd", format="diffusers", component="unet")
    export_diffusers("out/sd", {"unet": unet_handle, "text_encoder": (text_handle, "style")})
    pipe.load_lora_weights("out/sd")

The export is the adapter itself at weight 1: per-adapter weights (`set_weight`) are a composition
setting. Nothing here imports peft or diffusers; both formats are plain safetensors + JSON, and
every file is written atomically through peft_core.io.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_core.errors import AdapterError
from peft_core.io import write_json, write_safetensors
from peft_core.model import AdapterHandle

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# The safetensors header entry diffusers (LORA_ADAPTER_METADATA_KEY) reads each component's LoraConfig from.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PEFT_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# module name -> (A, B), float32 on CPU. Linear: A (r, in), B (out, r).
# Conv2d: A (r, in, kh, kw), B (out, r, 1, 1), PEFT's conv LoRA layout.
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def export_adapter(
    handle: AdapterHandle, directory: str | os.PathLike, format: str = "peft", name: str = "default", **options: Any
) -> Path:
    """Write adapter `name` as a LoRA in `format` ("peft" or "diffusers") into `directory`.

    peft options: task_type (e.g. "CAUSAL_LM"), base_model_name_or_path, dtype.
    diffusers options: component ("unet", "text_encoder", ...; the key prefix), weight_name, dtype.
    """
    exporters = {"peft": _export_peft, "diffusers": _export_diffusers_component}
    if format not in exporters:
        raise AdapterError(f"unknown export format {format!r}; choose one of: {', '.join(exporters)}")
    exporter = exporters[format]
    accepted = [p.name for p in inspect.signature(exporter).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise AdapterError(f"export format {format!r} has no option {unknown[0]!r}; its options: {', '.join(accepted)}")
    return exporter(handle, Path(directory), name, **options)


def lora_factors(handle: AdapterHandle, name: str = "default") -> Factors:
    """Exact (A, B) with B @ A == update, for every module adapter `name` adapts, in model order."""
    if name not in handle.configs:
        raise AdapterError(f"no adapter named {name!r}; this model has {handle.adapter_names or 'none'}")
    method = handle.configs[name].method
    factors: Factors = {}
    for module_name, wrapper in handle.wrappers(name):
        _check_exportable_layer(module_name, wrapper.base_layer)
        pair = wrapper.adapters[name].lora_factors(wrapper.base_layer)
        if pair is None:
            raise AdapterError(
                f"adapter {name!r} ({method}): its update of {module_name!r} is not exactly low-rank, so it cannot "
                "be exported as a LoRA; keep it in peft_core's format (handle.save) or merge it (handle.merge)"
            )
        factors[module_name] = tuple(t.detach().float().cpu() for t in pair)
    return factors


def export_diffusers(
    directory: str | os.PathLike,
    components: Mapping[str, AdapterHandle | tuple[AdapterHandle, str]],
    *,
    weight_name: str = DIFFUSERS_WEIGHTS_NAME,
    dtype: torch.dtype | str = torch.float32,
) -> Path:
    """One diffusers LoRA file for several pipeline components, e.g. {"unet": h1, "text_encoder": (h2, "style")}.

    A component given as a bare handle exports its adapter "default".
    """
    directory, dtype = Path(directory), _export_dtype(dtype)
    if not components:
        raise AdapterError("export_diffusers: `components` is empty; pass e.g. {'unet': handle}")
    tensors: dict[str, torch.Tensor] = {}
    lora_metadata: dict[str, Any] = {}
    for component, entry in components.items():
        if not component or not component.isidentifier():
            raise AdapterError(
                f"diffusers component {component!r} must be a pipeline attribute such as 'unet' or 'text_encoder'"
            )
        handle, name = entry if isinstance(entry, tuple) else (entry, "default")
        factors = lora_factors(handle, name)
        tensors.update(_lora_tensors(factors, f"{component}.", dtype))
        # diffusers builds each component's LoraConfig verbatim from these component-prefixed keys;
        # without them it guesses lora_alpha from the ranks, which older releases get wrong when
        # ranks differ between modules.
        config = _lora_config_fields(handle.model, factors)
        lora_metadata.update({f"{component}.{key}": value for key, value in config.items()})
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(lora_metadata, indent=2, sort_keys=True)}
    write_safetensors(directory / weight_name, tensors, metadata=metadata)
    return directory


# ---------------------------------------------------------------------------------------------
# The two formats.
# ---------------------------------------------------------------------------------------------
def _export_peft(
    handle: AdapterHandle,
    directory: Path,
    name: str,
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> Path:
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise AdapterError(
            f"task_type {task_type!r} is not a PEFT task type; use one of {', '.join(PEFT_TASK_TYPES)} or None"
        )
    dtype = _export_dtype(dtype)
    factors = lora_factors(handle, name)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        **_lora_config_fields(handle.model, factors),
    }
    # PeftModel wraps the model as base_model.model; its LoRA layers hold lora_A / lora_B modules.
    tensors = _lora_tensors(factors, "base_model.model.", dtype)
    # Weights first: a folder whose config is present always has weights next to it.
    write_safetensors(directory / PEFT_WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    write_json(directory / PEFT_CONFIG_NAME, config)
    return directory


def _export_diffusers_component(
    handle: AdapterHandle,
    directory: Path,
    name: str,
    *,
    component: str = "unet",
    weight_name: str = DIFFUSERS_WEIGHTS_NAME,
    dtype: torch.dtype | str = torch.float32,
) -> Path:
    return export_diffusers(directory, {component: (handle, name)}, weight_name=weight_name, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Shared pieces.
# ---------------------------------------------------------------------------------------------
def _lora_tensors(factors: Factors, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    for module_name, (A, B) in factors.items():
        tensors[f"{prefix}{module_name}.lora_A.weight"] = A.to(dtype)
        tensors[f"{prefix}{module_name}.lora_B.weight"] = B.to(dtype)
    return tensors


def _lora_config_fields(model: nn.Module, factors: Factors) -> dict[str, Any]:
    """The LoraConfig fields that make every module's scaling exactly 1 (B already carries it)."""
    ranks = {module_name: int(A.shape[0]) for module_name, (A, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as re.match(rf"(.*\.)?({key})$", name): anchor and escape the full
    # name, or "proj_out" would also set the rank of "down_blocks.0.attentions.0.proj_out".
    rank_pattern = {f"^{re.escape(module_name)}": rank for module_name, rank in ranks.items() if rank != r}
    return {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": _target_modules(model, list(factors)),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # rsLoRA's alpha / sqrt(r) is already folded into B
        "use_dora": False,
    }


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT target_modules naming exactly `names`: a readable list, or a regex if a list over-matches.

    PEFT takes a listed name as a suffix too ("proj_out" also adapts "mid.proj_out"); a string is
    full-matched as a regular expression instead.
    """
    targets = set(names)
    for other, _ in model.named_modules():
        parts = other.split(".")
        if other in targets or any(".".join(parts[:i]) in targets for i in range(1, len(parts))):
            continue  # a target, or inside a target's wrapper (base_layer, adapters)
        if any(".".join(parts[i:]) in targets for i in range(1, len(parts))):
            return "|".join(re.escape(module_name) for module_name in names)
    return names


def _check_exportable_layer(module_name: str, base: nn.Module) -> None:
    # PEFT's conv LoRA builds A as Conv2d(in, r, kernel, stride, padding) and nothing else, so a
    # dilated, grouped or non-zero-padded base conv would load without error and compute another thing.
    if isinstance(base, nn.Linear):
        return
    if isinstance(base, nn.Conv2d):
        if tuple(base.dilation) == (1, 1) and base.groups == 1 and base.padding_mode == "zeros":
            return
        raise AdapterError(
            f"{module_name!r} is a Conv2d with dilation={base.dilation}, groups={base.groups}, "
            f"padding_mode={base.padding_mode!r}; PEFT/diffusers LoRA layers support only dilation 1, "
            "groups 1 and zero padding, so this adapter cannot be exported exactly"
        )
    raise AdapterError(f"{module_name!r} is a {type(base).__name__}; LoRA exports support nn.Linear and nn.Conv2d")


def _export_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in EXPORT_DTYPES:
        return EXPORT_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in EXPORT_DTYPES.values():
        return dtype
    raise AdapterError(f"export dtype {dtype!r} is not supported; use one of {', '.join(EXPORT_DTYPES)}")
