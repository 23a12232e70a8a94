"""One loop that trains any peft_core adapter on a Stable Diffusion UNet (and optionally its text encoder).

    handle = train_adapter(pipe, dataset, LoraConfig(targets=UNET_ATTENTION), TrainConfig(steps=400), "runs/style")

The loop is the textbook noise-prediction objective: encode images to latents, add noise at a
random timestep, predict the noise (or v, or the sample: whatever the scheduler's prediction
type says) from the noisy latents and the caption, minimise the MSE. Around it: accelerate
(mixed precision, gradient accumulation, several processes), gradient checkpointing, 8-bit AdamW
on CUDA, sample images every N steps, atomic checkpoints, and exact resume.

On one CUDA GPU the step (UNet forward, loss, backward, clipping, AdamW) is recorded once as a
CUDA graph and replayed (`cuda_graph="auto"`; see pipelines/cuda_graphs.py): SD's UNet is
thousands of small kernels that the host cannot launch as fast as a modern GPU runs them. The
random draws stay outside the graph, so a graphed run makes exactly the eager run's draws.

Exact resume: every random draw of step s (which images, noise, timesteps, latent samples) comes
from a generator seeded by (seed, s), so a run resumed from a checkpoint at step s continues with
exactly the draws the uninterrupted run would have made.

What a step can add (each a TrainConfig field, so a flag, a YAML key and a UI control; see README):
caption dropout and tag shuffling (`caption_draws`, from the step's generator); aspect-ratio buckets
(`sample_batch` takes each batch from one bucket, by (seed, step)); loss masks (`masked_inputs`: the
per-pixel loss weighted by a mask brought to latent size); regularisation images (each step's batch is
[training images, regularisation images], weighted so the loss is main + reg_weight x reg); the
objective's noise offset and min-SNR-gamma weights (pipelines.families.base); an EMA of the adapter
(pipelines.training.AdapterEma, checkpointed, saved as run_dir/adapter_ema/, drawn in the grids);
Prodigy and Adafactor, cosine-with-restarts and polynomial schedules (pipelines.training).

Stopping on request: after every step `train_adapter` asks `should_stop()` (by default: does
`<run_dir>/STOP` exist?). When it answers yes, the loop writes a checkpoint of that step, removes
the STOP file and raises `StopRequested`, so a resume continues from exactly that step. This is how
the UI cancels a job; a CLI user can `touch <run_dir>/STOP` for the same clean stop. The optimizer,
the LR schedule, accelerate, the stop protocol and the event type are the shared training kit
(pipelines.training), re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peft_core import AdapterConfig, AdapterHandle, attach, config_from_dict, get_handle, get_method, load
from pipelines.checkpoint import latest_checkpoint, load_checkpoint, remove_partial_writes
from pipelines.cuda_graphs import (
    GraphCaptureError,
    GraphedTrainStep,
    StepInputs,
    capturable_adamw,
    graphed_forward,
    make_capturable,
    prediction_loss,
)
from pipelines.data import bucket_batch_count, bucket_batches, shuffle_tags
from pipelines.errors import UserError
from pipelines.families import family_of, sd
from pipelines.families.base import Share, share_rows
from pipelines.options import check_fields, option
from pipelines.step_cache import StepCache
from pipelines.training import (
    LR_SCHEDULES,
    MIXED_PRECISIONS,
    MORE_OPTIMIZERS,
    OPTIMIZERS,
    SHAPED_LR_SCHEDULES,
    STOP_FILE,
    AdapterEma,
    DivergenceGuard,
    NonFiniteLoss,
    StopRequested,
    TrainEvent,
    checkpoint_due,
    divergence_hint,
    host_values,
    in_step_loop,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    non_finite_tensors,
    process_state,
    save_step_checkpoint,
    serve_stop,
    stop_file_exists,
    stop_requested,
)

# The kit's names stay importable from here (`from pipelines.train import StopRequested, make_accelerator`).
__all__ = [
    "STOP_FILE",
    "TEXT_ENCODER_TARGETS",
    "UNET_ATTENTION_TARGETS",
    "Batch",
    "NonFiniteLoss",
    "PixelWeightedDenoiser",
    "StepOptions",
    "StopRequested",
    "TrainConfig",
    "TrainEvent",
    "caption_draws",
    "diffusion_loss",
    "generate",
    "image_grid",
    "make_accelerator",
    "make_lr_scheduler",
    "make_optimizer",
    "masked_inputs",
    "regularised",
    "sample_batch",
    "save_image_atomic",
    "step_generator",
    "step_inputs",
    "stop_requested",
    "train_adapter",
    "training_scheduler",
]

# Every attention projection of an SD UNet (self- and cross-attention): the usual adapter targets.
UNET_ATTENTION_TARGETS = list(sd.UNET_ATTENTION_TARGETS)
TEXT_ENCODER_TARGETS = list(sd.TEXT_ENCODER_TARGETS)


@dataclass
class TrainConfig:
    """How to train (what to train is the adapter config). Defaults suit the embedded tiny SD."""

    steps: int = option(300, help="optimizer steps", min=1)
    batch_size: int = option(4, help="images per step (per process)", min=1)
    learning_rate: float = option(
        1e-3, help="AdamW learning rate (PaCA often wants a different one than LoRA: sweep it)", above=0
    )
    lr_schedule: str = option(
        "constant",
        help="learning-rate schedule after warm-up (cosine_with_restarts: see lr_cycles; polynomial: lr_power)",
        choices=(*LR_SCHEDULES, *SHAPED_LR_SCHEDULES),
    )
    lr_cycles: int = option(
        1, help="cosine_with_restarts: how many cosine decays, each restarting at the full rate", min=1, advanced=True
    )
    lr_power: float = option(1.0, help="polynomial: the decay's power (1: linear)", above=0, advanced=True)
    warmup_steps: int = option(0, help="linear warm-up steps", min=0, advanced=True)
    gradient_accumulation: int = option(1, help="micro-batches per optimizer step", min=1, advanced=True)
    mixed_precision: str = option("no", help="autocast dtype (GPU)", choices=MIXED_PRECISIONS, advanced=True)
    gradient_checkpointing: bool = option(False, help="trade compute for activation memory", advanced=True)
    optimizer: str = option(
        "adamw",
        help="adamw; adamw8bit (bitsandbytes, CUDA); prodigy (sets its own step size: use learning rate 1.0); "
        "adafactor (factored second moments: less memory)",
        choices=(*OPTIMIZERS, *MORE_OPTIMIZERS),
        advanced=True,
    )
    weight_decay: float = option(0.0, help="the optimizer's weight decay", min=0, advanced=True)
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0: off)", min=0, advanced=True)
    seed: int = option(0, help="seed of every random draw (same seed, same run)", min=0, max=2**32 - 1)
    checkpoint_every: int = option(100, help="write a resumable checkpoint every N steps", min=1)
    sample_every: int = option(0, help="write a sample grid every N steps (0: only at the end)", min=0)
    sample_prompts: list[str] = option([], help="prompts of the sample grids", repeat=False)
    sample_steps: int = option(20, help="denoising steps of the sample grids", min=1, max=1000)
    sample_guidance: float = option(5.0, help="classifier-free guidance of the sample grids", min=0, advanced=True)
    sample_seed: int | None = option(
        None,
        help="seed of the sample grids' first image (image i: seed + i; the same in every grid of the run, so "
        "grids compare step to step); default: --seed",
        min=0,
        max=2**32 - 1,
        advanced=True,
    )
    train_text_encoder: bool = option(False, help="also adapt the text encoder's attention projections", advanced=True)
    cache_text_embeddings: bool = option(
        False,
        help="encode every caption once before training and move the text encoders to the CPU (back for sample "
        "grids only): the T5 of SD3/Flux leaves the GPU; kept in the run's cache/ by content, for resumes",
        advanced=True,
    )
    cache_latents: bool = option(
        False,
        help="encode every image once before training (center crops; with random_flip both ways) and move the VAE "
        "to the CPU (back for grids only; kept in the run's cache/ by pixel content); the sample is drawn every step",
        advanced=True,
    )
    calibration_samples: int = option(
        64, help="CorDA / SPT: training images their data step looks at before training", min=1, advanced=True
    )
    buckets: bool = option(
        False,
        help="aspect-ratio buckets: each image trains at the bucket size nearest its aspect (about resolution² "
        "pixels), each batch from one bucket",
        advanced=True,
    )
    random_flip: bool = option(False, help="mirror each training image left-right with probability 1/2 (each epoch)")
    caption_dropout: float = option(
        0.0,
        help="probability that a training caption becomes the empty prompt (per image and step)",
        min=0,
        max=1,
        advanced=True,
    )
    shuffle_captions: bool = option(
        False, help="shuffle each caption's comma-separated tags every step (keep_tokens stay first)", advanced=True
    )
    keep_tokens: int = option(
        0, help="with shuffle_captions: how many leading tags stay in place (e.g. the trigger)", min=0, advanced=True
    )
    masked_loss: bool = option(
        False,
        help="weight the loss by each image's mask, <name>.mask.png beside it (white counts, black is ignored; "
        "an image without one counts everywhere)",
        advanced=True,
    )
    noise_offset: float = option(
        0.0,
        help="add offset x N(0,1) per image and latent channel to the noise (0.05-0.1 lets SD/SDXL learn darker and "
        "brighter images; not SD3/Flux)",
        min=0,
        advanced=True,
    )
    min_snr_gamma: float = option(
        0.0,
        help="min-SNR-gamma loss weighting (Hang et al. 2023; 5 is usual; 0: off; not SD3/Flux)",
        min=0,
        advanced=True,
    )
    ema_decay: float = option(
        0.0,
        help="also keep an exponential moving average of the adapter with this decay (e.g. 0.999; 0: off), saved "
        "as adapter_ema/ and drawn in the sample grids",
        min=0,
        max=0.9999,
        advanced=True,
    )
    ema_start: int = option(0, help="the moving average equals the weights up to this step", min=0, advanced=True)
    reg_data: str | None = option(
        None,
        help="folder of regularisation (prior-preservation) images: each step adds a batch of them, captioned "
        "reg_prompt",
        metavar="FOLDER",
        ui=False,
    )
    reg_prompt: str | None = option(
        None, help="the prompt of every regularisation image (the class, e.g. 'a photo of a dog')"
    )
    reg_weight: float = option(
        1.0, help="the loss is the training images' + reg_weight x the regularisation images'", min=0
    )
    reg_count: int = option(
        0,
        help="without reg_data: draw this many class images of reg_prompt with the base model (adapters off) "
        "into the run's class_images/ before training, DreamBooth's prior preservation (0: none)",
        min=0,
    )
    # "auto": replay the step from a CUDA graph wherever that is possible (one CUDA GPU, adamw, no
    # fp16 scaler, no accumulation, no checkpointing, UNet only), else eager; "on": insist; "off".
    cuda_graph: str = option(
        "auto",
        help="replay each training step from a CUDA graph (one CUDA GPU, adamw, no fp16, no accumulation or "
        "checkpointing; auto falls back to eager where it cannot)",
        choices=("auto", "on", "off"),
        advanced=True,
    )

    def check(self) -> None:
        check_fields(self)


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    prompts: list[str]
    indices: list[int] = field(default_factory=list)  # the dataset items (a StepCache looks them up)
    masks: torch.Tensor | None = None  # (N, 1, H, W) in [0, 1]: the loss masks, where the items have them
    flipped: list[bool] = field(default_factory=list)  # which items are mirrored (a StepCache picks that latent)
    # (N, 4): each image's original (height, width) and crop (top, left), SDXL's size conditioning; None
    # where the dataset does not say (the target size is used then)
    sizes: torch.Tensor | None = None


@dataclass(frozen=True)
class StepOptions:
    """What a training step does beyond the plain objective (the TrainConfig fields of the same names):
    the captions' (`caption_draws`) and the objective's (`step_inputs`)."""

    caption_dropout: float = 0.0
    shuffle_captions: bool = False
    keep_tokens: int = 0
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0

    @classmethod
    def of(cls, config: TrainConfig) -> StepOptions:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for every random draw of one step (exact resume depends on it)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def sample_batch(
    dataset, batch_size: int, seed: int, step: int, process_index: int = 0, num_processes: int = 1
) -> Batch:
    """This process's share of step `step`'s batch: an epoch-wise permutation, walked in order; from a
    dataset of several aspect buckets, the step's batch of `pipelines.data.bucket_batches` (one bucket)."""
    bucket_ids = getattr(dataset, "bucket_ids", None)
    if bucket_ids is not None and len(set(bucket_ids)) > 1:
        return _bucket_batch(dataset, bucket_ids, batch_size, seed, step, process_index, num_processes)
    n = len(dataset)
    global_batch = batch_size * num_processes
    items, indices = [], []
    for k in range(batch_size):
        position = step * global_batch + process_index * batch_size + k
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        if hasattr(dataset, "set_epoch"):  # new random crops/flips each epoch, reproducibly
            dataset.set_epoch(epoch)
        indices.append(int(order[offset]))
        items.append(dataset[indices[-1]])
    return _stack(items, indices)


