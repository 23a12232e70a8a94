"""Stable Diffusion 3 / 3.5: two CLIPs and a T5 (the MMDiT's joint text stream and pooled vector),
an MMDiT transformer on 2x2 patches, rectified flow with a fixed time shift (3.0 for SD3/3.5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipelines.families.base import RectifiedFlow

# Attention (image and text streams) and feed-forward projections of every joint block.
MMDIT_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
T5_TOKENS = 256  # the text length SD3's pipeline and training scripts use by default


class StableDiffusion3(RectifiedFlow):
    def encode_prompts(self, pipe, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            list(prompts), None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def model_inputs(self, pipe, noisy: torch.Tensor, sigmas: torch.Tensor, conditioning: dict) -> dict:
        timesteps = sigmas * pipe.scheduler.config.num_train_timesteps  # the pipeline's t = 1000 sigma
        return {"hidden_states": noisy, "timestep": timesteps, **conditioning}


FAMILY = StableDiffusion3(
    name="sd3",
    title="Stable Diffusion 3/3.5",
    pipeline_class="StableDiffusion3Pipeline",
    pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
    denoiser_name="transformer",
    default_targets=MMDIT_TARGETS,
    single_file_keys=("model.diffusion_model.joint_blocks.", "transformer_blocks.0.attn.add_q_proj."),
    objective="rectified flow",
    patch_size=2,
)
