"""Judges for the embedded world: how well a picture shows a given content, colour, pattern or style.

One small CNN with four heads reads a 64x64 picture and answers four multiple-choice questions:
which content (the eight pretraining shapes, the novel "moon" and the auxiliary contents), which
object colour and background pattern (meaningful for flat pictures) and which rendering style
("flat", the novel "neon", the auxiliary styles).

The score of a picture for a label is the judge's softmax probability of that label, a number in
[0, 1]: 1 means "certainly shows it", 1/num_classes means "no idea". `prompt_matches` turns the
argmax answers into a yes/no "does the picture show what the caption asked for" for flat scenes.
The judge is trained by `studio pretrain-base` on renders of the world and on their round trips
through the tiny SD's VAE (`train_judge`), and ships in `assets/judges/`; its accuracy on held-out
renders and its scores on VAE round trips of the shipped sets are in bench/results/embedded.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipelines.world.image import (
    ALL_CONTENTS,
    ALL_STYLES,
    COLOURS,
    FLAT_STYLE,
    NONE_CONTENT,
    PATTERNS,
    TRUSTED_CONTENTS,
    TRUSTED_STYLES,
    Scene,
)

HEADS: dict[str, tuple[str, ...]] = {
    "content": ALL_CONTENTS,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "style": ALL_STYLES,
}
# The trusted judges (composition benchmark): a "none" content for pictures with no shape, and the
# leaky world's styles and content appearance; calibrated (`calibrate_temperatures`).
TRUSTED_HEADS: dict[str, tuple[str, ...]] = {**HEADS, "content": TRUSTED_CONTENTS, "style": TRUSTED_STYLES}
DEFAULT_JUDGE_DIR = Path(__file__).resolve().parent.parent / "assets" / "judges"
TRUSTED_JUDGE_DIR = Path(__file__).resolve().parent.parent / "assets" / "trusted-judges"
JUDGE_SIZE = 64


class Judge(nn.Module):
    """Four-head CNN: (N, 3, 64, 64) pictures in [-1, 1] -> {head: (N, num_labels) logits}."""

    def __init__(self, heads: dict[str, tuple[str, ...]] = HEADS, width: int = 32):
        super().__init__()
        self.heads = {name: tuple(labels) for name, labels in heads.items()}
        # Softmax temperature per head (1: as trained; `calibrate_temperatures` fits them).
        self.temperatures = {name: 1.0 for name in self.heads}

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.SiLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1, stride=2),
                nn.BatchNorm2d(c_out),
                nn.SiLU(),
            )

        # 64 -> 32 -> 16 -> 8 -> 4, then global pooling: the heads see what and where was drawn.
        self.features = nn.Sequential(
            block(3, width),
            block(width, 2 * width),
            block(2 * width, 4 * width),
            block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifiers = nn.ModuleDict(
            {name: nn.Linear(4 * width, len(labels)) for name, labels in self.heads.items()}
        )

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels)  # (N, 4*width)
        return {name: head(features) for name, head in self.classifiers.items()}


# ---------------------------------------------------------------------------------------------
# Pictures in, scores out
# ---------------------------------------------------------------------------------------------


def to_pixels(images) -> torch.Tensor:
    """PIL pictures, a (N, H, W, 3) uint8 array or a (N, 3, H, W) tensor in [0, 1] -> (N, 3, 64, 64) in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        pixels = images.float()
    else:
        if not isinstance(images, np.ndarray):
            images = np.stack([np.asarray(image.convert("RGB")) for image in images])
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    if pixels.shape[-1] != JUDGE_SIZE:  # the judge reads 64 px; bigger generations are area-averaged
        pixels = F.interpolate(pixels, size=(JUDGE_SIZE, JUDGE_SIZE), mode="area")
    return pixels * 2 - 1


