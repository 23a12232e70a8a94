"""The training kit every trainer shares: the diffusion loop (pipelines.train), Break-for-Make
(pipelines.b4m), the LLM trainer (studio.llm) and the pretraining recipe (pipelines.world.pretrain).

    optimizer = make_optimizer(parameters, config, device)      # config: .optimizer, .learning_rate, .weight_decay
    lr_scheduler = make_lr_scheduler(optimizer, config)          # config: .lr_schedule, .warmup_steps, .steps
                                                                 #   (+ .lr_cycles, .lr_power where it has them)
    accelerator = make_accelerator(config.mixed_precision)
    ...
    loss, grad_norm = host_values(loss, grad_norm)   # the step's one host sync
    guard.step(done, loss, grad_norm)                # NaN/inf: NonFiniteLoss, nothing written (DivergenceGuard)
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
SIGINT (Ctrl-C) and SIGTERM do the same while `pipelines.signals.catch_stop_signals()` is active (studio's run lifecycle
installs it): `stop_requested` answers yes for them too, whatever `should_stop` says (pipelines.signals).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from pipelines.checkpoint import save_checkpoint
from pipelines.errors import UserError
from pipelines.signals import SIGNALS

LR_SCHEDULES = ("constant", "cosine", "linear")  # the factor after warm-up (see lr_factor)
# Schedules shaped by a setting (lr_cycles, lr_power): a trainer whose config has those offers them
# (the diffusion loop does); make_lr_scheduler takes them from any config (default 1 cycle, power 1).
SHAPED_LR_SCHEDULES = ("cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit")  # adamw8bit: bitsandbytes, CUDA only
# More optimizers make_optimizer builds (the diffusion loop offers them): Prodigy (the prodigyopt
# package; it estimates the step size, so its learning rate is a multiplier, usually 1.0) and torch's
# Adafactor (factored second moments: less optimizer memory).
MORE_OPTIMIZERS = ("prodigy", "adafactor")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
STOP_FILE = "STOP"  # <run_dir>/STOP asks a running trainer to checkpoint and stop


class NonFiniteLoss(UserError):
    """Training diverged: a loss, a gradient norm or an adapter tensor became NaN or infinite. Raised
    before anything non-finite is written (the last good checkpoint stays the newest), so the run ends
    failed with this one line and the CLI exits 2."""


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
    """AdamW (fused on CUDA), bitsandbytes' 8-bit AdamW, Prodigy (prodigyopt) or torch's Adafactor, at
    `settings.learning_rate` with `settings.weight_decay`."""
    if settings.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise UserError("optimizer 'adamw8bit' needs a CUDA GPU (bitsandbytes); use 'adamw' on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optimizer 'adamw8bit' needs bitsandbytes: pip install 'peft-studio[quant]'") from None
        return bnb.optim.AdamW8bit(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    if settings.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UserError("optimizer 'prodigy' needs prodigyopt: pip install prodigyopt") from None
        # growth_rate: prodigyopt's default (inf) cannot go into a checkpoint's strict JSON; the largest
        # float bounds d's growth the same way (d * it is past any d_max).
        return Prodigy(
            parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, growth_rate=sys.float_info.max
        )
    if settings.optimizer == "adafactor":
        return torch.optim.Adafactor(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    if settings.optimizer != "adamw":
        choices = ", ".join((*OPTIMIZERS, *MORE_OPTIMIZERS))
        raise UserError(f"optimizer={settings.optimizer!r} is not one of {choices}")
    return torch.optim.AdamW(
        parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=device.type == "cuda"
    )


def lr_factor(
    step: int,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    floor: float = 0.0,
    cycles: int = 1,
    power: float = 1.0,
) -> float:
    """The learning-rate multiplier of step `step` (0-based): linear warm-up to 1 over `warmup_steps`,
    then `schedule` from 1 down to `floor` at `total_steps`:

    constant   1
    cosine     floor + (1 - floor) (1 + cos(pi p)) / 2, p the progress after warm-up in [0, 1]
    linear     floor + (1 - floor) (1 - p)
    cosine_with_restarts   floor + (1 - floor) (1 + cos(pi ((cycles p) mod 1))) / 2, and floor from p = 1 on:
               `cycles` cosine decays, each restarting at 1 (diffusers' / transformers' "hard restarts")
    polynomial floor + (1 - floor) (1 - p)^power (diffusers' / transformers' polynomial decay with
               lr_end = floor x the learning rate; power 1 is linear)
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return floor + (1 - floor) * (0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    if schedule == "linear":
        return floor + (1 - floor) * max(0.0, 1 - progress)
    if schedule == "cosine_with_restarts":
        if progress >= 1.0:
            return floor
        return floor + (1 - floor) * (0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0))))
    if schedule == "polynomial":
        return floor + (1 - floor) * max(0.0, 1 - progress) ** power
    return 1.0


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, settings: ScheduleSettings, floor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping `lr_factor` with the settings' schedule, warm-up and step count (and their
    `lr_cycles` / `lr_power` where they have them)."""
    known = (*LR_SCHEDULES, *SHAPED_LR_SCHEDULES)
    if settings.lr_schedule not in known:
        raise UserError(f"lr_schedule={settings.lr_schedule!r} is not one of {', '.join(known)}")
    schedule, warmup_steps, total_steps = settings.lr_schedule, settings.warmup_steps, settings.steps
    cycles, power = getattr(settings, "lr_cycles", 1), getattr(settings, "lr_power", 1.0)

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict keeps no state of it
        return lr_factor(step, schedule, warmup_steps, total_steps, floor, cycles, power)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_accelerator(mixed_precision: str, **options):
    """An `accelerate.Accelerator` with this run's mixed precision.

    accelerate keeps one process-wide state and refuses a second mixed-precision setting ("restart
    your runtime"). A long-lived process (a notebook, a benchmark; the UI runs each job in its own
    process) may train one run after the other with different settings, and a graphed run asks for
    "no" where accelerate may already hold another value, so the precision part of that state is
    cleared first; the process-group part (PartialState) is kept, except where a single process asks
    for the CPU (`cpu=True`) after something in it already set the state up for its GPU: accelerate
    would refuse that too, and with one process there is no process group to keep."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    process_state(cpu=options.get("cpu", False))
    return Accelerator(mixed_precision=mixed_precision, **options)


