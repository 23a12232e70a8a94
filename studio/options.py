"""Command-line flags, YAML configs and the UI's command lines, all from the same dataclass fields.

A command declares its options as sections: each section is one dataclass (its fields carry help,
choices and bounds, see pipelines/options.py) under one YAML key (None: top-level keys).

    sections = [Section(None, TrainRun), Section("adapter", AdapterOptions, open=True), Section("train", TrainConfig)]
    add_options(parser, sections)                    # --flag per field, plus --config FILE
    values = resolve_options(args, sections)         # {None: TrainRun(...), "adapter": ..., "train": ...}

Precedence: an explicit flag > the YAML file given with --config > the command's defaults > the
dataclass defaults. Every flag is also a YAML key (the flag's name with underscores) in its section,
and both go through the same checks (pipelines.options.build). Unknown keys and wrong types are
one-line errors naming the key. `to_argv` turns a dict of values (the UI's forms) into the argv that
`studio` runs, so the command a user sees is exactly what runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import UserError
from pipelines.options import base_type, build, choices_of, field_default, option

# The field-metadata helpers, for the layer above (the UI builds its forms from the same fields).
__all__ = [
    "Section",
    "add_options",
    "base_type",
    "build",
    "choices_of",
    "field_default",
    "flag_name",
    "given_options",
    "load_yaml",
    "option",
    "record",
    "resolve_options",
    "resolve_section",
    "resume_flags",
    "to_argv",
]

CONFIG_FLAG = "--config"


@dataclass(frozen=True)
class Section:
    key: str | None  # the YAML mapping holding these options (None: top-level keys)
    cls: type  # the dataclass whose fields are the options
    title: str = ""  # --help group and UI accordion
    defaults: dict[str, Any] = field(default_factory=dict)  # this command's defaults over the dataclass's
    # The dict field that takes the keys which are not fields (the adapter section: any hyperparameter
    # of the chosen method, checked by the method's own config); None: such keys are errors.
    extras_field: str | None = None

    @property
    def where(self) -> str:
        return f"the {self.title or self.key} options" if self.key else "the top-level options"

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls) if f.init]

    def default(self, f: dataclasses.Field) -> Any:
        return self.defaults.get(f.name, field_default(f))


def flag_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def _help(section: Section, f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    allowed = choices_of(f)
    if allowed is not None and len(allowed) <= 12:
        text += f" ({' | '.join(map(str, allowed))})"
    default = section.default(f)
    return f"{text} (default: {default!r})" if text else f"default: {default!r}"


def add_options(parser: argparse.ArgumentParser, sections: Iterable[Section]) -> None:
    """One argument per field, left out of `args` unless given (so YAML can fill it in)."""
    parser.add_argument(CONFIG_FLAG, default=None, metavar="FILE.yaml", help="YAML file with any of these options")
    for section in sections:
        group = parser.add_argument_group(section.title) if section.title else parser
        hints = typing.get_type_hints(section.cls)
        for f in section.fields():
            if not f.metadata.get("cli", True):
                continue
            kind, _ = base_type(hints[f.name])
            meta = f.metadata
            common: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _help(section, f)}
            if meta.get("metavar"):
                common["metavar"] = meta["metavar"]
            if meta.get("positional"):
                group.add_argument(f.name, nargs="?", **common)
            elif kind is bool:
                group.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, **common)
            elif typing.get_origin(kind) is list:
                item = (typing.get_args(kind) or (str,))[0]
                item = item if item in (int, float) else str
                if meta.get("repeat"):
                    group.add_argument(flag_name(f), action="append", type=item, **common)
                else:
                    group.add_argument(flag_name(f), nargs="*", type=item, **{"metavar": "VALUE", **common})
            else:
                group.add_argument(flag_name(f), type=kind if kind in (int, float) else str, **common)


def given_options(args: argparse.Namespace, sections: Iterable[Section]) -> list[str]:
    """The options given as flags on the command line (`add_options` leaves the others out of `args`);
    call it before anything sets resolved values on `args` (studio.cli.parse keeps it as `args.given`)."""
    return sorted({f.name for section in sections for f in section.fields() if hasattr(args, f.name)})


def resume_flags(
    args: argparse.Namespace, sections: list[Section], allowed: dict[str | None, tuple[str, ...]]
) -> dict[str | None, dict[str, Any]]:
    """The options given along with --resume, as {section key: {option: value}}, when every one is in
    `allowed` ({section key: option names}); otherwise a one-line UserError naming the flags that cannot
    change (a resumed run keeps the settings of its config.yaml) and those that can. `--config` is refused too."""
    given = set(getattr(args, "given", ())) - {"resume"}
    changes: dict[str | None, dict[str, Any]] = {}
    refused = [CONFIG_FLAG] if getattr(args, "config", None) else []
    for section in sections:
        for f in section.fields():
            if f.name not in given:
                continue
            if f.name in allowed.get(section.key, ()):
                changes.setdefault(section.key, {})[f.name] = getattr(args.options[section.key], f.name)
            else:
                refused.append(f.name.upper() if f.metadata.get("positional") else flag_name(f))
    if refused:
        fields = {(s.key, f.name): f for s in sections for f in s.fields()}
        takes = [flag_name(fields[key, name]) for key, names in allowed.items() for name in names]
        raise UserError(
            f"{', '.join(refused)} cannot change on --resume: a resumed run keeps the settings of its config.yaml"
            f" (flags --resume takes: {', '.join(takes) or 'none'})"
        )
    return changes


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


def resolve_options(args: argparse.Namespace, sections: list[Section]) -> dict[str | None, Any]:
    """Each section's dataclass from its defaults < the YAML file < the flags given, checked."""
    if sum(section.key is None for section in sections) > 1:
        raise ValueError("a command has one top-level section (combine its dataclasses by inheritance)")
    config_path = getattr(args, "config", None)
    data = load_yaml(config_path)
    where_file = f" in {config_path}" if config_path else ""
    nested = {s.key for s in sections if s.key}
    top_names = {f.name for s in sections if s.key is None for f in s.fields()}
    unknown = sorted(k for k in data if k not in nested and k not in top_names)
    if unknown:
        raise UserError(
            f"unknown option(s){where_file}: {', '.join(unknown)}; valid top-level options: "
            f"{', '.join(sorted(top_names | nested))}"
        )
    resolved: dict[str | None, Any] = {}
    for section in sections:
        if section.key is None:
            values = {k: v for k, v in data.items() if k in {f.name for f in section.fields()}}
        else:
            values = data.get(section.key)
            values = {} if values is None else values  # `train:` with nothing under it: no options set
            if not isinstance(values, dict):
                raise UserError(f"{section.key!r}{where_file} must be a mapping of option: value, got {values!r}")
        resolved[section.key] = resolve_section(section, values, args)
    return resolved


