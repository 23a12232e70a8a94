"""The attention regime report: how far each head sits from the low-rank regime of Hu et al. (ICLR 2025).

    report = attention_regime_report(model, batches)       # hooks on every attention module
    print(report.format_table()); report.save_json("report.json"); report.save_heatmap("heatmap.png")

For every attention module (Llama-style `q_proj`/`k_proj`, diffusers `Attention` with `to_q`/`to_k`
and `heads`) and every head, over the batches given:

- Gamma_Q = max |sqrt(beta) Q| and Gamma_K (entries of the queries and keys that enter the softmax,
  beta its scale; after RoPE when the module receives `position_embeddings`), and their p99.9;
- the same maxima for the frozen projection alone and for the adapter branch alone (the branch is
  computed from the adapter's exact low-rank factors, or its dense delta, on the projection's input;
  frozen = output - branch, so a fused path's resident state never leaks into "frozen");
- rho = max(Gamma_Q, Gamma_K) / sqrt(ln L_k) (L_k: number of keys), and the label below;
- the maximum logit and the rows' logit range (max - min over the keys a row sees).

rho is the paper's norm condition made scale-free: its fast (L^{1+o(1)}) gradients need entries
o(sqrt(log L)), and nothing beats L^{2-d} once they reach ~sqrt(log L). The label thresholds come from
the fp64 probe in `gradients.py` (spec §2.3: the gradient error of polynomial and low-rank surrogates
of the attention matrix is small at rho <= 0.5 and large from rho >= 1.5; the transition is sharp
near rho = 1). A label is a statement about this head's attention matrix at these inputs, not a proof.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_core.analysis.thresholds import EXACT_MIN_RHO, LABELS, LOW_RANK_MAX_RHO
from peft_core.errors import AdapterError
from peft_core.io import write_json
from peft_core.layer import AdaptedModule
from peft_core.model import call_model

# -- documented constants -----------------------------------------------------------------------
PERCENTILE = 0.999  # the robust companion of the max (p99.9 of |sqrt(beta) Q| entries, per head)
# p99.9 comes from a per-head histogram of log10 |entry| (bounded memory over any number of batches):
# bins are 10^(8/2048) ~ 0.9% wide, so p99.9 is exact to within 1%; entries below 1e-4 share one bin.
HISTOGRAM_BINS = 2048
HISTOGRAM_LOG10_RANGE = (-4.0, 4.0)
MASKED_LOGIT = -1e3  # additive-mask entries below this count as masked out
REPORT_FORMAT_VERSION = 1


def rho(gamma: float, key_length: int) -> float:
    """Gamma / sqrt(ln L_k); 0 for a single key (a softmax over one key is exactly 1)."""
    return 0.0 if key_length < 2 else gamma / math.sqrt(math.log(key_length))


def gamma_at_rho(key_length: int, value: float = 1.0) -> float:
    """The entry size at which rho = value: sqrt(ln 77) = 2.08 for cross-attention on 77 tokens."""
    return value * math.sqrt(math.log(max(key_length, 2)))


def regime_label(value: float) -> str:
    if value <= LOW_RANK_MAX_RHO:
        return LABELS[0]
    return LABELS[1] if value <= EXACT_MIN_RHO else LABELS[2]


# -- which modules are attention ----------------------------------------------------------------
@dataclass(frozen=True)
class AttentionSite:
    """One attention module: where its queries and keys come from and how they split into heads."""

    name: str  # module name in the model
    kind: str  # "self" or "cross"
    num_heads: int
    num_kv_heads: int  # < num_heads for grouped-query attention
    head_dim: int
    scale: float  # beta: the softmax scale (logits = beta Q K^T)
    causal: bool
    query: str = "q_proj"  # attribute names of the projections on the module
    key: str = "k_proj"


def find_attention_sites(model: nn.Module, config: Any = None) -> list[AttentionSite]:
    """Every attention module of `model`, in model order.

    Recognised: Llama-style self-attention (`q_proj`, `k_proj`; heads from the module or from
    `config`, e.g. `model.config`, with `num_attention_heads`, `num_key_value_heads`, `head_dim`) and
    diffusers `Attention` (`to_q`, `to_k`, `heads`, `scale`, `is_cross_attention`). Other layouts:
    build `AttentionSite`s by hand and pass them as `sites=`.
    """
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, AdaptedModule):
            continue
        if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            sites.append(_llama_site(name, module, config))
        elif hasattr(module, "to_q") and hasattr(module, "to_k") and hasattr(module, "heads"):
            sites.append(_diffusers_site(name, module))
    return sites


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _out_features(module: nn.Module) -> int:
    base = module.base_layer if isinstance(module, AdaptedModule) else module
    features = getattr(base, "out_features", None)
    if features is None:
        raise AdapterError(f"cannot read the output size of {type(base).__name__}; pass sites= by hand")
    return int(features)


def _llama_site(name: str, module: nn.Module, config: Any) -> AttentionSite:
    config = _first(config, getattr(module, "config", None))
    q_features, k_features = _out_features(module.q_proj), _out_features(module.k_proj)
    num_heads = _first(
        getattr(module, "num_heads", None),
        getattr(module, "num_attention_heads", None),
        getattr(config, "num_attention_heads", None),
    )
    head_dim = _first(getattr(module, "head_dim", None), getattr(config, "head_dim", None))
    if head_dim is None and num_heads is None:
        raise AdapterError(
            f"attention module {name!r} ({type(module).__name__}) says neither its number of heads nor its head "
            "size; pass the model config (config=model.config) or sites= by hand"
        )
    head_dim = int(head_dim or q_features // num_heads)
    num_heads = q_features // head_dim
    scale = _first(getattr(module, "scaling", None), getattr(module, "scale", None), head_dim**-0.5)
    return AttentionSite(
        name=name,
        kind="cross" if getattr(module, "is_cross_attention", False) else "self",
        num_heads=num_heads,
        num_kv_heads=k_features // head_dim,
        head_dim=head_dim,
        scale=float(scale),
        causal=bool(getattr(module, "is_causal", True)),
    )


def _diffusers_site(name: str, module: nn.Module) -> AttentionSite:
    heads = int(module.heads)
    head_dim = _out_features(module.to_q) // heads
    return AttentionSite(
        name=name,
        kind="cross" if getattr(module, "is_cross_attention", False) else "self",
        num_heads=heads,
        num_kv_heads=_out_features(module.to_k) // head_dim,
        head_dim=head_dim,
        scale=float(getattr(module, "scale", head_dim**-0.5)),
        causal=bool(getattr(module, "is_causal", False)),
        query="to_q",
        key="to_k",
    )


# -- the adapter branch of one projection -------------------------------------------------------
class _Unknown:
    """The branch of an adapter with neither exact low-rank factors nor a dense delta."""


UNKNOWN = _Unknown()


def adapter_branch(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None | _Unknown:
    """sum_i weight_i * delta_i(x) over the enabled adapters (merged ones included) of a projection,
    in float32: None when the projection has no adapter, UNKNOWN when an adapter's update is not a
    (low-rank or dense) weight delta."""
    if not isinstance(module, AdaptedModule):
        return None
    branch = None
    x = x.float()
    for name, adapter in module.adapters.items():
        if name in module.disabled:
            continue
        weight = module.adapter_weights[name]
        factors = adapter.lora_factors(module.base_layer)
        if factors is not None and factors[0].dim() == 2:
            A, B = factors  # delta_weight == B @ A: (out, r) (r, in)
            delta = F.linear(F.linear(x, A.float().to(x.device)), B.float().to(x.device))
        else:
            try:
                delta = F.linear(x, adapter.delta_weight(module.base_layer).float().to(x.device))
            except AdapterError:
                return UNKNOWN
        branch = weight * delta if branch is None else branch + weight * delta
    return branch


# -- per-call statistics -------------------------------------------------------------------------
def _split_heads(projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, L, H*d) -> (B, H, L, d); a 2-D (L, H*d) input is one sequence."""
    if projected.dim() == 2:
        projected = projected.unsqueeze(0)
    batch, length = projected.shape[0], projected.shape[-2]
    return projected.reshape(batch, length, -1, head_dim).transpose(1, 2)


