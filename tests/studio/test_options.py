"""One definition per option: every flag of every `studio` command is a dataclass field, every flag
is also a YAML key of its section, and both go through the same checks (studio/options.py)."""

from __future__ import annotations

import argparse
import typing

import pytest
import yaml

from pipelines.errors import UserError
from pipelines.options import base_type, choices_of, field_default
from studio.cli import build_parser, command_sections, parse, subcommands
from studio.options import Section, to_argv

COMMANDS = sorted(subcommands())
PARSER = build_parser()


def parse_cli(argv: list[str]) -> argparse.Namespace:
    return parse(argv, PARSER)


META_FLAGS = {"help", "config"}  # argparse's own --help, and --config FILE that every command has


def subparser(command: str) -> argparse.ArgumentParser:
    actions = PARSER._subparsers._group_actions[0]
    return actions.choices[command]


def fields_of(command: str) -> list[tuple[Section, typing.Any]]:
    return [(s, f) for s in command_sections(command) for f in s.fields() if f.metadata.get("cli", True)]


def test_there_are_commands_with_options():
    assert {"train-style", "train-content", "train-llm", "break-for-make", "generate", "ui"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_a_dataclass_field(command):
    fields = {f.name for _, f in fields_of(command)}
    flags = {action.dest for action in subparser(command)._actions} - META_FLAGS
    assert flags == fields, f"flags without a field: {flags - fields}; fields without a flag: {fields - flags}"
    for _, field in fields_of(command):
        assert field.metadata.get("help"), f"{command}: option {field.name!r} has no help text"


def sample_value(section: Section, field) -> typing.Any:
    """A valid value of the field that is not its default."""
    kind, _ = base_type(typing.get_type_hints(section.cls)[field.name])
    default = section.default(field)
    allowed = choices_of(field)
    if allowed:
        return next((c for c in allowed if c != default), allowed[0])
    if kind is bool:
        return not default
    if field.metadata.get("check"):  # devices, pretrain stages: a value the check takes
        return next(v for v in ("cpu", "sets") if v != default and not field.metadata["check"](v))
    if kind in (int, float):
        start = default if isinstance(default, (int, float)) else max(field.metadata.get("min") or 0, 1)
        multiple = field.metadata.get("multiple_of")
        steps = (multiple, -multiple) if multiple else (1, -1, 2) if kind is int else (0.5, -0.5, 0.25)
        return next(kind(start + d) for d in steps if within_bounds(field, start + d))
    if typing.get_origin(kind) is list:
        return ["a=1"] if field.name == "set" else ["first item", "second item"]
    return "some-value"


def within_bounds(field, value) -> bool:
    meta = field.metadata
    return (
        (meta.get("min") is None or value >= meta["min"])
        and (meta.get("max") is None or value <= meta["max"])
        and (meta.get("above") is None or value > meta["above"])
        and (not meta.get("multiple_of") or value % meta["multiple_of"] == 0)
    )


def bad_value(section: Section, field) -> typing.Any | None:
    """A value of the right type that the field's checks refuse (None: it has no checks)."""
    meta, allowed = field.metadata, choices_of(field)
    if allowed:
        return "not-a-choice" if all(isinstance(c, str) for c in allowed) else None
    if meta.get("check"):  # devices, pretrain stages
        return "no-such-value"
    if meta.get("min") is not None:
        return type(field_default(field) or meta["min"])(meta["min"] - 1)
    if meta.get("above") is not None:
        return float(meta["above"])
    if meta.get("max") is not None:
        return type(meta["max"])(meta["max"] + 1)
    return None


def yaml_argv(command: str, section: Section, field, value, tmp_path) -> list[str]:
    data = {field.name: value} if section.key is None else {section.key: {field.name: value}}
    path = tmp_path / f"{field.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return [command, "--config", str(path)]


def option_of(args: argparse.Namespace, section: Section, field) -> typing.Any:
    return getattr(args.options[section.key], field.name)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_a_yaml_key_with_the_same_value_and_checks(command, tmp_path):
    words = command.split()
    for section, field in fields_of(command):
        value = sample_value(section, field)
        by_flag = parse_cli(to_argv(words, [section], {field.name: value}))
        by_yaml = parse_cli(yaml_argv(command, section, field, value, tmp_path))
        assert option_of(by_flag, section, field) == option_of(by_yaml, section, field), field.name

        bad = bad_value(section, field)
        if bad is None:
            continue
        with pytest.raises(UserError) as from_flag:
            parse_cli(to_argv(words, [section], {field.name: bad}))
        with pytest.raises(UserError) as from_yaml:
            parse_cli(yaml_argv(command, section, field, bad, tmp_path))
        assert str(from_flag.value) == str(from_yaml.value), field.name
        assert field.name in str(from_flag.value) or "unknown method" in str(from_flag.value)


def test_flags_win_over_yaml_and_yaml_over_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("base: embedded\ntrain:\n  steps: 7\n  batch_size: 3\nadapter:\n  method: paca\n  dropout: 0.1\n")
    args = parse_cli(["train-style", "--config", str(config), "--steps", "9"])
    assert args.options["train"].steps == 9 and args.options["train"].batch_size == 3
    assert args.options["adapter"].method == "paca" and args.options["adapter"].hyperparameters == {"dropout": 0.1}
    assert args.options["train"].learning_rate == 3e-3  # the command's default over TrainConfig's


def test_a_yaml_base_key_is_accepted(tmp_path):
    """`base:` in YAML was once refused as unknown because the flag had a default of its own."""
    config = tmp_path / "run.yaml"
    config.write_text("base: some/model\n")
    assert parse_cli(["train-style", "--config", str(config)]).base == "some/model"
    assert parse_cli(["train-llm", "--config", str(config)]).base == "some/model"
