"""CorDA against its definition (spec §7) and against HF PEFT's preprocess_corda + corda init."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from peft_core import AdapterError, CordaConfig, attach, load
from peft_core.methods import corda
from peft_core.methods.corda import CordaPrepared, Covariances, damped, decompose


class Mlp(nn.Module):
    def __init__(self, sizes=(24, 40, 32, 16)) -> None:
        super().__init__()
        self.up = nn.Linear(sizes[0], sizes[1])
        self.mid = nn.Linear(sizes[1], sizes[2])
        self.down = nn.Linear(sizes[2], sizes[3])

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


def make_mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Mlp().to(dtype)


def samples(n=6, tokens=64, features=24, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, tokens, features, generator=generator).to(dtype)  # (samples, tokens, features)


TARGETS = ["up", "mid", "down"]


# -- identity, selection, reconstruction -------------------------------------------------------
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_output_unchanged_at_init_fp32(mode):
    model = make_mlp()
    data = samples()
    expected = model(data)
    config = CordaConfig(targets=TARGETS, r=4, alpha=8.0, mode=mode)
    attach(model, config, prepared=corda.prepare(model, config, [data[:3], data[3:]]))
    torch.testing.assert_close(model(data), expected, rtol=0, atol=1e-5)
    assert torch.equal(model(data), expected)  # the base weight is untouched and delta is exactly 0


def test_output_unchanged_at_init_bf16():
    model = make_mlp(dtype=torch.bfloat16)
    data = samples(dtype=torch.bfloat16)
    expected = model(data)
    config = CordaConfig(targets=TARGETS, r=4, alpha=4.0)
    handle = attach(model, config, prepared=corda.prepare(model, config, [data]))
    assert torch.equal(model(data), expected)
    handle.merge()  # the merged delta is exactly zero at init, so even bf16 merging changes nothing
    assert torch.equal(model(data), expected)


def _layer_problem(out_features=12, in_features=20, tokens=200, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, in_features, generator=generator, dtype=torch.float64) @ torch.randn(
        in_features, in_features, generator=generator, dtype=torch.float64
    )
    covariance = x.T @ x / tokens
    return weight, covariance


def test_selection_kpm_smallest_ipm_largest():
    weight, covariance = _layer_problem()
    damped_covariance, _, _ = damped(covariance, 0.01)
    full = torch.linalg.svdvals(weight @ damped_covariance)  # (12,) descending
    r = 3
    ipm, kpm = decompose(weight, covariance, r, "ipm"), decompose(weight, covariance, r, "kpm")
    torch.testing.assert_close(ipm.S, full[:r])
    torch.testing.assert_close(kpm.S, full[-r:])
    assert ipm.S.min() >= full[r:].max() and kpm.S.max() <= full[:-r].min()
    for eigens in (ipm, kpm):
        update = eigens.U @ torch.diag(eigens.S) @ eigens.V.T  # = s B0 A0 = W - W_res
        torch.testing.assert_close(torch.linalg.norm(update @ damped_covariance), eigens.S.square().sum().sqrt())


def test_full_decomposition_reconstructs_weight():
    weight, covariance = _layer_problem()
    damped_covariance, _, _ = damped(covariance, 0.01)
    k = min(weight.shape)
    eigens = decompose(weight, covariance, k, "ipm")
    torch.testing.assert_close(eigens.U @ torch.diag(eigens.S) @ eigens.V.T, weight, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eigens.U.T @ eigens.U, torch.eye(k, dtype=weight.dtype))
    rows = eigens.V.T @ damped_covariance  # = Vh_r: orthonormal rows although V is not
    torch.testing.assert_close(rows @ rows.T, torch.eye(k, dtype=weight.dtype))
    # The adapter's factors carry exactly that update: s B A = U S V^T.
    A, B = corda.corda_factors(eigens, scaling=2.5)
    torch.testing.assert_close(2.5 * B @ A, eigens.U @ torch.diag(eigens.S) @ eigens.V.T)


def test_peft_damping_rule_and_cholesky_rule_agree_on_a_healthy_covariance():
    weight, covariance = _layer_problem()
    ours, peft_rule = (
        decompose(weight, covariance, 4, "kpm"),
        decompose(weight, covariance, 4, "kpm", peft_compatible=True),
    )
    assert ours.damping == peft_rule.damping == 0.01
    for a, b in (
        (ours.S, peft_rule.S),
        (ours.U @ torch.diag(ours.S) @ ours.V.T, peft_rule.U @ torch.diag(peft_rule.S) @ peft_rule.V.T),
    ):
        torch.testing.assert_close(a, b)


# -- covariances -----------------------------------------------------------------------------------
def test_covariance_is_per_sample_max_normalised_and_hooks_are_removed():
    layer = nn.Sequential()
    layer.add_module("proj", nn.Linear(5, 3))
    x = torch.randn(7, 5)
    covariances = corda.collect_covariances(layer, CordaConfig(targets=["proj"], r=2), [x, x])
    scaled = x / x.max().abs()
    torch.testing.assert_close(covariances["proj"], scaled.T @ scaled)  # (2 identical calls) / n = 2
    assert covariances.samples["proj"] == 2 and covariances.tokens["proj"] == 14
    assert not layer.proj._forward_pre_hooks and not layer.proj._forward_hooks

    # A batch of samples gives the same C as the samples one by one (each normalised by its own max).
    batch = torch.randn(4, 6, 5)
    batched = corda.collect_covariances(layer, CordaConfig(targets=["proj"], r=2), [batch])
    one_by_one = corda.collect_covariances(layer, CordaConfig(targets=["proj"], r=2), list(batch))
    torch.testing.assert_close(batched["proj"], one_by_one["proj"])
    assert batched.samples["proj"] == one_by_one.samples["proj"] == 4


def test_covariance_and_eigens_caches_round_trip(tmp_path):
    model, data = make_mlp(), samples()
    config = CordaConfig(targets=TARGETS, r=4, mode="kpm")
    covariances = corda.collect_covariances(model, config, [data])
    covariances.save(tmp_path / "cov.safetensors")
    reloaded = Covariances.load(tmp_path / "cov.safetensors")
    assert reloaded.samples == covariances.samples and reloaded.tokens == covariances.tokens
    prepared = corda.prepare(model, config, covariances=reloaded)
    direct = corda.prepare(model, config, [data])
    prepared.save(tmp_path / "eigens.safetensors")
    cached = CordaPrepared.load(tmp_path / "eigens.safetensors")
    for name in TARGETS:
        for a, b, c in zip(
            (direct[name].U, direct[name].S, direct[name].V),
            (prepared[name].U, prepared[name].S, prepared[name].V),
            (cached[name].U, cached[name].S, cached[name].V),
        ):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            assert torch.equal(b, c)
    with pytest.raises(AdapterError, match="prepared with mode='kpm', r=4 but the config has mode='kpm', r=2"):
        attach(make_mlp(), CordaConfig(targets=TARGETS, r=2, mode="kpm"), prepared=cached)
    with pytest.raises(AdapterError, match="is not a peft_core.corda.eigens file"):
        CordaPrepared.load(tmp_path / "cov.safetensors")


# -- bad input ---------------------------------------------------------------------------------------
def _unchanged(model, reference):
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        ([], "calibration data is empty"),
        ([torch.randn(2, 8, 7)], r"batch 0 \(a torch.float32 tensor of shape \(2, 8, 7\)\)"),
        ([torch.full((2, 8, 24), float("nan"))], "layer 'up' saw an all-zero or non-finite input"),
        ([torch.zeros(2, 8, 24)], "layer 'up' saw an all-zero or non-finite input"),
    ],
)
def test_bad_calibration_data_fails_clearly_and_changes_nothing(batches, message):
    model = make_mlp()
    reference = copy.deepcopy(model)
    with pytest.raises(AdapterError, match=message):
        corda.prepare(model, CordaConfig(targets=TARGETS, r=4), batches)
    assert _unchanged(model, reference)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_uncalled_layer_unsupported_layer_and_missing_prepare_are_named():
    model = make_mlp()
    with pytest.raises(AdapterError, match="layer 'mid' was never called"):
        corda.prepare(model, CordaConfig(targets=TARGETS, r=4), [samples()], step=lambda m, x: m.up(x))
    model.add_module("emb", nn.Embedding(4, 4))
    with pytest.raises(AdapterError, match="'emb' is a Embedding.*supported layer types: Linear, Conv2d"):
        corda.prepare(model, CordaConfig(targets=["emb"], r=2), [samples()])
    with pytest.raises(AdapterError, match="r=99 is larger than 'up'"):
        corda.prepare(model, CordaConfig(targets=["up"], r=99), [samples()])
    with pytest.raises(AdapterError, match="must look at data before it attaches.*corda.prepare"):
        attach(model, CordaConfig(targets=TARGETS, r=4))


def test_rank_deficient_covariance_warns_and_keeps_identity():
    model, data = make_mlp(), samples(n=1, tokens=5)  # 5 tokens for 24..40 input features
    expected = model(data)
    config = CordaConfig(targets=TARGETS, r=4)
    with pytest.warns(UserWarning, match="saw 5 tokens for 24 input features"):
        prepared = corda.prepare(model, config, [data])
    attach(model, config, prepared=prepared)
    assert torch.equal(model(data), expected)


# -- conv ------------------------------------------------------------------------------------------------
def test_pointwise_conv_equals_linear_and_kxk_conv_keeps_identity():
    torch.manual_seed(0)
    linear, conv = nn.Linear(6, 5), nn.Conv2d(6, 5, 1)
    conv.weight.data.copy_(linear.weight.data[:, :, None, None])
    conv.bias.data.copy_(linear.bias.data)
    images = torch.randn(3, 6, 4, 4)
    rows = images.flatten(2).transpose(1, 2)  # (3, 16, 6): the same tokens, per image
    from_linear = corda.prepare(nn.Sequential(linear), CordaConfig(targets=["0"], r=2), [rows])["0"]
    from_conv = corda.prepare(nn.Sequential(conv), CordaConfig(targets=["0"], r=2), [images])["0"]
    for a, b in ((from_linear.S, from_conv.S), (from_linear.U @ from_linear.V.T, from_conv.U @ from_conv.V.T)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2))
    images = torch.randn(4, 3, 8, 8)
    expected = model(images)
    config = CordaConfig(targets=["0"], r=5, mode="kpm")
    handle = attach(model, config, prepared=corda.prepare(model, config, [images]))
    assert torch.equal(model(images), expected)
    assert handle.state_dict()["0.lora_A"].shape == (5, 3, 3, 3) and handle.state_dict()["0.lora_B"].shape == (
        8,
        5,
        1,
        1,
    )


# -- training semantics, save/load ------------------------------------------------------------------
def test_trains_like_lora_and_reloads_into_a_fresh_base(tmp_path):
    model, data = make_mlp(), samples()
    config = CordaConfig(targets=TARGETS, r=4, alpha=4.0)
    handle = attach(model, config, prepared=corda.prepare(model, config, [data]))
    trainable = dict(handle.named_trainable_parameters())
    assert sorted(n.rsplit(".", 1)[1] for n in trainable) == ["lora_A"] * 3 + ["lora_B"] * 3
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
    trained = model(data)
    handle.save(tmp_path / "corda")
    fresh = make_mlp()
    load(fresh, tmp_path / "corda")  # no calibration data needed
    torch.testing.assert_close(fresh(data), trained, rtol=1e-6, atol=1e-6)


# -- HF PEFT parity ---------------------------------------------------------------------------------------
def _align_signs(A, B):
    """Flip each (row of A, column of B) pair so B's largest-|.| entry is positive."""
    signs = torch.sign(B.gather(0, B.abs().argmax(0, keepdim=True)))[0]
    return A * signs[:, None], B * signs[None, :]


