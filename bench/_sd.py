"""Stable Diffusion 1.5 shaped models with random weights, shared by bench/sd_step.py and bench/generate.py.

No machine here can download weights, so the benches build every component from its config, written
out below as SD 1.5 ships it (runwayml/stable-diffusion-v1-5's unet/, text_encoder/, vae/ and a DDIM
scheduler with its noise schedule), plus a "tiny" set with the same block types for CPU smoke tests.
Speed does not depend on the weights' values, only on the shapes, so random weights measure the
real model's cost. The tokenizer is the embedded tiny SD's (assets/tiny-sd/tokenizer): its 245 ids
are a subset of SD 1.5's 49 408-token vocabulary, and it pads to the text encoder's 77 positions.
"""

from __future__ import annotations

from typing import Any

from _common import REPO_ROOT

# Every attention projection of the UNet (self- and cross-attention): what users adapt.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=768,
        attention_head_dim=8,  # diffusers' name; in SD 1.5 it is the number of heads
    ),
    "tiny": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
}

TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=0,  # as in SD 1.5's text_encoder/config.json
        eos_token_id=2,
        pad_token_id=1,
    ),
    "tiny": dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
        bos_token_id=243,  # the embedded tokenizer's special tokens
        eos_token_id=244,
        pad_token_id=244,
    ),
}

VAE_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ),
    "tiny": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    ),
}

# SD 1.5's noise schedule; DDIM with the settings diffusers' SD 1.5 examples use.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)

TOKENIZER_DIR = REPO_ROOT / "assets" / "tiny-sd" / "tokenizer"


def random_unet(config_name: str, device, dtype, seed: int):
    """A UNet2DConditionModel of config `config_name`, built on `device` (no CPU init of 860 M
    parameters) with diffusers' default init from `seed`, cast to `dtype`, in train mode."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIGS[config_name])
    return unet.to(dtype=dtype).train()


def random_text_encoder(config_name: str, device, dtype, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIGS[config_name]))
    return model.to(dtype=dtype).eval()


def random_vae(config_name: str, device, dtype, seed: int):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL(**VAE_CONFIGS[config_name])
    return vae.to(dtype=dtype).eval()


def tokenizer(max_length: int):
    """The embedded tiny SD's CLIP tokenizer, padding to `max_length` (the text encoder's positions)."""
    from transformers import CLIPTokenizer

    loaded = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    loaded.model_max_length = max_length
    return loaded