def _apply_rope(x: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
    """HF Llama's rotary embedding (rotate_half) with cos/sin (B, L, r), on the first r <= d dims."""
    cos, sin = position_embeddings
    rotary = cos.shape[-1]
    if rotary > x.shape[-1] or cos.shape[-2] != x.shape[-2]:
        return x
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)  # (B, 1, L, r)
    rotated, rest = x[..., :rotary], x[..., rotary:]
    first, second = rotated[..., : rotary // 2], rotated[..., rotary // 2 :]
    rotated = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, rest), dim=-1)


def _allowed_keys(
    mask: torch.Tensor | None, causal: bool, batch: int, q_len: int, k_len: int, device
) -> torch.Tensor | None:
    """Boolean (B or 1, 1 or H, Lq, Lk) of the keys each query sees; None when it sees them all."""
    allowed = None
    if mask is not None and mask.dim() >= 2 and mask.shape[-1] == k_len:
        keep = mask if mask.dtype == torch.bool else mask > MASKED_LOGIT
        if keep.dim() == 2:  # (B, Lk) key padding
            keep = keep[:, None, None, :]
        elif keep.dim() == 3:  # (B, 1 or Lq, Lk)
            keep = keep[:, None, :, :]
        allowed = keep.to(device)
    if causal and q_len == k_len:
        tri = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()[None, None]
        allowed = tri if allowed is None else allowed & tri
    return allowed


