"""SPT against its definition (spec §7): exact budget, sensitivities, gradient routing, exact merges."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_core import AdapterError, SptConfig, attach, load
from peft_core.methods import spt
from peft_core.methods.spt import SptModulePlan, Unit, plan_budget, sparse_dense, sparse_linear_delta


class Toy(nn.Module):
    """A conv stem and an MLP: Linear and Conv2d units, with and without biases."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.fc1 = nn.Linear(8, 24, bias=bias)
        self.fc2 = nn.Linear(24, 8, bias=bias)

    def forward(self, image):
        h = self.conv(image).flatten(2).transpose(1, 2)  # (N, HW, 8)
        return self.fc2(torch.tanh(self.fc1(h)))


TARGETS = ["conv", "fc1", "fc2"]


def make_toy(seed=0, bias=True, dtype=torch.float64):
    torch.manual_seed(seed)
    return Toy(bias).to(dtype)


def batches(n=3, seed=1, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(2, 3, 4, 4, generator=generator, dtype=dtype),
            torch.randn(2, 16, 8, generator=generator, dtype=dtype),
        )
        for _ in range(n)
    ]


def mse_step(model, batch):
    image, target = batch
    return (model(image) - target).square().mean()


def prepared_toy(config, bias=True, seed=0):
    model = make_toy(seed, bias)
    return model, spt.prepare(model, config, batches(), mse_step)


# -- budget -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("budget", "alpha"), [(1, 10.0), (37, 10.0), (150, 2.0), (0.2, 1.5), (0.5, 10.0), (613, 1.0)])
def test_trainable_count_equals_the_budget(budget, alpha):
    config = SptConfig(targets=TARGETS, budget=budget, alpha=alpha, r=2, n_batches=3)
    model, plan = prepared_toy(config)
    handle = attach(model, config, prepared=plan)
    trainable = sum(p.numel() for p in handle.trainable_parameters())
    assert trainable == handle.parameter_count("default") == plan.budget
    assert plan.budget == (budget if budget >= 1 else int(budget * plan.scored))


def test_plan_mixes_lora_and_sparse_units():
    config = SptConfig(targets=TARGETS, budget=300, alpha=2.0, r=2, n_batches=3)
    _, plan = prepared_toy(config)
    assert any(p.lora_rank for p in plan.values()) and any(p.weight_indices is not None for p in plan.values())


def test_cost_never_decreases_and_flips_follow_the_threshold_rule():
    # ViT-B shapes, r = 8, alpha = 10 (spec §7.3): sigma = 1228.8 and 3072, costs 12288 and 30720.
    r, alpha = 8, 10.0
    square, wide = r * (768 + 768), r * (768 + 3072)
    assert (square, square / alpha, wide, wide / alpha) == (12288, 1228.8, 30720, 3072.0)
    # Scaled-down units with the same rule: the hit that reaches ceil(sigma) flips the unit.
    units = [Unit("a", 100, 12.5, 40), Unit("b", 100, 30.0, 60), Unit("v", 10, 2.0, 10)]
    scores = [torch.zeros(100), torch.zeros(100), torch.zeros(10)]
    scores[0][:13] = 10.0  # 13 top hits in a: >= 12.5, flips
    scores[1][:29] = 5.0  # 29 hits in b: < 30, stays sparse
    scores[2][:2] = 7.0  # 2 hits in the vector: = 10 / 5, whole vector
    previous = 0
    for budget in range(1, 211):
        flipped, chosen = plan_budget(scores, units, budget)
        cost = sum(u.cost if f else c.numel() for u, f, c in zip(units, flipped, chosen))
        assert cost == budget and cost >= previous
        previous = cost
    flipped, chosen = plan_budget(scores, units, 40 + 29 + 10)
    assert flipped == [True, False, True] and torch.equal(chosen[1], torch.arange(29))
    with pytest.raises(AdapterError, match="budget of 211 exceeds the 210 scored scalars"):
        plan_budget(scores, units, 211)


def test_ties_break_by_index_and_plans_are_deterministic():
    units = [Unit("a", 6, math.inf, 0), Unit("b", 6, math.inf, 0)]
    scores = [torch.ones(6), torch.ones(6)]
    _, chosen = plan_budget(scores, units, 8)
    assert torch.equal(chosen[0], torch.arange(6)) and torch.equal(chosen[1], torch.arange(2))
    config = SptConfig(targets=TARGETS, budget=120, alpha=3.0, r=2, n_batches=3)
    (_, first), (_, second) = prepared_toy(config), prepared_toy(config)
    for name in TARGETS:
        a, b = first[name], second[name]
        assert a.lora_rank == b.lora_rank and a.bias_full == b.bias_full
        for x, y in ((a.weight_indices, b.weight_indices), (a.bias_indices, b.bias_indices)):
            assert (x is None and y is None) or torch.equal(x, y)