def _bucket_batch(
    dataset, bucket_ids: list[int], batch_size: int, seed: int, step: int, process_index: int, num_processes: int
) -> Batch:
    """Step `step`'s global batch of one bucket (the same list in every process), this process's share of it."""
    global_batch = batch_size * num_processes
    epoch, number = divmod(step, bucket_batch_count(bucket_ids, global_batch))
    chosen = bucket_batches(bucket_ids, global_batch, seed, epoch)[number]
    indices = chosen[process_index * batch_size : (process_index + 1) * batch_size]
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    return _stack([dataset[index] for index in indices], indices)


def _stack(items: list[dict], indices: list[int]) -> Batch:
    masks = torch.stack([item["mask"] for item in items]) if "mask" in items[0] else None
    pixels = torch.stack([item["pixel_values"] for item in items])
    flipped = [bool(item.get("flipped", False)) for item in items]
    sizes = None
    if all("original_size" in item and "crop_top_left" in item for item in items):
        sizes = torch.stack([torch.cat([item["original_size"], item["crop_top_left"]]) for item in items])
    return Batch(pixels, [item["prompt"] for item in items], indices, masks, flipped, sizes)


def caption_draws(
    prompts: Sequence[str], options: StepOptions, generator: torch.Generator, share: Share = (0, 1)
) -> list[str]:
    """The step's captions after tag shuffling and caption dropout, drawn from the step's generator.

    Drawn for the global batch (each process keeps its rows, like every other draw): with
    `shuffle_captions` one seed per caption for its tag order (`pipelines.data.shuffle_tags`, the first
    `keep_tokens` tags in place), then with `caption_dropout` one uniform number per caption, below
    which it becomes the empty prompt. Nothing is drawn for an option that is off."""
    prompts = list(prompts)
    count = len(prompts) * share[1]
    if options.shuffle_captions:
        seeds = share_rows(torch.randint(0, 2**62, (count,), generator=generator), share).tolist()
        prompts = [
            shuffle_tags(prompt, options.keep_tokens, torch.Generator().manual_seed(seed))
            for prompt, seed in zip(prompts, seeds)
        ]
    if options.caption_dropout > 0:
        draws = share_rows(torch.rand((count,), generator=generator), share).tolist()
        prompts = ["" if draw < options.caption_dropout else prompt for prompt, draw in zip(prompts, draws)]
    return prompts


