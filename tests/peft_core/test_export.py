"""peft_core.export: our LoRA and PaCA adapters, loaded by the real `peft` and `diffusers`, give our outputs.

Every comparison first makes the update non-zero (a few AdamW steps, or random factors: LoRA's B and
PaCA's delta start at zero, so an untouched export would match even a loader that ignored it) and
checks that the adapted outputs differ from the base model's before comparing the loaded export.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaForCausalLM

from peft_core import AdapterError, AdapterHandle, LoraConfig, PacaConfig, PlpConfig, attach
from peft_core.export import export_diffusers, lora_factors
from peft_core.methods.lora import LoraAdapter

TOLERANCE = 1e-5
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# Tiny models, built from configs (nothing is downloaded).
# ---------------------------------------------------------------------------------------------
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def tiny_text_encoder() -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_pipeline(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, folder: Path) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from tiny components; the tokenizer is a six-token BPE vocabulary."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class ConvThenLinear(nn.Module):
    """A conv and two linears named "proj" and "block.proj" (a list target "proj" would catch both)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.proj = nn.Linear(6, 6)
        self.block = nn.Module()
        self.block.proj = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        return self.block.proj(torch.tanh(self.proj(h)))


def train_a_few_steps(handle: AdapterHandle, loss_fn, steps: int = 3) -> None:
    """AdamW on the adapter only, so its update is non-zero (resident PaCA columns get refreshed)."""
    handle.model.train()
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=2e-2)
    handle.track_optimizer(optimizer)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    handle.model.eval()


def assert_adapter_matters(adapted: torch.Tensor, base: torch.Tensor) -> None:
    assert (adapted - base).abs().max() > 100 * TOLERANCE, (
        "the adapter does not change the output; the test could not fail"
    )


# ---------------------------------------------------------------------------------------------
# The contract export relies on.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(targets=["conv", "re:proj"], r=3),
        PacaConfig(targets=["conv", "re:proj"], r=2),
        PlpConfig(targets=["re:proj"], r=2),
        PlpConfig(targets=["re:proj"], r=2, centered=True),  # rank 2r: U V minus the frozen A C block
    ],
    ids=["lora", "paca", "plp", "plp_centered"],
)
def test_lora_factors_multiply_to_the_dense_update(config) -> None:
    handle = attach(ConvThenLinear(), config)
    for parameter in handle.trainable_parameters():
        nn.init.normal_(parameter)
    factors = lora_factors(handle)
    for module_name, wrapper in handle.wrappers("default"):
        A, B = factors[module_name]
        if A.dim() == 4:
            product = torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
        else:
            product = B @ A
        torch.testing.assert_close(
            product, wrapper.adapters["default"].delta_weight(wrapper.base_layer), atol=1e-6, rtol=0
        )


