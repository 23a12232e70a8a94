"""PaCA against slow, obviously-right references (spec: shared/specs/paca.md §1.7)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_core import AdapterError, PacaConfig, attach, load
from peft_core.methods.paca import PacaConv2dFunction, PacaLinearFunction, select_columns


def reference_weight(weight: torch.Tensor, delta: torch.Tensor, columns: torch.Tensor, scaling: float) -> torch.Tensor:
    """W_eff built out of place, one column at a time: the definition, differentiable by autograd."""
    parts = [weight[:, j : j + 1] for j in range(weight.shape[1])]
    for k, j in enumerate(columns.tolist()):
        parts[j] = weight[:, j : j + 1] + scaling * delta[:, k : k + 1]
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("input_shape", [(7, 12), (3, 5, 12), (2, 3, 4, 12)])
def test_linear_function_matches_reference_fp64(input_shape):
    out_features, in_features, r, scaling = 9, 12, 4, 1.7
    x = torch.randn(input_shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out_features, in_features, dtype=torch.float64)
    bias = torch.randn(out_features, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(out_features, r, dtype=torch.float64, requires_grad=True)
    columns = torch.randperm(in_features)[:r].sort().values

    w_ref = reference_weight(weight, delta, columns, scaling)
    y_ref = F.linear(x, w_ref, bias)
    grad_out = torch.randn_like(y_ref)
    dx_ref, ddelta_ref, dbias_ref = torch.autograd.grad(y_ref, (x, delta, bias), grad_out)

    resident_weight = w_ref.detach().clone()  # the resident path expects the columns already written
    y = PacaLinearFunction.apply(x, resident_weight, bias, delta, columns, scaling)
    dx, ddelta, dbias = torch.autograd.grad(y, (x, delta, bias), grad_out)
    for ours, ref in ((y, y_ref), (dx, dx_ref), (ddelta, ddelta_ref), (dbias, dbias_ref)):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_linear_function_gradcheck():
    x = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 10, dtype=torch.float64)
    delta = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    columns = torch.tensor([1, 4, 8])

    def resident(x, delta, bias):
        # gradcheck perturbs delta, so write the columns from it each call, as the module does
        return PacaLinearFunction.apply(
            x, reference_weight(weight, delta.detach(), columns, 0.5), bias, delta, columns, 0.5
        )

    assert torch.autograd.gradcheck(resident, (x, delta, bias))


def test_conv2d_function_matches_reference_fp64():
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    columns, scaling, conv_args = torch.tensor([0, 4]), 0.8, ((2, 1), (1, 1), (1, 1))

    w_ref = weight.clone()
    w_ref = w_ref.index_add(1, columns, scaling * delta)  # differentiable out-of-place W_eff
    y_ref = F.conv2d(x, w_ref, bias, *conv_args)
    grad_out = torch.randn_like(y_ref)
    refs = torch.autograd.grad(y_ref, (x, delta, bias), grad_out)

    y = PacaConv2dFunction.apply(x, w_ref.detach(), bias, delta, columns, scaling, conv_args)
    ours = torch.autograd.grad(y, (x, delta, bias), grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_columns_deterministic_sorted_distinct_and_shared_by_siblings():
    a = select_columns(64, 8, seed=3, key="layers.0.q_proj")
    assert torch.equal(a, select_columns(64, 8, seed=3, key="layers.0.q_proj"))
    assert torch.equal(a, a.sort().values) and a.unique().numel() == 8
    assert not torch.equal(a, select_columns(64, 8, seed=4, key="layers.0.q_proj"))

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(32, 32) for _ in range(4))

    model = nn.Sequential(Attention(), Attention())
    attach(model, PacaConfig(targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, share_siblings=True))
    cols = {n: m.adapters["default"].columns for n, m in model.named_modules() if hasattr(m, "adapters")}
    assert torch.equal(cols["0.q_proj"], cols["0.k_proj"]) and torch.equal(cols["0.q_proj"], cols["0.v_proj"])
    assert not torch.equal(cols["0.q_proj"], cols["1.q_proj"])  # each layer draws its own set
    assert not torch.equal(cols["0.q_proj"], cols["0.o_proj"])


def saved_tensor_sizes(model: nn.Module, x: torch.Tensor) -> list[torch.Size]:
    """Shapes of everything autograd saves for backward, except the model's own parameters/buffers."""
    own = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    shapes = []

    def pack(tensor):
        if tensor.data_ptr() not in own:
            shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return shapes


