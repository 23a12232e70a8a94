"""Micro SDXL, SD3 and Flux pipelines built from configs (no download), for fast CPU tests.

Each builder returns the real diffusers pipeline class around random-init components (90k-400k parameters in all), with
the cross-component dims wired the way the real checkpoints wire them, so code written against those pipelines (LoRA
targets, text conditioning, latent packing) is exercised without the hub. Images are 16x16: every VAE has two blocks,
so vae_scale_factor is 2 and the 8x8 latents decode to 16 px.

Dims (real checkpoint in brackets):
  CLIP-L-like text encoder: hidden 8, projection 8 [768, 768]
  CLIP-G-like text encoder: hidden 16, projection 16 [1280, 1280]
  T5-like encoder: d_model 32 [4096]
  SDXL: cross_attention_dim 8 + 16 = 24 [2048]; pooled = CLIP-G projection only, so
        projection_class_embeddings_input_dim = 16 + 6 * addition_time_embed_dim 8 = 64 [1280 + 6 * 256 = 2816]
  SD3: pooled_projection_dim 8 + 16 = 24 [2048]; CLIP hidden states (24 wide) are zero-padded to joint_attention_dim 32
  Flux: pooled_projection_dim = CLIP-L pooler_output = hidden 8 [768]; in_channels 4 * 16 = 64 (2x2 packing)
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        DiffusionPipeline,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTokenizer, PreTrainedModel, T5TokenizerFast

# Real checkpoints' VAE latent normalisation, from their vae/config.json.
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
# The max_sequence_length tests pass to SD3/Flux; their defaults (256/512) work too (T5 positions are relative), slower.
T5_TOKENS = 16

_CHARACTERS = sorted(set(string.ascii_lowercase + string.digits))


def _clip_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A char-level CLIP BPE tokenizer (no merges).

    Loaded with from_pretrained from a scratch folder: transformers 5's CLIPTokenizer(vocab_file=..., merges_file=...)
    silently ignores the files and maps every word to one id, while from_pretrained reads them in any version. The
    scratch folder is a temporary directory, so nothing lands in (or collides with) the saved pipeline folder.
    """
    from transformers import CLIPTokenizer

    tokens = _CHARACTERS + [c + "</w>" for c in _CHARACTERS] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
        (Path(scratch) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(scratch, model_max_length=max_length)


def _t5_tokenizer() -> T5TokenizerFast:
    """A char-level T5 tokenizer (Unigram over "▁" + characters), built in memory.

    T5's real tokenizer needs a sentencepiece model; a `tokenizers` Unigram wrapped in T5TokenizerFast gives the same
    special-token layout (<pad>=0, </s>=1, <unk>=2, "</s>" appended) and saves as tokenizer.json. In transformers 5
    T5TokenizerFast is T5Tokenizer, so model_index.json records "T5Tokenizer".
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in _CHARACTERS] + [("▁" + c, -1.5) for c in _CHARACTERS]
    backend = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )


def _clip_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int, seed: int, projection: bool) -> PreTrainedModel:
    """CLIPTextModel (projection=False) or CLIPTextModelWithProjection with projection_dim = hidden_size.

    Two layers, because every one of these pipelines reads hidden_states[-2] (the penultimate layer).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5_encoder(tokenizer: T5TokenizerFast, seed: int) -> PreTrainedModel:
    """A one-layer T5 v1.1-style encoder (gated-gelu), d_model 32."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config)


def _vae(seed: int, latent_channels: int, **factors: float) -> AutoencoderKL:
    """A two-block AutoencoderKL (vae_scale_factor 2). SD3/Flux VAEs have no quant convs and a shift_factor."""
    from diffusers import AutoencoderKL

    flow = latent_channels == 16
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
        **factors,
    )


def micro_sdxl(folder: Path, seed: int = 0, save: bool = True) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline: CLIP-L + CLIP-G(with projection), a text_time UNet, 16 px images.

    The UNet follows SDXL's layout (first block without attention, deeper transformer stacks lower down, linear
    projections). `folder` receives the diffusers folder when `save`.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, 8, seed, projection=False)
    text_encoder_2 = _clip_text_encoder(tokenizer_2, 16, seed + 1, projection=True)
    vae = _vae(seed + 2, latent_channels=4, scaling_factor=0.13025)
    addition_time_embed_dim = 8
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(
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
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        # add_time_ids are six numbers (original size, crop corner, target size); the pooled vector is CLIP-G's only.
        projection_class_embeddings_input_dim=text_encoder_2.config.projection_dim + 6 * addition_time_embed_dim,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return _finish(pipe, folder, save)


def micro_sd3(folder: Path, seed: int = 0, save: bool = True) -> StableDiffusion3Pipeline:
    """A StableDiffusion3Pipeline: CLIP-L + CLIP-G (both with projection) + T5, an MMDiT, 16 px images.

    The pipeline concatenates the CLIP hidden states (8 + 16), zero-pads them to T5's width (32) and stacks them before
    the T5 tokens along the sequence, so joint_attention_dim must be >= 24: torch's pad with a negative amount would
    silently crop instead of failing.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, 8, seed, projection=True)
    text_encoder_2 = _clip_text_encoder(tokenizer_2, 16, seed + 1, projection=True)
    text_encoder_3 = _t5_encoder(tokenizer_3, seed + 2)
    vae = _vae(seed + 3, latent_channels=16, **SD3_VAE_FACTORS)
    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=16,  # = num_attention_heads * attention_head_dim: text and image share the attention
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=16,  # latent side / patch_size must not exceed it: up to 64 px images
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _finish(pipe, folder, save)


def micro_flux(folder: Path, seed: int = 0, save: bool = True) -> FluxPipeline:
    """A FluxPipeline (dev-like: guidance_embeds): CLIP-L + T5, one double and one single block.

    FluxPipeline hard-codes default_sample_size = 128, so callers must pass height/width (multiples of 4 here:
    vae_scale_factor * 2 for the 2x2 latent packing), or they get 256 px images.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    text_encoder = _clip_text_encoder(tokenizer, 8, seed, projection=False)
    text_encoder_2 = _t5_encoder(tokenizer_2, seed + 1)
    vae = _vae(seed + 2, latent_channels=16, **FLUX_VAE_FACTORS)
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * vae.config.latent_channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size,  # the pipeline passes CLIP's pooler_output
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
    )
    # FLUX.1-dev's scheduler_config.json.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _finish(pipe, folder, save)


def save_micro(pipe: DiffusionPipeline, folder: Path) -> Path:
    """Save as a diffusers folder that DiffusionPipeline.from_pretrained(use_safetensors=True) loads offline."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _finish(pipe: DiffusionPipeline, folder: Path, save: bool) -> DiffusionPipeline:
    """Eval mode, as from_pretrained leaves modules: T5's dropout (0.1) would otherwise make every call differ."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    if save:
        save_micro(pipe, folder)
    return pipe