# ---------------------------------------------------------------------------------------------
# HF PEFT format.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(targets=LLAMA_PROJECTIONS, r=4, alpha=8),
        LoraConfig(targets=LLAMA_PROJECTIONS, r=4, alpha=8, use_rslora=True),
        PacaConfig(targets=LLAMA_PROJECTIONS, r=8),
    ],
    ids=["lora", "rslora", "paca"],
)
def test_peft_export_reproduces_llama_logits(config, tmp_path: Path) -> None:
    model = tiny_llama()
    reference = copy.deepcopy(model)  # the same base weights, never touched by peft_core
    handle = attach(model, config)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    train_a_few_steps(handle, lambda: model(input_ids=tokens, labels=tokens).loss)

    with torch.no_grad():
        ours, base = model(input_ids=tokens).logits, reference(input_ids=tokens).logits
    assert_adapter_matters(ours, base)

    handle.export(tmp_path, format="peft", task_type="CAUSAL_LM", base_model_name_or_path="tiny-llama")
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM" and saved["bias"] == "none"
    assert saved["lora_alpha"] == saved["r"] == config.r and saved["rank_pattern"] == {} and not saved["use_rslora"]
    assert sorted(saved["target_modules"]) == sorted(name for name, _ in handle.wrappers("default"))
    assert all(
        k.startswith("base_model.model.model.layers.") for k in load_file(tmp_path / "adapter_model.safetensors")
    )

    loaded = PeftModel.from_pretrained(reference, tmp_path).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "config",
    [LoraConfig(targets=["conv", "re:proj"], r=3), PacaConfig(targets=["conv", "re:proj"], r=2)],
    ids=["lora", "paca"],
)
def test_peft_export_of_conv_and_mixed_ranks_targets_exactly_our_modules(config, tmp_path: Path) -> None:
    model = ConvThenLinear()
    reference = copy.deepcopy(model)
    handle = attach(model, config)
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    target = torch.randn(2, 5, 5, 5, generator=torch.Generator().manual_seed(1))
    train_a_few_steps(handle, lambda: (model(x) - target).square().mean())
    with torch.no_grad():
        ours, base = model(x), reference(x)
    assert_adapter_matters(ours, base)

    handle.export(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    # Only the root "proj" is ours: a list ["conv", "proj"] would also adapt "block.proj" in PEFT.
    assert isinstance(saved["target_modules"], str)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    if isinstance(config, PacaConfig):  # conv rank r*3*3 = 18, linear rank 2: scale 1 needs patterns
        assert weights["base_model.model.conv.lora_A.weight"].shape == (18, 4, 3, 3)
        assert weights["base_model.model.conv.lora_B.weight"].shape == (6, 18, 1, 1)
        assert saved["r"] == 18 and saved["rank_pattern"] == {"^proj": 2} == saved["alpha_pattern"]
    else:
        assert saved["rank_pattern"] == {} and saved["r"] == saved["lora_alpha"] == 3

    loaded = PeftModel.from_pretrained(reference, tmp_path).eval()
    assert not hasattr(loaded.base_model.model.block.proj, "lora_A")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours, atol=TOLERANCE, rtol=0)


# ---------------------------------------------------------------------------------------------
# diffusers format.
# ---------------------------------------------------------------------------------------------
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]


@pytest.mark.parametrize("method", ["lora", "paca"])
def test_diffusers_export_loads_into_stable_diffusion_pipeline(method: str, tmp_path: Path) -> None:
    def make(targets: list[str]):
        return LoraConfig(targets=targets, r=4, alpha=4) if method == "lora" else PacaConfig(targets=targets, r=4)

    unet, text_encoder = tiny_unet(), tiny_text_encoder()
    pipe = tiny_pipeline(copy.deepcopy(unet), copy.deepcopy(text_encoder), tmp_path / "tokenizer")
    unet_handle, text_handle = attach(unet, make(UNET_TARGETS)), attach(text_encoder, make(TEXT_TARGETS))

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 500])
    token_ids = torch.tensor([[0, 2, 3, 1, 1, 1, 1, 1], [0, 3, 2, 2, 1, 1, 1, 1]])
    context = torch.randn(2, 8, 16, generator=generator)
    unet_target, text_target = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 8, 16, generator=generator)
    train_a_few_steps(unet_handle, lambda: (unet(latents, timesteps, context).sample - unet_target).square().mean())
    train_a_few_steps(text_handle, lambda: (text_encoder(token_ids).last_hidden_state - text_target).square().mean())

    with torch.no_grad():
        ours_unet, ours_text = unet(latents, timesteps, context).sample, text_encoder(token_ids).last_hidden_state
        assert_adapter_matters(ours_unet, pipe.unet(latents, timesteps, context).sample)
        assert_adapter_matters(ours_text, pipe.text_encoder(token_ids).last_hidden_state)

    folder = tmp_path / "lora"
    export_diffusers(folder, {"unet": unet_handle, "text_encoder": text_handle})
    with safe_open(folder / "pytorch_lora_weights.safetensors", framework="pt") as file:
        keys, metadata = list(file.keys()), json.loads(file.metadata()["lora_adapter_metadata"])
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder"}
    assert all(".lora_A.weight" in key or ".lora_B.weight" in key for key in keys)
    if method == "paca":  # 3x3 convs have rank 4 * 9 = 36, the linears 4
        assert metadata["unet.r"] == 4 and set(metadata["unet.rank_pattern"].values()) == {36}
        assert metadata["unet.alpha_pattern"] == metadata["unet.rank_pattern"]

    pipe.load_lora_weights(folder, adapter_name="exported")
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(latents, timesteps, context).sample, ours_unet, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(pipe.text_encoder(token_ids).last_hidden_state, ours_text, atol=TOLERANCE, rtol=0)


