"""One training step of each model family's denoiser at real size: Flux.1-dev, SDXL, SD3.5-medium (issue 21).

    python bench/family_step.py                                  # GPU: everything -> bench/results/family_step.json
    python bench/family_step.py --families flux                  # one family (results of the others are dropped)
    python bench/family_step.py --families sdxl --append         # add to / overwrite in the existing file
    python bench/family_step.py --tiny                           # CPU smoke test (tiny configs, fp32) -> /tmp
    bash bench/gpu_family.sh                                     # the device call: four stages, ~4-5 min on an H100

What one step is: the family's denoiser built from its real config (hard-coded below, with the source of each
config) with random weights from one seed, bf16 (fp32 on CPU), directly on the device (no CPU copy of Flux's 12 B
parameters); random latents and text states of the real shapes at 1024 px; loss = fp32 MSE between the
prediction and the family's target (pipelines.cuda_graphs.prediction_loss, the studio's own loss); backward;
AdamW (fused on CUDA, lr 1e-4, no gradient clipping) on the trainable parameters. SDPA attention. Every variant
gets a freshly built model from the same seed and the same batch, so every variant's first loss is the same
(adapters start as the identity; "checks" compares them).

Families (batch, inputs, objective):
- flux: FLUX.1-dev FluxTransformer2DModel, batch 1, packed latents (1, 4096, 64) (16 x 128 x 128 latents in
  2x2 patches, FluxPipeline._pack_latents), T5 states (1, 512, 4096), pooled CLIP (1, 768), guidance 3.5,
  txt_ids (512, 3) zeros and img_ids (4096, 3) from FluxPipeline._prepare_latent_image_ids, timestep = sigma;
  rectified-flow velocity target (noise - latents); gradient checkpointing ON (as train_dreambooth_lora_flux.py
  --gradient_checkpointing; without it 1024 px does not fit next to the 24 GB of weights).
- sdxl: SDXL base UNet2DConditionModel, batch 2, latents (2, 4, 128, 128) noised by the DDPM schedule (SDXL's
  scaled_linear betas), text states (2, 77, 2048), added_cond_kwargs text_embeds (2, 1280) and time_ids (2, 6);
  epsilon target. No gradient checkpointing.
- sd3: SD3.5-medium SD3Transformer2DModel, batch 2, latents (2, 16, 128, 128), text states (2, 333, 4096)
  (77 CLIP + 256 T5 tokens), pooled (2, 2048), timestep = 1000 sigma; flow target (noise - latents). No
  gradient checkpointing.

Variants (each family; the order run is the family's priority order, see VARIANT_ORDER):
- frozen: weights frozen, requires_grad only on the noisy latents (a fresh leaf each step), no optimizer: the
  floor an adapter can approach.
- peft_lora: diffusers + HF PEFT as diffusers' DreamBooth LoRA script for the family sets it up:
  `model.add_adapter(peft.LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=<the
  script's default targets>))` on the bf16 model (its LoRA weights stay bf16: those scripts upcast them only
  for fp16), eager.
- lora: peft_core LoRA r=16, alpha=16, same targets (float32 adapter weights, bf16 math), eager.
- paca: peft_core PaCA r=32, alpha=32 (parameter-matched to LoRA r=16: equal on square layers, and equal in
  sum over an MLP's up + down projections), resident columns, same targets, eager.
- lora_default / paca_default: what the studio runs by default on one CUDA GPU: the step recorded as a CUDA
  graph and replayed (pipelines.cuda_graphs.GraphedTrainStep with capturable_adamw, the adapters told after
  each replay) where the family allows it. Gradient checkpointing blocks CUDA graphs
  (pipelines.train.cuda_graph_blockers), so on Flux the default path is the eager step: these entries then
  say path "eager" and carry the eager variant's numbers ("same_as"), measured once, never a graphed number.
  A capture that fails falls back to eager, as cuda_graph="auto" does, and says so. On the CPU (--tiny) a
  stand-in graph (replays run the step eagerly) exercises the plumbing; its times are not a graph's.
- nf4_lora (flux only, run last): FLUX.1-dev with every nn.Linear in bitsandbytes NF4 (double quantization,
  bf16 compute: what diffusers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") gives, whose
  modules_to_not_convert is empty for Flux), quantized with peft_core.methods.loram.quantize_nf4 on the GPU,
  then peft_core LoRA (capability quantized_base) r=16 on the same targets, gradient checkpointing ON.
- nf4_peft_lora (flux only, opt-in with --variants): the same NF4 base with HF PEFT's LoRA (QLoRA).

Measured per variant: median ms/step over --steps timed steps after --warmup untimed ones (each synchronized),
images/s, peak allocated GPU memory over the timed steps (graphed: since before the capture, so the graph's
pool counts), the first step's time and loss, trainable parameters and adapted layers. "ratios" per family
(every variant vs peft_lora's time and memory, and vs frozen's time) and the top-level "criteria" evaluate
issue 21's targets: Flux.1-dev paca <= 0.80x peft_lora time and <= 0.90x its peak memory, lora <= 0.95x time
and <= 1.0x memory; SDXL lora_default and paca_default <= 0.60x peft_lora's eager time; NF4 Flux LoRA peak
<= 24 GiB. The JSON is rewritten after every variant, so an interrupted run keeps what it has.
"""