def process_state(cpu: bool = False):
    """accelerate's `PartialState` (device, process count), on the CPU when `cpu`: a single-process state
    an earlier call set up for the other device is dropped first (accelerate would keep it, or refuse):
    a run on a CPU pipeline, then one on a GPU pipeline in the same process, trains the second on the GPU."""
    from accelerate.state import AcceleratorState, PartialState

    shared = PartialState._shared_state
    device = shared.get("device")
    if device is not None and shared.get("num_processes", 1) == 1:
        wants_gpu = not cpu and torch.cuda.is_available()
        if (cpu and device.type != "cpu") or (wants_gpu and device.type == "cpu"):
            AcceleratorState._reset_state(reset_partial_state=True)
    return PartialState(cpu=cpu)


def stop_file_exists(run_dir: Path | None) -> Callable[[], bool]:
    """The default `should_stop`: does `<run_dir>/STOP` exist? (never, without a run folder)"""
    return lambda: run_dir is not None and (Path(run_dir) / STOP_FILE).exists()


def stop_requested(should_stop: Callable[[], bool], accelerator) -> bool:
    """`should_stop()` or a stop signal (SIGINT/SIGTERM under `catch_stop_signals`), agreed by every process
    (one stopping alone would hang the others' collectives)."""
    stop = SIGNALS.stop_wanted() or bool(should_stop())
    if accelerator is not None and accelerator.num_processes > 1:
        flag = torch.tensor([float(stop)], device=accelerator.device)
        stop = bool(accelerator.reduce(flag, reduction="max").item())
    return stop


