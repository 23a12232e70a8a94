"""The training kit every trainer shares: the diffusion loop (pipelines.train), Break-for-Make
(pipelines.b4m), the LLM trainer (studio.llm) and the pretraining recipe (pipelines.world.pretrain).

    optimizer = make_optimizer(parameters, config, device)      # config: .optimizer, .learning_rate, .weight_decay
    lr_scheduler = make_lr_scheduler(optimizer, config)          # config: .lr_schedule, .warmup_steps, .steps
    accelerator = make_accelerator(config.mixed_precision)
    ...
    emit(TrainEvent("step", done, config.steps, loss=loss, lr=lr, eta_s=eta))
    stop = done < config.steps and stop_requested(should_stop, accelerator)
    if accelerator.is_main_process and checkpoint_due(done, config.checkpoint_every, config.steps, force=stop):
        save_step_checkpoint(loop, done, config.steps, extra={"loss": loss})   # + its "checkpoint" event
    if stop:
        serve_stop(run_dir, accelerator, done, config.steps)   # raises StopRequested

Stopping on request: a trainer asks `should_stop()` after every step (by default `stop_file_exists(run_dir)`:
does `<run_dir>/STOP` exist?). When it answers yes, the trainer checkpoints that step, then
`serve_stop` removes the STOP file and raises `StopRequested`, so a resume continues from exactly
that step. This is how the UI cancels a job; a CLI user can `touch <run_dir>/STOP` for the same stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from pipelines.checkpoint import save_checkpoint
from pipelines.errors import UserError

LR_SCHEDULES = ("constant", "cosine", "linear")  # the factor after warm-up (see lr_factor)
OPTIMIZERS = ("adamw", "adamw8bit")  # adamw8bit: bitsandbytes, CUDA only
MIXED_PRECISIONS = ("no", "fp16", "bf16")
STOP_FILE = "STOP"  # <run_dir>/STOP asks a running trainer to checkpoint and stop


class StopRequested(KeyboardInterrupt):
    """Raised by a trainer once a requested stop is checkpointed. A KeyboardInterrupt, so every
    caller that already treats Ctrl-C as "interrupted, resumable" (studio's train-* commands) treats
    a requested stop the same way."""


@dataclass
class TrainEvent:
    """One progress event of any trainer; the CLI's progress bar, logs/events.jsonl and the UI read these."""

    kind: str  # "data" | "step" | "eval" | "sample" | "checkpoint" | "done" (B4M: its stage names)
    step: int
    total_steps: int
    loss: float | None = None
    lr: float | None = None
    eta_s: float | None = None
    path: str | None = None
    metrics: dict[str, Any] | None = None
    message: str | None = None


class OptimizerSettings(Protocol):
    """What `make_optimizer` reads (TrainConfig and LlmTrainConfig both have it)."""

    optimizer: str
    learning_rate: float
    weight_decay: float


class ScheduleSettings(Protocol):
    """What `make_lr_scheduler` reads (TrainConfig and LlmTrainConfig both have it)."""

    lr_schedule: str
    warmup_steps: int
    steps: int


class CheckpointedLoop(Protocol):
    """What `save_step_checkpoint` reads of a trainer's loop state."""

    run_dir: Path
    adapter_name: str
    handle: Any  # the AdapterHandle being trained
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    emit: Callable[[TrainEvent], Any]


def make_optimizer(
    parameters: list[torch.nn.Parameter], settings: OptimizerSettings, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or bitsandbytes' 8-bit AdamW, at `settings.learning_rate`."""
    if settings.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise UserError("optimizer 'adamw8bit' needs a CUDA GPU (bitsandbytes); use 'adamw' on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optimizer 'adamw8bit' needs bitsandbytes: pip install 'peft-studio[quant]'") from None
        return bnb.optim.AdamW8bit(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(
        parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=device.type == "cuda"
    )


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """The learning-rate multiplier of step `step` (0-based): linear warm-up to 1 over `warmup_steps`,
    then `schedule` ("constant", "cosine" or "linear") from 1 down to `floor` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return floor + (1 - floor) * (0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    if schedule == "linear":
        return floor + (1 - floor) * max(0.0, 1 - progress)
    return 1.0


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, settings: ScheduleSettings, floor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping `lr_factor` with the settings' schedule, warm-up and step count."""
    if settings.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"lr_schedule={settings.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    schedule, warmup_steps, total_steps = settings.lr_schedule, settings.warmup_steps, settings.steps

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict keeps no state of it
        return lr_factor(step, schedule, warmup_steps, total_steps, floor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def stop_file_exists(run_dir: Path | None) -> Callable[[], bool]:
    """The default `should_stop`: does `<run_dir>/STOP` exist? (never, without a run folder)"""
    return lambda: run_dir is not None and (Path(run_dir) / STOP_FILE).exists()


def stop_requested(should_stop: Callable[[], bool], accelerator) -> bool:
    """`should_stop()`, agreed by every process (one stopping alone would hang the others' collectives)."""
    stop = bool(should_stop())
    if accelerator is not None and accelerator.num_processes > 1:
        flag = torch.tensor([float(stop)], device=accelerator.device)
        stop = bool(accelerator.reduce(flag, reduction="max").item())
    return stop


def checkpoint_due(done: int, every: int, total: int, force: bool = False) -> bool:
    """Whether step `done` is checkpointed: every `every` steps, at the end, and when forced (a requested stop)."""
    return force or done % every == 0 or done == total


def save_step_checkpoint(
    loop: CheckpointedLoop,
    done: int,
    total: int,
    extra: dict[str, Any],
    also: Callable[[Path], Any] | None = None,
) -> Path:
    """An atomic checkpoint of step `done` (adapter, optimizer, schedule, RNG, `extra`; `also(path)` adds
    to it), then its "checkpoint" event. Main process only."""
    path = save_checkpoint(
        loop.run_dir, done, loop.handle, [loop.adapter_name], loop.optimizer, loop.lr_scheduler, extra=extra
    )
    if also is not None:
        also(path)
    loop.emit(TrainEvent("checkpoint", done, total, path=str(path)))
    return path


def serve_stop(run_dir: Path | None, accelerator, done: int, total: int, message: str | None = None) -> None:
    """End a run whose stop was requested after step `done` of `total` (and whose state is checkpointed):
    wait for every process, remove the STOP file (the request is served; a resume must not stop again),
    raise StopRequested (with `message`, by default: where it stopped and that the checkpoint resumes it)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if run_dir is not None and (accelerator is None or accelerator.is_main_process):
        (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)
    raise StopRequested(message or f"stopped on request after step {done} of {total}; the checkpoint resumes it")
