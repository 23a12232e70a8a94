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
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peft_core.errors import AdapterError
from peft_core.io import write_safetensors
from peft_core.lora_format import (
    EXPORT_DTYPES,
    PEFT_CONFIG_NAME,
    PEFT_TASK_TYPES,
    PEFT_WEIGHTS_NAME,
    Factors,
    check_task_type,
    export_dtype,
    lora_config_fields,
    lora_tensors,
    write_peft_lora,
)

if TYPE_CHECKING:
    from peft_core.model import AdapterHandle

# The PEFT format's names live in peft_core.lora_format and stay importable from here.
__all__ = [
    "DIFFUSERS_METADATA_KEY",
    "DIFFUSERS_WEIGHTS_NAME",
    "EXPORT_DTYPES",
    "PEFT_CONFIG_NAME",
    "PEFT_TASK_TYPES",
    "PEFT_WEIGHTS_NAME",
    "Factors",
    "export_adapter",
    "export_diffusers",
    "lora_factors",
]

DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# The safetensors header entry diffusers (LORA_ADAPTER_METADATA_KEY) reads each component's LoraConfig from.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


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
    directory, dtype = Path(directory), export_dtype(dtype)
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
        tensors.update(lora_tensors(factors, f"{component}.", dtype))
        # diffusers builds each component's LoraConfig verbatim from these component-prefixed keys;
        # without them it guesses lora_alpha from the ranks, which older releases get wrong when
        # ranks differ between modules.
        config = lora_config_fields(handle.model, factors)
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
    check_task_type(task_type)  # both before any factor is computed
    export_dtype(dtype)
    factors = lora_factors(handle, name)
    return write_peft_lora(
        directory,
        handle.model,
        factors,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        dtype=dtype,
    )


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