@pytest.mark.parametrize("resident", [True, False])
def test_saved_tensor_audit_keeps_only_the_selected_slice(resident):
    tokens, in_features, r = 50, 64, 4
    x = torch.randn(2, tokens // 2, in_features, requires_grad=True)
    wrapper = nn.Sequential()
    wrapper.add_module("layer", nn.Linear(in_features, 48))
    attach(wrapper, PacaConfig(targets=["layer"], r=r, resident=resident))
    shapes = saved_tensor_sizes(wrapper, x)
    assert all(shape[-1] != in_features for shape in shapes), shapes
    # Activations are the saved tensors with one row per token; they must total exactly T x r.
    activations = [s for s in shapes if torch.Size(s[:-1]).numel() == tokens]
    assert sum(torch.Size(s).numel() for s in activations) == tokens * r, shapes


def masked_full_finetune(model: nn.Linear, columns: torch.Tensor, batches, lr: float) -> torch.Tensor:
    """Plain SGD on the whole weight with the gradient masked to `columns`."""
    weight = model.weight.detach().clone().requires_grad_(True)
    mask = torch.zeros_like(weight)
    mask[:, columns] = 1.0
    for x, target in batches:
        loss = F.mse_loss(F.linear(x, weight, model.bias), target)
        (grad,) = torch.autograd.grad(loss, weight)
        with torch.no_grad():
            weight -= lr * grad * mask
    return weight.detach()


@pytest.mark.parametrize("resident", [True, False])
def test_equals_masked_full_finetuning_over_several_steps(resident):
    torch.manual_seed(torch.seed() % 2**31)
    base = nn.Linear(10, 6).double()
    batches = [(torch.randn(8, 10, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)) for _ in range(5)]
    config = PacaConfig(targets=["layer"], r=3, alpha=6.0, resident=resident)  # s = 2
    eta, s = 0.05, config.scaling

    model = nn.Sequential()
    model.add_module("layer", copy.deepcopy(base))
    handle = attach(model, config)
    optimizer = torch.optim.SGD(handle.trainable_parameters(), lr=eta)
    for x, target in batches:
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()
    adapter = model.layer.adapters["default"]

    # SGD at eta on delta moves W_eff's columns by s^2 * eta * grad_W (spec §1.7.3).
    expected = masked_full_finetune(base, adapter.columns, batches, lr=s * s * eta)
    handle.merge()
    torch.testing.assert_close(model.layer.base_layer.weight, expected, rtol=1e-10, atol=1e-12)


def test_resident_mode_restores_base_weight_and_handles_disable():
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(16, 8))
    original = model.layer.weight.detach().clone()
    handle = attach(model, PacaConfig(targets=["layer"], r=4, resident=True))
    x = torch.randn(5, 16)
    base_out = F.linear(x, original, model.layer.base_layer.bias)
    optimizer = torch.optim.Adam(handle.trainable_parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    adapted = model(x)
    assert not torch.allclose(adapted, base_out)
    assert not torch.equal(model.layer.base_layer.weight, original)  # columns are resident now

    handle.disable("default")
    torch.testing.assert_close(model(x), base_out, rtol=0, atol=0)
    assert torch.equal(model.layer.base_layer.weight, original)  # bit-exact restore
    handle.enable("default")
    torch.testing.assert_close(model(x), adapted)
    # model.state_dict() never exposes resident columns
    assert torch.equal(model.state_dict()["layer.base_layer.weight"], original)


def test_resident_tracks_optimizer_that_bypasses_version_counter():
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(16, 8))
    handle = attach(model, PacaConfig(targets=["layer"], r=4))
    x = torch.randn(5, 16)
    model(x)  # columns written
    delta = model.layer.adapters["default"].delta
    delta.data.add_(1.0)  # .data writes do not bump the version counter
    stale = model(x)
    optimizer = torch.optim.SGD(handle.trainable_parameters(), lr=0.0)
    handle.track_optimizer(optimizer)
    optimizer.step()
    fresh = model(x)
    assert not torch.allclose(stale, fresh)
    handle.disable("default")
    base_out = model(x)
    handle.enable("default")
    expected = base_out + model.layer.adapters["default"].delta_forward(model.layer.base_layer, x)
    torch.testing.assert_close(fresh, expected)


