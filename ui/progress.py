"""Live progress of a run, read from what the CLI writes anyway: run.json and logs/events.jsonl.

The worker process appends to events.jsonl while the server reads it, so a last line may be
half-written: it is skipped until it is complete. Offsets are remembered per file, so a poll
reads only what was appended since the last one.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from studio.runs import Run


class EventTail:
    """Incremental reader of one events.jsonl (thread-safe; one per run is enough)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.events = path, 0, []
        self._lock = threading.Lock()

    def read(self) -> list[dict[str, Any]]:
        with self._lock:
            try:
                with open(self.path, "rb") as file:
                    file.seek(self.offset)
                    chunk = file.read()
            except FileNotFoundError:
                return self.events
            complete = chunk[: chunk.rfind(b"\n") + 1]  # leave a half-written last line for the next poll
            self.offset += len(complete)
            for line in complete.splitlines():
                try:
                    self.events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            return self.events


_tails: dict[Path, EventTail] = {}
_tails_lock = threading.Lock()


def events_of(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "logs" / "events.jsonl"
    with _tails_lock:
        tail = _tails.setdefault(path, EventTail(path))
        if tail.offset and (not path.exists() or path.stat().st_size < tail.offset):  # deleted or rewritten
            tail = _tails[path] = EventTail(path)
    return tail.read()


B4M_STAGES = ("break-content", "break-style", "make")  # the stages a Break-for-Make run logs, in order


def loss_points(events: list[dict[str, Any]]) -> dict[str, list]:
    """Columns for the loss plot: step, loss and stage (B4M runs log break-content/break-style/make)."""
    steps = [e for e in events if e.get("kind") == "step" and e.get("loss") is not None]
    return {
        "step": [e["step"] for e in steps],
        "loss": [float(e["loss"]) for e in steps],
        "stage": [e.get("stage", "train") for e in steps],
    }


def eval_table(events: list[dict[str, Any]]) -> str:
    """A markdown table of an LLM run's held-out metrics: before training, at eval steps, after."""
    columns: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.get("kind") == "eval" and event.get("metrics"):
            metrics = dict(event["metrics"])
            when = metrics.pop("when", None) or f"step {event.get('step')}"
            columns[when] = metrics
    if not columns:
        return ""
    keys = sorted({key for metrics in columns.values() for key in metrics})
    lines = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in keys:
        cells = [columns[when].get(key) for when in columns]
        lines.append(
            f"| {key} | "
            + " | ".join("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in cells)
            + " |"
        )
    return "\n".join(lines)


def run_info(run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None or not (Path(run_dir) / "run.json").is_file():
        return {}
    return Run(Path(run_dir)).info


def describe(info: dict[str, Any], job_status: str | None = None) -> str:
    """One line of status: state, step / total, loss, ETA."""
    if not info:
        return (
            f"**{job_status or 'waiting'}**: starting (loading the model)"
            if job_status in ("running", "queued", None)
            else f"**{job_status}**"
        )
    # A job's own state wins while it is queued, starting (a resumed run's run.json still says
    # "interrupted" until the command has loaded it) or stopping.
    status = job_status if job_status in ("queued", "running", "stopping") else info.get("status", "?")
    parts = [f"**{status}**"]
    if info.get("total_steps"):
        parts.append(f"step {info.get('step', 0)} / {info['total_steps']}")
    if info.get("loss") is not None:
        parts.append(f"loss {info['loss']:.4f}")
    if status == "running" and info.get("eta_s") is not None:
        parts.append(f"ETA {format_seconds(info['eta_s'])}")
    if info.get("error"):
        parts.append(f"error: {info['error']}")
    return " · ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
