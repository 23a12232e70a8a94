"""The shared adapter contract, run over every method (DESIGN.md: one suite, all methods)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import yaml
from torch import nn

from peft_core import (
    AdaptedModule,
    AdapterError,
    Capabilities,
    CompacterConfig,
    CordaConfig,
    LoraConfig,
    PacaConfig,
    PlpConfig,
    SptConfig,
    attach,
    available_methods,
    config_from_dict,
    get_method,
    load,
    methods_with,
    trainer_defaults,
)
from peft_core.config import TRAINERS
from peft_core.layer import NormLayer
from peft_core.methods import corda, spt
from peft_core.methods.loram import IndexMap, PrunedModule, recover_state_dict


class TinyBlock(nn.Module):
    """Attention-like siblings, an MLP and a conv: every layer type the methods support."""

    def __init__(self, width: int = 16, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=bias)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width, bias=bias) for _ in range(3))
        self.up_proj = nn.Linear(width, 2 * width, bias=bias)
        self.down_proj = nn.Linear(2 * width, width, bias=bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = self.conv(image).flatten(2).transpose(1, 2)  # (N, HW, width)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        h = h + torch.softmax(q @ k.transpose(1, 2) / 4, dim=-1) @ v
        return h + self.down_proj(torch.relu(self.up_proj(h)))


TARGETS = ["conv", "q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
LINEAR_TARGETS = TARGETS[1:]
CONFIGS = {
    "lora": lambda: LoraConfig(targets=TARGETS, r=3, alpha=5.0),
    "lora_rs": lambda: LoraConfig(targets=TARGETS, r=3, alpha=5.0, use_rslora=True),
    "paca": lambda: PacaConfig(targets=TARGETS, r=3, alpha=5.0),
    "paca_additive": lambda: PacaConfig(targets=TARGETS, r=3, alpha=5.0, resident=False),
    "plp": lambda: PlpConfig(targets=LINEAR_TARGETS, r=4),
    "plp_centered": lambda: PlpConfig(targets=LINEAR_TARGETS, r=4, centered=True),
    "corda": lambda: CordaConfig(targets=TARGETS, r=3, alpha=5.0),
    "corda_kpm": lambda: CordaConfig(targets=TARGETS, r=3, alpha=5.0, mode="kpm"),
    "spt": lambda: SptConfig(targets=TARGETS, budget=0.25, r=2, alpha=4.0, n_batches=2),
    "spt_sparse": lambda: SptConfig(targets=TARGETS, budget=40, alpha=1.0, structured_vector=False, n_batches=2),
    "compacter": lambda: CompacterConfig(targets=LINEAR_TARGETS, n=2, bottleneck=2),
}
# What each method can do is its declaration (`get_method(name).capabilities`); this suite checks
# every one. A config option can start a method at the base where its paper's defaults do not:
# centered PLP leaves out the frozen-by-frozen block A C (spec pitfall 8).
STARTS_AT_BASE_BY_OPTION = {"plp_centered"}


def capabilities(key: str) -> Capabilities:
    """The declaration of the method a CONFIGS entry configures."""
    return get_method(CONFIGS[key]().method).capabilities


def one_config_per_method() -> dict[str, str]:
    """method -> its first CONFIGS entry, for the tests that check a declaration once per method."""
    keys: dict[str, str] = {}
    for key in CONFIGS:
        keys.setdefault(CONFIGS[key]().method, key)
    return keys


ONE_PER_METHOD = one_config_per_method()


def calibration_batches(model: nn.Module) -> list[torch.Tensor]:
    """Random inputs for a method's prepare step: images for TinyBlock, feature rows otherwise."""
    generator = torch.Generator().manual_seed(1)
    if isinstance(model, TinyBlock):
        return [torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64) for _ in range(3)]
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    return [torch.randn(6, first.in_features, generator=generator, dtype=torch.float64) for _ in range(3)]


