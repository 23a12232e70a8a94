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

Stopping on request: after every step `train_adapter` asks `should_stop()` (by default: does
`<run_dir>/STOP` exist?). When it answers yes, the loop writes a checkpoint of that step, removes
the STOP file and raises `StopRequested`, so a resume continues from exactly that step. This is how
the UI cancels a job; a CLI user can `touch <run_dir>/STOP` for the same clean stop.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peft_core import AdapterConfig, AdapterHandle, attach, config_from_dict
from pipelines.checkpoint import latest_checkpoint, load_checkpoint, remove_partial_writes, save_checkpoint
from pipelines.cuda_graphs import (
    GraphCaptureError,
    GraphedTrainStep,
    StepInputs,
    capturable_adamw,
    graphed_unet,
    make_capturable,
    prediction_loss,
)
from pipelines.errors import UserError

# Every attention projection of an SD UNet (self- and cross-attention): the usual adapter targets.
UNET_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
STOP_FILE = "STOP"  # <run_dir>/STOP asks a running train_adapter to checkpoint and stop


class StopRequested(KeyboardInterrupt):
    """Raised by `train_adapter` once a requested stop is checkpointed. A KeyboardInterrupt, so every
    caller that already treats Ctrl-C as "interrupted, resumable" (studio's train-* commands) treats
    a requested stop the same way."""


