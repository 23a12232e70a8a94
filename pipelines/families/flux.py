"""Flux.1 (dev and schnell): a CLIP (pooled vector) and a T5 (text tokens), a transformer of double-
and single-stream blocks reading 2x2-packed latent tokens, rectified flow with a resolution-dependent
time shift (dev) or none (schnell), and dev's distilled guidance as an input."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipelines.families.base import RectifiedFlow
from pipelines.families.sd3 import MMDIT_TARGETS

# Double-stream blocks as SD3's joint blocks (attention of both streams, both feed-forwards); single-
# stream blocks: their attention projections (the same suffixes) and the fused MLP in/out, named by a
# pattern so that the model's final `proj_out` (the output layer) is not among them.
FLUX_TARGETS = (*MMDIT_TARGETS, "re:single_transformer_blocks\\.\\d+\\.(proj_mlp|proj_out)")
TRAINING_GUIDANCE = 1.0  # dev's guidance input while training (kohya's and ai-toolkit's choice)


class Flux(RectifiedFlow):
    def encode_prompts(self, pipe, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, pooled, text_ids = pipe.encode_prompt(
            list(prompts), None, device=device, max_sequence_length=self.text_tokens(pipe)
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    def text_tokens(self, pipe) -> int:
        """T5 tokens: 512 for dev (guidance-distilled), 256 for schnell, as their pipelines use."""
        return 512 if self.denoiser(pipe).config.guidance_embeds else 256

    def default_size(self, pipe) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        n, c, h, w = latents.shape
        patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(n, (h // 2) * (w // 2), c * 4)

    def model_inputs(self, pipe, noisy: torch.Tensor, sigmas: torch.Tensor, conditioning: dict) -> dict:
        n, _, h, w = noisy.shape
        ids = torch.zeros(h // 2, w // 2, 3, device=noisy.device)
        ids[..., 1] += torch.arange(h // 2, device=noisy.device)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=noisy.device)[None, :]
        inputs = {
            "hidden_states": self.pack(noisy),
            "timestep": sigmas.to(noisy.dtype),  # the pipeline passes t / 1000 = sigma
            **conditioning,
            "txt_ids": conditioning["txt_ids"].to(noisy.dtype),
            "img_ids": ids.reshape(-1, 3).to(noisy.dtype),
        }
        if self.denoiser(pipe).config.guidance_embeds:
            inputs["guidance"] = torch.full((n,), TRAINING_GUIDANCE, device=noisy.device, dtype=torch.float32)
        return inputs


FAMILY = Flux(
    name="flux",
    title="Flux.1",
    pipeline_class="FluxPipeline",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline"),
    denoiser_name="transformer",
    default_targets=FLUX_TARGETS,
    single_file_keys=("double_blocks.", "model.diffusion_model.double_blocks."),
    objective="rectified flow",
    patch_size=2,
    shared_conditioning=("txt_ids",),
)