# Methods that look at data before they attach (DESIGN.md: an explicit prepare step): how this
# suite feeds them. The rest of the suite is the same for every method.
PREPARE = {
    "corda": lambda model, config: corda.prepare(model, config, calibration_batches(model)),
    "spt": lambda model, config: spt.prepare(
        model, config, calibration_batches(model), step=lambda m, x: m(x).square().mean()
    ),
}


def add(model: nn.Module, method: str, name: str = "default", weight: float = 1.0):
    """attach(model, CONFIGS[method]()) as a user would: the method's prepare step first, if it has one."""
    config = CONFIGS[method]()
    prepare = PREPARE.get(config.method)
    prepared = prepare(model, config) if prepare else None
    return attach(model, config, name=name, weight=weight, prepared=prepared)


def test_every_registered_method_is_covered():
    assert {name.split("_")[0] for name in CONFIGS} == set(available_methods())


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyBlock().double()


def randomize(handle, name: str = "default") -> None:
    with torch.no_grad():
        for tensor in handle.state_dict(name).values():
            if tensor.is_floating_point():
                tensor.normal_(std=0.3)


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 3, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("method", CONFIGS)
def test_identity_at_init(method, image):
    model = make_model()
    expected = model(image)
    add(model, method)
    if capabilities(method).identity_at_init or method in STARTS_AT_BASE_BY_OPTION:
        torch.testing.assert_close(model(image), expected, rtol=0, atol=1e-12)
    else:
        assert not torch.allclose(model(image), expected)


@pytest.mark.parametrize("method", CONFIGS)
def test_only_adapter_parameters_get_gradients(method, image):
    model = make_model()
    handle = add(model, method)
    model(image).square().sum().backward()
    trainable = dict(handle.named_trainable_parameters())
    assert trainable and all(".adapters.default." in name for name in trainable)
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (name in trainable), name
    assert handle.parameter_count("default") == sum(p.numel() for p in trainable.values())


