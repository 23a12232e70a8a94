"""LoRAM, train small and infer large (Zhang et al., ICLR 2025; spec: shared/specs/loram.md).

LoRAM is not a new adapter: it is a prepare step and a recovery step around LoRA or PaCA.

    small, index_map = prune(model, 0.85, "random")        # 1. prune (a copy; inplace=True to save memory)
    (optional) align `small` by a short continual pre-training, then quantize_nf4(small)  # QLoRAM
    handle = attach(small, LoraConfig(targets=DECODER_PROJECTIONS, r=8, alpha=16))   # 2. train small
    recover(handle, index_map, "out/adapter")              # 3. scatter the factors to the full shapes
    load(model, "out/adapter"); handle.merge()             # 4. infer large, merged or not

Pruning works on any Llama-family model by structure (no transformers import): a *decoder layer*
is a module whose children include an attention module (q_proj, k_proj, v_proj, o_proj Linears)
and an MLP (gate_proj, up_proj, down_proj). Head counts come from the projections' shapes and the
attention module's `head_dim` (or the `head_dim` argument).

Strategies (paper names in brackets):
- "random" [Rand] and "norm" [Stru]: structured. Whole KV groups with their G = Hq/Hkv query heads
  and MLP channels are removed, in layers [keep_first, L - keep_last): Hkv' = Hkv - floor(Hkv*rho),
  Hq' = G*Hkv', I' = I - ceil(I*rho) (exact rationals). "norm" keeps the groups / channels with the
  largest squared L2 norm of all weights they own (q/k/v rows, o columns; gate/up rows, down
  columns): LLM-Pruner's vector-wise importance without its calibration gradients.
- "semi" [Semi]: 2:4 sparsity on every decoder projection (the 2 smallest |w| of every 4
  consecutive inputs are zeroed; rho is 0.5). "unstructured" [Unst]: the floor(rho*n) smallest |w|
  of each projection are zeroed. Both use magnitude, not SparseGPT's Hessian update, and keep shapes.

Recovery ("zeroA" in the official code): rows of B (q/k/v/gate/up) and columns of A (o/down) go back
to their full positions, zeros elsewhere, so dW_full[kept_rows, kept_cols] = dW_small and 0 elsewhere;
the scale is unchanged. PaCA: delta's rows are scattered the same way and its column ids of o/down
are mapped through the kept columns. Everything else (unpruned layers, lm_head) is copied. Each method
declares its own mapping (`Capabilities.loram_recovery`: lora.recover_lora, paca.recover_paca).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from peft_core.config import AdapterConfig, get_method, methods_with
from peft_core.errors import AdapterError
from peft_core.io import read_json, read_safetensors, write_json, write_safetensors
from peft_core.saved import read_adapter_config, read_adapter_weights, write_adapter

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
DECODER_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
STRATEGIES = ("random", "norm", "semi", "unstructured")
INDEX_MAP_NAME = "loram_index_map.safetensors"
PLAN_NAME = "loram_plan.json"


# ---------------------------------------------------------------------------------------------
# The index map: which rows / columns of each projection the small model kept.
# ---------------------------------------------------------------------------------------------
@dataclass
class PrunedModule:
    full_shape: tuple[int, int]  # (out, in) of the original Linear
    kept_rows: torch.Tensor | None = None  # sorted output indices kept (None: all)
    kept_cols: torch.Tensor | None = None  # sorted input indices kept (None: all)


@dataclass
class IndexMap:
    """What `prune` did, enough to recover an adapter trained on the small model (saved next to it)."""

    strategy: str
    ratio: float
    modules: dict[str, PrunedModule] = field(default_factory=dict)  # every projection prune touched
    kept_kv_heads: dict[str, list[int]] = field(default_factory=dict)  # attention module -> kept KV groups

    @property
    def structured(self) -> bool:
        return self.strategy in ("random", "norm")

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        tensors = {}
        for name, entry in self.modules.items():
            for key in ("kept_rows", "kept_cols"):
                if getattr(entry, key) is not None:
                    tensors[f"{name}.{key}"] = getattr(entry, key)
        write_safetensors(directory / INDEX_MAP_NAME, tensors, metadata={"format": "peft_core.loram"})
        plan = {
            "strategy": self.strategy,
            "ratio": self.ratio,
            "full_shapes": {name: list(entry.full_shape) for name, entry in self.modules.items()},
            "kept_kv_heads": self.kept_kv_heads,
        }
        write_json(directory / PLAN_NAME, plan)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> IndexMap:
        plan = read_json(Path(directory) / PLAN_NAME)
        tensors = read_safetensors(Path(directory) / INDEX_MAP_NAME)
        modules = {
            name: PrunedModule(tuple(shape), tensors.get(f"{name}.kept_rows"), tensors.get(f"{name}.kept_cols"))
            for name, shape in plan["full_shapes"].items()
        }
        return cls(plan["strategy"], plan["ratio"], modules, plan["kept_kv_heads"])


# ---------------------------------------------------------------------------------------------
# Counting: exact rational rounding, shared by prune and the storage calculator.
# ---------------------------------------------------------------------------------------------
def _fraction(ratio: float) -> Fraction:
    if not 0.0 <= ratio < 1.0:
        raise AdapterError(f"loram: the pruning ratio must be in [0, 1), got {ratio}")
    return Fraction(str(ratio))  # 0.85 is 17/20, not the binary float just below it


def kept_counts(num_heads: int, num_kv_heads: int, intermediate_size: int, ratio: float) -> tuple[int, int, int]:
    """(Hq', Hkv', I') after structured pruning at `ratio` (the official scripts' rounding)."""
    rho = _fraction(ratio)
    if num_heads % num_kv_heads:
        raise AdapterError(f"loram: {num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    kv_kept = num_kv_heads - math.floor(num_kv_heads * rho)
    return kv_kept * (num_heads // num_kv_heads), kv_kept, intermediate_size - math.ceil(intermediate_size * rho)


# ---------------------------------------------------------------------------------------------
# Pruning.
# ---------------------------------------------------------------------------------------------
@dataclass
class DecoderLayer:
    attention: str  # module names
    mlp: str
    head_dim: int


def find_decoder_layers(model: nn.Module, head_dim: int | None = None) -> list[DecoderLayer]:
    """Decoder layers in model order, found by structure (see the module docstring)."""
    layers = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        attention = next(
            (
                c
                for c, m in children.items()
                if all(isinstance(getattr(m, p, None), nn.Linear) for p in ATTENTION_PROJECTIONS)
            ),
            None,
        )
        mlp = next(
            (
                c
                for c, m in children.items()
                if all(isinstance(getattr(m, p, None), nn.Linear) for p in MLP_PROJECTIONS)
            ),
            None,
        )
        if attention is None or mlp is None:
            continue
        dim = head_dim or getattr(children[attention], "head_dim", None)
        if not dim:
            raise AdapterError(f"loram: {name}.{attention} has no `head_dim` attribute; pass head_dim= to prune")
        prefix = f"{name}." if name else ""
        layers.append(DecoderLayer(prefix + attention, prefix + mlp, int(dim)))
    if not layers:
        raise AdapterError(
            "loram: found no decoder layer (a module with an attention child holding q_proj/k_proj/v_proj/o_proj "
            "and an MLP child holding gate_proj/up_proj/down_proj); LoRAM supports Llama-family models"
        )
    return layers


def _group_norms(
    model: nn.Module, layer: DecoderLayer, num_kv_heads: int, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 norm of every weight each KV group / MLP channel owns: (Hkv,), (I,)."""
    attention, mlp = model.get_submodule(layer.attention), model.get_submodule(layer.mlp)
    hd = layer.head_dim

    def rows(weight: torch.Tensor, width: int) -> torch.Tensor:  # (out, in) -> per block of `width` rows
        return weight.detach().float().square().sum(1).reshape(-1, width).sum(1)

    heads = (
        rows(attention.q_proj.weight, group * hd)
        + rows(attention.k_proj.weight, hd)
        + rows(attention.v_proj.weight, hd)
    )
    heads = heads + rows(attention.o_proj.weight.t(), group * hd)
    channels = rows(mlp.gate_proj.weight, 1) + rows(mlp.up_proj.weight, 1) + rows(mlp.down_proj.weight.t(), 1)
    return heads.cpu(), channels.cpu()


