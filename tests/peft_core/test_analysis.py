"""peft_core.analysis: the paper's gradient chain, the rho sweep, the regime report, the tracker, and the
experimental backwards (which are tested but not exported)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peft_core.analysis as analysis
from peft_core import LoraConfig, PacaConfig, PlpConfig, attach
from peft_core.analysis import (
    EXACT_MIN_RHO,
    LOW_RANK_MAX_RHO,
    AttentionSite,
    RegimeTracker,
    attention_regime_report,
    find_attention_sites,
    regime_label,
)
from peft_core.analysis.experimental_backward import approximate_attention
from peft_core.analysis.gradients import (
    autograd_gradients,
    epsilon_rank,
    gradient_chain,
    problem_at_rho,
    surrogate_gradient_error,
)
from peft_core.errors import AdapterError


class ToyAttention(nn.Module):
    """Llama-shaped self-attention (q_proj/k_proj/v_proj/o_proj, grouped-query heads), no RoPE."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2, causal: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, dim // heads
        self.scaling, self.is_causal = self.head_dim**-0.5, causal
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, -1, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        group = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class ToyModel(nn.Module):
    def __init__(self, layers: int = 2, **kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ToyAttention(**kwargs) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def set_head_gammas(attention: ToyAttention, x: torch.Tensor, q_targets: list[float], k_targets: list[float]) -> None:
    """Rescale each head's rows of W_Q / W_K so that max |sqrt(beta) Q_h| on x is exactly q_targets[h]."""
    root_beta, d = math.sqrt(attention.scaling), attention.head_dim
    with torch.no_grad():
        for projection, targets in ((attention.q_proj, q_targets), (attention.k_proj, k_targets)):
            out = root_beta * projection(x)  # (B, L, H*d)
            for head, target in enumerate(targets):
                current = out[..., head * d : (head + 1) * d].abs().max()
                projection.weight[head * d : (head + 1) * d] *= target / current


# -- the paper's math ---------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.25, 1.0, 2.0])
def test_gradient_chain_matches_autograd_in_fp64(rho):
    problem = problem_at_rho(256, rho, head_dim=16, rank=4, seed=1)
    chain, reference = gradient_chain(problem), autograd_gradients(problem)
    assert set(chain) == {"A_Q", "B_Q", "A_K", "B_K", "A_V", "B_V"}
    for key in chain:
        scale = reference[key].abs().max()
        assert scale > 0
        assert (chain[key] - reference[key]).abs().max() <= 1e-10 * max(1.0, scale)


def test_problem_at_rho_sets_the_entry_size():
    problem = problem_at_rho(512, 0.75, seed=3)
    Q, K, _ = problem.projections()
    gamma = 0.75 * math.sqrt(math.log(512))
    assert math.isclose((math.sqrt(problem.beta) * Q).abs().max().item(), gamma, rel_tol=1e-12)
    assert math.isclose((math.sqrt(problem.beta) * K).abs().max().item(), gamma, rel_tol=1e-12)


def test_rho_sweep_reproduces_the_sharp_transition():
    """Spec §2.3 at L = 512: surrogates of P are accurate at rho <= 0.5 and useless from rho >= 1.5."""
    errors = {}
    for rho in (0.25, 0.5, 1.5, 2.0):
        problem = problem_at_rho(512, rho, head_dim=16, rank=4, seed=0)
        errors[rho] = {
            "poly8": surrogate_gradient_error(problem, degree=8),
            "lowrank32": surrogate_gradient_error(problem, rank=32),
            "erank": epsilon_rank(torch.softmax(problem.logits(), dim=-1)),
        }
    for rho in (0.25, 0.5):
        assert errors[rho]["poly8"] < 1e-5, errors
        assert errors[rho]["lowrank32"] < 1e-2, errors
        assert errors[rho]["erank"] < 32
    for rho in (1.5, 2.0):
        assert errors[rho]["poly8"] > 1.0, errors
        assert errors[rho]["lowrank32"] > 0.1, errors
        assert errors[rho]["erank"] > 128
    for low, high in ((0.25, 0.5), (0.5, 1.5), (1.5, 2.0)):  # monotone in rho
        assert errors[low]["lowrank32"] < errors[high]["lowrank32"]


def test_surrogate_error_needs_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        surrogate_gradient_error(problem_at_rho(32, 0.5), degree=2, rank=2)


# -- the report ---------------------------------------------------------------------------------
def test_labels_and_thresholds():
    assert regime_label(LOW_RANK_MAX_RHO) == "low-rank"
    assert regime_label(LOW_RANK_MAX_RHO + 1e-9) == "transition"
    assert regime_label(EXACT_MIN_RHO) == "transition"
    assert regime_label(EXACT_MIN_RHO + 1e-9) == "exact"
    assert math.isclose(analysis.gamma_at_rho(77), 2.084, abs_tol=1e-3)  # spec: cross-attention on 77 tokens


def test_report_labels_synthetic_heads_by_controlled_magnitude():
    torch.manual_seed(0)
    model = ToyModel(layers=1, dim=32, heads=4, kv_heads=4)
    x = torch.randn(2, 64, 32)
    root_log = math.sqrt(math.log(64))
    q_rho, k_rho = [0.3, 1.0, 2.0, 0.2], [0.1, 0.4, 0.5, 1.7]  # per head: rho = max of the two
    set_head_gammas(model.layers[0], x, [r * root_log for r in q_rho], [r * root_log for r in k_rho])
    report = attention_regime_report(model, [x])
    assert report.adapter == "none" and report.batches == 1
    assert [head.label for head in report.heads] == ["low-rank", "transition", "exact", "exact"]
    for head, rq, rk in zip(report.heads, q_rho, k_rho):
        assert head.key_length == 64
        assert math.isclose(head.gamma_q, rq * root_log, rel_tol=1e-5)
        assert math.isclose(head.gamma_k, rk * root_log, rel_tol=1e-5)
        assert math.isclose(head.rho, max(rq, rk), rel_tol=1e-5)
        assert head.gamma_q_frozen == head.gamma_q and head.gamma_q_adapter is None and not head.crossed
        # p99.9 from the log histogram: within one bin (~1%) of the exact quantile, never above the max
        q = math.sqrt(model.layers[0].scaling) * model.layers[0].q_proj(x).detach()
        entries = q.view(2, 64, 4, 8)[:, :, head.head].abs().flatten()
        exact = torch.quantile(entries, 0.999).item()
        assert exact * 0.99 <= head.gamma_q_p999 <= min(exact * 1.02, head.gamma_q * (1 + 1e-6))
        # logits: the max over all (query, key) pairs of beta q.k
        k = math.sqrt(model.layers[0].scaling) * model.layers[0].k_proj(x).detach()
        logits = q.view(2, 64, 4, 8)[:, :, head.head] @ k.view(2, 64, 4, 8)[:, :, head.head].transpose(-1, -2)
        assert math.isclose(head.max_logit, logits.max().item(), rel_tol=1e-5)
        assert math.isclose(head.max_row_range, (logits.amax(-1) - logits.amin(-1)).max().item(), rel_tol=1e-5)


def test_report_grouped_query_heads_causal_mask_and_outputs(tmp_path):
    torch.manual_seed(1)
    model = ToyModel(layers=2, dim=32, heads=4, kv_heads=2, causal=True)
    x = torch.randn(1, 16, 32)
    sites = find_attention_sites(model)
    assert [(s.name, s.num_heads, s.num_kv_heads, s.head_dim, s.causal) for s in sites] == [
        ("layers.0", 4, 2, 8, True),
        ("layers.1", 4, 2, 8, True),
    ]
    report = attention_regime_report(model, [x, x])
    assert report.batches == 2 and len(report.heads) == 8
    assert [head.kv_head for head in report.heads[:4]] == [0, 0, 1, 1]
    assert report.heads[0].gamma_k == report.heads[1].gamma_k  # one key head serves two query heads
    attention = model.layers[0]
    q = math.sqrt(attention.scaling) * attention.q_proj(x).detach().view(1, 16, 4, 8)[:, :, 0]
    k = math.sqrt(attention.scaling) * attention.k_proj(x).detach().view(1, 16, 2, 8)[:, :, 0]
    logits = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), -math.inf)
    assert math.isclose(report.heads[0].max_logit, logits.max().item(), rel_tol=1e-5)
    data = json.loads(report.save_json(tmp_path / "r.json").read_text())
    assert data["summary"]["heads"] == 8 and data["thresholds"]["low_rank_max_rho"] == LOW_RANK_MAX_RHO
    assert len(data["heads"]) == 8 and data["sites"][0]["name"] == "layers.0"
    png = report.save_heatmap(tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.format_table()
    assert "layers.1" in table and "rho" in table and len(table.splitlines()) == 1 + 8 + 1


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(targets=["q_proj", "k_proj"], r=2, alpha=4),
        PacaConfig(targets=["q_proj", "k_proj"], r=2),
        PlpConfig(targets=["q_proj", "k_proj"], r=4),
    ],
    ids=lambda config: config.method,
)
def test_report_splits_frozen_and_adapter_branch(config):
    torch.manual_seed(2)
    model = ToyModel(layers=1, dim=32, heads=4, kv_heads=2)
    x = torch.randn(2, 12, 32)
    handle = attach(model, config)
    with torch.no_grad():
        for parameter in handle.trainable_parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    model(x)  # a fused path (PaCA resident columns) may now hold state in the base weight
    report = attention_regime_report(model, [x])
    assert report.adapter == "known"
    wrapper = model.layers[0].q_proj
    root_beta = math.sqrt(model.layers[0].scaling)
    delta = wrapper.adapters["default"].delta_weight(wrapper.base_layer)
    expected_branch = (root_beta * F.linear(x, delta)).view(2, 12, 4, 8).abs().amax(dim=(0, 1, 3))
    handle.disable("default")
    frozen = attention_regime_report(model, [x])
    handle.enable("default")
    for head, base in zip(report.heads, frozen.heads):
        assert math.isclose(head.gamma_q_adapter, expected_branch[head.head].item(), rel_tol=1e-4)
        assert math.isclose(head.gamma_q_frozen, base.gamma_q, rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(head.gamma_k_frozen, base.gamma_k, rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(head.rho_frozen, base.rho, rel_tol=1e-4)
    handle.merge()  # merged adapters count as the adapter branch too
    merged = attention_regime_report(model, [x])
    for head, unmerged in zip(merged.heads, report.heads):
        assert math.isclose(head.gamma_q_frozen, unmerged.gamma_q_frozen, rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(head.rho, unmerged.rho, rel_tol=1e-4)


def test_report_flags_heads_the_adapter_pushed_across():
    torch.manual_seed(3)
    model = ToyModel(layers=1, dim=32, heads=4, kv_heads=4)
    x = torch.randn(1, 32, 32)
    small = 0.3 * math.sqrt(math.log(32))
    set_head_gammas(model.layers[0], x, [small] * 4, [small] * 4)
    handle = attach(model, LoraConfig(targets=["q_proj"], r=2, alpha=2))
    with torch.no_grad():
        model.layers[0].q_proj.adapters["default"].lora_B[:8].normal_(0, 3.0)  # head 0 only
    report = attention_regime_report(model, [x])
    assert report.heads[0].label_frozen == "low-rank" and report.heads[0].label != "low-rank"
    assert report.heads[0].crossed and not any(head.crossed for head in report.heads[1:])
    assert report.summary()["crossed_by_adapter"] == 1
    assert "(adapter)" in report.format_table()
    assert handle.adapter_names == ["default"]


def test_report_errors_are_actionable():
    with pytest.raises(AdapterError, match="no attention modules"):
        attention_regime_report(nn.Linear(3, 3), [torch.randn(1, 3)])
    with pytest.raises(AdapterError, match="no batches"):
        attention_regime_report(ToyModel(layers=1), [])
    with pytest.raises(AdapterError, match="failed on batch 0"):
        attention_regime_report(ToyModel(layers=1), [torch.randn(1, 4, 7)])


def test_hand_built_sites_and_hooks_are_removed():
    model = ToyModel(layers=2)
    site = AttentionSite(
        name="layers.1", kind="self", num_heads=4, num_kv_heads=2, head_dim=8, scale=8**-0.5, causal=False
    )
    report = attention_regime_report(model, [torch.randn(1, 5, 32)], sites=[site])
    assert {head.site for head in report.heads} == {"layers.1"}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- tracking during training -------------------------------------------------------------------
class Event:
    def __init__(self, kind: str, step: int) -> None:
        self.kind, self.step = kind, step


def test_tracker_logs_rho_every_n_steps_and_warns_on_crossing(tmp_path, caplog):
    torch.manual_seed(4)
    model = ToyModel(layers=1, dim=32, heads=4, kv_heads=4)
    x = torch.randn(1, 32, 32)
    small = 0.3 * math.sqrt(math.log(32))
    set_head_gammas(model.layers[0], x, [small] * 4, [small] * 4)
    attach(model, LoraConfig(targets=["q_proj"], r=2, alpha=2))
    seen = []
    tracker = RegimeTracker(model, every=2, log_path=tmp_path / "regime.jsonl", on_warning=seen.append)
    lora_B = model.layers[0].q_proj.adapters["default"].lora_B
    for step in range(1, 6):  # a training loop: forward, "optimizer step", event
        model(x)
        if step == 2:
            with torch.no_grad():
                lora_B[8:16].normal_(0, 3.0)  # head 1 grows
        tracker(Event("step", step))
    tracker.close()
    assert [entry["step"] for entry in tracker.history] == [0, 2, 4]
    assert tracker.history[0]["counts"]["low-rank"] == 4
    assert len(seen) == 1 and "head 1 crossed from low-rank" in seen[0] and "step 2" in seen[0]
    assert any("crossed" in record.message for record in caplog.records)
    lines = (tmp_path / "regime.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["crossings"] == seen
    assert all(not m._forward_hooks for m in model.modules())
    with tracker.observe(5):  # not a multiple of every: nothing recorded
        model(x)
    with tracker.observe(6):
        model(x)
    assert tracker.history[-1]["step"] == 6


# -- experimental backwards (not exported) ------------------------------------------------------
def test_experimental_backward_is_not_exported():
    assert "approximate_attention" not in analysis.__all__ and not hasattr(analysis, "approximate_attention")


def _grads(q, k, v, upstream, **options):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = approximate_attention(*leaves, **options)
    return out, torch.autograd.grad(out, leaves, upstream)


def _relative(approx, exact) -> float:
    diff = sum(((a - b) ** 2).sum() for a, b in zip(approx, exact))
    return math.sqrt(float(diff / sum((b**2).sum() for b in exact)))


@pytest.mark.parametrize("causal", [False, True])
def test_row_sampled_backward_is_unbiased_at_one_over_sqrt_n(causal):
    torch.manual_seed(5)
    q, k, v, upstream = (torch.randn(1, 2, 128, 16, dtype=torch.float64) for _ in range(4))
    exact_out, exact = _grads(q, k, v, upstream, causal=causal)
    errors = {}
    for count in (4, 64):
        mean = [torch.zeros_like(t) for t in exact]
        for seed in range(count):
            out, grads = _grads(
                q,
                k,
                v,
                upstream,
                mode="row_sampled",
                samples=32,
                causal=causal,
                generator=torch.Generator().manual_seed(1000 + seed),
            )
            mean = [m + g / count for m, g in zip(mean, grads)]
        assert torch.equal(out, exact_out)  # the forward stays exact
        errors[count] = _relative(mean, exact)
    ratio = errors[4] / errors[64]  # 1/sqrt(N): sqrt(64 / 4) = 4
    assert 2.5 < ratio < 6.5, errors
    assert errors[64] < 0.5


def test_nystrom_backward_is_accurate_on_low_rank_heads_only():
    torch.manual_seed(6)
    v, upstream = torch.randn(2, 1, 256, 16, dtype=torch.float64), torch.randn(2, 1, 256, 16, dtype=torch.float64)
    errors = []
    for magnitude in (0.15, 1.0):
        q, k = (magnitude * torch.randn(2, 1, 256, 16, dtype=torch.float64) for _ in range(2))
        _, exact = _grads(q, k, v, upstream)
        _, approx = _grads(q, k, v, upstream, mode="nystrom", landmarks=32)
        errors.append(_relative(approx, exact))
    assert errors[0] < 1e-3 and errors[1] > 10 * errors[0], errors
    with pytest.raises(ValueError, match="non-causal"):
        approximate_attention(q, k, v, mode="nystrom", causal=True)


def test_adapter_without_weight_delta_is_reported_as_unknown(tmp_path, monkeypatch):
    from peft_core.methods.lora import LoraAdapter

    def no_delta(self, base):
        raise AdapterError("no dense update")

    model = ToyModel(layers=1)
    attach(model, LoraConfig(targets=["q_proj"], r=2))
    monkeypatch.setattr(LoraAdapter, "lora_factors", lambda self, base: None)
    monkeypatch.setattr(LoraAdapter, "delta_weight", no_delta)
    report = attention_regime_report(model, [torch.randn(1, 6, 32)])
    assert report.adapter == "unknown"
    head = report.heads[0]
    assert math.isnan(head.gamma_q_adapter) and math.isnan(head.gamma_q_frozen) and head.label_frozen is None
    assert head.gamma_k_adapter == 0.0  # k_proj has no adapter: its frozen part is all of it
    data = json.loads(report.save_json(tmp_path / "r.json").read_text())
    assert data["heads"][0]["gamma_q_adapter"] is None and data["heads"][0]["rho_frozen"] is None
    assert " - " in report.format_table()
