"""Adapter configs and the method registry.

Every method has a config dataclass deriving from `AdapterConfig`. The registry maps a method
name ("lora", "paca", ...) to its config class and its adapter class, so a config written as
JSON/YAML (a plain dict with a "method" key) comes back as the right dataclass, and the CLI/UI
can list methods without knowing them. Unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peft_core.errors import AdapterError


@dataclass
class AdapterConfig:
    """Fields every method shares.

    targets: which modules to adapt. Each entry is a module-name suffix on a dotted boundary
        ("q_proj" matches "model.layers.0.self_attn.q_proj"), an exact name, a regular expression
        prefixed with "re:" (full match), or "all-linear" (every nn.Linear except the output head).
    exclude: names/patterns (same syntax) removed from the match.
    """

    method: ClassVar[str] = ""

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


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type[AdapterConfig]
    adapter_class: type  # a peft_core.layer.Adapter subclass
    # For methods that must look at data first (CorDA, SPT): prepare(model, config, batches, step=None)
    # returns a mapping module name -> what that module's adapter needs; attach(..., prepared=) takes it.
    prepare: Callable[..., Any] | None = None


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    config_class: type[AdapterConfig], adapter_class: type, prepare: Callable[..., Any] | None = None
) -> None:
    """Make a method known by its `config_class.method` name.

    `prepare`: only for methods that need data before attach; its result goes to attach(..., prepared=).
    """
    name = config_class.method
    if not name:
        raise ValueError(f"{config_class.__name__} must set the class attribute `method`")
    _REGISTRY[name] = MethodSpec(name, config_class, adapter_class, prepare)


def available_methods() -> list[str]:
    _import_builtin_methods()
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    _import_builtin_methods()
    if name not in _REGISTRY:
        raise AdapterError(f"unknown method {name!r}; available methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


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


def _import_builtin_methods() -> None:
    # Importing the methods package registers every built-in method exactly once.
    import peft_core.methods  # noqa: F401