from __future__ import annotations

import os

# Set before torch initialises CUDA: fewer fragmentation spikes in peak memory.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from _common import (  # noqa: E402
    allocated_gib,
    device_dtype_out,
    format_table,
    free_memory,
    log,
    package_versions,
    parse_variants,
    ratio,
    repo_on_path,
    sync,
    time_steps,
    write_json,
)
from _sd import SCHEDULER_CONFIG  # noqa: E402

repo_on_path()

from peft_core import LoraConfig, PacaConfig, attach  # noqa: E402
from pipelines.cuda_graphs import GraphCaptureError, GraphedTrainStep, StepInputs, prediction_loss  # noqa: E402

LORA_R, LORA_ALPHA = 16, 16  # diffusers' DreamBooth LoRA scripts: --rank, lora_alpha = rank (Flux: --lora_alpha)
PACA_R, PACA_ALPHA = 32, 32  # parameter-matched to LoRA r=16; same scale alpha/r = 1
TINY_RANKS = (4, 4, 8, 8)  # --tiny: (LoRA r, alpha, PaCA r, alpha), the tiny layers are 16 wide
TIMING_LR = 1e-4
FLUX_GUIDANCE = 3.5  # train_dreambooth_lora_flux.py --guidance_scale default (FLUX.1-dev is guidance-distilled)

# ---------------------------------------------------------------------------------------------
# Real configs. No machine here can download them; each is written out from the checkpoint's
# config.json (keys that only record provenance, "_class_name" / "_diffusers_version", dropped).
# ---------------------------------------------------------------------------------------------
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json ("_diffusers_version": "0.19.0.dev0"), as quoted
# verbatim in public code (e.g. SDXL_Unet_Base_config in several SDXL tool repos; the same values appear in every
# SDXL-derived UNet config: attention_head_dim [5, 10, 20], transformer_layers_per_block [1, 2, 10],
# projection_class_embeddings_input_dim 2816 = 1280 pooled + 6 time ids x 256).
SDXL_UNET_CONFIG: dict[str, Any] = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    class_embed_type=None,
    class_embeddings_concat=False,
    conv_in_kernel=3,
    conv_out_kernel=3,
    cross_attention_dim=2048,
    cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    dual_cross_attention=False,
    encoder_hid_dim=None,
    encoder_hid_dim_type=None,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_only_cross_attention=None,
    mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn",
    norm_eps=1e-05,
    norm_num_groups=32,
    num_attention_heads=None,
    num_class_embeds=None,
    only_cross_attention=False,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0,
    resnet_skip_time_act=False,
    resnet_time_scale_shift="default",
    sample_size=128,
    time_cond_proj_dim=None,
    time_embedding_act_fn=None,
    time_embedding_dim=None,
    time_embedding_type="positional",
    timestep_post_act=None,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None,
    use_linear_projection=True,
)

# black-forest-labs/FLUX.1-dev, transformer/config.json ("_diffusers_version": "0.30.0.dev0"), as quoted verbatim
# in public code (several FLUX.1-dev loaders that rebuild the transformer offline; 19 double + 38 single blocks,
# 24 heads x 128 = 3072 wide, axes_dims_rope summing to the head dim).
FLUX_CONFIG: dict[str, Any] = dict(
    attention_head_dim=128,
    axes_dims_rope=[16, 56, 56],
    guidance_embeds=True,
    in_channels=64,
    joint_attention_dim=4096,
    num_attention_heads=24,
    num_layers=19,
    num_single_layers=38,
    out_channels=None,
    patch_size=1,
    pooled_projection_dim=768,
)

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (the repository is gated), as quoted verbatim
# in public code that rebuilds SD3.5-medium offline (e.g. Tenstorrent's SD3.5 FP8 loaders: "_diffusers_version"
# 0.37.1 copy; two independent copies agree): MMDiT-X, 24 blocks of 24 heads x 64 = 1536, dual attention
# (a second image self-attention, attn2) in blocks 0-12, RMS q/k norm.
SD3_MEDIUM_CONFIG: dict[str, Any] = dict(
    attention_head_dim=64,
    caption_projection_dim=1536,
    dual_attention_layers=list(range(13)),
    in_channels=16,
    joint_attention_dim=4096,
    num_attention_heads=24,
    num_layers=24,
    out_channels=16,
    patch_size=2,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    sample_size=128,
)

# Tiny configs for the CPU smoke test: the same block types and cross-component wiring, kilobytes of weights
# (after tests/pipelines/micro_families.py).
SDXL_TINY_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    cross_attention_dim=24,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
    norm_num_groups=8,
)
FLUX_TINY_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=8,
    guidance_embeds=True,
    axes_dims_rope=[2, 2, 4],
)
SD3_TINY_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=24,
    pos_embed_max_size=16,
    dual_attention_layers=[0],
    qk_norm="rms_norm",
)

