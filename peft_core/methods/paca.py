"""PaCA, partial connection adaptation (Woo et al., ICLR 2025; spec: shared/specs/paca.md).

PaCA trains r randomly chosen input columns of W (every outgoing connection of r input
neurons) and adds no side branch:

    W_eff = W with columns idx replaced by W[:, idx] + s * delta,   s = alpha / r,  delta: (out, r)

so forward and backward stay one GEMM each, and dDelta = s * g^T x[..., idx] needs only the r
selected input channels: autograd keeps a T x r slice instead of LoRA's T x in input. It is LoRA
with A frozen to a 0/1 column selector, so it exports to a rank-r LoRA exactly.

Two ways to run it (both exact, chosen per call by `AdaptedModule`):
- resident (training default, one active adapter): the adapted columns live inside the base
  weight, so the forward is a plain GEMM. They are rewritten only when delta changes: its
  version counter moves on every in-place update (optimizer step, load), and
  `AdapterHandle.track_optimizer` covers optimizers that write behind autograd's back. The
  original columns are kept and put back bit-exactly when the adapter stops being resident.
- additive (several adapters, weights, disabled adapters, or resident=False):
  base(x) + s * x[..., idx] @ delta^T, never touching the base weight.

Beyond the paper: one column set per sibling group (q/k/v, gate/up read the same input), and
nn.Conv2d by input channel (delta is (out, r, kh, kw); its gradient is a conv weight-gradient
on the selected channels).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peft_core import layer
from peft_core.config import Capabilities, RankConfig, register_method
from peft_core.errors import AdapterError
from peft_core.targets import sibling_key

if TYPE_CHECKING:
    from peft_core.methods.loram import PrunedModule


@dataclass
class PacaConfig(RankConfig):
    """r: trained input columns per layer (parameter-match LoRA r with 2r on square layers);
    alpha: s = alpha / r; seed: column choice is randperm seeded by seed + crc32(layer or group);
    share_siblings: one column set per sibling group (q/k/v, gate/up, to_q/to_k/to_v);
    resident: keep the adapted columns inside the base weight while training (fastest)."""

    method: ClassVar[str] = "paca"

    r: int = 8
    alpha: float = 8.0
    seed: int = 0
    share_siblings: bool = True
    resident: bool = True

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


# ---------------------------------------------------------------------------------------------
# The math: pure tensor functions.
# ---------------------------------------------------------------------------------------------
def select_columns(in_features: int, r: int, seed: int, key: str) -> torch.Tensor:
    """r distinct sorted input columns, deterministic from (seed, key) on every machine."""
    generator = torch.Generator().manual_seed((seed + zlib.crc32(key.encode())) % (2**63))
    return torch.randperm(in_features, generator=generator)[:r].sort().values


def paca_delta_weight(
    delta: torch.Tensor, columns: torch.Tensor, weight_shape: tuple[int, ...], scaling: float
) -> torch.Tensor:
    """The dense update (in delta's dtype): zeros except columns idx, which hold s * delta."""
    dense = torch.zeros(weight_shape, dtype=delta.dtype, device=delta.device)
    return dense.index_copy_(1, columns.to(delta.device), scaling * delta)


class PacaLinearFunction(torch.autograd.Function):
    """y = x W_eff^T + b, where the caller has already written W_eff's columns into `weight`.

    `delta` is an input only so autograd routes dDelta to it. Saved: x[..., idx] (T x r) and a
    reference to the weight, whose version counter makes autograd refuse a stale backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, columns, scaling: float):
        dtype = layer.compute_dtype(x)
        with layer.autocast_off(x.device.type):
            x = layer.cast_to(x, dtype)
            y = layer.base_linear(x, weight, bias, dtype)
            x_selected = x.index_select(-1, columns)  # (..., r)
        ctx.save_for_backward(x_selected, weight)
        ctx.scaling, ctx.dtype = scaling, dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x_selected, weight = ctx.saved_tensors
        g = layer.cast_to(grad_output, ctx.dtype)
        grad_x = grad_delta = grad_bias = None
        with layer.autocast_off(g.device.type):
            if ctx.needs_input_grad[0]:
                grad_x = g @ layer.cast_to(weight, ctx.dtype)  # one GEMM, as for a frozen layer
            g2 = g.reshape(-1, g.shape[-1])  # (T, out)
            if ctx.needs_input_grad[3]:
                grad_delta = layer.mm_float32(g2.t(), x_selected.reshape(-1, x_selected.shape[-1]))
                if ctx.scaling != 1.0:
                    grad_delta.mul_(ctx.scaling)
            if ctx.needs_input_grad[2]:
                grad_bias = g2.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_delta, None, None


class PacaConv2dFunction(torch.autograd.Function):
    """conv2d(x, W_eff) + b with W_eff's input channels idx already written into `weight`."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, columns, scaling: float, conv_args: tuple):
        dtype = layer.compute_dtype(x)
        stride, padding, dilation = conv_args
        with layer.autocast_off(x.device.type):
            x = x.to(dtype)
            y = F.conv2d(x, weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding, dilation)
            x_selected = x.index_select(1, columns)  # (N, r, H, W)
        ctx.save_for_backward(x_selected, weight)
        ctx.scaling, ctx.dtype, ctx.conv_args, ctx.input_shape = scaling, dtype, conv_args, x.shape
        ctx.delta_shape, ctx.bias_dtype = delta.shape, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x_selected, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv_args
        g = grad_output.to(ctx.dtype)
        grad_x = grad_delta = grad_bias = None
        with layer.autocast_off(g.device.type):
            if ctx.needs_input_grad[0]:
                grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight.to(ctx.dtype), g, stride, padding, dilation)
            if ctx.needs_input_grad[3]:
                accumulate = torch.promote_types(ctx.dtype, torch.float32)  # fp32 gradient for bf16 runs
                grad_delta = (
                    torch.nn.grad.conv2d_weight(
                        x_selected.to(accumulate), ctx.delta_shape, g.to(accumulate), stride, padding, dilation
                    )
                    * ctx.scaling
                )
            if ctx.needs_input_grad[2]:
                grad_bias = g.sum((0, 2, 3)).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_delta, None, None, None


