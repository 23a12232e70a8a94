"""One definition per option: a dataclass field whose metadata says everything about it.

    steps: int = option(300, help="optimizer steps", min=1)
    lr_schedule: str = option("constant", help="learning-rate schedule after warm-up", choices=LR_SCHEDULES)

The studio builds its command-line flags, its YAML schema and its Gradio controls from these fields
(studio/options.py, ui/forms.py), and `check_fields` validates a config the same way whichever of
them the values came from. Metadata keys (all optional, plain `dataclasses.field(metadata=...)` works
too, which is how peft_core's method configs document theirs without importing this module):

    help       one line for --help and the UI
    choices    allowed values (a tuple, or a callable returning one, for lists known at run time)
    min / max  inclusive bounds; `above` an exclusive lower bound (learning rates: above=0)
    multiple_of an int must be a multiple of it (image sides: 8)
    check      a callable(value) -> None or a message saying what is wrong and what to do (devices),
               for what a bound or a list of choices cannot say
    unit       shown after the value in the UI ("steps", "px")
    label      the UI's label (default: the field name, spaced)
    positional the CLI takes it as a positional argument instead of a --flag
    repeat     a list given as a repeated flag (--prompt a --prompt b) instead of one flag with values
    metavar    the name --help shows for the flag's value
    advanced   the UI shows it folded away
    cli=False  not on the command line (set by the program, e.g. from another flag)
    ui=False   not in the UI's forms (paths on the server's disk, devices, ...)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.errors import UserError


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    multiple_of: int | None = None,
    check: Callable[[Any], str | None] | None = None,
    unit: str = "",
    label: str = "",
    positional: bool = False,
    repeat: bool = False,
    metavar: str | None = None,
    advanced: bool = False,
    cli: bool = True,
    ui: bool = True,
    choices_message: str = "",
) -> Any:
    """A dataclass field carrying its own documentation and checks (see the module docstring).

    A list or dict default is given as such and copied per instance (dataclasses need a factory for it)."""
    metadata = {
        "help": help,
        "choices": choices,
        "min": min,
        "max": max,
        "above": above,
        "multiple_of": multiple_of,
        "check": check,
        "unit": unit,
        "label": label,
        "positional": positional,
        "repeat": repeat,
        "metavar": metavar,
        "advanced": advanced,
        "cli": cli,
        "ui": ui,
        "choices_message": choices_message,
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def choices_of(field: dataclasses.Field) -> tuple[Any, ...] | None:
    choices = field.metadata.get("choices")
    if choices is None:
        return None
    return tuple(choices() if callable(choices) else choices)


def base_type(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return (options[0] if len(options) == 1 else Any), True
    return hint, False


def check_value(name: str, hint: Any, value: Any, where: str) -> Any:
    """`value` if it has the field's type (ints become floats where a float is expected), else a
    UserError naming the option, what it expects and what it got."""
    kind, optional = base_type(hint)
    if value is None and optional:
        return None
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind) or (Any,)
        if not isinstance(value, list):
            raise UserError(f"option {name!r} in {where} expects a list, got {value!r}")
        return [check_value(name, item, entry, where) for entry in value]
    if typing.get_origin(kind) is dict and not isinstance(value, dict):
        raise UserError(f"option {name!r} in {where} expects a mapping of key: value, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and not (
        isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    ):
        hint_text = ""
        if kind is float and isinstance(value, str):
            hint_text = " (YAML reads 1e-3 as text: write 1.0e-3)"
        raise UserError(
            f"option {name!r} in {where} expects {kind.__name__}, got {value!r} ({type(value).__name__}){hint_text}"
        )
    return value


def check_fields(config: Any) -> None:
    """Every field's choices and bounds, with one-line errors naming the field and the allowed values."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        meta = field.metadata
        if value is None:
            continue
        allowed = choices_of(field)
        if allowed is not None and value not in allowed:
            template = meta.get("choices_message") or "{name}={value!r} is not one of {choices}"
            raise UserError(template.format(name=field.name, value=value, choices=", ".join(map(str, allowed))))
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{field.name} must be a finite number, got {value}")
        if meta.get("min") is not None and value < meta["min"]:
            raise UserError(f"{field.name} must be >= {meta['min']}, got {value}")
        if meta.get("max") is not None and value > meta["max"]:
            raise UserError(f"{field.name} must be <= {meta['max']}, got {value}")
        if meta.get("above") is not None and not value > meta["above"]:
            raise UserError(f"{field.name} must be > {meta['above']}, got {value}")
        if meta.get("multiple_of") and value % meta["multiple_of"]:
            raise UserError(f"{field.name} must be a multiple of {meta['multiple_of']}, got {value}")
        problem = meta["check"](value) if meta.get("check") else None
        if problem:
            raise UserError(f"{field.name} {value!r}: {problem}")


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """`cls(**values)` after checking every key and type, then `check_fields` on the result."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    checked = {}
    for key, value in values.items():
        if key not in names:
            raise UserError(f"unknown option {key!r} in {where}; valid options: {', '.join(sorted(names))}")
        checked[key] = check_value(key, hints[key], value, where)
    config = cls(**checked)
    check_fields(config)
    return config