def encode_prompts(pipe, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The denoiser's text conditioning for `prompts` (keyword tensors; see pipelines.families)."""
    return family_of(pipe).encode_prompts(pipe, prompts, device)


def training_scheduler(pipe):
    """The noise schedule the training loop draws from, owned by the loop.

    Never train through `pipe.scheduler`: samplers such as DPM-Solver keep state (their timestep
    grid changes on every `set_timesteps`), so sampling mid-training would corrupt `add_noise`.
    """
    return family_of(pipe).training_scheduler(pipe)


def diffusion_loss(
    pipe,
    model,
    batch: Batch,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    scheduler=None,
    share: Share = (0, 1),
    cache: StepCache | None = None,
    options: StepOptions | None = None,
) -> torch.Tensor:
    """The training loss of one batch: the family's objective (noise prediction with the scheduler's
    prediction type, or rectified flow).

    `model` is the pipeline's denoiser as accelerate prepared it (DDP-wrapped with several processes);
    `scheduler` is the training noise scheduler (default: `training_scheduler(pipe)`)."""
    inputs = step_inputs(pipe, batch, generator, device, dtype, scheduler, share, cache, options)
    return prediction_loss(loss_model(model, inputs), inputs)


def step_inputs(
    pipe,
    batch: Batch,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    scheduler=None,
    share: Share = (0, 1),
    cache: StepCache | None = None,
    options: StepOptions | None = None,
) -> StepInputs:
    """Every random draw of one step (a latent sample, then the family's noise and timestep, and the
    noise offset's draw where `options` ask for one), and what the denoiser is given and should predict
    (min-SNR-gamma weights where asked; the batch's masks as per-pixel loss weights, `masked_inputs`).
    `share` = (process index, processes): each process keeps its rows of draws made for the global
    batch, so N processes draw what one process would. With a `cache` (pipelines.step_cache), captions
    and image posteriors come from it; the draws are the same."""
    family = family_of(pipe)
    scheduler = scheduler or family.training_scheduler(pipe)
    options = options or StepOptions()
    if cache is None:
        latents = family.image_latents(pipe, batch.pixel_values, generator, device, share)
        conditioning = family.encode_prompts(pipe, batch.prompts, device)
    else:
        latents = cache.latents(pipe, batch.pixel_values, batch.indices, generator, device, share, batch.flipped)
        conditioning = cache.encode_prompts(pipe, batch.prompts, device)
    if family.size_conditioned and batch.sizes is not None:  # SDXL: each image's own original size and crop
        conditioning = {**conditioning, "size_ids": batch.sizes.to(device)}
    inputs = family.noised_inputs(
        pipe,
        latents,
        conditioning,
        generator,
        scheduler,
        dtype,
        share,
        noise_offset=options.noise_offset,
        min_snr_gamma=options.min_snr_gamma,
    )
    if batch.masks is not None:
        inputs = masked_inputs(family, inputs, batch.masks, latents)
    return inputs


# The model input that carries the square root of a step's per-pixel loss weights (see `masked_inputs`).
PIXEL_WEIGHT_ROOT = "pixel_weight_root"


def masked_inputs(family, inputs: StepInputs, masks: torch.Tensor, latents: torch.Tensor) -> StepInputs:
    """`inputs` whose loss is weighted per latent pixel by `masks` (N, 1, H, W) in [0, 1].

    Each mask is averaged over the latent pixels' patches (area interpolation to the latents' size),
    repeated over the channels and packed as the family packs latents (Flux's 2x2 tokens). The loss
    then is mean over every element of m * (prediction - target)^2 (times any per-sample weight): the
    target is multiplied by sqrt(m) here and the prediction by `PixelWeightedDenoiser`, which reads
    sqrt(m) from the inputs, so a CUDA-graph step copies the mask in like any other input."""
    import torch.nn.functional as F

    weight = F.interpolate(masks.to(latents.device, torch.float32), size=latents.shape[-2:], mode="area")
    weight = family.pack(weight.expand(-1, latents.shape[1], -1, -1).contiguous())
    root = weight.sqrt().to(inputs.target.dtype)
    return StepInputs({**inputs.model_inputs, PIXEL_WEIGHT_ROOT: root}, inputs.target * root, inputs.weight)


class PixelWeightedDenoiser:
    """The denoiser, its prediction multiplied by the step's `PIXEL_WEIGHT_ROOT` input (`masked_inputs`)."""

    def __init__(self, model) -> None:
        self.model = model

    def __call__(self, **inputs):
        root = inputs.pop(PIXEL_WEIGHT_ROOT, None)
        output = self.model(**inputs)
        if root is None:
            return output
        return (output[0] * root, *output[1:])


def loss_model(model, inputs: StepInputs):
    """What `prediction_loss` calls for `inputs`: the denoiser, pixel-weighted where the inputs are masked."""
    return PixelWeightedDenoiser(model) if PIXEL_WEIGHT_ROOT in inputs.model_inputs else model


def regularised(inputs: StepInputs, count: int, reg_weight: float) -> StepInputs:
    """`inputs` of [`count` training rows, `count` regularisation rows], weighted so that `prediction_loss`
    is the training rows' mean loss + reg_weight x the regularisation rows' (times any min-SNR weights)."""
    device = inputs.target.device
    parts = torch.tensor([2.0] * count + [2.0 * reg_weight] * count, device=device)
    return StepInputs(inputs.model_inputs, inputs.target, parts if inputs.weight is None else inputs.weight * parts)


def cuda_graph_blockers(
    config: TrainConfig, device: torch.device, num_processes: int, trains_text_encoder: bool, dataset=None
) -> list[str]:
    """Why this run cannot replay its step from a CUDA graph (empty: it can). Host-side draws (captions,
    noise offset) and fixed-shape extras (masks, min-SNR weights, regularisation images) replay fine."""
    blockers = []
    if device.type != "cuda":
        blockers.append("it needs a CUDA GPU")
    if num_processes > 1:
        blockers.append("it runs in a single process (several processes synchronise gradients every step)")
    if config.gradient_accumulation > 1:
        blockers.append("gradient_accumulation must be 1")
    if config.gradient_checkpointing:
        blockers.append("gradient checkpointing reads the RNG state on the host")
    if config.optimizer != "adamw":
        blockers.append(f"optimizer {config.optimizer!r} is not capturable (use adamw)")
    if config.mixed_precision == "fp16":
        blockers.append("fp16 needs a gradient scaler, which checks for inf on the host (use bf16)")
    if trains_text_encoder:
        blockers.append("the text encoder is trained (its prompts vary in the host-side tokenizer)")
    if config.buckets or len(set(getattr(dataset, "bucket_ids", None) or [0])) > 1:
        blockers.append("aspect-ratio buckets change the batch's shape from step to step")
    return blockers


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seed: int = 0,
    steps: int = 20,
    guidance: float = 5.0,
    size: int | None = None,
    cuda_graph: bool = True,
) -> list:
    """PIL images for `prompts`, one seeded generator per prompt (the same image for the same seed).

    On CUDA the UNet's denoising calls replay from a CUDA graph recorded for this call (adapters
    applied on the fly then cost launches no more); `cuda_graph=False` keeps them eager.
    Adapters with NaN/inf weights or weight multipliers are refused (UserError): they give black images."""
    family = family_of(pipe)
    model = family.denoiser(pipe)
    check_adapters_usable(get_handle(model))
    size = size or family.default_size(pipe)
    device = model.device
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(prompts))]
    was_training = model.training
    model.eval()
    with graphed_forward(model, enabled=cuda_graph and steps > 2):
        images = pipe(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=generators,
            output_type="pil",
        ).images
    model.train(was_training)
    return images


