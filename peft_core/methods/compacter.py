"""Compacter / Compacter++ (Karimi Mahabadi et al., NeurIPS 2021; spec: shared/specs/compacter.md).

A bottleneck adapter after a sub-layer, y <- y + U(gelu(D(y))), whose projections D (d -> m) and
U (m -> d) are PHM layers: in the paper's row-vector form z = h H + b with

    H = sum_{i=1..n} A_i (x) B_i,   A_i: (n, n) "slow", shared by every projection of one adapter
                                    B_i = s_i t_i: (d_in/n, r) @ (r, d_out/n) "fast", per projection

Compacter places it after attention and feed-forward (Houlsby), Compacter++ after feed-forward
only (Pfeiffer). The paper also trains every layer norm of the backbone.

How it fits the adapter contract (nothing here knows a model class):
- A *site* is the sub-layer's output Linear (Llama o_proj / down_proj, T5 SelfAttention.o /
  DenseReluDense.wo, UNet attn*.to_out.0 / ff.net.2). The adapter wraps that Linear and adds the
  bottleneck of its output (`Adapter.output_delta`), before any dropout or residual of the block.
- A *norm* target (any module with a 1-D `weight` and no in_features: RMSNorm, T5LayerNorm,
  nn.LayerNorm) gets a trainable weight delta: norm_{w+delta}(x) = norm_w(x) + [norm_delta(x) - norm_0(x)],
  exact for every norm that is affine in its weight. The base norm is never written, so disabling
  or removing the adapter restores it.
- The slow weights are registered in the first site only and referenced by the others
  (`Adapter.tie_shared`), so state_dict, save/load, parameter counts and optimizers see them once.
- The bottleneck is nonlinear: there is no weight update to merge or export; both refuse clearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peft_core.config import AdapterConfig, Capabilities, register_method
from peft_core.errors import AdapterError
from peft_core.layer import Adapter, NormLayer, cast_like_input, master_dtype

# Where the paper's placement puts adapters, per architecture: the sub-layers' output Linears
# ("attn", "ffn") and the norms trained with them ("norm"). Regexes over full module names.
PLACEMENTS: dict[str, dict[str, list[str]]] = {
    "llama": {
        "attn": [r"re:(.*\.)?layers\.\d+\.self_attn\.o_proj"],
        "ffn": [r"re:(.*\.)?layers\.\d+\.mlp\.down_proj"],
        "norm": [r"re:(.*\.)?layers\.\d+\.(input_layernorm|post_attention_layernorm)", r"re:(.*\.)?norm"],
    },
    "t5": {  # encoder and decoder; never EncDecAttention (as the official code)
        "attn": [r"re:(.*\.)?block\.\d+\.layer\.0\.SelfAttention\.o"],
        "ffn": [r"re:(.*\.)?block\.\d+\.layer\.\d+\.DenseReluDense\.wo"],
        "norm": [r"re:(.*\.)?(final_)?layer_norm"],  # every block's layer_norm and both final_layer_norms
    },
    "unet": {  # diffusers BasicTransformerBlock: self-attn, cross-attn, feed-forward
        "attn": [r"re:(.*\.)?transformer_blocks\.\d+\.attn[12]\.to_out\.0"],
        "ffn": [r"re:(.*\.)?transformer_blocks\.\d+\.ff\.net\.2"],
        "norm": [r"re:(.*\.)?transformer_blocks\.\d+\.norm[123]"],
    },
}
ACTIVATIONS = {
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),  # the official `gelu_new`
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class CompacterConfig(AdapterConfig):
    """placement: "llama" | "t5" | "unet" fills `targets` from `sites` when targets is empty
    (explicit targets win); sites: ["attn", "ffn"] = Compacter, ["ffn"] = Compacter++;
    n: Kronecker terms (divides d and m); rank: rank of each fast weight B_i;
    reduction_factor: m = d // reduction_factor unless `bottleneck` sets m;
    share_A: "model" (one A per named adapter) or "none" (one A per site);
    init: "exact_identity" (up-projection t = 0, A ~ N(0, 1e-2): the model equals the base) or
    "paper" (A ~ N(0, 1e-4): near-identity, relative error ~1e-8);
    train_layernorms: add the placement's norms to the targets (the paper trains them);
    factored: never form H (cheaper when d_in * d_out is large, e.g. >= 1e6)."""

    method: ClassVar[str] = "compacter"

    placement: str | None = None
    sites: list[str] = field(default_factory=lambda: ["attn", "ffn"])
    n: int = 4
    rank: int = 1
    reduction_factor: int = 32
    bottleneck: int | None = None
    activation: str = "gelu_tanh"
    share_A: str = "model"
    init: str = "exact_identity"
    train_layernorms: bool = False
    bias: bool = True
    factored: bool = False

    def __post_init__(self) -> None:
        if self.placement is not None and self.placement not in PLACEMENTS:
            raise AdapterError(
                f"compacter: placement {self.placement!r} is unknown; choose one of {', '.join(PLACEMENTS)}"
            )
        unknown_sites = sorted(set(self.sites) - {"attn", "ffn"})
        if unknown_sites:
            raise AdapterError(f"compacter: sites {unknown_sites} are unknown; use 'attn' and/or 'ffn'")
        if self.placement is not None and not self.targets:
            rules = PLACEMENTS[self.placement]
            self.targets = [p for site in ("attn", "ffn") if site in self.sites for p in rules[site]]
            if self.train_layernorms:
                self.targets += rules["norm"]
        elif self.train_layernorms and self.placement is None:
            raise AdapterError(
                "compacter: train_layernorms needs a `placement` (or name the norm modules in `targets`)"
            )
        super().__post_init__()
        checks = {
            "n": self.n >= 1,
            "rank": self.rank >= 1,
            "reduction_factor": self.reduction_factor >= 1,
            "bottleneck": self.bottleneck is None or self.bottleneck >= 1,
            "activation": self.activation in ACTIVATIONS,
            "share_A": self.share_A in ("model", "none"),
            "init": self.init in ("exact_identity", "paper"),
        }
        for key, ok in checks.items():
            if not ok:
                raise AdapterError(f"compacter: invalid {key}={getattr(self, key)!r} (see CompacterConfig's docstring)")

    @property
    def slow_init_std(self) -> float:
        return 1e-4 if self.init == "paper" else 1e-2


# ---------------------------------------------------------------------------------------------
# The math: pure tensor functions. Row-vector form z = h H + b, H: (d_in, d_out).
# ---------------------------------------------------------------------------------------------
def phm_weight(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """H = sum_i kron(A_i, s_i t_i): rule (n, n, n), s (n, d_in/n, r), t (n, r, d_out/n) -> (d_in, d_out)."""
    n, block_in, _ = s.shape
    fast = s @ t  # (n, d_in/n, d_out/n): B_i
    H = torch.einsum("ipq,iac->paqc", rule, fast)  # H[(p, a), (q, c)] = sum_i A_i[p, q] B_i[a, c]
    return H.reshape(n * block_in, n * fast.shape[-1])


def phm_linear(
    h: torch.Tensor,
    rule: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor,
    bias: torch.Tensor | None,
    factored: bool = False,
) -> torch.Tensor:
    """h @ H + b for h (..., d_in); `factored` never forms H: Y = sum_i A_i^T (X s_i) t_i with X = h as (n, d_in/n)."""
    if not factored:
        out = h @ phm_weight(rule, s, t)
    else:
        n = rule.shape[0]
        X = h.reshape(*h.shape[:-1], n, h.shape[-1] // n)  # (..., n, d_in/n)
        u = torch.einsum("...pa,iar->...ipr", X, s)  # (..., n_i, n, r)
        v = torch.einsum("ipq,...ipr->...iqr", rule, u)  # (..., n_i, n, r)
        out = torch.einsum("...iqr,irc->...qc", v, t).flatten(-2)  # (..., d_out)
    return out if bias is None else out + bias


def bottleneck_size(d: int, config: CompacterConfig, module_name: str) -> int:
    """m for a site of width d, checked for the PHM divisibility (n | d and n | m)."""
    m = config.bottleneck or d // config.reduction_factor
    if m < 1 or d % config.n or m % config.n:
        raise AdapterError(
            f"compacter: {module_name!r} has width d={d} and bottleneck m={m}, but n={config.n} must divide both; "
            "pick reduction_factor/bottleneck so that m is a multiple of n (e.g. "
            f"bottleneck={max(config.n, m // config.n * config.n)}) "
            "or another n"
        )
    return m


class PHMLinear(nn.Module):
    """One PHM projection's fast weights (s, t) and bias; the slow weights come from the caller."""

    def __init__(self, d_in: int, d_out: int, n: int, rank: int, bias: bool, zero_t: bool, device, dtype) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.empty(n, d_in // n, rank, device=device, dtype=dtype))
        self.t = nn.Parameter(torch.empty(n, rank, d_out // n, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype)) if bias else None
        for i in range(n):  # the official "glorot-uniform" per Kronecker term
            nn.init.xavier_uniform_(self.s[i], gain=math.sqrt(2))
            nn.init.xavier_uniform_(self.t[i], gain=math.sqrt(2))
        if zero_t:
            nn.init.zeros_(self.t)

    def forward(self, h: torch.Tensor, rule: torch.Tensor, factored: bool) -> torch.Tensor:
        bias = None if self.bias is None else cast_like_input(self.bias, h)
        return phm_linear(
            h, cast_like_input(rule, h), cast_like_input(self.s, h), cast_like_input(self.t, h), bias, factored
        )


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------
class CompacterAdapter(Adapter):
    def __init__(self, base: nn.Module, config: CompacterConfig, module_name: str) -> None:
        super().__init__(base, config, module_name)
        self.is_norm = isinstance(base, NormLayer)
        if not self.is_norm and not isinstance(base, nn.Linear):
            raise AdapterError(
                f"compacter: {module_name!r} is a {type(base).__name__}; Compacter adapts nn.Linear sub-layer outputs "
                "(o_proj, down_proj, wo, to_out.0, ...) and normalization layers (a 1-D `weight`)"
            )
        device, dtype = base.weight.device, master_dtype(base.weight)
        if self.is_norm:
            self.norm_delta = nn.Parameter(torch.zeros_like(base.weight, dtype=dtype))
            return
        d = base.out_features
        m = bottleneck_size(d, config, module_name)
        self.activation, self.factored = config.activation, config.factored
        self.down = PHMLinear(d, m, config.n, config.rank, config.bias, False, device, dtype)
        self.up = PHMLinear(m, d, config.n, config.rank, config.bias, config.init == "exact_identity", device, dtype)
        self.phm_rule = nn.Parameter(torch.empty(config.n, config.n, config.n, device=device, dtype=dtype))
        nn.init.normal_(self.phm_rule, std=config.slow_init_std)  # never zero: a shared zero A is a dead start
        self.share_across_layers = config.share_A == "model"
        self._rule = [self.phm_rule]  # a plain list: tied sites hold the owner's Parameter without registering it

    @classmethod
    def tie_shared(cls, adapters: list[Adapter]) -> None:
        sites = [adapter for adapter in adapters if not adapter.is_norm]
        if not sites or not sites[0].share_across_layers:
            return
        owner = sites[0]
        for site in sites[1:]:
            del site.phm_rule  # unregister: the first site owns the one shared A
            site._rule = owner._rule

    def bottleneck(self, y: torch.Tensor) -> torch.Tensor:
        """U(act(D(y))) for the sub-layer output y (..., d)."""
        rule = self._rule[0].to(y.device)
        hidden = ACTIVATIONS[self.activation](self.down(y, rule, self.factored))  # (..., m)
        return self.up(hidden, rule, self.factored)  # (..., d)

    reads_base_output = True

    def output_delta(self, base: nn.Module, x: torch.Tensor, base_output: torch.Tensor) -> torch.Tensor:
        if self.is_norm:
            return self.delta_forward(base, x)
        return self.bottleneck(base_output)

    def delta_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.is_norm:
            return self.bottleneck(base(x))
        # norm_{w + delta}(x) - norm_w(x) == norm_delta(x) - norm_0(x) for any norm affine in its weight.
        delta = cast_like_input(self.norm_delta, x)
        with_delta = torch.func.functional_call(base, {"weight": delta}, (x,))
        return with_delta - torch.func.functional_call(base, {"weight": torch.zeros_like(delta)}, (x,))

    def check_mergeable(self, base: nn.Module) -> None:
        if not self.is_norm:
            raise AdapterError(
                f"compacter: {self.module_name!r} adds a nonlinear bottleneck U(gelu(D(y))) after the layer, which no "
                "weight update reproduces, so it cannot be merged (nor exported as a LoRA). Keep it unmerged; "
                "handle.unload(merge=False) removes it."
            )
        super().check_mergeable(base)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        self.check_mergeable(base)
        return self.norm_delta


def compacter_parameter_count(
    d_model: int,
    num_sites: int,
    n: int = 4,
    rank: int = 1,
    reduction_factor: int = 32,
    bottleneck: int | None = None,
    layernorm_params: int = 0,
    bias: bool = True,
    share_A: str = "model",
) -> int:
    """Trainable parameters from a config alone: sites * (2r(d + m) + m + d) + n^3 (once) + norms."""
    m = bottleneck or d_model // reduction_factor
    per_site = 2 * rank * (d_model + m) + ((m + d_model) if bias else 0)
    slow = n**3 if share_A == "model" else num_sites * n**3
    return num_sites * per_site + slow + layernorm_params


register_method(
    CompacterConfig,
    CompacterAdapter,
    capabilities=Capabilities(
        wraps=(nn.Linear, NormLayer),  # sub-layer output Linears, and the norms the paper trains with them
        mergeable=False,  # the bottleneck U(gelu(D(y))) is nonlinear: no weight update reproduces it
        quantized_base=True,  # it reads the 4-bit layer's output and never its weight
        lora_export=False,  # for the same reason as merging
        identity_at_init=True,  # init="exact_identity": the up-projection starts at zero
        placement="sublayer_outputs",
        # The paper's placement for each trainer's models; targets [] lets the placement choose them.
        # reduction_factor 16 (the paper: 32 on T5-base's d=768): m = d / 16 stays a multiple of n = 4
        # for widths down to 64 (the embedded models) and is 20-256 on SD and Llama widths.
        trainer_defaults={
            "llm": {"placement": "llama", "targets": [], "reduction_factor": 16},
            "diffusion": {"placement": "unet", "targets": [], "reduction_factor": 16},
        },
        note="Compacter has no rank/alpha: size it with n= and reduction_factor= (or bottleneck=).",
    ),
)