def in_step_loop(active: bool) -> None:
    """A trainer calls `in_step_loop(True)` right before its step loop and `in_step_loop(False)` right after.
    Inside, a stop signal lets the step in progress finish and checkpoints it; outside (loading, setup,
    the final save: no step to keep) a signal stops at once, as Ctrl-C always did (pipelines.signals)."""
    SIGNALS.listening = active


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
    to it), then its "checkpoint" event. Main process only. A second stop signal during the write lets it
    finish (then stops the run); see pipelines.signals."""
    with SIGNALS.writing():
        path = save_checkpoint(
            loop.run_dir, done, loop.handle, [loop.adapter_name], loop.optimizer, loop.lr_scheduler, extra=extra
        )
        if also is not None:
            also(path)
        loop.emit(TrainEvent("checkpoint", done, total, path=str(path)))
    return path


class AdapterEma:
    """An exponential moving average of one adapter's trained tensors (adapter `name` of `handle`):

        ema = AdapterEma(handle, name, decay=0.999, start=100)
        ema.update(done)                            # after every optimizer step (done: steps taken)
        ema.save(run_dir / "adapter_ema" / name)    # handle.save's format, with the averaged tensors
        with ema.applied(): ...                     # the adapter holds the average inside the block

    Up to step `start` the average is the weights themselves; after each later step
    average <- decay * average + (1 - decay) * weights. It averages the adapter's trainable tensors
    (the rest of its state is saved as it is) and reads them in place: nothing an adapter keeps fused
    is released, and the tensors a CUDA-graph step records are never re-created."""

    def __init__(self, handle, name: str, decay: float, start: int = 0) -> None:
        self.handle, self.name, self.decay, self.start = handle, name, decay, start
        trainable = {parameter.data_ptr() for parameter in handle.trainable_parameters()}
        self.live = {
            key: value
            for key, value in handle.state_dict(name).items()
            if value.is_floating_point() and value.data_ptr() in trainable
        }
        self.average = {key: value.detach().clone() for key, value in self.live.items()}

    @torch.no_grad()
    def update(self, done: int) -> None:
        """Fold the weights after step `done` (1-based) into the average."""
        averages, weights = list(self.average.values()), [self.live[key] for key in self.average]
        if done <= self.start:
            torch._foreach_copy_(averages, weights)
        else:
            torch._foreach_lerp_(averages, weights, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's state (handle.state_dict's keys) with the averaged tensors in place of the weights."""
        return {key: self.average.get(key, value) for key, value in self.handle.state_dict(self.name).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the average from a `state_dict()` (a checkpoint's)."""
        missing = sorted(set(self.average) - set(state))
        if missing:
            raise UserError(f"the saved moving average lacks {missing[0]!r}; it is not this adapter's")
        with torch.no_grad():
            for key, value in self.average.items():
                value.copy_(state[key])

    def save(self, directory: str | os.PathLike) -> Path:
        """The average as an adapter folder, in `handle.save`'s format (it loads with `peft_core.load`)."""
        from peft_core.saved import write_adapter

        return write_adapter(directory, self.handle.configs[self.name], self.name, self.state_dict())

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The adapter holds the average inside the block; its own weights come back after it, bit for bit."""
        with torch.no_grad():
            kept = {key: value.clone() for key, value in self.live.items()}
            for key, value in self.live.items():
                value.copy_(self.average[key])
        try:
            yield
        finally:
            with torch.no_grad():
                for key, value in self.live.items():
                    value.copy_(kept[key])
            self.handle.after_optimizer_step()  # what adapters derive from their weights (PaCA's columns): redone


def divergence_hint(
    learning_rate: float, max_grad_norm: float, lr_flag: str = "--learning-rate", scale_flag: str | None = "--alpha"
) -> str:
    """What to change after a divergence, with this run's values (the flags of its command)."""
    if max_grad_norm > 0:
        clip = f"clip gradients harder (--max-grad-norm, now {max_grad_norm:g})"
    else:
        clip = "enable gradient clipping (--max-grad-norm 1.0)"
    parts = [f"lower the learning rate ({lr_flag}, now {learning_rate:g})", clip]
    if scale_flag:
        parts.append(f"check the adapter's scale ({scale_flag})")
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def host_values(*values: torch.Tensor | float | None) -> list[float | None]:
    """Scalar tensors as floats through one host sync (numbers pass, None stays None): a step's loss and
    gradient norm come to the host together, where the loop already waits for its loss."""
    tensors = [value for value in values if torch.is_tensor(value)]
    device = tensors[0].device if tensors else None
    stacked = torch.stack([t.detach().float().reshape(()).to(device) for t in tensors]) if tensors else None
    fetched = iter(stacked.tolist() if stacked is not None else [])
    return [next(fetched) if torch.is_tensor(v) else (None if v is None else float(v)) for v in values]


def non_finite_tensors(handle, names: Sequence[str] | None = None, optimizer: torch.optim.Optimizer | None = None):
    """The keys of adapter `names`' tensors (default: every adapter of `handle`) and of `optimizer`'s
    state that hold NaN or inf; one host sync per device when all are finite (the usual case)."""
    tensors = {}
    for name in handle.adapter_names if names is None else names:
        tensors.update({f"{name}: {key}": value for key, value in handle.state_dict(name).items()})
    if optimizer is not None:
        for index, state in enumerate(optimizer.state.values()):
            tensors.update({f"optimizer state {index}.{key}": v for key, v in state.items() if torch.is_tensor(v)})
    floats = {key: value for key, value in tensors.items() if value.is_floating_point()}
    by_device: dict[torch.device, list[str]] = {}
    for key, value in floats.items():
        by_device.setdefault(value.device, []).append(key)
    bad = []
    for keys in by_device.values():
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(floats[key]).all() for key in keys]).tolist()
        bad += [key for key, ok in zip(keys, finite) if not ok]
    return bad


