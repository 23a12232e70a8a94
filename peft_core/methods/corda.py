"""CorDA, context-oriented decomposition adaptation (Yang et al., NeurIPS 2024; spec: shared/specs/corda.md).

A data-driven LoRA *initialisation*; training is plain LoRA. Per target layer (W: out x in):

    C  = (1/n) sum_i X_i^T X_i / m_i^2          input covariance, m_i = signed max of sample i
    C' = C + lam * mean(diag C) * I             damped until it is safely invertible (lam from 0.01, doubling)
    U S Vh = svd(W C')                          so W = U S (Vh C'^-1) exactly
    r components (IPM: largest, KPM: smallest) -> A = sqrt(S_r/s) Vt_r^T,  B = U_r sqrt(S_r/s)

Two steps, nothing hidden in attach:

    prepared = prepare(model, config, batches)          # hooks, covariances, decompositions
    handle = attach(model, config, prepared=prepared)   # builds A, B from `prepared`

The residual, honestly: HF PEFT overwrites the base weight with W - s B0 A0, so disabling the
adapter no longer gives the base model and the adapter alone cannot rebuild it. Here the base
weight is never touched: the adapter keeps its initial factors (A0, B0) as frozen buffers and adds

    delta(x) = s B A x - s B0 A0 x

which is exactly 0 at init (the same computation twice), gives LoRA's gradients for A and B, merges
and unmerges like any adapter, and is exactly the rank-2r LoRA [A; A0], [sB, -sB0] on the
untouched base (what PEFT's own CorDA-to-LoRA conversion writes). `residual_weights` and
`export_with_residual` give PEFT's other form (rank-r LoRA + residual base weights) where needed.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peft_core.calibration import PerModule, calibration_outputs
from peft_core.config import Capabilities, RankConfig, get_method, register_method
from peft_core.errors import AdapterError
from peft_core.io import read_safetensors, write_safetensors
from peft_core.layer import AdaptedModule, Adapter, cast_like_input, has_dense_weight, master_dtype
from peft_core.lora_format import check_task_type, export_dtype, write_peft_lora
from peft_core.methods.lora import lora_delta_weight
from peft_core.targets import find_targets

MODES = ("ipm", "kpm")
MAX_DOUBLINGS = 40  # lam = 0.01 * 2^40 ~ 1e10 * mean(diag C): no covariance needs more


@dataclass
class CordaConfig(RankConfig):
    """r: rank (the paper uses r = alpha = 128); alpha: s = alpha / r (alpha / sqrt(r) with use_rslora);
    mode: "ipm" (instruction-previewed: the adapter takes the r largest components of W C) or
    "kpm" (knowledge-preserved: the r smallest, so the knowledge-heavy ones stay frozen);
    damping: the first lam of C + lam * mean(diag C) * I (doubled until C' is safely invertible)."""

    method: ClassVar[str] = "corda"

    r: int = 128
    alpha: float = 128.0
    use_rslora: bool = False
    mode: str = "ipm"
    damping: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise AdapterError(f"corda: mode must be 'ipm' or 'kpm', got {self.mode!r}")
        if self.damping <= 0:
            raise AdapterError(f"corda: damping must be > 0, got {self.damping}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# ---------------------------------------------------------------------------------------------
# prepare's results: plain objects, savable as safetensors (never pickle).
# ---------------------------------------------------------------------------------------------
@dataclass
class Covariances(PerModule[torch.Tensor]):
    """Module name -> C (in x in, float32, already divided by the sample count), with the counts.

    Independent of r and mode: collect once, decompose for any rank (`prepare(..., covariances=)`).
    """

    matrices: dict[str, torch.Tensor]
    samples: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def entries(self) -> dict[str, torch.Tensor]:
        return self.matrices

    def save(self, path: str | os.PathLike) -> Path:
        counts = json.dumps({"samples": self.samples, "tokens": self.tokens})
        write_safetensors(path, self.matrices, metadata={"format": "peft_core.corda.covariances", "counts": counts})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Covariances:
        counts = json.loads(_metadata(path, "peft_core.corda.covariances")["counts"])
        return cls(read_safetensors(path), counts["samples"], counts["tokens"])


@dataclass
class CordaEigens:
    """One layer's r selected components: W ~ U diag(S) V^T on them. U (out, r), S (r,), V (in*kh*kw, r).

    V = C'^-1 Vh_r^T is not orthonormal (V^T C' is). `damping` is the lam that C' used.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    mode: str
    damping: float = 0.0


@dataclass
class CordaPrepared(PerModule[CordaEigens]):
    """prepare()'s result: module name -> CordaEigens; the input of attach(..., prepared=).

    save/load is CorDA's eigens cache (much smaller than the covariances: 2 r (out + in) per layer).
    """

    eigens: dict[str, CordaEigens]

    def entries(self) -> dict[str, CordaEigens]:
        return self.eigens

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {f"{name}.{key}": getattr(e, key) for name, e in self.eigens.items() for key in ("U", "S", "V")}
        layers = {name: {"mode": e.mode, "damping": e.damping} for name, e in self.eigens.items()}
        write_safetensors(path, tensors, metadata={"format": "peft_core.corda.eigens", "layers": json.dumps(layers)})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CordaPrepared:
        layers = json.loads(_metadata(path, "peft_core.corda.eigens")["layers"])
        tensors = read_safetensors(path)
        return cls(
            {name: CordaEigens(*(tensors[f"{name}.{k}"] for k in "USV"), **info) for name, info in layers.items()}
        )


def _metadata(path: str | os.PathLike, expected: str) -> dict[str, str]:
    from safetensors import safe_open

    read_safetensors(path)  # the readable-file checks and their messages
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if metadata.get("format") != expected:
        raise AdapterError(f"{path} is not a {expected} file (format {metadata.get('format')!r})")
    return metadata


# ---------------------------------------------------------------------------------------------
# The math: pure tensor functions.
# ---------------------------------------------------------------------------------------------
def layer_inputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows W multiplies, per sample: (samples, tokens, in) for Linear, (N, L, in*kh*kw) for Conv2d.

    A Linear input with <= 2 dims is one sample (HF PEFT's convention: one call, one sample);
    otherwise dim 0 is the batch.
    """
    if isinstance(layer, nn.Conv2d):
        x = x if x.dim() == 4 else x.unsqueeze(0)
        patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, in*kh*kw, L)
        return patches.transpose(1, 2)
    if x.dim() <= 2:
        return x.reshape(1, -1, x.shape[-1])
    return x.reshape(x.shape[0], -1, x.shape[-1])


def accumulate_covariance(gram: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """gram += sum_i X_i^T X_i / m_i^2 in place (X_i = rows[i], m_i its signed max); returns m (samples,).

    The signed max, not max |x|, as HF PEFT and the authors' code do. No host sync: the caller
    checks the returned maxima (0 or non-finite is an error) once at the end.
    """
    x = rows.to(gram.dtype)
    maxima = x.amax(dim=(1, 2))  # (samples,)
    x = x / maxima.abs()[:, None, None]
    flat = x.reshape(-1, x.shape[-1])  # (samples * tokens, in)
    gram.addmm_(flat.mT, flat)
    return maxima


def damped(
    covariance: torch.Tensor, damping: float, peft_compatible: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(C', factor, lam): C' = C + lam mean(diag C) I with the smallest lam = damping * 2^k that passes.

    Default: the Cholesky factor must exist (one d^3/3 factorisation per try); factor = L.
    peft_compatible: HF PEFT's rule, ||C' inv(C') - I||_F < 0.05; factor = inv(C').
    """
    n = covariance.shape[0]
    eye = torch.eye(n, dtype=covariance.dtype, device=covariance.device)
    diagonal_mean = covariance.diagonal().mean()
    lam = damping
    for _ in range(MAX_DOUBLINGS):
        damped_covariance = covariance + eye * diagonal_mean * lam
        if peft_compatible:
            inverse = torch.linalg.inv(damped_covariance)
            if torch.dist(damped_covariance @ inverse, eye).item() < 0.05:
                return damped_covariance, inverse, lam
        else:
            factor, info = torch.linalg.cholesky_ex(damped_covariance)
            if info.item() == 0:
                return damped_covariance, factor, lam
        lam *= 2
    raise AdapterError(f"corda: the covariance stays singular up to damping {lam:g}; is it all zeros?")


def decompose(
    weight: torch.Tensor,
    covariance: torch.Tensor,
    r: int,
    mode: str,
    damping: float = 0.01,
    peft_compatible: bool = False,
) -> CordaEigens:
    """The r components CorDA keeps for W (out x in, already 2-D) under covariance C (in x in)."""
    damped_covariance, factor, lam = damped(covariance, damping, peft_compatible)
    U, S, Vh = torch.linalg.svd(weight @ damped_covariance, full_matrices=False)  # (out, k), (k,), (k, in)
    selected = slice(0, r) if mode == "ipm" else slice(S.shape[0] - r, S.shape[0])
    U_r, S_r, Vh_r = U[:, selected], S[selected], Vh[selected]
    if peft_compatible:
        V_r = (Vh_r @ factor).mT  # (in, r); PEFT forms all of Vh inv(C') and then crops
    else:
        V_r = torch.cholesky_solve(Vh_r.mT, factor)  # C'^-1 Vh_r^T: O(in^2 r), not O(in^3)
    for label, tensor in (("U", U_r), ("S", S_r), ("V", V_r)):
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"corda: the decomposition produced non-finite values in {label}")
    return CordaEigens(U_r.contiguous(), S_r.contiguous(), V_r.contiguous(), mode, lam)


def corda_factors(eigens: CordaEigens, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (sqrt(S/s) V^T, U sqrt(S/s)), so s B A = U diag(S) V^T (HF PEFT's corda_init)."""
    root = (eigens.S / scaling).sqrt()  # (r,)
    return eigens.V.mT * root[:, None], eigens.U * root[None, :]


# ---------------------------------------------------------------------------------------------
# prepare: covariances from data, then one decomposition per layer.
# ---------------------------------------------------------------------------------------------
def collect_covariances(
    model: nn.Module, config: CordaConfig, batches: Iterable[Any], step: Callable[[nn.Module, Any], Any] | None = None
) -> Covariances:
    """Run the model on `batches` (under no_grad, in eval mode) and return each target's covariance.

    step(model, batch) feeds one batch (default: model(batch) / model(**batch)); a diffusion
    caller's step runs denoising calls over several timesteps. Each sample (dim 0 of a >2-D input;
    one call for a 2-D input) is normalised by its own signed max, so batching does not change C.
    The model is never modified; hooks are always removed.
    """
    layers = _target_layers(model, config)
    grams: dict[str, torch.Tensor] = {}
    maxima: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    tokens = dict.fromkeys(layers, 0)

    def hook(name: str, layer: nn.Module) -> Callable:
        def record(_module: nn.Module, args: tuple) -> None:
            rows = layer_inputs(layer, args[0].detach())  # (samples, tokens, d)
            if name not in grams:
                dtype = torch.promote_types(layer.weight.dtype, torch.float32)
                grams[name] = torch.zeros(rows.shape[-1], rows.shape[-1], dtype=dtype, device=rows.device)
            maxima[name].append(accumulate_covariance(grams[name], rows))
            tokens[name] += rows.shape[0] * rows.shape[1]

        return record

    modes = {module: module.training for module in model.modules()}
    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name, layer)) for name, layer in layers.items()]
    try:
        model.eval()
        with torch.no_grad():
            for _ in calibration_outputs(model, batches, step, "corda"):
                pass
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)

    samples = {}
    for name in layers:
        if name not in grams:
            raise AdapterError(
                f"corda: layer {name!r} was never called by the calibration batches; check `targets` and `step`"
            )
        seen = torch.cat(maxima[name])
        if not bool(((seen != 0) & torch.isfinite(seen)).all() and torch.isfinite(grams[name]).all()):
            raise AdapterError(
                f"corda: layer {name!r} saw an all-zero or non-finite input in the calibration data "
                "(its per-sample max is 0, NaN or inf); check the data and the model's dtype"
            )
        samples[name] = seen.numel()
        grams[name] /= samples[name]
    return Covariances(grams, samples, tokens)


