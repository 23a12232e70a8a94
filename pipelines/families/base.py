"""The model-family contract: the few things that differ between SD 1.x/2.x, SDXL, SD3/3.5 and Flux.1.

The training loop, the sample grids, checkpoints, Break-for-Make and the exports are written once; they
ask the pipeline's family (`pipelines.families.family_of(pipe)`) for:

- `denoiser(pipe)`: the network adapters attach to (`pipe.unet`, or `pipe.transformer` for the DiTs);
- `encode_prompts(pipe, prompts, device)`: the denoiser's conditioning as keyword tensors (one to three
  text encoders, pooled embeddings, SDXL's size/crop time ids, Flux's text ids);
- `image_latents(pipe, pixels, generator, device)`: a VAE sample, scaled (and shifted) as the family's
  VAE config says;
- `noised_inputs(pipe, latents, conditioning, generator, scheduler, dtype)`: the training objective, i.e.
  the random draws (noise, timestep) and what the denoiser is given and should predict;
- defaults: adapter targets, the image size, the multiple every image side must be.

Two objectives cover the four families. Noise prediction (SD, SDXL): x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps at a uniform integer t, target eps, v or x_0 as the scheduler's prediction_type
says. Rectified flow (SD3, Flux): x_sigma = (1 - sigma) x_0 + sigma eps, target eps - x_0 (the
velocity), sigma = shift(u) with u logit-normal (SD3 paper, section 3.1: "lognorm(0, 1)") and the
time shift s*u / (1 + (s - 1) u) of the scheduler: a fixed s for SD3 (its config's `shift`), and for
Flux s = exp(mu), mu linear in the number of image tokens (resolution-dependent, the scheduler's
dynamic shifting that Flux's pipeline samples with).

Two options of the noise-prediction objective (`noised_inputs(..., noise_offset=, min_snr_gamma=)`):
- noise offset (the "offset noise" trick): eps += offset * n, one n ~ N(0, 1) per (image, latent
  channel), drawn after the timesteps; the noisy latents and an epsilon/v target use that noise. A DDPM
  schedule never reaches pure noise (its last SNR is > 0), so the model cannot learn to change an image's
  mean colour; the offset lets it (darker and brighter images).
- min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
  Strategy", eq. 11-13): per-sample loss weight min(SNR_t, gamma) / SNR_t for an epsilon target,
  min(SNR_t, gamma) / (SNR_t + 1) for v and min(SNR_t, gamma) for x_0, SNR_t = abar_t / (1 - abar_t).
Rectified flow (SD3, Flux) refuses both: its path reaches pure noise at sigma = 1 (the offset's problem
does not arise), and its timesteps are already weighted by the logit-normal draw (SD3 paper, 3.1).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipelines.cuda_graphs import StepInputs
from pipelines.errors import UserError

# (this process's index, number of processes) or (index, processes, segments): with segments > 1 the
# local batch is that many parts (the loop's training images, then its regularisation images), each
# part being this process's rows of that part of the global batch (see `share_rows`).
Share = tuple[int, ...]


@dataclass(frozen=True)
class Family(ABC):
    """One model family. Subclasses implement `encode_prompts`, `model_inputs` and the objective
    (`training_scheduler`, `draw_noised`); `noised_inputs` is the same for all."""

    name: str  # "sd", "sdxl", "sd3", "flux": what --family takes
    title: str  # for people: "Stable Diffusion XL"
    pipeline_class: str  # the diffusers pipeline that loads it
    pipeline_classes: tuple[str, ...]  # every diffusers class name (model_index.json) that means this family
    denoiser_name: str  # the pipeline attribute adapters attach to
    default_targets: tuple[str, ...]  # adapter targets when the user names none
    single_file_keys: tuple[str, ...]  # tensor-name prefixes that mark a single-file checkpoint of the family
    objective: str  # "noise prediction" or "rectified flow" (said in help and docs)
    patch_size: int = 1  # latent pixels per token side (2 for the DiTs): image sides are multiples of VAE factor x this
    trains_text_encoder: bool = False  # whether --train-text-encoder is supported on this family
    shared_conditioning: tuple[str, ...] = ()  # conditioning tensors with no batch dimension (Flux's txt_ids)
    size_conditioned: bool = False  # the denoiser takes each image's original size and crop (SDXL's "size_ids")

    def denoiser(self, pipe) -> nn.Module:
        return getattr(pipe, self.denoiser_name)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the denoiser reads and writes them (Flux packs 2x2 patches into tokens)."""
        return latents

    def check_objective_options(self, noise_offset: float = 0.0, min_snr_gamma: float = 0.0) -> None:  # noqa: B027
        """UserError if this family's objective cannot take these options (see the module docstring); the
        noise-prediction objective takes both, so by default nothing is refused."""

    def default_size(self, pipe) -> int:
        """The image side the model was trained at (pixels)."""
        return int(self.denoiser(pipe).config.sample_size) * int(pipe.vae_scale_factor)

    def text_encoders(self, pipe) -> list[nn.Module]:
        return [
            getattr(pipe, name)
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if getattr(pipe, name, None) is not None
        ]

    def frozen_modules(self, pipe) -> list[nn.Module]:
        """Everything of the pipeline with weights: frozen before adapters are attached."""
        return [self.denoiser(pipe), pipe.vae, *self.text_encoders(pipe)]

    def size_multiple(self, pipe) -> int:
        """Every image side must be a multiple of this: the VAE's factor (8) times the patch size."""
        return int(pipe.vae_scale_factor) * self.patch_size

    def check_size(self, pipe, size: int, what: str = "resolution") -> None:
        multiple = self.size_multiple(pipe)
        if size % multiple:
            nearest = max(multiple, size - size % multiple)
            raise UserError(
                f"{what} {size} is not a multiple of {multiple}, which {self.title} needs "
                f"(the VAE's factor times the patch size); use e.g. {nearest}"
            )

    @abstractmethod
    def encode_prompts(self, pipe, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning for `prompts` as keyword tensors."""

    def posterior(self, pipe, pixels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE's posterior for `pixels` (N, 3, H, W) in [-1, 1]."""
        vae = pipe.vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    def sample_latents(
        self, pipe, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, share: Share = (0, 1)
    ) -> torch.Tensor:
        """A sample of the posterior, scaled (and shifted) for the denoiser as the VAE's config says.

        The sample is drawn on the CPU from `generator` (the step's), so a run draws the same numbers on
        any device; `share` is this process's part of the global batch (see `randn_share`)."""
        config = pipe.vae.config
        latents = mean + std * randn_share(mean.shape, generator, share).to(mean.device, mean.dtype)
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents - shift) * config.scaling_factor

    def image_latents(
        self, pipe, pixels: torch.Tensor, generator: torch.Generator, device, share: Share = (0, 1)
    ) -> torch.Tensor:
        """`sample_latents` of the posterior of `pixels`."""
        mean, std = self.posterior(pipe, pixels, device)
        return self.sample_latents(pipe, mean, std, generator, share)

    def batch_conditioning(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """One batch of conditioning from per-prompt ones (batch size 1 each; see `shared_conditioning`)."""
        return {
            key: items[0][key] if key in self.shared_conditioning else torch.cat([item[key] for item in items])
            for key in items[0]
        }

    @abstractmethod
    def training_scheduler(self, pipe):
        """The noise schedule training draws from, owned by the loop (never `pipe.scheduler`, whose
        sampler state changes whenever sample grids are drawn)."""

    @abstractmethod
    def model_inputs(self, pipe, noisy: torch.Tensor, time: torch.Tensor, conditioning: dict) -> dict[str, Any]:
        """The denoiser's keyword inputs: the noisy latents, the timestep (or sigma) and the conditioning."""

    @abstractmethod
    def draw_noised(self, latents, generator, scheduler, dtype, share, noise_offset, min_snr_gamma):
        """The objective's draws for `latents`: (noisy latents in `dtype`, the denoiser's time input, the
        target, per-sample loss weights or None)."""

    def noised_inputs(
        self,
        pipe,
        latents: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        generator: torch.Generator,
        scheduler,
        dtype: torch.dtype,
        share: Share = (0, 1),
        *,
        noise_offset: float = 0.0,
        min_snr_gamma: float = 0.0,
    ) -> StepInputs:
        """One step's training inputs: the objective's draws and what the denoiser is given and should
        predict (options this family's objective cannot take are a UserError first)."""
        self.check_objective_options(noise_offset, min_snr_gamma)
        noisy, time, target, weight = self.draw_noised(
            latents, generator, scheduler, dtype, share, noise_offset, min_snr_gamma
        )
        conditioning = {key: _cast(value, dtype) for key, value in conditioning.items()}
        return StepInputs(self.model_inputs(pipe, noisy, time, conditioning), target, weight)


class NoisePrediction(Family):
    """SD and SDXL: DDPM noising at a uniform integer timestep; target by the scheduler's prediction_type."""

    def training_scheduler(self, pipe):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def model_inputs(self, pipe, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> dict[str, Any]:
        return {"sample": noisy, "timestep": timesteps, **conditioning}

    def draw_noised(self, latents, generator, scheduler, dtype, share, noise_offset, min_snr_gamma):
        device = latents.device
        latents = latents.to(dtype)
        noise = randn_share(latents.shape, generator, share).to(device, dtype)
        count = scheduler.config.num_train_timesteps
        timesteps = share_rows(torch.randint(0, count, (latents.shape[0] * share[1],), generator=generator), share)
        timesteps = timesteps.to(device)
        if noise_offset:  # one draw per (image, channel), broadcast over the latent pixels
            offset = randn_share(latents.shape[:2], generator, share).to(device, dtype)
            noise = noise + noise_offset * offset[..., None, None]
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        elif prediction_type == "sample":
            target = latents
        else:
            raise UserError(
                f"the scheduler's prediction_type {prediction_type!r} is not supported (epsilon, v_prediction, sample)"
            )
        weight = min_snr_weights(scheduler, timesteps, min_snr_gamma) if min_snr_gamma else None
        return noisy, timesteps, target, weight


class RectifiedFlow(Family):
    """SD3 and Flux: x_sigma = (1 - sigma) x_0 + sigma eps, target eps - x_0, sigma = shift(logit-normal u)."""

    logit_mean: float = 0.0  # the SD3 paper's lognorm(0, 1), which diffusers' and kohya's scripts default to
    logit_std: float = 1.0

    def training_scheduler(self, pipe):
        return pipe.scheduler.__class__.from_config(pipe.scheduler.config)

    def check_objective_options(self, noise_offset: float = 0.0, min_snr_gamma: float = 0.0) -> None:
        if noise_offset:
            raise UserError(
                f"noise_offset is for noise-prediction models (SD, SDXL); {self.title} trains rectified flow, which "
                "reaches pure noise at sigma = 1, so the offset is not needed: leave out --noise-offset"
            )
        if min_snr_gamma:
            raise UserError(
                f"min_snr_gamma weights noise-prediction losses by their SNR (SD, SDXL); {self.title} trains "
                "rectified flow, whose timesteps are already weighted (logit-normal): leave out --min-snr-gamma"
            )

    def time_shift(self, scheduler, latents: torch.Tensor) -> float:
        """s of sigma = s u / (1 + (s - 1) u): exp(mu) with mu linear in the image tokens (dynamic
        shifting, Flux.1-dev), else the scheduler's fixed `shift` (SD3/3.5: 3.0; Flux.1-schnell: 1.0)."""
        config = scheduler.config
        if not getattr(config, "use_dynamic_shifting", False):
            return float(getattr(config, "shift", 1.0))
        tokens = self.image_tokens(latents)
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
        return math.exp(mu)

    def image_tokens(self, latents: torch.Tensor) -> int:
        """How many tokens the transformer sees for these latents (2x2 patches)."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def sample_sigmas(
        self, count: int, shift: float, generator: torch.Generator, share: Share = (0, 1)
    ) -> torch.Tensor:
        u = torch.sigmoid(randn_share((count,), generator, share) * self.logit_std + self.logit_mean)
        return shift * u / (1 + (shift - 1) * u)

    def draw_noised(self, latents, generator, scheduler, dtype, share, noise_offset, min_snr_gamma):
        device = latents.device
        latents = latents.float()
        noise = randn_share(latents.shape, generator, share).to(device)
        shift = self.time_shift(scheduler, latents)
        sigmas = self.sample_sigmas(latents.shape[0], shift, generator, share).to(device)
        sigma = sigmas.view(-1, *[1] * (latents.dim() - 1))
        noisy = (1 - sigma) * latents + sigma * noise
        target = noise - latents
        return noisy.to(dtype), sigmas, self.pack(target).to(dtype), None


def randn_share(shape: Sequence[int], generator: torch.Generator, share: Share = (0, 1)) -> torch.Tensor:
    """Process `share[0]`'s rows of a normal draw for the global batch of `share[1]` processes.

    Every process draws the whole global batch from the step's generator and keeps its own rows, so a
    run in several processes draws exactly the numbers one process with the global batch would."""
    return share_rows(torch.randn((shape[0] * share[1], *shape[1:]), generator=generator), share)


def share_rows(values: torch.Tensor, share: Share) -> torch.Tensor:
    """This process's rows of `values`, drawn for the global batch (`share` = (index, processes[, segments])).

    The global batch is `segments` parts one after the other, each part the processes' rows in process
    order; a process keeps its rows of every part, in part order: its local batch [part 1 rows, part 2
    rows, ...]. One process with the global batch thus sees exactly the draws the N processes see."""
    index, processes, *rest = share
    if processes == 1:
        return values
    segments = rest[0] if rest else 1
    parts = values.reshape(segments, processes, values.shape[0] // (segments * processes), *values.shape[1:])
    return parts[:, index].reshape(-1, *values.shape[1:])


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights of `timesteps` (Hang et al. 2023), as float32 on their device: min(SNR, gamma)
    divided by SNR (epsilon target), by SNR + 1 (v) or by 1 (x_0), SNR_t = abar_t / (1 - abar_t) in float64."""
    abar = scheduler.alphas_cumprod.double()[timesteps.cpu()]
    snr = abar / (1 - abar)
    clipped = torch.clamp(snr, max=gamma)
    divisors = {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}
    divisor = divisors[scheduler.config.prediction_type]
    return (clipped / divisor).float().to(timesteps.device)


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating conditioning in the step's dtype; integer ids and the like unchanged."""
    return value.to(dtype) if value.is_floating_point() else value
