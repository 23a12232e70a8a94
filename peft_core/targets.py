"""Which modules of a model an adapter wraps.

Target syntax (shared by every method):
- "q_proj": a module-name suffix on a dotted boundary (matches "layers.0.attn.q_proj");
- "model.layers.0.mlp.up_proj": an exact name (a suffix of itself);
- "re:.*attn\\d\\.to_[qkv]": a regular expression matched against the full name;
- "all-linear": every nn.Linear except the model's output head (lm_head / a final classifier).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from peft_core.errors import AdapterError

# Output heads are never adapted by "all-linear": their update is a full-vocabulary matrix and
# tying to the embeddings makes them a bad target (the same choice HF PEFT makes).
OUTPUT_HEAD_NAMES = ("lm_head", "output", "classifier", "score")

# Sibling groups: layers in one parent that read the same input. Methods that can share work
# between siblings (PaCA shares one column set per group) use these names.
DEFAULT_SIBLING_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("to_q", "to_k", "to_v"),
    ("query", "key", "value"),
    ("q", "k", "v"),
)


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_targets(
    model: nn.Module,
    targets: Iterable[str],
    exclude: Iterable[str] = (),
    supported_types: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> list[str]:
    """Names of the modules to wrap, in model order; errors if none match or a match is unsupported."""
    targets, exclude = list(targets), list(exclude)
    selected = []
    for name, module in model.named_modules():
        if not name:
            continue
        if "all-linear" in targets and isinstance(module, nn.Linear):
            hit = name.split(".")[-1] not in OUTPUT_HEAD_NAMES
        else:
            hit = any(matches(name, p) for p in targets if p != "all-linear")
        if not hit or any(matches(name, p) for p in exclude):
            continue
        if getattr(module, "is_adapted_module", False):
            module = module.base_layer
        if not isinstance(module, supported_types):
            if "all-linear" in targets and not any(matches(name, p) for p in targets if p != "all-linear"):
                continue
            raise AdapterError(
                f"target {name!r} is a {type(module).__name__}, which this method cannot adapt; "
                f"supported layer types: {', '.join(t.__name__ for t in supported_types)}. "
                "Narrow `targets` to those layers."
            )
        parent_name = name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent_name) if parent_name else model, nn.MultiheadAttention):
            raise AdapterError(
                f"target {name!r} belongs to an nn.MultiheadAttention, which reads its projection weights directly "
                "instead of calling them, so an adapter there would be silently ignored; exclude it"
            )
        selected.append(name)
    # Names inside an already-adapted wrapper ("x.base_layer") are never targets themselves.
    selected = [n for n in selected if ".base_layer" not in n and not n.endswith("base_layer")]
    if not selected:
        sample = [n for n, m in model.named_modules() if isinstance(m, supported_types)][:8]
        raise AdapterError(
            f"no module matches targets={targets} (exclude={exclude}); "
            f"some adaptable modules in this model: {sample or 'none'}"
        )
    return selected


def sibling_key(name: str, groups: Iterable[tuple[str, ...]] = DEFAULT_SIBLING_GROUPS) -> str:
    """A key shared by sibling layers ("layers.0.attn.{q_proj,k_proj,v_proj}"), or the name itself."""
    parent, _, leaf = name.rpartition(".")
    for group in groups:
        if leaf in group:
            return f"{parent}.{{{','.join(group)}}}"
    return name