@pytest.mark.parametrize(
    ("mode", "use_rslora", "rank_pattern"),
    [("ipm", False, {}), ("kpm", False, {}), ("ipm", True, {}), ("kpm", False, {"mid": 6})],
)
def test_matches_hf_peft_preprocess_corda(mode, use_rslora, rank_pattern):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.corda import preprocess_corda

    data = samples(n=5, tokens=48)
    r, alpha = 4, 6.0
    theirs = make_mlp()
    peft_config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=TARGETS,
        init_lora_weights="corda",
        use_rslora=use_rslora,
        rank_pattern=rank_pattern,
        corda_config=peft.tuners.lora.config.CordaConfig(corda_method=mode),
    )
    # PEFT's hook takes one sample per call (input[0].squeeze(0)); ours takes the whole batch at once.
    preprocess_corda(theirs, peft_config, run_model=lambda: [theirs(sample[None]) for sample in data])
    their_S = {name: theirs.get_submodule(name).eigens.S_WC.clone() for name in TARGETS}
    peft_model = peft.get_peft_model(theirs, peft_config)

    ours = make_mlp()
    covariances = corda.collect_covariances(ours, CordaConfig(targets=TARGETS, r=r), [data])
    for name in TARGETS:
        layer_r = rank_pattern.get(name, r)
        config = CordaConfig(targets=[name], r=layer_r, alpha=alpha, mode=mode, use_rslora=use_rslora)
        handle = attach(
            ours, config, name=f"corda_{name}", prepared=corda.prepare(ours, config, covariances=covariances)
        )
        adapter = handle.model.get_submodule(name).adapters[f"corda_{name}"]
        peft_layer = peft_model.base_model.model.get_submodule(name)
        scaling = peft_layer.scaling["default"]
        assert math.isclose(adapter.scaling, scaling)
        their_A, their_B = peft_layer.lora_A["default"].weight.detach(), peft_layer.lora_B["default"].weight.detach()
        torch.testing.assert_close(
            handle.model.get_submodule(name).adapters[f"corda_{name}"].lora_A.shape, their_A.shape
        )
        our_S = corda.prepare(ours, config, covariances=covariances)[name].S
        torch.testing.assert_close(our_S, their_S[name], rtol=1e-4, atol=0)
        weight = ours.get_submodule(name).base_layer.weight.detach()
        limit = 1e-4 * weight.abs().max().item()
        our_update = scaling * adapter.lora_B.detach() @ adapter.lora_A.detach()
        torch.testing.assert_close(our_update, scaling * their_B @ their_A, rtol=0, atol=limit)
        their_residual = peft_layer.base_layer.weight.detach()
        torch.testing.assert_close(
            corda.residual_weights(handle, f"corda_{name}")[f"{name}.weight"], their_residual, rtol=0, atol=limit
        )
        ours_A, ours_B = _align_signs(adapter.lora_A.detach(), adapter.lora_B.detach())
        their_A, their_B = _align_signs(their_A, their_B)
        torch.testing.assert_close(ours_A, their_A, rtol=0, atol=1e-4 * their_A.abs().max().item())
        torch.testing.assert_close(ours_B, their_B, rtol=0, atol=1e-4 * their_B.abs().max().item())