# ---------------------------------------------------------------------------------------------
# Adapter targets: each family's diffusers DreamBooth LoRA script's default (huggingface/diffusers,
# examples/dreambooth/, main as of 2026-08, commit 58eb52c0). PEFT matches a target against a module name
# exactly or as a dotted suffix, as peft_core does, so both adapt the same layers.
# ---------------------------------------------------------------------------------------------
# train_dreambooth_lora_sdxl.py: unet_target_modules = ["to_k", "to_q", "to_v", "to_out.0"]
SDXL_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# train_dreambooth_lora_flux.py (no --lora_layers): attention of the double blocks (image and text streams),
# their two MLPs, and (by suffix) to_q/to_k/to_v of the 38 single blocks.
FLUX_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
# train_dreambooth_lora_sd3.py (no --lora_layers / --lora_blocks): the joint attention's projections of every
# block ("attn.", so SD3.5's second image attention attn2 is not adapted).
SD3_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
TARGETS_SOURCE = "huggingface/diffusers examples/dreambooth/train_dreambooth_lora_{}.py, default target_modules"


# ---------------------------------------------------------------------------------------------
# Families.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    title: str
    model_class: str  # a diffusers class
    config: dict[str, Any]
    tiny_config: dict[str, Any]
    config_source: str
    targets: list[str]
    script: str  # the diffusers DreamBooth LoRA script whose setup peft_lora reproduces
    batch: int
    latent_size: int  # 1024 px / 8
    text_tokens: int
    tiny_text_tokens: int
    gradient_checkpointing: bool
    objective: str
    steps: int  # default timed steps
    warmup: int  # default untimed steps after the first
    order: tuple[str, ...]  # the variants, most important first


FAMILIES: dict[str, Family] = {
    "flux": Family(
        name="flux",
        title="FLUX.1-dev transformer",
        model_class="FluxTransformer2DModel",
        config=FLUX_CONFIG,
        tiny_config=FLUX_TINY_CONFIG,
        config_source="black-forest-labs/FLUX.1-dev transformer/config.json",
        targets=FLUX_TARGETS,
        script="flux",
        batch=1,
        latent_size=128,
        text_tokens=512,
        tiny_text_tokens=16,
        gradient_checkpointing=True,
        objective="rectified flow: x_t = (1 - s) x + s n, timestep = s, guidance 3.5, target = n - x (packed)",
        steps=5,
        warmup=2,
        order=("peft_lora", "paca", "lora", "frozen", "lora_default", "paca_default", "nf4_lora", "nf4_peft_lora"),
    ),
    "sdxl": Family(
        name="sdxl",
        title="SDXL base UNet",
        model_class="UNet2DConditionModel",
        config=SDXL_UNET_CONFIG,
        tiny_config=SDXL_TINY_CONFIG,
        config_source="stabilityai/stable-diffusion-xl-base-1.0 unet/config.json",
        targets=SDXL_TARGETS,
        script="sdxl",
        batch=2,
        latent_size=128,
        text_tokens=77,
        tiny_text_tokens=77,
        gradient_checkpointing=False,
        objective="epsilon: DDPM scaled_linear(0.00085, 0.012) x 1000 add_noise, target = noise",
        steps=10,
        warmup=3,
        order=("peft_lora", "paca_default", "lora_default", "paca", "lora", "frozen"),
    ),
    "sd3": Family(
        name="sd3",
        title="SD3.5-medium transformer",
        model_class="SD3Transformer2DModel",
        config=SD3_MEDIUM_CONFIG,
        tiny_config=SD3_TINY_CONFIG,
        config_source="stabilityai/stable-diffusion-3.5-medium transformer/config.json",
        targets=SD3_TARGETS,
        script="sd3",
        batch=2,
        latent_size=128,
        text_tokens=77 + 256,
        tiny_text_tokens=16,
        gradient_checkpointing=False,
        objective="flow: x_t = (1 - s) x + s n, timestep = 1000 s, target = n - x",
        steps=10,
        warmup=3,
        order=("peft_lora", "paca_default", "lora_default", "paca", "lora", "frozen"),
    ),
}
FAMILY_ORDER = ["flux", "sdxl", "sd3"]  # the most important numbers first
BASE_VARIANTS = ["frozen", "peft_lora", "lora", "paca", "lora_default", "paca_default"]
NF4_VARIANTS = ["nf4_lora", "nf4_peft_lora"]  # flux only, after every other family
VARIANTS = BASE_VARIANTS + NF4_VARIANTS
DEFAULT_VARIANTS = BASE_VARIANTS + ["nf4_lora"]


def model_config(family: Family, tiny: bool) -> dict[str, Any]:
    return dict(family.tiny_config if tiny else family.config)


def latent_size(family: Family, tiny: bool) -> int:
    return 8 if tiny else family.latent_size


def text_tokens(family: Family, tiny: bool) -> int:
    return family.tiny_text_tokens if tiny else family.text_tokens


def graphable(family: Family) -> bool:
    """Whether the studio's default step is a CUDA graph (pipelines.train.cuda_graph_blockers: not with
    gradient checkpointing); on the CPU a stand-in graph stands for it."""
    return not family.gradient_checkpointing