def check_finite(
    handle,
    where: str,
    hint: str = "",
    names: Sequence[str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Raise NonFiniteLoss if adapter `names` of `handle` (default: all), or `optimizer`'s state, hold
    NaN or inf. Every trainer calls it before it writes anything trained (checkpoint, adapter, samples);
    `where` says when ("after step 3 of 10")."""
    bad = non_finite_tensors(handle, names, optimizer)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteLoss(
            f"training diverged {where}: non-finite values (NaN or inf) in {bad[0]}{more}; nothing of it was "
            f"written (the last good checkpoint is kept){'. To fix it: ' + hint if hint else ''}"
        )


class DivergenceGuard:
    """A trainer's check against divergence, where its loop already waits for the host:

        guard = DivergenceGuard(config.steps, divergence_hint(config.learning_rate, config.max_grad_norm), emit)
        loss, norm = host_values(loss_tensor, grad_norm)      # the loop's one sync per step
        guard.step(done, loss, norm)                          # NaN/inf -> NonFiniteLoss, naming the step
        guard.check_finite(handle, done)                      # before any checkpoint, adapter or sample is written

    `step` also warns once (a "message" TrainEvent) when the mean loss of the last `window` steps rises
    over `factor` times the mean of the first `window` steps: a run on its way to diverging."""

    def __init__(
        self,
        total_steps: int,
        hint: str,
        emit: Callable[[TrainEvent], Any] | None = None,
        stage: str | None = None,
        window: int = 5,
        factor: float = 10.0,
    ) -> None:
        self.total_steps, self.hint, self.stage = total_steps, hint, stage
        self.emit = emit or (lambda event: None)
        self.window, self.factor = window, factor
        self.first: list[float] = []
        self.recent: list[float] = []
        self.warned = False

    def where(self, done: int) -> str:
        return f"{'in ' + self.stage + ' ' if self.stage else ''}at step {done} of {self.total_steps}"

    def step(self, done: int, loss: float, grad_norm: float | None = None) -> None:
        """Check step `done`'s loss (and gradient norm, where clipping computed one)."""
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            norm = "" if grad_norm is None else f", gradient norm {grad_norm:g}"
            raise NonFiniteLoss(
                f"training diverged {self.where(done)}: loss {loss:g}{norm}; stopped before writing anything "
                f"non-finite (the last good checkpoint is kept). To fix it: {self.hint}"
            )
        if len(self.first) < self.window:
            self.first.append(loss)
            return
        self.recent.append(loss)
        del self.recent[: -self.window]
        start, now = sum(self.first) / len(self.first), sum(self.recent) / len(self.recent)
        if not self.warned and len(self.recent) == self.window and now > self.factor * max(start, 1e-12):
            self.warned = True
            message = (
                f"warning: the loss is rising {self.where(done)}: {now:.4g} on average over the last {self.window} "
                f"steps, more than {self.factor:g}x the first steps' {start:.4g}; the run may be diverging (to fix "
                f"it: {self.hint})"
            )
            self.emit(TrainEvent("message", done, self.total_steps, loss=loss, message=message))

    def check_finite(
        self,
        handle,
        done: int,
        names: Sequence[str] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """`check_finite` of the adapters (and optimizer state) trained up to step `done`."""
        where = f"{'in ' + self.stage + ' ' if self.stage else ''}after step {done} of {self.total_steps}"
        check_finite(handle, where, self.hint, names, optimizer)


def serve_stop(run_dir: Path | None, accelerator, done: int, total: int, message: str | None = None) -> None:
    """End a run whose stop was requested after step `done` of `total` (and whose state is checkpointed):
    wait for every process, remove the STOP file (the request is served; a resume must not stop again),
    raise StopRequested (with `message`, by default: where it stopped and that the checkpoint resumes it)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if run_dir is not None and (accelerator is None or accelerator.is_main_process):
        (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)
    how = f"by {SIGNALS.name}" if SIGNALS.installed and SIGNALS.name else "on request"
    raise StopRequested(message or f"stopped {how} after step {done} of {total}; the checkpoint resumes it")
