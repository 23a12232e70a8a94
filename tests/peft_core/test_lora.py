"""LoRA against slow, obviously-right references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_core import AdapterError, LoraConfig, attach
from peft_core.methods.lora import LoraLinearFunction


def reference_lora(x, weight, bias, A, B, scaling):
    return F.linear(x, weight + scaling * B @ A, bias)


@pytest.mark.parametrize("input_shape", [(6, 10), (2, 3, 10), (2, 2, 2, 10)])
def test_linear_function_matches_reference_fp64(input_shape):
    x = torch.randn(input_shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 10, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    y_ref = reference_lora(x, weight, bias, A, B, 0.75)
    grad_out = torch.randn_like(y_ref)
    refs = torch.autograd.grad(y_ref, (x, bias, A, B), grad_out)
    y = LoraLinearFunction.apply(x, weight, bias, A, B, 0.75)
    ours = torch.autograd.grad(y, (x, bias, A, B), grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_linear_function_gradcheck():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b, A, B: LoraLinearFunction.apply(x, weight, b, A, B, 1.3), (x, bias, A, B)
    )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_module_linear_fp64_forward_and_gradients(use_rslora):
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(12, 9).double())
    config = LoraConfig(targets=["layer"], r=4, alpha=6.0, use_rslora=use_rslora)
    attach(model, config)
    adapter, base = model.layer.adapters["default"], model.layer.base_layer
    assert adapter.lora_A.dtype == torch.float64  # adapters never narrower than the base
    with torch.no_grad():
        adapter.lora_B.normal_()
    expected_scaling = 6.0 / math.sqrt(4) if use_rslora else 6.0 / 4
    assert config.scaling == expected_scaling
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    A = adapter.lora_A.detach().clone().requires_grad_(True)
    B = adapter.lora_B.detach().clone().requires_grad_(True)
    y_ref = reference_lora(x, base.weight, base.bias, A, B, expected_scaling)
    y = model(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(y)
    torch.autograd.backward(y, grad_out)
    torch.autograd.backward(y_ref, grad_out)
    torch.testing.assert_close(adapter.lora_A.grad, A.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter.lora_B.grad, B.grad, rtol=1e-12, atol=1e-12)
    assert base.weight.grad is None


def test_module_conv2d_fp64_matches_dense_update():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(4, 6, 3, stride=2, padding=1).double())
    attach(model, LoraConfig(targets=["conv"], r=2, alpha=4.0))
    adapter, base = model.conv.adapters["default"], model.conv.base_layer
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    dense = base.weight + 2.0 * torch.einsum("or,rikl->oikl", adapter.lora_B[:, :, 0, 0], adapter.lora_A)
    torch.testing.assert_close(model(x), F.conv2d(x, dense, base.bias, 2, 1), rtol=1e-12, atol=1e-12)


def test_dropout_applies_to_adapter_input_only_in_training():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(32, 32))
    attach(model, LoraConfig(targets=["layer"], r=4, dropout=0.5))
    with torch.no_grad():
        model.layer.adapters["default"].lora_B.normal_()
    x = torch.randn(8, 32)
    model.train()
    assert not torch.allclose(model(x), model(x))  # stochastic
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_bf16_activations_give_fp32_gradients():
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(64, 32).to(torch.bfloat16))
    handle = attach(model, LoraConfig(targets=["layer"], r=4))
    model(torch.randn(5, 64, dtype=torch.bfloat16)).float().sum().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in handle.trainable_parameters())


def test_bad_config_values_are_clear_errors():
    with pytest.raises(AdapterError, match="r must be >= 1"):
        LoraConfig(targets=["x"], r=0)
    with pytest.raises(AdapterError, match="dropout"):
        LoraConfig(targets=["x"], dropout=1.5)
    with pytest.raises(AdapterError, match="targets"):
        LoraConfig(targets=[])


def test_fused_lora_keeps_only_its_input_for_backward():
    """Saved-tensor audit: the activations kept for backward are x alone (T x in); h = x A^T (T x r)
    is recomputed in backward, so a higher rank costs no activation memory."""
    tokens, in_features, r = 40, 24, 8
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(in_features, 16))
    attach(model, LoraConfig(targets=["layer"], r=r))
    own = {t.data_ptr() for t in model.parameters()}
    activations = []

    def pack(tensor):
        if tensor.data_ptr() not in own and tensor.dim() >= 2 and tensor.shape[0] == tokens:
            activations.append(tuple(tensor.shape))
        return tensor

    x = torch.randn(tokens, in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    assert activations == [(tokens, in_features)], activations


def test_fused_lora_under_autocast_matches_fp32_and_keeps_no_weight_copy():
    """An fp32 base under bf16 autocast: bf16 math, fp32 adapter gradients close to the fp32 ones,
    and backward keeps the base weight itself, not a bf16 copy of it (that would be a second weight)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(32, 16))
    handle = attach(model, LoraConfig(targets=["layer"], r=4, alpha=8))
    adapter = model.layer.adapters["default"]
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(6, 32)
    reference = copy.deepcopy(model)
    (reference(x) ** 2).sum().backward()

    weight_copies = []

    def pack(tensor):
        if (
            tensor.shape == model.layer.base_layer.weight.shape
            and tensor.data_ptr() != model.layer.base_layer.weight.data_ptr()
        ):
            weight_copies.append(tensor.dtype)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16
        (out.float() ** 2).sum().backward()
    assert weight_copies == []
    want = reference.layer.adapters["default"]
    for got, expected in ((adapter.lora_A.grad, want.lora_A.grad), (adapter.lora_B.grad, want.lora_B.grad)):
        assert got.dtype == torch.float32
        assert (got - expected).norm() / expected.norm() < 0.05
    assert handle.trainable_parameters()
