"""Runs on disk: every training job is one folder the CLI, the UI and `--resume` all understand.

runs/<name>/
    config.yaml          the resolved config (what was asked + every default), enough to rerun
    run.json             status (running / finished / failed / interrupted), step, loss, timestamps
    logs/events.jsonl    one JSON line per progress event
    logs/tensorboard/    scalars, when the tensorboard package is installed
    samples/             sample grids written during and after training
    checkpoints/         atomic checkpoints (pipelines.checkpoint)
    adapter/<name>/      the final adapter (peft_core format)
    run.lock             who writes the run now (studio.run_lock): one process at a time

A command runs its training inside the run's lifecycle, which keeps run.json's status true:

    with run_folder.lifecycle(resume_command=f"studio train-llm --resume {run_folder.directory}") as outcome:
        result = train(...)
    if outcome.interrupted:
        return outcome.exit_code          # 130 (Ctrl-C, a STOP file) or 143 (SIGTERM)
    run_folder.update(status="finished", ...)

The lifecycle holds the run lock (Run.create and a command's `acquire()` on --resume take it earlier),
and turns SIGINT/SIGTERM into a checkpointed stop (pipelines.signals). A run whose run.json says
"running" but whose lock has no live holder was killed (SIGKILL, power loss): `list_runs` reports it
"interrupted".
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

from peft_core.io import atomic_write_bytes, finite_json, read_json, write_json
from pipelines.checkpoint import latest_checkpoint, remove_partial_writes
from pipelines.errors import UserError
from pipelines.signals import SIGNALS
from pipelines.training import STOP_FILE, StopRequested
from studio import run_lock


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
        run.acquire()
        atomic_write_bytes(
            directory / "config.yaml", yaml.safe_dump({"kind": kind, **config}, sort_keys=False).encode()
        )
        run.update(status="running", kind=kind, created=time.time(), step=0)
        return run

    @classmethod
    def create_shared(cls, root: str | os.PathLike, name: str, kind: str, config: dict[str, Any], processes) -> Run:
        """`create` in the main one of several processes (accelerate's `processes` state); every process
        gets the folder's path (a one-process run simply creates it)."""
        if processes.num_processes == 1:
            return cls.create(root, name, kind=kind, config=config)
        from accelerate.utils import broadcast_object_list

        path = [str(cls.create(root, name, kind=kind, config=config).directory) if processes.is_main_process else None]
        broadcast_object_list(path)
        return cls(Path(path[0]))

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Run:
        directory = Path(directory)
        if not (directory / "run.json").is_file():
            raise UserError(f"{directory} is not a run folder (no run.json); pass a folder made by `studio train-*`")
        return cls(directory)

    # -- the writer -------------------------------------------------------------------------
    def acquire(self) -> None:
        """Become the run's one writer (UserError naming the live holder otherwise); see studio.run_lock."""
        run_lock.acquire(self.directory)

    def release(self) -> None:
        run_lock.release(self.directory)

    def holder(self) -> dict[str, Any] | None:
        """The live process writing this run (pid, host, argv, since), or None."""
        return run_lock.holder(self.directory)

    # -- state ------------------------------------------------------------------------------
    def lifecycle(self, resume_command: str, main_process: bool = True) -> RunLifecycle:
        """A context manager around a run's training: takes the run lock, removes a stale STOP file and
        what a killed process half-wrote, marks it running (clearing an old error) and catches SIGINT and
        SIGTERM as stop requests (pipelines.signals: the trainer checkpoints the step in progress); on
        KeyboardInterrupt (a signal, or a STOP file's `StopRequested`) marks it interrupted, prints how
        to resume and swallows the interrupt (`outcome.interrupted`; exit code 130, 143 for SIGTERM); on
        any other exception marks it failed with "Type: message" and re-raises. On success the caller
        writes "finished" with its own fields. Only the main process (`main_process=True`) holds the
        lock, writes run.json or prints."""
        return RunLifecycle(self, resume_command, main_process)

    @property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load((self.directory / "config.yaml").read_text())

    def reached_step(self) -> int:
        """The step of the newest intact checkpoint (where a resume starts), 0 without one."""
        checkpoint = latest_checkpoint(self.directory)
        return int(read_json(checkpoint / "state.json")["step"]) if checkpoint else 0

    def check_resume_steps(self, steps: int, flag: str = "--steps") -> None:
        """UserError if `steps` (a new total given with --resume) is below the step the run has reached."""
        reached = self.reached_step()
        if steps < reached:
            raise UserError(
                f"{flag} {steps} is below step {reached}, which this run has already reached; "
                f"pass {flag} {reached} or more (more trains longer)"
            )

    def update_config(self, changes: dict[str | None, dict[str, Any]]) -> None:
        """Merge `changes` ({section key or None for top-level: {option: value}}) into config.yaml (the
        options a --resume changed, so the next resume keeps them)."""
        record = self.config
        for key, values in changes.items():
            if values:
                (record if key is None else record.setdefault(key, {})).update(values)
        atomic_write_bytes(self.directory / "config.yaml", yaml.safe_dump(record, sort_keys=False).encode())

    @property
    def info(self) -> dict[str, Any]:
        return read_json(self.directory / "run.json")

    def update(self, **fields: Any) -> None:
        """Merge `fields` into run.json (NaN/inf written as null: run.json stays strict JSON)."""
        path = self.directory / "run.json"
        info = read_json(path) if path.is_file() else {}
        info.update(fields, updated=time.time())
        write_json(path, finite_json(info))

    def log_event(self, event: Any) -> None:
        """Append one progress event (a dataclass or dict) and keep run.json's progress current."""
        record = dataclasses.asdict(event) if dataclasses.is_dataclass(event) else dict(event)
        record = finite_json({**record, "time": time.time()})  # NaN/inf as null: every line stays strict JSON
        with open(self.directory / "logs" / "events.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(record, allow_nan=False) + "\n")
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

    interrupted: bool = False  # Ctrl-C, SIGTERM or a requested stop: the run is resumable
    signal: int | None = None  # the stop signal that interrupted it (None: a STOP file)

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal (130 SIGINT, 143 SIGTERM); 130 for a STOP file, as for Ctrl-C."""
        if not self.interrupted:
            return 0
        return 128 + int(self.signal) if self.signal else 130


class RunLifecycle:
    """`Run.lifecycle`'s context manager: running -> finished (by the caller) | interrupted | failed."""

    def __init__(self, run: Run, resume_command: str, main_process: bool = True) -> None:
        self.run, self.resume_command, self.main_process = run, resume_command, main_process
        self.outcome = RunOutcome()
        self.catching = False

    def __enter__(self) -> RunOutcome:
        if self.main_process:
            self.run.acquire()
            (self.run.directory / STOP_FILE).unlink(missing_ok=True)  # a stale request must not stop this start
            remove_partial_writes(self.run.directory)
            self.run.update(status="running", error=None, eta_s=None)
        self.catching = SIGNALS.install(verbose=self.main_process)
        return self.outcome

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        signal_name = SIGNALS.name if self.catching else None
        self.outcome.signal = SIGNALS.received if self.catching else None
        if self.catching:
            SIGNALS.restore()
            self.catching = False
        if kind is None:
            return False  # finished (a signal after the last step changes nothing: the run is complete)
        if issubclass(kind, KeyboardInterrupt):  # StopRequested is one too
            self.outcome.interrupted = True
            if self.main_process:
                self.run.update(status="interrupted", eta_s=None)
                how = str(error) if isinstance(error, StopRequested) else ""
                how = how or (
                    f"stopped at once by {signal_name}; the newest checkpoint resumes it" if signal_name else ""
                )
                print(f"\n{how}" if how else "", file=sys.stderr)  # e.g. "stopped by SIGTERM after step 4 of 8; ..."
                print(f"interrupted; resume with: {self.resume_command}", file=sys.stderr)
                self.run.release()
            return True  # handled: the caller reads outcome.interrupted
        if self.main_process:
            self.run.update(status="failed", error=f"{kind.__name__}: {error}")
            self.run.release()
        return False  # re-raised


def list_runs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run under `root`, newest first, with its run.json. A run that says "running" but has no live
    writer (its process was killed: SIGKILL, power loss) is reported "interrupted", with
    `"process_gone": True`: it resumes like any interrupted run."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = []
    for directory in root.iterdir():
        if (directory / "run.json").is_file():
            info = {"path": str(directory), "name": directory.name, **read_json(directory / "run.json")}
            if info.get("status") == "running" and run_lock.holder(directory) is None:
                info.update(status="interrupted", process_gone=True)
            runs.append(info)
    return sorted(runs, key=lambda r: r.get("created", 0), reverse=True)