def test_diffusers_export_of_one_component_through_the_handle(tmp_path: Path) -> None:
    unet = tiny_unet()
    reference = copy.deepcopy(unet)
    handle = attach(unet, PacaConfig(targets=UNET_TARGETS, r=2))
    for parameter in handle.trainable_parameters():
        nn.init.normal_(parameter, std=0.1)
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 8, 16)
    with torch.no_grad():
        ours = unet(latents, 3, context).sample
        assert_adapter_matters(ours, reference(latents, 3, context).sample)

    handle.export(tmp_path, format="diffusers", component="unet", weight_name="style.safetensors", dtype="float32")
    # The UNet's own loader, the one load_lora_weights calls for the "unet." keys.
    reference.load_lora_adapter(str(tmp_path), prefix="unet", weight_name="style.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(reference(latents, 3, context).sample, ours, atol=TOLERANCE, rtol=0)


# ---------------------------------------------------------------------------------------------
# Files and errors.
# ---------------------------------------------------------------------------------------------
def test_export_overwrites_an_existing_folder_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = attach(ConvThenLinear(), LoraConfig(targets=["conv"], r=2, alpha=8))  # B is exported as 4 * B
    weights_file = tmp_path / "adapter_model.safetensors"
    (tmp_path / "adapter_config.json").write_text("{not json from an earlier run")

    first_B = torch.full((6, 2, 1, 1), 1.0)
    handle.load_state_dict({"conv.lora_A": handle.state_dict()["conv.lora_A"], "conv.lora_B": first_B})
    handle.export(tmp_path)
    torch.testing.assert_close(load_file(weights_file)["base_model.model.conv.lora_B.weight"], 4 * first_B)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # A crash while replacing the weights leaves the previous export whole and no temporary file.
    handle.load_state_dict({"conv.lora_A": handle.state_dict()["conv.lora_A"], "conv.lora_B": 2 * first_B})

    def crash(*_args) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", crash)
        with pytest.raises(OSError, match="disk full"):
            handle.export(tmp_path)
    torch.testing.assert_close(load_file(weights_file)["base_model.model.conv.lora_B.weight"], 4 * first_B)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    handle.export(tmp_path, dtype=torch.float16)
    exported = load_file(weights_file)["base_model.model.conv.lora_B.weight"]
    assert exported.dtype == torch.float16 and torch.equal(exported.float(), 8 * first_B)


def test_bad_format_options_and_names_are_clear_errors(tmp_path: Path) -> None:
    handle = attach(ConvThenLinear(), LoraConfig(targets=["conv"], r=2))
    with pytest.raises(AdapterError, match=r"unknown export format 'onnx'; choose one of: peft, diffusers"):
        handle.export(tmp_path, format="onnx")
    with pytest.raises(AdapterError, match=r"no option 'component'.*task_type"):
        handle.export(tmp_path, format="peft", component="unet")
    with pytest.raises(AdapterError, match=r"task_type 'LM'"):
        handle.export(tmp_path, task_type="LM")
    with pytest.raises(AdapterError, match=r"dtype 'float64'"):
        handle.export(tmp_path, dtype="float64")
    with pytest.raises(AdapterError, match=r"no adapter named 'style'"):
        handle.export(tmp_path, name="style")
    with pytest.raises(AdapterError, match=r"component 'unet.down'"):
        handle.export(tmp_path, format="diffusers", component="unet.down")
    assert not any(tmp_path.iterdir())


def test_a_method_without_an_exact_low_rank_form_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = attach(ConvThenLinear(), LoraConfig(targets=["conv"], r=2))
    monkeypatch.setattr(LoraAdapter, "lora_factors", lambda self, base: None)
    for format in ("peft", "diffusers"):
        with pytest.raises(
            AdapterError,
            match=r"\(lora\): its update of 'conv' is not exactly low-rank, so it cannot be exported as a LoRA",
        ):
            handle.export(tmp_path, format=format)
    assert not any(tmp_path.iterdir())


def test_a_dilated_conv_is_refused_because_peft_would_ignore_the_dilation(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    handle = attach(model, LoraConfig(targets=["0"], r=2))
    with pytest.raises(AdapterError, match=r"'0' is a Conv2d with dilation=\(2, 2\)"):
        handle.export(tmp_path)