# ---------------------------------------------------------------------------------------------
# Models and batches.
# ---------------------------------------------------------------------------------------------
def build_model(family: Family, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int):
    """The family's denoiser with diffusers' default init from `seed`, built directly on `device` in `dtype`
    (Flux in fp32 would be 48 GB before the cast), in train mode, gradient checkpointing as the family runs."""
    import diffusers

    cls = getattr(diffusers, family.model_class)
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**model_config(family, tiny))
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype=dtype).train()  # buffers built in fp32 on purpose follow, as from_pretrained(dtype) does
    if family.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def make_inputs(family: Family, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int) -> StepInputs:
    """Random latents noised the family's way, random text conditioning, and the target; same seed, same batch."""
    config = model_config(family, tiny)
    generator = torch.Generator(device=device).manual_seed(seed)
    batch, size, tokens = family.batch, latent_size(family, tiny), text_tokens(family, tiny)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, device=device, generator=generator)

    if family.name == "sdxl":
        from diffusers import DDPMScheduler

        # SDXL's scheduler_config.json has SD 1.5's betas (scaled_linear 0.00085 -> 0.012, 1000 steps).
        scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
        latents, noise = (
            randn(batch, config["in_channels"], size, size),
            randn(batch, config["in_channels"], size, size),
        )
        timesteps = torch.randint(0, 1000, (batch,), device=device, generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        pixels = float(size * 8)  # original size, crop top-left (0, 0), target size: 1024 px
        time_ids = torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * batch, device=device)
        model_inputs = {
            "sample": noisy.to(dtype),
            "timestep": timesteps,
            "encoder_hidden_states": randn(batch, tokens, config["cross_attention_dim"]).to(dtype),
            "added_cond_kwargs": {"text_embeds": randn(batch, pooled_dim).to(dtype), "time_ids": time_ids.to(dtype)},
        }
        return StepInputs(model_inputs, noise.to(dtype))

    sigmas = torch.rand((batch,), device=device, generator=generator)
    if family.name == "flux":
        from diffusers import FluxPipeline

        channels = config["in_channels"] // 4  # 2x2 patches packed into the channels
        latents, noise = randn(batch, channels, size, size), randn(batch, channels, size, size)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1.0 - s) * latents + s * noise

        def pack(x: torch.Tensor) -> torch.Tensor:
            return FluxPipeline._pack_latents(x, batch, channels, size, size)

        model_inputs = {
            "hidden_states": pack(noisy).to(dtype),
            "timestep": sigmas,  # the script passes timesteps / 1000
            "guidance": torch.full((batch,), FLUX_GUIDANCE, device=device),
            "pooled_projections": randn(batch, config["pooled_projection_dim"]).to(dtype),
            "encoder_hidden_states": randn(batch, tokens, config["joint_attention_dim"]).to(dtype),
            "txt_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
            "img_ids": FluxPipeline._prepare_latent_image_ids(batch, size // 2, size // 2, device, dtype),
        }
        # The script unpacks the prediction and compares it with noise - latents; the MSE is the same packed.
        return StepInputs(model_inputs, pack(noise - latents).to(dtype))

    # sd3
    channels = config["in_channels"]
    latents, noise = randn(batch, channels, size, size), randn(batch, channels, size, size)
    s = sigmas.view(-1, 1, 1, 1)
    model_inputs = {
        "hidden_states": ((1.0 - s) * latents + s * noise).to(dtype),
        "timestep": sigmas * 1000.0,
        "encoder_hidden_states": randn(batch, tokens, config["joint_attention_dim"]).to(dtype),
        "pooled_projections": randn(batch, config["pooled_projection_dim"]).to(dtype),
    }
    return StepInputs(model_inputs, (noise - latents).to(dtype))


def input_shapes(inputs: StepInputs) -> dict[str, Any]:
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
        if isinstance(value, dict):
            return {k: describe(v) for k, v in value.items()}
        return value

    return {**describe(inputs.model_inputs), "target": describe(inputs.target)}


def with_noisy(inputs: StepInputs, noisy: torch.Tensor) -> StepInputs:
    key = "sample" if "sample" in inputs.model_inputs else "hidden_states"
    return StepInputs({**inputs.model_inputs, key: noisy}, inputs.target, inputs.weight)


def quantize_linears_nf4(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Every nn.Linear of `model` -> bitsandbytes NF4 Linear4bit (double quantization), in place, on the
    weights' device: peft_core.methods.loram.quantize_nf4 (written for LoRAM's small model), given every
    Linear's leaf name as its targets. Returns the number of layers quantized."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise RuntimeError("the nf4_* variants need bitsandbytes (carry its wheel in .whl/)") from error
    from peft_core.methods.loram import quantize_nf4

    names = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_nf4(model, targets=tuple(sorted(names)), compute_dtype=compute_dtype, double_quant=True)
    return sum(type(m).__name__ == "Linear4bit" for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Variants.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    handle: Any = None
    frozen: bool = False
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def method_of(variant: str) -> str:
    """The adapter a variant trains: frozen, peft_lora, lora or paca."""
    return {"lora_default": "lora", "paca_default": "paca", "nf4_lora": "lora", "nf4_peft_lora": "peft_lora"}.get(
        variant, variant
    )


def prepare(method: str, family: Family, model: torch.nn.Module, seed: int, tiny: bool = False) -> Prepared:
    """Freeze the model and add `method`'s adapter on the family's targets (adapter init seeded)."""
    lora_r, lora_alpha, paca_r, paca_alpha = TINY_RANKS if tiny else (LORA_R, LORA_ALPHA, PACA_R, PACA_ALPHA)
    model.requires_grad_(False)
    torch.manual_seed(seed + 1)
    if method == "frozen":
        return Prepared(model, [], frozen=True, info={"grad_to": "noisy latents only"})
    if method == "peft_lora":
        import peft

        config = peft.LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, init_lora_weights="gaussian", target_modules=list(family.targets)
        )
        model.add_adapter(config)
        params = [p for p in model.parameters() if p.requires_grad]
        adapted = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
        summary = {k: getattr(config, k) for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "init_lora_weights")}
        return Prepared(
            model,
            params,
            info={"config": {**summary, "target_modules": sorted(config.target_modules)}, "adapted_layers": adapted},
        )
    if method == "lora":
        config = LoraConfig(targets=list(family.targets), r=lora_r, alpha=lora_alpha)
    elif method == "paca":
        config = PacaConfig(targets=list(family.targets), r=paca_r, alpha=paca_alpha)
    else:
        raise ValueError(f"unknown method {method!r}")
    handle = attach(model, config)
    adapted = sum(1 for _ in handle.wrappers())
    return Prepared(
        model,
        handle.trainable_parameters(),
        handle=handle,
        info={"config": config.to_dict(), "adapted_layers": adapted},
    )


