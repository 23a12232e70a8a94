"""CUDA graphs for the UNet: one captured training step, and captured denoising calls.

Why: an SD UNet step is thousands of small kernels. On a fast GPU the host cannot launch them as
fast as they run (measured on an H100, batch 8, 512 px: the eager step of every variant is
host-bound, 87-158 ms, while the same work replayed from a graph takes 67-76 ms; bench/README.md).
A graph records the kernels once and replays them with one launch.

What a graph needs, and how this module gets it:
- Static addresses. Inputs are copied into buffers owned by the graph before each replay; outputs
  live in the graph's memory pool and are cloned out (inference) or reduced to a loss (training).
- No host work inside. Everything random (noise, timesteps, which images) is drawn *outside*, in
  `pipelines.train.step_inputs`, from the same seeded generators as the eager loop, so a graphed run
  sees exactly the eager run's draws. The optimizer is fused AdamW with `capturable=True` and its
  learning rate is a device tensor the LR scheduler fills in place.
- Python state frozen at capture. Anything the forward decides in Python (adapter weights, which
  adapters are enabled, B4M's factor weights) is baked into the recording. The inference runner
  therefore lives only for one `generate` call (adapters cannot change inside it); the training
  step lives for one `train_adapter` run, whose adapter set is fixed.
- Version counters do not move on replay. PaCA's resident columns remember which delta version they
  were written for; `handle.after_optimizer_step(refresh=False)` after each replay tells them the
  delta moved, so an eager forward in between (sampling, the final save) rewrites them. The
  recording rewrites them itself on every replay (the optimizer's post-step hook is captured too).

Both classes take a `graph_factory` so the plumbing (static buffers, warm-up, capture once,
replay) can be tested on a CPU with a stand-in graph; on CUDA it is `torch.cuda.CUDAGraph`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.errors import UserError


class GraphCaptureError(RuntimeError):
    """Recording the step as a CUDA graph failed (something in it is not capturable); nothing of
    the step ran, so the caller can run it eagerly instead."""


@dataclass
class StepInputs:
    """Everything one training step of the denoiser reads (the random draws already made).

    `model_inputs` are the denoiser's keyword arguments: tensors, or dicts of tensors (SDXL's
    added_cond_kwargs). For an SD UNet: sample, timestep, encoder_hidden_states; for Flux: packed
    hidden_states, timestep, guidance, pooled_projections, txt_ids, img_ids, ... (pipelines.families).
    """

    model_inputs: dict[str, Any]
    target: torch.Tensor  # what the denoiser should predict: noise, v, the clean latents or a flow velocity
    weight: torch.Tensor | None = None  # per-sample loss weights (N,), mean 1 over the schedule; None: all 1

    @property
    def noisy(self) -> torch.Tensor:
        """The noisy latents: a UNet's `sample`, a transformer's `hidden_states`."""
        inputs = self.model_inputs
        return inputs["sample"] if "sample" in inputs else inputs["hidden_states"]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in a fixed order (`with_tensors` rebuilds from such a list)."""
        return _flatten((self.model_inputs, self.target, self.weight), {})[1]

    def with_tensors(self, tensors: list[torch.Tensor]) -> StepInputs:
        model_inputs, target, weight = _rebuild((self.model_inputs, self.target, self.weight), iter(tensors))
        return StepInputs(model_inputs, target, weight)


def prediction_loss(model, inputs: StepInputs) -> torch.Tensor:
    """Mean squared error between the denoiser's prediction and the target, in fp32 (per-sample
    weighted when `inputs.weight` is set)."""
    prediction = model(**inputs.model_inputs, return_dict=False)[0]
    error = (prediction.float() - inputs.target.float()) ** 2
    if inputs.weight is None:
        return error.mean()
    return (error.flatten(1).mean(1) * inputs.weight.float()).mean()


class CudaGraphFactory:
    """The real thing: `torch.cuda.CUDAGraph` recorded under `torch.cuda.graph`, warm-ups on a side stream."""

    def __init__(self) -> None:
        self.side_stream = torch.cuda.Stream()
        # cuBLAS keeps a workspace per stream (two of 32 MiB on Hopper, cuBLAS and cuBLASLt). The eager
        # work before this ran on the default stream; the graph runs on its own stream and gets its own,
        # so the old ones would sit idle through every replay (measured: +65 MB at the training peak).
        # Dropped here, they come back on the default stream's next GEMM.
        torch.cuda.synchronize()
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            torch._C._cuda_clearCublasWorkspaces()

    @contextlib.contextmanager
    def warmup(self) -> Iterator[None]:
        # Warm-up on a side stream, as torch's CUDA-graph notes ask: lazy initialisations (cuBLAS
        # workspaces, autotuning) then do not land in the capture.
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            yield
        torch.cuda.current_stream().wait_stream(self.side_stream)

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
        """Record fn() (which does not run); returns its output tensors and replay()."""
        graph = torch.cuda.CUDAGraph()
        # Captured on the warm-up stream, whose cuBLAS handle and workspace the warm-ups set up
        # (torch would otherwise capture on a stream of its own).
        with torch.cuda.graph(graph, stream=self.side_stream):
            output = fn()
        return output, graph.replay