def test_exports_load_in_hf_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model, data = make_mlp(), samples()
    config = CordaConfig(targets=TARGETS, r=4, alpha=8.0, mode="kpm")
    handle = attach(model, config, prepared=corda.prepare(model, config, [data]))
    with torch.no_grad():
        for name, tensor in handle.state_dict().items():
            if name.endswith(("lora_A", "lora_B")):
                tensor.add_(0.05 * torch.randn_like(tensor))  # "trained"
    expected = model(data)

    # Rank-2r LoRA on the untouched base.
    handle.export(tmp_path / "plain", format="peft")
    plain = peft.PeftModel.from_pretrained(make_mlp(), tmp_path / "plain")
    torch.testing.assert_close(plain(data), expected, rtol=1e-5, atol=1e-5)

    # Rank-r LoRA on the residual base (HF PEFT's own CorDA model).
    corda.export_with_residual(handle, tmp_path / "residual")
    from safetensors.torch import load_file

    base = make_mlp()
    missing, unexpected = base.load_state_dict(
        load_file(tmp_path / "residual" / "residual_model.safetensors"), strict=False
    )
    assert not unexpected and sorted(missing) == sorted(f"{n}.bias" for n in TARGETS)
    with_residual = peft.PeftModel.from_pretrained(base, tmp_path / "residual")
    assert with_residual.base_model.model.up.lora_A["default"].weight.shape == (4, 24)
    torch.testing.assert_close(with_residual(data), expected, rtol=1e-5, atol=1e-5)
