"""Exact LoRA factors back into a model: the inverse of `peft_core.export.lora_factors`.

Where an update is known as factors (a LoRA file made elsewhere, a merge of two LoRAs), it becomes an
ordinary peft_core LoRA adapter: it then trains, saves, merges and exports like any other.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_core.errors import AdapterError
from peft_core.export import Factors
from peft_core.methods.lora import LoraConfig
from peft_core.model import AdapterHandle, attach, get_handle


def attach_lora_factors(
    model: nn.Module, factors: Factors, name: str, weight: float = 1.0, trainable: bool = False
) -> AdapterHandle:
    """Attach adapter `name`: a LoRA of rank max(ranks), scaling 1, holding these exact (A, B) per module
    (smaller ranks zero-padded, so B @ A is unchanged). A conv layer's A is its kernel, B a 1x1 one."""
    if not factors:
        raise AdapterError(f"adapter {name!r}: no factors to attach")
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
                raise AdapterError(
                    f"LoRA for {module_name!r} has shapes {tuple(A.shape)} / {tuple(B.shape)}, but the module "
                    f"takes {tuple(adapter.lora_A.shape)} / {tuple(adapter.lora_B.shape)}; is it for another base?"
                )
            adapter.lora_A.zero_()[: A.shape[0]].copy_(A)
            adapter.lora_B.zero_()[:, : B.shape[1]].copy_(B.reshape(B.shape[0], B.shape[1], *adapter.lora_B.shape[2:]))
    handle.after_optimizer_step()  # cached views of the factors are stale
    return handle
