"""Adapter configs and the method registry.

Every method has a config dataclass deriving from `AdapterConfig`. The registry maps a method
name ("lora", "paca", ...) to its config class and its adapter class, so a config written as
JSON/YAML (a plain dict with a "method" key) comes back as the right dataclass, and the CLI/UI
can list methods without knowing them. Unknown keys and wrong types are errors naming the key.

What a method can do (layer types, merge, quantized base, LoRA export, LoRAM recovery, trainer
defaults) is its `Capabilities`, declared next to its `register_method` line; the trainers, CLI and UI
read `get_method(name).capabilities` (or `trainer_defaults` / `methods_with`), never tables of names.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

from peft_core.errors import AdapterError

if TYPE_CHECKING:
    import torch

TRAINERS = ("llm", "diffusion")  # the trainer kinds `Capabilities.trainer_defaults` may name
PLACEMENTS = ("projections", "sublayer_outputs")  # values of `Capabilities.placement`
# How LoRAM maps one module's adapter tensors, trained on the pruned model, back to the full shapes:
# (state: tensor name -> tensor, entry: a peft_core.methods.loram.PrunedModule) -> the full-shape state.
LoramRecovery = Callable[[dict[str, "torch.Tensor"], Any], dict[str, "torch.Tensor"]]


@dataclass
class AdapterConfig:
    """Fields every method shares.

    targets: which modules to adapt. Each entry is a module-name suffix on a dotted boundary
        ("q_proj" matches "model.layers.0.self_attn.q_proj"), an exact name, a regular expression
        prefixed with "re:" (full match), or "all-linear" (every nn.Linear except the output head).
    exclude: names/patterns (same syntax) removed from the match.
    """

    method: ClassVar[str] = ""
    # What a saved config meant by a field it does not record, for fields added after configs of the
    # method were first saved (the field's default for new configs may differ): {field: value then}.
    saved_before: ClassVar[dict[str, Any]] = {}

    targets: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        if not self.targets:
            raise AdapterError(
                f"{type(self).__name__}: `targets` is empty; name the modules to adapt, "
                "e.g. targets=['q_proj', 'v_proj'] or targets=['all-linear']"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-ready dict that `config_from_dict` turns back into this config."""
        data = {"method": self.method}
        data.update(dataclasses.asdict(self))
        return data