class GraphedTrainStep:
    """forward -> loss -> backward -> clip -> optimizer step as one CUDA graph.

    The first `warmup` calls are ordinary (eager) steps on their own inputs; the next call records
    the step and replays it, and every later call only copies its inputs in and replays. All calls
    are real training steps: nothing runs twice and no input is skipped.

    `optimizer` must be capturable (fused AdamW with capturable=True: `capturable_adamw`), and
    `after_replay` (e.g. `handle.after_optimizer_step`) runs after each replay, where the eager
    optimizer's post-step hooks would have run. While the object lives, nothing may re-create the
    tensors the recording reads (adapter parameters, optimizer state, PaCA's saved base columns:
    no `load_state_dict`, merge or `release` in between); `train_adapter` keeps it for one run.
    """

    def __init__(
        self,
        unet,
        optimizer: torch.optim.Optimizer,
        parameters: list[torch.nn.Parameter],
        max_grad_norm: float = 0.0,
        autocast_dtype: torch.dtype | None = None,
        warmup: int = 2,
        after_replay: Callable[[], None] | None = None,
        graph_factory=None,
    ) -> None:
        self.unet, self.optimizer, self.parameters = unet, optimizer, parameters
        self.max_grad_norm, self.autocast_dtype, self.warmup = max_grad_norm, autocast_dtype, warmup
        self.after_replay = after_replay or (lambda: None)
        self.factory = graph_factory or CudaGraphFactory()
        self.static: StepInputs | None = None
        self.loss: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | None = None  # the clipped step's gradient norm (max_grad_norm > 0)
        self.replay: Callable[[], None] | None = None
        self.calls = 0

    def _step(self) -> torch.Tensor:
        device_type = self.static.target.device.type
        # cache_enabled=False: autocast's weight-cast cache must not outlive a capture.
        with torch.autocast(
            device_type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
            cache_enabled=False,
        ):
            loss = prediction_loss(self.unet, self.static)
        loss.backward()
        if self.max_grad_norm > 0:  # recorded, the norm is an output of the graph like the loss
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        # None, not zeros: the recorded backward then allocates the gradients from the graph's pool
        # and each replay overwrites them (a zero-filled .grad would be accumulated into).
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        """One training step on `inputs`; returns the loss (a tensor, valid until the next call)."""
        if self.static is None:
            self.static = inputs.with_tensors([t.detach().clone() for t in inputs.tensors()])
        else:
            for buffer, value in zip(self.static.tensors(), inputs.tensors()):
                if buffer.shape != value.shape or buffer.dtype != value.dtype:
                    raise UserError(
                        f"a CUDA-graph training step needs the same input shapes every step; got {tuple(value.shape)} "
                        f"after {tuple(buffer.shape)}; use fixed-size batches or --cuda-graph off"
                    )
                buffer.copy_(value)
        self.calls += 1
        if self.calls <= self.warmup:
            with self.factory.warmup():
                return self._step()
        if self.replay is None:
            try:
                self.loss, self.replay = self.factory.capture(self._step)
            except Exception as error:  # noqa: BLE001 - any failure inside the recording means "not capturable"
                self.optimizer.zero_grad(set_to_none=True)
                self.after_replay()  # Python state the recording touched (PaCA's column bookkeeping) is void
                raise GraphCaptureError(f"{type(error).__name__}: {error}") from error
        self.replay()
        self.after_replay()
        return self.loss


