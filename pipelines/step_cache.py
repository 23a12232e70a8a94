"""Encode once, train many: captions and images encoded before the first step, encoders off the GPU.

A big DiT's text encoders (Flux's and SD3's T5-XXL: 9.5 GB in bf16) and its VAE only ever run forward
in training, on the same captions and (with center crops and no flips) the same pixels every epoch.
`StepCache.build` encodes every distinct caption and every image once; the loop then reads
conditioning and posteriors (mean, std) from the cache, and the encoders move to the CPU (`offloaded`
brings them back for the sample grids only).

The random draws do not change: the latent *sample* is still drawn every step from the step's
generator (mean + std * eps); with random flips every image is encoded both ways and the step takes
the posterior of the orientation its batch drew. So a cached run makes the draws of an uncached one,
its losses equal the uncached losses to float tolerance (a caption encoded alone or in a batch can
differ in the last bits), and exact resume holds.

With a `folder` (the run's `cache/`), every entry is also a safetensors file named by the SHA-256 of
what was encoded: a caption's text, an image's exact pixel tensor (so its crop, size and bucket are
in the key). A resumed run, or a rebuild after a crash, reads them instead of running the encoders;
an edited caption or image is a new key, never a stale hit. Files are written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipelines.errors import UserError
from pipelines.families import Family, family_of


@dataclass
class StepCache:
    family: Family
    conditioning: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # caption -> its tensors (CPU)
    # (image, mirrored) -> (mean, std); with random flips each image is encoded both ways
    posteriors: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    images: int = 1  # distinct images: dataset item i is image i % images (a dataset's `repeats`)
    offload: list[nn.Module] = field(default_factory=list)  # what was moved to the CPU, and the device it left
    device: torch.device | None = None
    folder: Path | None = None  # on-disk entries (<folder>/text, <folder>/latents), keyed by content
    read_from_disk: int = 0  # entries found there instead of encoded (a report, and for tests)

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
        folder: Path | None = None,
        offload: bool = True,
    ) -> StepCache | None:
        """Encode every caption (`text`, with `extra_prompts`: the empty prompt of caption dropout, the
        regularisation prompt) and every image (`latents`) of `dataset` once; None when neither. Images of
        several aspect buckets are encoded a bucket at a time. With a `folder`, entries already there are
        read, new ones written. With `offload` the encoders then move to the CPU (`offloaded_back`
        brings them back)."""
        if not (text or latents):
            return None
        family = family_of(pipe)
        records = getattr(dataset, "records", None)
        cache = cls(family, images=len(records) if records is not None else len(dataset), device=device, folder=folder)
        if latents:
            check_deterministic_pixels(dataset)
        with _unflipped(dataset):
            items = [dataset[i] for i in range(cache.images)]
        with torch.no_grad():
            if text:
                for prompt in sorted({item["prompt"] for item in items} | set(extra_prompts)):
                    cache.conditioning[prompt] = cache._stored("text", _digest(prompt.encode())) or cache._store(
                        "text", _digest(prompt.encode()), family.encode_prompts(pipe, [prompt], device)
                    )
                cache.offload += family.text_encoders(pipe)
            if latents:
                pictures = {(i, False): item["pixel_values"] for i, item in enumerate(items)}
                if getattr(dataset, "random_flip", False):  # mirrored pixels are the exact mirror of the tensor
                    pictures |= {(i, True): item["pixel_values"].flip(-1) for i, item in enumerate(items)}
                cache.encode_images(pipe, pictures, batch_size, device)
                cache.offload.append(pipe.vae)
        if not offload:
            cache.offload = []  # nothing moved, nothing to bring back
        for module in cache.offload:
            module.to("cpu")
        return cache

    def encode_images(self, pipe, pictures: dict[tuple[int, bool], torch.Tensor], batch_size: int, device) -> None:
        """The posterior of every picture ((image, mirrored) -> pixels), `batch_size` pictures of one size at a
        time; identical pictures (the same pixels, e.g. a dataset's repeats) are encoded once and share it."""
        keys = {}
        for place, pixels in pictures.items():
            pixels = pixels.contiguous()
            shape = str((tuple(pixels.shape), str(pixels.dtype))).encode()
            keys[place] = _digest(shape, pixels.to(torch.float32).numpy().tobytes())
        entries: dict[str, dict[str, torch.Tensor]] = {}
        by_size: dict[tuple[int, ...], list[tuple[int, bool]]] = {}
        pending: set[str] = set()
        for place, key in keys.items():
            if key in entries or key in pending:
                continue
            stored = self._stored("latents", key)
            if stored is not None:
                entries[key] = stored
            else:
                pending.add(key)
                by_size.setdefault(tuple(pictures[place].shape), []).append(place)
        for places in by_size.values():
            for start in range(0, len(places), batch_size):
                chunk = places[start : start + batch_size]
                mean, std = self.family.posterior(pipe, torch.stack([pictures[p] for p in chunk]), device)
                for k, place in enumerate(chunk):
                    entry = {"mean": mean[k : k + 1], "std": std[k : k + 1]}
                    entries[keys[place]] = self._store("latents", keys[place], entry)
        for place, key in keys.items():
            self.posteriors[place] = (entries[key]["mean"], entries[key]["std"])

    def _stored(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The entry `key` of `kind` from the folder, or None (no folder, not there, or unreadable)."""
        if self.folder is None or not (self.folder / kind / f"{key}.safetensors").is_file():
            return None
        from peft_core.io import read_safetensors

        try:
            entry = read_safetensors(self.folder / kind / f"{key}.safetensors")
        except Exception:  # noqa: BLE001 - a damaged entry is encoded again, never trusted
            return None
        self.read_from_disk += 1
        return entry

    def _store(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` on the CPU, contiguous (as they read back from disk: the same memory layout, so a resumed
        run's convolutions take the same paths), written to the folder (atomically) when there is one."""
        entry = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
        if self.folder is not None:
            from peft_core.io import write_safetensors

            write_safetensors(self.folder / kind / f"{key}.safetensors", entry)
        return entry

    def encode_prompts(self, pipe, prompts: Sequence[str], device) -> dict[str, torch.Tensor]:
        """The conditioning of `prompts`, from the cache when captions were cached."""
        if not self.conditioning:
            return self.family.encode_prompts(pipe, prompts, device)
        items = [self.conditioning[prompt] for prompt in prompts]
        return {key: value.to(device) for key, value in self.family.batch_conditioning(items).items()}

    def latents(
        self, pipe, pixels: torch.Tensor, indices: Sequence[int], generator, device, share, flipped=()
    ) -> torch.Tensor:
        """A latent sample of the batch's images (the step's draw), from cached posteriors when there are
        (`flipped`: which items are mirrored this step; none when not given)."""
        if not self.posteriors:
            return self.family.image_latents(pipe, pixels, generator, device, share)
        flipped = list(flipped) or [False] * len(indices)
        pairs = [self.posteriors[(index % self.images, flip)] for index, flip in zip(indices, flipped)]
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


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def deterministic_pixels(dataset) -> bool:
    """Whether every epoch shows each image with the same pixels, up to a mirror (random flips are cached
    both ways): center crops. What cached latents need."""
    return getattr(dataset, "crop", "center") == "center"


def check_deterministic_pixels(dataset) -> None:
    """A clear error where cached latents were asked for a dataset whose pixels change every epoch."""
    if not deterministic_pixels(dataset):
        raise UserError(
            "cache_latents needs the same pixels every epoch: center crops (a random crop would need other "
            "latents each epoch; random flips are fine); use center crops or leave cache_latents off"
        )


@contextlib.contextmanager
def _unflipped(dataset) -> Iterator[None]:
    """The dataset's items as they are without the random mirror, for the block."""
    flips = getattr(dataset, "random_flip", False)
    if flips:
        dataset.random_flip = False
    try:
        yield
    finally:
        if flips:
            dataset.random_flip = True