def check_adapters_usable(handle: AdapterHandle | None, labels: dict[str, str] | None = None) -> None:
    """UserError if an enabled adapter of `handle` has a NaN/inf weight multiplier or NaN/inf in its tensors
    (a diverged training run's), naming it (`labels`: name -> what the user called it, e.g. its folder)."""
    if handle is None:
        return
    labels = labels or {}
    disabled = {name for _, wrapper in handle.wrappers() for name in wrapper.disabled}
    for name in [n for n in handle.adapter_names if n not in disabled]:
        label = labels.get(name, name)
        weights = {float(wrapper.adapter_weights[name]) for _, wrapper in handle.wrappers(name)}
        bad_weight = next((w for w in weights if not math.isfinite(w)), None)
        if bad_weight is not None:
            raise UserError(f"adapter {label!r} has weight {bad_weight}; an adapter weight must be a finite number")
        bad = non_finite_tensors(handle, [name])
        if bad:
            raise UserError(
                f"adapter {label!r} holds non-finite weights (NaN or inf in {len(bad)} tensor(s), e.g. "
                f"{bad[0].split(': ', 1)[-1]}): it would generate black images. It comes from a diverged "
                "training run; train it again with a lower learning rate"
            )


def image_grid(images: list, columns: int | None = None):
    from PIL import Image

    columns = columns or min(len(images), 4)
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_image_atomic(image, path: str | os.PathLike) -> Path:
    import io

    from peft_core.io import atomic_write_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def train_adapter(
    pipe,
    dataset,
    adapter_config: AdapterConfig,
    config: TrainConfig,
    run_dir: str | os.PathLike,
    adapter_name: str = "default",
    text_encoder_adapter: AdapterConfig | None = None,
    on_event: Callable[[TrainEvent], Any] | None = None,
    resume: bool = True,
    handle: AdapterHandle | None = None,
    should_stop: Callable[[], bool] | None = None,
    reg_dataset=None,
) -> AdapterHandle:
    """Train adapter `adapter_name` on the pipeline's denoiser (its UNet or transformer; + the text encoder)
    with `dataset`; returns the denoiser's handle.

    `dataset[i]` is a dict with "pixel_values" (3, H, W) in [-1, 1] and "prompt" (and "mask" (1, H, W)
    for `config.masked_loss`). If `handle` already holds `adapter_name` (e.g. Break-for-Make's make
    stage), that adapter is trained. Regularisation images come from `reg_dataset` (a dataset like
    `dataset`, its prompts replaced by `config.reg_prompt` when set), else from the folder
    `config.reg_data`. Writes `run_dir/checkpoints/`, `run_dir/samples/` and, at the end,
    `run_dir/adapter/<name>/` (and `run_dir/adapter_ema/<name>/` with `config.ema_decay`).
    `should_stop()` is asked after every step (default: does `run_dir/STOP` exist?); see the module docstring.
    """
    # 1. Check inputs before touching the model.
    text_encoder_adapter = _check_inputs(pipe, dataset, adapter_config, config, text_encoder_adapter, reg_dataset)
    reg_dataset = reg_dataset if reg_dataset is not None else regularisation_dataset(pipe, dataset, config)
    run_dir = Path(run_dir)
    should_stop = should_stop or stop_file_exists(run_dir)

    # 2. Accelerate, frozen base, adapters (initialised from the seed, like everything else).
    loop = _set_up(pipe, dataset, adapter_config, text_encoder_adapter, config, run_dir, adapter_name, handle, resume)
    loop.reg_dataset = reg_dataset
    loop.cache = StepCache.build(
        pipe,
        dataset,
        config.cache_text_embeddings,
        config.cache_latents,
        config.batch_size,
        loop.device,
        _extra_prompts(config, reg_dataset),
        folder=run_dir / "cache" if run_dir is not None else None,
    )
    loop.emit = on_event or loop.emit
    scale_flag = "--alpha" if hasattr(adapter_config, "alpha") else None
    hint = divergence_hint(config.learning_rate, config.max_grad_norm, scale_flag=scale_flag)
    loop.guard = DivergenceGuard(config.steps, hint, loop.emit)  # NaN/inf: NonFiniteLoss, nothing written

    # 3. Resume from the newest complete checkpoint, if any (after clearing what a killed run half-wrote).
    start_step = _resume(loop, resume)
    if loop.graphed:
        loop.graph_step = _record_step(loop)

    # 4. Train.
    loop.model.train()
    started, losses = time.perf_counter(), []
    in_step_loop(True)  # a stop signal now finishes the step in progress and checkpoints it
    for step in range(start_step, config.steps):
        step_loss = _graphed_step(loop, step) if loop.graphed else None
        if step_loss is None:  # eager, or the graph could not be recorded
            step_loss = _eager_step(loop, step)
        for _, _, ema in loop.emas:
            ema.update(step + 1)
        loop.lr_scheduler.step()
        losses.append(step_loss)
        done = step + 1
        eta = (time.perf_counter() - started) / (done - start_step) * (config.steps - done)
        lr = float(loop.lr_scheduler.get_last_lr()[0])
        loop.emit(TrainEvent("step", done, config.steps, loss=step_loss, lr=lr, eta_s=eta))
        _maybe_sample(loop, done)
        stop = done < config.steps and stop_requested(should_stop, loop.accelerator)
        _maybe_checkpoint(loop, done, step_loss, force=stop)
        if stop:
            serve_stop(run_dir, loop.accelerator, done, config.steps)
    in_step_loop(False)  # every step is checkpointed: a signal now stops at once

    # 5. Save the adapter and the final samples.
    _save_final(loop)
    loop.emit(
        TrainEvent(
            "done",
            config.steps,
            config.steps,
            loss=losses[-1] if losses else None,
            path=str(run_dir / "adapter" / adapter_name),
        )
    )
    return loop.handle


