"""The `studio` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and
`run(args) -> int`; this file only wires them together so `studio --help` lists them all.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from peft_core.errors import AdapterError
from studio.errors import UserError

# subcommand name -> (module path, one-line help). Modules are imported lazily so that
# `studio --help` stays fast and a missing optional dependency only breaks its own command.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("studio.demo", "Quickest real demo of peft_core: attach, train, merge, save, reload."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="peft-studio: parameter-efficient fine-tuning studio.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_path, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_path)
        importlib.import_module(module_path).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (UserError, AdapterError) as error:  # expected, actionable failures: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