def resolve_section(section: Section, values: dict[str, Any], args: argparse.Namespace | None = None) -> Any:
    names = {f.name for f in section.fields()}
    merged = {name: section.defaults[name] for name in section.defaults if name in names}
    for key, value in values.items():
        if key in names or section.extras_field is None:
            merged[key] = value  # build() names an unknown key
        else:
            merged.setdefault(section.extras_field, {})[key] = value
    for name in names:
        if args is not None and hasattr(args, name):
            merged[name] = getattr(args, name)
    return build(section.cls, merged, section.where)


def record(sections: list[Section], resolved: dict[str | None, Any]) -> dict[str, Any]:
    """The YAML mapping of resolved options (what `--config` reads back to the same values)."""
    out: dict[str, Any] = {}
    for section in sections:
        values = dataclasses.asdict(resolved[section.key])
        if section.extras_field:
            values.update(values.pop(section.extras_field))
        if section.key is None:
            out.update(values)
        else:
            out[section.key] = values
    return out


def to_argv(command: list[str], sections: list[Section], values: dict[str, Any]) -> list[str]:
    """The `studio` argv for `values` ({field name: value}, or {"section.field": value} where two
    sections share a name): the command, then one flag per value that differs from its default.

    This is how the UI's forms become the command it shows and runs."""
    argv = list(command)
    known: set[str] = set()
    for section in sections:
        for f in section.fields():
            if not f.metadata.get("cli", True):
                continue
            qualified = f"{section.key}.{f.name}" if section.key else f.name
            known.update((qualified, f.name))
            if qualified in values:
                value = values[qualified]
            elif f.name in values:
                value = values[f.name]
            else:
                continue
            if value is None or value == section.default(f):
                continue
            argv += _flag_words(f, value)
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{' '.join(command)} has no option(s) {', '.join(unknown)}")
    return argv


def _flag_words(f: dataclasses.Field, value: Any) -> list[str]:
    flag = flag_name(f)
    if f.metadata.get("positional"):
        return [str(value)]
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        if f.metadata.get("repeat"):
            # "--flag=value" where a value starts with "-", which argparse would take for an option.
            return [
                word
                for item in value
                for word in ([f"{flag}={item}"] if str(item).startswith("-") else [flag, str(item)])
            ]
        return [flag, *map(str, value)] if value else []
    return _one_flag(flag, str(value))


def _one_flag(flag: str, text: str) -> list[str]:
    return [f"{flag}={text}"] if text.startswith("-") else [flag, text]