@dataclass
class _Loop:
    """What one `train_adapter` run holds while it steps (built by `_set_up`)."""

    pipe: Any
    dataset: Any
    config: TrainConfig
    run_dir: Path
    adapter_name: str
    accelerator: Any
    dtype: torch.dtype
    handle: AdapterHandle
    text_handle: AdapterHandle | None
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    model: Any  # the denoiser, as accelerate prepared it when eager
    autocast: Callable[[], AbstractContextManager]
    noise_scheduler: Any
    graphed: bool
    graph_step: GraphedTrainStep | None = None
    emit: Callable[[TrainEvent], Any] = lambda event: None
    guard: DivergenceGuard | None = None  # checks each step's loss and the adapters before every write
    cache: StepCache | None = None  # captions / image posteriors encoded once (cache_text_embeddings, cache_latents)
    reg_dataset: Any = None  # regularisation images (reg_data), a batch of them with every training batch
    # (checkpoint folder, final folder, average) of each trained adapter with ema_decay
    emas: list[tuple[str, str, AdapterEma]] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def share(self) -> Share:
        """(this process, processes[, 2 with regularisation images]): each process keeps its rows of the
        global batch's draws (pipelines.families.base.share_rows)."""
        processes = (self.accelerator.process_index, self.accelerator.num_processes)
        return processes if self.reg_dataset is None else (*processes, 2)

    @property
    def options(self) -> StepOptions:
        return StepOptions.of(self.config)

    @property
    def sample_size(self) -> int | None:
        """Sample grids are drawn at the training resolution (the dataset's, when it says)."""
        return getattr(self.dataset, "resolution", None)

    def batch(self, micro_step: int, generator: torch.Generator) -> Batch:
        """This process's batch of `micro_step`: its training images (their captions drawn by
        `caption_draws`), then as many regularisation images, each with its prompt."""
        config, accelerator = self.config, self.accelerator
        processes = (accelerator.process_index, accelerator.num_processes)
        batch = sample_batch(self.dataset, config.batch_size, config.seed, micro_step, *processes)
        if not config.masked_loss:
            batch.masks = None
        batch.prompts = caption_draws(batch.prompts, self.options, generator, processes)
        if self.reg_dataset is None:
            return batch
        reg = sample_batch(self.reg_dataset, config.batch_size, config.seed + 1, micro_step, *processes)
        return _with_regularisation(batch, _sized_like(reg, self.reg_dataset, batch), config.reg_prompt)

    def inputs(self, micro_step: int, generator: torch.Generator) -> StepInputs:
        """Everything step `micro_step` draws and feeds the denoiser (`step_inputs` of `batch`), the
        regularisation rows weighted by reg_weight."""
        inputs = step_inputs(
            self.pipe,
            self.batch(micro_step, generator),
            generator,
            self.device,
            self.dtype,
            self.noise_scheduler,
            self.share,
            self.cache,
            self.options,
        )
        if self.reg_dataset is None:
            return inputs
        return regularised(inputs, self.config.batch_size, self.config.reg_weight)


def _sized_like(reg: Batch, reg_dataset, batch: Batch) -> Batch:
    """The regularisation batch at the training batch's image size (its bucket's), drawn again where it differs."""
    size = batch.pixel_values.shape[-2:]
    if reg.pixel_values.shape[-2:] == size:
        return reg
    if not hasattr(reg_dataset, "render"):
        raise UserError(
            f"the regularisation images are {tuple(reg.pixel_values.shape[-2:])} px and this batch's are "
            f"{tuple(size)}; give them the training images' size"
        )
    items = [reg_dataset.render(index, (int(size[1]), int(size[0]))) for index in reg.indices]
    return _stack(items, reg.indices)


def _with_regularisation(batch: Batch, reg: Batch, prompt: str | None) -> Batch:
    """[training images, regularisation images] as one batch (the latter captioned `prompt` when given)."""
    masks = batch.masks
    if masks is not None:
        masks = torch.cat([masks, torch.ones(len(reg.prompts), *masks.shape[1:])])
    return Batch(
        torch.cat([batch.pixel_values, reg.pixel_values]),
        batch.prompts + ([prompt] * len(reg.prompts) if prompt is not None else reg.prompts),
        batch.indices + reg.indices,
        masks,
        batch.flipped + reg.flipped,
        torch.cat([batch.sizes, reg.sizes]) if batch.sizes is not None and reg.sizes is not None else None,
    )


def regularisation_dataset(pipe, dataset, config: TrainConfig):
    """The regularisation images of `config.reg_data` (None without), every one captioned `config.reg_prompt`,
    at the training resolution, flipped like the training images."""
    if config.reg_data is None:
        return None
    from pipelines.data import ImageCaptionDataset

    resolution = getattr(dataset, "resolution", None) or family_of(pipe).default_size(pipe)
    literal = config.reg_prompt.replace("{", "{{").replace("}", "}}")  # a fixed prompt, not a template
    return ImageCaptionDataset(
        config.reg_data, resolution, template=literal, seed=config.seed, random_flip=config.random_flip
    )


