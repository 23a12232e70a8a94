"""QPaCA / QLoRA on a bitsandbytes NF4 base (spec §1.7.5). Skipped, with the reason, where
bitsandbytes is missing or has no 4-bit backend for this machine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_core import AdapterError, LoraConfig, PacaConfig, attach
from peft_core.methods.paca import PacaLinearFunction

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install peft-studio[quant])")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def nf4_model(in_features: int = 64, out_features: int = 48) -> tuple[nn.Module, torch.Tensor]:
    """A one-layer model whose layer is NF4; returns it and the dequantized weight."""
    dense = nn.Linear(in_features, out_features, dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    try:
        layer = layer.to(DEVICE)  # quantizes
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        layer(torch.zeros(1, in_features, dtype=torch.bfloat16, device=DEVICE))
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"bitsandbytes has no 4-bit backend on {DEVICE}: {error}")
    model = nn.Sequential()
    model.add_module("layer", layer)
    return model, weight


def test_qpaca_at_init_equals_dequantized_base_and_matches_dense_reference():
    model, weight = nf4_model()
    bias = model.layer.bias
    handle = attach(model, PacaConfig(targets=["layer"], r=8, alpha=16.0))
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    torch.testing.assert_close(model(x), F.linear(x, weight, bias.to(torch.bfloat16)), rtol=0, atol=0)

    adapter = model.layer.adapters["default"]
    with torch.no_grad():
        adapter.delta.normal_(std=0.05)
    packed_before = model.layer.base_layer.weight.data.clone()
    y = model(x)
    grad_out = torch.randn_like(y)
    dx, ddelta = torch.autograd.grad(y, (x, adapter.delta), grad_out)
    assert torch.equal(model.layer.base_layer.weight.data, packed_before)  # 4-bit storage untouched

    # Reference: the dense resident function on the dequantized weight with the columns written in.
    dense = weight.clone()
    cols = adapter.columns
    dense[:, cols] = (dense[:, cols].float() + adapter.scaling * adapter.delta).to(torch.bfloat16)
    delta_ref = adapter.delta.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = PacaLinearFunction.apply(x_ref, dense, bias, delta_ref, cols, adapter.scaling)
    dx_ref, ddelta_ref = torch.autograd.grad(y_ref, (x_ref, delta_ref), grad_out)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_ref, rtol=0, atol=0)
    assert ddelta.dtype == torch.float32
    torch.testing.assert_close(ddelta, ddelta_ref, rtol=1e-5, atol=1e-5)
    assert len(handle.trainable_parameters()) == 1


def test_qpaca_additive_equals_fused_and_merge_is_refused_clearly():
    model, _ = nf4_model()
    handle = attach(model, PacaConfig(targets=["layer"], r=8))
    with torch.no_grad():
        model.layer.adapters["default"].delta.normal_(std=0.05)
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=DEVICE)
    fused = model(x)
    model.layer.adapters["default"].resident = False
    torch.testing.assert_close(model(x), fused, rtol=2e-2, atol=2e-2)
    with pytest.raises(AdapterError, match="quantized base weight"):
        handle.merge()


def test_qlora_trains_on_nf4_base():
    model, weight = nf4_model()
    handle = attach(model, LoraConfig(targets=["layer"], r=4))
    x = torch.randn(8, 64, dtype=torch.bfloat16, device=DEVICE)
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(x).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
