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
        # SDXL's micro-conditioning: (original h, w, crop top, left, target h, w), as SDXL was trained
        # and as diffusers' SDXL training scripts give it: each image's size before resizing and the
        # corner of its crop ("size_ids", from the batch), the target being the training size. Without
        # them (a dataset that does not say) the image is taken as already at the target size.
        height, width = (side * pipe.vae_scale_factor for side in noisy.shape[-2:])
        target = torch.tensor([height, width], device=noisy.device, dtype=noisy.dtype).expand(noisy.shape[0], 2)
        given = conditioning.get("size_ids")
        if given is None:
            given = torch.tensor([height, width, 0, 0], device=noisy.device, dtype=noisy.dtype).expand(
                noisy.shape[0], 4
            )
        time_ids = torch.cat([given.to(noisy.device, noisy.dtype), target], dim=1)
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
    size_conditioned=True,
)