# -- sensitivities --------------------------------------------------------------------------------
def test_scores_are_summed_squared_batch_gradients_and_leave_the_model_as_it_was():
    model = make_toy()
    model.fc2.weight.requires_grad_(False)
    model.train()
    reference = copy.deepcopy(model)
    data = batches(4)
    scores = spt.sensitivity_scores(model, SptConfig(targets=TARGETS, n_batches=3), data, mse_step)
    expected = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    reference.eval().requires_grad_(True)
    for batch in data[:3]:  # n_batches = 3: the fourth batch is never used
        grads = torch.autograd.grad(mse_step(reference, batch), list(reference.parameters()))
        for (name, _), grad in zip(reference.named_parameters(), grads):
            expected[name] += grad.square()
    assert sorted(scores) == sorted(expected)
    for name, score in scores.items():
        torch.testing.assert_close(score, expected[name].float(), rtol=1e-5, atol=1e-12)
    assert model.training and not model.fc2.weight.requires_grad and model.fc1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_taylor_scores_rank_like_brute_force_loss_drops():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).double()
    x, target = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 5, dtype=torch.float64)
    model = nn.Sequential()
    model.add_module("layer", layer)

    def loss_of(weight):
        return (F.linear(x, weight, layer.bias) - target).square().mean()

    scores = spt.sensitivity_scores(
        model, SptConfig(targets=["layer"]), [(x, target)], lambda m, b: (m(b[0]) - b[1]).square().mean()
    )
    weight = layer.weight.detach()
    g = torch.sqrt(scores["layer.weight"].double())  # |g|
    eps, base_loss, drops = 1e-4, loss_of(weight), torch.empty_like(weight)
    signed = torch.func.grad(loss_of)(weight)
    for index in range(weight.numel()):
        step = torch.zeros_like(weight).view(-1)
        step[index] = eps * signed.view(-1)[index]
        drops.view(-1)[index] = base_loss - loss_of(weight - step.view_as(weight))
    torch.testing.assert_close(g, signed.abs(), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(drops, eps * signed.square(), rtol=1e-2, atol=1e-12)  # drop = eps g^2 to first order
    ranks = lambda t: torch.argsort(torch.argsort(t.reshape(-1))).double()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([ranks(drops), ranks(scores["layer.weight"])]))[0, 1]
    assert spearman > 0.99


# -- gradient routing, forward -----------------------------------------------------------------------
def _sparse_layer_handle(layer, indices, bias_indices=None):
    model = nn.Sequential()
    model.add_module("layer", layer)
    config = SptConfig(targets=["layer"], budget=1)
    plan = {"layer": SptModulePlan(indices, 0, bias_indices)}
    handle = attach(model, config, prepared=plan)
    with torch.no_grad():
        handle.state_dict()["layer.weight_values"].normal_()
    return model, handle


@pytest.mark.parametrize("k", [3, 40])  # the index-add path (k < in) and the dense path
def test_sparse_linear_matches_dense_reference_and_routes_gradients(k):
    torch.manual_seed(0)
    layer = nn.Linear(10, 7).double()
    indices = torch.randperm(70)[:k].sort().values
    model, handle = _sparse_layer_handle(layer, indices, torch.tensor([1, 4]))
    adapter = model.layer.adapters["default"]
    with torch.no_grad():
        adapter.bias_values.normal_()
    x = torch.randn(4, 3, 10, dtype=torch.float64, requires_grad=True)
    dense = sparse_dense(adapter.weight_indices, adapter.weight_values.detach(), (7, 10)).requires_grad_(True)
    dense_bias = sparse_dense(adapter.bias_indices, adapter.bias_values.detach(), (7,))
    reference = F.linear(x, layer.weight + dense, layer.bias + dense_bias)
    output = model(x)
    torch.testing.assert_close(output, reference, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(output)
    output.backward(g)
    (dense_grad,) = torch.autograd.grad(reference, dense, g)
    torch.testing.assert_close(adapter.weight_values.grad, dense_grad.reshape(-1)[indices], rtol=1e-10, atol=1e-12)
    assert layer.weight.grad is None and layer.bias.grad is None
    assert sorted(n for n, p in model.named_parameters() if p.grad is not None) == [
        "layer.adapters.default.bias_values",
        "layer.adapters.default.weight_values",
    ]


def test_sparse_conv_gradient_is_the_masked_dense_gradient():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    indices = torch.randperm(108)[:20].sort().values
    model, _ = _sparse_layer_handle(layer, indices)
    adapter = model.layer.adapters["default"]
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    dense = sparse_dense(adapter.weight_indices, adapter.weight_values.detach(), (4, 3, 3, 3)).requires_grad_(True)
    reference = F.conv2d(x, layer.weight + dense, None, 1, 1)
    output = model(x)
    torch.testing.assert_close(output, reference, rtol=1e-12, atol=1e-12)
    output.square().sum().backward()
    (dense_grad,) = torch.autograd.grad(reference.square().sum(), dense)
    torch.testing.assert_close(adapter.weight_values.grad, dense_grad.reshape(-1)[indices], rtol=1e-10, atol=1e-12)


def test_sparse_linear_delta_function_matches_dense():
    x = torch.randn(5, 6, dtype=torch.float64)
    rows, cols, values = torch.tensor([0, 2, 2]), torch.tensor([1, 1, 5]), torch.randn(3, dtype=torch.float64)
    dense = torch.zeros(4, 6, dtype=torch.float64).index_put((rows, cols), values)
    torch.testing.assert_close(sparse_linear_delta(x, rows, cols, values, 4), x @ dense.T, rtol=1e-12, atol=1e-12)


def test_adamw_with_weight_decay_moves_only_the_chosen_entries():
    config = SptConfig(targets=TARGETS, budget=200, alpha=2.0, r=2, n_batches=3)
    model, plan = prepared_toy(config)
    base = copy.deepcopy(model.state_dict())
    handle = attach(model, config, prepared=plan)
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2, weight_decay=0.5)
    for batch in batches(4):
        optimizer.zero_grad()
        mse_step(model, batch).backward()
        optimizer.step()
    for key, value in model.state_dict().items():
        if ".base_layer." in key:
            assert torch.equal(value, base[key.replace(".base_layer", "")]), key  # the base is never written
    handle.merge()
    for name in TARGETS:
        merged = model.get_submodule(name).base_layer.weight.detach().reshape(-1)
        changed = torch.nonzero(merged != base[f"{name}.weight"].reshape(-1)).flatten()
        if plan[name].weight_indices is not None:
            assert set(changed.tolist()) <= set(plan[name].weight_indices.tolist())
    handle.unmerge()
    for key, value in model.state_dict().items():
        if ".base_layer." in key:
            assert torch.equal(value, base[key.replace(".base_layer", "")]), key  # bit-exact unmerge