def plan_pruning(
    model: nn.Module,
    ratio: float,
    strategy: str = "random",
    keep_first: int = 4,
    keep_last: int = 2,
    head_dim: int | None = None,
    seed: int = 0,
) -> IndexMap:
    """The index map `apply_pruning` realises (structured: kept heads and channels; semi/unstructured:
    the projections to mask, with their full index sets)."""
    if strategy not in STRATEGIES:
        raise AdapterError(f"loram: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "semi" and ratio != 0.5:
        raise AdapterError(f"loram: 2:4 sparsity prunes exactly half of the weights; pass ratio=0.5, not {ratio}")
    _fraction(ratio)
    layers = find_decoder_layers(model, head_dim)
    index_map = IndexMap(strategy, ratio)
    for number, layer in enumerate(layers):
        names = [f"{layer.attention}.{p}" for p in ATTENTION_PROJECTIONS] + [
            f"{layer.mlp}.{p}" for p in MLP_PROJECTIONS
        ]
        shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in names}
        if not index_map.structured:
            index_map.modules.update({name: PrunedModule(shapes[name]) for name in names})
            continue
        if not keep_first <= number < len(layers) - keep_last:
            continue
        hd = layer.head_dim
        num_heads, num_kv_heads = shapes[names[0]][0] // hd, shapes[names[1]][0] // hd
        intermediate = shapes[names[4]][0]
        _, kv_kept, channels_kept = kept_counts(num_heads, num_kv_heads, intermediate, ratio)
        group = num_heads // num_kv_heads
        if strategy == "random":
            generator = torch.Generator().manual_seed(seed * 100_003 + number)
            heads = torch.randperm(num_kv_heads, generator=generator)[:kv_kept]
            channels = torch.randperm(intermediate, generator=generator)[:channels_kept]
        else:
            head_scores, channel_scores = _group_norms(model, layer, num_kv_heads, group)
            heads, channels = head_scores.topk(kv_kept).indices, channel_scores.topk(channels_kept).indices
        heads, channels = heads.sort().values, channels.sort().values  # sorted: repeat_kv keeps j -> j // G
        q_channels = (heads[:, None] * group * hd + torch.arange(group * hd)).flatten()  # (Hq' * hd,)
        kv_channels = (heads[:, None] * hd + torch.arange(hd)).flatten()  # (Hkv' * hd,)
        index_map.kept_kv_heads[layer.attention] = heads.tolist()
        q, k, v, o, gate, up, down = names
        index_map.modules.update(
            {
                q: PrunedModule(shapes[q], kept_rows=q_channels),
                k: PrunedModule(shapes[k], kept_rows=kv_channels),
                v: PrunedModule(shapes[v], kept_rows=kv_channels),
                o: PrunedModule(shapes[o], kept_cols=q_channels),
                gate: PrunedModule(shapes[gate], kept_rows=channels),
                up: PrunedModule(shapes[up], kept_rows=channels),
                down: PrunedModule(shapes[down], kept_cols=channels),
            }
        )
    return index_map