def make_eager_step(prepared: Prepared, optimizer, inputs: StepInputs) -> Callable[[], torch.Tensor]:
    """step() -> detached loss: zero_grad, forward, MSE (prediction_loss), backward, optimizer step."""
    model, frozen = prepared.model, prepared.frozen

    def step() -> torch.Tensor:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        # The floor: a fresh leaf each step, so backward runs dX through every layer.
        step_inputs = with_noisy(inputs, inputs.noisy.detach().requires_grad_(True)) if frozen else inputs
        loss = prediction_loss(model, step_inputs)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.detach()

    return step


class CpuStandInGraphs:
    """For --tiny on the CPU: GraphedTrainStep's graph factory where `capture` hands out the loss buffer
    and each replay runs the step eagerly (as tests/pipelines/test_cuda_graphs.py's LossGraphs)."""

    @contextlib.contextmanager
    def warmup(self):
        yield

    def capture(self, fn):
        loss = torch.zeros(())

        def replay() -> None:
            loss.copy_(fn())

        return loss, replay


def default_optimizer(params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    if device.type == "cuda":
        from pipelines.cuda_graphs import capturable_adamw

        return capturable_adamw(params, TIMING_LR, 0.0, device)
    return torch.optim.AdamW(params, lr=TIMING_LR)


def run_variant(family: Family, variant: str, args, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Build, prepare, warm up and time one variant; the result dict (no tensors)."""
    method = method_of(variant)
    graphed = variant.endswith("_default") and graphable(family)
    nf4 = variant.startswith("nf4_")
    start = time.perf_counter()
    log(f"[{family.name}/{variant}] building the {family.title} on {device} ({dtype})")
    model = build_model(family, args.tiny, device, dtype, args.seed)
    info: dict[str, Any] = {}
    if nf4:
        info["nf4_layers"] = quantize_linears_nf4(model, torch.bfloat16)
        free_memory(device)  # the bf16 weights the quantization replaced
    prepared = prepare(method, family, model, args.seed, args.tiny)
    inputs = make_inputs(family, args.tiny, device, dtype, args.seed + 2)
    fused = device.type == "cuda"
    path = "eager"
    if graphed:
        optimizer = default_optimizer(prepared.params, device)
    else:
        optimizer = torch.optim.AdamW(prepared.params, lr=TIMING_LR, fused=fused) if prepared.params else None
    if prepared.handle is not None and optimizer is not None:
        prepared.handle.track_optimizer(optimizer)  # as the studio does for every method
    sync(device)
    build_s = time.perf_counter() - start
    weights_gib = allocated_gib(device)  # weights + adapters, before any step (no optimizer state yet)
    trainable = sum(p.numel() for p in prepared.params)
    log(f"[{family.name}/{variant}] built in {build_s:.1f}s; {trainable:,} trainable params; first step ...")
    first_start = time.perf_counter()
    if not graphed:
        step = make_eager_step(prepared, optimizer, inputs)
        first_loss = float(step())
        sync(device)
        first_step_s = time.perf_counter() - first_start
    else:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the capture allocates the graph's pool: count it
        handle = prepared.handle
        trainer_step = GraphedTrainStep(
            prepared.model,
            optimizer,
            prepared.params,
            max_grad_norm=0.0,
            after_replay=lambda: handle.after_optimizer_step(refresh=False),
            graph_factory=None if device.type == "cuda" else CpuStandInGraphs(),
        )

        def step() -> torch.Tensor:
            return trainer_step(inputs).clone()

        capture_error = None
        try:
            for call in range(trainer_step.warmup + 1):  # eager warm-ups, then capture + first replay
                loss = float(step())
                if call == 0:
                    first_loss, first_step_s = loss, time.perf_counter() - first_start
            sync(device)
            info["warmup_and_capture_s"] = round(time.perf_counter() - first_start, 2)
            path = "graphed" if device.type == "cuda" else "graphed (CPU stand-in)"
        except GraphCaptureError as error:
            capture_error = f"{error}"[:1000]  # the exception (its traceback pins the model) ends with this block
        if capture_error is not None:
            # cuda_graph="auto": the studio trains eagerly from here on. A fresh model for the eager numbers.
            log(f"[{family.name}/{variant}] capture failed ({capture_error}); the default path is eager")
            del trainer_step, step, optimizer, prepared, model, handle
            free_memory(device)
            result = run_variant(family, variant.replace("_default", ""), args, device, dtype)
            return {**result, "path": "eager (CUDA-graph capture failed)", "capture_error": capture_error}
    log(
        f"[{family.name}/{variant}] first step {first_step_s:.1f}s, loss {first_loss:.5f}; {args.warmup} warm-up + "
        f"{args.steps} timed steps"
    )
    timing = time_steps(step, device, args.warmup, args.steps, reset_peak=not graphed)
    last_loss = float(timing["last"])
    ms = timing["ms_per_step"]
    result = {
        "path": path,
        "ms_per_step": round(ms, 3),
        "peak_gib": None if timing["peak_gib"] is None else round(timing["peak_gib"], 3),
        "images_per_s": round(family.batch * 1e3 / ms, 3),
        "ms_min": round(timing["ms_min"], 3),
        "ms_mean": round(timing["ms_mean"], 3),
        "ms_all": timing["ms_all"],
        "first_step_s": round(first_step_s, 2),
        "trainable_params": trainable,
        "trainable_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in prepared.params}),
        "weights_gib": None if weights_gib is None else round(weights_gib, 3),  # allocated before any step
        "loss_first": first_loss,
        "loss_last": last_loss,
        "finite": math.isfinite(first_loss) and math.isfinite(last_loss),
        "gradient_checkpointing": family.gradient_checkpointing,
        "build_s": round(build_s, 2),
        "wall_s": round(time.perf_counter() - start, 2),
        **info,
        **prepared.info,
    }
    log(
        f"[{family.name}/{variant}] {ms:.1f} ms/step (min {timing['ms_min']:.1f}), peak "
        f"{result['peak_gib'] if result['peak_gib'] is not None else '-'} GiB, loss {first_loss:.4f} -> {last_loss:.4f}"
    )
    return result


def eager_alias(results: dict[str, Any], variant: str, why: str) -> dict[str, Any] | None:
    """The default path is the eager step: the eager variant's numbers, labelled as such (None if not run)."""
    twin = variant.replace("_default", "")
    entry = results.get(twin)
    if not isinstance(entry, dict) or "ms_per_step" not in entry:
        return None
    return {**entry, "path": "eager", "same_as": twin, "why_not_graphed": why}


# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------
def _field(results: dict, variant: str, key: str):
    entry = results.get(variant)
    return entry.get(key) if isinstance(entry, dict) else None


def family_ratios(results: dict) -> dict[str, float | None]:
    t = lambda v: _field(results, v, "ms_per_step")  # noqa: E731
    m = lambda v: _field(results, v, "peak_gib")  # noqa: E731
    out: dict[str, float | None] = {}
    for variant in VARIANTS:
        if variant == "peft_lora" or t(variant) is None:
            continue
        out[f"{variant}_vs_peft_lora_time"] = ratio(t(variant), t("peft_lora"))
        out[f"{variant}_vs_peft_lora_memory"] = ratio(m(variant), m("peft_lora"))
        if variant != "frozen":
            out[f"{variant}_vs_frozen_time"] = ratio(t(variant), t("frozen"))
    out["peft_lora_vs_frozen_time"] = ratio(t("peft_lora"), t("frozen"))
    return out


# Issue 21's targets: (family, ratio key or "<variant>_peak_gib", bound).
CRITERIA = (
    ("flux", "paca_vs_peft_lora_time", 0.80),
    ("flux", "paca_vs_peft_lora_memory", 0.90),
    ("flux", "lora_vs_peft_lora_time", 0.95),
    ("flux", "lora_vs_peft_lora_memory", 1.0),
    ("sdxl", "lora_default_vs_peft_lora_time", 0.60),
    ("sdxl", "paca_default_vs_peft_lora_time", 0.60),
    ("flux", "nf4_lora_peak_gib", 24.0),
)


def first_loss_checks(results: dict, dtype: torch.dtype) -> dict[str, Any]:
    """Adapters start as the identity and every variant gets the same model and batch, so every dense
    variant's first loss should be frozen's (or peft_lora's) up to kernel rounding."""
    reference_name = next(
        (v for v in ("frozen", "peft_lora", "lora") if _field(results, v, "loss_first") is not None), None
    )
    if reference_name is None:
        return {}
    reference = _field(results, reference_name, "loss_first")
    tolerance = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    differences = {
        v: abs(_field(results, v, "loss_first") - reference) / max(abs(reference), 1e-12)
        for v in BASE_VARIANTS
        if v != reference_name and _field(results, v, "loss_first") is not None
    }
    adapted = {
        v: _field(results, v, "adapted_layers")
        for v in ("peft_lora", "lora", "paca")
        if _field(results, v, "adapted_layers") is not None
    }
    return {
        "reference": reference_name,
        "loss_first_rel_diff": {k: float(f"{v:.3g}") for k, v in differences.items()},
        "tolerance": tolerance,
        "pass": all(d <= tolerance for d in differences.values()) if differences else None,
        # HF PEFT and peft_core match targets the same way (exact name or dotted suffix): the same layers.
        "adapted_layers": adapted,
        "same_adapted_layers": len(set(adapted.values())) == 1 if len(adapted) > 1 else None,
    }


def update_report(report: dict, dtype: torch.dtype) -> None:
    values: dict[str, float | None] = {}
    for family in report["families"].values():
        results = family["results"]
        family["ratios"] = family_ratios(results)
        family["checks"] = first_loss_checks(results, dtype)
    criteria: dict[str, bool | None] = {}
    for family_name, key, bound in CRITERIA:
        family = report["families"].get(family_name, {})
        if key.endswith("_peak_gib"):
            value = _field(family.get("results", {}), key.removesuffix("_peak_gib"), "peak_gib")
        else:
            value = family.get("ratios", {}).get(key)
        label = f"{family_name} {key} <= {bound}"
        values[label] = value
        criteria[label] = None if value is None else value <= bound
    report["criteria"], report["criteria_values"] = criteria, values
    if report.get("tiny") or not str(report.get("device", "")).startswith(("NVIDIA", "cuda")):
        report["criteria_note"] = "not a GPU run at real size: these verdicts say nothing about issue 21's targets"
    else:
        report.pop("criteria_note", None)


def print_summary(report: dict) -> None:
    log("")
    log(
        f"family_step on {report['device']} ({report['dtype']}); torch {report['torch']}, diffusers "
        f"{report['diffusers']}, peft {report['peft']}, bitsandbytes {report['bitsandbytes']}"
    )
    for name, family in report["families"].items():
        results = family["results"]
        frozen_ms, peft_ms, peft_mem = (
            _field(results, "frozen", "ms_per_step"),
            _field(results, "peft_lora", "ms_per_step"),
            _field(results, "peft_lora", "peak_gib"),
        )
        rows = []
        for variant, entry in results.items():
            if not isinstance(entry, dict) or "ms_per_step" not in entry:
                rows.append([variant, "error" if entry else "null", None, None, None, None, None, None, None])
                continue
            ms = entry["ms_per_step"]
            rows.append(
                [
                    variant,
                    entry["path"],
                    ms,
                    entry["peak_gib"],
                    entry["trainable_params"],
                    ratio(ms, frozen_ms),
                    ratio(ms, peft_ms),
                    ratio(entry["peak_gib"], peft_mem),
                    entry["loss_first"],
                ]
            )
        log(f"\n{name}: {family['title']}, batch {family['batch']}, {family['resolution_px']} px")
        log(
            format_table(
                ["variant", "path", "ms/step", "peak GiB", "trainable", "t/frozen", "t/peft", "mem/peft", "loss 1"],
                rows,
            )
        )
        checks = family.get("checks") or {}
        if checks:
            log(
                f"first-loss check vs {checks['reference']}: {'PASS' if checks['pass'] else checks['pass']}; "
                f"adapted layers {checks['adapted_layers']}"
            )
    log("")
    for label, passed in report.get("criteria", {}).items():
        verdict = "-" if passed is None else ("PASS" if passed else "FAIL")
        log(f"criterion {label}: {verdict} ({report['criteria_values'][label]})")


def family_entry(family: Family, args, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "title": family.title,
        "model_class": family.model_class,
        "config": model_config(family, args.tiny),
        "config_source": "tiny (CPU smoke test)" if args.tiny else family.config_source,
        "batch": family.batch,
        "resolution_px": latent_size(family, args.tiny) * 8,
        "gradient_checkpointing": family.gradient_checkpointing,
        "objective": family.objective,
        "targets": family.targets,
        "targets_source": TARGETS_SOURCE.format(family.script),
        "default_path": "CUDA graph (GraphedTrainStep)"
        if graphable(family)
        else "eager: gradient checkpointing blocks CUDA graphs (pipelines.train.cuda_graph_blockers)",
        "steps": args.steps or family.steps,
        "warmup": args.warmup if args.warmup is not None else family.warmup,
        "results": {},
    }


# ---------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", default=",".join(FAMILY_ORDER), help="comma list of flux, sdxl, sd3")
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma list of {', '.join(VARIANTS)} (default: {', '.join(DEFAULT_VARIANTS)}); nf4_* run on flux only",
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny configs, fp32, 2 + 1 steps, /tmp")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: flux 5, others 10)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps after the first (default: flux 2, others 3)"
    )
    parser.add_argument("--append", action="store_true", help="merge into --out's existing results")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default=None, help="default bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="default bench/results/family_step.json on CUDA, /tmp/family_step_<config>.json"
    )
    args = parser.parse_args(argv)
    args.config = "tiny" if args.tiny else "full"  # device_dtype_out's CPU file name
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {FAMILY_ORDER}")
    args.families = [f for f in FAMILY_ORDER if f in families]
    args.variants = parse_variants(parser, args.variants, VARIANTS) if args.variants else list(DEFAULT_VARIANTS)
    if args.tiny:
        args.steps = args.steps or 2
        args.warmup = 1 if args.warmup is None else args.warmup
    return args


