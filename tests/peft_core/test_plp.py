"""PLP (Break-for-Make) against the spec's CPU verifications (shared/specs/break_for_make.md §6)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_core import AdapterError, LoraConfig, PlpConfig, attach, make_joint
from peft_core.methods.plp import frozen_bases, riemannian_precondition


def two_layer_model() -> nn.Module:
    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(12, 10).double())
    model.add_module("to_k", nn.Linear(10, 8).double())
    return model


def test_forward_is_base_plus_u_v_and_rank_is_at_most_r():
    model = two_layer_model()
    attach(model, PlpConfig(targets=["to_q"], r=3))
    adapter, base = model.to_q.adapters["default"], model.to_q.base_layer
    with torch.no_grad():
        adapter.learnable_up.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    up = torch.cat([adapter.frozen_up, adapter.learnable_up])  # (10, 3)
    down = torch.cat([adapter.frozen_down, adapter.learnable_down], dim=1)  # (3, 12)
    assert up.shape == (10, 3) and down.shape == (3, 12)
    assert adapter.frozen_up.shape == (5, 3) and adapter.frozen_down.shape == (3, 6)
    torch.testing.assert_close(
        model.to_q(x), F.linear(x, base.weight, base.bias) + x @ down.t() @ up.t(), rtol=1e-12, atol=1e-12
    )
    assert torch.linalg.matrix_rank(adapter.delta_weight(base)) <= 3


@pytest.mark.parametrize("factor_weights", [(1.0, 1.0), (0.5, 2.0)])
def test_gradients_reach_only_the_learnable_halves_and_match_the_reference(factor_weights):
    """The fused path (LoRA's Function on [A; B], [C | D]) against autograd through the plain formula."""
    model = two_layer_model()
    attach(model, PlpConfig(targets=["to_q"], r=3))
    adapter, base = model.to_q.adapters["default"], model.to_q.base_layer
    adapter.set_factor_weights(*factor_weights)
    with torch.no_grad():
        adapter.learnable_up.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 10, dtype=torch.float64)
    (model.to_q(x) * upstream).sum().backward()
    got = (x.grad, adapter.learnable_up.grad, adapter.learnable_down.grad)

    B = adapter.learnable_up.detach().clone().requires_grad_(True)
    D = adapter.learnable_down.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    up = torch.cat([adapter.frozen_up, factor_weights[0] * B])
    down = torch.cat([adapter.frozen_down, factor_weights[1] * D], dim=1)
    reference = F.linear(x_ref, base.weight, base.bias) + x_ref @ down.t() @ up.t()
    (reference * upstream).sum().backward()
    for value, want in zip(got, (x_ref.grad, B.grad, D.grad)):
        torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-12)
    assert adapter.frozen_up.grad is None and adapter.frozen_down.grad is None


def test_bases_are_orthonormal_and_reproducible_in_a_new_process():
    # basis_rows=0: the tight basis (160 + 384 rows), the default before the released 1280.
    a, c = frozen_bases(320, 768, 16, seed=0, key="down.attn2.to_k", basis_rows=0)
    # A and C^T are disjoint row blocks of one orthonormal Q, so A^T A + C C^T <= I.
    eigenvalues = torch.linalg.eigvalsh((a.t() @ a + c @ c.t()).double())
    assert eigenvalues.min() >= -1e-6 and eigenvalues.max() <= 1 + 1e-5
    full = torch.cat([a, c.t()])  # rows of Q, here covering all of it (n = 160 + 384 >= r)
    torch.testing.assert_close(full.t() @ full, torch.eye(16), atol=1e-5, rtol=0)
    code = (
        "import torch; from peft_core.methods.plp import frozen_bases as f; "
        "a, c = f(320, 768, 16, seed=0, key='down.attn2.to_k', basis_rows=0); "
        "print(float(a.double().sum()), float(c.double().sum()))"
    )
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert [float(v) for v in printed] == [float(a.double().sum()), float(c.double().sum())]