def magnitude_mask(weight: torch.Tensor, strategy: str, ratio: float) -> torch.Tensor:
    """True where a weight survives: 2:4 along the input dimension, or the largest (1 - rho) of |w|."""
    magnitude = weight.detach().abs()
    keep = torch.ones_like(magnitude, dtype=torch.bool)
    if strategy == "semi":
        if weight.shape[1] % 4:
            raise AdapterError(f"loram: 2:4 sparsity needs an input width divisible by 4, got {weight.shape[1]}")
        groups = magnitude.reshape(weight.shape[0], -1, 4)  # (out, in/4, 4)
        smallest = groups.topk(2, dim=-1, largest=False).indices
        return keep.reshape_as(groups).scatter_(-1, smallest, False).reshape_as(weight)
    count = math.floor(weight.numel() * _fraction(ratio))
    if count:
        keep.view(-1)[magnitude.flatten().topk(count, largest=False).indices] = False
    return keep


def apply_pruning(model: nn.Module, index_map: IndexMap, inplace: bool = False) -> nn.Module:
    """The small model: structured -> narrower Linears (and head-count attributes, where the attention
    module has them); semi/unstructured -> the same shapes with masked zeros."""
    small = model if inplace else copy.deepcopy(model)
    for name, entry in index_map.modules.items():
        linear = small.get_submodule(name)
        with torch.no_grad():
            if not index_map.structured:
                linear.weight.mul_(magnitude_mask(linear.weight, index_map.strategy, index_map.ratio))
                continue
            weight, bias = linear.weight, linear.bias
            if entry.kept_rows is not None:
                rows = entry.kept_rows.to(weight.device)
                weight, bias = weight.index_select(0, rows), None if bias is None else bias.index_select(0, rows)
            if entry.kept_cols is not None:
                weight = weight.index_select(1, entry.kept_cols.to(weight.device))
            narrow = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            narrow.weight = nn.Parameter(weight.clone(), requires_grad=linear.weight.requires_grad)
            if bias is not None:
                narrow.bias = nn.Parameter(bias.clone(), requires_grad=linear.bias.requires_grad)
        parent, _, child = name.rpartition(".")
        setattr(small.get_submodule(parent), child, narrow)
    for attention_name, heads in index_map.kept_kv_heads.items():
        # Older transformers read head counts from the module; newer ones infer them (view(..., -1, hd)).
        attention = small.get_submodule(attention_name)
        head_dim = attention.k_proj.out_features // len(heads)
        counts = {"num_heads": attention.q_proj.out_features // head_dim, "num_key_value_heads": len(heads)}
        counts["num_attention_heads"] = counts["num_heads"]
        for attribute, value in counts.items():
            if isinstance(getattr(attention, attribute, None), int):
                setattr(attention, attribute, value)
    return small


def prune(
    model: nn.Module,
    ratio: float,
    strategy: str = "random",
    keep_first: int = 4,
    keep_last: int = 2,
    head_dim: int | None = None,
    seed: int = 0,
    inplace: bool = False,
) -> tuple[nn.Module, IndexMap]:
    """(small model, index map): `plan_pruning` then `apply_pruning` (a copy unless inplace)."""
    index_map = plan_pruning(model, ratio, strategy, keep_first, keep_last, head_dim, seed)
    return apply_pruning(model, index_map, inplace=inplace), index_map


# ---------------------------------------------------------------------------------------------
# QLoRAM: the small model's projections in NF4.
# ---------------------------------------------------------------------------------------------
def quantize_nf4(
    model: nn.Module,
    targets: tuple[str, ...] = DECODER_PROJECTIONS,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Replace (in place) every nn.Linear named like `targets` by a bitsandbytes NF4 Linear4bit on
    `device` (default: where its weight is). Embeddings, norms and lm_head stay as they are."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise AdapterError("loram: QLoRAM needs bitsandbytes (pip install peft-studio[quant])") from error
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.rpartition(".")[2] not in targets:
            continue
        target_device = torch.device(device) if device is not None else module.weight.device
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            device="meta",
        )
        weight = bnb.nn.Params4bit(
            module.weight.data.to(compute_dtype),
            requires_grad=False,
            compress_statistics=double_quant,
            quant_type="nf4",
            module=layer,
        )
        layer.weight = weight.to(target_device)  # quantizes
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data.to(target_device, compute_dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        del module, weight
    return model


# ---------------------------------------------------------------------------------------------
# Recovery.
# ---------------------------------------------------------------------------------------------
def recover_state_dict(
    state: dict[str, torch.Tensor], config: AdapterConfig, index_map: IndexMap
) -> dict[str, torch.Tensor]:
    """An adapter state dict of the small model ("<module>.<tensor>") in the full model's shapes.

    Each method says how its tensors go back (`Capabilities.loram_recovery`: LoRA, PaCA)."""
    recovery = get_method(config.method).capabilities.loram_recovery
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module_name, _, tensor_name = key.rpartition(".")
        by_module.setdefault(module_name, {})[tensor_name] = value
    recovered = {}
    for module_name, tensors in by_module.items():
        entry = index_map.modules.get(module_name)
        if entry is not None and (entry.kept_rows is not None or entry.kept_cols is not None):
            if recovery is None:
                raise AdapterError(
                    f"loram: cannot recover a {config.method!r} adapter from structured pruning; "
                    f"supported methods: {', '.join(methods_with('loram_recovery'))}"
                )
            tensors = recovery(tensors, entry)
        recovered.update({f"{module_name}.{key}": value.detach().clone() for key, value in tensors.items()})
    return recovered


def recover(source, index_map: IndexMap, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write the small model's adapter (a handle, or a folder written by `handle.save`) in the full
    model's shapes as a peft_core adapter folder; `peft_core.load(full_model, directory)` attaches it."""
    if isinstance(source, (str, os.PathLike)):
        config, name = read_adapter_config(source)
        state = read_adapter_weights(source)
    else:  # an AdapterHandle
        state = source.state_dict(name)  # refuses an unknown name
        config = source.configs[name]
    return write_adapter(directory, config, name, recover_state_dict(state, config, index_map))


# ---------------------------------------------------------------------------------------------
# Storage calculator (spec section 4), from config numbers alone.
# ---------------------------------------------------------------------------------------------
NF4_DOUBLE_QUANT_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 per 256 absmaxes


def storage_report(
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    vocab_size: int,
    ratio: float,
    strategy: str = "random",
    head_dim: int | None = None,
    tie_embeddings: bool = False,
    keep_first: int = 4,
    keep_last: int = 2,
) -> dict[str, float | int]:
    """Parameter storage of the original, pruned and pruned + 4-bit models (Llama: no biases).

    P_layer(Hq, Hkv, I) = 2 h hd (Hq + Hkv) + 3 h I + 2 h;  P = sum P_layer + (1 or 2) V h + h.
    qloram_reduction is the paper's 16 P_orig / (4 P_pruned); the realistic one counts NF4 with
    double quantization (~4.127 bits) on the decoder projections and 16 bits for everything else.
    """
    h, hd, rho = hidden_size, head_dim or hidden_size // num_heads, _fraction(ratio)
    projections = lambda hq, hkv, inter: 2 * h * hd * (hq + hkv) + 3 * h * inter  # noqa: E731
    full_projections = projections(num_heads, num_kv_heads, intermediate_size)
    if strategy in ("random", "norm"):
        pruned_layer = projections(*kept_counts(num_heads, num_kv_heads, intermediate_size, ratio))
        pruned_count = max(0, num_layers - keep_first - keep_last)
        pruned_projections = pruned_count * pruned_layer + (num_layers - pruned_count) * full_projections
    elif strategy in ("semi", "unstructured"):
        if strategy == "semi":
            rho = Fraction(1, 2)
        shapes = [(hd * num_heads, h), (hd * num_kv_heads, h), (hd * num_kv_heads, h), (h, hd * num_heads)] + [
            (intermediate_size, h)
        ] * 3
        pruned_projections = num_layers * sum(o * i - math.floor(o * i * rho) for o, i in shapes)
    else:
        raise AdapterError(f"loram: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    other = num_layers * 2 * h + (1 if tie_embeddings else 2) * vocab_size * h + h  # norms, embeddings, final norm
    original, pruned = num_layers * full_projections + other, pruned_projections + other
    return {
        "params_original": original,
        "params_pruned": pruned,
        "loram_reduction": original / pruned,
        "qloram_reduction": 16 * original / (4 * pruned),
        "qloram_reduction_realistic": 16 * original / (NF4_DOUBLE_QUANT_BITS * pruned_projections + 16 * other),
        "pruned_nf4_gib": pruned * 4 / 8 / 2**30,  # the paper's HBM column: every parameter at 4 bits
    }
