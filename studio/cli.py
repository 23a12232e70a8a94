"""The `studio` command line: one entry point, one subcommand per job.

Each subcommand lives in a module that exposes `sections(**options) -> list[Section]` (its options,
one dataclass per section, see studio/options.py) and `run(args) -> int`; one module may serve several
subcommands through `options` (train-style and train-content). This file only wires them together:
it builds every flag from the sections, reads `--config`, checks every value, and hands `run` the
namespace with `args.options` ({section key: dataclass}) and the top-level options as attributes.
Modules keep heavy imports (diffusers, transformers) inside `run`.

Layers above the studio add subcommands through the "studio.commands" entry-point group
(pyproject.toml): `studio ui` is the ui package's `ui.command`, so the studio never imports the UI.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from peft_core.errors import AdapterError
from studio import run_lock
from studio.errors import UserError
from studio.options import Section, add_options, given_options, resolve_options

# subcommand name -> (module path, one-line help[, options for sections()]).
SUBCOMMANDS: dict[str, tuple] = {
    "train-style": (
        "studio.train_diffusion",
        "Train a style adapter on images (no arguments: the embedded demo).",
        {"kind": "style"},
    ),
    "train-content": (
        "studio.train_diffusion",
        "Train a content adapter on images of one subject.",
        {"kind": "content"},
    ),
    "break-for-make": (
        "studio.b4m_cli",
        "Break-for-Make: content PLP + style PLP (break), joint adapter (make), compose.",
    ),
    "generate": (
        "studio.generate",
        "Generate images with a base model and any adapters (with weights).",
        {"mode": "generate"},
    ),
    "compose": (
        "studio.generate",
        "Compose a content and a style adapter (or a B4M folder) at generation time.",
        {"mode": "compose"},
    ),
    "export": ("studio.export", "Export an adapter to the diffusers or HF PEFT format."),
    "analyze": (
        "studio.analyze",
        "LoRA computational-limits report: per-head attention regime (table, JSON, heatmap).",
    ),
    "train-llm": (
        "studio.train_llm",
        "Fine-tune a causal LM with any method on JSONL (no arguments: the embedded demo).",
    ),
    "chat": ("studio.chat", "Talk to a finished train-llm run (its base + adapter), or to a base LM alone."),
    "pretrain-base": ("studio.pretrain", "Recipe that pretrains the embedded tiny SD, tiny LM and judges in assets/."),
    "demo": ("studio.demo", "Quickest real demo of peft_core: attach, train, merge, save, reload."),
}


def subcommands() -> dict[str, tuple]:
    """The studio's own subcommands, then those that installed packages register (the UI)."""
    commands = dict(SUBCOMMANDS)
    for entry in sorted(entry_points(group="studio.commands"), key=lambda e: e.name):
        module = importlib.import_module(entry.value)
        commands.setdefault(entry.name, (entry.value, module.HELP))
    return commands


def command_sections(name: str) -> list[Section]:
    module_path, _help, *options = subcommands()[name]
    return importlib.import_module(module_path).sections(**(options[0] if options else {}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="peft-studio: parameter-efficient fine-tuning studio.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_path, help_text, *options) in subcommands().items():
        # The module's docstring (what the command does, with examples) is its --help description.
        description = importlib.import_module(module_path).__doc__ or help_text
        sub = subparsers.add_parser(
            name, help=help_text, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.set_defaults(_module=module_path, **(options[0] if options else {}))
        add_options(sub, command_sections(name))
    return parser


def parse(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line as `run` gets it: flags over `--config` over defaults, every value checked
    (UserError otherwise). `args.options[key]` is each section's dataclass; the top-level section's
    fields are also attributes of `args`; `args.given` names the options given as flags (a --resume
    checks them: studio.options.resume_flags)."""
    args = (parser or build_parser()).parse_args(argv)
    if args.command is None:
        return args
    sections = command_sections(args.command)
    args.given = given_options(args, sections)  # before resolving: unset flags are absent (argparse.SUPPRESS)
    args.options = resolve_options(args, sections)
    for section in sections:
        if section.key is None:
            for field in section.fields():
                setattr(args, field.name, getattr(args.options[None], field.name))
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse(argv, parser)
        if args.command is None:
            parser.print_help()
            return 2
        module = importlib.import_module(args._module)
        return int(module.run(args) or 0)
    except (UserError, AdapterError) as error:  # expected, actionable failures: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a run's training (loading, checking): nothing was trained
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        run_lock.release_all()  # the run folders this command wrote are free again


if __name__ == "__main__":
    sys.exit(main())
