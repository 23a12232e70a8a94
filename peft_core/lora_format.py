"""The PEFT / diffusers LoRA file format: tensor names, the LoraConfig fields, the PEFT folder.

Below export (peft_core.export, which gets exact factors from a handle) so a method with its own
export form (CorDA's rank-r LoRA + residual weights) writes the same files without importing it.
Nothing here imports peft or diffusers; both formats are plain safetensors + JSON, written atomically.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peft_core.errors import AdapterError
from peft_core.io import write_json, write_safetensors

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# module name -> (A, B), float32 on CPU. Linear: A (r, in), B (out, r).
# Conv2d: A (r, in, kh, kw), B (out, r, 1, 1), PEFT's conv LoRA layout.
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def write_peft_lora(
    directory: str | os.PathLike,
    model: nn.Module,
    factors: Factors,
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> Path:
    """A PEFT LoRA folder (`PeftModel.from_pretrained(model, directory)`) holding `factors` at scale 1."""
    check_task_type(task_type)
    directory, dtype = Path(directory), export_dtype(dtype)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        **lora_config_fields(model, factors),
    }
    # PeftModel wraps the model as base_model.model; its LoRA layers hold lora_A / lora_B modules.
    tensors = lora_tensors(factors, "base_model.model.", dtype)
    # Weights first: a folder whose config is present always has weights next to it.
    write_safetensors(directory / PEFT_WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    write_json(directory / PEFT_CONFIG_NAME, config)
    return directory


def lora_tensors(factors: Factors, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`<prefix><module>.lora_A.weight` / `.lora_B.weight`: the keys PEFT and diffusers load."""
    tensors = {}
    for module_name, (A, B) in factors.items():
        tensors[f"{prefix}{module_name}.lora_A.weight"] = A.to(dtype)
        tensors[f"{prefix}{module_name}.lora_B.weight"] = B.to(dtype)
    return tensors


def lora_config_fields(model: nn.Module, factors: Factors) -> dict[str, Any]:
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


def check_task_type(task_type: str | None) -> None:
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise AdapterError(
            f"task_type {task_type!r} is not a PEFT task type; use one of {', '.join(PEFT_TASK_TYPES)} or None"
        )


def export_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype an export writes in ("float32", "float16", "bfloat16" or the dtype itself)."""
    if isinstance(dtype, str) and dtype in EXPORT_DTYPES:
        return EXPORT_DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in EXPORT_DTYPES.values():
        return dtype
    raise AdapterError(f"export dtype {dtype!r} is not supported; use one of {', '.join(EXPORT_DTYPES)}")
