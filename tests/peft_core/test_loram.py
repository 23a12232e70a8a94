"""LoRAM: pruning plans, recovery against brute force, full-vs-small equivalence on tiny Llamas
(spec section 7), QLoRAM on an NF4 base, and the paper's storage table from config numbers alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_core import AdapterError, LoraConfig, PacaConfig, PlpConfig, attach, load
from peft_core.methods.loram import (
    DECODER_PROJECTIONS,
    IndexMap,
    kept_counts,
    magnitude_mask,
    prune,
    quantize_nf4,
    recover,
    recover_state_dict,
    storage_report,
)

transformers = pytest.importorskip("transformers")

GQA = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=128,
)
MHA = {**GQA, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16}
KEEP = dict(keep_first=1, keep_last=1)
IDS = torch.tensor([[3, 17, 99, 4, 56, 23, 8, 120], [1, 2, 3, 4, 5, 6, 7, 8]])


def tiny_llama(shape: dict = GQA, tied: bool = False, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**shape, tie_word_embeddings=tied, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # std 0.02 leaves every logit near zero; make the network do something
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
            else:
                parameter.normal_(std=0.2)
    return model


def train(model: nn.Module, config, steps: int = 2, seed: int = 1):
    torch.manual_seed(seed)
    handle = attach(model, config)
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    return handle


def zero_pruned_channels(model: nn.Module, index_map: IndexMap) -> None:
    """The full model with exactly the channels the small model lacks set to zero."""
    with torch.no_grad():
        for name, entry in index_map.modules.items():
            weight = model.get_submodule(name).weight
            for dim, kept in ((0, entry.kept_rows), (1, entry.kept_cols)):
                if kept is not None:
                    dropped = torch.ones(weight.shape[dim], dtype=torch.bool)
                    dropped[kept] = False
                    weight.index_fill_(dim, dropped.nonzero().flatten(), 0.0)


# ---------------------------------------------------------------------------------------------
# Plans and counts.
# ---------------------------------------------------------------------------------------------
def test_structured_plan_keeps_whole_gqa_groups_and_counts():
    model = tiny_llama(GQA)
    small, index_map = prune(model, 0.5, "norm", **KEEP)
    assert len(index_map.kept_kv_heads) == 6  # layers 1..6 of 8
    assert kept_counts(8, 2, 160, 0.5) == (4, 1, 80)
    G, hd = 4, 8
    for attention, heads in index_map.kept_kv_heads.items():
        assert heads == sorted(heads) and len(heads) == 1
        # Dropping KV head g drops exactly query heads g*G .. g*G + G - 1 (per-head reference below).
        kept_query_heads = sorted({int(c) // hd for c in index_map.modules[f"{attention}.q_proj"].kept_rows})
        assert kept_query_heads == [g * G + j for g in heads for j in range(G)]
        kv_rows = index_map.modules[f"{attention}.k_proj"].kept_rows
        assert kv_rows.tolist() == [g * hd + i for g in heads for i in range(hd)]
        assert torch.equal(
            index_map.modules[f"{attention}.o_proj"].kept_cols, index_map.modules[f"{attention}.q_proj"].kept_rows
        )
        q = small.get_submodule(f"{attention}.q_proj")
        assert (q.out_features, small.get_submodule(f"{attention}.k_proj").out_features) == (4 * hd, 1 * hd)
    for entry in index_map.modules.values():  # kept sets are sorted and distinct (and disjoint from the rest)
        for kept in (entry.kept_rows, entry.kept_cols):
            if kept is not None:
                assert torch.equal(kept, kept.unique()) and kept.max() < max(entry.full_shape)
    mlp = "model.layers.3.mlp"
    assert torch.equal(index_map.modules[f"{mlp}.gate_proj"].kept_rows, index_map.modules[f"{mlp}.down_proj"].kept_cols)
    assert (
        small.model.layers[0].mlp.gate_proj.out_features == 160
        and small.model.layers[7].self_attn.q_proj.out_features == 64
    )
    # "norm" keeps the channels with the largest weight norms, which the random plan need not.
    gate, up, down = (model.get_submodule(f"{mlp}.{p}").weight for p in ("gate_proj", "up_proj", "down_proj"))
    scores = gate.square().sum(1) + up.square().sum(1) + down.square().sum(0)
    assert set(index_map.modules[f"{mlp}.gate_proj"].kept_rows.tolist()) == set(scores.topk(80).indices.tolist())


@pytest.mark.parametrize("shape,tied", [(GQA, False), (MHA, True)])
def test_pruned_model_runs_trains_generates_and_matches_the_formula(shape, tied):
    model = tiny_llama(shape, tied)
    small, _ = prune(model, 0.5, "random", **KEEP)
    report = storage_report(
        64,
        160,
        8,
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        128,
        0.5,
        head_dim=shape["head_dim"],
        tie_embeddings=tied,
        **KEEP,
    )
    assert sum(p.numel() for p in small.parameters()) == report["params_pruned"]
    assert sum(p.numel() for p in model.parameters()) == report["params_original"]
    handle = attach(small, LoraConfig(targets=list(DECODER_PROJECTIONS), r=4))
    loss = small(input_ids=IDS, labels=IDS).loss
    assert torch.isfinite(loss)
    loss.backward()
    with_grad = {name for name, p in small.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, _ in handle.named_trainable_parameters()}
    assert all(name.endswith(("lora_A", "lora_B")) for name in with_grad)
    generated = small.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


def test_ratio_zero_is_exactly_plain_lora(tmp_path):
    plain = tiny_llama()
    small, index_map = prune(tiny_llama(), 0.0, "random", **KEEP)
    assert all(
        torch.equal(
            entry.kept_rows if entry.kept_rows is not None else entry.kept_cols,
            torch.arange(entry.full_shape[0 if entry.kept_rows is not None else 1]),
        )
        for entry in index_map.modules.values()
    )
    config = LoraConfig(targets=list(DECODER_PROJECTIONS), r=4, alpha=8.0)
    plain_handle, small_handle = train(plain, config), train(small, config)
    recover(small_handle, index_map, tmp_path / "recovered")
    full = tiny_llama()
    loaded = load(full, tmp_path / "recovered")
    expected = plain_handle.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert torch.equal(full(input_ids=IDS).logits, plain(input_ids=IDS).logits)


# ---------------------------------------------------------------------------------------------
# Recovery.
# ---------------------------------------------------------------------------------------------
def test_recovered_lora_and_paca_match_a_brute_force_scatter():
    model = tiny_llama()
    small, index_map = prune(model, 0.5, "random", **KEEP)
    lora = attach(small, LoraConfig(targets=list(DECODER_PROJECTIONS) + ["lm_head"], r=3), name="lora")
    lora.add(PacaConfig(targets=list(DECODER_PROJECTIONS), r=4), name="paca")
    with torch.no_grad():
        for name in ("lora", "paca"):
            for tensor in lora.state_dict(name).values():
                if tensor.is_floating_point():
                    tensor.normal_()
    for name in ("lora", "paca"):
        small_state = lora.state_dict(name)
        recovered = recover_state_dict(small_state, lora.configs[name], index_map)
        assert recovered.keys() == small_state.keys()
        for module_name, wrapper in lora.wrappers(name):
            adapter = wrapper.adapters[name]
            entry = index_map.modules.get(module_name)
            out, inp = entry.full_shape if entry else tuple(wrapper.base_layer.weight.shape)
            reference = torch.zeros(out, inp, dtype=torch.float64)  # brute force: dW_ref[ix_(rows, cols)] = dW_small
            rows = entry.kept_rows if entry and entry.kept_rows is not None else torch.arange(out)
            cols = entry.kept_cols if entry and entry.kept_cols is not None else torch.arange(inp)
            reference[rows[:, None], cols[None, :]] = adapter.delta_weight(wrapper.base_layer)
            if name == "lora":
                A, B = recovered[f"{module_name}.lora_A"], recovered[f"{module_name}.lora_B"]
                product = adapter.scaling * (B @ A)
                kept = torch.zeros(out, inp, dtype=torch.bool)
                kept[rows[:, None], cols[None, :]] = True
                assert not product[~kept].any(), module_name  # exactly zero outside the kept block
                # Inside it, the same products (a GEMM of another shape may block the sums differently).
                torch.testing.assert_close(product, reference, rtol=0, atol=1e-12, msg=module_name)
                untouched = "lora_A" if entry is None or entry.kept_rows is not None else "lora_B"
            else:
                dense = torch.zeros(out, inp, dtype=torch.float64)
                dense[:, recovered[f"{module_name}.columns"]] = adapter.scaling * recovered[f"{module_name}.delta"]
                assert torch.equal(dense, reference), module_name
                untouched = "columns" if entry is None or entry.kept_rows is not None else "delta"
            assert torch.equal(recovered[f"{module_name}.{untouched}"], small_state[f"{module_name}.{untouched}"])


@pytest.mark.parametrize("shape,tied,strategy,method", [(GQA, False, "norm", "lora"), (MHA, True, "random", "paca")])
def test_full_model_with_recovered_adapter_equals_small_model_on_kept_channels(tmp_path, shape, tied, strategy, method):
    small, index_map = prune(tiny_llama(shape, tied), 0.5, strategy, **KEEP)
    targets = list(DECODER_PROJECTIONS) + (["lm_head"] if not tied else [])
    config = (
        LoraConfig(targets=targets, r=4, alpha=8.0) if method == "lora" else PacaConfig(targets=targets, r=4, alpha=8.0)
    )
    handle = train(small, config)
    handle.save(tmp_path / "small")
    index_map.save(tmp_path / "small")
    recover(tmp_path / "small", IndexMap.load(tmp_path / "small"), tmp_path / "full")

    full = tiny_llama(shape, tied)
    zero_pruned_channels(full, index_map)
    full_handle = load(full, tmp_path / "full")
    expected = small(input_ids=IDS).logits
    torch.testing.assert_close(full(input_ids=IDS).logits, expected, rtol=0, atol=1e-10)
    # With the KV cache: the last token's logits after a cached prefix. The full model must equal the
    # small one exactly there too. Against the uncached forward only to float32 rounding: Llama's eager
    # attention takes its softmax in float32, so sequences of other lengths round differently (~1e-6
    # with transformers 5.25, also for a model without adapters).
    steps = []
    for model in (small, full):
        prefix = model(input_ids=IDS[:, :-1], use_cache=True)
        steps.append(model(input_ids=IDS[:, -1:], cache=prefix.past_key_values).logits[:, -1])
    torch.testing.assert_close(steps[1], steps[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(steps[0], expected[:, -1], rtol=1e-4, atol=1e-5)
    full_handle.merge()
    torch.testing.assert_close(full(input_ids=IDS).logits, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("strategy,ratio", [("semi", 0.5), ("unstructured", 0.55)])
def test_semi_and_unstructured_mask_in_place_and_recovery_is_identity(strategy, ratio):
    model = tiny_llama()
    small, index_map = prune(model, ratio, strategy)
    q = small.model.layers[0].self_attn.q_proj.weight
    assert q.shape == model.model.layers[0].self_attn.q_proj.weight.shape
    if strategy == "semi":
        zeros_per_group = (q.reshape(q.shape[0], -1, 4) == 0).sum(-1)
        assert torch.equal(zeros_per_group, torch.full_like(zeros_per_group, 2))
    else:
        for name in index_map.modules:
            weight = small.get_submodule(name).weight
            assert int((weight == 0).sum()) == int(weight.numel() * 0.55)
    assert torch.equal(small.model.embed_tokens.weight, model.model.embed_tokens.weight)
    handle = attach(small, LoraConfig(targets=list(DECODER_PROJECTIONS), r=2))
    state = handle.state_dict()
    recovered = recover_state_dict(state, handle.configs["default"], index_map)
    assert all(torch.equal(recovered[k], v) for k, v in state.items())


def test_magnitude_mask_keeps_the_largest():
    weight = torch.tensor([[0.1, -4.0, 3.0, 0.2, 1.0, -1.5, 0.0, 2.0]])
    assert magnitude_mask(weight, "semi", 0.5).tolist() == [[False, True, True, False, False, True, False, True]]
    assert magnitude_mask(weight, "unstructured", 0.25).tolist() == [[False, True, True, True, True, True, False, True]]


def test_errors_name_the_problem():
    model = tiny_llama()
    with pytest.raises(AdapterError, match="unknown strategy 'wanda'"):
        prune(model, 0.5, "wanda")
    with pytest.raises(AdapterError, match="pass ratio=0.5"):
        prune(model, 0.6, "semi")
    with pytest.raises(AdapterError, match=r"must be in \[0, 1\)"):
        prune(model, 1.0)
    with pytest.raises(AdapterError, match="found no decoder layer"):
        prune(nn.Sequential(nn.Linear(4, 4)), 0.5)
    small, index_map = prune(model, 0.5, **KEEP)
    handle = attach(small, LoraConfig(targets=["q_proj"], r=2))
    handle.configs["default"] = PlpConfig(targets=["q_proj"])  # a method that declares no LoRAM recovery
    with pytest.raises(AdapterError, match="cannot recover a 'plp' adapter.*supported methods: lora, paca"):
        recover_state_dict(handle.state_dict(), handle.configs["default"], index_map)


# ---------------------------------------------------------------------------------------------
# QLoRAM: train LoRA on the pruned model in NF4; the recovered adapter merges into the bf16 original.
# ---------------------------------------------------------------------------------------------
def test_qloram_trains_on_nf4_and_recovers_onto_the_bf16_original(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install peft-studio[quant])")
    del bnb
    model = tiny_llama(dtype=torch.bfloat16)
    small, index_map = prune(model, 0.5, "random", **KEEP)
    try:
        quantize_nf4(small)
        small(input_ids=IDS[:, :2])
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"bitsandbytes has no 4-bit backend here: {error}")
    assert type(small.model.layers[3].mlp.down_proj).__name__ == "Linear4bit"
    assert small.model.layers[3].mlp.down_proj.in_features == 80
    handle = attach(small, LoraConfig(targets=list(DECODER_PROJECTIONS), r=4, alpha=8.0))
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = small(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    with pytest.raises(AdapterError, match="quantized base weight"):
        handle.merge()  # never into the NF4 small model
    recover(handle, index_map, tmp_path / "full")
    model = model.float()  # the dense original (fp32 here, so merged vs unmerged is not bf16 rounding noise)
    base = model(input_ids=IDS).logits
    full = load(model, tmp_path / "full")
    unmerged = model(input_ids=IDS).logits
    full.merge()
    torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unmerged, base, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The paper's storage table from config numbers alone (spec section 4).
# ---------------------------------------------------------------------------------------------
LLAMA_31_70B = dict(
    hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8, vocab_size=128256
)
LLAMA_2_70B = {**LLAMA_31_70B, "vocab_size": 32000}
LLAMA_2_13B = dict(
    hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40, vocab_size=32000
)


def test_qloram_storage_reduction_llama31_70b_is_15_81x():
    # QLoRAM-Stru at rho = 0.85, layers [4, 78) pruned: Hkv' = 8 - floor(6.8) = 2, Hq' = 16,
    # I' = 28672 - ceil(24371.2) = 4300. Reduction = 16 P_orig / (4 P_pruned): every parameter,
    # embeddings included, at 4 bits without quantization constants (the paper's accounting).
    report = storage_report(**LLAMA_31_70B, ratio=0.85, strategy="norm")
    assert report["params_original"] == 70_553_706_496
    assert report["params_pruned"] == 6 * 855_654_400 + 74 * 143_441_920 + 2_101_346_304 + 8192 == 17_849_982_976
    assert round(report["loram_reduction"], 4) == 3.9526
    assert round(report["qloram_reduction"], 2) == 15.81
    assert round(report["pruned_nf4_gib"], 2) == 8.31  # the paper's HBM column
    # Realistic NF4 (double quantization ~4.127 bits, bf16 embeddings and lm_head): about 11.4x.
    assert round(report["qloram_reduction_realistic"], 1) == 11.4


@pytest.mark.parametrize(
    "ratio,pruned,loram,qloram",
    [
        (0.65, 28_099_436_544, 2.45, 9.82),
        (0.75, 21_488_738_304, 3.21, 12.84),
        (0.85, 16_272_924_672, 4.24, 16.95),
        (0.95, 9_662_226_432, 7.14, 28.56),
    ],
)
def test_llama2_70b_sweep(ratio, pruned, loram, qloram):
    report = storage_report(**LLAMA_2_70B, ratio=ratio)
    assert report["params_original"] == 68_976_648_192 and report["params_pruned"] == pruned
    assert (round(report["loram_reduction"], 2), round(report["qloram_reduction"], 2)) == (loram, qloram)


@pytest.mark.parametrize(
    "strategy,ratio,pruned,reduction",
    [
        ("random", 0.65, 6_005_662_720, 2.17),
        ("unstructured", 0.55, 6_037_591_040, 2.16),
        ("semi", 0.5, 6_671_979_520, 1.95),
    ],
)
def test_llama2_13b_rows(strategy, ratio, pruned, reduction):
    report = storage_report(**LLAMA_2_13B, ratio=ratio, strategy=strategy)
    assert report["params_original"] == 13_015_864_320 and report["params_pruned"] == pruned
    assert round(report["loram_reduction"], 2) == reduction