@dataclass
class RankConfig(AdapterConfig):
    """An AdapterConfig sized by an integer r >= 1 (a rank; PaCA's trained columns). Subclasses restate
    `r` with their own default; the field keeps its place, first after the shared ones."""

    r: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r < 1:
            raise AdapterError(f"{self.method}: r must be >= 1, got {self.r}")


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What a method can do, declared once, next to its `register_method` line.

    The contract suite (tests/peft_core/test_contract.py) checks every declaration against the code.

    wraps: the module types the adapter wraps (`isinstance` checks; `peft_core.layer.NormLayer`
        stands for normalization layers recognised by structure). Targets of other types are errors.
    mergeable: `handle.merge()` folds it into the base weights (exactly, and unmerge restores them).
    quantized_base: trains on a bitsandbytes 4-bit (NF4/FP4) base layer.
    lora_export: `handle.export("peft" | "diffusers")` writes it as an exact LoRA (SPT: when it
        trained no bias, which a LoRA cannot hold).
    identity_at_init: with the config's defaults, the adapted model starts equal to the base.
    loram_recovery: how LoRAM (methods/loram.py) scatters one module's tensors, trained on a
        structurally pruned model, back to the full shapes; None: LoRAM cannot recover this method.
    placement: "projections" (it wraps the layers it adapts: q/k/v/o, MLP and conv projections) or
        "sublayer_outputs" (it adds after a sub-layer's output Linear: o_proj / down_proj / to_out.0 /
        ff.net.2 style; Compacter). Trainers pick their default targets from the model family by it.
    trainer_defaults: per trainer kind ("llm", "diffusion"), config values over the paper's defaults
        that the trainer starts from (its scale of models, its usual rank); keys are config fields.
    note: one line for the UI and --help: what a user must know before picking the method.
    """

    wraps: tuple[type, ...]
    mergeable: bool
    quantized_base: bool
    lora_export: bool
    identity_at_init: bool
    loram_recovery: LoramRecovery | None = None
    placement: str = "projections"
    trainer_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        if not self.wraps or not all(isinstance(t, type) for t in self.wraps):
            raise ValueError(f"Capabilities.wraps must be a non-empty tuple of module types, got {self.wraps!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"Capabilities.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        unknown = sorted(set(self.trainer_defaults) - set(TRAINERS))
        if unknown:
            raise ValueError(f"Capabilities.trainer_defaults: unknown trainer {unknown[0]!r}; trainers: {TRAINERS}")
        # Read-only all the way down: a caller changing the defaults it was given must not change the method's.
        frozen = {trainer: MappingProxyType(dict(values)) for trainer, values in self.trainer_defaults.items()}
        object.__setattr__(self, "trainer_defaults", MappingProxyType(frozen))
        object.__setattr__(self, "wraps", tuple(self.wraps))


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type[AdapterConfig]
    adapter_class: type  # a peft_core.layer.Adapter subclass
    # For methods that must look at data first (CorDA, SPT): prepare(model, config, batches, step=None)
    # returns a mapping module name -> what that module's adapter needs; attach(..., prepared=) takes it.
    prepare: Callable[..., Any] | None = None
    capabilities: Capabilities = field(kw_only=True)

    @property
    def needs_data(self) -> bool:
        """The method looks at data before it attaches (it has a `prepare` step)."""
        return self.prepare is not None


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    config_class: type[AdapterConfig],
    adapter_class: type,
    prepare: Callable[..., Any] | None = None,
    *,
    capabilities: Capabilities,
) -> None:
    """Make a method known by its `config_class.method` name.

    `prepare`: only for methods that need data before attach; its result goes to attach(..., prepared=).
    `capabilities`: what the method can do (see `Capabilities`); `trainer_defaults` keys must be config fields.
    """
    name = config_class.method
    if not name:
        raise ValueError(f"{config_class.__name__} must set the class attribute `method`")
    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    for trainer, values in capabilities.trainer_defaults.items():
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"{name}: trainer_defaults[{trainer!r}] sets {unknown[0]!r}, which is not a config field")
    # The attribute older callers read (studio); `capabilities.wraps` is the declaration.
    adapter_class.supported_types = capabilities.wraps
    _REGISTRY[name] = MethodSpec(name, config_class, adapter_class, prepare, capabilities=capabilities)


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The registered method `name`. (Importing peft_core registers the built-in ones: see its __init__.)"""
    if name not in _REGISTRY:
        raise AdapterError(f"unknown method {name!r}; available methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def trainer_defaults(method: str, trainer: str) -> dict[str, Any]:
    """The config values `trainer` ("llm" or "diffusion") starts `method` from, over the paper's defaults."""
    if trainer not in TRAINERS:
        raise AdapterError(f"unknown trainer {trainer!r}; trainers: {', '.join(TRAINERS)}")
    return dict(get_method(method).capabilities.trainer_defaults.get(trainer, {}))


def methods_with(capability: str) -> list[str]:
    """Sorted names of the methods that have `capability`: a `Capabilities` field that is set (a true
    flag, a LoRAM recovery), or "needs_data"; e.g. methods_with("mergeable"), methods_with("loram_recovery")."""
    flags = {f.name for f in dataclasses.fields(Capabilities)} - {"wraps", "placement", "trainer_defaults", "note"}
    if capability == "needs_data":
        return [name for name in available_methods() if _REGISTRY[name].needs_data]
    if capability not in flags:
        raise AdapterError(f"unknown capability {capability!r}; one of: {', '.join(sorted(flags | {'needs_data'}))}")
    return [name for name in available_methods() if getattr(_REGISTRY[name].capabilities, capability)]


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Build the config a dict describes, checking every key and value type."""
    if not isinstance(data, dict) or "method" not in data:
        raise AdapterError("an adapter config needs a 'method' key, e.g. {'method': 'lora', 'targets': [...]}")
    spec = get_method(data["method"])
    fields = {f.name: f for f in dataclasses.fields(spec.config_class) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key == "method":
            continue
        if key not in fields:
            raise AdapterError(
                f"unknown key {key!r} in a {spec.name!r} config; valid keys: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _check_type(spec.name, key, value, _field_type(spec.config_class, key))
    return spec.config_class(**kwargs)


def _field_type(config_class: type, name: str) -> Any:
    return typing.get_type_hints(config_class)[name]


def _check_type(method: str, key: str, value: Any, expected: Any) -> Any:
    """Accept `value` if it fits `expected` (coercing JSON lists to tuples and ints to floats)."""
    ok, converted = _conforms(value, expected)
    if not ok:
        raise AdapterError(
            f"{method!r} config key {key!r} expects {_type_name(expected)}, got {value!r} ({type(value).__name__})"
        )
    return converted


def _conforms(value: Any, expected: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(expected)
    if expected is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(expected):
            ok, converted = _conforms(value, option)
            if ok:
                return True, converted
        return False, value
    if expected is type(None):
        return value is None, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_type, *_rest) = typing.get_args(expected) or (Any,)
        items = []
        for item in value:
            ok, converted = _conforms(item, item_type)
            if not ok:
                return False, value
            items.append(converted)
        return True, origin(items)
    if origin is dict:
        return isinstance(value, dict), value
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(expected, type):
        return isinstance(value, expected), value
    return True, value


def _type_name(expected: Any) -> str:
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
