"""The embedded tiny Stable Diffusion: its tokenizer, model configs and pipeline assembly.

The architecture is exactly Stable Diffusion's (CLIP text encoder -> UNet2DConditionModel with
cross-attention -> AutoencoderKL), only narrow: every code path that runs on SD 1.x runs here.
Sizes were chosen so a 64x64 picture takes well under a second on a 2-core CPU (0.62 s measured,
20 steps with guidance) and the float32 weights stay near 40 MB (docs/embedded.md has the numbers).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from pipelines.world.image import caption_words

IMAGE_SIZE = 64
TOKENIZER_MAX_LENGTH = 32  # captions are ~12 tokens; novel words fall back to characters
TEXT_HIDDEN = 128

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Write a CLIP BPE `vocab.json` + `merges.txt` where every caption word is one token.

    The vocabulary holds every printable character (alone and as a word end "x</w>"), so any
    prompt is encodable: words outside the world (a user's "sks", the novel "moon") split into
    characters instead of becoming unknown. Each world word gets the chain of merges that builds it
    left to right, which BPE then replays to reach the whole word.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens: list[str] = characters + [c + "</w>" for c in characters]
    merges: list[tuple[str, str]] = []
    for word in caption_words():
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1]] + symbols[2:]
    vocab: dict[str, int] = {}
    for token in tokens + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def build_tokenizer(folder: str | Path):
    """The world's `CLIPTokenizer` (files written into `folder`, which from_pretrained can reload)."""
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=TOKENIZER_MAX_LENGTH
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def text_encoder_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def vae_config() -> dict:
    # Three blocks = two downsamplings: 64x64x3 pixels <-> 16x16x4 latents (SD uses 8x; 4x keeps
    # the small patterns of this world readable at 64 px).
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
    )


def unet_config() -> dict:
    return dict(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 192),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def scheduler_config() -> dict:
    """Stable Diffusion 1.x's noise schedule (the UNet is trained on it, any SD sampler works)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
    )


def build_models(tokenizer_folder: str | Path, seed: int):
    """Freshly initialised (tokenizer, text_encoder, vae, unet) of the embedded model, seeded."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer(tokenizer_folder)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer))
    vae = AutoencoderKL(**vae_config())
    unet = UNet2DConditionModel(**unet_config())
    return tokenizer, text_encoder, vae, unet


def load_parts(folder: str | Path):
    """(tokenizer, text_encoder, vae, unet) of a saved embedded pipeline, to continue training it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    return (
        CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True),
        AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True),
        UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True),
    )


def assemble_pipeline(tokenizer, text_encoder, vae, unet):
    """A `StableDiffusionPipeline` of the parts, with DPM-Solver++ (good pictures in ~20 steps)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(**scheduler_config())
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