@torch.no_grad()
def head_logits(judge: Judge, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{head: (N, num_labels) logits} at temperature 1."""
    judge.eval()
    pixels = to_pixels(images)
    device = next(judge.parameters()).device
    chunks = [judge(pixels[i : i + batch_size].to(device)) for i in range(0, len(pixels), batch_size)]
    return {name: torch.cat([c[name] for c in chunks]).float().cpu() for name in judge.heads}


def judge_probabilities(judge: Judge, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{head: (N, num_labels) probabilities} for the pictures (at each head's calibrated temperature)."""
    logits = head_logits(judge, images, batch_size)
    return {name: (logits[name] / judge.temperatures.get(name, 1.0)).softmax(-1) for name in judge.heads}


def score(judge: Judge, images, head: str, label: str) -> torch.Tensor:
    """(N,) scores in [0, 1]: the judge's probability that each picture shows `label` under `head`."""
    if head not in judge.heads:
        raise ValueError(f"unknown judge head {head!r}; heads: {', '.join(judge.heads)}")
    labels = judge.heads[head]
    if label not in labels:
        raise ValueError(f"the {head} judge does not know {label!r}; it knows: {', '.join(labels)}")
    return judge_probabilities(judge, images)[head][:, labels.index(label)]


def content_score(judge: Judge, images, content: str) -> torch.Tensor:
    return score(judge, images, "content", content)


def style_score(judge: Judge, images, style: str) -> torch.Tensor:
    return score(judge, images, "style", style)


def colour_score(judge: Judge, images, colour: str) -> torch.Tensor:
    return score(judge, images, "colour", colour)


def predict(judge: Judge, images) -> list[dict[str, str]]:
    """The judge's argmax answer for every head, one dict per picture."""
    probabilities = judge_probabilities(judge, images)
    answers = {name: p.argmax(-1).tolist() for name, p in probabilities.items()}
    return [{name: judge.heads[name][answers[name][i]] for name in judge.heads} for i in range(len(answers["content"]))]


def prompt_matches(
    judge: Judge, images, scenes: list[Scene], check: tuple[str, ...] = ("content", "colour")
) -> list[bool]:
    """Whether each picture shows its scene's content and colour (the prompt-following criterion)."""
    matches = []
    for answer, scene in zip(predict(judge, images), scenes, strict=True):
        expected = {"content": scene.content, "colour": scene.colour, "pattern": scene.pattern, "style": scene.style}
        matches.append(all(answer[head] == expected[head] for head in check))
    return matches


def label_accuracy(judge: Judge, images, scenes: list[Scene]) -> dict[str, float]:
    """Per-head accuracy on real renders; colour and pattern are scored on flat scenes only."""
    answers = predict(judge, images)
    accuracy = {}
    for head in judge.heads:
        pairs = [
            (a[head], getattr(s, head))
            for a, s in zip(answers, scenes, strict=True)
            if head in ("content", "style") or s.style == FLAT_STYLE
        ]
        accuracy[head] = sum(got == want for got, want in pairs) / len(pairs)
    return accuracy


# ---------------------------------------------------------------------------------------------
# Training and storage
# ---------------------------------------------------------------------------------------------


def scene_targets(scenes: list[Scene], heads: dict[str, tuple[str, ...]] = HEADS) -> dict[str, torch.Tensor]:
    """{head: (N,) label indices}, -1 where the head does not apply (colour of a neon picture)."""
    targets = {}
    for head, labels in heads.items():
        targets[head] = torch.tensor(
            [labels.index(getattr(s, head)) if getattr(s, head) in labels else -1 for s in scenes]
        )
    return targets


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Generated pictures are softer and noisier than renders: train on blurred, noisy renders too.
    n, device = pixels.shape[0], pixels.device
    blurred = F.interpolate(F.avg_pool2d(pixels, 2), scale_factor=2, mode="bilinear", align_corners=False)
    use_blur = torch.rand(n, 1, 1, 1, device=device, generator=generator) < 0.5
    pixels = torch.where(use_blur, blurred, pixels)
    sigma = torch.rand(n, 1, 1, 1, device=device, generator=generator) * 0.1
    return pixels + sigma * torch.randn(pixels.shape, device=device, generator=generator)


@torch.no_grad()
def vae_round_trip(
    vae: nn.Module | Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Pictures (N, H, W, 3) uint8 -> the same pictures after a trip through `vae`, (N, H, W, 3) uint8.

    `vae` is a diffusers AutoencoderKL (encode -> latent mean -> decode, on the VAE's own device and
    dtype) or any callable mapping (B, 3, H, W) pictures in [-1, 1] to the same. The result is
    clamped and rounded to uint8 like a generated picture saved as PNG.
    """
    if isinstance(vae, nn.Module) and hasattr(vae, "encode") and hasattr(vae, "decode"):
        autoencoder = vae.eval()
        parameter = next(autoencoder.parameters())

        def trip(x: torch.Tensor) -> torch.Tensor:
            latents = autoencoder.encode(x.to(parameter.device, parameter.dtype)).latent_dist.mean
            return autoencoder.decode(latents).sample.float().cpu()
    else:
        trip = vae
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        decoded = trip(pixels.float() / 127.5 - 1).clamp(-1, 1)
        chunks.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(chunks)


def train_judge(
    images: np.ndarray,
    scenes: list[Scene],
    steps: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    log_every: int = 200,
    vae: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
    vae_probability: float = 0.5,
    heads: dict[str, tuple[str, ...]] = HEADS,
    shapeless: np.ndarray | None = None,
) -> tuple[Judge, list[dict]]:
    """Fit a fresh judge on rendered pictures (N, 64, 64, 3) uint8 and their scenes; returns (judge, log).

    With `vae` (an AutoencoderKL or a callable, see `vae_round_trip`), each training picture is
    replaced by its VAE round trip with probability `vae_probability`. `shapeless` pictures (noise,
    decoded random latents: `shapeless_pictures`) join the training set as content "none" (which
    `heads` must have), with no answer for the other heads.
    """
    if shapeless is not None and len(shapeless):
        images = np.concatenate([images, shapeless])
        scenes = [*scenes, *[Scene(NONE_CONTENT, "", "", "", "")] * len(shapeless)]
    generator = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)
    judge = Judge(heads).to(device)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    # Pictures stay uint8 on the device (a quarter of the memory); batches are converted on the fly.
    pictures = torch.from_numpy(images).to(device)  # (N, 64, 64, 3)
    # Every generated picture leaves through the VAE decoder, which keeps shapes but shifts colours
    # (neon's navy ground goes near-black, its pink outline yellowish): a judge that only saw renders
    # reads such pictures as "not neon" whatever the UNet drew. So it also learns from round trips
    # of the renders, precomputed once (a round trip costs far more than a judge step's share of it,
    # and every picture is drawn several times over the run).
    round_trips = torch.from_numpy(vae_round_trip(vae, images)).to(device) if vae is not None else None
    targets = {head: labels.to(device) for head, labels in scene_targets(scenes, heads).items()}
    log = []
    judge.train()
    for step in range(steps):
        batch = torch.randint(len(pictures), (batch_size,), device=device, generator=generator)
        chosen = pictures[batch]
        if round_trips is not None:
            use_vae = torch.rand(batch_size, 1, 1, 1, device=device, generator=generator) < vae_probability
            chosen = torch.where(use_vae, round_trips[batch], chosen)
        pixels = chosen.permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, 64, 64) in [-1, 1]
        logits = judge(_augment(pixels, generator))
        losses = [F.cross_entropy(logits[head], targets[head][batch], ignore_index=-1) for head in heads]
        # A batch in which no picture has an answer for a head gives NaN there; it teaches nothing.
        loss = sum(term for term in losses if torch.isfinite(term))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4)})
    return judge.eval(), log


def shapeless_pictures(count: int, size: int, seed: int, vae: nn.Module | None = None) -> np.ndarray:
    """(count, size, size, 3) uint8 pictures with no shape in them: smooth colour noise at random scales
    and, with a VAE, decoded random latents (half each); what a failed generation looks like."""
    generator = torch.Generator().manual_seed(seed)
    noise_count = count if vae is None else count - count // 2
    pictures = []
    for _ in range(noise_count):
        cells = int(torch.randint(2, size // 2 + 1, (1,), generator=generator))
        coarse = torch.rand(1, 3, cells, cells, generator=generator)
        fine = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        grain = torch.randn(1, 3, size, size, generator=generator) * float(torch.rand((), generator=generator)) * 0.2
        pictures.append(((fine + grain).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy())
    if vae is not None and count - noise_count:
        parameter = next(vae.parameters())
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (count - noise_count, vae.config.latent_channels, size // scale, size // scale)
        latents = torch.randn(shape, generator=generator).to(parameter.device, parameter.dtype)
        latents = latents / getattr(vae.config, "scaling_factor", 1.0)
        with torch.no_grad():
            decoded = torch.cat([vae.decode(chunk).sample.float().cpu() for chunk in latents.split(256)])
        decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        pictures.extend(decoded)
    return np.stack(pictures)


def calibrate_temperatures(judge: Judge, images, scenes: list[Scene], steps: int = 200) -> dict[str, float]:
    """Fit each head's softmax temperature to held-out pictures (the negative log-likelihood of their
    answers, over log T), set them on `judge` and return them. Accuracy does not change; the
    probabilities then mean what they say (`expected_calibration_error`)."""
    logits = head_logits(judge, images)
    targets = scene_targets(scenes, judge.heads)
    for head in judge.heads:
        known = targets[head] >= 0
        if not bool(known.any()):
            continue
        head_logit, answer = logits[head][known], targets[head][known]
        log_t = torch.zeros((), requires_grad=True)
        optimizer = torch.optim.Adam([log_t], lr=0.05)
        for _ in range(steps):
            loss = F.cross_entropy(head_logit / log_t.exp(), answer)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        judge.temperatures[head] = round(float(log_t.detach().exp()), 4)
    return dict(judge.temperatures)


def expected_calibration_error(probabilities: torch.Tensor, answers: torch.Tensor, bins: int = 10) -> float:
    """Mean |confidence - accuracy| over equal-width confidence bins, weighted by the bins' sizes."""
    confidence, predicted = probabilities.max(-1)
    correct = (predicted == answers).float()
    error = 0.0
    for low in range(bins):
        inside = (confidence > low / bins) & (confidence <= (low + 1) / bins)
        if bool(inside.any()):
            error += float(inside.float().mean()) * abs(float(confidence[inside].mean() - correct[inside].mean()))
    return error


def save_judge(judge: Judge, folder: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in judge.state_dict().items()}, folder / "judge.safetensors")
    config = {
        "heads": {k: list(v) for k, v in judge.heads.items()},
        "temperatures": judge.temperatures,
        "input_size": JUDGE_SIZE,
        **(extra or {}),
    }
    (folder / "judge.json").write_text(json.dumps(config, indent=2))
    return folder


def load_judge(folder: str | Path | None = None, device: str = "cpu") -> Judge:
    """The shipped judge (default `assets/judges/`), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else DEFAULT_JUDGE_DIR
    config_path = folder / "judge.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no judge at {folder} (expected judge.json and judge.safetensors); "
            "run `studio pretrain-base --stages judges` to train one"
        )
    config = json.loads(config_path.read_text())
    judge = Judge({k: tuple(v) for k, v in config["heads"].items()})
    judge.load_state_dict(load_file(folder / "judge.safetensors"))
    judge.temperatures.update(config.get("temperatures", {}))
    return judge.to(device).eval()