def prepare(
    model: nn.Module,
    config: CordaConfig,
    batches: Iterable[Any] | None = None,
    step: Callable[[nn.Module, Any], Any] | None = None,
    *,
    covariances: Covariances | Mapping[str, torch.Tensor] | None = None,
    peft_compatible: bool = False,
) -> CordaPrepared:
    """Covariances (from `batches`, or reused) and each target's decomposition, for attach(prepared=).

    peft_compatible: HF PEFT's damping rule and its V = (Vh inv(C'))^T (a parity mode; slower).
    Decomposition runs in float32 (float64 for float64 weights) on each weight's device.
    """
    layers = _target_layers(model, config)
    if covariances is None:
        if batches is None:
            raise AdapterError("corda.prepare needs calibration `batches` or saved `covariances`")
        covariances = collect_covariances(model, config, batches, step)
    eigens = {}
    for name, layer in layers.items():
        weight = _weight_2d(layer)  # (out, in*kh*kw)
        if name not in covariances:
            raise AdapterError(
                f"corda: the covariances have no entry for layer {name!r}; collect them with the same targets"
            )
        covariance = covariances[name].to(weight.device, weight.dtype)
        if covariance.shape != (weight.shape[1], weight.shape[1]):
            raise AdapterError(
                f"corda: layer {name!r} needs a {weight.shape[1]}x{weight.shape[1]} covariance, got "
                f"{tuple(covariance.shape)}"
            )
        tokens = getattr(covariances, "tokens", {}).get(name)
        if tokens is not None and tokens < weight.shape[1]:
            warnings.warn(
                f"corda: layer {name!r} saw {tokens} tokens for {weight.shape[1]} input features; C is rank-deficient",
                stacklevel=2,
            )
        try:
            eigens[name] = decompose(weight, covariance, config.r, config.mode, config.damping, peft_compatible)
        except AdapterError as error:
            raise AdapterError(f"layer {name!r}: {error}") from None
        if eigens[name].damping > config.damping:
            warnings.warn(
                f"corda: layer {name!r} needed damping {eigens[name].damping:g}; C is nearly singular", stacklevel=2
            )
    return CordaPrepared(eigens)


