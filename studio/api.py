"""`studio ui`: the Gradio studio in a browser, and the small studio API its pages call.

    studio ui                                   # http://127.0.0.1:7860, workspace ./studio-workspace
    studio ui --port 8080 --auth-file users.txt --workspace /data/studio

Every job the UI starts is a `studio ...` command line run in a worker process (ui/jobs.py), so its
run folder is the CLI's; the functions below are what the UI asks the application about (demo
sets, methods, defaults, dataset validation, command checking), so ui/ never imports pipelines or
peft_core. Served files come only from the workspace; see docs/ui.md for the security model.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it, use --auth then)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASS",
        help="require this login (visible in the process list: prefer --auth-file)",
    )
    parser.add_argument("--auth-file", default=None, metavar="FILE", help="file of USER:PASS lines ('#' comments)")
    parser.add_argument(
        "--workspace",
        default="studio-workspace",
        help="folder for runs, uploads, jobs and outputs; the only files the UI serves (default ./studio-workspace)",
    )
    parser.add_argument("--max-jobs", type=int, default=1, help="training jobs running at once (default 1)")
    parser.add_argument(
        "--max-queued", type=int, default=8, help="jobs waiting in the queue, all users together (default 8)"
    )
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest uploaded file in MB (default 20)")


def parse_auth(auth: str | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """[(user, password)] from --auth and --auth-file, or None for no login."""
    entries = []
    if auth:
        entries.append(("--auth", auth))
    if auth_file:
        path = Path(auth_file)
        if not path.is_file():
            raise UserError(f"auth file {path} does not exist; write one USER:PASS per line")
        lines = path.read_text(encoding="utf-8").splitlines()
        entries += [
            (f"{path}:{n}", line.strip())
            for n, line in enumerate(lines, 1)
            if line.strip() and not line.strip().startswith("#")
        ]
        if not any(where.startswith(str(path)) for where, _ in entries):
            raise UserError(f"auth file {path} holds no USER:PASS line")
    pairs = []
    for where, entry in entries:
        user, separator, password = entry.partition(":")
        if not separator or not user.strip() or not password:
            raise UserError(f"{where}: expected USER:PASS with a non-empty user and password")
        pairs.append((user.strip(), password))
    return pairs or None


def run(args: argparse.Namespace) -> int:
    from ui.app import launch

    if args.max_jobs < 1 or args.max_queued < 1 or args.max_upload_mb <= 0:
        raise UserError("--max-jobs and --max-queued must be >= 1 and --max-upload-mb > 0")
    auth = parse_auth(args.auth, args.auth_file)
    if auth is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {args.host} without --auth: anyone who reaches this port can train and delete runs"
        )
    launch(
        Path(args.workspace),
        host=args.host,
        port=args.port,
        auth=auth,
        max_jobs=args.max_jobs,
        max_queued=args.max_queued,
        max_upload_mb=args.max_upload_mb,
    )
    return 0


# -- the studio API the UI calls -----------------------------------------------------------------
def demo_sets(kind: str | None = None) -> dict[str, Path]:
    """The shipped image sets (name -> folder), optionally only 'content-*' or 'style-*'."""
    if not SETS.is_dir():
        return {}
    return {p.name: p for p in sorted(SETS.iterdir()) if p.is_dir() and (kind is None or p.name.startswith(f"{kind}-"))}


def default_demo_set(kind: str) -> str:
    return Path(KINDS[kind]["data"]).name


def trainable_methods() -> list[str]:
    """Methods `studio train-*` can attach directly (those needing a data-driven prepare step are CLI/API only)."""
    from peft_core import available_methods, get_method

    return [name for name in available_methods() if get_method(name).prepare is None]


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


def train_defaults(kind: str) -> dict[str, Any]:
    """What a bare `studio train-<kind>` would use: TrainConfig's fields plus the adapter's rank and alpha."""
    from studio.train_diffusion import resolve

    settings = resolve(check_command([f"train-{kind}"]))
    adapter = settings["adapter"].to_dict()
    return {
        **dataclasses.asdict(settings["train"]),
        "method": adapter["method"],
        "rank": adapter.get("r"),
        "alpha": adapter.get("alpha"),
    }


def llm_methods() -> list[str]:
    """Every method `studio train-llm` trains (it runs CorDA's and SPT's prepare step itself)."""
    from peft_core import available_methods

    return list(available_methods())


def llm_defaults(method: str = "lora") -> dict[str, Any]:
    """What a bare `studio train-llm --method <method>` would use: LlmTrainConfig's fields, the
    trainer's rank and alpha for the method (None where it has none: Compacter) and every
    hyperparameter of the method with the trainer's defaults over the paper's."""
    from studio.llm import LlmTrainConfig
    from studio.llm import method_defaults as llm_method_defaults

    hyperparameters = method_defaults(method)  # also refuses an unknown method
    _, adapter = llm_method_defaults(method)
    return {
        **dataclasses.asdict(LlmTrainConfig()),
        "rank": adapter.get("r"),
        "alpha": adapter.get("alpha"),
        "hyperparameters": {**hyperparameters, **adapter},
    }


def validate_jsonl(path: str | Path, for_training: bool = True) -> int:
    """The number of usable rows of a JSONL file, or the trainer's UserError listing every malformed
    line by number (the same check `studio train-llm` runs before loading the model)."""
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
    from studio.cli import SUBCOMMANDS

    return name in SUBCOMMANDS


def check_command(argv: list[str]) -> argparse.Namespace:
    """Parse a `studio` command line as the CLI would and resolve train-* options; errors are UserErrors."""
    from studio.cli import build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(argv)
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
    """The YAML that `studio train-* --config FILE` reads to make the same run as `argv`."""
    import yaml

    args = check_command(argv)
    if args.command == "train-llm" and not args.resume:
        from studio.llm import job_record
        from studio.train_llm import resolve

        return yaml.safe_dump(job_record(resolve(args)), sort_keys=False)
    if args.command not in ("train-style", "train-content") or args.resume:
        return ""
    from studio.train_diffusion import resolve

    settings = resolve(args)
    record = {
        "data": str(settings["data"]),
        **{key: settings[key] for key in ("base", "template", "trigger", "resolution") if settings[key] is not None},
        "adapter": settings["adapter"].to_dict(),
        "train": dataclasses.asdict(settings["train"]),
    }
    return yaml.safe_dump(record, sort_keys=False)


def command_line(argv: list[str]) -> str:
    return shlex.join(["studio", *argv])
