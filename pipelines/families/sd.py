"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, noise prediction (epsilon or v)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipelines.families.base import NoisePrediction

# Every attention projection of an SD UNet (self- and cross-attention): the usual adapter targets.
UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class StableDiffusion(NoisePrediction):
    def encode_prompts(self, pipe, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        tokens = pipe.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        return {"encoder_hidden_states": pipe.text_encoder(tokens)[0]}


FAMILY = StableDiffusion(
    name="sd",
    title="Stable Diffusion 1.x/2.x",
    pipeline_class="StableDiffusionPipeline",
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    denoiser_name="unet",
    default_targets=UNET_ATTENTION_TARGETS,
    single_file_keys=("model.diffusion_model.input_blocks.", "down_blocks.", "unet."),
    objective="noise prediction",
    trains_text_encoder=True,
)