def write_class_images(pipe, config: TrainConfig, folder: Path, size: int) -> Path:
    """DreamBooth's class images: `config.reg_count` pictures of `config.reg_prompt` drawn by the base model
    (every adapter of the denoiser switched off meanwhile) into `folder` as class-00000.png, ...; picture i
    uses seed config.seed + 1_000_000 + i and the sample grids' steps and guidance. Pictures already there
    (a resumed run) are kept, so a resume draws only what is missing."""
    from peft_core import get_handle

    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(config.reg_count) if not (folder / f"class-{i:05d}.png").is_file()]
    handle = get_handle(family_of(pipe).denoiser(pipe))
    enabled = [] if handle is None else handle.enabled_names
    for name in enabled:
        handle.disable(name)
    try:
        with _quiet(pipe):
            for index in missing:  # one seeded picture at a time: the same picture whichever are missing
                (image,) = generate(
                    pipe,
                    [config.reg_prompt],
                    seed=config.seed + 1_000_000 + index,
                    steps=config.sample_steps,
                    guidance=config.sample_guidance,
                    size=size,
                )
                save_image_atomic(image, folder / f"class-{index:05d}.png")
    finally:
        for name in enabled:
            handle.enable(name)
    return folder


def _extra_prompts(config: TrainConfig, reg_dataset) -> list[str]:
    """Prompts a text-embedding cache needs beyond the captions: the empty one, the regularisation images'."""
    if not config.cache_text_embeddings:
        return []
    prompts = [""] if config.caption_dropout > 0 else []
    if reg_dataset is not None:
        if config.reg_prompt is not None:
            prompts.append(config.reg_prompt)
        else:
            prompts += [reg_dataset[index]["prompt"] for index in range(len(reg_dataset))]
    return prompts


def _check_inputs(
    pipe,
    dataset,
    adapter_config: AdapterConfig,
    config: TrainConfig,
    text_encoder_adapter: AdapterConfig | None,
    reg_dataset=None,
) -> AdapterConfig | None:
    """Fail on bad settings or data; returns the text encoder's adapter config (None: denoiser only)."""
    config.check()
    family = family_of(pipe)
    family.check_objective_options(config.noise_offset, config.min_snr_gamma)
    _check_step_options(dataset, config, reg_dataset)
    trains_text_encoder = config.train_text_encoder or text_encoder_adapter is not None
    if trains_text_encoder and config.cache_text_embeddings:
        raise UserError(
            "cache_text_embeddings encodes the captions once, so the text encoder cannot be trained with it; "
            "leave out one of --train-text-encoder and --cache-text-embeddings"
        )
    if trains_text_encoder and not family.trains_text_encoder:
        raise UserError(
            f"training the text encoder is supported on Stable Diffusion 1.x/2.x only, not yet on {family.title}; "
            "train the denoiser alone (leave out --train-text-encoder)"
        )
    if len(dataset) == 0:
        raise UserError("the dataset is empty; add images (and captions) to the folder")
    if config.train_text_encoder and text_encoder_adapter is None:  # same method, the text encoder's projections
        text_encoder_adapter = config_from_dict(
            {**adapter_config.to_dict(), "targets": TEXT_ENCODER_TARGETS, "exclude": []}
        )
    return text_encoder_adapter


def _check_step_options(dataset, config: TrainConfig, reg_dataset) -> None:
    """The options of captions, masks and regularisation images against each other and the data."""
    if config.shuffle_captions and config.cache_text_embeddings:
        raise UserError(
            "shuffle_captions makes new captions every step, which cache_text_embeddings cannot encode once; "
            "leave out one of --shuffle-captions and --cache-text-embeddings"
        )
    if config.masked_loss and len(dataset) and _mask_count(dataset) == 0:
        raise UserError(
            "masked_loss: no training image has a mask; put <name>.mask.png (white: counts, black: ignored) "
            "beside <name>.png, or leave out --masked-loss"
        )
    regularised_run = config.reg_data is not None or reg_dataset is not None
    if config.reg_data is not None and config.reg_prompt is None:
        raise UserError("reg_data needs reg_prompt, the regularisation images' prompt (e.g. 'a photo of a dog')")
    if config.reg_prompt is not None and not regularised_run:
        raise UserError("reg_prompt is the prompt of the regularisation images: give their folder with --reg-data")
    if regularised_run and config.cache_latents:
        raise UserError(
            "cache_latents encodes the training images only; with regularisation images (reg_data) leave it out"
        )


def _mask_count(dataset) -> int:
    """How many items of `dataset` have a loss mask (an ImageCaptionDataset built with masks=True knows)."""
    if hasattr(dataset, "mask_count"):
        if not getattr(dataset, "masks", False):
            raise UserError("masked_loss needs the dataset's masks: build it with ImageCaptionDataset(..., masks=True)")
        return dataset.mask_count
    return int("mask" in dataset[0])


def _use_cuda_graph(config: TrainConfig, trains_text_encoder: bool, cpu: bool, dataset=None) -> bool:
    """Whether the step replays from a CUDA graph (cuda_graph="on" where it cannot is an error)."""
    processes = process_state(cpu)  # the device and the process count, before any precision is fixed
    blockers = cuda_graph_blockers(config, processes.device, processes.num_processes, trains_text_encoder, dataset)
    if config.cuda_graph == "on" and blockers:
        raise UserError(
            f"cuda_graph='on' is not possible for this run: {'; '.join(blockers)}. Use cuda_graph='auto' or 'off'."
        )
    return config.cuda_graph != "off" and not blockers