def dequantized_effective_weight(
    base: nn.Module, delta: torch.Tensor, columns: torch.Tensor, scaling: float, dtype: torch.dtype
) -> torch.Tensor:
    """QPaCA's W_eff: the dequantized 4-bit weight with columns idx replaced by W[:, idx] + s * delta."""
    import bitsandbytes.functional as bnb_functional  # only reached with a bitsandbytes base layer

    weight = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)  # (out, in)
    adapted = weight.index_select(1, columns).to(delta.dtype) + scaling * delta
    return weight.index_copy_(1, columns, adapted.to(dtype))


class QPacaLinearFunction(torch.autograd.Function):
    """PaCA on a bitsandbytes 4-bit base: dequantize, write the adapted columns, one dense GEMM.

    The 4-bit storage is never modified; backward dequantizes again instead of keeping the dense
    weight alive. Saved: x[..., idx] only.
    """

    @staticmethod
    def forward(ctx, x, delta, base, columns, scaling: float):
        dtype = layer.compute_dtype(x)
        with layer.autocast_off(x.device.type):
            x = x.to(dtype)
            weight = dequantized_effective_weight(base, delta.detach(), columns, scaling, dtype)
            y = F.linear(x, weight, None if base.bias is None else base.bias.to(dtype))
            x_selected = x.index_select(-1, columns)
        ctx.save_for_backward(x_selected, delta)
        ctx.base, ctx.columns, ctx.scaling, ctx.dtype = base, columns, scaling, dtype
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x_selected, delta = ctx.saved_tensors
        g = grad_output.to(ctx.dtype)
        grad_x = grad_delta = None
        with layer.autocast_off(g.device.type):
            if ctx.needs_input_grad[0]:
                weight = dequantized_effective_weight(ctx.base, delta.detach(), ctx.columns, ctx.scaling, ctx.dtype)
                grad_x = g @ weight
            if ctx.needs_input_grad[1]:
                g2, x2 = g.reshape(-1, g.shape[-1]), x_selected.reshape(-1, x_selected.shape[-1])
                grad_delta = layer.mm_float32(g2.t(), x2) * ctx.scaling
        return grad_x, grad_delta, None, None, None


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------
class ResidentColumns:
    """Resident-mode state: the base weight's own columns while ours are written in (`original`),
    and the (delta version, weight) pair the written columns were computed from (`written_for`).

    A plain object, not module attributes: it is read and written on every forward of every layer,
    and nn.Module's attribute machinery costs microseconds per access (hundreds of layers a step).
    """

    __slots__ = ("original", "written_for")

    def __init__(self) -> None:
        self.original: torch.Tensor | None = None
        self.written_for: tuple[int, float] | None = None