@dataclass
class TrainConfig:
    """How to train (what to train is the adapter config). Defaults suit the embedded tiny SD."""

    steps: int = 300
    batch_size: int = 4
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"  # "constant" | "cosine" | "linear" (after warm-up)
    warmup_steps: int = 0
    gradient_accumulation: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # "adamw" | "adamw8bit" (bitsandbytes, CUDA only)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    sample_every: int = 0  # 0: only at the end
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 20
    sample_guidance: float = 5.0
    train_text_encoder: bool = False
    # "auto": replay the step from a CUDA graph wherever that is possible (one CUDA GPU, adamw, no
    # fp16 scaler, no accumulation, no checkpointing, UNet only), else eager; "on": insist; "off".
    cuda_graph: str = "auto"

    def check(self) -> None:
        choices = {
            "lr_schedule": ("constant", "cosine", "linear"),
            "mixed_precision": ("no", "fp16", "bf16"),
            "optimizer": ("adamw", "adamw8bit"),
            "cuda_graph": ("auto", "on", "off"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("steps", "batch_size", "gradient_accumulation"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclass
class TrainEvent:
    """One progress event; the CLI's progress bar and the UI both consume these."""

    kind: str  # "step" | "sample" | "checkpoint" | "done"
    step: int
    total_steps: int
    loss: float | None = None
    lr: float | None = None
    eta_s: float | None = None
    path: str | None = None


@dataclass
class Batch:
    pixel_values: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    prompts: list[str]


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for every random draw of one step (exact resume depends on it)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def sample_batch(
    dataset, batch_size: int, seed: int, step: int, process_index: int = 0, num_processes: int = 1
) -> Batch:
    """This process's share of step `step`'s batch: an epoch-wise permutation, walked in order."""
    n = len(dataset)
    global_batch = batch_size * num_processes
    items = []
    for k in range(batch_size):
        position = step * global_batch + process_index * batch_size + k
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        if hasattr(dataset, "set_epoch"):  # new random crops/flips each epoch, reproducibly
            dataset.set_epoch(epoch)
        items.append(dataset[int(order[offset])])
    return Batch(torch.stack([item["pixel_values"] for item in items]), [item["prompt"] for item in items])


def encode_prompts(pipe, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    tokens = pipe.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return pipe.text_encoder(tokens)[0]


def training_scheduler(pipe):
    """A DDPM scheduler with the pipeline's noise schedule, owned by the training loop.

    Never train through `pipe.scheduler`: samplers such as DPM-Solver keep state (their timestep
    grid changes on every `set_timesteps`), so sampling mid-training would corrupt `add_noise`.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def diffusion_loss(
    pipe, unet, batch: Batch, generator: torch.Generator, device: torch.device, dtype: torch.dtype, scheduler=None
) -> torch.Tensor:
    """The noise-prediction loss of one batch, with the scheduler's prediction type.

    `unet` is pipe.unet as accelerate prepared it (DDP-wrapped when there are several processes);
    `scheduler` is the training noise scheduler (default: `training_scheduler(pipe)`)."""
    return prediction_loss(unet, step_inputs(pipe, batch, generator, device, dtype, scheduler))


def step_inputs(
    pipe, batch: Batch, generator: torch.Generator, device: torch.device, dtype: torch.dtype, scheduler=None
) -> StepInputs:
    """Every random draw of one step, and what the UNet is given and should predict."""
    scheduler = scheduler or training_scheduler(pipe)
    with torch.no_grad():
        posterior = pipe.vae.encode(batch.pixel_values.to(device, pipe.vae.dtype)).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(
            device, posterior.mean.dtype
        )
        latents = (latents * pipe.vae.config.scaling_factor).to(dtype)
    noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(
        device
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prompt_embeds = encode_prompts(pipe, batch.prompts, device)
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
    return StepInputs(noisy, timesteps, prompt_embeds.to(dtype), target)


def make_accelerator(mixed_precision: str, **options):
    """An `accelerate.Accelerator` with this run's mixed precision.

    accelerate keeps one process-wide state and refuses a second mixed-precision setting ("restart
    your runtime"). A long-lived process (a notebook, a benchmark; the UI runs each job in its own
    process) may train one run after the other with different settings, and a graphed run asks for
    "no" where accelerate may already hold another value, so the precision part of that state is
    cleared first; the process-group part (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, **options)


def cuda_graph_blockers(
    config: TrainConfig, device: torch.device, num_processes: int, trains_text_encoder: bool
) -> list[str]:
    """Why this run cannot replay its step from a CUDA graph (empty: it can)."""
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
    return blockers


def make_optimizer(
    parameters: list[torch.nn.Parameter], config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    if config.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise UserError("optimizer 'adamw8bit' needs a CUDA GPU (bitsandbytes); use 'adamw' on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optimizer 'adamw8bit' needs bitsandbytes: pip install 'peft-studio[quant]'") from None
        return bnb.optim.AdamW8bit(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=device.type == "cuda"
    )


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        if config.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if config.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    applied on the fly then cost launches no more); `cuda_graph=False` keeps them eager."""
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    device = pipe.unet.device
    generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(prompts))]
    was_training = pipe.unet.training
    pipe.unet.eval()
    with graphed_unet(pipe, enabled=cuda_graph and steps > 2):
        images = pipe(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=generators,
            output_type="pil",
        ).images
    pipe.unet.train(was_training)
    return images


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
) -> AdapterHandle:
    """Train adapter `adapter_name` on `pipe.unet` (+ text encoder) with `dataset`; returns the UNet's handle.

    `dataset[i]` is a dict with "pixel_values" (3, H, W) in [-1, 1] and "prompt". If `handle`
    already holds `adapter_name` (e.g. Break-for-Make's make stage), that adapter is trained.
    Writes `run_dir/checkpoints/`, `run_dir/samples/` and, at the end, `run_dir/adapter/<name>/`.
    `should_stop()` is asked after every step (default: does `run_dir/STOP` exist?); see the module docstring.
    """
    from accelerate import PartialState

    # 1. Check inputs before touching the model.
    config.check()
    if len(dataset) == 0:
        raise UserError("the dataset is empty; add images (and captions) to the folder")
    if len(set(getattr(dataset, "bucket_ids", [0]))) > 1:
        raise UserError("this training loop batches square crops only; build the dataset with buckets=False")
    if config.train_text_encoder and text_encoder_adapter is None:  # same method, the text encoder's projections
        text_encoder_adapter = config_from_dict(
            {**adapter_config.to_dict(), "targets": TEXT_ENCODER_TARGETS, "exclude": []}
        )
    run_dir = Path(run_dir)
    emit = on_event or (lambda event: None)
    should_stop = should_stop or (lambda: (run_dir / STOP_FILE).exists())

    # 2. Accelerate, frozen base, adapters (initialised from the seed, like everything else).
    torch.manual_seed(config.seed)
    processes = PartialState()  # the device and the process count, before any precision is fixed
    blockers = cuda_graph_blockers(config, processes.device, processes.num_processes, text_encoder_adapter is not None)
    if config.cuda_graph == "on" and blockers:
        raise UserError(
            f"cuda_graph='on' is not possible for this run: {'; '.join(blockers)}. Use cuda_graph='auto' or 'off'."
        )
    graphed = config.cuda_graph != "off" and not blockers
    # Graphed, the step does its own autocast (with the cast cache off, as capture needs); accelerate's
    # mixed-precision forward wrapper would cache casts, so accelerate is told "no".
    accelerator = make_accelerator(
        "no" if graphed else config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation
    )
    device = accelerator.device
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    pipe.to(device)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(dtype=torch.float32)  # the VAE is only run forward; fp32 avoids fp16 NaNs in its decoder
    if handle is None or adapter_name not in handle.adapter_names:
        handle = attach(pipe.unet, adapter_config, name=adapter_name)
    handle.set_trainable(adapter_name)
    text_handle = None
    if text_encoder_adapter is not None:
        text_handle = attach(pipe.text_encoder, text_encoder_adapter, name=adapter_name)
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
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
        unet = pipe.unet

        def autocast():
            return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    else:
        unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
        autocast = accelerator.autocast
    noise_scheduler = training_scheduler(pipe)

    # 3. Resume from the newest complete checkpoint, if any (after clearing what a killed run half-wrote).
    start_step = 0
    if accelerator.is_main_process:
        remove_partial_writes(run_dir)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, handle, optimizer, lr_scheduler)
        if text_handle:
            text_handle.load_state_dict(handle_state(checkpoint, "text_encoder", adapter_name), name=adapter_name)
        start_step = state["step"]
    if graphed:
        make_capturable(optimizer, device)  # a resumed checkpoint may come from an eager run
        # The recording holds the optimizer step's hooks too (PaCA's column rewrite), so after a replay
        # the adapters only need to know their cached state is stale.
        graph_step = GraphedTrainStep(
            pipe.unet,
            optimizer,
            parameters,
            config.max_grad_norm,
            autocast_dtype=None if dtype == torch.float32 else dtype,
            after_replay=lambda: handle.after_optimizer_step(refresh=False),
        )

    # 4. Train.
    unet.train()
    started, losses = time.perf_counter(), []
    for step in range(start_step, config.steps):
        generator = step_generator(config.seed, step)
        step_loss = None
        if graphed:  # one replayed graph; the same draws as the eager loop below
            batch = sample_batch(
                dataset, config.batch_size, config.seed, step, accelerator.process_index, accelerator.num_processes
            )
            with torch.no_grad(), autocast():
                inputs = step_inputs(pipe, batch, generator, device, dtype, noise_scheduler)
            try:
                step_loss = graph_step(inputs).item()
            except GraphCaptureError as error:
                if config.cuda_graph == "on":
                    raise UserError(
                        f"this model's training step cannot be recorded as a CUDA graph ({error}); use cuda_graph='off'"
                    ) from error
                warnings.warn(
                    f"CUDA-graph capture failed ({error}); training eagerly from step {step + 1} on", stacklevel=2
                )
                graphed = False
                generator = step_generator(config.seed, step)  # this step's draws, again, for the eager path
        if step_loss is None:
            step_loss = 0.0
            for micro in range(config.gradient_accumulation):
                with accelerator.accumulate(unet):
                    batch = sample_batch(
                        dataset,
                        config.batch_size,
                        config.seed,
                        step * config.gradient_accumulation + micro,
                        accelerator.process_index,
                        accelerator.num_processes,
                    )
                    with autocast():
                        loss = diffusion_loss(pipe, unet, batch, generator, device, dtype, noise_scheduler)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step_loss += loss.item() / config.gradient_accumulation
        lr_scheduler.step()
        losses.append(step_loss)
        done = step + 1
        elapsed = time.perf_counter() - started
        eta = elapsed / (done - start_step) * (config.steps - done)
        emit(TrainEvent("step", done, config.steps, loss=step_loss, lr=float(lr_scheduler.get_last_lr()[0]), eta_s=eta))

        if config.sample_every and done % config.sample_every == 0 and done < config.steps and config.sample_prompts:
            path = write_samples(pipe, config, run_dir / "samples" / f"step-{done:06d}.png", accelerator)
            emit(TrainEvent("sample", done, config.steps, path=str(path)))
        stop = done < config.steps and stop_requested(should_stop, accelerator)
        if accelerator.is_main_process and (stop or done % config.checkpoint_every == 0 or done == config.steps):
            path = save_checkpoint(
                run_dir, done, handle, [adapter_name], optimizer, lr_scheduler, extra={"loss": step_loss}
            )
            if text_handle:
                text_handle.save(path / "text_encoder" / adapter_name, name=adapter_name)
            emit(TrainEvent("checkpoint", done, config.steps, path=str(path)))
        if stop:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                (run_dir / STOP_FILE).unlink(missing_ok=True)  # the request is served; a resume must not stop again
            raise StopRequested(f"stopped on request after step {done} of {config.steps}; the checkpoint resumes it")

    # 5. Save the adapter and the final samples.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        handle.save(run_dir / "adapter" / adapter_name, name=adapter_name)
        if text_handle:
            text_handle.save(run_dir / "text_encoder_adapter" / adapter_name, name=adapter_name)
        if config.sample_prompts:
            path = write_samples(pipe, config, run_dir / "samples" / "final.png", accelerator)
            emit(TrainEvent("sample", config.steps, config.steps, path=str(path)))
    emit(
        TrainEvent(
            "done",
            config.steps,
            config.steps,
            loss=losses[-1] if losses else None,
            path=str(run_dir / "adapter" / adapter_name),
        )
    )
    return handle


def stop_requested(should_stop: Callable[[], bool], accelerator) -> bool:
    """`should_stop()`, agreed by every process (one stopping alone would hang the others' collectives)."""
    stop = bool(should_stop())
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(stop)], device=accelerator.device)
        stop = bool(accelerator.reduce(flag, reduction="max").item())
    return stop


def handle_state(checkpoint: Path, component: str, name: str) -> dict[str, torch.Tensor]:
    from peft_core.io import read_safetensors

    return read_safetensors(checkpoint / component / name / "adapter_model.safetensors")


def write_samples(pipe, config: TrainConfig, path: Path, accelerator) -> Path:
    images = generate(
        pipe, config.sample_prompts, seed=config.seed, steps=config.sample_steps, guidance=config.sample_guidance
    )
    return save_image_atomic(image_grid(images), path)