# -- save / load / export ----------------------------------------------------------------------------
def test_save_load_round_trip_is_bitwise_and_indices_are_compact(tmp_path):
    config = SptConfig(targets=TARGETS, budget=150, alpha=2.0, r=2, n_batches=3)
    model, plan = prepared_toy(config)
    handle = attach(model, config, prepared=plan)
    with torch.no_grad():
        for tensor in handle.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(std=0.1)
    handle.save(tmp_path / "spt")
    state = handle.state_dict()
    assert all(v.dtype == torch.int32 for k, v in state.items() if k.endswith("indices"))
    image = batches(1)[0][0]
    expected = model(image)
    fresh = make_toy()
    loaded = load(fresh, tmp_path / "spt")
    assert loaded.parameter_count("default") == plan.budget
    assert torch.equal(fresh(image), expected)


def test_exports_as_lora_without_bias_deltas(tmp_path):
    peft = pytest.importorskip("peft")
    config = SptConfig(targets=TARGETS, budget=150, alpha=2.0, r=2, n_batches=3)
    model, plan = prepared_toy(config, bias=False)
    handle = attach(model, config, prepared=plan)
    with torch.no_grad():
        for tensor in handle.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_(std=0.1)
    image = batches(1)[0][0]
    expected = model(image)
    handle.export(tmp_path / "peft", format="peft")
    exported = peft.PeftModel.from_pretrained(make_toy(bias=False), tmp_path / "peft", torch_dtype=torch.float64)
    torch.testing.assert_close(exported.double()(image), expected, rtol=1e-6, atol=1e-6)

    with_bias, plan = prepared_toy(SptConfig(targets=["fc1"], budget=30, beta=1.0, n_batches=3))
    handle = attach(with_bias, SptConfig(targets=["fc1"], budget=30, beta=1.0, n_batches=3), prepared=plan)
    if plan["fc1"].bias_full or (plan["fc1"].bias_indices is not None and plan["fc1"].bias_indices.numel()):
        with pytest.raises(AdapterError, match="not exactly low-rank"):
            handle.export(tmp_path / "bias", format="peft")


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "calibration data is empty"),
        (
            [(torch.randn(2, 5, 4, 4, dtype=torch.float64), None)],
            r"batch 0 \(\(a torch.float64 tensor of shape \(2, 5, 4, 4\)",
        ),
    ],
)
def test_bad_calibration_data_fails_clearly_and_changes_nothing(data, message):
    model = make_toy()
    reference = copy.deepcopy(model)
    with pytest.raises(AdapterError, match=message):
        spt.prepare(model, SptConfig(targets=TARGETS), data, mse_step)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    with pytest.raises(AdapterError, match="output has no loss"):
        spt.prepare(model, SptConfig(targets=TARGETS), [torch.randn(1, 3, 4, 4, dtype=torch.float64)])


def test_config_checks_and_plan_mismatch():
    with pytest.raises(AdapterError, match="alpha must be >= 1"):
        SptConfig(targets=["fc1"], alpha=0.5)
    with pytest.raises(AdapterError, match="budget must be a count >= 1 or a fraction"):
        SptConfig(targets=["fc1"], budget=2.5)
    config = SptConfig(targets=TARGETS, budget=20, n_batches=3)
    _, plan = prepared_toy(config)
    with pytest.raises(AdapterError, match="the prepared data was made for 'conv', which these targets do not select"):
        attach(make_toy(), SptConfig(targets=["fc1", "fc2"], budget=20), prepared=plan)
