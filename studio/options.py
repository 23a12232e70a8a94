"""Command-line flags and YAML configs from the same dataclasses (one source of truth).

Precedence: an explicit flag > the YAML file given with --config > the dataclass default.
Unknown YAML keys and values of the wrong type are errors naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from peft_core import AdapterConfig, config_from_dict, get_method
from peft_core.errors import AdapterError
from pipelines.errors import UserError


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    help_texts: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """One flag per field (`--batch-size`), left out of `args` unless given (so YAML can fill it)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or not field.init:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        default = (defaults or {}).get(field.name, default)  # the command's own default, shown in --help
        text = (help_texts or {}).get(field.name, "")
        text = f"{text} (default: {default!r})" if text else f"default: {default!r}"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="*", default=argparse.SUPPRESS, help=text, metavar="VALUE")
        else:
            parser.add_argument(
                flag, type=kind if kind in (int, float, str) else str, default=argparse.SUPPRESS, help=text
            )


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option: value, not a {type(data).__name__}")
    return data


def dataclass_from_flags(cls: type, values: dict[str, Any], args: argparse.Namespace, where: str) -> Any:
    """`cls` from a YAML section's `values` overlaid by the flags given on the command line
    (add_dataclass_arguments leaves the others out of `args`), checked by build_dataclass."""
    merged = dict(values)
    for field in dataclasses.fields(cls):
        if hasattr(args, field.name):
            merged[field.name] = getattr(args, field.name)
    return build_dataclass(cls, merged, where)


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    """`cls(**values)` with unknown keys and wrong types reported by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key, value in values.items():
        if key not in names:
            raise UserError(f"unknown option {key!r} in {where}; valid options: {', '.join(sorted(names))}")
        expected = hints[key]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif typing.get_origin(expected) is list:
            if not isinstance(value, list):
                raise UserError(f"option {key!r} in {where} expects a list, got {value!r}")
        elif expected in (int, float, str, bool) and not (
            isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        ):
            raise UserError(
                f"option {key!r} in {where} expects {expected.__name__}, got {value!r} ({type(value).__name__})"
            )
    return cls(**values)


def add_method_arguments(parser: argparse.ArgumentParser, default_method: str) -> None:
    group = parser.add_argument_group("adapter method")
    group.add_argument(
        "--method",
        default=argparse.SUPPRESS,
        help=f"peft_core method: lora, paca, plp, ... (default: {default_method})",
    )
    group.add_argument(
        "--rank", type=int, default=argparse.SUPPRESS, help="the method's rank r (LoRA rank, PaCA columns, PLP rank)"
    )
    group.add_argument("--alpha", type=float, default=argparse.SUPPRESS, help="scale numerator alpha (LoRA, PaCA)")
    group.add_argument("--targets", nargs="+", default=argparse.SUPPRESS, help="module names/patterns to adapt")
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other method hyperparameter, e.g. --set dropout=0.1 --set use_rslora=true",
    )


def method_config(
    args: argparse.Namespace,
    yaml_values: dict[str, Any],
    default_method: str,
    default_targets: list[str],
    defaults: dict[str, Any] | None = None,
) -> AdapterConfig:
    """The adapter config from --method/--rank/--alpha/--targets/--set over YAML's `adapter:` mapping."""
    values: dict[str, Any] = {"targets": default_targets, **(defaults or {}), **dict(yaml_values)}
    method = getattr(args, "method", values.pop("method", default_method))
    values.pop("method", None)
    for flag, key in (("rank", "r"), ("alpha", "alpha"), ("targets", "targets")):
        if hasattr(args, flag):
            values[key] = getattr(args, flag)
    for item in args.set:
        key, separator, raw = item.partition("=")
        if not separator:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = yaml.safe_load(raw)
    try:
        fields = {f.name for f in dataclasses.fields(get_method(method).config_class) if f.init}
        values = {k: v for k, v in values.items() if k in fields or k not in (defaults or {})}
        return config_from_dict({"method": method, **values})
    except AdapterError as error:
        raise UserError(str(error)) from None
