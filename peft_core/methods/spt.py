"""SPT, sensitivity-aware parameter-efficient tuning (He et al., ICCV 2023; spec: shared/specs/spt.md).

Two steps, nothing hidden in attach:

    plan = prepare(model, config, batches, step)     # sensitivities, then the exact-budget plan
    handle = attach(model, config, prepared=plan)    # one adapter per targeted layer, as planned

1. Score: s = sum over batches of (dL_b/dw)^2 for every weight and bias scalar of the targeted
   layers (first-order Taylor: one SGD step on w alone lowers L by ~ eps * g^2).
2. Plan (the spec's §2.5 rule, which meets the budget B *exactly*): walk the scalars by score
   (ties: lower global index first). Unit m (a weight matrix, or a bias vector) turns structured
   when k_m, its number of hits, reaches sigma_m = c_m / alpha: a weight then gets a rank-r LoRA
   (c_m = r (in + out); conv: r (in kh kw + out)), a bias is trained whole (c_m = d, sigma = d / beta).
   Take the longest prefix whose cost is <= B, freeze the structured units, and fill the rest
   with the next-ranked scalars of unstructured units: the total is B.
3. Train: unstructured units hold `values` (k,) over fixed flat `indices` (persistent int buffers,
   never parameters), so an optimizer, weight decay included, can only move the chosen entries;
   the base weight stays frozen and untouched. Structured weights are plain LoRA (scale
   lora_alpha / r; the repo uses scale 1, lora_alpha = r).

Merges are exact: the chosen entries (or the whole weight for LoRA) are backed up and restored
bit for bit. Without bias deltas the whole update is exactly low-rank (a sparse matrix is a LoRA
with a one-hot A over its touched input columns), so it exports to PEFT/diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peft_core.calibration import PerModule, calibration_outputs, call_model
from peft_core.config import AdapterConfig, Capabilities, get_method, register_method
from peft_core.errors import AdapterError
from peft_core.layer import AdaptedModule, Adapter, cast_like_input, has_dense_weight, master_dtype
from peft_core.methods.lora import lora_delta_weight
from peft_core.targets import find_targets


@dataclass
class SptConfig(AdapterConfig):
    """budget: trainable scalars, exactly: a count if >= 1, else a fraction of the scored scalars
    (every weight and bias of the targeted layers); alpha: a matrix turns LoRA at c_m / alpha hits
    (>= 1); beta: a bias is trained whole at d / beta hits (with structured_vector); r: LoRA rank;
    lora_alpha: LoRA scale numerator (None: r, i.e. scale 1 as in the authors' code);
    n_batches: scoring batches (the repo: 16 of 32)."""

    method: ClassVar[str] = "spt"

    budget: float = 0.002
    alpha: float = 10.0
    beta: float = 5.0
    r: int = 8
    lora_alpha: float | None = None
    structured_vector: bool = True
    n_batches: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget <= 0 or (self.budget >= 1 and self.budget != int(self.budget)):
            raise AdapterError(f"spt: budget must be a count >= 1 or a fraction in (0, 1), got {self.budget}")
        if self.alpha < 1:
            raise AdapterError(
                f"spt: alpha must be >= 1 (below it the cost of a plan can fall as it grows), got {self.alpha}"
            )
        if self.beta <= 0 or self.r < 1 or self.n_batches < 1:
            raise AdapterError(
                f"spt: beta > 0, r >= 1 and n_batches >= 1 are required, got {self.beta}, {self.r}, {self.n_batches}"
            )

    @property
    def scaling(self) -> float:
        return (self.r if self.lora_alpha is None else self.lora_alpha) / self.r


# ---------------------------------------------------------------------------------------------
# prepare's result: a plain mapping module name -> SptModulePlan.
# ---------------------------------------------------------------------------------------------
@dataclass
class SptModulePlan:
    """What one layer trains: a rank-`lora_rank` LoRA (weight_indices None) or the sparse entries
    `weight_indices` (flat, sorted); its bias whole (`bias_full`), at `bias_indices`, or not at all (None)."""

    weight_indices: torch.Tensor | None = None
    lora_rank: int = 0
    bias_indices: torch.Tensor | None = None
    bias_full: bool = False


@dataclass
class SptPlan(PerModule[SptModulePlan]):
    """prepare()'s result: module name -> SptModulePlan, plus the budget it meets exactly."""

    modules: dict[str, SptModulePlan]
    budget: int
    scored: int

    def entries(self) -> dict[str, SptModulePlan]:
        return self.modules


@dataclass(frozen=True)
class Unit:
    """One scored tensor: `threshold` hits turn it structured (inf: never), which then costs `cost`."""

    key: str
    numel: int
    threshold: float
    cost: int


# ---------------------------------------------------------------------------------------------
# The math: pure tensor functions.
# ---------------------------------------------------------------------------------------------
def plan_budget(scores: list[torch.Tensor], units: list[Unit], budget: int) -> tuple[list[bool], list[torch.Tensor]]:
    """The exact-budget plan (spec §2.5): (structured per unit, chosen flat indices per unit).

    The chosen entries of unstructured units plus the costs of structured ones add up to `budget`.
    """
    flat = torch.cat([s.reshape(-1).float().cpu() for s in scores])  # (N,)
    numels = torch.tensor([u.numel for u in units])
    order = torch.sort(flat, descending=True, stable=True).indices  # ties: lower global index first
    unit_of = torch.repeat_interleave(torch.arange(len(units)), numels)[order]  # (N,) unit of each ranked scalar
    by_unit = torch.sort(unit_of, stable=True)
    starts = torch.cumsum(numels, 0) - numels
    hit_number = torch.empty_like(order)
    hit_number[by_unit.indices] = torch.arange(flat.numel()) - starts[by_unit.values] + 1  # 1-based k_m
    never = flat.numel() + 1
    threshold = torch.tensor([never if math.isinf(u.threshold) else max(1, math.ceil(u.threshold)) for u in units])
    cost = torch.tensor([u.cost for u in units])
    t, c = threshold[unit_of], cost[unit_of]
    # Cost added by each ranked scalar: 1 while its unit is unstructured, the rest of c_m when it flips, 0 after.
    added = torch.where(hit_number < t, 1, torch.where(hit_number == t, c - (t - 1), 0))
    total = torch.cumsum(added, 0)
    if budget > flat.numel():
        raise AdapterError(
            f"spt: a budget of {budget} exceeds the {flat.numel()} scored scalars; lower it or add targets"
        )
    prefix = int(torch.searchsorted(total, torch.tensor([budget]), right=True))  # longest prefix costing <= budget
    flips = torch.nonzero(hit_number == t).flatten()  # ranked positions where a unit turns structured
    while True:
        flipped = torch.zeros(len(units), dtype=torch.bool)
        flipped[unit_of[flips[flips < prefix]]] = True
        spent = int(total[prefix - 1]) if prefix else 0
        free = ~flipped[unit_of]
        in_prefix = torch.zeros(flat.numel(), dtype=torch.bool)
        in_prefix[:prefix] = True
        fill = torch.nonzero(free & ~in_prefix).flatten()[: budget - spent]  # next-ranked, no further flips
        if fill.numel() == budget - spent:
            break
        # Too few unstructured scalars left to fill the rest exactly (tiny layers): drop the last flip.
        prefix = int(flips[flips < prefix].max())
    chosen = torch.cat([torch.nonzero(free & in_prefix).flatten(), fill])  # ranked positions
    global_index = order[chosen]
    owner = unit_of[chosen]
    per_unit = [(global_index[owner == i] - starts[i]).sort().values for i in range(len(units))]
    return flipped.tolist(), per_unit


def sparse_dense(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense tensor of `shape` holding `values` at flat `indices`, zeros elsewhere (differentiable)."""
    dense = torch.zeros(math.prod(shape), dtype=values.dtype, device=values.device)
    return dense.index_put((indices.long(),), values).reshape(shape)


def sparse_linear_delta(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, out_features: int
) -> torch.Tensor:
    """x @ dW^T for dW sparse at (rows, cols), without a dense dW: y[..., rows] += x[..., cols] * values.

    Autograd keeps x[..., cols] (T x k): dValues = sum_t g[t, rows] x[t, cols].
    """
    contributions = x.index_select(-1, cols) * values  # (..., k)
    delta = torch.zeros(*x.shape[:-1], out_features, dtype=contributions.dtype, device=x.device)
    return delta.index_add(-1, rows, contributions)


# ---------------------------------------------------------------------------------------------
# prepare: sensitivities, then the plan.
# ---------------------------------------------------------------------------------------------
def sensitivity_scores(
    model: nn.Module, config: SptConfig, batches: Iterable[Any], step: Callable[[nn.Module, Any], Any] | None = None
) -> dict[str, torch.Tensor]:
    """ "<layer>.weight"/"<layer>.bias" -> sum over (at most n_batches) batches of grad^2, float32.

    step(model, batch) returns the loss (default: model(batch).loss or a scalar output). Runs in
    eval mode (no dropout: plans are reproducible). Each gradient is squared into its score by a
    post-accumulate hook and dropped at once, so no dense .grad of the model is ever held; every
    requires_grad flag, .grad and train/eval mode is restored afterwards.
    """
    tensors = _scored_tensors(model, config)
    scores = {key: torch.zeros_like(p, dtype=torch.float32) for key, p in tensors.items()}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    modes = {module: module.training for module in model.modules()}
    hooks = []

    def square_into(key: str) -> Callable:
        def hook(parameter: torch.Tensor) -> None:
            scores[key].add_(parameter.grad.float().square())
            parameter.grad = None

        return hook

    try:
        for parameter, _, _ in saved:
            parameter.requires_grad_(False)
            parameter.grad = None
        for key, parameter in tensors.items():
            parameter.requires_grad_(True)
            hooks.append(parameter.register_post_accumulate_grad_hook(square_into(key)))
        model.eval()
        outputs = calibration_outputs(model, batches, step or _loss_step, "spt")
        for index, loss in enumerate(islice(outputs, config.n_batches)):
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise AdapterError(
                    f"spt.prepare: step must return the scalar training loss; batch {index} gave {type(loss).__name__}"
                )
            if not torch.isfinite(loss):
                raise AdapterError(
                    f"spt.prepare: the loss of calibration batch {index} is {loss.item()}; check the data"
                )
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        for parameter, requires_grad, grad in saved:
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad
        for module, training in modes.items():
            module.train(training)
    return scores


def prepare(
    model: nn.Module,
    config: SptConfig,
    batches: Iterable[Any] | None = None,
    step: Callable[[nn.Module, Any], Any] | None = None,
    *,
    scores: Mapping[str, torch.Tensor] | None = None,
) -> SptPlan:
    """Sensitivities (from `batches`, or given `scores`) and the exact-budget plan for attach(prepared=)."""
    layers = _target_layers(model, config)
    if scores is None:
        if batches is None:
            raise AdapterError("spt.prepare needs calibration `batches` (and a `step` returning the loss) or `scores`")
        scores = sensitivity_scores(model, config, batches, step)
    units, unit_scores = [], []
    for name, layer in layers.items():
        weight = layer.weight
        can_lora = not (isinstance(layer, nn.Conv2d) and layer.groups != 1)
        lora_cost = config.r * (weight[0].numel() + weight.shape[0])
        units.append(
            Unit(f"{name}.weight", weight.numel(), lora_cost / config.alpha if can_lora else math.inf, lora_cost)
        )
        if layer.bias is not None:
            d = layer.bias.numel()
            units.append(Unit(f"{name}.bias", d, d / config.beta if config.structured_vector else math.inf, d))
    for unit in units:
        if unit.key not in scores or scores[unit.key].numel() != unit.numel:
            raise AdapterError(
                f"spt: the scores have no {unit.numel}-entry tensor for {unit.key!r}; score with the same targets"
            )
        unit_scores.append(scores[unit.key])
    scored = sum(u.numel for u in units)
    budget = int(config.budget) if config.budget >= 1 else int(config.budget * scored)
    if budget < 1:
        raise AdapterError(f"spt: budget {config.budget} of {scored} scored scalars is less than one; raise it")
    flipped, chosen = plan_budget(unit_scores, units, budget)
    picked = {u.key: (f, c) for u, f, c in zip(units, flipped, chosen)}
    modules = {}
    for name, layer in layers.items():
        weight_flipped, weight_chosen = picked[f"{name}.weight"]
        plan = SptModulePlan(None if weight_flipped else weight_chosen, config.r if weight_flipped else 0)
        if layer.bias is not None:
            bias_flipped, bias_chosen = picked[f"{name}.bias"]
            plan.bias_full, plan.bias_indices = bias_flipped, None if bias_flipped else bias_chosen
        modules[name] = plan
    return SptPlan(modules, budget, scored)


def _loss_step(model: nn.Module, batch: Any) -> torch.Tensor:
    output = call_model(model, batch)
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, torch.Tensor) and output.numel() == 1:
        loss = output
    if loss is None:
        raise AdapterError(
            "spt.prepare: the model's output has no loss; pass step=lambda model, batch: <the training loss>"
        )
    return loss


def _target_layers(model: nn.Module, config: SptConfig) -> dict[str, nn.Module]:
    layers = {}
    for name in find_targets(model, config.targets, config.exclude, get_method(config.method).capabilities.wraps):
        module = model.get_submodule(name)
        layer = module.base_layer if isinstance(module, AdaptedModule) else module
        if not has_dense_weight(layer):
            raise AdapterError(
                f"spt: {name!r} has a {type(layer.weight).__name__} weight; only dense float weights "
                "can take a sparse delta"
            )
        layers[name] = layer
    return layers


def _scored_tensors(model: nn.Module, config: SptConfig) -> dict[str, nn.Parameter]:
    tensors = {}
    for name, layer in _target_layers(model, config).items():
        tensors[f"{name}.weight"] = layer.weight
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias
    return tensors


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------
class SptAdapter(Adapter):
    @classmethod
    def check_fits(cls, base: nn.Module, config: SptConfig, module_name: str) -> None:
        """No rank bound: r is the rank of the LoRAs the budget plan may pick, and the budget bounds what is built
        (a LoRA whose r exceeds a small layer's rank costs more than that layer's sparse entries, so the plan
        takes those instead)."""

    def __init__(self, base: nn.Module, config: SptConfig, module_name: str, prepared: SptModulePlan) -> None:
        super().__init__(base, config, module_name)
        self.is_conv = isinstance(base, nn.Conv2d)
        self.weight_shape = tuple(base.weight.shape)
        device, dtype = base.weight.device, master_dtype(base.weight)
        self.scaling, self.lora = config.scaling, prepared.weight_indices is None
        if self.lora:
            if self.is_conv and base.groups != 1:
                raise AdapterError(f"spt: {module_name!r} is a grouped conv; it cannot take a LoRA")
            r = prepared.lora_rank
            a_shape = (r, *self.weight_shape[1:]) if self.is_conv else (r, self.weight_shape[1])
            b_shape = (self.weight_shape[0], r, 1, 1) if self.is_conv else (self.weight_shape[0], r)
            self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
            self.lora_B = nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            indices = self._indices(prepared.weight_indices, base.weight.numel(), module_name, "weight")
            self.register_buffer("weight_indices", indices.to(device))
            if indices.numel():
                self.weight_values = nn.Parameter(torch.zeros(indices.numel(), device=device, dtype=dtype))
            if not self.is_conv:  # the (row, col) pairs the index-add path reads
                self.register_buffer(
                    "rows", indices.long().div(self.weight_shape[1], rounding_mode="floor").to(device), persistent=False
                )
                self.register_buffer("cols", (indices.long() % self.weight_shape[1]).to(device), persistent=False)
        self.bias_full = bool(prepared.bias_full)
        if (prepared.bias_full or prepared.bias_indices is not None) and base.bias is None:
            raise AdapterError(f"spt: the plan trains {module_name!r}'s bias, but the layer has none")
        if self.bias_full:
            self.bias_delta = nn.Parameter(torch.zeros(base.bias.shape, device=device, dtype=dtype))
        elif base.bias is not None:
            bias_indices = (
                prepared.bias_indices if prepared.bias_indices is not None else torch.zeros(0, dtype=torch.long)
            )
            bias_indices = self._indices(bias_indices, base.bias.numel(), module_name, "bias")
            self.register_buffer("bias_indices", bias_indices.to(device))
            if bias_indices.numel():
                self.bias_values = nn.Parameter(torch.zeros(bias_indices.numel(), device=device, dtype=dtype))

    @staticmethod
    def _indices(indices: torch.Tensor, numel: int, module_name: str, what: str) -> torch.Tensor:
        indices = indices.reshape(-1).long()
        if indices.numel() and (
            int(indices.min()) < 0 or int(indices.max()) >= numel or not bool((indices[1:] > indices[:-1]).all())
        ):
            raise AdapterError(f"spt: {module_name!r}'s {what} indices must be sorted, distinct and below {numel}")
        return indices.to(torch.int32 if numel < 2**31 else torch.int64)

    @classmethod
    def prepared_from_state(cls, state: dict[str, torch.Tensor], base: nn.Module, config: SptConfig) -> SptModulePlan:
        """The checkpoint's own structure: LoRA if it has lora_A, else its sparse indices."""
        if "lora_A" in state:
            plan = SptModulePlan(None, int(state["lora_A"].shape[0]))
        elif "weight_indices" in state:
            plan = SptModulePlan(state["weight_indices"])
        else:
            raise AdapterError(
                f"the checkpoint has neither lora_A nor weight_indices for an spt layer ({sorted(state)})"
            )
        plan.bias_full = "bias_delta" in state
        plan.bias_indices = state.get("bias_indices")
        return plan

    # -- the update -------------------------------------------------------------------------
    def _values(self, name: str) -> torch.Tensor | None:
        return getattr(self, name, None)

    def delta_forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.lora:
            A, B = cast_like_input(self.lora_A, x), cast_like_input(self.lora_B, x)
            if self.is_conv:
                delta = F.conv2d(F.conv2d(x, A, None, base.stride, base.padding, base.dilation), B) * self.scaling
            else:
                delta = F.linear(F.linear(x, A), B) * self.scaling
        elif self._values("weight_values") is None:
            delta = None
        elif self.is_conv:
            weight = cast_like_input(sparse_dense(self.weight_indices, self.weight_values, self.weight_shape), x)
            delta = F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
        elif self.weight_values.numel() < self.weight_shape[1]:  # k < in: gather beats a dense dW
            delta = sparse_linear_delta(
                x, self.rows, self.cols, cast_like_input(self.weight_values, x), self.weight_shape[0]
            )
        else:
            delta = F.linear(
                x, cast_like_input(sparse_dense(self.weight_indices, self.weight_values, self.weight_shape), x)
            )
        bias = self.bias_update()
        if bias is not None:
            bias = cast_like_input(bias, x)
            bias = bias[:, None, None] if self.is_conv else bias  # broadcasts over the output
            delta = bias if delta is None else delta + bias
        if delta is None:  # nothing chosen in this layer
            return x.new_zeros((*x.shape[:-1], self.weight_shape[0]) if not self.is_conv else ())
        return delta

    def bias_update(self) -> torch.Tensor | None:
        if self.bias_full:
            return self.bias_delta
        if self._values("bias_values") is not None:
            return sparse_dense(self.bias_indices, self.bias_values, (self.weight_shape[0],))
        return None

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        if self.lora:
            return lora_delta_weight(self.lora_A, self.lora_B, self.scaling)
        values = self._values("weight_values")
        if values is None:
            return torch.zeros(self.weight_shape, dtype=master_dtype(base.weight), device=base.weight.device)
        return sparse_dense(self.weight_indices, values, self.weight_shape)

    # -- merge: back up exactly what is overwritten -----------------------------------------
    def merge_into(self, base: nn.Module, weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not has_dense_weight(base) or not base.weight.is_contiguous():
            return super().merge_into(base, weight), self._merge_bias(base, weight)
        with torch.no_grad():
            if self.lora:
                backup = super().merge_into(base, weight)
            else:
                flat, indices = base.weight.data.view(-1), self.weight_indices.long()
                backup = flat[indices].clone()
                if indices.numel():
                    flat[indices] = (backup.to(self.weight_values.dtype) + weight * self.weight_values).to(flat.dtype)
        return backup, self._merge_bias(base, weight)

    def _merge_bias(self, base: nn.Module, weight: float) -> torch.Tensor | None:
        update = self.bias_update()
        if update is None:
            return None
        with torch.no_grad():
            backup = base.bias.detach().clone()
            base.bias.copy_((backup.to(update.dtype) + weight * update).to(backup.dtype))
        return backup

    def unmerge_from(self, base: nn.Module, backup: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        weight_backup, bias_backup = backup
        with torch.no_grad():
            if weight_backup.shape == base.weight.shape:
                base.weight.copy_(weight_backup)
            else:
                base.weight.data.view(-1)[self.weight_indices.long()] = weight_backup
            if bias_backup is not None:
                base.bias.copy_(bias_backup)

    # -- export -----------------------------------------------------------------------------
    def lora_factors(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """LoRA units as they are; sparse units as a one-hot A over their touched input positions
        and B = those columns of dW (exact). None if the bias is trained: a LoRA has no bias."""
        if self.bias_update() is not None:
            return None
        if self.lora:
            return self.lora_A.detach().clone(), self.lora_B.detach() * self.scaling
        dense = self.delta_weight(base).detach().reshape(self.weight_shape[0], -1)  # (out, in*kh*kw)
        positions = torch.unique(self.weight_indices.long() % dense.shape[1])
        if positions.numel() == 0:
            positions = torch.zeros(1, dtype=torch.long, device=dense.device)  # rank 1, all zeros
        A = torch.zeros(positions.numel(), dense.shape[1], dtype=dense.dtype, device=dense.device)
        A[torch.arange(positions.numel(), device=dense.device), positions] = 1.0
        B = dense[:, positions]  # (out, u)
        if self.is_conv:
            return A.reshape(-1, *self.weight_shape[1:]), B[:, :, None, None]
        return A, B


register_method(
    SptConfig,
    SptAdapter,
    prepare=prepare,
    capabilities=Capabilities(
        wraps=(nn.Linear, nn.Conv2d),
        mergeable=True,
        quantized_base=False,  # its sensitivities and sparse deltas need a dense float weight
        lora_export=True,  # LoRA units as they are, sparse ones as one-hot factors; not when it trained a bias
        identity_at_init=True,
        # Its `alpha` is the LoRA/sparse switch threshold, not a scale: the trainers set only the rank.
        trainer_defaults={"llm": {"r": 8}, "diffusion": {"r": 16}},
        note="SPT first measures gradient sensitivities on calibration data (the first training rows), then attaches.",
    ),
)
