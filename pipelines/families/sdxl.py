"""Stable Diffusion XL: two CLIP text encoders (hidden states concatenated, the second's pooled
projection), size/crop "time ids", a UNet, noise prediction."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipelines.families.base import NoisePrediction
from pipelines.families.sd import UNET_ATTENTION_TARGETS


class StableDiffusionXL(NoisePrediction):
    def encode_prompts(self, pipe, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def model_inputs(self, pipe, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> dict:
        # SDXL's micro-conditioning: (original h, w, crop top, left, target h, w). Training crops are
        # square crops at the training size, so all of them are the image itself at that size.
        height, width = (side * pipe.vae_scale_factor for side in noisy.shape[-2:])
        sizes = [height, width, 0, 0, height, width]
        time_ids = torch.tensor([sizes] * noisy.shape[0], device=noisy.device, dtype=noisy.dtype)
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids}
        return {
            "sample": noisy,
            "timestep": timesteps,
            "encoder_hidden_states": conditioning["encoder_hidden_states"],
            "added_cond_kwargs": added,
        }


FAMILY = StableDiffusionXL(
    name="sdxl",
    title="Stable Diffusion XL",
    pipeline_class="StableDiffusionXLPipeline",
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    denoiser_name="unet",
    default_targets=UNET_ATTENTION_TARGETS,
    single_file_keys=("conditioner.embedders.1.", "add_embedding.linear_1."),
    objective="noise prediction",
)
