"""LoRA (Hu et al., 2021): W' = W + s * B @ A with A (r x in), B (out x r), s = alpha / r.

rsLoRA (Kalajdzievski, 2023) uses s = alpha / sqrt(r), which keeps the update's scale stable as r
grows. Works on nn.Linear and nn.Conv2d (A is a conv with the base kernel, B a 1x1 conv, the same
layout HF PEFT and diffusers use, so exports are a rename).

Speed: with one active adapter and no dropout, nn.Linear runs one autograd Function that saves
the input once (plus the r-wide projection) and adds the low-rank product into the base GEMM's
output in place, instead of autograd's chain of five ops and two extra full-size tensors.
Adapter weights are float32 or wider (Adam on bf16 weights loses small updates); the math runs in the
activations' dtype and the gradients come back in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peft_core import layer
from peft_core.config import Capabilities, RankConfig, register_method
from peft_core.errors import AdapterError

if TYPE_CHECKING:
    from peft_core.methods.loram import PrunedModule


@dataclass
class LoraConfig(RankConfig):
    """r: rank; alpha: scale numerator; dropout: on the adapter's input; use_rslora: s = alpha/sqrt(r);
    init_A: "kaiming" (uniform, as in the paper's code and PEFT) or "gaussian" (std 1/r)."""

    method: ClassVar[str] = "lora"

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init_A: str = "kaiming"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        if self.init_A not in ("kaiming", "gaussian"):
            raise AdapterError(f"lora: init_A must be 'kaiming' or 'gaussian', got {self.init_A!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# ---------------------------------------------------------------------------------------------
# The math: pure tensor functions.
# ---------------------------------------------------------------------------------------------
class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + (x A^T)(s B)^T, saving only x (and the r-wide cast factors) for backward.

    h = x A^T is recomputed in backward rather than kept: one GEMM of T x in x r flops (tiny next
    to the layer's own) instead of T x r activations per layer for the whole forward (r/in of x's
    memory: 5% at r=16 on SD's 320-wide layers, 20% at r=64). Few launches otherwise: at LLM widths
    a layer's Python and launch overhead is paid hundreds of times per step, so s is folded into
    the cast copy of B once.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float):
        dtype = layer.compute_dtype(x)
        x2 = layer.cast_to(x.reshape(-1, x.shape[-1]), dtype)  # (T, in)
        A = layer.cast_to(lora_A, dtype)  # (r, in)
        scaled_B = layer.cast_to(torch.mul(lora_B, scaling), dtype)  # (out, r)
        with layer.autocast_off(x.device.type):
            h = x2 @ A.t()  # (T, r)
            y = layer.base_linear(x2, weight, bias, dtype)  # (T, out)
            y.addmm_(h, scaled_B.t())  # (T, out) += h (sB)^T
        ctx.save_for_backward(x2, weight, A, scaled_B)
        ctx.scaling, ctx.compute_dtype, ctx.input_shape = scaling, dtype, x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.adapter_dtypes = (lora_A.dtype, lora_B.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        x2, weight, A, scaled_B = ctx.saved_tensors
        dtype = ctx.compute_dtype
        g = layer.cast_to(grad_output.reshape(-1, grad_output.shape[-1]), dtype)  # (T, out)
        grad_x = grad_A = grad_B = grad_bias = None
        with layer.autocast_off(g.device.type):
            g_scaled = g @ scaled_B  # (T, r): s * dL/dh
            if ctx.needs_input_grad[0]:
                grad_x = g @ layer.cast_to(weight, dtype)  # (T, in)
                grad_x.addmm_(g_scaled, A)
                grad_x = grad_x.reshape(ctx.input_shape)
            if ctx.needs_input_grad[3]:
                grad_A = layer.mm_float32(g_scaled.t(), x2).to(ctx.adapter_dtypes[0])  # (r, in)
            if ctx.needs_input_grad[4]:
                h = x2 @ A.t()  # (T, r), as in forward
                grad_B = layer.mm_float32(g.t(), h).mul_(ctx.scaling).to(ctx.adapter_dtypes[1])  # (out, r)
            if ctx.needs_input_grad[2]:
                grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, grad_A, grad_B, None


def lora_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * B @ A (in the factors' dtype); for conv, B is (out, r, 1, 1) and A (r, in, kh, kw)."""
    A, B = lora_A, lora_B
    if A.dim() == 4:
        return scaling * torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A)
    return scaling * (B @ A)


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------
class LoraAdapter(layer.Adapter):
    def __init__(self, base: nn.Module, config: LoraConfig, module_name: str) -> None:
        super().__init__(base, config, module_name)
        self.r, self.scaling = config.r, config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        device, dtype = base.weight.device, layer.master_dtype(base.weight)
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise AdapterError(
                    f"lora: {module_name!r} is a grouped conv (groups={base.groups}); only groups=1 is supported"
                )
            a_shape = (config.r, base.in_channels, *base.kernel_size)
            b_shape = (base.out_channels, config.r, 1, 1)
        else:
            a_shape, b_shape = (config.r, base.in_features), (base.out_features, config.r)
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
        if config.init_A == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / config.r)

    def delta_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        A, B = layer.cast_like_input(self.lora_A, x), layer.cast_like_input(self.lora_B, x)
        if isinstance(base, nn.Conv2d):
            h = F.conv2d(x, A, None, base.stride, base.padding, base.dilation)
            return F.conv2d(h, B) * self.scaling
        return F.linear(F.linear(x, A), B) * self.scaling

    def add_output_delta_(
        self, base: nn.Module, x: torch.Tensor, base_output: torch.Tensor, output: torch.Tensor, weight: float
    ) -> None:
        # output += w s (x A^T) B^T as one GEMM with accumulation: no (T, out) temporaries, which at
        # generation time (two adapters, batch 4, SD's widest layers) cost more than the GEMMs.
        if (
            not isinstance(base, nn.Linear)
            or not output.is_contiguous()
            or (self.training and not isinstance(self.dropout, nn.Identity))
        ):
            return super().add_output_delta_(base, x, base_output, output, weight)
        A, B = self.lora_A.to(output.dtype), self.lora_B.to(output.dtype)
        h = F.linear(x.reshape(-1, x.shape[-1]).to(output.dtype), A)  # (T, r)
        output.view(-1, output.shape[-1]).addmm_(h, B.t(), alpha=self.scaling * weight)

    def fused_forward(self, base: nn.Module, x: torch.Tensor, weight: float) -> torch.Tensor | None:
        if (
            not isinstance(base, nn.Linear)
            or not layer.has_dense_weight(base)
            or (self.training and not isinstance(self.dropout, nn.Identity))
        ):
            return None
        return LoraLinearFunction.apply(x, base.weight, base.bias, self.lora_A, self.lora_B, self.scaling * weight)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return lora_delta_weight(self.lora_A, self.lora_B, self.scaling)

    def lora_factors(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.detach().clone(), self.lora_B.detach() * self.scaling


def recover_lora(state: dict[str, torch.Tensor], entry: PrunedModule) -> dict[str, torch.Tensor]:
    """LoRAM recovery ("zeroA"): B's rows and A's columns back at the kept positions, zeros elsewhere,
    so dW_full[kept_rows, kept_cols] = dW_small and 0 elsewhere; the scale is unchanged."""
    out, inp = entry.full_shape  # B: (out', r) -> (out, r);  A: (r, in') -> (r, in)
    return {
        **state,
        "lora_B": layer.scatter_into_zeros(state["lora_B"], entry.kept_rows, out, 0),
        "lora_A": layer.scatter_into_zeros(state["lora_A"], entry.kept_cols, inp, 1),
    }


register_method(
    LoraConfig,
    LoraAdapter,
    capabilities=Capabilities(
        wraps=(nn.Linear, nn.Conv2d),
        mergeable=True,
        quantized_base=True,  # QLoRA: the NF4 base runs as it is, the update is added to its output
        lora_export=True,
        identity_at_init=True,  # B = 0
        loram_recovery=recover_lora,
        trainer_defaults={"llm": {"r": 8, "alpha": 16.0}, "diffusion": {"r": 16, "alpha": 16.0}},
    ),
)