@pytest.mark.parametrize("method", CONFIGS)
def test_merge_equals_unmerged_and_unmerge_is_bit_exact(method, image):
    model = make_model()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    handle = add(model, method)
    randomize(handle)
    unmerged = model(image)
    if not capabilities(method).mergeable:
        with pytest.raises(AdapterError, match="cannot be merged"):
            handle.merge()
        assert torch.equal(model(image), unmerged)
        return
    handle.merge()
    torch.testing.assert_close(model(image), unmerged, rtol=1e-10, atol=1e-10)
    handle.unmerge()
    for key, value in model.state_dict().items():
        if ".base_layer." in key:
            assert torch.equal(value, base_weights[key.replace(".base_layer", "")]), key
    torch.testing.assert_close(model(image), unmerged, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", CONFIGS)
def test_unload_returns_plain_model_with_merged_weights(method, image):
    model = make_model()
    handle = add(model, method)
    randomize(handle)
    expected = model(image)
    if not capabilities(method).mergeable:
        with pytest.raises(AdapterError, match="cannot be merged"):
            handle.unload()
        plain = handle.unload(merge=False)
        assert not any(isinstance(m, AdaptedModule) for m in plain.modules())
        torch.testing.assert_close(plain(image), make_model()(image), rtol=1e-12, atol=1e-12)
        return
    plain = handle.unload()
    assert not any(isinstance(m, AdaptedModule) for m in plain.modules())
    torch.testing.assert_close(plain(image), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", CONFIGS)
def test_save_load_round_trip(method, image, tmp_path):
    model = make_model()
    handle = add(model, method, name="style")
    randomize(handle, "style")
    expected = model(image)
    handle.save(tmp_path / "style", name="style")
    assert sorted(p.name for p in (tmp_path / "style").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    fresh = make_model()
    loaded = load(fresh, tmp_path / "style")
    assert loaded.adapter_names == ["style"]
    # Not bit-exact: frozen (loaded) and trainable tensors may take different CPU kernels.
    torch.testing.assert_close(fresh(image), expected, rtol=1e-12, atol=1e-12)
    assert not loaded.trainable_parameters()  # loaded adapters are frozen unless asked


@pytest.mark.parametrize("method", CONFIGS)
def test_two_named_adapters_with_weights_give_the_weighted_sum(method, image):
    model = make_model()
    base_out = model(image)
    handle = add(model, method, name="content")
    add(model, method, name="style")
    randomize(handle, "content")
    randomize(handle, "style")
    handle.disable("style")
    content_out = model(image)
    handle.enable("style")
    handle.disable("content")
    style_out = model(image)
    handle.enable("content")
    handle.set_weight("content", 0.7)
    handle.set_weight("style", -0.4)
    # Each adapter's update is linear in its own output at this layer, but the block is nonlinear,
    # so compare the per-layer behaviour on a single linear layer too (below) and the whole block
    # against the merged weights here.
    combined = model(image)
    if capabilities(method).mergeable:
        handle.merge()
        torch.testing.assert_close(model(image), combined, rtol=1e-10, atol=1e-10)
        handle.unmerge()
    assert not torch.allclose(combined, content_out) and not torch.allclose(combined, style_out)
    assert not torch.allclose(combined, base_out)

    layer = nn.Sequential()
    layer.add_module("q_proj", nn.Linear(8, 6).double())  # even widths: Compacter's n=2 divides them
    x = torch.randn(4, 8, dtype=torch.float64)
    base = layer(x)
    h = add(layer, method, name="a", weight=0.7)
    add(layer, method, name="b", weight=-0.4)
    randomize(h, "a")
    randomize(h, "b")
    h.disable("b")
    out_a = layer(x)
    h.enable("b")
    h.disable("a")
    out_b = layer(x)
    h.enable("a")
    torch.testing.assert_close(layer(x), base + (out_a - base) + (out_b - base), rtol=1e-12, atol=1e-12)
    # Without autograd (generation), the adapters add into one buffer in place: same result.
    combined_grad_path = model(image)
    with torch.no_grad():
        torch.testing.assert_close(model(image), combined_grad_path, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(x), base + (out_a - base) + (out_b - base), rtol=1e-12, atol=1e-12)


def test_inference_accumulation_keeps_base_output_for_methods_that_read_it(image):
    """Compacter reads base(x) after a LoRA has added into the output buffer: it must see base(x)."""
    model = make_model()
    handle = attach(model, LoraConfig(targets=LINEAR_TARGETS, r=2), name="lora")
    handle.add(CompacterConfig(targets=LINEAR_TARGETS, n=2, bottleneck=2), name="compacter")
    randomize(handle, "lora")
    randomize(handle, "compacter")
    expected = model(image)
    with torch.no_grad():
        torch.testing.assert_close(model(image), expected, rtol=1e-12, atol=1e-12)


def test_mixed_methods_on_one_module(image):
    model = make_model()
    handle = attach(model, LoraConfig(targets=TARGETS, r=2), name="lora")
    handle.add(PacaConfig(targets=TARGETS, r=2), name="paca")
    randomize(handle, "lora")
    randomize(handle, "paca")
    out = model(image)
    handle.merge()
    torch.testing.assert_close(model(image), out, rtol=1e-10, atol=1e-10)


def test_disabled_adapter_gives_base_output(image):
    model = make_model().requires_grad_(False)  # frozen, as attach leaves it: same kernels, same bits
    expected = model(image)
    handle = attach(model, PacaConfig(targets=TARGETS, r=3))
    randomize(handle)
    assert not torch.allclose(model(image), expected)
    handle.disable("default")
    torch.testing.assert_close(model(image), expected, rtol=0, atol=0)


def test_load_into_wrong_model_names_the_module(tmp_path):
    model = make_model()
    handle = attach(model, LoraConfig(targets=["q_proj", "up_proj"], r=2))
    handle.save(tmp_path / "a")

    wider = TinyBlock(width=24).double()
    with pytest.raises(
        AdapterError, match=r"module 'q_proj': lora_A has shape \(2, 16\) in the checkpoint but \(2, 24\)"
    ):
        load(wider, tmp_path / "a")
    assert not any(isinstance(m, AdaptedModule) for m in wider.modules())  # all-or-nothing

    class NoMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(16, 16)

    with pytest.raises(AdapterError, match="has weights for module 'up_proj'.*this model does not have"):
        load(NoMlp().double(), tmp_path / "a")

    class Nothing(nn.Module):
        def __init__(self):
            super().__init__()
            self.other = nn.Linear(16, 16)

    with pytest.raises(AdapterError, match="no module matches targets"):
        load(Nothing(), tmp_path / "a")


def test_unsupported_layer_type_lists_supported_ones():
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(10, 4))
    with pytest.raises(AdapterError, match="supported layer types: Linear, Conv2d"):
        attach(model, LoraConfig(targets=["emb"]))


def test_all_linear_skips_output_head():
    model = nn.Sequential()
    model.add_module("layer", nn.Linear(4, 4))
    model.add_module("lm_head", nn.Linear(4, 10))
    handle = attach(model, LoraConfig(targets=["all-linear"]))
    assert [name for name, _ in handle.wrappers()] == ["layer"]


def test_regex_targets_and_exclude():
    model = make_model()
    handle = attach(model, LoraConfig(targets=["re:[qkv]_proj"], exclude=["k_proj"]))
    assert sorted(name for name, _ in handle.wrappers()) == ["q_proj", "v_proj"]


def test_duplicate_and_unknown_adapter_names():
    model = make_model()
    handle = attach(model, LoraConfig(targets=["q_proj"]))
    with pytest.raises(AdapterError, match="already exists"):
        handle.add(LoraConfig(targets=["q_proj"]))
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        handle.disable("nope")


@pytest.mark.parametrize("method", CONFIGS)
def test_config_round_trips_through_json_and_yaml(method):
    config = CONFIGS[method]()
    as_json = json.loads(json.dumps(config.to_dict()))
    as_yaml = yaml.safe_load(yaml.safe_dump(config.to_dict()))
    assert config_from_dict(as_json) == config
    assert config_from_dict(as_yaml) == config


def test_config_errors_name_the_key():
    with pytest.raises(AdapterError, match="unknown key 'rank'.*valid keys: alpha"):
        config_from_dict({"method": "lora", "targets": ["q"], "rank": 4})
    with pytest.raises(AdapterError, match="'r' expects int, got '4'"):
        config_from_dict({"method": "lora", "targets": ["q"], "r": "4"})
    with pytest.raises(AdapterError, match="unknown method 'dora'; available methods: .*lora, paca, plp"):
        config_from_dict({"method": "dora", "targets": ["q"]})
    assert config_from_dict({"method": "paca", "targets": ["q"], "alpha": 16}).alpha == 16.0


def test_deepcopy_and_state_dict_of_model_with_resident_columns(image):
    model = make_model()
    base_state = copy.deepcopy(model.state_dict())
    handle = attach(model, PacaConfig(targets=TARGETS, r=3))
    randomize(handle)
    out = model(image)  # columns become resident
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(image), out)
    state = model.state_dict()
    for key, value in base_state.items():
        prefix, _, leaf = key.rpartition(".")
        wrapped = f"{prefix}.base_layer.{leaf}"
        assert torch.equal(state.get(wrapped, state.get(key)), value), key


# ---------------------------------------------------------------------------------------------
# Each method's declared capabilities (peft_core.config.Capabilities) are true.
# ---------------------------------------------------------------------------------------------
# One-layer models of every kind a method might be asked to wrap, with an input for each.
LAYERS = {
    "Linear": (lambda: nn.Linear(8, 8), lambda g: torch.randn(6, 8, generator=g, dtype=torch.float64)),
    "Conv2d": (
        lambda: nn.Conv2d(4, 8, 3, padding=1),
        lambda g: torch.randn(2, 4, 5, 5, generator=g, dtype=torch.float64),
    ),
    "LayerNorm": (lambda: nn.LayerNorm(8), lambda g: torch.randn(6, 8, generator=g, dtype=torch.float64)),
    "Embedding": (lambda: nn.Embedding(10, 8), lambda g: torch.randint(0, 10, (6,), generator=g)),
}


def one_layer(kind: str) -> tuple[nn.Module, list[torch.Tensor]]:
    make_layer, make_input = LAYERS[kind]
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("layer", make_layer().double())
    generator = torch.Generator().manual_seed(1)
    return model, [make_input(generator) for _ in range(3)]


def attach_to(model: nn.Module, method: str, batches: list[torch.Tensor], targets: list[str]):
    """attach the method's contract config, retargeted, running its prepare step on `batches` first."""
    config = dataclasses.replace(CONFIGS[ONE_PER_METHOD[method]](), targets=targets)
    prepared = None
    if get_method(method).needs_data:
        step = (lambda m, x: m(x).square().mean()) if method == "spt" else None
        prepared = PREPARE_ON[method](model, config, batches, step)
    return attach(model, config, prepared=prepared)


PREPARE_ON = {
    "corda": lambda model, config, batches, step: corda.prepare(model, config, batches, step=step),
    "spt": lambda model, config, batches, step: spt.prepare(model, config, batches, step=step),
}


def test_every_method_declares_its_capabilities():
    for method in available_methods():
        spec = get_method(method)
        assert isinstance(spec.capabilities, Capabilities), method
        assert spec.needs_data == (method in PREPARE_ON) == (method in PREPARE), method
        assert "\n" not in spec.capabilities.note, method
        for trainer in TRAINERS:  # each trainer's defaults make a valid config
            values = trainer_defaults(method, trainer)
            config = config_from_dict({"method": method, "targets": ["q_proj"], **values})
            # An empty `targets` default hands the choice to the method (Compacter's placement fills it).
            assert all(getattr(config, k) == v for k, v in values.items() if k != "targets"), (method, trainer)
            assert config.targets, (method, trainer)
    assert methods_with("needs_data") == sorted(PREPARE_ON)
    with pytest.raises(AdapterError, match="unknown capability 'fast'"):
        methods_with("fast")
    with pytest.raises(AdapterError, match="unknown trainer 'rl'"):
        trainer_defaults("lora", "rl")


@pytest.mark.parametrize("method", sorted(ONE_PER_METHOD))
def test_wraps_every_declared_layer_type_and_refuses_the_others(method):
    wraps = get_method(method).capabilities.wraps
    # Every declared type has a layer here to check it on (a new type needs one).
    for kind in wraps:
        assert any(isinstance(LAYERS[name][0](), kind) for name in LAYERS), f"no LAYERS entry is a {kind.__name__}"
    for kind in LAYERS:
        model, batches = one_layer(kind)
        if not isinstance(model.layer, wraps):
            with pytest.raises(AdapterError, match="cannot adapt; supported layer types"):
                attach_to(model, method, batches, ["layer"])
            assert not isinstance(model.layer, AdaptedModule)
            continue
        handle = attach_to(model, method, batches, ["layer"])
        assert isinstance(model.layer, AdaptedModule), kind
        randomize(handle)
        model(batches[0]).square().sum().backward()
        assert all(p.grad is not None for p in handle.trainable_parameters()), kind


@pytest.mark.parametrize("method", CONFIGS)
def test_lora_export_works_exactly_where_declared(method, tmp_path):
    model = TinyBlock(bias=False).double()  # SPT exports only when it trained no bias: a LoRA has none
    handle = add(model, method)
    randomize(handle)
    if capabilities(method).lora_export:
        handle.export(tmp_path / "peft", "peft")
        handle.export(tmp_path / "diffusers", "diffusers", component="unet")
        assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
        assert (tmp_path / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    else:
        with pytest.raises(AdapterError, match="not exactly low-rank"):
            handle.export(tmp_path / "peft", "peft")


def test_spt_with_a_trained_bias_refuses_the_lora_export(tmp_path):
    model = make_model()
    handle = add(model, "spt")
    randomize(handle)
    assert any(key.endswith("bias_delta") or "bias" in key for key in handle.state_dict())
    with pytest.raises(AdapterError, match="not exactly low-rank"):
        handle.export(tmp_path, "peft")


@pytest.mark.parametrize("method", sorted(ONE_PER_METHOD))
def test_quantized_base_is_trained_on_exactly_where_declared(method):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install peft-studio[quant])")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = nn.Sequential()
    model.add_module("layer", bnb.nn.Linear4bit(16, 16, compute_dtype=torch.bfloat16, quant_type="nf4"))
    try:
        model = model.to(device)  # quantizes
        model(torch.zeros(1, 16, dtype=torch.bfloat16, device=device))
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"bitsandbytes has no 4-bit backend on {device}: {error}")
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(6, 16, generator=generator).to(device, torch.bfloat16) for _ in range(3)]
    if not get_method(method).capabilities.quantized_base:
        with pytest.raises(AdapterError):
            attach_to(model, method, batches, ["layer"])
        return
    handle = attach_to(model, method, batches, ["layer"])
    packed = model.layer.base_layer.weight.data.clone()
    randomize(handle)
    model(batches[0]).float().square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.trainable_parameters())
    assert torch.equal(model.layer.base_layer.weight.data, packed)  # the 4-bit storage is never written
    with pytest.raises(AdapterError):  # merging would requantize every weight (or is impossible)
        handle.merge()


