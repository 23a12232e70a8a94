"""The `studio` command line: one entry point, one subcommand per job.

Each subcommand lives in a module that exposes `add_arguments(parser, **options)` and
`run(args) -> int` (one module may serve several subcommands through `options`, e.g.
train-style and train-content); this file only wires them together so `studio --help` lists
them all. Modules keep heavy imports (diffusers, transformers) inside `run`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from peft_core.errors import AdapterError
from studio.errors import UserError

# subcommand name -> (module path, one-line help[, options for add_arguments]).
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
    "ui": ("studio.ui_cmd", "The studio in a browser (Gradio): train, watch, generate, compose, manage runs."),
    "pretrain-base": ("studio.pretrain", "Recipe that pretrains the embedded tiny SD, tiny LM and judges in assets/."),
    "demo": ("studio.demo", "Quickest real demo of peft_core: attach, train, merge, save, reload."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio", description="peft-studio: parameter-efficient fine-tuning studio.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_path, help_text, *options) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_path)
        importlib.import_module(module_path).add_arguments(sub, **(options[0] if options else {}))
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