def work_list(args) -> list[tuple[str, str]]:
    """(family, variant) in the order run: each family's variants by its priority, flux first, NF4 last."""
    work = [
        (name, v) for name in args.families for v in FAMILIES[name].order if v in args.variants and v in BASE_VARIANTS
    ]
    if "flux" in args.families:
        work += [("flux", v) for v in FAMILIES["flux"].order if v in args.variants and v in NF4_VARIANTS]
    return work


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype, out = device_dtype_out(args, "family_step")
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "families": {},
    }
    if args.append and out.is_file():
        previous = json.loads(out.read_text(encoding="utf-8"))
        if previous.get("device") != report["device"]:
            log(f"warning: appending {report['device']} results to a file from {previous.get('device')}")
        report = {**previous, "device": report["device"]}
    report.update(
        {
            "dtype": str(dtype).replace("torch.", ""),
            "tiny": args.tiny,
            "optimizer": f"torch.optim.AdamW(lr={TIMING_LR}, fused={device.type == 'cuda'}); the graphed default "
            "path: pipelines.cuda_graphs.capturable_adamw (fused, capturable); no gradient clipping anywhere",
            **package_versions("diffusers", "peft", "transformers", "bitsandbytes"),
            "cuda": torch.version.cuda,
            "notes": {
                "weights": "random, diffusers' default init from one seed, built on the device in the dtype",
                "frozen": "weights frozen; requires_grad only on the noisy latents; no optimizer step",
                "peft_lora": f"model.add_adapter(peft.LoraConfig(r={LORA_R}, lora_alpha={LORA_ALPHA}, "
                "init_lora_weights='gaussian', target_modules=<the family's DreamBooth LoRA script's>)), eager",
                "lora": f"peft_core LoRA r={LORA_R}, alpha={LORA_ALPHA}, eager",
                "paca": f"peft_core PaCA r={PACA_R}, alpha={PACA_ALPHA} (parameter-matched to LoRA r={LORA_R}), eager",
                "lora_default/paca_default": "the studio's default step: GraphedTrainStep (CUDA graph) where the "
                "family allows it; with gradient checkpointing (Flux) the eager step, labelled path 'eager'",
                "nf4_lora": "FLUX.1-dev, every nn.Linear NF4 (double quant, bf16 compute) via "
                "peft_core.methods.loram.quantize_nf4, peft_core LoRA r=16, gradient checkpointing",
                "peak_gib": "torch.cuda.max_memory_allocated over the timed steps (graphed: since before the capture)",
                "graphed (CPU stand-in)": "--tiny on the CPU: GraphedTrainStep with a stand-in graph whose replays "
                "run the step eagerly (plumbing only; the time is not a graph's)",
            },
        }
    )
    for name in args.families:
        entry = family_entry(FAMILIES[name], args, device, dtype)
        old = report["families"].get(name, {}).get("results", {}) if args.append else {}
        entry["results"] = old
        report["families"][name] = entry
    for name in [n for n in report["families"] if n not in FAMILIES]:
        del report["families"][name]
    work = work_list(args)
    log(
        f"family_step: {report['device']} ({report['dtype']}), torch {report['torch']}, diffusers "
        f"{report['diffusers']}, peft {report['peft']}, bitsandbytes {report['bitsandbytes']}; work {work}"
    )

    for family_name, variant in work:
        family = FAMILIES[family_name]
        results = report["families"][family_name]["results"]
        variant_args = argparse.Namespace(**vars(args))
        variant_args.steps = args.steps or family.steps
        variant_args.warmup = args.warmup if args.warmup is not None else family.warmup
        if variant.endswith("_default") and not graphable(family):
            alias = eager_alias(results, variant, "gradient checkpointing (pipelines.train.cuda_graph_blockers)")
            if alias is not None:
                results[variant] = alias
                update_report(report, dtype)
                write_json(out, report)
                log(f"[{family_name}/{variant}] the default path is eager: {alias['same_as']}'s numbers")
                continue
        free_memory(device)
        # On file before it runs: a variant killed by a timeout shows as such, not as absent.
        results[variant] = {"error": "started but did not finish (killed, e.g. by a timeout)"}
        write_json(out, report)
        try:
            result = run_variant(family, variant, variant_args, device, dtype)
            if variant.endswith("_default") and not graphable(family):
                result.update(
                    path="eager", why_not_graphed="gradient checkpointing (pipelines.train.cuda_graph_blockers)"
                )
            results[variant] = result
        except Exception as error:  # noqa: BLE001 - keep the other variants' numbers
            traceback.print_exc()
            results[variant] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        free_memory(device)
        update_report(report, dtype)
        write_json(out, report)

    update_report(report, dtype)
    report["wall_s"] = round(time.perf_counter() - started, 1)  # this run's (with --append: the last stage's)
    report["runs"] = (report.get("runs", []) if args.append else []) + [
        {"families": args.families, "variants": args.variants, "wall_s": report["wall_s"]}
    ]
    write_json(out, report)
    print_summary(report)
    log(f"wrote {out} ({report['wall_s']}s)")
    return report


if __name__ == "__main__":
    main()