def _target_layers(model: nn.Module, config: CordaConfig) -> dict[str, nn.Module]:
    """Target name -> the layer whose weight CorDA decomposes (checked before any data is run)."""
    layers = {}
    for name in find_targets(model, config.targets, config.exclude, get_method(config.method).capabilities.wraps):
        module = model.get_submodule(name)
        layer = module.base_layer if isinstance(module, AdaptedModule) else module
        _check_layer(name, layer, config.r)
        layers[name] = layer
    return layers


def _check_layer(name: str, layer: nn.Module, r: int) -> None:
    if not has_dense_weight(layer) or layer.weight.dtype not in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
    ):
        raise AdapterError(
            f"corda: {name!r} has a {layer.weight.dtype} {type(layer.weight).__name__} weight; CorDA needs a float "
            "weight (decompose first, quantize the model after)"
        )
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
        raise AdapterError(
            f"corda: {name!r} is a conv with groups={layer.groups}, "
            f"padding_mode={layer.padding_mode!r}; only groups=1 with zero padding is supported"
        )
    rank = min(layer.weight.shape[0], layer.weight[0].numel())
    if r > rank:
        raise AdapterError(f"corda: r={r} is larger than {name!r}'s rank bound {rank}; lower r or exclude the layer")


def _weight_2d(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight.detach()
    return weight.reshape(weight.shape[0], -1).to(torch.promote_types(weight.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------
class CordaAdapter(Adapter):
    def __init__(self, base: nn.Module, config: CordaConfig, module_name: str, prepared: CordaEigens) -> None:
        super().__init__(base, config, module_name)
        _check_layer(module_name, base, config.r)
        out_features, in_flat = base.weight.shape[0], base.weight[0].numel()
        if prepared.mode != config.mode or tuple(prepared.S.shape) != (config.r,):
            raise AdapterError(
                f"corda: {module_name!r} was prepared with mode={prepared.mode!r}, "
                f"r={prepared.S.shape[0]} but the config "
                f"has mode={config.mode!r}, r={config.r}; run prepare with this config"
            )
        if prepared.U.shape != (out_features, config.r) or prepared.V.shape != (in_flat, config.r):
            raise AdapterError(
                f"corda: {module_name!r}'s prepared components do not fit its {tuple(base.weight.shape)} weight"
            )
        self.scaling, self.is_conv = config.scaling, isinstance(base, nn.Conv2d)
        device, dtype = base.weight.device, master_dtype(base.weight)
        A, B = corda_factors(prepared, self.scaling)  # (r, in*kh*kw), (out, r)
        if self.is_conv:
            A, B = A.reshape(config.r, *base.weight.shape[1:]), B[:, :, None, None]
        self.lora_A = nn.Parameter(A.to(device, dtype).contiguous())
        self.lora_B = nn.Parameter(B.to(device, dtype).contiguous())
        # The initial factors, frozen: subtracting their product keeps the base weight untouched.
        self.register_buffer("initial_A", self.lora_A.detach().clone())
        self.register_buffer("initial_B", self.lora_B.detach().clone())

    @classmethod
    def prepared_from_state(cls, state: dict[str, torch.Tensor], base: nn.Module, config: CordaConfig) -> CordaEigens:
        """Zero components of the config's shapes: the checkpoint's A, B, A0, B0 replace them."""
        out_features, in_flat = base.weight.shape[0], base.weight[0].numel()
        zeros = torch.zeros
        return CordaEigens(zeros(out_features, config.r), zeros(config.r), zeros(in_flat, config.r), config.mode)

    def _low_rank(self, base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        A, B = cast_like_input(A, x), cast_like_input(B, x)
        if self.is_conv:
            return F.conv2d(F.conv2d(x, A, None, base.stride, base.padding, base.dilation), B)
        return F.linear(F.linear(x, A), B)

    def delta_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Two rank-r products, not one rank-2r one: at init they are bitwise equal, so delta == 0.
        trained = self._low_rank(base, x, self.lora_A, self.lora_B)
        return (trained - self._low_rank(base, x, self.initial_A, self.initial_B)) * self.scaling

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return lora_delta_weight(self.lora_A, self.lora_B, self.scaling) - lora_delta_weight(
            self.initial_A, self.initial_B, self.scaling
        )

    def lora_factors(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank-2r LoRA on the untouched base: [A; A0] and [s B, -s B0]."""
        A = torch.cat([self.lora_A.detach(), self.initial_A], dim=0)
        B = torch.cat([self.lora_B.detach(), -self.initial_B], dim=1) * self.scaling
        return A, B


# ---------------------------------------------------------------------------------------------
# PEFT's other export form: rank-r LoRA + residual base weights.
# ---------------------------------------------------------------------------------------------
def residual_weights(handle: Any, name: str = "default") -> dict[str, torch.Tensor]:
    """`<module>.weight` -> W - s B0 A0 in the base dtype: the base model a rank-r CorDA LoRA (A, s B) sits on."""
    if handle.configs.get(name) is None or handle.configs[name].method != "corda":
        raise AdapterError(f"no CorDA adapter named {name!r}; this model has {handle.adapter_names}")
    residuals = {}
    for module_name, wrapper in handle.wrappers(name):
        adapter, base = wrapper.adapters[name], wrapper.base_layer
        wrapper.release_fused()
        initial = lora_delta_weight(adapter.initial_A, adapter.initial_B, adapter.scaling)
        weight = base.weight.detach()
        residuals[f"{module_name}.weight"] = (weight.to(initial.dtype) - initial).to(weight.dtype)
    return residuals


def export_with_residual(handle: Any, directory: str | os.PathLike, name: str = "default", **options: Any) -> Path:
    """A PEFT-format rank-r LoRA (A, s B) plus `residual_model.safetensors` (module.weight -> W - s B0 A0).

    Load the residual weights into the base model (load_state_dict(strict=False) on the
    unwrapped names), then the LoRA with PeftModel: that is HF PEFT's CorDA model. Prefer
    `handle.export("peft")` (rank-2r, exact on the untouched base) unless you need this form.
    """
    unknown = sorted(set(options) - {"task_type", "base_model_name_or_path", "dtype"})
    if unknown:
        raise AdapterError(
            f"export_with_residual has no option {unknown[0]!r}; its options: task_type, base_model_name_or_path, dtype"
        )
    check_task_type(options.get("task_type"))  # refused before anything is written
    export_dtype(options.get("dtype", torch.float32))
    factors = {}
    for module_name, wrapper in handle.wrappers(name):
        adapter = wrapper.adapters[name]
        factors[module_name] = (
            adapter.lora_A.detach().float().cpu(),
            (adapter.lora_B.detach() * adapter.scaling).float().cpu(),
        )
    directory = Path(directory)
    write_safetensors(
        directory / "residual_model.safetensors", residual_weights(handle, name), metadata={"format": "pt"}
    )
    return write_peft_lora(directory, handle.model, factors, **options)


register_method(
    CordaConfig,
    CordaAdapter,
    prepare=prepare,
    capabilities=Capabilities(
        wraps=(nn.Linear, nn.Conv2d),
        mergeable=True,
        quantized_base=False,  # it decomposes the dense weight (decompose first, quantize after)
        lora_export=True,  # rank 2r on the untouched base ([A; A0], [sB, -sB0]); export_with_residual: rank r
        identity_at_init=True,  # s (B A - B0 A0): the trained factors start equal to the frozen ones
        trainer_defaults={"llm": {"r": 8, "alpha": 16.0}, "diffusion": {"r": 16, "alpha": 16.0}},
        note="CorDA first runs a covariance step on calibration data (the first training rows), then attaches.",
    ),
)
