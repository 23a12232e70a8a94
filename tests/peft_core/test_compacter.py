"""Compacter / Compacter++ against explicit references, tiny Llama / T5 / UNet models, and the
paper's trainable-parameter table (T5-base, from its config alone: a meta-device model, no weights)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_core import AdaptedModule, AdapterError, attach, load
from peft_core.export import lora_factors
from peft_core.methods.compacter import (
    CompacterConfig,
    compacter_parameter_count,
    phm_linear,
    phm_weight,
)

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # non-trivial norms, so a norm delta test means something
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model


def tiny_t5(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="relu",
        dropout_rate=0.0,
    )
    return transformers.T5ForConditionalGeneration(config).double().eval()


def llama_config(**overrides) -> CompacterConfig:
    return CompacterConfig(**{"placement": "llama", "n": 4, "reduction_factor": 4, **overrides})


TOKENS = torch.tensor([[1, 5, 9, 2, 33, 7], [4, 4, 60, 12, 0, 3]])


def logits(model) -> torch.Tensor:
    return model(input_ids=TOKENS).logits


def randomize(handle, name: str = "default") -> None:
    with torch.no_grad():
        for tensor in handle.state_dict(name).values():
            tensor.normal_(std=0.3)


# ---------------------------------------------------------------------------------------------
# 1. The PHM math against explicit Kronecker products.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,d_in,d_out,r", [(4, 16, 8, 1), (2, 6, 10, 3), (1, 5, 7, 2), (3, 9, 3, 1)])
def test_phm_weight_equals_sum_of_kronecker_products_and_paths_agree(n, d_in, d_out, r):
    rule = torch.randn(n, n, n, dtype=torch.float64)
    s = torch.randn(n, d_in // n, r, dtype=torch.float64)
    t = torch.randn(n, r, d_out // n, dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64)
    reference = sum(torch.kron(rule[i], s[i] @ t[i]) for i in range(n))  # (d_in, d_out)
    torch.testing.assert_close(phm_weight(rule, s, t), reference, rtol=0, atol=1e-12)
    h = torch.randn(2, 3, d_in, dtype=torch.float64)
    dense = h @ reference + bias
    torch.testing.assert_close(phm_linear(h, rule, s, t, bias), dense, rtol=0, atol=1e-10)
    torch.testing.assert_close(phm_linear(h, rule, s, t, bias, factored=True), dense, rtol=0, atol=1e-10)
    if n == 1:  # a plain rank-r linear
        torch.testing.assert_close(reference, rule[0, 0, 0] * s[0] @ t[0])


def test_adapted_layer_equals_dense_reference_and_factored_path():
    model = tiny_llama()
    attach(model, llama_config(sites=["ffn"]))
    randomize(model._peft_core_handle)
    site = model.model.layers[1].mlp.down_proj
    adapter, base = site.adapters["default"], site.base_layer
    rule = model.model.layers[0].mlp.down_proj.adapters["default"].phm_rule  # the owner's shared A
    x = torch.randn(3, 64, dtype=torch.float64)
    y = base(x)
    H_down = sum(torch.kron(rule[i], adapter.down.s[i] @ adapter.down.t[i]) for i in range(4))  # (32, 8)
    H_up = sum(torch.kron(rule[i], adapter.up.s[i] @ adapter.up.t[i]) for i in range(4))  # (8, 32)
    expected = y + F.gelu(y @ H_down + adapter.down.bias, approximate="tanh") @ H_up + adapter.up.bias
    torch.testing.assert_close(site(x), expected, rtol=0, atol=1e-12)
    adapter.factored = True
    torch.testing.assert_close(site(x), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 2. Parameter counts and the paper's table (T5-base, tied embeddings counted once).
# ---------------------------------------------------------------------------------------------
T5_BASE = dict(
    vocab_size=32128,
    d_model=768,
    d_kv=64,
    d_ff=3072,
    num_layers=12,
    num_decoder_layers=12,
    num_heads=12,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
)
T5_BASE_TOTAL = 222_903_552
T5_BASE_NORMS = (12 * 2 + 1 + 12 * 3 + 1) * 768  # 62 T5LayerNorm scales


@pytest.mark.parametrize(
    "sites,num_sites,count,percent", [(["ffn"], 24, 104_704, 0.047), (["attn", "ffn"], 48, 161_728, 0.073)]
)
def test_t5_base_trainable_fraction_matches_the_paper(sites, num_sites, count, percent):
    # The paper's T5-base setting: n=4, rank 1, reduction 32 (m=24), shared A, layer norms trained.
    formula = compacter_parameter_count(
        768, num_sites, n=4, rank=1, reduction_factor=32, layernorm_params=T5_BASE_NORMS
    )
    assert formula == count == num_sites * (2 * (768 + 24) + 24 + 768) + 4**3 + 47_616
    with torch.device("meta"):  # the real module structure, no memory, no download
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5_BASE))
    assert sum(p.numel() for p in model.parameters()) == T5_BASE_TOTAL
    handle = attach(model, CompacterConfig(placement="t5", sites=sites, train_layernorms=True, init="paper"))
    assert handle.parameter_count("default") == sum(p.numel() for p in handle.trainable_parameters()) == count
    assert round(100 * count / T5_BASE_TOTAL, 3) == percent


def test_t5_placement_has_no_cross_attention_and_compacter_pp_is_ffn_only():
    model = tiny_t5()
    handle = attach(model, CompacterConfig(placement="t5", n=4, reduction_factor=4))
    sites = [name for name, _ in handle.wrappers()]
    assert len(sites) == 8 and not any("EncDecAttention" in name for name in sites)
    assert all(name.endswith(("SelfAttention.o", "DenseReluDense.wo")) for name in sites)
    pp = attach(tiny_t5(), CompacterConfig(placement="t5", sites=["ffn"], n=4, reduction_factor=4))
    assert [name.rsplit(".", 1)[-1] for name, _ in pp.wrappers()] == ["wo"] * 4


# ---------------------------------------------------------------------------------------------
# 3. Identity at init.
# ---------------------------------------------------------------------------------------------
def test_llama_identity_at_init_exact_and_paper_init_near():
    model = tiny_llama().requires_grad_(False)
    expected = logits(model)
    handle = attach(model, llama_config(train_layernorms=True))
    assert torch.equal(logits(model), expected)
    handle.remove("default")
    handle.add(llama_config(init="paper"))
    relative = (logits(model) - expected).norm() / expected.norm()
    assert 0 < relative < 1e-6


def test_t5_identity_at_init():
    model = tiny_t5().requires_grad_(False)  # frozen, as attach leaves it: the same CPU kernels, the same bits
    decoder_ids = TOKENS[:, :3]
    expected = model(input_ids=TOKENS, decoder_input_ids=decoder_ids).logits
    attach(model, CompacterConfig(placement="t5", n=4, reduction_factor=4, train_layernorms=True))
    assert torch.equal(model(input_ids=TOKENS, decoder_input_ids=decoder_ids).logits, expected)


def test_unet_identity_at_init_and_divisibility():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = (
        diffusers.UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        .double()
        .eval()
        .requires_grad_(False)
    )
    sample, text = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 3, 16, dtype=torch.float64)
    expected = unet(sample, 1, text).sample
    handle = attach(unet, CompacterConfig(placement="unet", n=4, reduction_factor=4, train_layernorms=True))
    sites = [name for name, _ in handle.wrappers()]
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    assert blocks > 0 and sum(name.endswith("to_out.0") for name in sites) == 2 * blocks
    assert sum(name.endswith("ff.net.2") for name in sites) == blocks and len(sites) == 6 * blocks  # + norm1..3
    assert torch.equal(unet(sample, 1, text).sample, expected)
    # 32 channels / 32 = 1: not a multiple of n=4; the error names the layer and a fix.
    with pytest.raises(AdapterError, match=r"d=32 and bottleneck m=1, but n=4 must divide both"):
        attach(unet, CompacterConfig(placement="unet", n=4), name="paper_reduction")


# ---------------------------------------------------------------------------------------------
# 4. Shared slow weights, save/load, layer norms.
# ---------------------------------------------------------------------------------------------
def test_save_load_exact_one_shared_A_and_ties_survive(tmp_path):
    model = tiny_llama()
    handle = attach(model, llama_config(train_layernorms=True), name="task")
    randomize(handle, "task")
    expected = logits(model)
    state = handle.state_dict("task")
    assert [key for key in state if key.endswith("phm_rule")] == ["model.layers.0.self_attn.o_proj.phm_rule"]
    handle.save(tmp_path / "task", name="task")

    fresh = tiny_llama()
    loaded = load(fresh, tmp_path / "task")
    assert torch.equal(logits(fresh), expected)
    for key, value in loaded.state_dict("task").items():
        assert torch.equal(value, state[key]), key
    pointers = {
        w.adapters["task"]._rule[0].data_ptr() for _, w in loaded.wrappers("task") if not w.adapters["task"].is_norm
    }
    assert len(pointers) == 1
    # Disabling or unloading puts the base norms back: the delta never touched them.
    base_norm = tiny_llama().model.norm.weight
    loaded.disable("task")
    assert torch.equal(logits(fresh), logits(tiny_llama()))
    plain = loaded.unload(merge=False)
    assert torch.equal(plain.model.norm.weight, base_norm)
    assert not any(isinstance(m, AdaptedModule) for m in plain.modules())


def test_layernorm_delta_equals_norm_with_shifted_weight():
    model = tiny_llama()
    handle = attach(model, CompacterConfig(targets=["model.norm"], train_layernorms=False))
    delta = model.model.norm.adapters["default"].norm_delta
    with torch.no_grad():
        delta.normal_()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    reference = tiny_llama().model.norm
    with torch.no_grad():
        reference.weight.add_(delta)
    torch.testing.assert_close(model.model.norm(x), reference(x), rtol=0, atol=1e-12)
    handle.merge()  # a norm-only Compacter adapter is a plain weight delta, so it merges
    torch.testing.assert_close(model.model.norm(x), reference(x), rtol=0, atol=1e-12)


def test_gradients_reach_every_adapter_tensor_and_A_sums_its_sites():
    model = tiny_llama()
    handle = attach(model, llama_config(train_layernorms=True))
    optimizer = torch.optim.SGD(handle.trainable_parameters(), lr=0.1)
    for _ in range(2):  # step 1 makes the zero-initialised up projections nonzero
        optimizer.zero_grad()
        logits(model).square().mean().backward()
        optimizer.step()
    trainable = dict(handle.named_trainable_parameters())
    assert sum(name.endswith("phm_rule") for name in trainable) == 1
    for name, parameter in model.named_parameters():
        if name in trainable:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name

    # A's gradient is the sum of its per-site contributions: compare with an untied copy.
    untied = tiny_llama()
    untied_handle = attach(untied, llama_config(train_layernorms=True, share_A="none"))
    tied_state = handle.state_dict()
    rule = next(value for key, value in tied_state.items() if key.endswith("phm_rule"))
    with torch.no_grad():
        for key, value in untied_handle.state_dict().items():
            value.copy_(rule if key.endswith("phm_rule") else tied_state[key])
    for m in (model, untied):
        m.zero_grad()
        logits(m).square().mean().backward()
    untied_sum = sum(p.grad for n, p in untied.named_parameters() if n.endswith("phm_rule"))
    tied_grad = next(p.grad for n, p in model.named_parameters() if n.endswith("phm_rule"))
    torch.testing.assert_close(tied_grad, untied_sum, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 5. Refusals and config checks.
# ---------------------------------------------------------------------------------------------
def test_merge_and_export_refuse_clearly_and_leave_the_model_untouched():
    model = tiny_llama()
    handle = attach(model, llama_config(train_layernorms=True))
    randomize(handle)
    expected = logits(model)
    with pytest.raises(AdapterError, match="nonlinear bottleneck.*cannot be merged"):
        handle.merge()
    assert not any(w.merged for _, w in handle.wrappers())  # all or nothing: the norms were not merged either
    assert torch.equal(logits(model), expected)
    with pytest.raises(AdapterError, match="not exactly low-rank"):
        lora_factors(handle)
    with pytest.raises(AdapterError, match="cannot be merged"):
        handle.unload()


def test_config_checks():
    with pytest.raises(AdapterError, match="placement 'gpt2' is unknown"):
        CompacterConfig(placement="gpt2")
    with pytest.raises(AdapterError, match="sites \\['mlp'\\] are unknown"):
        CompacterConfig(placement="llama", sites=["mlp"])
    with pytest.raises(AdapterError, match="train_layernorms needs a `placement`"):
        CompacterConfig(targets=["o_proj"], train_layernorms=True)
    with pytest.raises(AdapterError, match="n=3 must divide both"):
        attach(tiny_llama(), llama_config(n=3))
    with pytest.raises(
        AdapterError, match="is a LlamaMLP, which this method cannot adapt; supported layer types: Linear"
    ):
        attach(tiny_llama(), CompacterConfig(targets=["mlp"], n=4))
    assert llama_config(sites=["ffn"]).targets == [r"re:(.*\.)?layers\.\d+\.mlp\.down_proj"]