def test_frozen_halves_stay_bit_identical_under_adamw_weight_decay():
    model = two_layer_model()
    handle = attach(model, PlpConfig(targets=["to_q", "to_k"], r=4))
    frozen = {k: v.clone() for k, v in handle.state_dict().items() if "frozen" in k}
    learnable_before = {k: v.clone() for k, v in handle.state_dict().items() if "learnable" in k}
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    x, target = torch.randn(16, 12, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    for _ in range(50):
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()
    state = handle.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(not torch.equal(state[k], v) for k, v in learnable_before.items())
    assert {n.rsplit(".", 1)[1] for n, _ in handle.named_trainable_parameters()} == {"learnable_up", "learnable_down"}


def train_half(model, handle, name: str, which: str, steps: int = 20) -> None:
    """Train only one half (B = "learnable_up" for style, D = "learnable_down" for content)."""
    handle.set_trainable(name)
    parameters = [p for n, p in handle.named_trainable_parameters() if n.endswith(which)]
    optimizer = torch.optim.AdamW(parameters, lr=5e-2)
    x, target = torch.randn(16, 12, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        optimizer.step()


def test_make_joint_pairs_style_up_with_content_down():
    model = two_layer_model()
    handle = attach(model, PlpConfig(targets=["to_q", "to_k"], r=4), name="content")
    handle.add(PlpConfig(targets=["to_q", "to_k"], r=4), name="style")
    handle.disable("style")
    train_half(model, handle, "content", "learnable_down")
    handle.enable("style")
    handle.disable("content")
    train_half(model, handle, "style", "learnable_up")
    handle.enable("content")
    # A content run with no style partner leaves B exactly zero.
    assert all(torch.count_nonzero(w.adapters["content"].learnable_up) == 0 for _, w in handle.wrappers())

    make_joint(handle, content="content", style="style", name="joint")
    assert handle.adapter_names == ["content", "style", "joint"]
    for _, wrapper in handle.wrappers():
        base, joint = wrapper.base_layer, wrapper.adapters["joint"]
        content, style = wrapper.adapters["content"], wrapper.adapters["style"]
        rows, cols = joint.frozen_up.shape[0], joint.frozen_down.shape[1]
        dw_joint, dw_content, dw_style = (a.delta_weight(base) for a in (joint, content, style))
        a, c = joint.frozen_up, joint.frozen_down
        torch.testing.assert_close(dw_joint[:rows, :cols], a @ c)  # shared AC
        torch.testing.assert_close(dw_joint[:rows, cols:], dw_content[:rows, cols:])  # A D_c from content
        torch.testing.assert_close(dw_joint[rows:, :cols], dw_style[rows:, :cols])  # B_s C from style
        torch.testing.assert_close(dw_joint[rows:, cols:], style.learnable_up @ content.learnable_down)
        assert not torch.allclose(dw_joint, dw_content + dw_style)  # a product pairing, not a sum
    trainable = {n.split(".adapters.")[1].split(".")[0] for n, _ in handle.named_trainable_parameters()}
    assert trainable == {"joint"}


def test_make_joint_refuses_mismatched_bases():
    model = two_layer_model()
    handle = attach(model, PlpConfig(targets=["to_q"], r=4, seed=0), name="content")
    handle.add(PlpConfig(targets=["to_q"], r=4, seed=1), name="style")
    with pytest.raises(AdapterError, match="different frozen bases"):
        make_joint(handle)
    handle.add(LoraConfig(targets=["to_q"]), name="lora")
    with pytest.raises(AdapterError, match="needs a PLP adapter named 'lora'"):
        make_joint(handle, content="lora")


def test_make_joint_role_swap_pairs_content_up_with_style_down():
    model = two_layer_model()
    handle = attach(model, PlpConfig(targets=["to_q"], r=4), name="content")
    handle.add(PlpConfig(targets=["to_q"], r=4), name="style")
    for _, wrapper in handle.wrappers():
        with torch.no_grad():
            for adapter in wrapper.adapters.values():
                adapter.learnable_up.normal_()
                adapter.learnable_down.normal_()
    make_joint(handle, name="joint", content_factor="up")
    for _, wrapper in handle.wrappers():
        joint = wrapper.adapters["joint"]
        assert torch.equal(joint.learnable_up, wrapper.adapters["content"].learnable_up)
        assert torch.equal(joint.learnable_down, wrapper.adapters["style"].learnable_down)
    with pytest.raises(AdapterError, match="content_factor"):
        make_joint(handle, name="other", content_factor="left")


def test_riemannian_preconditioned_sgd_step_matches_the_closed_form():
    """Spec §6: on a 2-layer toy, one preconditioned SGD step on B and D equals
    B - lr grad_U (V V^T + delta I)^-1 [B rows] and D - lr (U^T U + delta I)^-1 grad_V [D columns],
    with the full factors' gradients taken by plain autograd in float64."""
    from peft_core import precondition_gradients

    model = two_layer_model()
    handle = attach(model, PlpConfig(targets=["to_q", "to_k"], r=3), name="joint")
    for _, wrapper in handle.wrappers():
        with torch.no_grad():
            wrapper.adapters["joint"].learnable_up.normal_()
    x, target = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
    delta, lr = 1e-3, 0.1

    expected = {}
    for name, wrapper in handle.wrappers():
        adapter, base = wrapper.adapters["joint"], wrapper.base_layer
        up = torch.cat([adapter.frozen_up, adapter.learnable_up.detach()]).requires_grad_(True)
        down = torch.cat([adapter.frozen_down, adapter.learnable_down.detach()], dim=1).requires_grad_(True)
        expected[name] = (base, up, down)
    hidden = (
        F.linear(x, expected["to_q"][0].weight, expected["to_q"][0].bias)
        + x @ expected["to_q"][2].t() @ expected["to_q"][1].t()
    )
    out = (
        F.linear(hidden, expected["to_k"][0].weight, expected["to_k"][0].bias)
        + hidden @ expected["to_k"][2].t() @ expected["to_k"][1].t()
    )
    F.mse_loss(out, target).backward()

    optimizer = torch.optim.SGD(handle.trainable_parameters(), lr=lr)
    F.mse_loss(model(x), target).backward()
    precondition_gradients(handle, "joint", delta)
    optimizer.step()
    for name, wrapper in handle.wrappers():
        adapter = wrapper.adapters["joint"]
        _, up, down = expected[name]
        eye = torch.eye(3, dtype=torch.float64)
        new_up = up.detach() - lr * up.grad @ torch.linalg.inv(down.detach() @ down.detach().t() + delta * eye)
        new_down = down.detach() - lr * torch.linalg.inv(up.detach().t() @ up.detach() + delta * eye) @ down.grad
        rows, cols = adapter.frozen_up.shape[0], adapter.frozen_down.shape[1]
        torch.testing.assert_close(adapter.learnable_up.detach(), new_up[rows:], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(adapter.learnable_down.detach(), new_down[:, cols:], rtol=1e-10, atol=1e-10)
        # the frozen halves did not move
        torch.testing.assert_close(adapter.frozen_up, up.detach()[:rows], rtol=0, atol=0)


def saved_activations(model: nn.Module, run) -> list[tuple[tuple[int, ...], int]]:
    """(shape, data_ptr) of every tensor autograd saves while `run()` runs forward and backward,
    leaving out the model's own parameters and buffers (saved by reference, no memory)."""
    own = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in own:
            saved.append((tuple(tensor.shape), tensor.data_ptr()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return saved


@pytest.mark.parametrize(
    "r, input_kind, expected",
    [
        (4, "fresh", [(40, 8), (40, 4)]),  # 4r <= in: the half D reads + h, no full input
        (5, "fresh", [(40, 16)]),  # 4r > in: the input itself (h recomputed in backward)
        (4, "view", [(40, 16)]),  # a view of another op's tensor: the input, by reference
    ],
)
def test_fused_plp_keeps_the_smaller_of_its_input_or_half_of_it_plus_h(r, input_kind, expected):
    """Saved-tensor audit: besides references to A, B, C, D (which the module holds anyway), only
    what the learnable halves' gradients need; never a cast or concatenated copy of the factors."""
    tokens = 40
    model = nn.Sequential()
    model.add_module("to_q", nn.Linear(16, 10))
    attach(model, PlpConfig(targets=["to_q"], r=r))
    x = torch.randn(tokens, 16, requires_grad=True)
    if input_kind == "view":
        x = torch.randn(16, tokens, requires_grad=True).t()
    saved = saved_activations(model, lambda: model.to_q(x).sum().backward())
    assert [shape for shape, _ in saved] == expected, saved
    if input_kind == "view":
        assert saved[0][1] == x.data_ptr()


class Siblings(nn.Module):
    """Three projections of one input, as q/k/v in attention."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(12, n).double() for n in (10, 8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], dim=-1)


def plp_reference(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, B, D): the layer's output recomputed by plain autograd, with fresh leaf copies of B and D."""
    adapter, base = layer.adapters["default"], layer.base_layer
    B = adapter.learnable_up.detach().clone().requires_grad_(True)
    D = adapter.learnable_down.detach().clone().requires_grad_(True)
    up, down = torch.cat([adapter.frozen_up, B]), torch.cat([adapter.frozen_down, D], dim=1)
    return F.linear(x, base.weight, base.bias) + x @ down.t() @ up.t(), B, D


@pytest.mark.parametrize("input_kind", ["fresh", "view"])
@pytest.mark.parametrize("trained", ["both", "down", "up"])
def test_sibling_layers_share_what_they_keep_and_get_exact_gradients(input_kind, trained):
    """q/k/v reading one x: a fresh x is kept as ONE shared copy of the half D reads (+ each layer's
    h where B trains); a view is kept by reference, one storage for all three. Gradients exact."""
    model = Siblings()
    attach(model, PlpConfig(targets=["to_q", "to_k", "to_v"], r=3))
    layers = [model.to_q, model.to_k, model.to_v]
    with torch.no_grad():
        for layer in layers:
            layer.adapters["default"].learnable_up.normal_()
            layer.adapters["default"].learnable_up.requires_grad_(trained != "down")
            layer.adapters["default"].learnable_down.requires_grad_(trained != "up")
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    if input_kind == "view":
        x = torch.randn(12, 7, dtype=torch.float64, requires_grad=True).t()
        x.retain_grad()
    upstream = torch.randn(7, 24, dtype=torch.float64)
    saved = saved_activations(model, lambda: (model(x) * upstream).sum().backward())
    inputs = [entry for entry in saved if entry[0][-1] in (6, 12)]  # the whole input or its half
    projections = [entry for entry in saved if entry[0] == (7, 3)]  # h
    if input_kind == "view":
        assert inputs == [((7, 12), x.data_ptr())] * 3 and projections == []
    else:
        assert len({ptr for _, ptr in inputs}) == (0 if trained == "up" else 1)
        assert {shape for shape, _ in inputs} <= {(7, 6)}
        assert len(projections) == (0 if trained == "down" else 3)

    x_ref = x.detach().clone().requires_grad_(True)
    references = [plp_reference(layer, x_ref) for layer in layers]
    (torch.cat([out for out, _, _ in references], dim=-1) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for layer, (_, B, D) in zip(layers, references):
        adapter = layer.adapters["default"]
        for mine, want, trains in (
            (adapter.learnable_up, B, trained != "down"),
            (adapter.learnable_down, D, trained != "up"),
        ):
            if trains:
                torch.testing.assert_close(mine.grad, want.grad, rtol=1e-10, atol=1e-12)
            else:
                assert mine.grad is None


def test_an_input_changed_in_place_between_siblings_is_copied_again():
    """The shared half is keyed by the input's version: a layer reading x after an in-place
    change must not reuse the half copied before it."""
    model = Siblings()
    attach(model, PlpConfig(targets=["to_q", "to_k"], r=3))
    source = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    x = source * 1.0  # a fresh activation that nothing else keeps
    y_q = model.to_q(x)
    with torch.no_grad():
        x.mul_(3.0)
    y_k = model.to_k(x)
    (y_q.sum() + y_k.sum()).backward()
    out_q, _, D_q = plp_reference(model.to_q, source.detach())
    out_k, _, D_k = plp_reference(model.to_k, 3.0 * source.detach())
    (out_q.sum() + out_k.sum()).backward()
    torch.testing.assert_close(model.to_q.adapters["default"].learnable_down.grad, D_q.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.to_k.adapters["default"].learnable_down.grad, D_k.grad, rtol=1e-10, atol=1e-12)


def test_fused_plp_with_an_adapter_weight_matches_the_reference():
    """handle.set_weight(w): y = W x + w U V x on the fused path, gradients included."""
    model = two_layer_model()
    handle = attach(model, PlpConfig(targets=["to_q"], r=3))
    adapter, base = model.to_q.adapters["default"], model.to_q.base_layer
    with torch.no_grad():
        adapter.learnable_up.normal_()
    handle.set_weight("default", 0.7)
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 10, dtype=torch.float64)
    (model.to_q(x) * upstream).sum().backward()
    B = adapter.learnable_up.detach().clone().requires_grad_(True)
    D = adapter.learnable_down.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    up, down = torch.cat([adapter.frozen_up, B]), torch.cat([adapter.frozen_down, D], dim=1)
    (((F.linear(x_ref, base.weight, base.bias) + 0.7 * x_ref @ down.t() @ up.t()) * upstream).sum()).backward()
    for value, want in zip(
        (x.grad, adapter.learnable_up.grad, adapter.learnable_down.grad), (x_ref.grad, B.grad, D.grad)
    ):
        torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Centered PLP (spec pitfall 8): dW = U V - [A; 0][C | 0] = [[0, A D], [B C, B D]], D from zero.
# ---------------------------------------------------------------------------------------------
def test_centered_plp_starts_at_the_base_and_matches_the_block_formula():
    model = two_layer_model()
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    expected = model(x).detach()
    attach(model, PlpConfig(targets=["to_q", "to_k"], r=3, centered=True))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)  # exactly the base at init

    adapter, base = model.to_q.adapters["default"], model.to_q.base_layer
    with torch.no_grad():
        adapter.learnable_up.normal_()
        adapter.learnable_down.normal_()
    upstream = torch.randn(3, 4, 10, dtype=torch.float64)
    (model.to_q(x) * upstream).sum().backward()

    A, C = adapter.frozen_up, adapter.frozen_down
    B = adapter.learnable_up.detach().clone().requires_grad_(True)
    D = adapter.learnable_down.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    blocks = torch.cat(
        [torch.cat([torch.zeros(5, 6, dtype=torch.float64), A @ D], dim=1), torch.cat([B @ C, B @ D], dim=1)], dim=0
    )  # (10, 12)
    reference = F.linear(x_ref, base.weight + blocks, base.bias)
    (reference * upstream).sum().backward()
    torch.testing.assert_close(adapter.delta_weight(base), blocks.detach(), rtol=1e-12, atol=1e-12)
    for value, want in zip(
        (x.grad, adapter.learnable_up.grad, adapter.learnable_down.grad), (x_ref.grad, B.grad, D.grad)
    ):
        torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-12)
    # the unfused path (delta_forward) gives the same output
    torch.testing.assert_close(base(x) + adapter.delta_forward(base, x), reference, rtol=1e-10, atol=1e-12)


def test_make_joint_of_centered_plps_has_no_frozen_block_and_refuses_a_mix():
    model = two_layer_model()
    handle = attach(model, PlpConfig(targets=["to_q", "to_k"], r=4, centered=True), name="content")
    handle.add(PlpConfig(targets=["to_q", "to_k"], r=4, centered=True), name="style")
    for _, wrapper in handle.wrappers():
        with torch.no_grad():
            wrapper.adapters["content"].learnable_down.normal_()
            wrapper.adapters["style"].learnable_up.normal_()
    make_joint(handle, content="content", style="style", name="joint")
    for _, wrapper in handle.wrappers():
        joint, content, style = (wrapper.adapters[n] for n in ("joint", "content", "style"))
        rows, cols = joint.frozen_up.shape[0], joint.frozen_down.shape[1]
        dw = joint.delta_weight(wrapper.base_layer)
        torch.testing.assert_close(
            dw[:rows, :cols], torch.zeros(rows, cols, dtype=dw.dtype), rtol=0, atol=1e-12
        )  # A C - A C
        torch.testing.assert_close(dw[:rows, cols:], joint.frozen_up @ content.learnable_down)
        torch.testing.assert_close(dw[rows:, :cols], style.learnable_up @ joint.frozen_down)
        torch.testing.assert_close(dw[rows:, cols:], style.learnable_up @ content.learnable_down)

    mixed = attach(two_layer_model(), PlpConfig(targets=["to_q"], r=4, centered=True), name="content")
    mixed.add(PlpConfig(targets=["to_q"], r=4), name="style")
    with pytest.raises(AdapterError, match="same `centered` setting"):
        make_joint(mixed)


def test_inference_keeps_and_copies_nothing(monkeypatch):
    """Under no_grad the fused path copies no input half (needs_input_grad still says True there,
    so the Function is told the caller's grad mode); with grad on, the same call does copy."""
    import peft_core.methods.plp as plp

    copies = []
    original = plp.shared_input_half
    monkeypatch.setattr(plp, "shared_input_half", lambda *args: copies.append(1) or original(*args))
    model = Siblings()
    attach(model, PlpConfig(targets=["to_q", "to_k", "to_v"], r=3))
    x = torch.randn(7, 12, dtype=torch.float64)
    with torch.no_grad():
        inference = model(x)
    assert copies == []
    torch.testing.assert_close(model(x), inference, rtol=0, atol=0)
    assert copies == [1, 1, 1]  # called by each layer; the copy itself is made once (shared)


@pytest.mark.parametrize("basis_rows", [0, 1280])
def test_basis_rows_sets_the_frozen_blocks_energy(basis_rows):
    """A and C^T are rows of an N x r orthonormal basis: with the tight N = out/2 + in/2 (basis_rows=0)
    they hold all of it, trace(A^T A + C C^T) = r; with the released N = 1280 each row holds r/N on
    average, so a 64-wide layer keeps about 64/1280 of it."""
    a, c = frozen_bases(64, 64, 8, seed=0, key="mid.attn1.to_q", basis_rows=basis_rows)
    gram = (a.t() @ a + c @ c.t()).double()
    eigenvalues = torch.linalg.eigvalsh(gram)
    assert eigenvalues.min() >= -1e-6 and eigenvalues.max() <= 1 + 1e-5
    energy = float(gram.trace())
    if basis_rows == 0:
        assert energy == pytest.approx(8.0, abs=1e-4)
    else:
        assert 0.25 * 8 * 64 / 1280 < energy < 4 * 8 * 64 / 1280
    # A layer wider than the basis still gets disjoint orthonormal rows (N grows to out/2 + in/2).
    wide_a, wide_c = frozen_bases(2048, 2048, 4, seed=0, key="wide", basis_rows=1280)
    wide = torch.cat([wide_a, wide_c.t()]).double()
    torch.testing.assert_close(wide.t() @ wide, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)


def test_the_config_default_is_the_released_1280_row_basis():
    model = two_layer_model()
    handle = attach(model, PlpConfig(targets=["to_q"], r=3))
    adapter = model.to_q.adapters["default"]
    a, c = frozen_bases(10, 12, 3, seed=0, key="to_q", basis_rows=1280)
    assert handle.configs["default"].basis_rows == 1280
    torch.testing.assert_close(adapter.frozen_up, a.double(), rtol=0, atol=0)
    torch.testing.assert_close(adapter.frozen_down, c.double(), rtol=0, atol=0)
    with pytest.raises(AdapterError, match="basis_rows"):
        PlpConfig(targets=["to_q"], basis_rows=-1)


def test_an_adapter_saved_before_basis_rows_existed_reloads_and_resaves_with_its_tight_basis(tmp_path):
    """A folder written before basis_rows was a field recorded none; its bases were cut from
    out/2 + in/2 rows. Loading it must say basis_rows=0 (not the new default 1280), so a re-save and
    a fresh attach from its config reproduce those bases."""
    import copy

    from peft_core import load
    from peft_core.io import read_json, write_json

    base = two_layer_model()
    model, fresh = copy.deepcopy(base), copy.deepcopy(base)
    handle = attach(model, PlpConfig(targets=["to_q", "to_k"], r=3, basis_rows=0))
    with torch.no_grad():
        for parameter in handle.trainable_parameters():
            parameter.normal_()
    handle.save(tmp_path / "old")
    record = read_json(tmp_path / "old" / "adapter_config.json")
    del record["config"]["basis_rows"]
    write_json(tmp_path / "old" / "adapter_config.json", record)
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = model(x)

    reloaded = load(fresh, tmp_path / "old")
    assert reloaded.configs["default"].basis_rows == 0
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    reloaded.save(tmp_path / "resaved")
    assert read_json(tmp_path / "resaved" / "adapter_config.json")["config"]["basis_rows"] == 0
    again = attach(two_layer_model(), reloaded.configs["default"])
    a, c = frozen_bases(10, 12, 3, seed=0, key="to_q", basis_rows=0)
    torch.testing.assert_close(again.model.to_q.adapters["default"].frozen_up, a.double(), rtol=0, atol=0)
    torch.testing.assert_close(again.model.to_q.adapters["default"].frozen_down, c.double(), rtol=0, atol=0)


def test_make_joint_keeps_the_initial_down_in_the_named_layers():
    """initial_down_in (the released make's re-initialisation): those layers' joint D is the seeded
    D_0 both break runs started from; the other layers get the content run's trained D."""
    model = two_layer_model()
    handle = attach(model, PlpConfig(targets=["to_q", "to_k"], r=4), name="content")
    initial = {m: w.adapters["content"].learnable_down.detach().clone() for m, w in handle.wrappers("content")}
    train_half(model, handle, "content", "learnable_down")
    handle.add(PlpConfig(targets=["to_q", "to_k"], r=4), name="style")
    train_half(model, handle, "style", "learnable_up")
    make_joint(handle, initial_down_in={"to_q"})
    joint = {m: w.adapters for m, w in handle.wrappers("joint")}
    torch.testing.assert_close(joint["to_q"]["joint"].learnable_down, initial["to_q"], rtol=0, atol=0)
    assert not torch.equal(joint["to_q"]["content"].learnable_down, initial["to_q"])  # it did train
    assert torch.equal(joint["to_k"]["joint"].learnable_down, joint["to_k"]["content"].learnable_down)
    for module in ("to_q", "to_k"):
        assert torch.equal(joint[module]["joint"].learnable_up, joint[module]["style"].learnable_up)
    with pytest.raises(AdapterError, match="initial_down_in"):
        make_joint(handle, name="other", initial_down_in={"ff"})


def test_riemannian_scaling_leaves_a_gradient_unscaled_when_the_other_factor_is_zero():
    """The released optimizer's fallback: a Gram matrix of norm <= 1e-6 is replaced by I."""
    up, down = torch.zeros(6, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    grad_up, grad_down = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    scaled_up, scaled_down = riemannian_precondition(grad_up, grad_down, up, down, delta=0.0)
    torch.testing.assert_close(scaled_down, grad_down, rtol=0, atol=0)  # U^T U = 0: unscaled
    want_up = grad_up @ torch.linalg.inv(down @ down.t())
    torch.testing.assert_close(scaled_up, want_up, rtol=1e-10, atol=1e-12)


def test_square_qkv_init_is_orthonormal_on_square_qkv_layers_only_as_released():
    from peft_core.methods.plp import SQUARE_QKV

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q, self.to_k = nn.Linear(16, 16), nn.Linear(8, 16)  # to_k: not square (cross-attention)
            self.to_v, self.to_out = nn.Linear(16, 16), nn.Linear(16, 16)

    seed = int(torch.randint(0, 1000, ()))
    handle = attach(
        Attention(), PlpConfig(targets=["to_q", "to_k", "to_v", "to_out"], r=4, seed=seed, orthogonal_init=SQUARE_QKV)
    )
    everywhere = attach(Attention(), PlpConfig(targets=["to_q", "to_k", "to_v", "to_out"], r=4, seed=seed))
    for (name, wrapper), (_, reference) in zip(handle.wrappers(), everywhere.wrappers()):
        adapter, orthogonal = wrapper.adapters["default"], reference.adapters["default"]
        if name in ("to_q", "to_v"):
            torch.testing.assert_close(adapter.frozen_up, orthogonal.frozen_up, rtol=0, atol=0)
            torch.testing.assert_close(adapter.frozen_down, orthogonal.frozen_down, rtol=0, atol=0)
        else:  # the released zero up init and a Gaussian down half
            assert torch.count_nonzero(adapter.frozen_up) == 0
            assert adapter.frozen_down.abs().sum() > 0 and not torch.equal(adapter.frozen_down, orthogonal.frozen_down)
    with pytest.raises(AdapterError, match="orthogonal_init"):
        PlpConfig(targets=["to_q"], orthogonal_init="sometimes")
