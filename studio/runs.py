"""Runs on disk: every training job is one folder the CLI, the UI and `--resume` all understand.

runs/<name>/
    config.yaml          the resolved config (what was asked + every default), enough to rerun
    run.json             status (running / finished / failed / interrupted), step, loss, timestamps
    logs/events.jsonl    one JSON line per progress event
    logs/tensorboard/    scalars, when the tensorboard package is installed
    samples/             sample grids written during and after training
    checkpoints/         atomic checkpoints (pipelines.checkpoint)
    adapter/<name>/      the final adapter (peft_core format)

A command runs its training inside the run's lifecycle, which keeps run.json's status true:

    with run_folder.lifecycle(resume_command=f"studio train-llm --resume {run_folder.directory}") as outcome:
        result = train(...)
    if outcome.interrupted:
        return 130
    run_folder.update(status="finished", ...)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from peft_core.io import atomic_write_bytes, read_json, write_json
from pipelines.errors import UserError


def safe_run_name(name: str) -> str:
    """Letters, digits, '-', '_' and '.' only, never a path: names come from users and browsers."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    if not cleaned:
        raise UserError(f"run name {name!r} has no usable characters; use letters, digits, '-' or '_'")
    return cleaned[:100]


@dataclasses.dataclass
class Run:
    directory: Path

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, name: str, kind: str, config: dict[str, Any]) -> Run:
        """A new run folder `root/name` (suffixed -2, -3, ... if taken)."""
        root = Path(root)
        base = safe_run_name(name)
        directory, counter = root / base, 1
        while directory.exists():
            counter += 1
            directory = root / f"{base}-{counter}"
        (directory / "logs").mkdir(parents=True)
        run = cls(directory)
        atomic_write_bytes(
            directory / "config.yaml", yaml.safe_dump({"kind": kind, **config}, sort_keys=False).encode()
        )
        run.update(status="running", kind=kind, created=time.time(), step=0)
        return run

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Run:
        directory = Path(directory)
        if not (directory / "run.json").is_file():
            raise UserError(f"{directory} is not a run folder (no run.json); pass a folder made by `studio train-*`")
        return cls(directory)

    # -- state ------------------------------------------------------------------------------
    def lifecycle(self, resume_command: str, main_process: bool = True) -> RunLifecycle:
        """A context manager around a run's training: marks it running; on KeyboardInterrupt (Ctrl-C,
        or a STOP file's `StopRequested`) marks it interrupted, prints how to resume and swallows the
        interrupt (`outcome.interrupted`; exit code 130); on any other exception marks it failed with
        "Type: message" and re-raises. On success the caller writes "finished" with its own fields.
        Only the main process (`main_process=True`) writes run.json or prints."""
        return RunLifecycle(self, resume_command, main_process)

    @property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load((self.directory / "config.yaml").read_text())

    @property
    def info(self) -> dict[str, Any]:
        return read_json(self.directory / "run.json")

    def update(self, **fields: Any) -> None:
        path = self.directory / "run.json"
        info = read_json(path) if path.is_file() else {}
        info.update(fields, updated=time.time())
        write_json(path, info)

    def log_event(self, event: Any) -> None:
        """Append one progress event (a dataclass or dict) and keep run.json's progress current."""
        record = dataclasses.asdict(event) if dataclasses.is_dataclass(event) else dict(event)
        record["time"] = time.time()
        with open(self.directory / "logs" / "events.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
        if record.get("kind") == "step":
            self.update(
                step=record["step"], total_steps=record["total_steps"], loss=record["loss"], eta_s=record.get("eta_s")
            )
        elif record.get("kind") == "sample":
            self.update(latest_sample=record["path"])
        self._tensorboard(record)

    def _tensorboard(self, record: dict[str, Any]) -> None:
        if record.get("kind") != "step":
            return
        if not hasattr(self, "_writer"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.directory / "logs" / "tensorboard"))
            except ImportError:  # tensorboard is optional; events.jsonl always has everything
                self._writer = None
        if self._writer is not None and record.get("loss") is not None:  # None: a stage loaded, not trained
            self._writer.add_scalar("loss", record["loss"], record["step"])
            if record.get("lr") is not None:
                self._writer.add_scalar("lr", record["lr"], record["step"])


@dataclasses.dataclass
class RunOutcome:
    """How the body of a `Run.lifecycle` ended, when it did not raise."""

    interrupted: bool = False  # Ctrl-C or a requested stop: the run is resumable

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 0


class RunLifecycle:
    """`Run.lifecycle`'s context manager: running -> finished (by the caller) | interrupted | failed."""

    def __init__(self, run: Run, resume_command: str, main_process: bool = True) -> None:
        self.run, self.resume_command, self.main_process = run, resume_command, main_process
        self.outcome = RunOutcome()

    def __enter__(self) -> RunOutcome:
        if self.main_process:
            self.run.update(status="running", error=None)
        return self.outcome

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        if kind is None:
            return False
        if issubclass(kind, KeyboardInterrupt):  # StopRequested is one too
            self.outcome.interrupted = True
            if self.main_process:
                self.run.update(status="interrupted")
                print(f"\ninterrupted; resume with: {self.resume_command}", file=sys.stderr)
            return True  # handled: the caller reads outcome.interrupted
        if self.main_process:
            self.run.update(status="failed", error=f"{kind.__name__}: {error}")
        return False  # re-raised


def list_runs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run under `root`, newest first, with its run.json."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = []
    for directory in root.iterdir():
        if (directory / "run.json").is_file():
            runs.append({"path": str(directory), "name": directory.name, **read_json(directory / "run.json")})
    return sorted(runs, key=lambda r: r.get("created", 0), reverse=True)