def capturable_adamw(
    parameters: list[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """Fused AdamW that can live inside a CUDA graph: step counts on the device, and the learning
    rate a device tensor (an LR scheduler fills it in place, so schedules work under replay)."""
    return torch.optim.AdamW(
        parameters, lr=torch.tensor(lr, device=device), weight_decay=weight_decay, fused=True, capturable=True
    )


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Re-arm an AdamW for capture after `load_state_dict`: a checkpoint stores the learning rate as a
    number, and one written by an eager run (or on a CPU) also brings capturable=False, fused=False and
    step counts on the host, any of which would make the capture fail."""
    for group in optimizer.param_groups:
        group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=device).clone()
        group["capturable"] = True
        if device.type == "cuda":
            group["fused"], group["foreach"] = True, False
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(device)


# ---------------------------------------------------------------------------------------------
# Inference: the pipeline's UNet calls, captured per input signature.
# ---------------------------------------------------------------------------------------------
def _flatten(args: tuple, kwargs: dict) -> tuple[tuple, list[torch.Tensor]]:
    """(signature, tensors): tensors in a fixed order, and a hashable key of everything else
    (shapes and dtypes of the tensors, values of the rest)."""
    tensors: list[torch.Tensor] = []

    def visit(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return ("tensor", tuple(value.shape), value.dtype, value.device)
        if isinstance(value, dict):
            return ("dict", tuple((k, visit(v)) for k, v in sorted(value.items())))
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, tuple(visit(v) for v in value))
        return ("value", value)

    key = (tuple(visit(a) for a in args), tuple((k, visit(v)) for k, v in sorted(kwargs.items())))
    return key, tensors


def _rebuild(value: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """The structure of `value` (args/kwargs) with its tensors replaced, in `_flatten`'s order."""
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, dict):
        return {k: _rebuild(value[k], tensors) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return type(value)(_rebuild(v, tensors) for v in value)
    return value


def _clone_output(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (list, tuple)):
        return type(output)(_clone_output(v) for v in output)
    if isinstance(output, dict):  # diffusers' BaseOutput is an OrderedDict subclass with fields
        return type(output)(**{k: _clone_output(v) for k, v in output.items()})
    return output


class GraphedForward:
    """A module's forward, recorded once per input signature and replayed after that.

    The first call with a new signature runs eagerly (warm-up), the second records and replays.
    Python numbers passed as the timestep (some schedulers do) become tensors first, so the
    signature stays the same across denoising steps.
    """

    def __init__(self, forward: Callable[..., Any], graph_factory=None, timestep_position: int | None = 1) -> None:
        self.forward, self.factory = forward, graph_factory or CudaGraphFactory()
        self.timestep_position = timestep_position
        self.entries: dict[tuple, tuple[list[torch.Tensor], Any, Callable[[], None]] | None] = {}

    def _tensor_timestep(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample = args[0] if args else kwargs.get("sample")
        if not isinstance(sample, torch.Tensor):
            return args, kwargs
        position = self.timestep_position
        if position is not None and len(args) > position and isinstance(args[position], (int, float)):
            args = (*args[:position], torch.tensor(args[position], device=sample.device), *args[position + 1 :])
        elif isinstance(kwargs.get("timestep"), (int, float)):
            kwargs = {**kwargs, "timestep": torch.tensor(kwargs["timestep"], device=sample.device)}
        return args, kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._tensor_timestep(args, kwargs)
        key, tensors = _flatten(args, kwargs)
        if key not in self.entries:  # first sight: an eager warm-up call
            self.entries[key] = None
            with self.factory.warmup():
                return self.forward(*args, **kwargs)
        entry = self.entries[key]
        if entry is None:
            static = [t.clone() for t in tensors]
            in_args = len(_flatten(args, {})[1])
            static_args = _rebuild(args, iter(static[:in_args]))
            static_kwargs = _rebuild(kwargs, iter(static[in_args:]))
            output, replay = self.factory.capture(lambda: self.forward(*static_args, **static_kwargs))
            entry = self.entries[key] = (static, output, replay)
        static, output, replay = entry
        for buffer, value in zip(static, tensors):
            buffer.copy_(value)
        replay()
        return _clone_output(output)


@contextlib.contextmanager
def graphed_unet(pipe, enabled: bool = True, graph_factory=None) -> Iterator[GraphedForward | None]:
    """`graphed_forward` of `pipe.unet`."""
    with graphed_forward(pipe.unet, enabled, graph_factory) as runner:
        yield runner


@contextlib.contextmanager
def graphed_forward(model, enabled: bool = True, graph_factory=None) -> Iterator[GraphedForward | None]:
    """Within the block, `model`'s forward (a pipeline's UNet or transformer) is replayed from CUDA
    graphs (one per input shape).

    Only for inference with a fixed adapter setup: leave the block before changing adapters,
    weights or mixes. `enabled=False` (or a model not on CUDA without a stand-in factory) leaves it
    eager."""
    if not enabled or (graph_factory is None and model.device.type != "cuda"):
        yield None
        return
    previous = model.__dict__.get("forward")  # accelerate's mixed-precision wrapper, if it set one
    runner = GraphedForward(model.forward, graph_factory)
    model.forward = runner  # an instance attribute shadows the class's forward for this block only
    try:
        with torch.no_grad():
            yield runner
    finally:
        if previous is None:
            del model.forward
        else:
            model.forward = previous
