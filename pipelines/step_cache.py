"""Encode once, train many: captions and images encoded before the first step, encoders off the GPU.

A big DiT's text encoders (Flux's and SD3's T5-XXL: 9.5 GB in bf16) and its VAE only ever run forward
in training, on the same captions and (with center crops and no flips) the same pixels every epoch.
`StepCache.build` encodes every distinct caption and every image once; the loop then reads
conditioning and posteriors (mean, std) from the cache, and the encoders move to the CPU (`offloaded`
brings them back for the sample grids only).

The random draws do not change: the latent *sample* is still drawn every step from the step's
generator (mean + std * eps), so a cached run makes the draws of an uncached one and its losses equal
the uncached losses to float tolerance (a caption encoded alone or in a batch can differ in the last
bits), and exact resume holds (the cache is rebuilt, deterministically, when a run resumes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.errors import UserError
from pipelines.families import Family, family_of


@dataclass
class StepCache:
    family: Family
    conditioning: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # caption -> its tensors (CPU)
    posteriors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # image -> (mean, std)
    images: int = 1  # distinct images: dataset item i is image i % images (a dataset's `repeats`)
    offload: list[nn.Module] = field(default_factory=list)  # what was moved to the CPU, and the device it left
    device: torch.device | None = None

    @classmethod
    def build(
        cls,
        pipe,
        dataset,
        text: bool,
        latents: bool,
        batch_size: int,
        device: torch.device,
        extra_prompts: Sequence[str] = (),
    ) -> StepCache | None:
        """Encode every caption (`text`, with `extra_prompts`: the empty prompt of caption dropout, the
        regularisation prompt) and every image (`latents`) of `dataset` once; None when neither. Images of
        several aspect buckets are encoded a bucket at a time."""
        if not (text or latents):
            return None
        family = family_of(pipe)
        records = getattr(dataset, "records", None)
        cache = cls(family, images=len(records) if records is not None else len(dataset), device=device)
        if latents:
            check_deterministic_pixels(dataset)
        items = [dataset[i] for i in range(cache.images)]
        with torch.no_grad():
            if text:
                for prompt in sorted({item["prompt"] for item in items} | set(extra_prompts)):
                    encoded = family.encode_prompts(pipe, [prompt], device)
                    cache.conditioning[prompt] = {key: value.cpu() for key, value in encoded.items()}
                cache.offload += family.text_encoders(pipe)
            if latents:
                cache.encode_images(pipe, items, batch_size, device)
                cache.offload.append(pipe.vae)
        for module in cache.offload:
            module.to("cpu")
        return cache

    def encode_images(self, pipe, items: list[dict], batch_size: int, device) -> None:
        """The posterior of every item's pixels, `batch_size` images of one size at a time."""
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(items):
            by_size.setdefault(tuple(item["pixel_values"].shape), []).append(index)
        for indices in by_size.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                pixels = torch.stack([items[i]["pixel_values"] for i in chunk])
                mean, std = self.family.posterior(pipe, pixels, device)
                for k, index in enumerate(chunk):
                    self.posteriors[index] = (mean[k : k + 1].cpu(), std[k : k + 1].cpu())

    def encode_prompts(self, pipe, prompts: Sequence[str], device) -> dict[str, torch.Tensor]:
        """The conditioning of `prompts`, from the cache when captions were cached."""
        if not self.conditioning:
            return self.family.encode_prompts(pipe, prompts, device)
        items = [self.conditioning[prompt] for prompt in prompts]
        return {key: value.to(device) for key, value in self.family.batch_conditioning(items).items()}

    def latents(self, pipe, pixels: torch.Tensor, indices: Sequence[int], generator, device, share) -> torch.Tensor:
        """A latent sample of the batch's images (the step's draw), from cached posteriors when there are."""
        if not self.posteriors:
            return self.family.image_latents(pipe, pixels, generator, device, share)
        pairs = [self.posteriors[index % self.images] for index in indices]
        mean = torch.cat([mean for mean, _ in pairs]).to(device)
        std = torch.cat([std for _, std in pairs]).to(device)
        return self.family.sample_latents(pipe, mean, std, generator, share)

    @contextlib.contextmanager
    def offloaded_back(self) -> Iterator[None]:
        """The offloaded encoders on the training device for the block (sample grids), then off again."""
        for module in self.offload:
            module.to(self.device)
        try:
            yield
        finally:
            for module in self.offload:
                module.to("cpu")


def check_deterministic_pixels(dataset) -> None:
    """Cached latents need every epoch to show an image with the same pixels."""
    if getattr(dataset, "random_flip", False) or getattr(dataset, "crop", "center") != "center":
        raise UserError(
            "cache_latents needs the same pixels every epoch: center crops and no random flips (a random "
            "crop or flip would need other latents each epoch); turn those off or leave cache_latents off"
        )