@dataclass
class _SiteStats:
    """Running per-head statistics of one attention site over every call seen."""

    site: AttentionSite
    calls: int = 0
    key_length: int = 0
    gamma: dict[str, torch.Tensor] = field(default_factory=dict)  # "q"/"k" x part -> per-head running max
    histogram: dict[str, torch.Tensor] = field(default_factory=dict)  # "q"/"k" -> (H, bins) counts
    rho: dict[str, torch.Tensor] = field(default_factory=dict)  # "total"/"frozen" -> per-query-head max
    max_logit: torch.Tensor | None = None
    max_row_range: torch.Tensor | None = None
    row_range_sum: torch.Tensor | None = None
    rows: int = 0
    adapter: str = "none"  # "none" / "known" / "unknown"

    def _max(self, store: dict, key: str, value: torch.Tensor) -> None:
        store[key] = value if key not in store else torch.maximum(store[key], value)

    def add(self, q: torch.Tensor, k: torch.Tensor, q_branch: Any, k_branch: Any, allowed: torch.Tensor | None) -> None:
        """q (B, H, Lq, d), k (B, Hkv, Lk, d): sqrt(beta)-scaled, float32; branches the same or None/UNKNOWN."""
        heads = q.shape[1]
        group = heads // k.shape[1]
        self.calls += 1
        self.key_length = max(self.key_length, k.shape[2])
        known = all(isinstance(branch, torch.Tensor) for branch in (q_branch, k_branch) if branch is not None)
        has_branch = q_branch is not None or k_branch is not None
        if has_branch:
            self.adapter = "known" if known and self.adapter != "unknown" else "unknown"
        per_head = {}
        for name, total, branch in (("q", q, q_branch), ("k", k, k_branch)):
            magnitude = total.abs()
            per_head[f"{name}_total"] = magnitude.amax(dim=(0, 2, 3))
            self._histogram(name, magnitude)
            if isinstance(branch, torch.Tensor):
                per_head[f"{name}_adapter"] = branch.abs().amax(dim=(0, 2, 3))
                per_head[f"{name}_frozen"] = (total - branch).abs().amax(dim=(0, 2, 3))
            elif branch is None:  # no adapter on this projection: all of it is frozen
                per_head[f"{name}_adapter"] = torch.zeros_like(per_head[f"{name}_total"])
                per_head[f"{name}_frozen"] = per_head[f"{name}_total"]
            else:  # UNKNOWN: an adapter whose update is not a weight delta; the split cannot be measured
                per_head[f"{name}_adapter"] = torch.full_like(per_head[f"{name}_total"], math.nan)
                per_head[f"{name}_frozen"] = torch.full_like(per_head[f"{name}_total"], math.nan)
        for key, value in per_head.items():
            self._max(self.gamma, key, value.cpu())
        kv_of_head = torch.arange(heads) // group
        denominator = math.sqrt(math.log(k.shape[2])) if k.shape[2] >= 2 else math.inf
        for part in ("total", "frozen"):
            worst = torch.maximum(per_head[f"q_{part}"].cpu(), per_head[f"k_{part}"].cpu()[kv_of_head])
            self._max(self.rho, part, worst / denominator)
        self._logits(q, k, group, allowed)

    def _histogram(self, name: str, magnitude: torch.Tensor) -> None:
        heads = magnitude.shape[1]
        low, high = HISTOGRAM_LOG10_RANGE
        log = torch.log10(magnitude.transpose(0, 1).reshape(heads, -1).clamp_min(10**low))
        bins = ((log - low) / (high - low) * HISTOGRAM_BINS).long().clamp_(0, HISTOGRAM_BINS - 1)
        bins += torch.arange(heads, device=bins.device)[:, None] * HISTOGRAM_BINS
        counts = torch.bincount(bins.flatten(), minlength=heads * HISTOGRAM_BINS).reshape(heads, HISTOGRAM_BINS).cpu()
        self.histogram[name] = counts if name not in self.histogram else self.histogram[name] + counts

    def _logits(self, q: torch.Tensor, k: torch.Tensor, group: int, allowed: torch.Tensor | None) -> None:
        heads = q.shape[1]
        max_logit, max_range, range_sum = torch.empty(heads), torch.empty(heads), torch.empty(heads)
        rows = 0
        for head in range(heads):  # one (B, Lq, Lk) logit block at a time
            logits = q[:, head] @ k[:, head // group].transpose(-1, -2)
            if allowed is not None:
                keep = allowed[:, min(head, allowed.shape[1] - 1)].expand_as(logits)
                highest = logits.masked_fill(~keep, -math.inf).amax(dim=-1)
                lowest = logits.masked_fill(~keep, math.inf).amin(dim=-1)
                seen = keep.any(dim=-1)
            else:
                highest, lowest = logits.amax(dim=-1), logits.amin(dim=-1)
                seen = torch.ones_like(highest, dtype=torch.bool)
            row_range = (highest - lowest)[seen]
            max_logit[head] = highest[seen].max()
            max_range[head] = row_range.max()
            range_sum[head] = row_range.double().sum()
            rows = row_range.numel()
        self.max_logit = max_logit if self.max_logit is None else torch.maximum(self.max_logit, max_logit)
        self.max_row_range = max_range if self.max_row_range is None else torch.maximum(self.max_row_range, max_range)
        self.row_range_sum = range_sum if self.row_range_sum is None else self.row_range_sum + range_sum
        self.rows += rows

    def percentile(self, name: str, fraction: float = PERCENTILE) -> torch.Tensor:
        """Per head: the upper edge of the histogram bin holding the `fraction` quantile (capped at the max)."""
        counts = self.histogram[name].double()
        cumulative = counts.cumsum(dim=1)
        target = fraction * cumulative[:, -1:]
        index = (cumulative < target).sum(dim=1).clamp(max=HISTOGRAM_BINS - 1)
        low, high = HISTOGRAM_LOG10_RANGE
        upper = 10 ** (low + (index.double() + 1) * (high - low) / HISTOGRAM_BINS)
        return torch.minimum(upper.float(), self.gamma[f"{name}_total"])


# -- the report ----------------------------------------------------------------------------------
@dataclass
class HeadStats:
    """One head of one attention module. Gammas are max |sqrt(beta) x| entries; None: not measured."""

    site: str
    kind: str
    layer: int  # index of the site in model order
    head: int
    kv_head: int
    key_length: int
    gamma_q: float
    gamma_k: float
    gamma_q_p999: float
    gamma_k_p999: float
    gamma_q_frozen: float | None
    gamma_k_frozen: float | None
    gamma_q_adapter: float | None
    gamma_k_adapter: float | None
    rho: float
    rho_frozen: float | None
    max_logit: float
    max_row_range: float
    mean_row_range: float
    label: str
    label_frozen: str | None

    @property
    def crossed(self) -> bool:
        """The adapter moved this head to a costlier regime than its frozen projections alone."""
        return self.label_frozen is not None and LABELS.index(self.label) > LABELS.index(self.label_frozen)


@dataclass
class RegimeReport:
    heads: list[HeadStats]
    sites: list[AttentionSite]
    batches: int
    adapter: str  # "none", "known" (every branch measured) or "unknown" (some adapter has no weight delta)
    metadata: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {label: sum(head.label == label for head in self.heads) for label in LABELS}

    def summary(self) -> dict[str, Any]:
        worst = max(self.heads, key=lambda head: head.rho) if self.heads else None
        return {
            "heads": len(self.heads),
            **self.counts(),
            "max_rho": worst.rho if worst else None,
            "max_rho_head": f"{worst.site}#{worst.head}" if worst else None,
            "crossed_by_adapter": sum(head.crossed for head in self.heads),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": REPORT_FORMAT_VERSION,
            "thresholds": {
                "low_rank_max_rho": LOW_RANK_MAX_RHO,
                "exact_min_rho": EXACT_MIN_RHO,
                "labels": list(LABELS),
                "percentile": PERCENTILE,
            },
            "metadata": self.metadata,
            "batches": self.batches,
            "adapter": self.adapter,
            "summary": self.summary(),
            "sites": [asdict(site) for site in self.sites],
            "heads": [{**asdict(head), "crossed": head.crossed} for head in self.heads],
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        write_json(path, _finite(self.to_dict()))
        return path

    def save_heatmap(self, path: str | os.PathLike, value: str = "rho") -> Path:
        from peft_core.analysis.heatmap import render_heatmap

        return render_heatmap(self, path, value=value)

    def format_table(self) -> str:
        """The per-head table the CLI prints (ASCII; '-' where a quantity was not measured)."""
        columns = [
            ("site", 0),
            ("kind", 0),
            ("head", 0),
            ("L_k", 0),
            ("G_Q", 2),
            ("G_K", 2),
            ("p999_Q", 2),
            ("p999_K", 2),
            ("G_Q_base", 2),
            ("G_K_base", 2),
            ("G_dQ", 3),
            ("G_dK", 3),
            ("rho", 2),
            ("rho_base", 2),
            ("max_logit", 2),
            ("label", 0),
        ]
        keys = [
            "site",
            "kind",
            "head",
            "key_length",
            "gamma_q",
            "gamma_k",
            "gamma_q_p999",
            "gamma_k_p999",
            "gamma_q_frozen",
            "gamma_k_frozen",
            "gamma_q_adapter",
            "gamma_k_adapter",
            "rho",
            "rho_frozen",
            "max_logit",
            "label",
        ]
        rows = []
        for head in self.heads:
            cells = []
            for (_, digits), key in zip(columns, keys):
                value = getattr(head, key)
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    cells.append("-")
                elif isinstance(value, float):
                    cells.append(f"{value:.{digits}f}")
                else:
                    cells.append(str(value))
            if head.crossed:
                cells[-1] += " (adapter)"
            rows.append(cells)
        header = [name for name, _ in columns]
        widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(widths[i]) if i < 2 or i == len(header) - 1 else cell.rjust(widths[i])
                for i, cell in enumerate(line)
            )
            for line in [header, *rows]
        ]
        counts = self.counts()
        lines.append(
            f"{len(self.heads)} heads over {self.batches} batches: "
            + ", ".join(f"{counts[label]} {label}" for label in LABELS)
            + f"; rho = max(G_Q, G_K) / sqrt(ln L_k); low-rank <= {LOW_RANK_MAX_RHO} < transition <= "
            f"{EXACT_MIN_RHO} < exact"
        )
        crossed = sum(head.crossed for head in self.heads)
        if crossed:
            lines.append(f"{crossed} heads were moved to a costlier regime by the adapter (marked '(adapter)')")
        return "\n".join(lines)


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