def attach_denoiser_adapter(
    pipe,
    dataset,
    adapter_config: AdapterConfig,
    config: TrainConfig,
    adapter_name: str,
    checkpoint: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> AdapterHandle:
    """Attach the adapter to the denoiser (UNet or transformer). A method that looks at data first
    (CorDA's covariances, SPT's sensitivities) runs its prepare step here, on the run's own first
    `calibration_samples` training images with this loop's objective; a resumed run rebuilds it from
    its checkpoint instead (the checkpoint's adapter knows its own structure), so a resume needs no
    data and draws nothing."""
    spec, model = get_method(adapter_config.method), family_of(pipe).denoiser(pipe)
    if spec.prepare is None:
        return attach(model, adapter_config, name=adapter_name)
    if checkpoint is not None:
        return load(model, checkpoint / "adapter" / adapter_name, name=adapter_name, trainable=True)
    batches = calibration_inputs(pipe, dataset, config, dtype)
    prepared = spec.prepare(model, adapter_config, batches, step=prediction_loss)
    return attach(model, adapter_config, name=adapter_name, prepared=prepared)


def calibration_inputs(pipe, dataset, config: TrainConfig, dtype: torch.dtype = torch.float32) -> Iterator[StepInputs]:
    """The UNet inputs of the first `config.calibration_samples` training images (the batches of the
    first steps), with their own noise draws, under a progress bar."""
    from tqdm import tqdm

    device = family_of(pipe).denoiser(pipe).device
    scheduler = training_scheduler(pipe)
    count = min(config.calibration_samples, len(dataset))
    batches = math.ceil(count / config.batch_size)
    for index in tqdm(range(batches), desc=f"calibration on {count} images", unit="batch", leave=False):
        size = min(config.batch_size, count - index * config.batch_size)
        batch = sample_batch(dataset, size, config.seed, index)
        batch.masks = None  # the data step looks at whole images
        # Seeded apart from every training step's generator (steps are >= 0): calibration changes no draw.
        generator = step_generator(config.seed, -1 - index)
        with torch.no_grad():
            inputs = step_inputs(pipe, batch, generator, device, dtype, scheduler)
        yield inputs  # outside no_grad: a generator suspended inside it would leave grad off for its caller


def _set_up(
    pipe,
    dataset,
    adapter_config: AdapterConfig,
    text_encoder_adapter: AdapterConfig | None,
    config: TrainConfig,
    run_dir: Path,
    adapter_name: str,
    handle: AdapterHandle | None,
    resume: bool = True,
) -> _Loop:
    """Accelerate, the frozen base on the device, the adapters, optimizer and LR schedule."""
    torch.manual_seed(config.seed)
    # A pipeline the caller put on the CPU trains there (several CPU processes: gloo), even on a GPU machine.
    cpu = pipe.device.type == "cpu"
    graphed = _use_cuda_graph(config, text_encoder_adapter is not None, cpu, dataset)
    # Graphed, the step does its own autocast (with the cast cache off, as capture needs); accelerate's
    # mixed-precision forward wrapper would cache casts, so accelerate is told "no".
    accelerator = make_accelerator(
        "no" if graphed else config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation, cpu=cpu
    )
    device = accelerator.device
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    family = family_of(pipe)
    model = family.denoiser(pipe)
    for module in family.frozen_modules(pipe):
        module.requires_grad_(False)
    pipe.to(device)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(dtype=torch.float32)  # the VAE is only run forward; fp32 avoids fp16 NaNs in its decoder
    if handle is None or adapter_name not in handle.adapter_names:
        checkpoint = latest_checkpoint(run_dir) if resume else None
        handle = attach_denoiser_adapter(pipe, dataset, adapter_config, config, adapter_name, checkpoint, dtype)
    handle.set_trainable(adapter_name)
    text_handle = None
    if text_encoder_adapter is not None:
        text_handle = attach(pipe.text_encoder, text_encoder_adapter, name=adapter_name)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    parameters = handle.trainable_parameters() + (text_handle.trainable_parameters() if text_handle else [])
    if graphed:
        optimizer = capturable_adamw(parameters, config.learning_rate, config.weight_decay, device)
    else:
        optimizer = make_optimizer(parameters, config, device)
    lr_scheduler = make_lr_scheduler(optimizer, config)
    handle.track_optimizer(optimizer)
    if text_handle:
        text_handle.track_optimizer(optimizer)
    if graphed:

        def autocast():
            return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        autocast = accelerator.autocast
    loop = _Loop(
        pipe,
        dataset,
        config,
        run_dir,
        adapter_name,
        accelerator,
        dtype,
        handle,
        text_handle,
        parameters,
        optimizer,
        lr_scheduler,
        model,
        autocast,
        training_scheduler(pipe),
        graphed,
    )
    if config.ema_decay > 0:
        loop.emas.append(
            ("adapter_ema", "adapter_ema", AdapterEma(handle, adapter_name, config.ema_decay, config.ema_start))
        )
        if text_handle:
            text_ema = AdapterEma(text_handle, adapter_name, config.ema_decay, config.ema_start)
            loop.emas.append(("text_encoder_ema", "text_encoder_adapter_ema", text_ema))
    # Captions / images are encoded once (StepCache) by train_adapter next, after any CorDA/SPT data step above.
    return loop


def _resume(loop: _Loop, resume: bool) -> int:
    """The step to start from: the newest complete checkpoint's (restored into the loop), else 0."""
    if loop.accelerator.is_main_process:
        remove_partial_writes(loop.run_dir)
    checkpoint = latest_checkpoint(loop.run_dir) if resume else None
    if checkpoint is None:
        return 0
    state = load_checkpoint(checkpoint, loop.handle, loop.optimizer, loop.lr_scheduler)
    if loop.text_handle:
        loop.text_handle.load_state_dict(
            handle_state(checkpoint, "text_encoder", loop.adapter_name), name=loop.adapter_name
        )
    for folder, _, ema in loop.emas:
        if not (checkpoint / folder / loop.adapter_name).is_dir():
            raise UserError(
                f"{checkpoint} holds no moving average ({folder}/), which ema_decay needs: it was written by a run "
                "without it (resume with the same config), or cut short (delete it to resume from the one before)"
            )
        ema.load_state_dict(handle_state(checkpoint, folder, loop.adapter_name))
    return state["step"]


def _record_step(loop: _Loop) -> GraphedTrainStep:
    """The step as a CUDA graph (recorded on its first call)."""
    make_capturable(loop.optimizer, loop.device)  # a resumed checkpoint may come from an eager run
    # The recording holds the optimizer step's hooks too (PaCA's column rewrite), so after a replay
    # the adapters only need to know their cached state is stale.
    handle, denoiser = loop.handle, family_of(loop.pipe).denoiser(loop.pipe)
    return GraphedTrainStep(
        PixelWeightedDenoiser(denoiser) if loop.config.masked_loss else denoiser,
        loop.optimizer,
        loop.parameters,
        loop.config.max_grad_norm,
        autocast_dtype=None if loop.dtype == torch.float32 else loop.dtype,
        after_replay=lambda: handle.after_optimizer_step(refresh=False),
    )


def _graphed_step(loop: _Loop, step: int) -> float | None:
    """One replayed graph, with the same draws as the eager step; None if the graph cannot be recorded
    (cuda_graph="auto": the loop then trains eagerly from this step on)."""
    config = loop.config
    generator = step_generator(config.seed, step)
    with torch.no_grad(), loop.autocast():
        inputs = loop.inputs(step, generator)
    try:
        loss = loop.graph_step(inputs)
    except GraphCaptureError as error:
        if config.cuda_graph == "on":
            raise UserError(
                f"this model's training step cannot be recorded as a CUDA graph ({error}); use cuda_graph='off'"
            ) from error
        warnings.warn(f"CUDA-graph capture failed ({error}); training eagerly from step {step + 1} on", stacklevel=3)
        loop.graphed = False
        return None
    step_loss, grad_norm = host_values(loss, loop.graph_step.grad_norm)  # the step's one host sync
    loop.guard.step(step + 1, step_loss, grad_norm)
    return step_loss


def _eager_step(loop: _Loop, step: int) -> float:
    """Forward, backward, clipping and the optimizer step, over `gradient_accumulation` micro-batches."""
    config, accelerator = loop.config, loop.accelerator
    generator = step_generator(config.seed, step)
    step_loss, grad_norm = 0.0, None
    for micro in range(config.gradient_accumulation):
        with accelerator.accumulate(loop.model):
            with loop.autocast():
                inputs = loop.inputs(step * config.gradient_accumulation + micro, generator)
                loss = prediction_loss(loss_model(loop.model, inputs), inputs)
            accelerator.backward(loss)
            norm = None
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                norm = accelerator.clip_grad_norm_(loop.parameters, config.max_grad_norm)
            loop.optimizer.step()
            loop.optimizer.zero_grad(set_to_none=True)
            if accelerator.num_processes > 1:  # the global batch's loss, the same on every process
                loss = accelerator.reduce(loss.detach(), reduction="mean")
            loss_value, norm = host_values(loss, norm)  # one host sync, as loss.item() alone was
            step_loss += loss_value / config.gradient_accumulation
            grad_norm = norm if norm is not None else grad_norm
    # fp16's gradient scaler skips steps whose gradients overflow: an inf norm there is routine, not divergence.
    loop.guard.step(step + 1, step_loss, grad_norm if accelerator.scaler is None else None)
    return step_loss


def _maybe_sample(loop: _Loop, done: int) -> None:
    """A sample grid every `sample_every` steps (the last step's comes with the final adapter)."""
    config = loop.config
    if config.sample_every and done % config.sample_every == 0 and done < config.steps and config.sample_prompts:
        _check_finite(loop, done)
        path = _write_samples(loop, loop.run_dir / "samples" / f"step-{done:06d}.png")
        loop.emit(TrainEvent("sample", done, config.steps, path=str(path)))


def _maybe_checkpoint(loop: _Loop, done: int, step_loss: float, force: bool) -> None:
    """A checkpoint every `checkpoint_every` steps, at the end, and when `force`d (a requested stop)."""
    config, name, text_handle = loop.config, loop.adapter_name, loop.text_handle
    if not checkpoint_due(done, config.checkpoint_every, config.steps, force):
        return
    _check_finite(loop, done, loop.optimizer)  # every process (same adapter everywhere): all stop together
    if loop.accelerator.is_main_process:

        def also(path: Path) -> None:  # beside the denoiser's adapter and the optimizer
            if text_handle is not None:
                text_handle.save(path / "text_encoder" / name, name=name)
            for folder, _, ema in loop.emas:
                ema.save(path / folder / name)

        save_step_checkpoint(loop, done, config.steps, extra={"loss": step_loss}, also=also)


def _save_final(loop: _Loop) -> None:
    """The adapter(s) under run_dir/adapter/ and the final sample grid (main process)."""
    loop.accelerator.wait_for_everyone()
    _check_finite(loop, loop.config.steps)
    if not loop.accelerator.is_main_process:
        return
    name = loop.adapter_name
    loop.handle.save(loop.run_dir / "adapter" / name, name=name)
    if loop.text_handle:
        loop.text_handle.save(loop.run_dir / "text_encoder_adapter" / name, name=name)
    for _, folder, ema in loop.emas:
        ema.save(loop.run_dir / folder / name)
    if loop.config.sample_prompts:
        path = _write_samples(loop, loop.run_dir / "samples" / "final.png")
        loop.emit(TrainEvent("sample", loop.config.steps, loop.config.steps, path=str(path)))


def _write_samples(loop: _Loop, path: Path) -> Path:
    """A sample grid, drawn with the moving averages of the adapters where the run keeps them (ema_decay)."""
    with contextlib.ExitStack() as averaged:
        for _, _, ema in loop.emas:
            averaged.enter_context(ema.applied())
        return write_samples(loop.pipe, loop.config, path, loop.accelerator, loop.sample_size, loop.cache)


def _check_finite(loop: _Loop, done: int, optimizer: torch.optim.Optimizer | None = None) -> None:
    """NonFiniteLoss unless the trained adapter(s) (and `optimizer`'s state) are finite: before every write."""
    loop.guard.check_finite(loop.handle, done, [loop.adapter_name], optimizer)
    if loop.text_handle is not None:
        loop.guard.check_finite(loop.text_handle, done, [loop.adapter_name])


def handle_state(checkpoint: Path, component: str, name: str) -> dict[str, torch.Tensor]:
    from peft_core.io import read_safetensors

    return read_safetensors(checkpoint / component / name / "adapter_model.safetensors")


def write_samples(
    pipe, config: TrainConfig, path: Path, accelerator, size: int | None = None, cache: StepCache | None = None
) -> Path:
    """The sample grid of `config.sample_prompts`, at `size` pixels (None: the model's default size), and
    beside it <grid>.json: how to draw each picture again (prompt, seed, sampler and its settings, steps,
    guidance, size). Encoders a `cache` moved to the CPU come back to the device for it."""
    from peft_core.io import write_json

    seed = config.seed if config.sample_seed is None else config.sample_seed
    size = size or family_of(pipe).default_size(pipe)
    with cache.offloaded_back() if cache is not None else contextlib.nullcontext(), _quiet(pipe):
        images = generate(
            pipe,
            config.sample_prompts,
            seed=seed,
            steps=config.sample_steps,
            guidance=config.sample_guidance,
            size=size,
        )
    write_json(Path(path).with_suffix(".json"), sample_record(pipe, config, seed, size))
    return save_image_atomic(image_grid(images), path)


@contextlib.contextmanager
def _quiet(pipe) -> Iterator[None]:
    """The pipeline's own denoising progress bar off for the block (inside the training loop's bar it
    only interleaves with it), as it was after."""
    if not hasattr(pipe, "set_progress_bar_config"):
        yield
        return
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe._progress_bar_config = previous


def sample_record(pipe, config: TrainConfig, seed: int, size: int) -> dict:
    """What reproduces a sample grid elsewhere: its pictures in grid order, each with prompt and seed (a
    torch.Generator on the denoiser's device), and the sampler: the diffusers scheduler class and config."""
    scheduler = pipe.scheduler
    return {
        "images": [{"prompt": prompt, "seed": seed + i} for i, prompt in enumerate(config.sample_prompts)],
        "sampler": type(scheduler).__name__,
        "sampler_config": {k: _plain(v) for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        "steps": config.sample_steps,
        "guidance": config.sample_guidance,
        "size": size,
        "adapter": "moving average" if config.ema_decay > 0 else "trained",
    }


def _plain(value: Any) -> Any:
    """A scheduler config value as JSON can hold it (numbers, strings, lists; anything else as its text)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return str(value)