@pytest.mark.parametrize("method", sorted(ONE_PER_METHOD))
def test_loram_recovery_puts_the_update_back_in_the_full_shapes(method):
    """A (4 x 6) layer kept from an (8 x 8) one: where declared, the recovered adapter's update on the
    full layer is the small one's at the kept rows and columns and zero elsewhere; elsewhere LoRAM refuses."""
    kept_rows, kept_cols = torch.tensor([0, 2, 5, 7]), torch.tensor([0, 1, 3, 4, 6, 7])
    entry = PrunedModule((8, 8), kept_rows, kept_cols)
    small, batches = one_layer("Linear")
    small.layer = nn.Linear(6, 4).double()
    batches = [x[:, :6] for x in batches]
    handle = attach_to(small, method, batches, ["layer"])
    randomize(handle)
    config = handle.configs["default"]
    recovery = get_method(method).capabilities.loram_recovery
    index_map = IndexMap("random", 0.5, {"layer": entry})
    if recovery is None:
        with pytest.raises(AdapterError, match=f"cannot recover a '{method}' adapter"):
            recover_state_dict(handle.state_dict(), config, index_map)
        assert method not in methods_with("loram_recovery")
        return
    full, full_batches = one_layer("Linear")
    full_handle = attach_to(full, method, full_batches, ["layer"])
    full_handle.load_state_dict(recover_state_dict(handle.state_dict(), config, index_map))
    small_delta = small.layer.adapters["default"].delta_weight(small.layer.base_layer)
    full_delta = full.layer.adapters["default"].delta_weight(full.layer.base_layer)
    expected = torch.zeros_like(full_delta)
    expected[kept_rows[:, None], kept_cols] = small_delta
    torch.testing.assert_close(full_delta, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(ONE_PER_METHOD))
def test_placement_matches_what_the_adapter_reads(method):
    """ "sublayer_outputs" methods add a function of the wrapped layer's output; "projections" ones of its input."""
    spec = get_method(method)
    assert spec.adapter_class.reads_base_output == (spec.capabilities.placement == "sublayer_outputs")


def test_norm_layers_are_recognised_by_structure():
    class RMSNorm(nn.Module):  # like Llama's: no torch norm class behind it
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

    for layer in (nn.LayerNorm(8), nn.GroupNorm(2, 8), RMSNorm()):
        assert isinstance(layer, NormLayer), layer
    for layer in (nn.Linear(8, 8), nn.Conv2d(2, 2, 1), nn.Embedding(4, 8), nn.LayerNorm(8, elementwise_affine=False)):
        assert not isinstance(layer, NormLayer), layer