# -- hooks ---------------------------------------------------------------------------------------
class RegimeRecorder:
    """Forward hooks on every site's attention module and its query/key projections.

        with RegimeRecorder(model) as recorder, torch.no_grad():
            model(**batch)
        report = recorder.report(batches=1)

    Each attention call is measured once (`record_calls_per_site` limits how many per site; the
    training tracker uses 1, so a recompute under gradient checkpointing is not counted twice).
    Hooks are installed on entering and removed on leaving, so adapters attached or loaded before
    entering are seen.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: list[AttentionSite] | None = None,
        config: Any = None,
        record_calls_per_site: int | None = None,
    ) -> None:
        self.model = model
        self.sites = sites if sites is not None else find_attention_sites(model, config)
        if not self.sites:
            raise AdapterError(
                f"no attention modules found in {type(model).__name__} (looked for q_proj/k_proj and diffusers "
                "to_q/to_k/heads); pass sites=[AttentionSite(...)] by hand"
            )
        self.limit = record_calls_per_site
        self.stats = {site.name: _SiteStats(site) for site in self.sites}
        self._handles: list[Any] = []
        self._pending: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> RegimeRecorder:
        for site in self.sites:
            attention = self.model.get_submodule(site.name)
            self._handles.append(attention.register_forward_pre_hook(self._begin(site), with_kwargs=True))
            for role, attribute in (("q", site.query), ("k", site.key)):
                projection = getattr(attention, attribute)
                self._handles.append(projection.register_forward_hook(self._capture(site, role, projection)))
            self._handles.append(attention.register_forward_hook(self._finish(site)))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def _begin(self, site: AttentionSite) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            mask = kwargs.get("attention_mask")
            self._pending[site.name] = {
                "position_embeddings": kwargs.get("position_embeddings"),
                "mask": mask if isinstance(mask, torch.Tensor) else None,
            }

        return hook

    def _capture(self, site: AttentionSite, role: str, projection: nn.Module) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            pending = self._pending.get(site.name)
            if pending is None or not args or not isinstance(output, torch.Tensor):
                return
            with torch.no_grad():
                pending[role] = (output.detach(), adapter_branch(projection, args[0].detach()))

        return hook

    def _finish(self, site: AttentionSite) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            pending = self._pending.pop(site.name, None)
            stats = self.stats[site.name]
            if pending is None or "q" not in pending or "k" not in pending:
                return
            if self.limit is not None and stats.calls >= self.limit:
                return
            with torch.no_grad():
                self._measure(site, stats, pending)

        return hook

    def _measure(self, site: AttentionSite, stats: _SiteStats, pending: dict[str, Any]) -> None:
        root_beta = math.sqrt(site.scale)
        position_embeddings = pending["position_embeddings"]
        parts = {}
        for role in ("q", "k"):
            output, branch = pending[role]
            total = _split_heads(output.float(), site.head_dim) * root_beta
            if isinstance(branch, torch.Tensor):
                branch = _split_heads(branch, site.head_dim) * root_beta
            if isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2:
                total = _apply_rope(total, position_embeddings)
                if isinstance(branch, torch.Tensor):
                    branch = _apply_rope(branch, position_embeddings)
            parts[role] = (total, branch)
        (q, q_branch), (k, k_branch) = parts["q"], parts["k"]
        allowed = _allowed_keys(pending["mask"], site.causal, q.shape[0], q.shape[2], k.shape[2], q.device)
        stats.add(q, k, q_branch, k_branch, allowed)

    def reset(self) -> None:
        self.stats = {site.name: _SiteStats(site) for site in self.sites}

    def report(self, batches: int = 0, metadata: Mapping[str, Any] | None = None) -> RegimeReport:
        heads, adapters = [], set()
        for layer, site in enumerate(self.sites):
            stats = self.stats[site.name]
            if stats.calls == 0:
                continue
            adapters.add(stats.adapter)
            p999_q, p999_k = stats.percentile("q"), stats.percentile("k")
            group = site.num_heads // max(site.num_kv_heads, 1)
            has_adapter = stats.adapter != "none"
            for head in range(stats.gamma["q_total"].numel()):
                kv = head // group

                def value(key: str, index: int, stats: _SiteStats = stats) -> float:
                    return float(stats.gamma[key][index])

                rho_frozen = float(stats.rho["frozen"][head]) if has_adapter else None
                heads.append(
                    HeadStats(
                        site=site.name,
                        kind=site.kind,
                        layer=layer,
                        head=head,
                        kv_head=kv,
                        key_length=stats.key_length,
                        gamma_q=value("q_total", head),
                        gamma_k=value("k_total", kv),
                        gamma_q_p999=float(p999_q[head]),
                        gamma_k_p999=float(p999_k[kv]),
                        gamma_q_frozen=value("q_frozen", head) if has_adapter else value("q_total", head),
                        gamma_k_frozen=value("k_frozen", kv) if has_adapter else value("k_total", kv),
                        gamma_q_adapter=value("q_adapter", head) if has_adapter else None,
                        gamma_k_adapter=value("k_adapter", kv) if has_adapter else None,
                        rho=float(stats.rho["total"][head]),
                        rho_frozen=rho_frozen,
                        max_logit=float(stats.max_logit[head]),
                        max_row_range=float(stats.max_row_range[head]),
                        mean_row_range=float(stats.row_range_sum[head]) / max(stats.rows, 1),
                        label=regime_label(float(stats.rho["total"][head])),
                        label_frozen=None if rho_frozen is None or math.isnan(rho_frozen) else regime_label(rho_frozen),
                    )
                )
        adapter = "unknown" if "unknown" in adapters else "known" if "known" in adapters else "none"
        return RegimeReport(
            heads=heads, sites=list(self.sites), batches=batches, adapter=adapter, metadata=dict(metadata or {})
        )


def attention_regime_report(
    model: nn.Module,
    batches: Iterable[Any],
    step: Callable[[nn.Module, Any], Any] | None = None,
    sites: list[AttentionSite] | None = None,
    config: Any = None,
    metadata: Mapping[str, Any] | None = None,
) -> RegimeReport:
    """Run `model` on `batches` under no_grad with hooks on every attention module; return the report.

    step(model, batch) runs one batch (default: model(**batch) for a dict, model(*batch) for a
    tuple, else model(batch)); a diffusion pipeline passes a step that runs a few denoising calls.
    config: the model config, for attention modules that do not say their head count.
    """
    recorder = RegimeRecorder(model, sites=sites, config=config)
    count = 0
    with recorder, torch.no_grad():
        for index, batch in enumerate(batches):
            try:
                (step or call_model)(model, batch)
            except (RuntimeError, ValueError, IndexError, TypeError) as error:
                raise AdapterError(f"attention_regime_report: the model failed on batch {index}: {error}") from error
            count += 1
    if count == 0:
        raise AdapterError("attention_regime_report: no batches; pass at least one")
    return recorder.report(batches=count, metadata=metadata)


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """A saved report.json as a plain dict (the UI reads this)."""
    return json.loads(Path(path).read_text())
