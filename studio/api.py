"""The studio API the UI calls: what the application knows that the pages need.

Every job the UI starts is a `studio ...` command line run in a worker process (ui/jobs.py), so its
run folder is the CLI's; the functions below are what the UI asks the application about (demo
sets, methods, defaults, dataset validation, command checking), so ui/ never imports pipelines or
peft_core. The `studio ui` subcommand itself is ui/command.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import shlex
from pathlib import Path
from typing import Any

from pipelines.errors import UserError
from studio.train_diffusion import ASSETS, KINDS

SETS = ASSETS / "sets"


# -- the studio API the UI calls -----------------------------------------------------------------
def demo_sets(kind: str | None = None) -> dict[str, Path]:
    """The shipped image sets (name -> folder), optionally only 'content-*' or 'style-*'."""
    if not SETS.is_dir():
        return {}
    return {p.name: p for p in sorted(SETS.iterdir()) if p.is_dir() and (kind is None or p.name.startswith(f"{kind}-"))}


def default_demo_set(kind: str) -> str:
    return Path(KINDS[kind]["data"]).name


def method_defaults(method: str) -> dict[str, Any]:
    """The method's hyperparameters and their defaults (targets excluded)."""
    from peft_core import get_method
    from peft_core.errors import AdapterError

    try:
        config_class = get_method(method).config_class
    except AdapterError as error:
        raise UserError(str(error)) from None
    values = {}
    for field in dataclasses.fields(config_class):
        if field.init and field.name not in ("targets", "exclude", "method"):
            if field.default is not dataclasses.MISSING:
                values[field.name] = field.default
            elif field.default_factory is not dataclasses.MISSING:
                values[field.name] = field.default_factory()
    return values


def adapter_defaults(method: str, trainer: str) -> dict[str, Any]:
    """The hyperparameters `trainer` ("llm" or "diffusion") starts `method` from: the method's own
    trainer defaults over its paper defaults (no "r" / "alpha" key: the method has no rank / alpha)."""
    from studio.adapters import trainer_defaults

    return {**method_defaults(method), **trainer_defaults(method, trainer)}


def method_note(method: str) -> str:
    """The method's one line for the UI: what to know before picking it ("" where there is nothing)."""
    from peft_core import get_method
    from peft_core.errors import AdapterError

    try:
        return get_method(method).capabilities.note
    except AdapterError as error:
        raise UserError(str(error)) from None


def train_defaults(kind: str) -> dict[str, Any]:
    """What a bare `studio train-<kind>` would use: TrainConfig's fields plus the adapter's rank and alpha."""
    from studio.adapters import trainer_defaults

    args = check_command([f"train-{kind}"])
    adapter = args.options["adapter"]
    defaults = trainer_defaults(adapter.method, "diffusion")
    return {
        **dataclasses.asdict(args.options["train"]),
        "method": adapter.method,
        "rank": defaults.get("r"),
        "alpha": defaults.get("alpha"),
    }


def llm_methods() -> list[str]:
    """Every method `studio train-llm` trains (it runs CorDA's and SPT's prepare step itself)."""
    from peft_core import available_methods

    return list(available_methods())


def llm_defaults(method: str = "lora") -> dict[str, Any]:
    """What a bare `studio train-llm --method <method>` would use: LlmTrainConfig's fields, the
    trainer's rank and alpha for the method (None where it has none: Compacter) and every
    hyperparameter of the method with the trainer's defaults over the paper's."""
    from studio.adapters import trainer_defaults
    from studio.llm import LlmTrainConfig

    hyperparameters = method_defaults(method)  # also refuses an unknown method
    adapter = trainer_defaults(method, "llm")
    return {
        **dataclasses.asdict(LlmTrainConfig()),
        "rank": adapter.get("r"),
        "alpha": adapter.get("alpha"),
        "hyperparameters": {**hyperparameters, **adapter},
    }


def validate_jsonl(path: str | Path, for_training: bool = True) -> int:
    """The number of usable rows of an LLM data file (JSONL, JSON, CSV or Parquet), or the trainer's
    UserError listing every malformed row by number (the same check `studio train-llm` runs before loading
    the model)."""
    from studio.llm import read_jsonl

    return len(read_jsonl(path, for_training=for_training))


def embedded_llm_task() -> dict[str, Path]:
    """The embedded tiny LM's shipped data: the held-out addition task's train/test files and the
    knowledge probe (what a bare `studio train-llm` trains and evaluates on)."""
    from studio.llm import default_data

    train, evaluation = default_data()
    return {"train": train, **{path.stem: path for path in evaluation}}


def b4m_defaults() -> dict[str, Any]:
    from pipelines.b4m import BreakForMakeConfig

    return dataclasses.asdict(BreakForMakeConfig())


def validate_dataset(
    folder: str | Path, template: str | None = None, trigger: str | None = None
) -> tuple[int, list[str]]:
    """(number of usable images, warnings) of a training folder, or the CLI's UserError listing every problem."""
    from pipelines.data import validate_image_folder

    report = validate_image_folder(folder, template=template or None, trigger=trigger or None)
    return len(report.records), list(report.warnings)


def has_command(name: str) -> bool:
    """Whether this studio has the subcommand (the UI shows tabs for commands that exist)."""
    from studio.cli import subcommands

    return name in subcommands()


def command_sections(command: str):
    """The option sections of a subcommand (what the UI builds its forms from)."""
    from studio.cli import command_sections as sections_of

    return sections_of(command)


def check_command(argv: list[str]) -> argparse.Namespace:
    """Parse a `studio` command line as the CLI would and resolve train-* options; errors are UserErrors."""
    from studio.cli import parse

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parse(argv)
    except SystemExit:
        message = stderr.getvalue().strip().splitlines()
        raise UserError(message[-1] if message else f"invalid command: {shlex.join(argv)}") from None
    if args.command in ("train-style", "train-content") and not args.resume:
        from studio.train_diffusion import resolve

        resolve(args)
    elif args.command == "train-llm" and not args.resume:
        from studio.train_llm import resolve

        resolve(args)
    return args


def check_llm_command(argv: list[str]) -> None:
    """`check_command`, then what `studio train-llm` checks before it writes anything: the method
    against the model's architecture (built on the meta device, no weights), LoRAM/NF4/export rules."""
    from studio.llm import check_method_on_model
    from studio.train_llm import resolve

    args = check_command(argv)
    if args.command != "train-llm" or args.resume:
        raise UserError(f"expected a new `studio train-llm` command, got {command_line(argv)}")
    check_method_on_model(resolve(args))


def config_yaml(argv: list[str]) -> str:
    """The YAML that `studio <command> --config FILE` reads to make the same run as `argv`: every
    option of the command, as resolved from the flags and defaults."""
    import yaml

    from studio.options import record

    args = check_command(argv)
    if getattr(args, "resume", None):
        return ""
    return yaml.safe_dump(record(command_sections(args.command), args.options), sort_keys=False)


def command_line(argv: list[str]) -> str:
    return shlex.join(["studio", *argv])
