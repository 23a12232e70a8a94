"""The two module types every method shares.

`Adapter` is one named adapter's tensors and math for one base layer; each method subclasses it.
`AdaptedModule` replaces a targeted layer in the model: it keeps the frozen base layer and any
number of named adapters, and decides per call how to run them:

- one active adapter that offers a fused path (`Adapter.fused_forward`, e.g. LoRA's single
  autograd Function or PaCA's resident columns) -> that path;
- otherwise -> base output + sum_i weight_i * adapter_i.delta_forward(x), which never touches
  the base weight and is exact for any mix of methods, weights and disabled adapters. (Methods
  placed after a layer read base(x) too, through `Adapter.output_delta`.)

A fused path may keep state inside the base weight (PaCA's resident columns). The wrapper owns
that state's lifetime: before any other path, a merge, or a `state_dict()` it calls
`release_fused()`, which restores the base weight bit-exactly.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peft_core.config import AdapterConfig
from peft_core.errors import AdapterError


class Adapter(nn.Module):
    """One named adapter on one base layer. Subclasses implement the method's math."""

    # Set by register_method from the method's `Capabilities.wraps` (the declaration; read that).
    supported_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    def __init__(self, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        # Methods registered with a `prepare` step take one more keyword, `prepared`: their
        # module's entry of prepare()'s result (or of `prepared_from_state`, when loading).
        super().__init__()
        self.module_name = module_name

    @classmethod
    def prepared_from_state(cls, state: dict[str, torch.Tensor], base: nn.Module, config: AdapterConfig) -> object:
        """Methods with a `prepare` step: the `prepared` entry that rebuilds this module's adapter
        with the shapes of its saved tensors `state` (keys without the module prefix), so `load`
        works without the calibration data. The loaded tensors then overwrite every value."""
        raise AdapterError(f"{cls.__name__} does not say how to rebuild itself from a checkpoint")

    @classmethod
    def check_fits(cls, base: nn.Module, config: AdapterConfig, module_name: str) -> None:
        """Raise AdapterError if `config` does not fit `base`, from shapes alone (meta tensors do), for
        `peft_core.check_fits`, which asks every targeted layer before anything is built: an oversized rank
        fails at once instead of allocating (r=100000 on SD's layers is tens of GB). Default: a rank r
        (the config's `r`, if it has one) at most the rank of the layer's weight, min(outputs, inputs)."""
        r, bound = getattr(config, "r", None), weight_rank_bound(base)
        if isinstance(r, int) and bound is not None and r > bound:
            raise AdapterError(
                f"{config.method}: r={r} is larger than {module_name!r}'s rank bound {bound} (its weight is "
                f"{bound_shape(base)}); use r <= {bound} or exclude this layer"
            )

    # -- required -------------------------------------------------------------------------
    def delta_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive contribution to base(x), at weight 1."""
        raise AdapterError(f"{type(self).__name__} does not define delta_forward")

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The dense update of base.weight (same shape, in `master_dtype`), at weight 1."""
        raise AdapterError(f"{type(self).__name__} has no dense weight update, so it cannot be merged")

    # -- optional -------------------------------------------------------------------------
    reads_base_output: ClassVar[bool] = False  # output_delta reads base(x) (Compacter): see add_output_delta_

    def output_delta(self, base: nn.Module, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        """delta_forward, given base(x) too: methods placed *after* a layer (Compacter) read its output."""
        return self.delta_forward(base, x)

    def add_output_delta_(
        self, base: nn.Module, x: torch.Tensor, base_output: torch.Tensor, output: torch.Tensor, weight: float
    ) -> None:
        """output += weight * output_delta, in place (inference only: AdaptedModule calls it without
        autograd). Methods override it to fold the addition into their last GEMM."""
        output.add_(self.output_delta(base, x, base_output), alpha=weight)

    @classmethod
    def tie_shared(cls, adapters: list[Adapter]) -> None:
        """Called once per named adapter with its per-layer adapters (model order), right after they
        are built: tie tensors shared across layers, registered in one of them only, so they are
        saved, loaded, counted and optimized once (Compacter's slow weights)."""

    def check_mergeable(self, base: nn.Module) -> None:
        """Raise AdapterError if this adapter cannot be merged into `base` (checked before any merge)."""
        if not has_dense_weight(base):
            raise AdapterError(
                f"{self.module_name!r} has a quantized base weight; merging would requantize it and perturb every "
                "weight. Load the base model in bf16/fp32 to merge, or keep the adapter unmerged."
            )

    def fused_forward(self, base: nn.Module, x: torch.Tensor, weight: float) -> torch.Tensor | None:
        """A faster path for when this is the only active adapter; None if it does not apply."""
        return None

    def release(self, base: nn.Module) -> None:
        """Undo any state `fused_forward` left in the base layer (restore it bit-exactly)."""

    def mark_stale(self) -> None:
        """The adapter's tensors changed behind autograd's back; rebuild any cached state."""

    @classmethod
    def after_optimizer_step(cls, items: list[tuple[Adapter, nn.Module, float]], refresh: bool = True) -> None:
        """Called with every (adapter, base layer, weight) of this class after each optimizer step.

        refresh=True: rebuild cached state now (PaCA rewrites its resident columns here, while the
        GPU is still busy with the backward's kernels); False: only mark it stale, for the next
        forward to rebuild (after a CUDA-graph replay, whose recording already did the work).
        """
        for adapter, _, _ in items:
            adapter.mark_stale()

    def lora_factors(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) with delta_weight == B @ A exactly (conv: A is a conv kernel, B a 1x1 one), or None."""
        return None

    def merge_into(self, base: nn.Module, weight: float) -> torch.Tensor:
        """Add weight * delta_weight to the base weight; return what `unmerge_from` needs to undo it."""
        self.check_mergeable(base)
        backup = base.weight.detach().clone()
        with torch.no_grad():
            merged = base.weight.to(master_dtype(base.weight)) + weight * self.delta_weight(base).to(base.weight.device)
            base.weight.copy_(merged.to(base.weight.dtype))
        return backup

    def unmerge_from(self, base: nn.Module, backup: torch.Tensor) -> None:
        with torch.no_grad():
            base.weight.copy_(backup)


class AdaptedModule(nn.Module):
    """A targeted layer: the frozen `base_layer` plus named adapters with per-adapter weights."""

    is_adapted_module = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.adapter_weights: dict[str, float] = {}
        self.disabled: set[str] = set()
        self.merged: list[tuple[str, torch.Tensor]] = []  # (name, backup), in merge order
        self._fused_owner: str | None = None
        self._active: list[tuple[str, Adapter, float]] | None = None  # cached; see active_adapters
        # model.state_dict() must see the true base weight, never a fused path's resident state.
        self.register_state_dict_pre_hook(lambda module, *args, **kwargs: module.release_fused())
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)

    # Models read their layers' weights directly (T5 casts to `wo.weight.dtype`); show the base's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: Adapter, weight: float = 1.0) -> None:
        if name in self.adapters:
            raise AdapterError(f"module {adapter.module_name!r} already has an adapter named {name!r}")
        self.release_fused()
        self.adapters[name] = adapter
        self.adapter_weights[name] = float(weight)
        self._active = None

    def remove_adapter(self, name: str) -> None:
        if any(merged_name == name for merged_name, _ in self.merged):
            raise AdapterError(f"adapter {name!r} is merged; unmerge it before removing it")
        self.release_fused()
        del self.adapters[name]
        del self.adapter_weights[name]
        self.disabled.discard(name)
        self._active = None

    def set_enabled(self, name: str, enabled: bool) -> None:
        (self.disabled.discard if enabled else self.disabled.add)(name)
        self._active = None

    def set_weight(self, name: str, weight: float) -> None:
        self.adapter_weights[name] = float(weight)
        self._active = None

    def is_merged(self, name: str) -> bool:
        return any(merged_name == name for merged_name, _ in self.merged)

    def active_adapters(self) -> list[tuple[str, Adapter, float]]:
        """(name, adapter, weight) of every enabled, unmerged adapter; cached because forward
        runs per layer per step (hundreds of times) and Python overhead there is real time."""
        if self._active is None:
            merged = {name for name, _ in self.merged}
            self._active = [
                (name, adapter, self.adapter_weights[name])
                for name, adapter in self.adapters.items()
                if name not in self.disabled and name not in merged
            ]
        return self._active

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self.active_adapters()
        base = self.base_layer
        if len(active) == 1 and not args and not kwargs:
            name, adapter, weight = active[0]
            if self._fused_owner is not None and self._fused_owner != name:
                self.release_fused()
            output = adapter.fused_forward(base, x, weight)
            if output is not None:
                if self._fused_owner != name:  # nn.Module.__setattr__ is slow; this runs per layer per step
                    self._fused_owner = name
                return output
        self.release_fused()
        output = base_output = base(x, *args, **kwargs)
        if not torch.is_grad_enabled() and active:
            # Inference (composing adapters at generation time): every adapter adds into one output
            # buffer, with no full-size temporaries; base(x) is copied only for methods that read it.
            if any(adapter.reads_base_output for _, adapter, _ in active):
                base_output = base_output.clone()
            for _, adapter, weight in active:
                adapter.add_output_delta_(base, x, base_output, output, weight)
            return output
        for _, adapter, weight in active:
            delta = adapter.output_delta(base, x, base_output)
            output = output + (delta if weight == 1.0 else weight * delta)
        return output

    def release_fused(self) -> None:
        if self._fused_owner is not None:
            self.adapters[self._fused_owner].release(self.base_layer)
            self._fused_owner = None

    # -- merge ------------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        if self.is_merged(name):
            return
        self.release_fused()
        backup = self.adapters[name].merge_into(self.base_layer, self.adapter_weights[name])
        self.merged.append((name, backup))
        self._active = None

    def unmerge_all(self) -> None:
        """Undo every merge in reverse order, so the base weight comes back bit-exactly."""
        self.release_fused()
        while self.merged:
            name, backup = self.merged.pop()
            self.adapters[name].unmerge_from(self.base_layer, backup)
        self._active = None

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, weights={self.adapter_weights}, merged={[n for n, _ in self.merged]}"


class _StructuralNorm(type):
    def __instancecheck__(cls, module: object) -> bool:
        weight = getattr(module, "weight", None)
        return (
            isinstance(module, nn.Module)
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 1
            and not hasattr(module, "in_features")
        )


class NormLayer(metaclass=_StructuralNorm):
    """A normalization layer, recognised by structure (a 1-D `weight`, no `in_features`): nn.LayerNorm,
    nn.RMSNorm, nn.GroupNorm, Llama's RMSNorm, T5LayerNorm, ... `isinstance(module, NormLayer)` checks
    it, so it can stand in `Capabilities.wraps` (Compacter trains norms) next to real module types."""


def scatter_into_zeros(values: torch.Tensor, index: torch.Tensor | None, size: int, dim: int) -> torch.Tensor:
    """`values` placed at `index` along `dim` of a zero tensor `size` long there (`values` itself if index
    is None): how LoRAM recoveries put a pruned model's rows/columns back in the full shapes."""
    if index is None:
        return values
    shape = list(values.shape)
    shape[dim] = size
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_copy_(
        dim, index.to(values.device), values
    )


def weight_rank_bound(base: nn.Module) -> int | None:
    """The largest rank a weight update of `base` can have: min(outputs, inputs per output) of a Linear
    or a conv (inputs: in_channels / groups x kernel size); None for other layer types."""
    shape = _weight_matrix_shape(base)
    return None if shape is None else min(shape)


def bound_shape(base: nn.Module) -> str:
    """`base`'s weight as a matrix, "outputs x inputs" (a conv's inputs include its kernel)."""
    shape = _weight_matrix_shape(base)
    return "?" if shape is None else f"{shape[0]}x{shape[1]}"


def _weight_matrix_shape(base: nn.Module) -> tuple[int, int] | None:
    if isinstance(base, nn.Linear):  # in/out features also hold for bitsandbytes' packed 4-bit weights
        return base.out_features, base.in_features
    if isinstance(base, nn.Conv2d):
        kernel = base.kernel_size[0] * base.kernel_size[1]
        return base.out_channels, base.in_channels // base.groups * kernel
    return None


def is_4bit(base: nn.Module) -> bool:
    """A bitsandbytes 4-bit (NF4/FP4) layer; detected by name so peft_core never imports bitsandbytes."""
    return type(getattr(base, "weight", None)).__name__ == "Params4bit"


def has_dense_weight(base: nn.Module) -> bool:
    """The base weight is a plain float tensor that fused paths may read (and PaCA may write)."""
    weight = getattr(base, "weight", None)
    return type(weight) in (nn.Parameter, torch.Tensor) and weight.is_floating_point()


def master_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """Adapter tensors and merges use at least float32 (Adam's small steps vanish in bf16)."""
    if not base_weight.is_floating_point():  # packed quantized storage
        return torch.float32
    return torch.promote_types(base_weight.dtype, torch.float32)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype adapter math runs in: the autocast dtype if autocast is on, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def cast_to(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`; no dispatcher call when it already is (the fused Functions run once per
    layer per step, where a no-op `.to()` is host time the GPU may wait for)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The fused Functions' frozen GEMM: F.linear(x, weight, bias) with weight and bias cast to `dtype`."""
    return F.linear(x, cast_to(weight, dtype), None if bias is None else cast_to(bias, dtype))


def cast_like_input(tensor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return tensor.to(compute_dtype(x))


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Switch autocast off inside an autograd Function that casts explicitly (a no-op context when it is off)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


_FP32_OUT_MM: dict[str, bool] = {}  # device type -> does torch.mm(..., out_dtype=float32) work there


def _fp32_out_mm_supported(device: torch.device) -> bool:
    """Probe once per device type on tiny tensors (never on real ones, so an OOM is never mistaken for it)."""
    if device.type not in _FP32_OUT_MM:
        probe = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        try:
            _FP32_OUT_MM[device.type] = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, NotImplementedError, RuntimeError):
            _FP32_OUT_MM[device.type] = False
    return _FP32_OUT_MM[device.type]


def mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result: adapter gradients stay fp32 even when activations are bf16/fp16."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.is_cuda and _fp32_out_mm_supported(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()  # fp32 accumulation inside, rounded once to the input dtype