class PacaAdapter(layer.Adapter):
    @classmethod
    def check_fits(cls, base: nn.Module, config: PacaConfig, module_name: str) -> None:
        """PaCA trains r input columns: r is bounded by the layer's inputs, not by its rank."""
        in_features = base.in_channels if isinstance(base, nn.Conv2d) else base.in_features
        if config.r > in_features:
            raise AdapterError(
                f"paca: r={config.r} is larger than {module_name!r}'s {in_features} input columns; "
                f"use r <= {in_features} or exclude this layer"
            )

    def __init__(self, base: nn.Module, config: PacaConfig, module_name: str) -> None:
        super().__init__(base, config, module_name)
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv and (base.groups != 1 or base.padding_mode != "zeros"):
            raise AdapterError(
                f"paca: {module_name!r} is a conv with groups={base.groups}, padding_mode={base.padding_mode!r}; "
                "only groups=1 and zero padding are supported"
            )
        self.check_fits(base, config, module_name)
        in_features = base.in_channels if self.is_conv else base.in_features
        self.scaling, self.resident, self.quantized = config.scaling, config.resident, layer.is_4bit(base)
        if not self.quantized and not layer.has_dense_weight(base):
            raise AdapterError(
                f"paca: {module_name!r} has a {type(base.weight).__name__} weight; only dense and "
                "bitsandbytes 4-bit bases are supported"
            )
        key = sibling_key(module_name) if config.share_siblings else module_name
        self.register_buffer("columns", select_columns(in_features, config.r, config.seed, key).to(base.weight.device))
        self.weight_shape = tuple(base.weight.shape) if self.is_conv else (base.out_features, base.in_features)
        delta_shape = (self.weight_shape[0], config.r, *self.weight_shape[2:])
        self.delta = nn.Parameter(
            torch.zeros(delta_shape, dtype=layer.master_dtype(base.weight), device=base.weight.device)
        )
        self._resident = ResidentColumns()

    # -- additive path ----------------------------------------------------------------------
    def delta_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        delta = layer.cast_like_input(self.delta * self.scaling, x)
        if self.is_conv:
            return F.conv2d(x.index_select(1, self.columns), delta, None, base.stride, base.padding, base.dilation)
        return F.linear(x.index_select(-1, self.columns), delta)

    # -- resident path ----------------------------------------------------------------------
    def fused_forward(self, base: nn.Module, x: torch.Tensor, weight: float) -> torch.Tensor | None:
        if not self.resident:
            return None
        if self.quantized:
            return QPacaLinearFunction.apply(x, self.delta, base, self.columns, self.scaling * weight)
        self._write_columns(base, weight)
        scaling = self.scaling * weight
        if self.is_conv:
            conv_args = (base.stride, base.padding, base.dilation)
            return PacaConv2dFunction.apply(x, base.weight, base.bias, self.delta, self.columns, scaling, conv_args)
        return PacaLinearFunction.apply(x, base.weight, base.bias, self.delta, self.columns, scaling)

    def _write_columns(self, base: nn.Module, weight: float) -> None:
        resident, delta, base_weight = self._resident, self.delta, base.weight
        state = (delta._version, weight)
        if resident.original is not None:
            if resident.original.device != base_weight.device:
                resident.original = resident.original.to(base_weight.device)  # model.to() moved it
            if resident.written_for == state:
                return
        with torch.no_grad():
            if resident.original is None:
                resident.original = base_weight.index_select(1, self.columns)
            # One kernel: the add runs in delta's (>= fp32) precision and rounds once into the weight's dtype.
            adapted = torch.empty_like(resident.original)
            torch.add(resident.original, delta, alpha=self.scaling * weight, out=adapted)
            base_weight.index_copy_(1, self.columns, adapted)
        resident.written_for = (delta._version, weight)

    def mark_stale(self) -> None:
        """Force a rewrite of the resident columns on the next forward."""
        self._resident.written_for = None

    @classmethod
    def after_optimizer_step(cls, items: list[tuple[layer.Adapter, nn.Module, float]], refresh: bool = True) -> None:
        """Rewrite every resident column block right after the optimizer step (`track_optimizer`).

        Why here and not lazily in the next forward: when the optimizer step is issued, the host is
        usually well ahead of the GPU (an 8B Llama step on an H100 still had ~21 ms of backward
        kernels queued), so these two launches per layer hide behind that work; in the forward they
        add to the launches that must keep ahead of each layer's GEMMs, which on a slow or busy host
        made the eager step host-bound. Layers that are not resident just go stale.
        """
        for adapter, base, weight in items:
            adapter.mark_stale()
            if refresh and adapter._resident.original is not None:
                adapter._write_columns(base, weight)

    def release(self, base: nn.Module) -> None:
        resident = self._resident
        if resident.original is not None:
            with torch.no_grad():
                base.weight.index_copy_(1, self.columns, resident.original)
        resident.original, resident.written_for = None, None

    # -- merge / export ---------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return paca_delta_weight(self.delta, self.columns, self.weight_shape, self.scaling)

    def merge_into(self, base: nn.Module, weight: float) -> torch.Tensor:
        if self.quantized:
            return super().merge_into(base, weight)  # refuses, with the reason
        # Only the r adapted columns change, so only they are backed up.
        backup = base.weight.detach().index_select(1, self.columns).clone()
        with torch.no_grad():
            merged = backup.to(self.delta.dtype) + (self.scaling * weight) * self.delta
            base.weight.index_copy_(1, self.columns, merged.to(base.weight.dtype))
        return backup

    def unmerge_from(self, base: nn.Module, backup: torch.Tensor) -> None:
        with torch.no_grad():
            base.weight.index_copy_(1, self.columns, backup)

    def lora_factors(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """A one-hot selector A and B = s * delta, so B @ A is exactly the dense update.

        Conv: one LoRA rank per (selected channel, kernel position), so rank r * kh * kw.
        """
        delta = self.delta.detach() * self.scaling
        r, in_features = self.columns.numel(), self.weight_shape[1]
        if not self.is_conv:
            A = torch.zeros(r, in_features, dtype=delta.dtype, device=delta.device)
            A[torch.arange(r, device=delta.device), self.columns] = 1.0
            return A, delta
        out, _, kh, kw = delta.shape
        A = torch.zeros(r, kh, kw, in_features, kh, kw, dtype=delta.dtype, device=delta.device)
        for c, channel in enumerate(self.columns.tolist()):
            for i in range(kh):
                for j in range(kw):
                    A[c, i, j, channel, i, j] = 1.0
        return A.reshape(r * kh * kw, in_features, kh, kw), delta.reshape(out, r * kh * kw, 1, 1)


def recover_paca(state: dict[str, torch.Tensor], entry: PrunedModule) -> dict[str, torch.Tensor]:
    """LoRAM recovery: delta's rows back at the kept rows (zeros elsewhere), and the trained column
    ids of a pruned input (o_proj, down_proj) mapped through the kept columns."""
    columns = state["columns"]
    if entry.kept_cols is not None:
        columns = entry.kept_cols.to(columns.device)[columns]
    return {
        **state,
        "delta": layer.scatter_into_zeros(state["delta"], entry.kept_rows, entry.full_shape[0], 0),
        "columns": columns,
    }


register_method(
    PacaConfig,
    PacaAdapter,
    capabilities=Capabilities(
        wraps=(nn.Linear, nn.Conv2d),
        mergeable=True,  # on a dense base; merging into a 4-bit one is refused, as for every method
        quantized_base=True,  # QPaCA: the r columns are dequantized, the packed weight never written
        lora_export=True,  # a one-hot column selector A and B = s * delta
        identity_at_init=True,  # delta = 0
        loram_recovery=recover_paca,
        # r=16, alpha=32 in the LLM trainer: LoRA r=8's parameters on square layers, at LoRA's scale.
        trainer_defaults={"llm": {"r": 16, "alpha": 32.0}, "diffusion": {"r": 16, "alpha": 16.0}},
        note="PaCA trains r input columns of each weight: r=16 has LoRA r=8's parameters on square layers.",
    ),
)