@pytest.mark.parametrize("refresh", [True, False])
def test_tracked_optimizer_step_rewrites_resident_columns_at_once_or_marks_them_stale(refresh):
    """track_optimizer rewrites W[:, idx] = original + s * delta right after the step (no forward
    needed); refresh=False (after a CUDA-graph replay) leaves it to the next forward. Both end exact."""
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(16, 8).double())
    handle = attach(model, PacaConfig(targets=["layer"], r=4, alpha=8))
    adapter, base = model.layer.adapters["default"], model.layer.base_layer
    original = base.weight.detach().clone()
    x = torch.randn(5, 16, dtype=torch.float64)
    model(x)  # columns become resident
    optimizer = torch.optim.SGD(handle.trainable_parameters(), lr=0.5)
    if refresh:
        handle.track_optimizer(optimizer)
    else:
        optimizer.register_step_post_hook(lambda *_: handle.after_optimizer_step(refresh=False))
    model(x).pow(2).sum().backward()
    optimizer.step()
    expected = original.clone()
    expected[:, adapter.columns] += adapter.scaling * adapter.delta.detach()
    written_now = torch.allclose(base.weight, expected, rtol=1e-12, atol=1e-12)
    assert written_now == refresh
    torch.testing.assert_close(model(x), x @ expected.t() + base.bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(base.weight, expected, rtol=1e-12, atol=1e-12)


def test_bf16_autocast_gradient_is_fp32_and_close_to_fp32_reference():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    model32 = nn.Sequential()
    model32.add_module("layer", layer)
    model16 = copy.deepcopy(model32)
    h32 = attach(model32, PacaConfig(targets=["layer"], r=8))
    h16 = attach(model16, PacaConfig(targets=["layer"], r=8))
    x = torch.randn(4, 16, 64)
    model32(x).square().mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model16(x)
    out.float().square().mean().backward()
    (g32,), (g16,) = [p.grad for p in h32.trainable_parameters()], [p.grad for p in h16.trainable_parameters()]
    assert g16.dtype == torch.float32
    assert (g16 - g32).norm() / g32.norm() < 2e-2


def test_reload_under_another_seed_keeps_saved_columns(tmp_path):
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(32, 8))
    pristine = copy.deepcopy(model.layer)
    handle = attach(model, PacaConfig(targets=["layer"], r=4, seed=1))
    with torch.no_grad():
        model.layer.adapters["default"].delta.normal_()
    x = torch.randn(3, 32)
    expected = model(x)
    handle.save(tmp_path / "a")

    fresh = nn.Sequential()
    fresh.add_module("layer", pristine)
    config_path = tmp_path / "a" / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"seed": 1', '"seed": 99'))
    load(fresh, tmp_path / "a")
    assert torch.equal(fresh.layer.adapters["default"].columns, model.layer.adapters["default"].columns)
    torch.testing.assert_close(fresh(x), expected)


def test_rank_larger_than_layer_is_a_clear_error():
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(4, 8))
    with pytest.raises(AdapterError, match="r=8 is larger than 'layer'"):
        attach(model, PacaConfig(targets=["layer"], r=8))
    assert isinstance(model.layer, nn.Linear)  # nothing was wrapped
